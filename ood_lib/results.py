"""Results files of a profile (STUDY §6), all written atomically:

* ``results/<profile>/metrics.csv``     notebook, seed, model, epoch, detector, id_set, ood_set, metric, value
* ``results/<profile>/timings.csv``     notebook, stage, seconds, device, cached
* ``results/<profile>/provenance.json`` per notebook: git commit, package versions, device, the machine (processor,
                                        PyTorch's CPU capability, math libraries, threads: ``machine_info``),
                                        data checksums, profile parameters, seeds, time.

Re-running a notebook replaces its own rows and entries, never another notebook's.

Nothing lost, nothing silently wrong:

* **One lock per profile.** Every read-modify-write of these files holds ``results/<profile>/.lock``
  (``fcntl.flock``, exclusive; re-entrant within a process), so two runners on one profile never drop each
  other's rows. Code that adds another results file reuses it::

      with results.locked(profile):                       # results/<profile>/.lock
          old = results.read_csv_checked(path, columns)   # or None when absent; raises ResultsDamaged
          ...                                             # merge, then write through atomic_write

  or, for a CSV whose rows belong to notebooks, ``replace_rows(path, notebook, rows, columns)``, which does
  all of that (the lock of ``path``'s folder, the check, the merge, the atomic write). Taking the lock also
  removes stale leftovers of killed atomic writes (``.<name>.*.tmp``) from the folder.
* **Checked before use.** ``read_csv_checked`` parses a CSV strictly before any merge and in ``read_metrics``:
  the exact header, every row with as many fields as the header, numbers where numbers belong, a final
  newline (a file cut off mid-row). A damaged file raises ``ResultsDamaged`` naming the file, what is wrong,
  and the way out: move it aside and re-run the notebooks whose rows it held (they are listed). A file cut
  exactly at a line boundary cannot be told from a shorter one; only re-running tells.
* **provenance.json** that does not parse is moved aside to ``provenance.json.damaged-<time>`` with a warning,
  and a fresh one is started (it is a record, not an input: nothing downstream depends on the lost entries).
* **Timings of cached work.** A stage whose work only came from a cache is marked ``cached`` (the one column
  added to STUDY's four). ``Timer.stage`` decides it from ``progress.note_work``, which the training loop and the
  feature cache call: a stage that reused a finished run, a checkpoint or a cache entry and computed nothing
  is cached; ``stage(name, cached=...)`` or ``add(..., cached=...)`` say it explicitly. When a notebook's rows
  are replaced, a cached row never replaces an earlier real measurement of the same stage: that one is kept.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import subprocess
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from ood_lib.atomic import atomic_write, clean_stale_tmp
from ood_lib.features import eval_precision
from ood_lib.paths import PROJECT_ROOT, results_dir
from ood_lib.progress import WORK
from ood_lib.train import native_cpu_bf16, training_kernels, training_precision

try:
    import fcntl
except ImportError:  # not POSIX: a lock within the process only
    fcntl = None

METRIC_COLUMNS = ["notebook", "seed", "model", "epoch", "detector", "id_set", "ood_set", "metric", "value"]
TIMING_COLUMNS = ["notebook", "stage", "seconds", "device"]
CACHED_COLUMN = "cached"   # timings.csv: True when the stage's work only came from a cache
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "scikit-learn",
            "papermill", "pillow", "pyyaml")
LOCK_NAME = ".lock"

# What each column must hold: "int" or "float" (an empty field is allowed: NaN / no epoch), "bool", or text.
COLUMN_KINDS = {"seed": "int", "epoch": "int", "value": "float", "seconds": "float", CACHED_COLUMN: "bool"}


class ResultsDamaged(ValueError):
    """A results file that does not parse as what this module writes."""


# ----------------------------------------------------------------------------------------------- the lock
_locks: dict[Path, list] = {}          # folder -> [threading.RLock, depth, fd]
_locks_guard = threading.Lock()


@contextmanager
def locked_folder(folder: Path):
    """Hold ``folder/.lock`` exclusively (``fcntl.flock``), re-entrant within this process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locks_guard:
        entry = _locks.setdefault(folder.resolve(), [threading.RLock(), 0, None])
    with entry[0]:
        if entry[1] == 0:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            entry[2] = fd
            clean_stale_tmp(folder)
        entry[1] += 1
        try:
            yield folder / LOCK_NAME
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                fd, entry[2] = entry[2], None
                os.close(fd)  # releases the flock


def locked(profile: str):
    """``with locked(profile):`` holds ``results/<profile>/.lock`` around a read-modify-write of a results file."""
    return locked_folder(results_dir(profile))


# ------------------------------------------------------------------------------------------ strict reading
def _way_out(path: Path, notebooks: list[str]) -> str:
    profile = path.parent.name
    if notebooks:
        again = (f"re-run the notebooks whose rows it held: {', '.join(notebooks)} "
                 f"(python -m ood_lib.reproduce --profile {profile} --notebooks {','.join(notebooks)})")
    else:
        again = f"re-run the profile's notebooks (python -m ood_lib.reproduce --profile {profile})"
    return (f"Nothing was written to it. Way out: move it aside (mv '{path}' '{path}.damaged') and {again}, "
            f"which rebuilds it")


def _field_problem(kind: str | None, text: str) -> str | None:
    """Why ``text`` cannot be a value of a column of ``kind`` (None when it can)."""
    if kind == "bool":
        return None if text in ("True", "False", "") else "not True or False"
    if kind is None or text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        return "not a number"
    if kind == "int" and not number.is_integer():
        return "not an integer"
    return None


def check_csv_text(text: str, path: Path, columns: list[str], optional: tuple[str, ...] = ()) -> None:
    """Raise ``ResultsDamaged`` unless ``text`` is a CSV with header ``columns`` (plus, at the end, any leading
    part of ``optional``) and well-formed rows (see the module docstring)."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    notebooks = sorted({r[0] for r in rows[1:] if r and re.fullmatch(r"[\w.-]+", r[0])})

    def fail(problem: str):
        raise ResultsDamaged(f"{path} is damaged: {problem}. {_way_out(path, notebooks)}.")

    if not text:
        fail("it is empty (0 bytes)")
    header = rows[0]
    allowed = [columns + list(optional[:i]) for i in range(len(optional) + 1)]
    if header not in allowed:
        fail(f"its header is {header}, expected {columns}" + (f" (optionally followed by {list(optional)})"
                                                              if optional else ""))
    if not text.endswith("\n"):
        fail(f"it does not end with a newline: its last line ({len(rows)}) was cut off")
    kinds = [COLUMN_KINDS.get(c) for c in header]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            fail(f"line {line} has {len(row)} field(s), expected {len(header)}: {','.join(row)[:120]!r}")
        for column, kind, value in zip(header, kinds, row):
            problem = _field_problem(kind, value)
            if problem:
                fail(f"line {line}, column {column!r}: {value[:40]!r} is {problem}")


def read_csv_checked(path: Path, columns: list[str], optional: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """The CSV at ``path`` as a DataFrame (text kept as text, empty fields as ""), None when it does not exist;
    raises ``ResultsDamaged`` when it is not well-formed (``check_csv_text``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResultsDamaged(f"{path} is damaged: it is not UTF-8 text ({e}). {_way_out(path, [])}.") from None
    check_csv_text(text, path, columns, optional)
    return pd.read_csv(io.StringIO(text), dtype={"notebook": str}, keep_default_na=False)


def replace_rows(path: Path, notebook: str, new: pd.DataFrame, columns: list[str], optional: tuple[str, ...] = (),
                 merge=None) -> pd.DataFrame:
    """Replace ``notebook``'s rows of the CSV at ``path`` by ``new`` (its ``columns`` and present ``optional``
    ones), under the lock of ``path``'s folder, after checking the old file. ``merge(old_rows, new)``, if
    given, returns the rows to write for this notebook from its old rows and the new ones."""
    path = Path(path)
    out_columns = columns + [c for c in optional if c in new.columns]
    new = new[out_columns].copy()
    new["notebook"] = notebook
    with locked_folder(path.parent):
        old = read_csv_checked(path, columns, optional)
        if old is not None:
            for c in out_columns:
                if c not in old.columns:
                    old[c] = ""
            mine = old["notebook"] == notebook
            rows = new if merge is None else merge(old[mine], new)
            merged = pd.concat([old[~mine], rows], ignore_index=True)
        else:
            merged = new if merge is None else merge(new.iloc[:0], new)
        _atomic_write_text(path, merged.to_csv(index=False))
    return merged


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------ metrics
def write_metrics(profile: str, notebook: str, rows: pd.DataFrame) -> Path:
    """Replace ``notebook``'s rows of metrics.csv by ``rows`` (extra columns are dropped)."""
    path = results_dir(profile) / "metrics.csv"
    rows = rows.copy()
    rows["epoch"] = rows["epoch"].map(lambda e: "" if pd.isna(e) or e == "" else int(e))
    replace_rows(path, notebook, rows, METRIC_COLUMNS)
    return path


def read_metrics(profile: str) -> pd.DataFrame:
    """metrics.csv of ``profile``, checked (``ResultsDamaged`` when damaged; FileNotFoundError when absent)."""
    path = results_dir(profile) / "metrics.csv"
    out = read_csv_checked(path, METRIC_COLUMNS)
    if out is None:
        raise FileNotFoundError(f"{path} does not exist: no notebook has written metrics for profile {profile!r}")
    return out


# ------------------------------------------------------------------------------------------------ timings
def device_name(device: torch.device | str) -> str:
    """The GPU's name, or on the CPU its model, the instruction set of PyTorch's kernels (" bf16" where oneDNN has
    bf16 kernels: ``train.native_cpu_bf16``; " bf16+AMX" where the CPU has AMX-bf16 too: ``cpu_bf16_units``) and the
    thread count, e.g. "cpu (AMD EPYC, AVX2, 2 threads)", "cpu (Intel Xeon, AVX512 bf16+AMX, 2 threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    kernels = torch.backends.cpu.get_cpu_capability()
    if native_cpu_bf16():
        kernels += " bf16+AMX" if "amx_bf16" in cpu_bf16_units() else " bf16"
    return f"cpu ({cpu_model()}, {kernels}, {torch.get_num_threads()} threads)"


@dataclass
class Stage:
    """What ``Timer.stage`` yields: set ``cached`` to True/False to override the automatic decision."""
    name: str
    cached: bool | None = None


def _keep_real_measurements(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """New rows, except that a cached row gives way to the earlier real measurement of the same stage (matched
    by stage name and occurrence)."""
    old = old.copy()
    old[CACHED_COLUMN] = old[CACHED_COLUMN].map(lambda v: str(v) == "True")
    real: dict[tuple[str, int], pd.Series] = {}
    seen: dict[str, int] = {}
    for _, row in old.iterrows():
        k = seen[row["stage"]] = seen.get(row["stage"], -1) + 1
        if not row[CACHED_COLUMN]:
            real[(row["stage"], k)] = row
    out, seen = [], {}
    for _, row in new.iterrows():
        k = seen[row["stage"]] = seen.get(row["stage"], -1) + 1
        earlier = real.get((row["stage"], k))
        out.append(earlier if bool(row[CACHED_COLUMN]) and earlier is not None else row)
    return pd.DataFrame(out, columns=new.columns).reset_index(drop=True)


class Timer:
    """Collects (stage, seconds, cached) of one notebook; ``save()`` replaces that notebook's rows of timings.csv,
    keeping an earlier real measurement of a stage where the new one is only a cache reload."""

    def __init__(self, profile: str, notebook: str, device: torch.device | str):
        self.profile, self.notebook, self.device = profile, notebook, device_name(device)
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, name: str, cached: bool | None = None):
        """Time the block. ``cached`` None: decided from ``progress.note_work`` (reused something, computed nothing)."""
        info = Stage(name, cached)
        before = dict(WORK)
        t0 = time.perf_counter()
        yield info
        seconds = time.perf_counter() - t0
        if info.cached is None:
            info.cached = WORK["reused"] > before["reused"] and WORK["computed"] == before["computed"]
        self.add(name, seconds, cached=info.cached)

    def add(self, name: str, seconds: float, cached: bool = False) -> None:
        self.rows.append({"notebook": self.notebook, "stage": name, "seconds": round(seconds, 3),
                          "device": self.device, CACHED_COLUMN: bool(cached)})

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=TIMING_COLUMNS + [CACHED_COLUMN])

    def save(self) -> Path:
        path = results_dir(self.profile) / "timings.csv"
        replace_rows(path, self.notebook, self.table(), TIMING_COLUMNS, (CACHED_COLUMN,),
                     merge=_keep_real_measurements)
        return path


# --------------------------------------------------------------------------------------------- provenance
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


# The values torch.backends.cpu.get_cpu_capability() returns (its docstring; "ZVECTOR" and the SVE widths in some
# releases): the instruction set of the vectorised kernels that ATen picked at start-up (ATEN_CPU_CAPABILITY lowers it).
CPU_CAPABILITIES = ("DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "ZVECTOR", "SVE", "SVE128", "SVE256",
                    "SVE512")
# Environment variables that change the threads or the arithmetic of the math libraries, recorded when set.
MATH_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_CBWR",
            "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CUBLAS_WORKSPACE_CONFIG")


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


# The CPU's bf16 units, either of which oneDNN's bf16 kernels may use. cpu_capability does not tell them apart ("AVX512"
# on both), but the arithmetic differs: cifar10-cpu's seed 1 trained to other base weights on a Xeon with AMX than on
# one with avx512_bf16 only (same code, torch, oneDNN and threads; 2026-12-06).
BF16_UNITS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_units(cpuinfo: str | None = None) -> list[str]:
    """Which of ``BF16_UNITS`` this CPU has: from ``torch.cpu.get_capabilities`` where PyTorch has it, else from the
    flags of /proc/cpuinfo (``cpuinfo`` is its text: read when None), else []."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if cpuinfo is None and get is not None:
        try:
            caps = get()
            return [u for u in BF16_UNITS if caps.get(u)]
        except RuntimeError:
            pass
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    flags = next((set(line.partition(":")[2].split()) for line in cpuinfo.splitlines()
                  if line.partition(":")[0].strip() == "flags"), set())
    return [u for u in BF16_UNITS if u in flags]


def cpu_model(cpuinfo: str | None = None) -> str:
    """The processor's model name: the first "model name" of /proc/cpuinfo on Linux (or "cpu model", "Hardware",
    "Model", "cpu" where the architecture names it so), else ``platform.processor()``, else the machine type.
    ``cpuinfo`` is the text of /proc/cpuinfo (read when None)."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "cpu model", "Hardware", "Model", "cpu"):
        if key in fields:
            return fields[key]
    return platform.processor() or platform.machine() or "unknown"


def parse_torch_config(text: str) -> dict:
    """The math libraries in ``torch.__config__.show()``'s text: the BLAS and LAPACK backends, the MKL, oneDNN and
    OpenBLAS versions (None where the build does not name one), OpenMP, and the highest CPU capability compiled in;
    ``math_library`` sums them up in one string, e.g. "BLAS mkl (MKL 2024.2), oneDNN 3.12.0"."""
    def find(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None

    out = {
        "blas": find(r"BLAS_INFO=([^,\s]+)"),
        "lapack": find(r"LAPACK_INFO=([^,\s]+)"),
        "mkl_version": find(r"Math Kernel Library Version ([0-9][\w.]*)"),
        "onednn_version": find(r"(?:MKL-DNN|oneDNN)\s+v?([0-9][\w.]*)"),
        "openblas_version": find(r"OpenBLAS[^0-9\n]*([0-9]+\.[0-9]+(?:\.[0-9]+)?)"),
        "openmp": find(r"OpenMP (\d+)"),
        "compiled_cpu_capability": find(r"CPU capability usage: ([^\n]+)"),
    }
    blas = out["blas"] or "unknown"
    version = out["mkl_version"] if blas == "mkl" else out["openblas_version"] if blas.startswith("open") else None
    summary = f"BLAS {blas}" + (f" ({'MKL' if blas == 'mkl' else 'OpenBLAS'} {version})" if version else "")
    if out["onednn_version"]:
        summary += f", oneDNN {out['onednn_version']}"
    out["math_library"] = summary
    return out


def machine_info() -> dict:
    """What CPU results depend on beyond the code and the data: the processor, the instruction set of PyTorch's
    vectorised kernels and the CPU's bf16 units, the math libraries (BLAS/LAPACK, MKL, oneDNN) and the thread counts."""
    info = {
        "processor": cpu_model(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_cpu_bf16(),
        "cpu_bf16_units": cpu_bf16_units(),
        "mkl_available": torch.backends.mkl.is_available(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "openmp_available": torch.backends.openmp.is_available(),
        **parse_torch_config(torch.__config__.show()),
    }
    info["env"] = {k: os.environ[k] for k in MATH_ENV if k in os.environ}
    return info


def read_provenance(path: Path) -> dict:
    """provenance.json as a dict ({} when absent). One that does not parse (or is not a JSON object) is moved
    aside to ``provenance.json.damaged-<time>`` with a warning, and {} returned. Call it under the lock."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        return doc
    except ValueError as e:   # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        os.replace(path, aside)
        warnings.warn(f"{path} is damaged ({e}); moved aside to {aside.name} and started afresh. The provenance of "
                      f"the notebooks it held comes back when they run again.", stacklevel=2)
        return {}


def precision(profile, device) -> dict:
    """What training and evaluation of ``profile`` run in on ``device`` (provenance and shard manifests)."""
    device = torch.device(device)
    return {"training": training_precision(profile.train, device), "evaluation": eval_precision(device),
            "training_kernels": training_kernels(device)}


def write_provenance(profile, notebook: str, device: torch.device | str, data_checksums: dict[str, str],
                     extra: dict | None = None) -> Path:
    """Set ``notebook``'s entry of provenance.json (``profile`` is a ``config.Profile``)."""
    path = results_dir(profile.name) / "provenance.json"
    entry = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "device": device_name(device),
        "precision": precision(profile, device),
        "machine": machine_info(),
        "profile": profile.to_dict(),
        "seeds": list(profile.seeds),
        "data_checksums": data_checksums,
        **(extra or {}),
    }
    with locked_folder(path.parent):
        doc = read_provenance(path)
        doc[notebook] = entry
        _atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True, default=str))
    return path
