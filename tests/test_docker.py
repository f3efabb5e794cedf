"""The Dockerfiles, checked without Docker: COPY sources, .dockerignore, the package built from exactly those
paths (wheel contents, resources found from the installed files), and the entry points they name."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {name: REPO / "docker" / name for name in ("Dockerfile.cpu", "Dockerfile.x86-trt", "Dockerfile.jetson")}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def build_args(dockerfile: Path) -> dict[str, str]:
    args = {}
    for word, rest in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def base_image(dockerfile: Path) -> str:
    image = next(rest for word, rest in instructions(dockerfile) if word == "FROM").split()[0]
    for key, value in build_args(dockerfile).items():
        image = image.replace(f"${{{key}}}", value)
    return image


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, rest in instructions(dockerfile):
        if word in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(rel, bare) or rel.split("/")[0] == pattern:
            return True
        if any(fnmatch.fnmatch(part, bare) for part in rel.split("/")):
            return True
    return False


def test_base_images() -> None:
    assert base_image(DOCKERFILES["Dockerfile.cpu"]) == "python:3.11-slim"
    trt = base_image(DOCKERFILES["Dockerfile.x86-trt"])
    assert trt.startswith("nvcr.io/nvidia/tensorrt:") and trt.endswith("-py3"), trt
    jetson = base_image(DOCKERFILES["Dockerfile.jetson"])
    assert jetson.startswith("nvcr.io/nvidia/l4t-jetpack:r36."), jetson  # JetPack 6 = L4T r36 = TensorRT 10
    for path in DOCKERFILES.values():
        text = path.read_text().lower()
        assert "docker login" not in text and "password" not in text and "token" not in text


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_in_the_build_context(name: str) -> None:
    sources = copy_sources(DOCKERFILES[name])
    assert sources, f"{name} copies nothing"
    patterns = dockerignore_patterns()
    for src in sources:
        assert (REPO / src).exists(), f"{name}: COPY source {src} is not in the repository"
        assert not ignored(src, patterns), f"{name}: COPY source {src} is excluded by .dockerignore"
        if (REPO / src).is_dir():  # nothing the package needs is filtered out inside it
            kept = [p for p in (REPO / src).rglob("*") if p.is_file()
                    and not ignored(p.relative_to(REPO).as_posix(), patterns)]
            assert any(p.suffix in (".py", ".yaml", ".sh", ".md") for p in kept)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_entrypoints_exist(name: str) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"build-edge", "bench-edge"} <= set(scripts)
    entry = [json.loads(rest) for word, rest in instructions(DOCKERFILES[name]) if word == "ENTRYPOINT"]
    assert len(entry) == 1, f"{name}: one exec-form ENTRYPOINT expected"
    program = entry[0][0]
    if name == "Dockerfile.jetson":  # the kit runner copied in by the Dockerfile
        copies = [rest.split() for word, rest in instructions(DOCKERFILES[name]) if word == "COPY"]
        (src,) = [c[0] for c in copies if c[-1].endswith("/" + program)]
        script = REPO / src
        assert os.access(script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert "kit/build_engine.sh" in text and "kit/bench_on_device.py" in text
    else:
        assert program in scripts, f"{name}: ENTRYPOINT {program} is not a console script of the package"


def test_package_builds_from_the_copied_paths(tmp_path: Path) -> None:
    """Build the wheel from exactly what Dockerfile.cpu copies, then use it from the installed files."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for rel in copy_sources(DOCKERFILES["Dockerfile.cpu"]):
        source = REPO / rel
        if source.is_dir():
            shutil.copytree(source, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("build_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yaml_profiles = {n for n in names if n.startswith("toolchain/targets/") and n.endswith(".yaml")}
    assert len(yaml_profiles) == len(list((REPO / "targets").glob("*.yaml"))) > 0
    for required in ("toolchain/calibration/__init__.py", "toolchain/calibration/qdq.py",
                     "toolchain/calibration/trt_cache.py", "toolchain/kit/__init__.py",
                     "toolchain/kit/templates/build_engine.sh", "toolchain/kit/templates/bench_on_device.py",
                     "toolchain/kit/templates/latency_table.py", "toolchain/kit/templates/README.md",
                     "toolchain/backends/tensorrt.py"):
        assert required in names, f"{required} missing from the wheel"
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "build-edge = toolchain.cli:main" in entry_points and "bench-edge = toolchain.cli:bench_main" in entry_points

    # import from the unpacked wheel (it comes first on sys.path, ahead of the editable install)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import json, tempfile, pathlib, toolchain.kit, toolchain.calibration, toolchain.targets\n"
        "from importlib import resources\n"
        "root = pathlib.Path(toolchain.kit.__file__).parents[1]\n"
        "names = [p.name for p in resources.files('toolchain.targets').iterdir() if p.name.endswith('.yaml')]\n"
        "tpl = [p.name for p in resources.files('toolchain.kit').joinpath('templates').iterdir()]\n"
        "print(json.dumps({'root': str(root), 'calibration': toolchain.calibration.__file__, 'targets': names,"
        " 'templates': sorted(tpl)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["root"]) == site / "toolchain"
    assert Path(found["calibration"]).is_relative_to(site)
    assert len(found["targets"]) == len(yaml_profiles)
    assert found["templates"] == ["README.md", "bench_on_device.py", "build_engine.sh", "latency_table.py"]
