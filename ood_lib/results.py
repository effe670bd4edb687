"""Results files of a profile (STUDY §6), all written atomically:

* ``results/<profile>/metrics.csv``     notebook, seed, model, epoch, detector, id_set, ood_set, metric, value
* ``results/<profile>/timings.csv``     notebook, stage, seconds, device
* ``results/<profile>/provenance.json`` per notebook: git commit, package versions, device, data checksums,
                                        profile parameters, seeds, time.

Re-running a notebook replaces its own rows and entries, never another notebook's.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from ood_lib.atomic import atomic_write
from ood_lib.paths import PROJECT_ROOT, results_dir

METRIC_COLUMNS = ["notebook", "seed", "model", "epoch", "detector", "id_set", "ood_set", "metric", "value"]
TIMING_COLUMNS = ["notebook", "stage", "seconds", "device"]
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "scikit-learn",
            "papermill", "pillow", "pyyaml")


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _replace_rows(path: Path, notebook: str, new: pd.DataFrame, columns: list[str], keep=None) -> pd.DataFrame:
    new = new[columns].copy()
    new["notebook"] = notebook
    if path.exists():
        old = pd.read_csv(path, dtype={"notebook": str}, keep_default_na=False)
        drop = old["notebook"] == notebook
        if keep is not None:
            drop &= ~keep(old)
        merged = pd.concat([old[~drop], new], ignore_index=True)
    else:
        merged = new
    _atomic_write_text(path, merged.to_csv(index=False))
    return merged


def write_metrics(profile: str, notebook: str, rows: pd.DataFrame) -> Path:
    """Replace ``notebook``'s rows of metrics.csv by ``rows`` (extra columns are dropped)."""
    path = results_dir(profile) / "metrics.csv"
    rows = rows.copy()
    rows["epoch"] = rows["epoch"].map(lambda e: "" if pd.isna(e) or e == "" else int(e))
    _replace_rows(path, notebook, rows, METRIC_COLUMNS)
    return path


def read_metrics(profile: str) -> pd.DataFrame:
    return pd.read_csv(results_dir(profile) / "metrics.csv", dtype={"notebook": str}, keep_default_na=False)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Timer:
    """Collects (stage, seconds) of one notebook; ``save()`` replaces that notebook's rows of timings.csv."""

    def __init__(self, profile: str, notebook: str, device: torch.device | str):
        self.profile, self.notebook, self.device = profile, notebook, device_name(device)
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.rows.append({"notebook": self.notebook, "stage": name, "seconds": round(seconds, 3),
                          "device": self.device})

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TIMING_COLUMNS)

    def save(self) -> Path:
        path = results_dir(self.profile) / "timings.csv"
        _replace_rows(path, self.notebook, self.table(), TIMING_COLUMNS)
        return path


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_provenance(profile, notebook: str, device: torch.device | str, data_checksums: dict[str, str],
                     extra: dict | None = None) -> Path:
    """Set ``notebook``'s entry of provenance.json (``profile`` is a ``config.Profile``)."""
    path = results_dir(profile.name) / "provenance.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[notebook] = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "device": device_name(device),
        "profile": profile.to_dict(),
        "seeds": list(profile.seeds),
        "data_checksums": data_checksums,
        **(extra or {}),
    }
    _atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True, default=str))
    return path
