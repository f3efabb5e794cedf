"""`build-edge` (and `bench-edge`): parse flags, resolve the config, run the pipeline.

Bad input of any kind ends as one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from toolchain.config import Config, base_type, build_config, load_yaml
from toolchain.errors import BuildError, UserError

HELP = {
    "target": "hardware profile name or a YAML file (see --list-targets); 'jetson' = jetson-orin-nano-8gb",
    "out": "folder for bundles, caches and work files",
    "run_name": "bundle folder name (default: <dataset>-<model>-<criterion>-<target>)",
    "dataset": "digits (offline demo), cifar10 or imagefolder",
    "data_dir": "cifar10: folder with cifar-10-batches-py/; imagefolder: folder with train/ and test/",
    "normalization": "auto (ImageNet for torchvision: and timm: models, CIFAR-10 for cifar10, else the train "
                     "split's own), cifar10 or imagenet mean/std",
    "train_subset": "use a class-balanced subset of this many training images",
    "test_subset": "use a class-balanced subset of this many test images",
    "model": "a built-in name (vgg11_bn..vgg19_bn, vgg11_bn_half, resnet18, resnet34: CIFAR stems), "
             "torchvision:NAME, timm:NAME or package.module:factory (a function returning an nn.Module)",
    "checkpoint": "dense model weights (weights-only): a state dict, or a dict holding one under state_dict, "
                  "model, model_state, model_state_dict or ema; a 'module.' prefix is dropped. Without it the "
                  "baseline is trained first",
    "num_classes": "the classes of the --checkpoint's head when they are not the data's (1000 for an ImageNet "
                   "checkpoint): it loads with that head, which is replaced by one for the data's classes and "
                   "trained from the checkpoint with the baseline recipe (--baseline-epochs, --baseline-lr)",
    "criterion": "channel ranking: recon (default), l1, random, bn-scale, taylor, cmi, mipp",
    "keep_ratio": "fraction of channels kept in every prunable layer",
    "protect": "prunable layers kept whole whatever the ratio or budget: comma list of layer names or fnmatch "
               "patterns and stem (the first conv, unless its channels are a residual stream), or none, or auto "
               "(default: stem for torchvision:, timm: and import-path models, none for the built-ins)",
    "round_to": "round kept channel counts up to a multiple of this (default 1; 8 for a latency budget on a GPU "
                "target with tensor cores)",
    "budget": "global budget for any criterion, e.g. flops=0.4, params=0.2 or channels=0.67 (keep at most that "
              "fraction of the prunable convs' FLOPs, parameters or filters), or latency=0.5x / latency=12ms on "
              "the target (batch 1, from its latency table); counts from each layer's measured one-shot "
              "sensitivity",
    "latency_source": "a latency budget's table: auto (measured here when this host is the target, a table "
                      "imported from the device, else the roofline estimate), host (measure here: ONNX Runtime "
                      "CPU, or torch on this GPU for a TensorRT target) or estimate",
    "latency_levels": "kept counts per layer a latency budget chooses from (1/N .. N/N of its channels): the "
                      "latency table's grid; more levels, more convs to time",
    "rank_samples": "class-balanced training images shown to data-driven criteria",
    "bn_recalibration": "training images used to re-estimate BatchNorm statistics after pruning",
    "fold": "none (plain removal, default) or masked (fold removed channels' constants: pruned == masked)",
    "compensation": "lstsq (default: refit each consumer of removed channels towards the dense outputs) or none",
    "compensation_samples": "class-balanced training images for the compensation refit",
    "sensitivity_fractions": "comma-separated kept fractions a --budget measures each layer's sensitivity at "
                             "(default 0.75,0.5,0.25,0.1; a finer grid lets the allocation stop between them)",
    "distill": "distil from the dense model while fine-tuning",
    "cutout": "fine-tune augmentation: zero one random SIZE x SIZE square of each training image after "
              "normalisation (DeVries & Taylor 2017; 16 on 32x32 images; smaller than the image), 0 (default) off",
    "baseline_cutout": "the same augmentation when the baseline is trained (no --checkpoint, or a new head): "
                       "the square's side, 0 (default) off",
    "ema_decay": "fine-tune: keep an exponential moving average of the weights (and BN statistics) with this "
                 "decay per step (e.g. 0.999) and end on it; unset (default): end on the raw weights",
    "distill_features": "fine-tune with --distill: also match every cut layer's output to the dense model's at the "
                        "kept channels (mean over layers of the relative squared error), with this weight "
                        "(e.g. 1.0); unset (default): distil the logits only",
    "distill_flip": "fine-tune with --distill: the teacher's logits are the mean over each training image and "
                    "its mirror (a better teacher for one more forward pass of the dense model); default off",
    "precision": "engine precision: fp32, fp16 or int8 (default: the target's)",
    "calibration_method": "INT8 calibration: minmax, entropy or percentile",
    "bench_batch_sizes": "comma-separated batch sizes to benchmark (default: 1 and the target's)",
    "amp": "mixed precision: auto (bf16 on GPUs and on CPUs with native bf16), bf16 or off",
}


@functools.cache
def criterion_flags() -> dict[str, tuple[Any, str]]:
    """Criterion option key -> (type, help) of its flag ``--key-with-dashes`` (dest ``opt_<key>``), generated
    from the criteria's option classes (toolchain.ranking.options); bool options are switches (--at-init)."""
    from toolchain.ranking.options import option_flags

    return option_flags()


def __getattr__(name: str) -> Any:
    if name == "CRITERION_FLAGS":  # made on first use: it imports the criteria (and torch), importing cli does not
        return criterion_flags()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too by default)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


METAVARS = {"distill_features": "WEIGHT"}  # where the field's last word does not name the value


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Every config field as a flag (dest: the field), plus --samples, --keep and the criterion options' flags
    (dest ``opt_<key>``); ``flag_values`` reads them back. For scripts that build their own parser."""
    for f in fields(Config):
        if f.name in ("criterion_options", "keep"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = base_type(f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": HELP.get(f.name, f"(default {f.default})")}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kind = str if kind is list else kind  # lists arrive as "1,8,32" and are parsed by the config
        metavar = METAVARS.get(f.name, f.name.split("_")[-1].upper())
        parser.add_argument(flag, type=kind, metavar=metavar, **kwargs)
    parser.add_argument("--samples", dest="rank_samples", type=int, default=None, help=HELP["rank_samples"])
    parser.add_argument("--keep", action="append", default=None, metavar="LAYER=VALUE",
                        help="per-layer kept ratio (<=1) or count (>1), repeatable, e.g. features.0=0.5")
    for name, (kind, text) in criterion_flags().items():
        flag, dest = "--" + name.replace("_", "-"), f"opt_{name}"
        if kind is bool:  # a switch; None when absent, so that the option stays unset
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="build-edge", description="Prune, fine-tune, export and benchmark a CNN for an edge "
                                                    "target; writes a verified bundle.",
                     epilog="build-edge clean [--out DIR] [--keep-cache] frees what runs left behind.")
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    parser.add_argument("--list-targets", action="store_true", help="print the hardware profiles and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="data-parallel training in N processes (relaunches itself under torchrun; "
                             "one process per GPU on CUDA, gloo on CPU)")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                        help="run one variant per value (repeatable: the product), e.g. criterion=l1,random,cmi "
                             "or keep_ratio=0.6,0.4; writes one comparison table and plot")
    add_config_flags(parser)
    return parser


def _criterion_option_argv(options: dict[str, Any]) -> list[str]:
    """Flags for criterion options; an option without a flag (it would collide with a config flag) can only
    come from a YAML file, so no command line rebuilds it: ValueError rather than a wrong command."""
    from toolchain.ranking.options import option_flags

    flags, argv = option_flags(), []
    for key, v in options.items():
        if key not in flags:
            raise ValueError(f"criterion option {key} has no flag: the run needs a --config file holding it")
        if flags[key][0] is bool:
            argv += ["--" + key.replace("_", "-")] if v else []  # a store-true flag: absent means false
        else:
            argv += ["--" + key.replace("_", "-"), ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return argv


def config_argv(cfg: Config) -> list[str]:
    """The ``build-edge`` flags that rebuild `cfg` from the defaults (what differs from them, in field order):
    the exact command of a run, for studies and reports. ``build_config({}, flag values of these)`` == `cfg`."""
    argv: list[str] = []
    defaults = Config()
    for f in fields(Config):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "criterion_options":
            argv += _criterion_option_argv(value)
        elif f.name == "keep":
            for layer, v in value.items():
                argv += ["--keep", f"{layer}={v}"]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values the flags of ``add_config_flags`` give (unset flags left out), for ``build_config``."""
    values = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    if args.keep:
        per_layer = {}
        for item in args.keep:
            name, sep, value = item.partition("=")
            try:
                per_layer[name] = float(value) if "." in value else int(value)
            except ValueError:
                sep = ""
            if not sep:
                raise UserError(f"--keep expects LAYER=VALUE, got {item!r}")
        values["keep"] = per_layer
    options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    if options:
        values["criterion_options"] = options
    return values




def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    from toolchain.train import distributed as dist_utils

    level = logging.WARNING if quiet or not dist_utils.is_main() else logging.INFO
    handler = RichHandler(show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("build_edge").setLevel(level)  # libraries (onnxscript, torch) stay at warnings


def _relaunch_under_torchrun(argv: list[str], devices: int) -> int:
    import subprocess

    rest, skip = [], False
    for i, item in enumerate(argv):
        if skip:
            skip = False
        elif item == "--devices":
            skip = True
        elif not item.startswith("--devices="):
            rest.append(argv[i])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "toolchain", *rest]
    return subprocess.call(cmd)


def clean_main(argv: list[str]) -> int:
    """build-edge clean [--out DIR] [--keep-cache]: free the space runs left behind."""
    parser = _Parser(prog="build-edge clean", description="Remove the work folders no bundle in --out refers "
                                                          "to, half-written bundles and temporary files of "
                                                          "killed runs, and the data cache (unless --keep-cache).")
    parser.add_argument("--out", default=Config.out, help=f"the runs folder (default {Config.out})")
    parser.add_argument("--keep-cache", action="store_true", help="keep the decoded-data cache (.cache)")
    args = parser.parse_args(argv)
    try:
        from toolchain.pipeline import clean

        removed = clean(Path(args.out), keep_cache=args.keep_cache)
    except UserError as e:
        sys.stderr.write(f"build-edge clean: error: {e}\n")
        return 2
    for path, size in removed:
        print(f"removed {path} ({size / 1e6:.1f} MB)")
    print(f"freed {sum(s for _, s in removed) / 1e6:.1f} MB in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["clean"]:
        return clean_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from toolchain.train import distributed as dist_utils

    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be >= 1")
    if args.devices and args.devices > 1 and not dist_utils.launched_by_torchrun():
        return _relaunch_under_torchrun(argv, args.devices)
    try:
        if args.list_targets:
            from toolchain.targets import format_targets_table

            print(format_targets_table())
            return 0
        file_values = load_yaml(args.config) if args.config else {}
        cfg = build_config(file_values, flag_values(args))
        if args.quiet:
            import os

            os.environ["BUILD_EDGE_NO_PROGRESS"] = "1"
        _setup_logging(args.quiet)
        if args.sweep:
            from toolchain.sweep import parse_axes, run_sweep

            folder = run_sweep(cfg, parse_axes(args.sweep, set(criterion_flags())))
            print(f"sweep: {folder}")
            return 0
        from toolchain.pipeline import run_pipeline

        bundle = run_pipeline(cfg)
        dist_utils.shutdown()
    except UserError as e:
        sys.stderr.write(f"build-edge: error: {e}\n")
        return 2
    except BuildError as e:
        sys.stderr.write(f"build-edge: build failed: {e}\n")
        return 1
    if dist_utils.is_main():
        from toolchain.report import verdict

        print(verdict(json.loads((bundle / "manifest.json").read_text()).get("metrics") or {}))
        print(f"bundle: {bundle}")
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    """bench-edge BUNDLE RESULT.json ...: fold on-device benchmark results into a bundle's report;
    bench-edge import-latency-table FILE: store a latency table the kit measured on the device."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["import-latency-table"]:
        return import_latency_table_main(argv[1:])
    parser = _Parser(prog="bench-edge", description="Merge on-device results (from the kit's "
                                                    "bench_on_device.py) into a bundle. 'bench-edge "
                                                    "import-latency-table FILE' stores a latency table measured "
                                                    "on the device (bench_on_device.py --latency-table).")
    parser.add_argument("bundle", help="bundle folder written by build-edge")
    parser.add_argument("results", nargs="+", help="JSON files written by bench_on_device.py")
    args = parser.parse_args(argv)
    try:
        from toolchain.stages.bundle import add_device_results

        merged = add_device_results(args.bundle, args.results)
    except UserError as e:
        sys.stderr.write(f"bench-edge: error: {e}\n")
        return 2
    print(f"merged {len(merged.get('results', []))} result(s) into {args.bundle}")
    return 0


def import_latency_table_main(argv: list[str]) -> int:
    """bench-edge import-latency-table FILE: check a device latency table and store it for later builds."""
    parser = _Parser(prog="bench-edge import-latency-table",
                     description="Store a latency table measured on the device (kit/bench_on_device.py "
                                 "--latency-table); later builds for its target, precision and batch read it.")
    parser.add_argument("table", help="latency_table.device.json written by the kit")
    args = parser.parse_args(argv)
    try:
        from toolchain.latency import LatencyTable
        from toolchain.latency_store import import_table

        try:
            dest = import_table(args.table)
        except OSError as e:
            raise UserError(f"cannot store the table under {e.filename or 'the latency table store'}: "
                            f"{e.strerror or e}") from None
    except UserError as e:
        sys.stderr.write(f"bench-edge: error: {e}\n")
        return 2
    table = LatencyTable.load(dest)
    print(f"stored the device latency table of {table.target} ({table.precision}, batch {table.batch}, "
          f"{len(table.entries)} convs, {table.backend} on {table.measured_on or '?'}) at {dest}")
    print(f"later builds for {table.target} at {table.precision}, batch {table.batch} will use it "
          "(--latency-source auto)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
