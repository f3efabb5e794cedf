"""The study script (experiments/vgg16_cifar10.py): matched-FLOPs keep ratios and the variant plan.

No pipeline run here: the FLOPs match is checked on a really pruned vgg11_bn with count_flops_params.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from toolchain.config import build_config
from toolchain.models import create_model
from toolchain.stages import prune as prune_stage

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "vgg16_cifar10.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_vgg16_cifar10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def vgg11():
    torch.manual_seed(0)
    return create_model("vgg11_bn", num_classes=10).eval()


def test_matched_keep_ratio_gives_the_requested_flops(study, vgg11):
    shape = (3, 32, 32)
    flops = study.FlopsModel(vgg11, shape)
    dense, _ = prune_stage.count_flops_params(vgg11, shape)
    assert flops.fraction(1.0) == pytest.approx(1.0)
    example = torch.zeros(2, *shape)
    for target in (0.4, 0.237):
        ratio = study.matched_keep_ratio(flops, target)
        assert 0 < ratio < 1
        counts = flops.counts(ratio)
        kept = {name: list(range(k)) for name, k in counts.items()}
        pruned, _ = prune_stage.prune_model(vgg11, example, kept)
        measured = prune_stage.count_flops_params(pruned, shape)[0] / dense
        assert measured == pytest.approx(target, rel=0.01), (target, ratio, measured)
        assert flops.fraction(ratio) == pytest.approx(measured, rel=1e-9)  # the model predicts it exactly
    assert study.matched_keep_ratio(flops, 1.0) == 1.0


def test_the_config_keep_ratio_gives_the_counts_the_pipeline_uses(study, vgg11):
    flops = study.FlopsModel(vgg11, (3, 32, 32), round_to=8)
    ratio = study.matched_keep_ratio(flops, 0.45)
    cfg = build_config({}, {"keep_ratio": ratio, "round_to": 8})
    rankings = {layer.name: prune_stage.LayerRanking(order=[], scores=[]) for layer in flops.layers}
    counts = prune_stage.resolve_keep_counts(flops.layers, rankings, keep_ratio=cfg.keep_ratio, per_layer={},
                                             round_to=cfg.round_to)
    assert counts == flops.counts(ratio) and all(k % 8 == 0 for k in counts.values())
    assert flops.fraction(ratio) == pytest.approx(0.45, rel=0.03)  # coarser steps with round_to=8


def test_full_plan(study):
    base = build_config({}, {"model": "vgg16_bn", "dataset": "digits"})
    primaries = study.primary_plan(base, quick=False, distill=[False, True])
    groups = [v.group for v in primaries]
    assert groups.count("cmi") == 2 * 18 and groups.count("cmi-budget") == 2 * 2 and groups.count("mipp") == 2 * 2
    cmi = {(v.cfg.criterion_options["formulation"], v.cfg.criterion_options["order"],
            v.cfg.criterion_options["cutoff"]) for v in primaries if v.group == "cmi"}
    assert len(cmi) == 18
    assert {v.cfg.budget for v in primaries if v.group == "cmi-budget"} == {"flops=0.5", "flops=0.4"}
    assert {v.cfg.criterion_options["mipp_estimator"] for v in primaries if v.group == "mipp"} == {"renyi", "mlp"}
    assert all(v.cfg.criterion == "mipp" for v in primaries if v.group == "mipp")
    assert len({v.cfg.resolved_run_name for v in primaries}) == len(primaries)  # one bundle each
    # every variant shares the baseline recipe: only criterion, options, budget and distill differ
    ignore = {"criterion", "criterion_options", "budget", "distill", "run_name"}
    assert len({str({k: v for k, v in p.cfg.to_dict().items() if k not in ignore}) for p in primaries}) == 1

    reached = [(v.name, v.group, f) for v, f in zip(primaries[:3], (0.301, 0.303, 0.62))]
    reached.append(("cmi flops=0.4", "cmi-budget", 0.398))
    levels = study.flops_levels(reached, study.BUDGETS, tol=0.005)
    assert [round(lv.fraction, 4) for lv in levels] == [0.62, 0.5, 0.398, 0.302]  # reached, not nominal
    assert levels[2].sources == ["cmi flops=0.4", "budget flops=0.4"]
    baselines = study.baseline_plan(base, levels, criteria=study.BASELINES, distill=[False, True],
                                    ratio_for=lambda f: round(f ** 0.5, 4))
    assert len(baselines) == 4 * 3 * 2
    assert {v.cfg.criterion for v in baselines} == {"l1", "random", "bn-scale"}
    assert {v.cfg.keep_ratio for v in baselines} == {round(lv.fraction ** 0.5, 4) for lv in levels}
    assert len({v.cfg.resolved_run_name for v in primaries + baselines}) == len(primaries) + len(baselines)


def test_quick_plan_is_a_small_subset(study):
    base = build_config({}, {"model": "vgg16_bn"})
    primaries = study.primary_plan(base, quick=True, distill=[False])
    assert [(v.name, v.cfg.distill) for v in primaries] == [("cmi per-layer/forward/scree", False),
                                                            ("cmi flops=0.4", False)]
    levels = study.flops_levels([(primaries[0].name, "cmi", 0.55), (primaries[1].name, "cmi-budget", 0.39)], [],
                                tol=0.005)
    baselines = study.baseline_plan(base, levels, criteria=study.BASELINES, distill=[False],
                                    ratio_for=lambda f: round(f ** 0.5, 4), quick=True)
    assert [(v.cfg.criterion, v.level) for v in baselines] == [("l1", "L1"), ("random", "L1"), ("l1", "L2")]


def test_headline_plan_runs_the_default_criterion_under_each_budget(study):
    base = build_config({}, {"model": "vgg16_bn", "dataset": "digits"})
    plan = study.headline_plan(base, budgets=["flops=0.4", "flops=0.2", "channels=0.667"])
    assert [(v.cfg.criterion, v.cfg.budget, v.cfg.distill) for v in plan] == [
        (base.criterion, b, True) for b in ("flops=0.4", "flops=0.2", "channels=0.667")]
    assert len({v.cfg.resolved_run_name for v in plan}) == 3
    # the matched baselines come from the first budget's reached FLOPs alone
    levels = study.flops_levels([(plan[0].name, plan[0].group, 0.3997)], [], tol=0.005)
    baselines = study.baseline_plan(base, levels, criteria=study.HEADLINE_MATCHED, distill=[True],
                                    ratio_for=lambda f: round(f ** 0.5, 4))
    assert [(v.cfg.criterion, v.cfg.keep_ratio, v.cfg.budget) for v in baselines] == [
        ("l1", round(0.3997 ** 0.5, 4), None), ("random", round(0.3997 ** 0.5, 4), None)]


def test_random_baseline_runs_several_seeds_and_the_first_reuses_the_single_seed_run(study):
    base = build_config({}, {"model": "vgg16_bn", "dataset": "digits", "seed": 5})
    levels = study.flops_levels([("recon flops=0.4", "budget", 0.3997)], [], tol=0.005)
    plan = lambda n: study.baseline_plan(base, levels, criteria=study.HEADLINE_MATCHED, distill=[True],  # noqa: E731
                                         ratio_for=lambda f: 0.6318, random_seeds=n)
    one, three = plan(1), plan(3)
    assert [(v.cfg.criterion, v.cfg.seed) for v in three] == [("l1", 5), ("random", 5), ("random", 6), ("random", 7)]
    # a seed other than the default is in every name, the base seed's too (a study repeated with --seed merges
    # beside the first one)
    assert [v.name for v in three] == ["l1 @0.6318 seed 5", "random @0.6318 seed 5", "random @0.6318 seed 6",
                                       "random @0.6318 seed 7"]
    assert [v.name for v in study.baseline_plan(build_config({}, {"model": "vgg16_bn", "dataset": "digits"}), levels,
                                                criteria=["random"], distill=[True], ratio_for=lambda f: 0.6318,
                                                random_seeds=2)] == ["random @0.6318", "random @0.6318 seed 1"]
    assert three[1].cfg == one[1].cfg  # the first seed is the run a single-seed study made: its bundle is reused
    assert len({v.cfg.resolved_run_name for v in three}) == 4
    ignore = {"seed", "run_name"}  # the seeds' runs differ in nothing else
    assert len({str({k: x for k, x in v.cfg.to_dict().items() if k not in ignore}) for v in three[1:]}) == 1


def test_findings_compare_the_lead_with_the_mean_of_the_random_seeds(study):
    lead = {"name": "recon flops=0.4", "group": "budget", "status": "ok", "flops_reduction": 0.6, "flops_ratio": 0.4,
            "acc_dense": 0.8929, "acc_finetuned": 0.8913, "acc_oneshot": 0.8813, "criterion": "recon"}
    draws = [{**lead, "name": name, "group": "baseline", "criterion": "random", "acc_finetuned": acc}
             for name, acc in (("random @0.6318", 0.8861), ("random @0.6318 seed 1", 0.8901))]
    lines = study.headline_findings([lead, *draws])
    assert "recon flops=0.4 vs random @0.6318 (mean of 2 seeds: 88.61%, 89.01%): +0.32 pt" in " ".join(lines)
    assert not any("mean of" in line for line in study.headline_findings([lead, draws[0]]))


def test_every_run_records_the_command_that_rebuilds_it(study):
    from toolchain.cli import build_parser, config_argv, flag_values

    base = build_config({}, {"model": "vgg16_bn", "dataset": "imagefolder", "data_dir": "d", "train_subset": 300,
                             "bench_batch_sizes": [1, 8], "amp": "off", "criterion": "cmi",
                             "criterion_options": {"kernel": "adaptive", "permutations": 5}})
    for cfg in (base, *(v.cfg for v in study.headline_plan(base))):
        argv = config_argv(cfg)
        assert build_config({}, flag_values(build_parser().parse_args(argv))) == cfg
    assert config_argv(build_config({}, {})) == []  # the defaults need no flag
    argv = config_argv(study.headline_plan(base)[0].cfg)
    assert "--distill" in argv and argv[argv.index("--budget") + 1] == "flops=0.4"


def test_headline_outputs_come_from_the_rows(study, tmp_path):
    row = {"name": "recon flops=0.4", "group": "budget", "status": "ok", "budget": "flops=0.4", "flops_ratio": 0.4,
           "flops_reduction": 0.6, "params_reduction": 0.7, "params_ratio": 0.3, "channels_removed": 1708,
           "channels_dense": 4224, "acc_dense": 0.8929, "acc_oneshot": 0.8818, "acc_finetuned": 0.8951,
           "acc_int8": 0.895, "test_images": 10000, "train_images": 50000, "latency_p50_ms": 17.0,
           "dense_latency_p50_ms": 43.0, "compute_seconds": 3000.0, "stage_seconds": {"finetune": 2400.0},
           "command": "build-edge --budget flops=0.4"}
    l1 = {**row, "name": "l1 @0.632", "group": "baseline", "budget": None, "acc_oneshot": 0.8654,
          "acc_finetuned": 0.8901, "command": "build-edge --criterion l1 --keep-ratio 0.632"}
    summary = {"plan": "headline", "command": "python experiments/vgg16_cifar10.py", "started": "t0", "finished": "t1",
               "wall_seconds": 60.0, "device": "cpu", "versions": {"torch": "x"},
               "hardware": {"cpu": "cpu", "cpu_count": 2, "gpus": [], "system": "Linux"},
               "config": build_config({}, {"checkpoint": None}).to_dict()}
    written = study.write_outputs(tmp_path, tmp_path / "work", summary, [row, l1], [])
    data = json.loads(written["json"].read_text())
    assert [r["acc_finetuned"] for r in data["runs"]] == [0.8951, 0.8901]
    assert all(r["test_images"] == 10000 and r["command"] for r in data["runs"])
    md = written["md"].read_text()
    assert "89.51%" in md and "+0.22 pt vs the dense 89.29%" in md  # findings from the numbers
    assert "recon flops=0.4 vs l1 @0.632" in md and "+0.50 pt after the same fine-tune" in md
    assert "HRankPlus" in md and written["plot"].stat().st_size > 10_000
    assert "2 of 2 planned runs finished;" in md
    assert "| 43.0 | 17.0 |" in md  # latencies keep three digits: 43.0 beside 6.75, not 43

    # a study stopped before its last planned run says so instead of "2 of 2"
    stopped = study.write_outputs(tmp_path / "stopped", tmp_path / "work",
                                  {**summary, "planned": ["recon flops=0.4", "l1 @0.632", "recon flops=0.2"],
                                   "finished": None}, [row, l1], [])
    stopped_md = stopped["md"].read_text()
    assert "2 of 3 planned runs finished (not run yet: recon flops=0.2);" in stopped_md
    assert "started t0, still running when this was written;" in stopped_md and "finished t1" in md


class _SmallCNN(torch.nn.Module):
    """Three convs for 8x8 digits: the GPU plan's whole road in seconds on the CPU."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_the_gpu_plan_runs_on_the_cpu_at_a_tiny_size(study, tmp_path):
    """``--gpu`` on the CPU, one epoch on a few hundred digits (a small CNN at 8x8 stands in for VGG16): the
    baseline is trained (no checkpoint), both budgets run with the default criterion, the second one reads the
    first one's measured sensitivity, and the docs come from the bundles."""
    from toolchain.models import MODELS

    if "small_cnn_for_tests" not in MODELS:
        MODELS.register("small_cnn_for_tests")(lambda num_classes=10: _SmallCNN(num_classes))
    code = study.main(["--gpu", "--device", "cpu", "--dataset", "digits", "--model", "small_cnn_for_tests",
                       "--image-size", "8", "--cutout", "4", "--baseline-cutout", "4",
                       "--baseline-epochs", "1", "--finetune-epochs", "1", "--train-subset", "300",
                       "--test-subset", "100", "--compensation-samples", "64", "--bn-recalibration", "100",
                       "--calibration-samples", "32", "--bench-runs", "2", "--bench-batch-sizes", "1",
                       "--out", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "docs"), "-q"])
    assert code == 0
    data = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert data["gpu"] and data["config"]["checkpoint"] is None and data["config"]["batch_size"] == 256
    # cutout 16, the plan's for 32x32 images, is refused at 8x8 (it would blank them): the flags override it
    assert (data["config"]["baseline_cutout"], data["config"]["cutout"]) == (4, 4)
    assert study.GPU_PRESET["cutout"] == 16
    assert yaml.safe_load(study.DEFAULT_RECIPE.read_text())["baseline_cutout"] == 16
    runs = data["runs"]
    assert [(r["budget"], r["status"], r["criterion"]) for r in runs] == [("flops=0.4", "ok", "recon"),
                                                                          ("flops=0.2", "ok", "recon")]
    assert runs[0]["flops_ratio"] > runs[1]["flops_ratio"] and runs[1]["flops_ratio"] < 0.25
    assert all(r["test_images"] == 100 and "--budget" in r["command"] for r in runs)
    cached = sorted(json.loads(p.read_text())["allocation"]["sensitivity_cached"]
                    for p in (tmp_path / "runs" / ".work").glob("prune-*/done.json"))
    assert cached == [False, True]
    assert (tmp_path / "docs" / "accuracy_vs_flops.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--gpu", "--quick"], "--gpu runs the headline plan"),
    (["--budgets", "flops=2"], "budget must look like"),
    (["--budget", "flops=0.4"], "--budget is set per variant"),
    (["--keep-ratio", "0.5"], "--keep-ratio is set per variant"),
    (["--baselines", "l1,magic"], "unknown baseline(s): ['magic']"),
    (["--random-seeds", "0"], "--random-seeds must be at least 1, got 0"),
    (["--plan", "cmi", "--distill-features", "1"], "--distill-features needs distillation in every variant"),
    (["--plan", "cmi", "--distill-flip"], "--distill-flip needs distillation in every variant"),
])
def test_bad_study_input_is_one_line_and_exit_2(study, tmp_path, capsys, args, needle):
    assert study.main([*args, "--out", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "docs").exists()


def test_feature_distillation_reaches_every_variant_and_its_command(study):
    from toolchain.cli import build_parser, config_argv, flag_values

    args = study.build_parser().parse_args(["--plan", "headline", "--distill-features", "5", "--budgets", "flops=0.2",
                                            "--baselines", ""])
    base, distill = study.resolve_base(args)
    assert distill == [True] and base.distill_features == 5.0
    (variant,) = study.headline_plan(base, budgets=["flops=0.2"], distill=distill)
    assert variant.cfg.distill and variant.cfg.distill_features == 5.0
    argv = config_argv(variant.cfg)
    assert argv[argv.index("--distill-features") + 1] == "5.0"
    assert build_config({}, flag_values(build_parser().parse_args(argv))) == variant.cfg


def test_the_mirrored_teacher_reaches_every_variant_and_its_command(study):
    from toolchain.cli import build_parser, config_argv, flag_values

    args = study.build_parser().parse_args(["--plan", "headline", "--distill-flip", "--budgets", "flops=0.2",
                                            "--baselines", ""])
    base, distill = study.resolve_base(args)
    assert distill == [True] and base.distill_flip
    (variant,) = study.headline_plan(base, budgets=["flops=0.2"], distill=distill)
    argv = config_argv(variant.cfg)
    assert variant.cfg.distill_flip and "--distill-flip" in argv
    assert build_config({}, flag_values(build_parser().parse_args(argv))) == variant.cfg


def test_a_resumed_fine_tune_counts_every_epoch_it_took(study, tmp_path):
    """A fine-tune killed and resumed finishes in an invocation that ran only its last epochs: its done.json
    seconds are that invocation's; the study reports the epochs' sum."""
    work = tmp_path / ".work"
    for name, result in {"finetune-a": {"seconds": 100.0, "history": [{"secs": 400.0}, {"secs": 90.0}]},
                         "prune-b": {"seconds": 30.0}}.items():
        (work / name).mkdir(parents=True)
        (work / name / "done.json").write_text(json.dumps(result))
    manifest = {"stages": {"finetune": "finetune-a", "prune": "prune-b", "bench": "bench-missing"}}
    assert study.stage_seconds(tmp_path / "run", manifest) == {"finetune": 490.0, "prune": 30.0}


def _headline_row(**changes):
    row = {"name": "recon flops=0.4", "group": "budget", "status": "ok", "budget": "flops=0.4", "flops_ratio": 0.4,
           "flops_reduction": 0.6, "params_reduction": 0.7, "params_ratio": 0.3, "channels_removed": 1708,
           "channels_dense": 4224, "acc_dense": 0.8929, "acc_oneshot": 0.8818, "acc_finetuned": 0.8951,
           "acc_int8": 0.895, "test_images": 10000, "train_images": 50000, "latency_p50_ms": 17.0,
           "dense_latency_p50_ms": 43.0, "compute_seconds": 3000.0, "stage_seconds": {"finetune": 2400.0},
           "command": "build-edge --budget flops=0.4", "level": None, "target_flops": None, "seed": 0}
    return {**row, **changes}


def _write_study(study, folder, rows, command, **config):
    summary = {"plan": "headline", "command": command, "started": "t0", "finished": "t1", "wall_seconds": 600.0,
               "device": "cpu", "versions": {"torch": "x"}, "distill_modes": [True], "level_tol": 0.005,
               "hardware": {"cpu": "cpu", "cpu_count": 2, "gpus": [], "system": "Linux"},
               "config": build_config({}, {"checkpoint": "base.pt", **config}).to_dict()}
    return study.write_outputs(folder, folder, summary, rows, [])["json"]


def test_merge_writes_one_table_from_studies_with_one_recipe(study, tmp_path, capsys):
    """A table whose runs took several invocations (the cache does not outlive a checkout): each run once, the
    findings across files, every source command under Setup."""
    lead = _headline_row()
    l1 = _headline_row(name="l1 @0.63", group="baseline", budget=None, criterion="l1", acc_finetuned=0.8901,
                       target_flops=0.4, command="build-edge --criterion l1")
    small = _headline_row(name="recon flops=0.2", budget="flops=0.2", flops_ratio=0.2, acc_finetuned=0.8869)
    a = _write_study(study, tmp_path / "a", [lead, l1], "python study --baselines l1", cutout=16)
    # a later file: an older one lacked baseline_cutout, which does not matter with a checkpoint
    b = _write_study(study, tmp_path / "b", [small], "python study --budgets flops=0.2", cutout=16, baseline_cutout=16,
                     run_name="other-prefix")
    c = _write_study(study, tmp_path / "c", [lead], "python study --baselines ''", cutout=16)
    out = tmp_path / "merged"
    assert study.main(["--merge", str(a), str(b), str(c), "--out-dir", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["recon flops=0.4", "l1 @0.63", "recon flops=0.2"]
    assert [s["command"] for s in data["merged_from"]] == ["python study --baselines l1",
                                                           "python study --budgets flops=0.2",
                                                           "python study --baselines ''"]
    md = (out / "results.md").read_text()
    assert "recon flops=0.4 vs l1 @0.63" in md and "+0.50 pt after the same fine-tune" in md
    assert "recon flops=0.2: 80.0% fewer FLOPs, top-1 88.69%" in md
    assert "`python study --budgets flops=0.2`: started t0, finished t1, wall time 10.0 min" in md
    assert "cutout 16" in md and "3 of 3 planned runs finished" in md
    assert "3 runs merged from 3 studies" in capsys.readouterr().out


def test_merge_of_a_study_repeated_with_another_seed_compares_seed_with_seed_and_the_means(study, tmp_path):
    """A second seed of the headline (``--seed 1``): its runs are named after the seed, its baseline is matched to
    its own budget run (whose FLOPs differ a little from the first seed's), and the findings pair the runs of one
    seed before comparing the means."""
    base = build_config({}, {"model": "vgg16_bn", "dataset": "digits", "seed": 1})
    assert [v.name for v in study.headline_plan(base, budgets=["flops=0.4"])] == ["recon flops=0.4 seed 1"]
    a = _write_study(study, tmp_path / "a", [
        _headline_row(), _headline_row(name="l1 @0.63", group="baseline", budget=None, criterion="l1",
                                       acc_finetuned=0.8901, target_flops=0.4, keep_ratio=0.63)], "python study",
                                       cutout=16)
    b = _write_study(study, tmp_path / "b", [
        _headline_row(name="recon flops=0.4 seed 1", flops_ratio=0.41, acc_finetuned=0.8921, seed=1),
        _headline_row(name="l1 @0.64 seed 1", group="baseline", budget=None, criterion="l1", flops_ratio=0.41,
                      acc_finetuned=0.8891, target_flops=0.41, keep_ratio=0.64, seed=1)],
        "python study --seed 1", cutout=16, seed=1)
    out = tmp_path / "merged"
    assert study.main(["--merge", str(a), str(b), "--out-dir", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["study_seed"]) for r in data["runs"]] == [
        ("recon flops=0.4", 0), ("l1 @0.63", 0), ("recon flops=0.4 seed 1", 1), ("l1 @0.64 seed 1", 1)]
    md = " ".join((out / "results.md").read_text().split())
    assert "recon flops=0.4 vs l1 @0.63 at 40.0% of the FLOPs: +0.50 pt" in md
    assert "recon flops=0.4 seed 1 vs l1 @0.64 seed 1 at 41.0% of the FLOPs: +0.30 pt" in md
    assert ("recon flops=0.4 (mean of 2 seeds: 89.51%, 89.21%) vs l1 (mean of 2 seeds: 89.01%, 88.91%): +0.40 pt"
            in md)
    assert ("recon flops=0.4, mean of 2 seeds (89.51%, 89.21%): 89.36% after fine-tuning (+0.07 pt vs the dense "
            "89.29%)" in md)
    assert md.count("mean of 2 seeds (") == 1  # the baselines' seeds are averaged in the comparison only
    # the merged file merges again as it is, each run keeping the seed of the study it came from
    again = tmp_path / "again"
    assert study.main(["--merge", str(out / "results.json"), "--out-dir", str(again)]) == 0
    assert [r["study_seed"] for r in json.loads((again / "results.json").read_text())["runs"]] == [0, 0, 1, 1]


@pytest.mark.parametrize("case, needle", [
    ("recipe", "differ in recipe (cutout)"),
    ("numbers", "the run 'recon flops=0.4' reads differently"),
    ("matched", "'l1 @0.63' is matched to 40.00% of the FLOPs, not to the first budget run's"),
    ("flag", "--merge takes only --out-dir, --mixed-hardware and -q, got --budgets"),
    ("hardware", "differ in hardware (cpu); --mixed-hardware merges them"),
    ("overwrite", "would overwrite one of the files merged"),
    ("not-headline", "is not the results.json of a headline study"),
])
def test_merge_refuses_what_would_not_compare(study, tmp_path, capsys, case, needle):
    lead = _headline_row()
    a = _write_study(study, tmp_path / "a", [lead], "python study", cutout=16)
    rows, config, extra, out = [lead], {"cutout": 16}, [], tmp_path / "merged"
    if case == "recipe":
        config = {"cutout": 0}
    elif case == "numbers":
        rows = [_headline_row(acc_finetuned=0.8850)]
    elif case == "matched":
        rows = [_headline_row(name="recon flops=0.2", budget="flops=0.2", flops_ratio=0.2),
                _headline_row(name="l1 @0.63", group="baseline", budget=None, target_flops=0.4)]
        a = _write_study(study, tmp_path / "a", rows, "python study", cutout=16)  # its budget run comes second
        rows = [lead]
    elif case == "flag":
        extra = ["--budgets", "flops=0.3"]
    elif case == "hardware":
        b = _write_study(study, tmp_path / "b", rows, "python study", cutout=16)
        data = json.loads(b.read_text())
        b.write_text(json.dumps({**data, "hardware": {**data["hardware"], "cpu": "another cpu"}}))
    elif case == "overwrite":
        out = tmp_path / "a"
    if case != "hardware":
        b = _write_study(study, tmp_path / "b", rows, "python study", **config)
    if case == "not-headline":
        b.write_text(json.dumps({"plan": "cmi", "rows": []}))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert study.main(["--merge", str(a), str(b), *extra, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_plot_labels_of_runs_at_one_point_do_not_overlap(study):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set(xlim=(0, 10), ylim=(0, 10))
    labels = [ax.annotate(name, (5, y), textcoords="offset points", xytext=(-5, 3), ha="right", fontsize=7)
              for name, y in (("l1 @0.6318", 5.0), ("random @0.6318 seed 1", 4.99), ("far", 1.0))]
    renderer = fig.canvas.get_renderer()
    overlapping = (lambda: [(i, j) for i in range(3) for j in range(i + 1, 3)
                            if labels[i].get_window_extent(renderer).overlaps(labels[j].get_window_extent(renderer))])
    assert overlapping() == [(0, 1)]
    study._separate_labels(fig, labels)
    assert overlapping() == []
    assert labels[2].xyann == (-5, 3)  # a label clear of the others stays where it was


def test_merge_across_machines_names_each_runs_machine(study, tmp_path):
    lead = _headline_row()
    small = _headline_row(name="recon flops=0.2", budget="flops=0.2", flops_ratio=0.2, acc_finetuned=0.8869)
    a = _write_study(study, tmp_path / "a", [lead], "python study a", cutout=16)
    b = _write_study(study, tmp_path / "b", [small], "python study b", cutout=16)
    data = json.loads(b.read_text())
    b.write_text(json.dumps({**data, "hardware": {**data["hardware"], "cpu": "AMD EPYC"}}))
    out = tmp_path / "merged"
    assert study.main(["--merge", str(a), str(b), "--mixed-hardware", "--out-dir", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["machine"].split(" (")[0] for r in runs] == ["CPU cpu", "CPU AMD EPYC"]
    md = (out / "results.md").read_text()
    assert "hardware: **not one machine**" in md and "`python study b`" in md
    assert "- **recon flops=0.2** (50.0 min on CPU AMD EPYC (2 logical CPUs), GPU none; Linux" in md
    # one machine: no machine per run, the one hardware line
    assert study.main(["--merge", str(a), "--out-dir", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "results.json").read_text())["runs"][0]["machine"] is None
    assert "- hardware: CPU cpu (2 logical CPUs)" in (tmp_path / "one" / "results.md").read_text()
