"""Two-process data-parallel fine-tuning on the CPU (gloo) through torchrun."""

import json
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent('''
    import hashlib, json, os, sys
    from pathlib import Path

    written = []
    _replace = os.replace
    def recording_replace(src, dst, *a, **k):  # every file the toolchain writes ends in an atomic rename
        written.append(str(dst))
        return _replace(src, dst, *a, **k)
    os.replace = recording_replace

    import torch
    from toolchain.models import create_model
    from toolchain.data import DeviceLoader, load_dataset
    from toolchain.stages.finetune import finetune
    from toolchain.train import distributed as dist_utils
    from toolchain.train.loop import Recipe

    device = dist_utils.init_from_env("cpu")
    rank, world = dist_utils.rank(), dist_utils.world_size()
    workdir = Path(sys.argv[1])
    data = load_dataset("digits", None, cache_dir=workdir / f"cache-{rank}", train_subset=96, test_subset=32)
    torch.manual_seed(1234 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = create_model("vgg11_bn_half", num_classes=10)
    shard = DeviceLoader(data.train, data, 16, device, shuffle=True, seed=0, rank=rank, world=world)
    first_labels = next(iter(shard))[1].tolist()
    recipe = Recipe(epochs=1, lr=0.05, amp="off")
    model, history = finetune(model, data, recipe, device, workdir / "ft", batch_size=16, seed=0, bn_images=32)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.state_dict().values())).hexdigest()
    written = [w for w in written if "cache-" not in w]  # the data cache is per rank in this test
    print("RESULT " + json.dumps({"rank": rank, "world": world, "digest": digest, "written": written,
                                  "first_labels": first_labels, "epochs": len(history)}), flush=True)
    dist_utils.shutdown()
''')


def test_two_ranks_agree_and_only_rank0_writes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "BUILD_EDGE_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["rank"]: r for r in (json.loads(line.split("RESULT ", 1)[1])
                                      for line in proc.stdout.splitlines() if "RESULT " in line)}
    assert set(results) == {0, 1} and results[0]["world"] == 2
    assert results[0]["first_labels"] != results[1]["first_labels"], "each rank trains on its own shard"
    assert results[0]["digest"] == results[1]["digest"], "gradients all-reduced: identical weights"
    assert results[0]["epochs"] == results[1]["epochs"] == 1
    assert results[1]["written"] == []
    assert any(w.endswith("last.pt") for w in results[0]["written"])
