"""The real thing: the shared VGG16-BN baseline on the CIFAR-10 JPEG copy, 50% of channels removed by L1,
the consumers refitted (compensation, the default).

Skipped (with the reason) where ../shared lacks the data or the checkpoint, e.g. on a user's clone.
"""

import json

import pytest

from toolchain.cli import main
from toolchain.util import sha256_file


@pytest.mark.slow
def test_l1_half_channels_on_shared_baseline(cifar_jpeg_dir, shared_baseline, tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["--target", "jetson", "--dataset", "imagefolder", "--data-dir", str(cifar_jpeg_dir),
                 "--normalization", "cifar10", "--model", "vgg16_bn", "--checkpoint", str(shared_baseline),
                 "--criterion", "l1", "--keep-ratio", "0.5", "--finetune-epochs", "0", "--train-subset", "5000",
                 "--test-subset", "1000", "--bn-recalibration", "2000", "--calibration-samples", "128",
                 "--bench-runs", "20", "--bench-batch-sizes", "1", "--compensation-samples", "512",
                 "--out", str(out), "--run-name", "cifar-l1",
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    bundle = out / "cifar-l1"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(bundle / rel) == digest
    m = manifest["metrics"]
    # the shared baseline reaches 89.3% on the full test split; a 1000-image class-balanced subset is close
    assert 0.86 < m["acc_dense"] < 0.93
    # half the channels of all 13 convs: a quarter of the conv FLOPs remain
    arch = json.loads((bundle / "architecture.json").read_text())
    assert len(arch["kept_counts"]) == 13
    assert all(k == c // 2 for k, c in zip(arch["kept_counts"].values(), arch["channels"].values()))
    assert 0.24 < m["flops_ratio"] < 0.27 and m["channels_removed"] == 4224 // 2
    # docs/design/algorithms.md §5: removal alone collapses accuracy; re-estimating BN statistics recovers much of it
    assert m["acc_pruned_bn_recalibrated"] > m["acc_pruned"] + 0.05
    # docs/design/algorithms.md §3: the least-squares refit of the consumers recovers far more (about 35% -> 80% here)
    assert m["acc_oneshot"] > m["acc_pruned_bn_recalibrated"] + 0.2, m
    assert m["compensation_seconds"] > 0
    # fine-tuning with 0 epochs = BN re-estimation only; ONNX Runtime agrees with PyTorch on every image
    assert abs(m["acc_finetuned"] - m["acc_onnxruntime"]) < 0.002
    assert abs(m["acc_int8"] - m["acc_onnxruntime"]) < 0.03
    lat = m["latency"]
    assert lat["pruned/fp32"]["batches"]["1"]["p50_ms"] < lat["dense/fp32"]["batches"]["1"]["p50_ms"]
