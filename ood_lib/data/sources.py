"""Dataset sources: one small class per on-disk format, each looked for in the search roots.

A source lists the places it looks at for a split (`places`), says whether a place holds the split
(`present`) and reads it (`read` -> x uint8 (N, H, W, C), y int64 (N,)), raising DatasetCorrupt when a
pinned hash or the format is wrong. Search roots, in order: `paths.data_root()` (env OOD_DATA_ROOT),
then `paths.data_dir()/raw`; some sources add a system location after them.

Images decoded from files (ImageFolder roots and their `.tar.gz` archives) are converted to RGB and,
when not already 32x32, resized with PIL's `Image.resize((32, 32), Image.BILINEAR)`, once, at
conversion. This stands in for the papers' `transforms.Resize((32, 32))` on LSUN, iSUN, Textures and
Places365: torchvision's Resize on a PIL image calls this same PIL resize.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from ood_lib import paths
from ood_lib.data.arrays import DatasetCorrupt

IMAGE_SIZE = (32, 32)                 # decoded images that differ are resized to this (width, height)
RESAMPLE = Image.BILINEAR             # the resize filter (mimics the papers' Resize((32, 32)))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DOWNLOAD_ENV = "OOD_DOWNLOAD"         # "1" lets torchvision download into data_dir()/raw (off: no network here)


# ---------------------------------------------------------------- helpers
def search_roots() -> list[Path]:
    """Folders every source is looked for in, in order: OOD_DATA_ROOT (when set), then data_dir()/raw."""
    root = paths.data_root()
    return ([root] if root else []) + [paths.data_dir() / "raw"]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(found: str, expected: str | None, path: Path, what: str = "file") -> None:
    """Raise DatasetCorrupt when a hash is pinned (`expected`) and differs from `found`."""
    if expected is not None and found != expected:
        raise DatasetCorrupt(f"{path}: SHA-256 of the {what} is {found}, expected {expected}")


def decode_image(blob: bytes, origin: str) -> np.ndarray:
    """One encoded image -> RGB uint8 (32, 32, 3), resized (bilinear) when it is not already 32x32."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("RGB")
            if im.size != IMAGE_SIZE:
                im = im.resize(IMAGE_SIZE, RESAMPLE)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetCorrupt(f"{origin}: cannot decode image ({e})") from e


def decode_images(blobs: list[bytes], names: list[str]) -> np.ndarray:
    """Decode in this process: 60,000 CIFAR-size JPEGs take 4-11 s on one core (11 s on a 2-core AMD EPYC), once:
    the arrays are cached."""
    if not blobs:
        return np.zeros((0, IMAGE_SIZE[1], IMAGE_SIZE[0], 3), np.uint8)
    return np.stack([decode_image(b, n) for b, n in zip(blobs, names)])


def image_folder_order(files: list[PurePosixPath], labeled: bool) -> tuple[list[PurePosixPath], np.ndarray]:
    """Order and label image files (paths relative to an ImageFolder root) as torchvision's ImageFolder does:
    the first-level folders, sorted by name, are the classes 0..K-1; files sort by path within a class.
    Unlabeled (OOD-only) sets take every image at any depth, with label -1."""
    files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and (len(f.parts) > 1 or not labeled)]
    files.sort(key=lambda f: f.parts)
    if not labeled:
        return files, np.full(len(files), -1, np.int64)
    classes = {c: i for i, c in enumerate(sorted({f.parts[0] for f in files}))}
    return files, np.array([classes[f.parts[0]] for f in files], np.int64)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global in the stream is refused.
    (`_codecs.encode` is how Python 3 writes bytes in protocol-2 pickles.)"""
    NUMPY = {"_reconstruct": np.empty(0).__reduce__()[0], "ndarray": np.ndarray, "dtype": np.dtype}

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" and name in self.NUMPY:
            return self.NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def unpickle(data: bytes, path: Path):
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetCorrupt(f"{path}: not a pickle of numpy arrays ({e})") from e


def _braced(names) -> str:
    return names[0] if len(names) == 1 else "{" + ",".join(names) + "}"


# ---------------------------------------------------------------- sources
class Source:
    """An on-disk format. `places` lists where it looks for a split, `present` says whether a place holds
    it, `read` returns (x, y) from that place. `locate` returns the first place found and what it looked at."""
    what = "files"

    def places(self, split: str) -> list[Path]:
        raise NotImplementedError

    def present(self, place: Path, split: str) -> bool:
        return place.exists()

    def read(self, place: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def describe(self, place: Path, split: str) -> str:
        return f"{place} ({self.what})"

    def locate(self, split: str) -> tuple[Path | None, list[str]]:
        looked = []
        for place in self.places(split):
            if self.present(place, split):
                return place, looked
            looked.append(self.describe(place, split))
        return None, looked


@dataclass(frozen=True)
class IdxFiles(Source):
    """IDX files, raw or gzip'd: `<folder>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
    Pinned hashes are of the decompressed content."""
    folders: tuple[str, ...]                                  # under each search root
    system: tuple[Path, ...] = ()                             # looked in last
    sha256: Mapping[str, str] = field(default_factory=dict)   # file stem -> SHA-256 of the decompressed bytes
    what = "IDX files"
    PREFIX = {"train": "train", "test": "t10k"}

    def stems(self, split: str) -> tuple[str, str]:
        return f"{self.PREFIX[split]}-images-idx3-ubyte", f"{self.PREFIX[split]}-labels-idx1-ubyte"

    def places(self, split):
        return [root / f for root in search_roots() for f in self.folders] + list(self.system)

    @staticmethod
    def find(folder: Path, stem: str) -> Path | None:
        return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)

    def present(self, place, split):
        return all(self.find(place, s) for s in self.stems(split))

    def describe(self, place, split):
        return f"{place}/{_braced(self.stems(split))}[.gz] ({self.what})"

    def read(self, place, split):
        images, labels = (self.read_idx(self.find(place, s), s) for s in self.stems(split))
        if images.ndim != 3 or labels.ndim != 1:
            raise DatasetCorrupt(f"{place}: IDX dims {images.shape} / {labels.shape}, expected (N, H, W) / (N,)")
        return images[..., None], labels.astype(np.int64)

    def read_idx(self, path: Path, stem: str) -> np.ndarray:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise DatasetCorrupt(f"{path}: bad gzip data ({e})") from e
        check_sha256(hashlib.sha256(raw).hexdigest(), self.sha256.get(stem), path, "decompressed content")
        if len(raw) < 4 or raw[:3] != b"\0\0\x08":
            raise DatasetCorrupt(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()})")
        ndim = raw[3]
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        offset = 4 + 4 * ndim
        if len(raw) != offset + int(np.prod(dims)):
            raise DatasetCorrupt(f"{path}: {len(raw)} bytes, expected {offset + int(np.prod(dims))} for dims {dims}")
        return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims).copy()


@dataclass(frozen=True)
class AnimalMnistPickles(Source):
    """animal-mnist's gzip'd pickles `Animal_MNIST/animal_{data,label}_version_3.gz`, under the search roots or
    inside the installed package. Their SHA-256 is checked before unpickling, which accepts numpy arrays only."""
    sha256: Mapping[str, str]            # gzip file name -> SHA-256 of the file (pass {} only for test fixtures)
    folders: tuple[str, ...] = ("Animal_MNIST", "animal_mnist/data/Animal_MNIST")
    package: str = "animal_mnist"        # located with importlib.util.find_spec, never imported
    files: tuple[str, str] = ("animal_data_version_3.gz", "animal_label_version_3.gz")
    what = "Animal-MNIST gzip'd pickles"

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)   # finds, does not import
        return Path(spec.origin).parent / "data" / "Animal_MNIST" if spec and spec.origin else None

    def places(self, split):
        pkg = self.package_dir()
        return [root / f for root in search_roots() for f in self.folders] + ([pkg] if pkg else [])

    def present(self, place, split):
        return all((place / f).is_file() for f in self.files)

    def locate(self, split):
        place, looked = super().locate(split)
        if place is None and self.package_dir() is None:
            looked.append(f"python package {self.package!r} (not installed for {sys.executable})")
        return place, looked

    def read(self, place, split):
        arrays = []
        for name in self.files:
            path = place / name
            blob = path.read_bytes()
            check_sha256(hashlib.sha256(blob).hexdigest(), self.sha256.get(name), path)
            try:
                arrays.append(unpickle(gzip.decompress(blob), path))
            except (OSError, EOFError) as e:
                raise DatasetCorrupt(f"{path}: bad gzip data ({e})") from e
        x, y = (np.asarray(a) for a in arrays)
        return x.astype(np.uint8)[..., None], y.astype(np.int64)


@dataclass(frozen=True)
class CifarPickles(Source):
    """torchvision's CIFAR python folder (`cifar-10-batches-py/`, `cifar-100-python/`): pickled dicts with
    "data" (N, 3072) in CHW order and a label list."""
    folder: str                                # under each search root
    files: Mapping[str, tuple[str, ...]]       # split -> batch files
    label_key: str                             # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    what = "CIFAR python pickles"

    def places(self, split):
        return [root / self.folder for root in search_roots()]

    def present(self, place, split):
        return all((place / f).is_file() for f in self.files[split])

    def describe(self, place, split):
        return f"{place}/{_braced(self.files[split])} ({self.what})"

    def read(self, place, split):
        xs, ys = [], []
        for name in self.files[split]:
            batch = unpickle((place / name).read_bytes(), place / name)
            try:
                xs.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[self.label_key], np.int64))
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetCorrupt(f"{place / name}: not a CIFAR batch ({e!r})") from e
        return np.ascontiguousarray(np.concatenate(xs).transpose(0, 2, 3, 1)), np.concatenate(ys)


@dataclass(frozen=True)
class SvhnMat(Source):
    """SVHN cropped digits, `<split>_32x32.mat`: X (32, 32, 3, N), y (N, 1) where label 10 means digit 0."""
    folders: tuple[str, ...] = (".", "svhn", "SVHN")
    what = "SVHN .mat file"

    def places(self, split):
        return [root / f / f"{split}_32x32.mat" for root in search_roots() for f in self.folders]

    def read(self, place, split):
        import scipy.io
        try:
            mat = scipy.io.loadmat(place)
            x, y = np.asarray(mat["X"], np.uint8), np.asarray(mat["y"], np.int64).reshape(-1)
        except (KeyError, ValueError, OSError) as e:
            raise DatasetCorrupt(f"{place}: not an SVHN .mat file ({e!r})") from e
        return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), np.where(y == 10, 0, y)


@dataclass(frozen=True)
class ImageFolder(Source):
    """An ImageFolder root on disk: `<root>/<split dir>/<class>/<image>` (see `image_folder_order`)."""
    roots: tuple[str, ...]               # root folder names under each search root, tried in order
    split_dirs: Mapping[str, str]        # split -> folder below the root ("" for none)
    labeled: bool = True
    what = "ImageFolder root"

    def places(self, split):
        return [base / r / self.split_dirs[split] for base in search_roots() for r in self.roots]

    def present(self, place, split):
        return place.is_dir()

    def read(self, place, split):
        found = [PurePosixPath(p.relative_to(place).as_posix()) for p in place.rglob("*") if p.is_file()]
        files, y = image_folder_order(found, self.labeled)
        blobs = [(place / f).read_bytes() for f in files]
        return decode_images(blobs, [str(place / f) for f in files]), y


def _under(name: PurePosixPath, folder: PurePosixPath) -> bool:
    """``folder in name.parents`` for relative paths, compared as strings (``parents`` took 1.6 s over the 60,000
    members of the CIFAR-10 archive)."""
    return str(folder) == "." or str(name).startswith(f"{folder}/")


@dataclass(frozen=True)
class TarImageFolder(Source):
    """A `.tar.gz` of an ImageFolder root, read member by member with tarfile (nothing is extracted).
    A pinned archive hash is checked first; absolute or `..` member names are refused."""
    archives: tuple[str, ...]            # archive file names looked for in each search root
    roots: tuple[str, ...]               # root folder inside the archive, first one holding images wins
    split_dirs: Mapping[str, str]
    labeled: bool = True
    sha256: Mapping[str, str] = field(default_factory=dict)   # archive file name -> SHA-256 of the file
    what = ".tar.gz of an ImageFolder root"

    def places(self, split):
        return [root / a for root in search_roots() for a in self.archives]

    def present(self, place, split):
        return place.is_file()

    def read(self, place, split):
        check_sha256(file_sha256(place), self.sha256.get(place.name), place)
        prefixes = [PurePosixPath(r, self.split_dirs[split]) for r in self.roots]
        members: dict[PurePosixPath, bytes] = {}
        try:
            with tarfile.open(place, "r:*") as tar:
                for m in tar:
                    name = PurePosixPath(m.name)
                    if name.is_absolute() or ".." in name.parts:
                        raise DatasetCorrupt(f"{place}: unsafe member name {m.name!r}")
                    if m.isfile() and name.suffix.lower() in IMAGE_SUFFIXES and any(
                            _under(name, p) for p in prefixes):
                        members[name] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetCorrupt(f"{place}: unreadable archive ({e})") from e
        for prefix in prefixes:
            inside = [n.relative_to(prefix) for n in members if _under(n, prefix)]
            if inside:
                files, y = image_folder_order(inside, self.labeled)
                names = [f"{place}:{prefix / f}" for f in files]
                return decode_images([members[prefix / f] for f in files], names), y
        raise DatasetCorrupt(f"{place}: no images under any of {[str(p) for p in prefixes]}")


@dataclass(frozen=True)
class TorchvisionDownload(Source):
    """torchvision's downloader, the last source: with OOD_DOWNLOAD=1 it downloads into data_dir()/raw and
    `reader` reads the downloaded files there. Off by default: the study machines have no network."""
    dataset: str                          # class name in torchvision.datasets
    split_kwargs: Mapping[str, dict]      # split -> constructor arguments, e.g. {"train": False}
    reader: Source

    def locate(self, split):
        raw = paths.data_dir() / "raw"
        what = f"torchvision.datasets.{self.dataset}(root={raw}, download=True)"
        if os.environ.get(DOWNLOAD_ENV) != "1":
            return None, [f"{what} (off: set {DOWNLOAD_ENV}=1 to download)"]
        import torchvision.datasets
        try:
            getattr(torchvision.datasets, self.dataset)(root=str(raw), download=True, **self.split_kwargs[split])
        except (OSError, RuntimeError) as e:   # URLError is an OSError
            return None, [f"{what} (failed: {e})"]
        return self.reader.locate(split)

    def read(self, place, split):
        return self.reader.read(place, split)
