"""A small rich progress bar showing running loss/accuracy; silent off rank 0 or when disabled."""

from __future__ import annotations

import contextlib
import os

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from toolchain.train import distributed as dist_utils


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, **metrics: float) -> None:
        if self.progress is not None:
            text = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.progress.update(self.task, advance=1, metrics=text)


@contextlib.contextmanager
def progress_bar(total: int, desc: str):
    if not dist_utils.is_main() or os.environ.get("BUILD_EDGE_NO_PROGRESS"):
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                        transient=True)
    with progress:
        task = progress.add_task(desc, total=total, metrics="")
        yield _Bar(progress, task)
