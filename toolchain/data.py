"""The data every stage reads: decode a dataset once, cache it as uint8 tensors, serve batches on the device.

Sources: ``digits`` (scikit-learn's 8x8 digits upscaled to RGB; offline, real images),
``cifar10`` (torchvision's ``cifar-10-batches-py`` layout; downloads when online and absent)
and ``imagefolder`` (``train/<class>/*`` and ``test/<class>/*``). Augmentation (pad-4 random
crop, horizontal flip) runs on whole batches on the training device.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.errors import UserError
from toolchain.registry import Registry
from toolchain.util import atomic_torch_save

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_HELP = (
    "get CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
    "--data-dir (it must contain cifar-10-batches-py/), or use --dataset imagefolder"
)


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor | np.ndarray) -> ImageSplit:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSplit(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: ImageSplit
    test: ImageSplit
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images_u8.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images_u8.device).view(1, -1, 1, 1)
        return (images_u8.float() / 255.0 - mean) / std


Raw = tuple[list[str], ImageSplit, ImageSplit]
SOURCES: Registry = Registry("dataset")


@SOURCES.register("digits")
def _digits(data_dir: str | None, image_size: int) -> Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target).long()
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    classes = [str(i) for i in range(10)]
    return classes, ImageSplit(x[tr], y[tr]), ImageSplit(x[te], y[te])


@SOURCES.register("cifar10")
def _cifar10(data_dir: str | None, image_size: int) -> Raw:
    from torchvision.datasets import CIFAR10

    if not data_dir:
        raise UserError(f"--dataset cifar10 needs --data-dir; {CIFAR10_HELP}")
    root = Path(data_dir)
    if not (root / "cifar-10-batches-py").is_dir():
        import socket

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)  # offline machines should fail fast, not hang
        created = [p for p in (root, *root.parents) if not p.exists()]  # what the download would create
        try:  # torchvision's real download path for online users
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001 - offline: any network error means the same to the user
            for folder in created:  # the failed download leaves only the empty folders it made
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise UserError(f"CIFAR-10 not found in {root} and the download failed ({type(e).__name__}); "
                            f"{CIFAR10_HELP}") from None
        finally:
            socket.setdefaulttimeout(previous)
    splits = []
    for train in (True, False):
        ds = CIFAR10(str(root), train=train, download=False)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(ImageSplit(_resize_u8(x, image_size), torch.tensor(ds.targets, dtype=torch.long)))
    return list(ds.classes), splits[0], splits[1]


@SOURCES.register("imagefolder")
def _imagefolder(data_dir: str | None, image_size: int) -> Raw:
    from torchvision.datasets import ImageFolder

    if not data_dir:
        raise UserError("--dataset imagefolder needs --data-dir DIR with train/<class>/* and test/<class>/*")
    root = Path(data_dir)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise UserError(f"{root / part} does not exist: --data-dir must hold train/<class>/* and "
                            f"test/<class>/*")
    splits, classes = [], None
    for part in ("train", "test"):
        try:
            folder = ImageFolder(str(root / part))
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{root / part}: {str(e).splitlines()[0]}") from None
        if classes is not None and folder.classes != classes:
            raise UserError(f"{root}: train/ and test/ have different class folders")
        classes = folder.classes

        def decode(path: str, loader=folder.loader) -> torch.Tensor:
            try:
                pixels = np.array(loader(path), dtype=np.uint8)
            except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated or damaged files
                raise UserError(f"{path} is not a readable image ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
                                f"fix or remove it") from None
            img = torch.from_numpy(pixels).permute(2, 0, 1)
            return _resize_u8(img[None], image_size)[0]

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(decode, [p for p, _ in folder.samples], chunksize=256))
        labels = torch.tensor([c for _, c in folder.samples], dtype=torch.long)
        splits.append(ImageSplit(torch.stack(images), labels))
    return list(classes), splits[0], splits[1]


def _resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices with classes as equal as possible (seeded), sorted.

    Round-robin over per-class shuffled lists: a class that runs out leaves its share to the rest.
    """
    labels = torch.as_tensor(labels)
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class]
    longest = max(len(p) for p in per_class)
    grid = torch.full((longest, len(per_class)), -1, dtype=torch.long)
    for j, p in enumerate(per_class):
        grid[: len(p), j] = p
    flat = grid.flatten()
    return torch.sort(flat[flat >= 0][:n]).values


def _cache_key(dataset: str, data_dir: str | None, image_size: int) -> str:
    parts = [dataset, str(image_size)]
    if data_dir:
        root = Path(data_dir).resolve()
        parts.append(str(root))
        for sub in ("train", "test", "cifar-10-batches-py"):
            if (root / sub).exists():
                parts.append(f"{sub}:{(root / sub).stat().st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_dataset(
    dataset: str,
    data_dir: str | None,
    *,
    cache_dir: Path,
    image_size: int = 32,
    normalization: str = "auto",
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> Dataset:
    source = SOURCES.get(dataset)
    if data_dir is not None and dataset != "digits":
        root = Path(data_dir)
        if not root.exists() and dataset == "imagefolder":
            raise UserError(f"data dir {root} does not exist")
    cache = cache_dir / f"{dataset}-{_cache_key(dataset, data_dir, image_size)}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
        classes = blob["classes"]
        train = ImageSplit(blob["train_images"], blob["train_labels"])
        test = ImageSplit(blob["test_images"], blob["test_labels"])
    else:
        classes, train, test = source(data_dir, image_size)
        if len(train) == 0 or len(test) == 0:
            raise UserError(f"dataset {dataset} at {data_dir} has an empty train or test split")
        atomic_torch_save({"classes": classes, "train_images": train.images, "train_labels": train.labels,
                           "test_images": test.images, "test_labels": test.labels}, cache)
    if train_subset:
        train = train.subset(balanced_indices(train.labels, train_subset, seed))
    if test_subset:
        test = test.subset(balanced_indices(test.labels, test_subset, seed))
    mean, std = _normalization(dataset, normalization, train)
    return Dataset(dataset, list(classes), train, test, mean, std)


@dataclass(frozen=True)
class DataSpec:
    """Which images a run uses. It is the baseline stage's ``data`` input, so every later stage's key
    holds it through the baseline's digest."""

    dataset: str
    data_dir: str | None  # resolved to an absolute path
    image_size: int
    normalization: str
    train_subset: int | None
    test_subset: int | None
    seed: int

    def load(self, cache_dir: Path) -> Dataset:
        return load_dataset(self.dataset, self.data_dir, cache_dir=cache_dir, image_size=self.image_size,
                            normalization=self.normalization, train_subset=self.train_subset,
                            test_subset=self.test_subset, seed=self.seed)


def _normalization(dataset: str, how: str, train: ImageSplit) -> tuple[tuple, tuple]:
    if how == "cifar10" or (how == "auto" and dataset == "cifar10"):
        return CIFAR10_MEAN, CIFAR10_STD
    if how == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    x = train.images.float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


class DeviceLoader:
    """Batches from a uint8 split, normalised (and augmented) on the device.

    With ``world > 1`` each rank sees its own shard of every epoch's permutation (the same
    permutation on every rank, as DistributedSampler does).
    """

    def __init__(self, split: ImageSplit, data: Dataset, batch_size: int, device: torch.device, *,
                 shuffle: bool = False, augment: bool = False, seed: int = 0, channels_last: bool = False,
                 rank: int = 0, world: int = 1, cutout: int = 0):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.channels_last, self.rank, self.world = channels_last, rank, world
        self.cutout = cutout  # with augment: the side of the square zeroed per image (0: none)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world > 1:
            per_rank = -(-n // self.world)
            idx = torch.cat([idx, idx[: per_rank * self.world - n]])[self.rank::self.world]
        return idx

    def __len__(self) -> int:
        n = -(-len(self.labels) // self.world)
        return -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices().to(self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + self.epoch)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            x = self.images[b]
            if self.augment:
                x = random_crop_flip(x, pad=4, generator=g)
            x = self.data.normalize(x)
            if self.augment and self.cutout:
                x = random_cutout(x, self.cutout, generator=g)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[b]


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad-`pad` random crop and random horizontal flip, per sample, for a whole batch at once."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    crop = padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows, cols]
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crop.flip(3), crop)


def random_cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): zero one ``size`` x ``size`` square per sample, its centre uniform
    over the image, so squares near a border are clipped. Applied after normalisation, so the square
    holds the training set's mean, not black."""
    n, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (n,), device=dev, generator=generator)
    cx = torch.randint(0, w, (n,), device=dev, generator=generator)
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    top, left = cy - size // 2, cx - size // 2
    inside_y = (ys[None] >= top[:, None]) & (ys[None] < top[:, None] + size)  # (n, h)
    inside_x = (xs[None] >= left[:, None]) & (xs[None] < left[:, None] + size)  # (n, w)
    hole = inside_y[:, :, None] & inside_x[:, None, :]
    return x.masked_fill(hole[:, None], 0.0)


def count_classes(dataset: str, data_dir: str | None) -> int:
    """Number of classes without decoding anything (to check a checkpoint before any work)."""
    if dataset == "imagefolder" and data_dir and (Path(data_dir) / "train").is_dir():
        return sum(1 for p in (Path(data_dir) / "train").iterdir() if p.is_dir())
    return 10
