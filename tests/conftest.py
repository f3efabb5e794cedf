import os
from pathlib import Path

import pytest

os.environ.setdefault("BUILD_EDGE_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_TAR = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
BASELINE = SHARED / "models" / "vgg16_bn_cifar10.pt"


@pytest.fixture(scope="session")
def cifar_jpeg_dir() -> Path:
    """The shared CIFAR-10 JPEG copy unpacked once into the ignored .data/ folder."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {CIFAR_TAR} (only present beside the project's checkout)")
    target = ROOT / ".data"
    root = target / "cifar10"
    if not (root / "test").is_dir():
        import tarfile

        target.mkdir(exist_ok=True)
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(target, filter="data")
    return root


@pytest.fixture(scope="session")
def shared_baseline() -> Path:
    if not BASELINE.exists():
        pytest.skip(f"shared VGG16-BN baseline not found at {BASELINE}")
    return BASELINE
