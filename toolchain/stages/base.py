"""The stage contract, and the cache that runs a stage once per key.

A stage is a module with ``NAME``, a frozen ``Inputs`` dataclass and ``run(inputs, ctx, folder) ->
Result`` (a JSON-able dataclass). ``Inputs`` hold everything the stage reads, the digests of the
stages it builds on included, so their stable hash *is* the cache key: an input that is not a field
cannot be read, and a field cannot be left out of the key. What every stage shares and no key needs
is in the ``StageContext``: the decoded data (its identity is the baseline's ``data`` input), the
device, and where the stage folders live.

Each stage writes its outputs under ``<out>/.work/<NAME>-<digest>/``; a finished one leaves
``done.json`` (its result and seconds) and is skipped next time. A killed stage resumes from what it
left (the training stages keep a checkpoint per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from toolchain.data import Dataset
from toolchain.train import distributed as dist_utils
from toolchain.util import atomic_write_json, stable_hash

log = logging.getLogger("build_edge")
RESUME_CHECKPOINT = "last.pt"  # a training stage's per-epoch checkpoint (toolchain.train.loop.fit)


OMIT_IF_NONE = {"omit_if_none": True}  # field metadata: an input added later keeps the old keys while unset


def key_of(inputs: Any) -> dict[str, Any]:
    """The cache key: the inputs as plain JSON values (nested dataclasses become dicts); a field marked
    ``OMIT_IF_NONE`` is left out while None, so adding it did not change every existing key."""
    key = dataclasses.asdict(inputs)
    _omit_unset(inputs, key)
    return key


def _omit_unset(inputs: Any, key: dict[str, Any]) -> None:
    """Drop the unset ``OMIT_IF_NONE`` fields from `key`, in nested dataclasses too (baseline.Training)."""
    for f in dataclasses.fields(inputs):
        value = getattr(inputs, f.name)
        if f.metadata.get("omit_if_none") and value is None:
            del key[f.name]
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _omit_unset(value, key[f.name])


def digest_of(name: str, inputs: Any) -> str:
    return stable_hash({"stage": name, **key_of(inputs)})


@dataclass
class StageContext:
    root: Path  # <out>/.work
    data: Dataset
    device: torch.device

    def folder(self, name: str, digest: str) -> Path:
        return self.root / f"{name}-{digest}"

    def result(self, stage: ModuleType, digest: str) -> Any:
        """A finished upstream stage's result (its done.json as the stage's Result)."""
        return read_result(stage, self.folder(stage.NAME, digest) / "done.json")


@dataclass
class Done:
    """A finished stage: where its outputs are, its key's digest, its result and how long it ran."""
    folder: Path
    digest: str
    result: Any
    seconds: float


def read_result(stage: ModuleType, path: Path) -> Any:
    saved = json.loads(path.read_text())
    return stage.Result(**{f.name: saved[f.name] for f in dataclasses.fields(stage.Result) if f.name in saved})


def run_stage(stage: ModuleType, inputs: Any, ctx: StageContext) -> Done:
    """Run `stage` unless its folder holds done.json. Under torchrun, rank 0 alone runs a stage unless
    the stage says ``ALL_RANKS`` (training); the others wait and read its result. Only rank 0 writes."""
    digest = digest_of(stage.NAME, inputs)
    folder = ctx.folder(stage.NAME, digest)
    done = folder / "done.json"
    if done.exists():
        log.info("stage %-8s cached  (%s)", stage.NAME, folder.name)
        return Done(folder, digest, read_result(stage, done), json.loads(done.read_text()).get("seconds", 0.0))
    result, seconds = None, 0.0
    if getattr(stage, "ALL_RANKS", False) or dist_utils.is_main():
        if dist_utils.is_main():
            folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log.info("stage %-8s running (%s)", stage.NAME, folder.name)
        result = stage.run(inputs, ctx, folder)
        seconds = round(time.perf_counter() - started, 2)
        if dist_utils.is_main():
            atomic_write_json(done, {**dataclasses.asdict(result), "seconds": seconds})
            (folder / RESUME_CHECKPOINT).unlink(missing_ok=True)  # only a killed stage needs it
        log.info("stage %-8s done in %.1fs", stage.NAME, seconds)
    dist_utils.barrier()
    if not dist_utils.is_main():
        result, seconds = read_result(stage, done), json.loads(done.read_text())["seconds"]
    return Done(folder, digest, result, seconds)
