"""Which training images calibrate INT8, and the reader that feeds them to ONNX Runtime."""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from toolchain.errors import UserError


def select_calibration_set(labels: np.ndarray, n: int = 512, seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` training samples, as class-balanced as the labels allow, reproducible by `seed`.

    Every class gets ``n // classes`` samples (one more for ``n % classes`` classes picked by the seed);
    a class with fewer samples gives all it has and the rest is shared among the other classes.
    With ``n >= len(labels)`` every index is returned.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"calibration labels must be a 1-D array, got shape {labels.shape}")
    if isinstance(n, bool) or int(n) != n or n <= 0:
        raise UserError(f"calibration set size must be a positive integer, got {n!r}")
    n = int(n)
    if len(labels) == 0:
        raise UserError("cannot select a calibration set from an empty training split")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)

    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    available = np.bincount(inverse, minlength=len(classes))
    quota = np.zeros(len(classes), dtype=np.int64)
    remaining = n
    while remaining > 0:
        open_classes = np.flatnonzero(quota < available)
        share = remaining // len(open_classes)
        if share == 0:  # fewer samples left than open classes: one more each for a seeded subset
            quota[rng.permutation(open_classes)[:remaining]] += 1
            break
        grant = np.minimum(share, available[open_classes] - quota[open_classes])
        quota[open_classes] += grant
        remaining -= int(grant.sum())

    chosen = [
        rng.choice(np.flatnonzero(inverse == c), size=int(quota[c]), replace=False)
        for c in range(len(classes)) if quota[c] > 0
    ]  # fmt: skip
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def check_images(images: np.ndarray, what: str = "calibration images") -> np.ndarray:
    """`images` as a C-contiguous float32 NCHW array; UserError for anything else."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise UserError(f"{what} must be a float32 NCHW array, got shape {images.shape}")
    if len(images) == 0:
        raise UserError(f"{what}: no images")
    if not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"{what} must be normalised floating point (float32), got {images.dtype}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    if not np.isfinite(images).all():
        raise UserError(f"{what} contain NaN or infinite values")
    return images


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds normalised float32 NCHW images to ``quantize_static`` in batches of `batch_size`."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 32):
        if batch_size <= 0:
            raise UserError(f"calibration batch size must be positive, got {batch_size}")
        self.images = check_images(images)
        self.input_name = input_name
        self.batch_size = int(batch_size)
        self._next = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = 0
