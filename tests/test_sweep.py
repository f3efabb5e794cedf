"""A sweep: criteria side by side on one baseline, one table and one plot."""

import json

from toolchain.cli import main
from toolchain.config import build_config
from toolchain.sweep import parse_axes, variant_configs

TINY = ["--dataset", "digits", "--model", "vgg11_bn_half", "--train-subset", "200", "--test-subset", "100",
        "--baseline-epochs", "1", "--finetune-epochs", "0", "--batch-size", "64", "--rank-samples", "50",
        "--bn-recalibration", "100", "--bench-runs", "5", "--bench-batch-sizes", "1", "--calibration-samples", "32",
        "--quiet"]


def test_variant_configs_cover_the_product():
    base = build_config({}, {"criterion": "l1", "keep_ratio": 0.5})
    axes = parse_axes(["criterion=l1,cmi", "keep_ratio=0.5,0.25", "cutoff=ratio"], {"cutoff"})
    variants = variant_configs(base, axes)
    assert [label for label, _ in variants] == [
        "criterion=l1,keep_ratio=0.5,cutoff=ratio", "criterion=l1,keep_ratio=0.25,cutoff=ratio",
        "criterion=cmi,keep_ratio=0.5,cutoff=ratio", "criterion=cmi,keep_ratio=0.25,cutoff=ratio"]
    assert variants[3][1].keep_ratio == 0.25 and variants[3][1].criterion_options == {"cutoff": "ratio"}
    assert len({cfg.resolved_run_name for _, cfg in variants}) == 4


def test_sweep_over_criteria_shares_the_baseline(tmp_path, capsys):
    code = main([*TINY, "--out", str(tmp_path), "--run-name", "s", "--sweep", "criterion=l1,random"])
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = tmp_path / "s--sweep"
    assert f"sweep: {folder}" in out
    rows = json.loads((folder / "sweep.json").read_text())["rows"]
    assert [r["criterion"] for r in rows] == ["l1", "random"]
    assert rows[0]["acc_dense"] == rows[1]["acc_dense"]  # one baseline
    assert len(list((tmp_path / ".work").glob("baseline-*"))) == 1
    assert rows[0]["flops_ratio"] == rows[1]["flops_ratio"]  # same uniform budget, same FLOPs
    html = (folder / "report.html").read_text()
    assert "plots/accuracy_vs_flops.png" in html and (folder / "plots" / "accuracy_vs_flops.png").is_file()
    md = (folder / "report.md").read_text()
    assert "| l1 |" in md or "criterion=l1" in md
    for r in rows:
        assert (tmp_path / r["bundle"] / "manifest.json").is_file()
