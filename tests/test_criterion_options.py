"""Criterion options: one dataclass per criterion, one set of validators, flags and the README table derived."""

import dataclasses
from pathlib import Path

import pytest

from toolchain.errors import UserError
from toolchain.ranking import CRITERIA, load_criteria
from toolchain.ranking.base import check_options
from toolchain.ranking.cmi import CMIOptions
from toolchain.ranking.cutoffs import Budget
from toolchain.ranking.mipp import MIPPOptions
from toolchain.ranking.options import (
    check_bool,
    check_choice,
    check_int,
    check_names,
    check_number,
    option_keys,
    options_table,
    parse,
    readme_table,
    specs,
)
from toolchain.ranking.reconstruction import ReconOptions
from toolchain.registry import Registry

ROOT = Path(__file__).resolve().parents[1]

# the criterion flags build-edge had before they were generated: key -> argparse type (bool: the --at-init switch)
FLAGS_BEFORE = {
    "formulation": str, "order": str, "cutoff": str, "alpha": float, "gamma": float, "permutations": int,
    "eta": float, "kernel": str, "preserve": str, "recon_weight": str, "recon_search": str, "mipp_estimator": str,
    "mipp_kernel": str, "repeats": int, "mlp_layers": str, "confidence": float, "at_init": bool,
}


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("cls,criterion,options,needles", [
    # an unknown key: the valid ones are listed
    (CMIOptions, "cmi", {"typo": 1}, ["unknown cmi option(s) typo", "valid: formulation, order"]),
    (ReconOptions, "recon", {"recon_wieght": "bn"}, ["unknown recon option(s) recon_wieght", "recon_weight"]),
    # not among the choices
    (CMIOptions, "cmi", {"cutoff": "elbow"}, ["cmi option cutoff must be one of scree, xmeans", "'elbow'"]),
    (MIPPOptions, "mipp", {"mipp_estimator": "ksg"}, ["mipp option mipp_estimator must be one of renyi, mlp"]),
    (ReconOptions, "recon", {"recon_weight": "heavy"}, ["recon option recon_weight must be one of loss, bn, none"]),
    # a wrong type
    (CMIOptions, "cmi", {"alpha": "x"}, ["cmi option alpha must be a number > 0, got 'x'"]),
    (CMIOptions, "cmi", {"alpha": True}, ["cmi option alpha must be a number > 0, got True"]),
    (CMIOptions, "cmi", {"permutations": 2.5}, ["cmi option permutations must be an integer >= 1, got 2.5"]),
    (MIPPOptions, "mipp", {"at_init": "yes"}, ["mipp option at_init must be true or false, got 'yes'"]),
    (MIPPOptions, "mipp", {"mipp_estimator": "mlp", "mlp_layers": 3}, ["mlp_layers must be a list of layer names"]),
    (CMIOptions, "cmi", {"budget": "speed=3"}, ["budget must look like 'flops=0.4'"]),
    (CMIOptions, "cmi", {"budget": "latency=0.5x"}, ["cmi option budget takes flops, params or channels"]),
    # out of range
    (CMIOptions, "cmi", {"gamma": -1}, ["cmi option gamma must be a number > 0, got -1"]),
    (CMIOptions, "cmi", {"eta": 1.5}, ["cmi option eta must be a number > 0 and <= 1, got 1.5"]),
    (CMIOptions, "cmi", {"keep_ratio": 0}, ["cmi option keep_ratio must be a number > 0 and <= 1, got 0"]),
    (MIPPOptions, "mipp", {"confidence": 1.0}, ["mipp option confidence must be a number > 0 and < 1, got 1.0"]),
    (MIPPOptions, "mipp", {"repeats": 0}, ["mipp option repeats must be an integer >= 1, got 0"]),
    (CMIOptions, "cmi", {"alpha": float("nan")}, ["cmi option alpha must be a number > 0"]),
    # options that depend on each other
    (MIPPOptions, "mipp", {"mipp_estimator": "mlp", "repeats": 1}, ["mipp option repeats must be an integer >= 2"]),
    (MIPPOptions, "mipp", {"mlp_layers": "features.0"}, ["mlp_layers needs mipp_estimator=mlp"]),
    (CMIOptions, "cmi", {"kernel": "exact", "preserve": "next"}, ["preserve=next needs kernel=adaptive"]),
])
def test_every_kind_of_bad_option_is_one_clear_line(cls, criterion, options, needles):
    text = _message(parse, cls, options, criterion=criterion)
    for needle in needles:
        assert needle in text, text


def test_context_checks_mlp_layers_against_the_layer_names():
    text = _message(parse, MIPPOptions, {"mipp_estimator": "mlp", "mlp_layers": ["a", "zz"]}, criterion="mipp",
                    layer_names=["a", "b"])
    assert "unknown layer(s) zz" in text and "prunable layers: a, b" in text
    assert parse(MIPPOptions, {"mipp_estimator": "mlp", "mlp_layers": "a, b"}, criterion="mipp",
                 layer_names=["a", "b"]).mlp_layers == ("a", "b")


def test_values_are_converted_to_the_fields_types():
    o = parse(CMIOptions, {"alpha": 1, "permutations": 20.0, "eta": "0.1", "budget": "flops=0.5", "order": None},
              criterion="cmi")
    assert isinstance(o.alpha, float) and o.alpha == 1.0
    assert isinstance(o.permutations, int) and o.permutations == 20
    assert o.eta == 0.1 and o.budget == Budget("flops", 0.5)
    assert o.order == "forward"  # None: not given
    assert dataclasses.is_dataclass(o) and o.__dataclass_params__.frozen
    assert parse(CMIOptions, {"kernel": "exact"}, criterion="cmi").preserve == "labels"  # the paper's mode
    assert parse(CMIOptions, {}, criterion="cmi") == CMIOptions()


@pytest.mark.parametrize("name", ["cmi", "mipp", "recon"])
def test_each_criterion_registers_its_options_and_the_defaults_pass_their_own_checks(name):
    load_criteria()
    cls = CRITERIA.options(name)
    assert cls is not None and dataclasses.is_dataclass(cls)
    table = specs(cls)
    assert all(s.help for s in table)
    defaults = {s.key: s.default for s in table if s.default is not None}
    assert parse(cls, defaults, criterion=name) == parse(cls, {}, criterion=name)
    assert check_options(name, defaults) == parse(cls, {}, criterion=name)


def test_check_options_refuses_foreign_and_bad_options_and_parses_the_rest():
    load_criteria()
    for name in ("l1", "random", "bn-scale", "taylor"):
        assert CRITERIA.options(name) is None and check_options(name, {}) is None
    text = _message(check_options, "l1", {"cutoff": "scree"})
    assert "criterion l1 does not take option cutoff (it takes no options); it is an option of cmi" in text
    text = _message(check_options, "recon", {"alpha": 2.0})
    assert "(it reads recon_weight, recon_search); it is an option of cmi, mipp" in text
    assert "cmi option kernel" in _message(check_options, "cmi", {"kernel": "wide"})
    assert check_options("mipp", {"at_init": True}).at_init is True
    with pytest.raises(UserError, match="unknown criterion"):
        CRITERIA.options("magic")


def test_the_shared_validators():
    assert check_number("x", "2", 0.0) == 2.0 and check_number("x", 0, 0.0, lo_open=False) == 0.0
    assert check_number("x", -5, None) == -5.0
    assert _message(check_number, "x", 1, 0.0, 1.0, hi_open=True) == "x must be a number > 0 and < 1, got 1"
    assert check_int("n", 3.0, 1) == 3
    assert _message(check_int, "n", float("inf"), 1) == "n must be an integer >= 1, got inf"
    assert check_choice("k", "a", ("a", "b")) == "a"
    assert _message(check_choice, "k", "c", ("a", "b")) == "k must be one of a, b; got 'c'"
    assert check_bool("b", False) is False and "b must be true or false" in _message(check_bool, "b", 0)
    assert check_names("l", ["x"]) == ("x",) and check_names("l", " x, ,y ") == ("x", "y")


def test_registry_options_are_optional_and_generic():
    reg: Registry = Registry("thing")
    reg.register("plain")(object)
    reg.register("typed", options=ReconOptions)(object)
    assert reg.options("plain") is None and reg.options("typed") is ReconOptions
    assert option_keys(None) == () and option_keys(ReconOptions) == ("recon_weight", "recon_search")


def test_generated_flags_are_the_flags_build_edge_always_had():
    from toolchain.cli import CRITERION_FLAGS, build_parser, flag_values

    assert {k: kind for k, (kind, _) in CRITERION_FLAGS.items()} == FLAGS_BEFORE
    assert CRITERION_FLAGS["alpha"][1].startswith("cmi/mipp: ")  # one flag for a key two criteria read
    actions = {a.dest: a for a in build_parser()._actions if a.dest.startswith("opt_")}
    assert set(actions) == {f"opt_{k}" for k in FLAGS_BEFORE}
    for key, kind in FLAGS_BEFORE.items():
        a = actions[f"opt_{key}"]
        assert a.option_strings == ["--" + key.replace("_", "-")] and a.default is None
        assert (a.nargs == 0 and a.const is True) if kind is bool else (a.type is kind and a.metavar is None)
    args = build_parser().parse_args(["--criterion", "mipp", "--mipp-estimator", "mlp", "--repeats", "3",
                                      "--mlp-layers", "features.0", "--alpha", "1.01", "--at-init"])
    assert flag_values(args)["criterion_options"] == {"alpha": 1.01, "mipp_estimator": "mlp", "repeats": 3,
                                                      "at_init": True, "mlp_layers": "features.0"}
    assert "criterion_options" not in flag_values(build_parser().parse_args([]))


def test_readme_table_is_the_rendered_one():
    table = options_table()
    assert readme_table((ROOT / "README.md").read_text()) == table, \
        "README's criterion options are stale: run `.venv/bin/python -m toolchain.ranking.options README.md`"
    for key in FLAGS_BEFORE:
        assert f"`--{key.replace('_', '-')}`" in table
