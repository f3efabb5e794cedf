"""How much better a teacher is when its logits are averaged over each image and its mirror (``--distill-flip``).

Prints the dense model's top-1 on the test split with its plain logits, with the logits averaged over the image
and its horizontal mirror (what ``toolchain.train.loop.teacher_logits`` gives the fine-tune) and with the two views'
probabilities averaged, and writes them as JSON with ``--json``. The shared VGG16-BN baseline and the CIFAR-10 copy
by default:

    .venv/bin/python benchmarks/bench_teacher_flip.py
    .venv/bin/python benchmarks/bench_teacher_flip.py --checkpoint runs/.work/baseline-<hash>/model.pt --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BUILD_EDGE_NO_PROGRESS", "1")

from toolchain.data import load_dataset  # noqa: E402
from toolchain.models import create_model  # noqa: E402
from toolchain.train.loop import teacher_logits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT.parent / "shared/models/vgg16_bn_cifar10.pt"))
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--data-dir", default=str(ROOT / ".data/cifar10"), help="ImageFolder root (train/, test/)")
    p.add_argument("--cache-dir", default=str(ROOT / ".data/cache"), help="where the decoded images are kept")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    for what, path in (("checkpoint", args.checkpoint), ("data dir", args.data_dir)):
        if not Path(path).exists():
            sys.stderr.write(f"bench_teacher_flip: {what} {path} does not exist\n")
            return 2
    data = load_dataset("imagefolder", args.data_dir, cache_dir=Path(args.cache_dir), normalization="cifar10")
    model = create_model(args.model, num_classes=data.num_classes)
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    model.eval()
    plain = mirrored = probs = 0
    with torch.no_grad():
        for i in range(0, len(data.test.labels), 500):
            x, y = data.normalize(data.test.images[i:i + 500]), data.test.labels[i:i + 500]
            a, b = model(x), model(torch.flip(x, dims=(-1,)))
            plain += int((a.argmax(1) == y).sum())
            mirrored += int((teacher_logits(model, x, flip=True).argmax(1) == y).sum())
            probs += int(((a.softmax(1) + b.softmax(1)).argmax(1) == y).sum())
    n = len(data.test.labels)
    result = {"checkpoint": args.checkpoint, "test_images": n, "acc_plain": plain / n,
              "acc_mirror_logits": mirrored / n, "acc_mirror_probs": probs / n}
    print(f"top-1 on {n} test images: plain {plain / n:.2%}, logits averaged with the mirror {mirrored / n:.2%}, "
          f"probabilities averaged {probs / n:.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
