"""Hardware target profiles: shipped YAML, facts from docs/design/targets.md, user overrides, errors."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources

import pytest

from toolchain.errors import UserError
from toolchain.targets import (
    FACT_FIELDS,
    TargetProfile,
    format_targets_table,
    list_targets,
    load_target,
    target_names,
)

EXPECTED = {
    "jetson-orin-nano-8gb", "jetson-orin-nano-4gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
    "jetson-xavier-nx", "jetson-nano", "raspberry-pi-5", "raspberry-pi-4", "x86-cpu",
}  # fmt: skip


def _get(p: TargetProfile, path: str):
    obj = p
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_builtin_profiles_are_the_packaged_yaml_files():
    files = sorted(
        e.name[:-5] for e in resources.files("toolchain.targets").iterdir() if e.name.endswith(".yaml")
    )
    assert set(files) == EXPECTED
    assert target_names() == files
    profiles = list_targets()
    assert [p.name for p in profiles] == files
    assert all(p.origin.startswith("toolchain.targets/") for p in profiles)
    with pytest.raises(dataclasses.FrozenInstanceError):
        profiles[0].threads = 99  # type: ignore[misc]


def test_alias_jetson_is_orin_nano_8gb():
    assert load_target("jetson") == load_target("jetson-orin-nano-8gb")
    assert load_target("jetson").name == "jetson-orin-nano-8gb"


# (cuda cores, tensor cores, compute capability, memory GB, bandwidth GB/s, TensorRT major) from docs/design/targets.md
TARGETS_MD_GPU = {
    "jetson-orin-nano-4gb": (512, 16, "8.7", 4, 34, 10),
    "jetson-orin-nano-8gb": (1024, 32, "8.7", 8, 68, 10),
    "jetson-orin-nx-16gb": (1024, 32, "8.7", 16, 102.4, 10),
    "jetson-agx-orin-64gb": (2048, 64, "8.7", 64, 204.8, 10),
    "jetson-xavier-nx": (384, 48, "7.2", 8, 59.7, 8),
    "jetson-nano": (128, 0, "5.3", 4, 25.6, 8),
}


@pytest.mark.parametrize("name", sorted(TARGETS_MD_GPU))
def test_jetson_facts_match_targets_md(name):
    p = load_target(name)
    cores, tcs, cc, mem, bw, trt = TARGETS_MD_GPU[name]
    assert p.runtime == "tensorrt" and p.gpu is not None
    assert (p.gpu.cuda_cores, p.gpu.tensor_cores, p.gpu.compute_capability) == (cores, tcs, cc)
    assert p.memory_gb == mem and p.memory_bandwidth_gbs == pytest.approx(bw)
    assert p.tensorrt_major == trt and p.workspace_mb and p.workspace_mb > 0


def test_raspberry_pi_and_x86_are_onnxruntime_cpu_targets():
    pi4, pi5, x86 = load_target("raspberry-pi-4"), load_target("raspberry-pi-5"), load_target("x86-cpu")
    for p in (pi4, pi5, x86):
        assert p.runtime == "onnxruntime" and p.gpu is None and p.compute_device == "cpu"
        assert p.tensorrt_major is None and p.supports_int8
    assert (pi4.cpu.cores, pi4.cpu.clock_ghz) == (4, 1.5)
    assert (pi5.cpu.cores, pi5.cpu.clock_ghz, pi5.memory_bandwidth_gbs) == (4, 2.4, 17)
    assert pi4.cpu.fp16_tflops is None and not pi4.supports_fp16  # Armv8.0 has no FP16 arithmetic


def test_only_the_x86_profile_quantizes_weights_to_7_bits():
    # its AVX2 int8 kernels saturate with full-range weights; TensorRT and Arm's int8 kernels accumulate in 32 bits
    assert {name: load_target(name).int8_weight_bits for name in EXPECTED} == {
        name: 7 if name == "x86-cpu" else 8 for name in EXPECTED}


def test_int8_peaks_are_dense_not_sparse():
    # docs/design/targets.md: Orin Nano 8GB 40 sparse, Orin Nano 4GB 20 sparse / 10 dense (GPU only, no DLA)
    assert load_target("jetson-orin-nano-8gb").gpu.int8_tops == pytest.approx(40 / 2)
    assert load_target("jetson-orin-nano-4gb").gpu.int8_tops == pytest.approx(10)
    # NX 16GB (100 sparse) and AGX 64GB (275 sparse) count the DLAs: the GPU's dense share is below half
    assert load_target("jetson-orin-nx-16gb").gpu.int8_tops < 100 / 2
    assert load_target("jetson-agx-orin-64gb").gpu.int8_tops < 275 / 2
    nano = load_target("jetson-nano")
    assert (
        nano.gpu.int8_tops is None and not nano.supports_int8 and nano.gpu.fp16_tflops == pytest.approx(0.47)
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_estimated_figures_follow_their_formulas(name):
    p = load_target(name)
    assert p.estimated, "every profile derives some peak"
    for path in p.estimated:
        assert "estimated" in (p.source_of(path) or ""), f"{name}: {path} has no formula in sources"
    if p.gpu is not None and p.gpu.clock_mhz and "gpu.fp32_tflops" in p.estimated:
        # FP32 = CUDA cores x 2 (FMA) x clock
        assert p.gpu.fp32_tflops == pytest.approx(p.gpu.cuda_cores * 2 * p.gpu.clock_mhz / 1e6, rel=0.01)
    if p.gpu is not None and p.gpu.arch == "Ampere":
        # dense INT8 = tensor cores x 1024 OP/clk x clock (within the rounding of the vendor TOPS)
        assert p.gpu.int8_tops == pytest.approx(p.gpu.tensor_cores * 1024 * p.gpu.clock_mhz / 1e6, rel=0.03)
        assert p.gpu.fp16_tflops == pytest.approx(p.gpu.int8_tops / 2, rel=0.01)
    if "cpu.fp32_tflops" in p.estimated:
        per_cycle = p.cpu.fp32_tflops * 1e12 / (p.cpu.cores * p.cpu.clock_ghz * 1e9)
        assert min(abs(per_cycle - k) for k in (8, 16, 32)) < 0.1, f"{name}: {per_cycle} FLOP/cycle/core"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_fact_has_a_source_and_marks_name_real_fields(name):
    p = load_target(name)
    for path in FACT_FIELDS:
        head = path.split(".")[0]
        if head in ("gpu", "cpu") and getattr(p, head) is None:
            continue
        if _get(p, path) is None:
            continue
        assert p.source_of(path), f"{name}: no source for {path}"
    for path in (*p.unverified, *p.estimated):
        _get(p, path)  # raises AttributeError if the mark names no field
    assert p.default_precision in p.precisions
    assert p.batch_sizes and p.threads >= 1 and p.memory_budget_mb < p.memory_gb * 1024


def test_unverified_marks_follow_targets_md():
    assert "memory_bandwidth_gbs" in load_target("jetson-orin-nano-4gb").unverified
    assert "memory_bandwidth_gbs" in load_target("jetson-orin-nx-16gb").unverified
    agx = load_target("jetson-agx-orin-64gb").unverified
    assert {"gpu.cuda_cores", "gpu.tensor_cores", "memory_bandwidth_gbs"} <= set(agx)
    xnx = load_target("jetson-xavier-nx").unverified
    assert {"gpu.cuda_cores", "gpu.tensor_cores", "memory_bandwidth_gbs", "tensorrt_version"} <= set(xnx)
    # facts docs/design/targets.md states without the flag stay verified
    assert "memory_bandwidth_gbs" not in load_target("jetson-orin-nano-8gb").unverified
    assert "memory_bandwidth_gbs" not in load_target("jetson-nano").unverified
    assert "gpu.cuda_cores" not in load_target("jetson-orin-nano-8gb").unverified


def test_peak_uses_gpu_for_tensorrt_and_cpu_for_onnxruntime():
    j = load_target("jetson")
    assert j.peak_ops_per_s("int8") == pytest.approx(j.gpu.int8_tops * 1e12)
    assert j.peak_ops_per_s("fp32") == pytest.approx(j.gpu.fp32_tflops * 1e12)
    pi = load_target("raspberry-pi-5")
    assert pi.peak_ops_per_s("fp32") == pytest.approx(pi.cpu.fp32_tflops * 1e12)
    with pytest.raises(UserError, match="no int8 peak"):
        load_target("jetson-nano").peak_ops_per_s("int8")
    with pytest.raises(UserError, match="no fp16 peak"):
        pi.peak_ops_per_s("fp16")  # the CPU could, but ONNX Runtime CPU FP16 is not supported here


def test_unknown_target_lists_valid_names():
    with pytest.raises(UserError) as e:
        load_target("jetsn")
    msg = str(e.value)
    assert msg.startswith("unknown target 'jetsn'; valid: ")
    valid = msg.split("valid: ", 1)[1].split(" (or a path")[0].split(", ")
    assert set(valid) == EXPECTED | {"jetson"}
    assert "\n" not in msg


def test_user_yaml_overrides_fields_of_a_base_profile(tmp_path):
    f = tmp_path / "nano-super.yaml"
    f.write_text(
        "base: jetson-orin-nano-4gb\n"
        "memory_bandwidth_gbs: 51\n"
        "gpu:\n  int8_tops: 17\n  fp16_tflops: 8.5\n"
        "batch_sizes: [1, 2]\n"
    )
    base = load_target("jetson-orin-nano-4gb")
    p = load_target(str(f))
    assert p.name == "nano-super" and p.aliases == ()
    assert p.memory_bandwidth_gbs == 51 and p.gpu.int8_tops == 17 and p.gpu.fp16_tflops == 8.5
    assert p.batch_sizes == (1, 2)
    assert p.gpu.cuda_cores == base.gpu.cuda_cores and p.cpu == base.cpu and p.threads == base.threads
    assert "memory_bandwidth_gbs" in base.unverified and "memory_bandwidth_gbs" not in p.unverified
    assert "gpu.fp16_tflops" in base.estimated and "gpu.fp16_tflops" not in p.estimated
    assert "user override" in p.source_of("gpu.int8_tops")
    assert p.source_of("gpu.cuda_cores") == base.source_of("gpu.cuda_cores")
    assert load_target(f) == p  # Path works too


def test_user_yaml_without_base_must_be_complete(tmp_path):
    import yaml

    full = load_target("raspberry-pi-5").to_dict()
    full.pop("origin")
    full = json.loads(json.dumps(full))  # tuples -> lists

    f = tmp_path / "board.yaml"
    f.write_text(yaml.safe_dump({**full, "name": "board", "batch_sizes": [1], "aliases": []}))
    p = load_target(str(f))
    assert p.name == "board" and p.cpu == load_target("raspberry-pi-5").cpu
    del full["memory_gb"], full["threads"]
    f.write_text(yaml.safe_dump(full))
    with pytest.raises(UserError, match=r"missing required field\(s\): memory_gb, threads"):
        load_target(str(f))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: x\n  bad: [\n", r"invalid YAML \(line 2"),
        ("- just\n- a list\n", "expected a mapping"),
        ("base: jetson\ngpu:\n  cuda_core: 3\n", "unknown field 'cuda_core' in gpu"),
        ("base: jetson\nthreads: four\n", "threads: expected an integer"),
        ("base: jetson\nbatch_sizes: [1, 0]\n", "batch_sizes must be"),
        ("base: jetson\nruntime: tflite\n", "runtime 'tflite' is not one of"),
        ("base: raspberry-pi-4\ndefault_precision: fp16\n", "fp16 is not supported"),
        ("base: jetson\ngpu: null\n", "runtime tensorrt needs gpu"),
        ("base: jetson\nunverified: [gpu.bogus]\n", "unknown field 'gpu.bogus'"),
        ("base: x86-cpu\nint8_weight_bits: 4\n", "int8_weight_bits must be 8 or 7"),
        ("base: jetson-orin-nano-16gb\n", "unknown target 'jetson-orin-nano-16gb'"),
    ],
)
def test_bad_user_yaml_is_one_line_user_error(tmp_path, text, match):
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        load_target(str(f))
    assert "\n" not in str(e.value)


def test_missing_user_file():
    with pytest.raises(UserError, match="not found"):
        load_target("no/such/target.yaml")


def test_table_lists_every_profile_with_marks():
    table = format_targets_table()
    lines = table.splitlines()
    for name in EXPECTED:
        (row,) = [ln for ln in lines if f" {name} " in ln]
        p = load_target(name)
        assert p.runtime in row and str(p.memory_budget_mb) in row
    (nano,) = [ln for ln in lines if " jetson-nano " in ln]
    assert "0.236*" in nano  # estimated fp32
    (agx,) = [ln for ln in lines if " jetson-agx-orin-64gb " in ln]
    assert "204.8?" in agx and "2048?" in agx  # unverified
    assert "jetson = jetson-orin-nano-8gb" in table and "estimated" in table


def test_peak_roughly_matches_unit_conversion():
    # guards against TFLOPS/GFLOPS slips in the YAML: every peak is between 10 GFLOPS and 500 TFLOPS
    for p in list_targets():
        for spec in filter(None, (p.gpu, p.cpu)):
            for v in (spec.fp32_tflops, spec.fp16_tflops, spec.int8_tops):
                assert v is None or 0.01 <= v <= 500, (p.name, v)
        assert math.isfinite(p.memory_bandwidth_bytes_per_s) and p.memory_bandwidth_gbs < 1000
