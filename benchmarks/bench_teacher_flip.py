"""How much better a teacher is when its logits are averaged over each image and its mirror (``--distill-flip``).

Prints the dense model's top-1 on the test split with its plain logits, with the logits averaged over the image
and its horizontal mirror (the mean ``toolchain.train.loop.teacher_logits`` gives the fine-tune; its test checks
it is that mean) and with the two views' probabilities averaged, and writes them as JSON with ``--json``. The
shared VGG16-BN baseline and the CIFAR-10 copy (bench_mipp's loaders), or another VGG16-BN checkpoint:

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
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("BUILD_EDGE_NO_PROGRESS", "1")

from bench_mipp import CHECKPOINT, load_data, load_dense, require_shared  # noqa: E402  (one way to load them)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(CHECKPOINT), help="VGG16-BN weights (default: the shared baseline)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    require_shared()
    if not Path(args.checkpoint).is_file():
        sys.stderr.write(f"bench_teacher_flip: checkpoint {args.checkpoint} does not exist\n")
        return 2
    data = load_data()
    model = load_dense()
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    plain = mirrored = probs = 0
    with torch.no_grad():
        for i in range(0, len(data.test.labels), 500):
            x, y = data.normalize(data.test.images[i:i + 500]), data.test.labels[i:i + 500]
            a, b = model(x), model(torch.flip(x, dims=(-1,)))
            plain += int((a.argmax(1) == y).sum())
            mirrored += int(((a + b) / 2).argmax(1).eq(y).sum())
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
