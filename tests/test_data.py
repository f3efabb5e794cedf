import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.data import DeviceLoader, balanced_indices, load_dataset, random_crop_flip, random_cutout
from toolchain.errors import UserError


def test_balanced_indices_are_balanced_unique_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    idx = balanced_indices(labels, 30, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [13, 12, 5]  # the small class gives its share to the others
    assert len(set(idx.tolist())) == 30 and idx.tolist() == sorted(idx.tolist())
    assert torch.equal(idx, balanced_indices(labels, 30, seed=0))
    assert not torch.equal(idx, balanced_indices(labels, 30, seed=1))


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1  # no zeros inside
    out = random_crop_flip(x, pad=4, generator=g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for n in range(2):
        found = any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1))
                    for oy in range(9) for ox in range(9) for w in [padded[n, :, oy:oy + 8, ox:ox + 8]])
        assert found


def test_random_cutout_zeroes_one_clipped_square_per_image():
    x = torch.arange(64 * 2 * 9 * 7, dtype=torch.float32).view(64, 2, 9, 7) + 1  # no zeros inside
    g = torch.Generator().manual_seed(3)
    out = random_cutout(x, 4, generator=g)
    g = torch.Generator().manual_seed(3)  # the same draws, for a plain per-image loop
    cy, cx = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 7, (64,), generator=g)
    clipped = 0
    for n in range(64):
        want = x[n].clone()
        top, left = int(cy[n]) - 2, int(cx[n]) - 2
        want[:, max(top, 0):max(top + 4, 0), max(left, 0):max(left + 4, 0)] = 0
        assert torch.equal(out[n], want)
        holes = int((out[n, 0] == 0).sum())
        assert 1 <= holes <= 16
        clipped += holes < 16
    assert 0 < clipped < 64  # centres anywhere: some squares cross a border, most do not


def test_loader_applies_cutout_only_when_augmenting(tmp_path):
    data = load_dataset("digits", None, cache_dir=tmp_path)
    plain = next(iter(DeviceLoader(data.train, data, 32, torch.device("cpu"), augment=True, seed=0)))[0]
    cut = next(iter(DeviceLoader(data.train, data, 32, torch.device("cpu"), augment=True, seed=0, cutout=8)))[0]
    off = next(iter(DeviceLoader(data.train, data, 32, torch.device("cpu"), cutout=8)))[0]
    zero_rows = (cut == 0).all(1).flatten(1).sum(1)  # pixels zero in every channel: the holes
    assert (zero_rows >= 16).all() and (zero_rows <= 64).all()
    changed = cut != plain
    assert changed.any() and torch.equal(cut[~changed], plain[~changed]) and (cut[changed] == 0).all()
    assert torch.equal(off, next(iter(DeviceLoader(data.train, data, 32, torch.device("cpu"))))[0])


def test_digits_are_real_32x32_rgb_images(tmp_path):
    data = load_dataset("digits", None, cache_dir=tmp_path)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    assert data.train.images.float().std() > 10  # real content, not constant
    assert list(tmp_path.glob("digits-*.pt")), "decoded once and cached"
    again = load_dataset("digits", None, cache_dir=tmp_path)
    assert torch.equal(again.test.images, data.test.images)


def test_loader_normalises_and_shards(tmp_path):
    data = load_dataset("digits", None, cache_dir=tmp_path, test_subset=50)
    loader = DeviceLoader(data.test, data, 16, torch.device("cpu"))
    xs = torch.cat([x for x, _ in loader])
    assert xs.shape == (50, 3, 32, 32)
    assert abs(float(xs.mean())) < 0.5
    halves = [DeviceLoader(data.test, data, 16, torch.device("cpu"), shuffle=True, rank=r, world=2) for r in (0, 1)]
    ys = [torch.cat([y for _, y in h]) for h in halves]
    assert len(ys[0]) == len(ys[1]) == 25


def _write_imagefolder(root, classes=("cat", "dog"), per_class=3, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")


def test_imagefolder_decodes_resizes_and_keeps_class_order(tmp_path):
    _write_imagefolder(tmp_path / "data")
    data = load_dataset("imagefolder", str(tmp_path / "data"), cache_dir=tmp_path / "cache")
    assert data.classes == ["cat", "dog"]
    assert data.train.images.shape == (6, 3, 32, 32)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_imagefolder_bad_dirs_are_user_errors(tmp_path, make):
    root = tmp_path / "data"
    if make == "empty":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    with pytest.raises(UserError):
        load_dataset("imagefolder", str(root), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cifar10_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(tmp_path), cache_dir=tmp_path / "cache")


def test_baseline_training_augments_with_its_own_cutout(tmp_path, monkeypatch):
    """--baseline-cutout reaches the loader the baseline trains on (and only its training loader)."""
    from toolchain.stages import baseline

    seen = []
    monkeypatch.setattr(baseline, "fit", lambda model, train, test, *a, **k: seen.append((train, test)))
    data = load_dataset("digits", None, cache_dir=tmp_path)
    kw = dict(epochs=1, lr=0.1, batch_size=32, weight_decay=0.0, label_smoothing=0.0, amp="off",
              device=torch.device("cpu"), workdir=tmp_path, seed=0)
    baseline.train_baseline(data, "vgg11_bn", cutout=8, **kw)
    baseline.train_baseline(data, "vgg11_bn", **kw)
    (train, test), (plain, _) = seen
    assert (train.augment, train.cutout, test.cutout, plain.cutout) == (True, 8, 0, 0)
