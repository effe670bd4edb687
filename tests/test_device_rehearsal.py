"""The device rehearsal (issue 18): the working tree laid out the way a lent GPU machine receives it, and the
commands that machine runs, here on the CPU at tiny overrides.

What the device machine has, and so all this test gives the commands:
  * the tracked (and untracked, not ignored) files of the checkout and the carried ``.device/`` (data and the
    authors' checkpoints, from ``scripts/device_data.sh``); no ``../shared``, no ``.venv``, nothing pip-installed;
  * its own Python with torch, torchvision, numpy, pandas, PyYAML, Pillow and tqdm (and what they require):
    here this environment's interpreter started with ``-S`` (no site-packages) and a folder holding links to only
    those distributions, so ``ood_lib``, papermill, submitit, Jupyter are NOT importable from outside the tree;
  * a bare HOME and its own temporary folder.
Every shard kind of the ``cifar10`` study (notebooks 01-04 and 06) must come back as bundles that ``--merge``
accepts, and ``benchmarks/gpu_study.py --quick`` (with its worker processes) must run.
"""
import importlib.metadata as md
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ood_lib import execute, shards
from ood_lib import stages as stages_mod
from ood_lib.config import load_profile
from ood_lib.paths import PROJECT_ROOT

DEVICE_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "PyYAML", "pillow", "tqdm")

# cifar10 shrunk: 2 epochs on 64 images of a tiny net; notebook 06 fine-tunes the authors' DenseNet-BC-100 once, on
# the same 64 images. The DenseNet rows are most of this test's time, and ODIN's backward passes over every
# evaluation set much of theirs (2/3 of paper_start's): those sets are kept small (32 ID test, 16 ID-val and 16 per
# OOD set)
TINY = {"data.train_size": 64, "data.id_val_size": 16, "data.id_test_size": 32, "data.ood_size": 16,
        "data.ood_sets": ["tinyimagenet32", "mnist"],
        "model.arch": "resnet_small", "model.options": {"width": 4, "blocks": [1, 1, 1]}, "train.epochs": 2,
        "train.batch_size": 32, "eval.detectors": ["msp", "energy", "odin"], "eval.batch_size": 128,
        "um.epochs": 1, "um.atypical_remove": 10, "um.curve_images": 32, "um.curve_keep": [1.0, 0.965],
        "um.gamma_sweep": [], "line.sweep_p_a": [0, 90], "line.sweep_p_w": [0, 90],
        "line.sweep_tau_percentiles": [90, 100], "seeds": [0], "threads": 2}

def _distributions(names) -> list[md.Distribution]:
    """The named distributions and everything they require (markers other than extras are not evaluated: a
    requirement that is not installed here, e.g. Windows-only, is skipped)."""
    seen, out, todo = set(), [], list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        out.append(dist)
        todo += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
    return out


def device_site(folder: Path) -> Path:
    """A folder of links to the top-level modules of the device image's packages only."""
    folder.mkdir(parents=True)
    for dist in _distributions(DEVICE_PACKAGES):
        for f in dist.files or []:
            top = f.parts[0]
            if top.endswith((".dist-info", ".egg-info", ".pth")) or top in ("..", "__pycache__", "bin"):
                continue
            src, dst = Path(dist.locate_file(top)), folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return folder


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """The device machine's tree and environment, once for this module: (repo, env)."""
    data_root = os.environ.get("OOD_DATA_ROOT", str(PROJECT_ROOT.parent / "shared" / "data"))
    made = subprocess.run(["bash", "scripts/device_data.sh"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OOD_DATA_ROOT": data_root})
    assert made.returncode == 0, f"scripts/device_data.sh failed:\n{made.stdout}\n{made.stderr}"
    root = tmp_path_factory.mktemp("device")
    repo = root / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = PROJECT_ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    shutil.copytree(PROJECT_ROOT / ".device", repo / ".device")
    assert not (root / "shared").exists() and not (repo / ".venv").exists()

    bin_dir, home, tmp = root / "bin", root / "home", root / "tmp"
    for d in (bin_dir, home, tmp):
        d.mkdir()
    python = bin_dir / "python3"  # the device's `python3`: this interpreter without any site-packages
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp), "LANG": "C.UTF-8",
           "PYTHONPATH": str(device_site(root / "site"))}
    return repo, env


def _python(env, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["python3", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_device_python_has_the_image_packages_and_nothing_else(device):
    repo, env = device
    ok = _python(env, "import torch, torchvision, numpy, pandas, yaml, PIL, tqdm; print(torch.__version__)", repo.parent)
    assert ok.returncode == 0, ok.stderr
    for absent in ("ood_lib", "papermill", "submitit", "nbclient", "pytest"):
        r = _python(env, f"import {absent}", repo.parent)  # outside the tree: only what the image has
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (absent, r.stdout, r.stderr)


def test_gpu_study_runs_with_its_workers(device):
    repo, env = device
    # one pool of two worker processes (the workers are what needs the repository root on their path)
    r = subprocess.run(["python3", "benchmarks/gpu_study.py", "--quick", "--processes", "2", "--epochs", "2"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es) sharing the device" in r.stdout, r.stdout
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # e.g. semaphores a terminated pool left behind


def test_every_shard_kind_comes_back_as_bundles_that_merge(device, tmp_path, machine):
    repo, env = device
    out = tmp_path / "out"
    sets = " ".join(f"--set={k}={json.dumps(v, separators=(',', ':'))}" for k, v in TINY.items())
    profile = load_profile("cifar10", TINY)
    bundles: dict[str, Path] = {}
    for own, reads in stages_mod.shard_plan(profile, 0):  # the README's device table, row by row
        stages = ",".join(own)
        inputs = [str(bundles[s]) for s in reads]
        if stages == "um,posthoc_um":  # the models-only command that precedes a row on a warm machine
            r = subprocess.run(["bash", "scripts/device_shard.sh", stages, "0", *inputs], cwd=repo, timeout=900,
                               env={**env, "OUT": str(out), "OOD_SET": sets, "MODELS_ONLY": "1"}, capture_output=True,
                               text=True)
            assert r.returncode == 0 and "model base seed 0: " in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
            assert "= the recorded one" in (out / "log-um-posthoc_um-seed0-models.txt").read_text()
            assert "model um " not in r.stdout  # um is computed by the row itself, not by its models-only command
            assert re.search(r"models of profile cifar10 in [\d.]+ s: [\d.]+ MB written, [\d.]+ MB at the peak",
                             r.stdout), r.stdout[-2000:]
            assert not (out / "cifar10__um__seed0.tar.gz").exists()
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "scripts/device_shard.sh", stages, "0", *inputs], cwd=repo,
                           env={**env, "OUT": str(out), "OOD_SET": sets}, capture_output=True, text=True, timeout=900)
        print(f"shard {stages}: {time.perf_counter() - t0:.1f} s")
        assert r.returncode == 0, f"shard {stages}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        # every shard says what it leaves on the machine's disk and the most it held at once
        assert re.search(r"shard\(s\) of profile cifar10 in [\d.]+ s: [\d.]+ MB written, [\d.]+ MB at the peak",
                         r.stdout), r.stdout[-2000:]
        for stage in stages.split(","):
            path = out / f"cifar10__{stage}__seed0.tar.gz"
            assert path.is_file(), f"shard {stages} wrote no bundle for {stage}:\n{r.stdout[-2000:]}"
            bundles[stage] = path
        assert (out / f"log-{stages.replace(',', '-')}-seed0.txt").is_file()
    assert sorted(bundles) == sorted(stages_mod.stages(profile))
    merged = machine("merged")  # this machine, where what came back is checked and merged
    shards.merge(profile, list(bundles.values()))
    assert {nb: shards.ready_seeds(profile, nb) for nb in ("01", "02", "03", "04", "06")} == dict.fromkeys(
        ("01", "02", "03", "04", "06"), [0])
    _notebook_06_reads_the_merged_paper_stages(merged, profile)


def _notebook_06_reads_the_merged_paper_stages(merged: Path, profile) -> None:
    """Notebook 06 on the merged bundles of the authors' checkpoint: every fine-tune starts from the checkpoint
    (its epoch 0 rows are the checkpoint itself), UM uses the authors' gamma, UM (ours) the one estimated here."""
    execute.run("cifar10", ["06"], TINY)  # the stages are merged: only the notebook runs
    assert not (merged / "results/cifar10/cache").exists()  # nothing was trained or scored here
    m = pd.read_csv(merged / "results/cifar10/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    assert set(m.model) == {"um_densenet_cifar10", "paper_um", "paper_um_ours", "paper_umap", "paper_ft_ce"}
    assert set(m[m.model == "um_densenet_cifar10"].epoch) == {0}
    acc = m[(m.model == "um_densenet_cifar10") & (m.metric == "id_acc")].value.iloc[0]
    assert acc > 0.6  # the authors' model on our JPEG CIFAR-10 (about 0.82 on the whole test set)
    hist = pd.read_csv(merged / "results/cifar10/06_training_history.csv")
    assert profile.um.paper_gamma == 0.15 and (hist[hist.model == "paper_um"].gamma == 0.15).all()
    ours = pd.read_csv(merged / "results/cifar10/06_gamma.csv")
    assert (hist[hist.model == "paper_um_ours"].gamma == ours["used"].iloc[0]).all() and ours["used"].iloc[0] > 0
    text = (merged / "results/cifar10/notebooks/06_paper_checkpoint.ipynb").read_text()
    assert "The README's relative change is -22.0%" in text


def test_the_authors_checkpoint_is_fine_tuned_for_its_seeds_only():
    """Notebook 06's stages run for ``um.paper_seeds`` only: with seeds 0 and 1, seed 1's shard plan has none."""
    p = load_profile("cifar10", {**TINY, "seeds": [0, 1]})
    paper = ["paper_start", "paper_gamma", "paper_um", "paper_um_ours", "paper_umap", "paper_ft_ce"]
    assert [n for n in stages_mod.stages(p) if n.startswith("paper_")] == paper and p.um.paper_seeds == (0,)
    planned = {seed: {n for own, _ in stages_mod.shard_plan(p, seed) for n in own} for seed in (0, 1)}
    assert set(paper) <= planned[0] and not set(paper) & planned[1]
    assert planned[1] == set(stages_mod.stages(p)) - set(paper)
