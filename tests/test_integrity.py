"""Nothing silently wrong, nothing lost: damaged checkpoints, cache entries and results files, two writers at once,
leftovers of killed writes, and timings of cached work (issue 11)."""
import io
import json
import multiprocessing
import os
import signal
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from ood_lib import results
from ood_lib.atomic import atomic_write, clean_stale_tmp
from ood_lib.config import TrainConfig, load_profile
from ood_lib.features import CHECKSUM_KEY, FeatureCache
from ood_lib.models import resnet_small
from ood_lib.train import HEADER_SIZE, CheckpointDamaged, load_epoch, read_checkpoint, train

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, crop_padding=2)


def _data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return resnet_small(num_classes=3, in_channels=1, width=4, blocks=(1, 1, 1))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 3-epoch run; tests copy it before damaging anything."""
    run = tmp_path_factory.mktemp("run") / "seed0"
    x, y = _data()
    train(_model(), x, y, CFG, seed=0, run_dir=run, device=CPU, log=lambda s: None)
    return run


@pytest.fixture
def run(trained_run, tmp_path):
    import shutil
    return shutil.copytree(trained_run, tmp_path / "seed0")


def _flip_bit(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _tensor_offset(path):
    """An offset inside the bytes of the fc weight of an epoch checkpoint (where a flip changes a weight)."""
    data = path.read_bytes()
    weights = torch.load(io.BytesIO(data[HEADER_SIZE:]), weights_only=True)
    raw = weights["fc.weight"].numpy().tobytes()
    offset = data.find(raw)
    assert offset > HEADER_SIZE
    return offset + len(raw) // 2


# ----------------------------------------------------------------------------------------------- checkpoints
def test_flipped_bit_in_an_epoch_checkpoint_stops_naming_the_file(run):
    path = run / "epoch_002.pt"
    good = load_epoch(_model(5), run, 2).fc.weight.clone()
    offset = _tensor_offset(path)
    _flip_bit(path, offset)
    # what PyTorch alone does with that file: loads it silently, with a different weight
    silently = torch.load(io.BytesIO(path.read_bytes()[HEADER_SIZE:]), weights_only=True)["fc.weight"]
    assert not torch.equal(silently, good)
    with pytest.raises(CheckpointDamaged) as e:
        load_epoch(_model(5), run, 2)
    message = str(e.value)
    assert str(path) in message and "SHA-256" in message
    assert f"rm -r '{run}'" in message and "\n" not in message
    load_epoch(_model(5), run, 1)  # the other epochs are untouched


@pytest.mark.parametrize("keep", [0, 50, HEADER_SIZE + 100, -1])
def test_truncated_epoch_checkpoint_stops_naming_the_file(run, keep):
    path = run / "epoch_003.pt"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(CheckpointDamaged, match=r"epoch_003\.pt is damaged.*Way out: remove the run folder"):
        load_epoch(_model(), run, 3)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_state_stops_the_resume_naming_the_file(run, damage):
    path = run / "state.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:
        _flip_bit(path, HEADER_SIZE + (path.stat().st_size - HEADER_SIZE) // 2)
    x, y = _data()
    with pytest.raises(CheckpointDamaged) as e:
        train(_model(), x, y, CFG, seed=0, run_dir=run, device=CPU, log=lambda s: None)
    assert str(path) in str(e.value) and "optimizer state" in str(e.value) and not isinstance(e.value, OSError)


def test_checkpoint_written_without_a_checksum_loads_with_a_warning(run, tmp_path):
    plain = {k: v.clone() for k, v in _model(3).state_dict().items()}
    torch.save(plain, run / "epoch_001.pt")  # how checkpoints were written before checksums
    with pytest.warns(UserWarning, match=r"epoch_001\.pt has no recorded checksum"):
        loaded = load_epoch(_model(), run, 1)
    assert torch.equal(loaded.fc.weight, plain["fc.weight"])
    (run / "epoch_002.pt").write_bytes(b"garbage that is no checkpoint at all")
    with pytest.raises(CheckpointDamaged, match="neither the checkpoint header"):
        load_epoch(_model(), run, 2)


def test_checkpoint_round_trip_is_exact(run):
    state = read_checkpoint(run / "state.pt", weights_only=False)
    weights = read_checkpoint(run / "epoch_003.pt")
    assert state["epoch"] == 3 and all(torch.equal(state["model"][k], v) for k, v in weights.items())


# --------------------------------------------------------------------------------------------- feature cache
def _arrays():
    rng = np.random.default_rng(0)
    return {"logits": rng.normal(size=(40, 10)).astype(np.float32),
            "features": rng.normal(size=(40, 16)).astype(np.float32)}


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip_data(path):
    data = path.read_bytes()
    _flip_bit(path, data.find(_arrays()["features"].tobytes()) + 100)  # inside the array: the zip CRC catches it


def _drop_key(path):
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files if k != "features"}
    np.savez(path, **kept)


def _wrong_shape(path):
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files}
    kept["logits"] = kept["logits"][:30]
    np.savez(path, **kept)


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_data, _drop_key, _wrong_shape, _empty])
def test_damaged_cache_entry_is_recomputed_with_a_warning(tmp_path, damage):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return _arrays()

    parts = {"what": "outputs", "weights": "w", "data": "d"}
    first = cache.get(parts, compute)
    path = cache.path(parts)
    damage(path)
    with pytest.warns(UserWarning, match=rf"feature cache entry {path}.* is damaged .*removed and recomputed"):
        again = cache.get(parts, compute)
    assert len(calls) == 2
    for k, v in first.items():
        np.testing.assert_array_equal(again[k], v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recomputed entry is sound: no second warning, no third compute
        third = cache.get(parts, compute)
    assert len(calls) == 2 and set(third) == {"logits", "features"}


def test_cache_entry_stores_its_checksum_and_old_entries_still_load(tmp_path):
    cache = FeatureCache(tmp_path)
    parts = {"k": 1}
    cache.get(parts, _arrays)
    with np.load(cache.path(parts)) as z:
        assert CHECKSUM_KEY in z.files
    np.savez(cache.path({"k": 2}), **_arrays())  # written before checksums existed
    out = cache.get({"k": 2}, lambda: pytest.fail("a sound old entry must not be recomputed"))
    np.testing.assert_array_equal(out["logits"], _arrays()["logits"])


# -------------------------------------------------------------------------------------------- results files
def _rows(notebook, n=3, value=0.5):
    return pd.DataFrame([{"notebook": notebook, "seed": s, "model": "base", "epoch": 1, "detector": "msp",
                          "id_set": "fashion_mnist", "ood_set": "mnist", "metric": "auroc", "value": value + s}
                         for s in range(n)])


@pytest.fixture
def results_env(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path))
    return tmp_path / "p"


@pytest.mark.parametrize("cut", ["mid-row", "mid-number", "header"])
def test_truncated_metrics_csv_stops_naming_the_file_and_the_notebooks(results_env, cut):
    results.write_metrics("p", "01", _rows("01"))
    results.write_metrics("p", "03", _rows("03", value=0.25))
    path = results_env / "metrics.csv"
    text = path.read_text()
    keep = {"mid-row": len(text) - 20, "mid-number": len(text) - 2, "header": 30}[cut]
    path.write_text(text[:keep])
    before = path.read_bytes()
    with pytest.raises(results.ResultsDamaged) as e:
        results.write_metrics("p", "04", _rows("04"))
    message = str(e.value)
    assert str(path) in message and "Way out" in message and "\n" not in message
    if cut != "header":
        assert "01, 03" in message and "--notebooks 01,03" in message
    assert path.read_bytes() == before  # nothing written over it
    with pytest.raises(results.ResultsDamaged):
        results.read_metrics("p")


@pytest.mark.parametrize("garble, problem", [
    ("01,0,base,1,msp,fashion_mnist,mnist,auroc\n", r"line 3 has 8 field\(s\), expected 9"),
    ("01,0,base,1,msp,fashion_mnist,mnist,auroc,0.5,extra\n", r"line 3 has 10 field\(s\)"),
    ("01,0,base,1,msp,fashion_mnist,mnist,auroc,0.5x\n", r"column 'value': '0.5x' is not a number"),
    ("01,zero,base,1,msp,fashion_mnist,mnist,auroc,0.5\n", r"column 'seed': 'zero' is not a number"),
    ("01,0,base,1.5,msp,fashion_mnist,mnist,auroc,0.5\n", r"column 'epoch': '1.5' is not an integer"),
])
def test_garbled_metrics_row_is_refused(results_env, garble, problem):
    results.write_metrics("p", "01", _rows("01", n=1))
    path = results_env / "metrics.csv"
    path.write_text(path.read_text() + garble)
    with pytest.raises(results.ResultsDamaged, match=problem):
        results.write_metrics("p", "02", _rows("02"))


def test_damaged_timings_csv_stops(results_env):
    t = results.Timer("p", "01", "cpu")
    t.add("train", 3.0)
    t.save()
    path = results_env / "timings.csv"
    path.write_text(path.read_text()[:-3])
    t2 = results.Timer("p", "02", "cpu")
    t2.add("x", 1.0)
    with pytest.raises(results.ResultsDamaged, match=r"timings\.csv is damaged.*--notebooks 01"):
        t2.save()


def test_old_timings_without_the_cached_column_still_merge(results_env):
    results_env.mkdir(parents=True)
    (results_env / "timings.csv").write_text("notebook,stage,seconds,device\n01,train,12.5,cpu\n")
    t = results.Timer("p", "02", "cpu")
    t.add("x", 1.0)
    t.save()
    timings = results.read_csv_checked(results_env / "timings.csv", results.TIMING_COLUMNS, ("cached",))
    assert list(timings.notebook) == ["01", "02"] and list(timings.seconds) == [12.5, 1.0]


def test_truncated_provenance_is_moved_aside_with_a_warning(results_env):
    profile = load_profile("smoke")
    profile = type(profile)(**{**profile.__dict__, "name": "p"})
    results.write_provenance(profile, "01", "cpu", {"a": "1"})
    path = results_env / "provenance.json"
    damaged = path.read_text()[:100]
    path.write_text(damaged)
    with pytest.warns(UserWarning, match=r"provenance\.json is damaged .*moved aside to provenance\.json\.damaged-"):
        results.write_provenance(profile, "02", "cpu", {"b": "2"})
    assert set(json.loads(path.read_text())) == {"02"}
    aside = list(results_env.glob("provenance.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == damaged


# ------------------------------------------------------------------------------------------------ concurrency
def _writer(root, tag, rounds, barrier):
    """Round i writes the rows of notebook <tag><i> to each of the three files (never replacing anything)."""
    os.environ["OOD_RESULTS_DIR"] = root
    profile = load_profile("smoke")
    profile = type(profile)(**{**profile.__dict__, "name": "p"})
    barrier.wait()
    for i in range(rounds):
        notebook = f"{tag}{i:02d}"
        results.write_metrics("p", notebook, _rows(notebook, n=2, value=float(i)))
        t = results.Timer("p", notebook, "cpu")
        t.add("stage", float(i))
        t.save()
        results.write_provenance(profile, notebook, "cpu", {"round": str(i)})


def test_two_concurrent_writers_lose_no_rows(results_env):
    ctx = multiprocessing.get_context("fork")
    rounds = 30
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(results_env.parent), tag, rounds, barrier)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    expected = sorted(f"{tag}{i:02d}" for tag in "ab" for i in range(rounds))
    m = results.read_metrics("p")
    assert sorted(m.notebook) == sorted(expected * 2)  # every row of every round of both writers
    assert all(sorted(m[m.notebook == nb]["value"]) == [int(nb[1:]), int(nb[1:]) + 1] for nb in expected)
    timings = pd.read_csv(results_env / "timings.csv", dtype={"notebook": str})
    assert sorted(timings.notebook) == expected
    assert sorted(json.loads((results_env / "provenance.json").read_text())) == expected
    assert not list(results_env.glob(".*.tmp"))


def test_lock_is_reentrant_and_excludes_other_processes(results_env):
    ctx = multiprocessing.get_context("fork")

    def try_lock(q):
        import fcntl
        fd = os.open(results_env / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            q.put("got it")
        except OSError:
            q.put("blocked")

    with results.locked("p"):
        with results.locked("p"):  # re-entrant: no deadlock
            q = ctx.Queue()
            p = ctx.Process(target=try_lock, args=(q,))
            p.start()
            p.join(60)
            assert q.get(timeout=10) == "blocked"
    q = ctx.Queue()
    p = ctx.Process(target=try_lock, args=(q,))
    p.start()
    p.join(60)
    assert q.get(timeout=10) == "got it"


# ------------------------------------------------------------------------------------ leftovers of killed writes
def _killed_write(path):
    with atomic_write(path, "w") as f:
        f.write("half of it")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def test_leftovers_of_killed_writes_are_cleaned(results_env):
    results.write_metrics("p", "01", _rows("01"))
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_killed_write, args=(results_env / "metrics.csv",))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    left = list(results_env.glob(".metrics.csv.*.tmp"))
    assert len(left) == 1
    results.write_metrics("p", "02", _rows("02"))
    assert left[0].exists()  # young: it could be a write in progress elsewhere
    old = time.time() - 3600
    os.utime(left[0], (old, old))
    results.write_metrics("p", "03", _rows("03"))
    assert not left[0].exists()
    assert sorted(set(results.read_metrics("p").notebook)) == ["01", "02", "03"]


def test_a_write_in_progress_is_never_taken_for_a_leftover(tmp_path):
    target = tmp_path / "x.bin"
    with atomic_write(target) as f:
        f.write(b"in progress")
        tmp = next(tmp_path.glob(".x.bin.*.tmp"))
        old = time.time() - 3600
        os.utime(tmp, (old, old))  # old, but its writer holds the lock
        assert clean_stale_tmp(tmp_path) == [] and tmp.exists()
    assert target.read_bytes() == b"in progress" and not tmp.exists()


def test_checkpoint_folder_leftovers_are_cleaned_by_the_next_save(tmp_path):
    import ood_lib.atomic as atomic
    leftover = tmp_path / ".epoch_001.pt.abc123.tmp"
    leftover.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    atomic._last_clean.pop(tmp_path, None)
    x, y = _data()
    train(_model(), x, y, TrainConfig(epochs=1, batch_size=16), seed=0, run_dir=tmp_path, device=CPU,
          log=lambda s: None)
    assert not leftover.exists()


# ---------------------------------------------------------------------------------------- timings of cached work
def test_a_cached_rerun_keeps_the_real_training_time(results_env, tmp_path):
    x, y = _data()
    cfg = TrainConfig(epochs=1, batch_size=16)

    def run_notebook():
        t = results.Timer("p", "01", "cpu")
        with t.stage("train"):
            train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "run", device=CPU, log=lambda s: None)
        with t.stage("plot"):  # no cache involved: always a real measurement
            pass
        t.save()
        return t.table()

    first = run_notebook()
    assert list(first.cached) == [False, False]
    second = run_notebook()
    assert list(second.cached) == [True, False]  # the run was only reloaded
    saved = results.read_csv_checked(results_env / "timings.csv", results.TIMING_COLUMNS, ("cached",))
    row = saved[saved.stage == "train"].iloc[0]
    assert row.seconds == first.seconds[0] != second.seconds[0] and row.cached in (False, "False")
    # a new real measurement does replace the old one
    t = results.Timer("p", "01", "cpu")
    t.add("train", 99.0, cached=False)
    t.save()
    saved = results.read_csv_checked(results_env / "timings.csv", results.TIMING_COLUMNS, ("cached",))
    assert list(saved.stage) == ["train"] and saved.seconds[0] == 99.0


def test_stage_decides_cached_from_the_feature_cache_or_is_told(results_env, tmp_path):
    cache = FeatureCache(tmp_path / "features")
    t = results.Timer("p", "04", "cpu")
    with t.stage("outputs"):
        cache.get({"k": 1}, _arrays)
    with t.stage("outputs"):
        cache.get({"k": 1}, _arrays)
    with t.stage("mixed"):
        cache.get({"k": 1}, _arrays)
        cache.get({"k": 2}, _arrays)
    with t.stage("told") as s:
        s.cached = True
    with t.stage("told again", cached=True):
        pass
    assert list(t.table().cached) == [False, True, False, True, True]
