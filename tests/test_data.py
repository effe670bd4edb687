"""The dataset registry: real offline sets, the cache, checks, error messages, and generated fixtures in
each on-disk format the registry reads (for the sets that cannot be had on the study machines)."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import shutil
import struct
import sys
import tarfile
import types
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ood_lib import paths
from ood_lib.data import sources
from ood_lib.data import (DATASETS, AnimalMnistPickles, CifarPickles, DatasetCorrupt, DatasetMissing, IdxFiles,
                          ImageArrays, ImageFolder, SvhnMat, TarImageFolder, TorchvisionDownload, array_checksum,
                          load_dataset)

STUDY_NAMES = {"fashion_mnist", "mnist", "animal_mnist", "cifar10", "cifar100", "svhn", "tinyimagenet32",
               "textures", "lsun", "lsun_resize", "isun", "places365"}
RNG = np.random.default_rng(0)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty data root (OOD_DATA_ROOT) and data dir (OOD_DATA_DIR), downloads off."""
    root, ddir = tmp_path / "root", tmp_path / "datadir"
    root.mkdir()
    monkeypatch.setenv("OOD_DATA_ROOT", str(root))
    monkeypatch.setenv("OOD_DATA_DIR", str(ddir))
    monkeypatch.delenv("OOD_DOWNLOAD", raising=False)
    return types.SimpleNamespace(root=root, ddir=ddir)


def spec_like(name, sources, counts, **kw):
    """A registry entry with its sources and counts replaced: how tests point a spec at a small fixture."""
    return dataclasses.replace(DATASETS[name], sources=tuple(sources), counts=counts, class_counts={}, **kw)


@pytest.fixture
def real_data_root(data_root):
    """The raw-data root by the Makefile's rule (conftest's ``data_root``): OOD_DATA_ROOT when set, else
    ../shared/data when it exists."""
    assert paths.data_root() == data_root
    return data_root


def load_real(name, split):
    """A real set, found wherever the library looks (use with ``real_data_root``); skipped, with every place
    looked, only when it is nowhere."""
    try:
        return load_dataset(name, split)
    except DatasetMissing as e:
        pytest.skip(f"{name} is not installed here (run `make data`, or set OOD_DATA_ROOT): {e}")


# ---------------------------------------------------------------- registry and API
def test_registry_has_every_study_name():
    assert set(DATASETS) == STUDY_NAMES
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.sources and spec.hint
        assert spec.ood_split in spec.splits
    assert DATASETS["tinyimagenet32"].ood_split == "val"


def test_unknown_name_or_split_lists_the_allowed_names():
    with pytest.raises(ValueError) as e:
        load_dataset("cifar11", "test")
    assert all(name in str(e.value) for name in STUDY_NAMES)
    with pytest.raises(ValueError) as e:
        load_dataset("tinyimagenet32", "test")
    assert "val" in str(e.value) and "tinyimagenet32" in str(e.value)


def test_subset_recomputes_the_checksum():
    x, y = RNG.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8), np.arange(10, dtype=np.int64)
    full = ImageArrays(x, y, "toy", "test", array_checksum(x, y))
    sub = full.subset(np.array([1, 3, 5]))
    assert sub.x.shape == (3, 4, 4, 1) and list(sub.y) == [1, 3, 5] and len(sub) == 3
    assert sub.checksum == array_checksum(x[[1, 3, 5]], y[[1, 3, 5]]) != full.checksum


# ---------------------------------------------------------------- the real offline sets
@pytest.mark.parametrize("name, first_train", [("fashion_mnist", [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]),
                                               ("mnist", [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])])
def test_real_idx_sets(name, first_train, real_data_root):
    train, test = load_real(name, "train"), load_real(name, "test")
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert list(train.y[:10]) == first_train
    assert train.checksum == array_checksum(train.x, train.y)
    if name == "mnist":
        assert list(test.y[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
        assert list(np.bincount(test.y)) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        assert abs(train.x.mean() / 255 - 0.1307) < 1e-3
    else:
        assert list(np.bincount(test.y)) == [1000] * 10
        assert abs(train.x.mean() / 255 - 0.2860) < 1e-3


def test_real_animal_mnist(real_data_root):
    a = load_real("animal_mnist", "test")
    assert a.x.shape == (10000, 28, 28, 1) and list(np.bincount(a.y)) == [1000] * 10
    assert list(a.y[995:1005]) == [0] * 5 + [1] * 5


def test_shared_colour_sets(real_data_root):
    c = load_real("cifar10", "test")
    assert c.x.shape == (10000, 32, 32, 3) and list(np.bincount(c.y)) == [1000] * 10
    t = load_real("tinyimagenet32", "val")
    assert t.x.shape == (10000, 32, 32, 3) and len(np.unique(t.y)) == 200


def test_isun_is_the_odin_archive_pinned_by_its_checksum(real_data_root):
    """iSUN (ODIN's release, one of the papers' OOD sets): 8,925 unlabelled 32x32 RGB images, read from the archive
    whose SHA-256 the registry pins (../shared/data/MANIFEST.md)."""
    from ood_lib.data.registry import SHARED_ARCHIVE_SHA256
    assert SHARED_ARCHIVE_SHA256["iSUN.tar.gz"] == "74c2d220910a65b495611601170a46fc093c26c543d66f7b843ef72954636ecc"
    tar = [s for s in DATASETS["isun"].sources if isinstance(s, TarImageFolder)][0]
    assert tar.sha256["iSUN.tar.gz"] == SHARED_ARCHIVE_SHA256["iSUN.tar.gz"]
    a = load_real("isun", "test")
    assert a.x.shape == (8925, 32, 32, 3) and a.x.dtype == np.uint8 and (a.y == -1).all()
    assert 60 < a.x.mean() < 200 and a.x.std() > 20  # real pictures, not blank
    assert DATASETS["isun"].ood_split == "test" and DATASETS["isun"].num_classes is None


# ---------------------------------------------------------------- IDX fixtures: cache, corruption
def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n=(12, 6), gz=False) -> dict:
    """train/t10k IDX files in `folder`; returns {stem: decompressed bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for prefix, count in zip(("train", "t10k"), n):
        x, y = RNG.integers(0, 256, (count, 28, 28), dtype=np.uint8), np.arange(count) % 10
        for stem, a in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            written[stem] = idx_bytes(a)
            (folder / (stem + ".gz" if gz else stem)).write_bytes(
                gzip.compress(written[stem]) if gz else written[stem])
    return written


def idx_spec(sha256=None, system=()):
    return spec_like("fashion_mnist", [IdxFiles(("fashion-mnist",), system, sha256 or {})],
                     {"train": 12, "test": 6})


def test_cache_round_trip(env):
    written = write_idx_set(env.root / "fashion-mnist")
    spec = idx_spec()
    first = spec.load("train")
    assert spec.cache_path("train") == env.ddir / "cache" / "fashion_mnist-train.npz"
    expected = np.frombuffer(written["train-images-idx3-ubyte"], np.uint8, offset=16).reshape(12, 28, 28, 1)
    assert np.array_equal(first.x, expected) and list(first.y) == list(np.arange(12) % 10)
    with np.load(spec.cache_path("train"), allow_pickle=False) as z:  # the cache file holds the IDX file's content
        assert z["x"].dtype == np.uint8 and np.array_equal(z["x"], expected)
        assert list(z["y"]) == list(np.arange(12) % 10) and str(z["checksum"]) == first.checksum
    for f in (env.root / "fashion-mnist").iterdir():   # the second load must come from the cache
        f.unlink()
    second = spec.load("train")
    assert np.array_equal(second.x, first.x) and np.array_equal(second.y, first.y)
    assert second.checksum == first.checksum == array_checksum(first.x, first.y)
    assert second.x.dtype == np.uint8 and second.y.dtype == np.int64


def test_corrupt_cache_is_detected_and_rebuilt(env):
    write_idx_set(env.root / "fashion-mnist")
    spec = idx_spec()
    good = spec.load("test")
    path = spec.cache_path("test")
    with np.load(path) as z:
        fields = dict(z)
    fields["x"] = fields["x"].copy()
    fields["x"][0, 0, 0, 0] ^= 1                       # content changed, stored checksum kept
    np.savez(path, **fields)
    with pytest.warns(UserWarning, match="checksum"):
        rebuilt = spec.load("test")
    assert rebuilt.checksum == good.checksum and np.array_equal(rebuilt.x, good.x)
    path.write_bytes(b"not an npz")                    # unreadable cache
    with pytest.warns(UserWarning, match="rebuilding"):
        assert spec.load("test").checksum == good.checksum


@pytest.mark.parametrize("gz", [False, True])
def test_flipped_byte_raises_corrupt_naming_the_file(env, gz):
    written = write_idx_set(env.root / "fashion-mnist", gz=gz)
    pinned = {stem: hashlib.sha256(b).hexdigest() for stem, b in written.items()}
    assert idx_spec(pinned).load("test").x.shape == (6, 28, 28, 1)   # the pins match the fixture
    stem = "t10k-labels-idx1-ubyte"
    flipped = bytearray(written[stem])
    flipped[10] ^= 0x01
    target = env.root / "fashion-mnist" / (stem + ".gz" if gz else stem)
    target.write_bytes(gzip.compress(bytes(flipped)) if gz else bytes(flipped))
    idx_spec(pinned).cache_path("test").unlink()
    with pytest.raises(DatasetCorrupt) as e:
        idx_spec(pinned).load("test")
    assert str(target) in str(e.value) and pinned[stem] in str(e.value)


def test_real_spec_rejects_a_fake_fashion_mnist(env):
    """The registry's own pinned hashes: a fake IDX file in OOD_DATA_ROOT is refused, not silently used."""
    folder = env.root / "fashion-mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((10000, 28, 28), np.uint8)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(10000) % 10))
    with pytest.raises(DatasetCorrupt) as e:
        load_dataset("fashion_mnist", "test")
    assert str(folder / "t10k-images-idx3-ubyte") in str(e.value) and "SHA-256" in str(e.value)


def test_count_and_shape_checks(env):
    write_idx_set(env.root / "fashion-mnist", n=(12, 5))
    with pytest.raises(DatasetCorrupt, match="5 images, expected 6"):
        idx_spec().load("test")


# ---------------------------------------------------------------- missing sets
def test_missing_set_names_the_set_every_place_and_the_command(env, tmp_path):
    with pytest.raises(DatasetMissing) as e:
        load_dataset("cifar100", "test")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "'cifar100'" in msg and "OOD_DOWNLOAD=1 python -m ood_lib.data --prepare cifar100" in msg
    assert str(env.root / "cifar-100-python") in msg and str(env.ddir / "raw" / "cifar-100-python") in msg
    assert msg.index(str(env.root)) < msg.index(str(env.ddir / "raw"))   # OOD_DATA_ROOT first

    system = tmp_path / "usr-share-datasets-fashion-mnist"
    with pytest.raises(DatasetMissing) as e:
        idx_spec(system=(system,)).load("train")
    msg = str(e.value)
    for place in (env.root / "fashion-mnist", env.ddir / "raw" / "fashion-mnist", system):
        assert str(place) in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_missing_animal_mnist_names_the_package(env):
    spec = spec_like("animal_mnist", [AnimalMnistPickles({}, package="no_such_animal_mnist_pkg")], {"test": 5})
    with pytest.raises(DatasetMissing) as e:
        spec.load("test")
    assert "no_such_animal_mnist_pkg" in str(e.value) and "make data" in str(e.value)
    assert str(env.root / "Animal_MNIST") in str(e.value)


def test_missing_without_data_root_says_it_is_unset(env, monkeypatch):
    monkeypatch.delenv("OOD_DATA_ROOT")
    with pytest.raises(DatasetMissing, match=r"\$OOD_DATA_ROOT \(not set\)") as e:
        load_dataset("tinyimagenet32", "val")
    assert "export OOD_DATA_ROOT=" in str(e.value)


# ---------------------------------------------------------------- generated fixtures per format
def write_cifar_pickle(path: Path, x: np.ndarray, labels: list, label_key: str, protocol=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"batch_label": "fixture", label_key: labels, "data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),
             "filenames": [f"img_{i}.png" for i in range(len(x))]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [v // 5 for v in labels]
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def test_cifar100_python_pickles(env):
    x = {s: RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 8), ("test", 4))}
    y = {"train": [99, 0, 5, 7, 42, 1, 2, 3], "test": [3, 98, 0, 10]}
    for split in x:
        write_cifar_pickle(env.root / "cifar-100-python" / split, x[split], y[split], "fine_labels")
    spec = spec_like("cifar100", DATASETS["cifar100"].sources, {"train": 8, "test": 4})
    for split in x:
        a = spec.load(split)
        assert np.array_equal(a.x, x[split]) and list(a.y) == y[split]


def test_cifar10_python_folder(env):
    folder = env.ddir / "raw" / "cifar-10-batches-py"   # where torchvision's downloader puts it
    parts = [RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for _ in range(5)]
    for i, part in enumerate(parts, 1):
        write_cifar_pickle(folder / f"data_batch_{i}", part, [i, 9 - i], "labels")
    write_cifar_pickle(folder / "test_batch", parts[0], [0, 1], "labels")
    spec = spec_like("cifar10", DATASETS["cifar10"].sources, {"train": 10, "test": 2})
    a = spec.load("train")
    assert np.array_equal(a.x, np.concatenate(parts)) and list(a.y) == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]


def test_pickles_with_other_globals_are_refused(env):
    folder = env.root / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(pickle.dumps({"data": sys.exit, "fine_labels": []}))
    spec = spec_like("cifar100", [CifarPickles("cifar-100-python", {"test": ("test",)}, "fine_labels")], {"test": 1})
    with pytest.raises(DatasetCorrupt, match="refusing"):
        spec.load("test")


def test_svhn_mat_label_10_means_zero(env):
    x = RNG.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    scipy.io.savemat(env.root / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10], [3]], np.uint8)})
    a = spec_like("svhn", [SvhnMat()], {"test": 5}).load("test")
    assert list(a.y) == [0, 1, 9, 0, 3]
    assert np.array_equal(a.x, x.transpose(3, 0, 1, 2))


def test_animal_mnist_pickles_hash_checked_before_unpickling(env):
    folder = env.root / "Animal_MNIST"
    folder.mkdir()
    x, y = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 9])
    files = {"animal_data_version_3.gz": gzip.compress(pickle.dumps(x)),
             "animal_label_version_3.gz": gzip.compress(pickle.dumps(y))}
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    pins = {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}
    a = spec_like("animal_mnist", [AnimalMnistPickles(pins)], {"test": 4}).load("test")
    assert np.array_equal(a.x[..., 0], x) and list(a.y) == [0, 1, 2, 9]

    evil = gzip.compress(pickle.dumps({"x": sys.exit}))
    (folder / "animal_data_version_3.gz").write_bytes(evil)
    spec = spec_like("animal_mnist", [AnimalMnistPickles(pins)], {"test": 4})
    spec.cache_path("test").unlink()
    with pytest.raises(DatasetCorrupt, match="SHA-256"):     # the pin fails first: nothing is unpickled
        spec.load("test")
    with pytest.raises(DatasetCorrupt, match="refusing"):    # unpinned, the unpickler still refuses globals
        spec_like("animal_mnist", [AnimalMnistPickles({})], {"test": 4}).load("test")
    assert DATASETS["animal_mnist"].sources[0].sha256 == {
        "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
        "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"}


def make_images(root: Path, layout: dict[str, list[np.ndarray]]) -> None:
    """PNG files root/<folder>/<i>.png from arrays (HxW gray or HxWx3)."""
    for folder, images in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(images):
            Image.fromarray(a).save(root / folder / f"{i:02d}.png")


def expected_32(a: np.ndarray) -> np.ndarray:
    im = Image.fromarray(a).convert("RGB")
    return np.asarray(im if im.size == (32, 32) else im.resize((32, 32), Image.BILINEAR))


def tar_folder(archive: Path, folder: Path, arcname: str) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)


@pytest.mark.parametrize("name", ["textures", "lsun", "isun", "places365"])
def test_ood_image_folder_and_its_tar_gz(env, name):
    spec = DATASETS[name]
    folder_src, tar_src = spec.sources
    root_name = folder_src.roots[0]
    layout = {"b_class": [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                          RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8)],   # resized to 32x32
              "a_class": [RNG.integers(0, 256, (32, 32), dtype=np.uint8)]}       # gray -> RGB
    make_images(env.root / root_name, layout)
    small = spec_like(name, spec.sources, {"test": 3})
    a = small.load("test")
    expected = np.stack([expected_32(layout["a_class"][0])] + [expected_32(im) for im in layout["b_class"]])
    assert a.x.shape == (3, 32, 32, 3) and np.array_equal(a.x, expected) and list(a.y) == [-1, -1, -1]

    pinned = [n for n in tar_src.archives if n in tar_src.sha256]  # iSUN: the shared archive's name is pinned
    if pinned:
        tar_folder(env.ddir / "raw" / pinned[0], env.root / root_name, root_name)
        small.cache_path("test").unlink()
        shutil.move(env.root / root_name.split("/")[0], env.ddir / "aside")
        with pytest.raises(DatasetCorrupt, match="SHA-256"):  # another archive under that name is refused
            small.load("test")
        (env.ddir / "raw" / pinned[0]).unlink()
        shutil.move(env.ddir / "aside", env.root / root_name.split("/")[0])
    unpinned = next(n for n in tar_src.archives if n not in tar_src.sha256)
    tar_folder(env.ddir / "raw" / unpinned, env.root / root_name, root_name)
    shutil.rmtree(env.root / root_name.split("/")[0])
    small.cache_path("test").unlink(missing_ok=True)
    b = small.load("test")
    assert np.array_equal(b.x, a.x) and b.checksum == a.checksum


def test_cifar10_layout_tar_gz_pinned_then_overridden(env):
    layout = {f"{c}": [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
              for c in ("truck", "airplane", "cat")}
    make_images(env.ddir / "tmp" / "cifar10" / "test", layout)
    tar_folder(env.root / "cifar10-jpeg.tar.gz", env.ddir / "tmp" / "cifar10", "./cifar10")
    with pytest.raises(DatasetCorrupt, match="SHA-256"):      # the registry pins the shared archive's hash
        spec_like("cifar10", DATASETS["cifar10"].sources, {"train": 6, "test": 6}).load("test")
    source = TarImageFolder(("cifar10-jpeg.tar.gz",), ("cifar10",), {"train": "train", "test": "test"})
    a = spec_like("cifar10", [source], {"train": 6, "test": 6}).load("test")
    assert list(a.y) == [0, 0, 1, 1, 2, 2]                    # airplane, cat, truck: sorted folder names
    assert np.array_equal(a.x[4], layout["truck"][0])


def test_tar_with_unsafe_member_is_refused(env):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, "PNG")
    with tarfile.open(env.root / "lsun.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("LSUN/../../evil.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(DatasetCorrupt, match="unsafe"):
        spec_like("lsun", [DATASETS["lsun"].sources[1]], {"test": 1}).load("test")


@pytest.mark.parametrize("name,folder", [("cifar10/test/cat/0.jpg", "cifar10/test"), ("cifar10/test2/cat/0.jpg",
                         "cifar10/test"), ("cifar10/test", "cifar10/test"), ("LSUN/a.png", "."), ("a.png", "."),
                         ("iSUN/iSUN_patches/a.jpeg", "iSUN"), ("x/iSUN/a.jpeg", "iSUN")])
def test_a_tar_member_is_under_a_folder_exactly_when_pathlib_says_so(name, folder):
    name, folder = PurePosixPath(name), PurePosixPath(folder)
    assert sources._under(name, folder) == (folder in name.parents)


def test_labeled_image_folder_on_disk(env):
    layout = {"n02": [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)],
              "n01": [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]}
    make_images(env.root / "tinyimagenet32" / "val", layout)
    spec = spec_like("tinyimagenet32", [ImageFolder(("tinyimagenet32",), {"val": "val"})], {"val": 3})
    a = spec.load("val")
    assert list(a.y) == [0, 0, 1] and np.array_equal(a.x[2], layout["n02"][0])


def test_torchvision_download_is_off_by_default_then_feeds_the_reader(env, monkeypatch):
    calls = []

    class FakeCIFAR100:   # stands in for torchvision.datasets.CIFAR100: writes the python folder into root
        def __init__(self, root, download, train):
            calls.append((root, download, train))
            write_cifar_pickle(Path(root) / "cifar-100-python" / ("train" if train else "test"),
                               np.zeros((2, 32, 32, 3), np.uint8), [4, 2], "fine_labels")

    fake_datasets = types.ModuleType("torchvision.datasets")
    fake_datasets.CIFAR100 = FakeCIFAR100
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setattr(sys.modules["torchvision"], "datasets", fake_datasets, raising=False)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)
    download = DATASETS["cifar100"].sources[-1]
    assert isinstance(download, TorchvisionDownload)
    spec = spec_like("cifar100", [download], {"train": 2, "test": 2})
    with pytest.raises(DatasetMissing, match="OOD_DOWNLOAD=1"):
        spec.load("test")
    assert calls == []
    monkeypatch.setenv("OOD_DOWNLOAD", "1")
    a = spec.load("test")
    assert calls == [(str(env.ddir / "raw"), True, False)] and list(a.y) == [4, 2]
