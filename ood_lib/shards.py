"""Shards: the study's stages (``ood_lib.stages``) run seed by seed, on any machine, and merged into one study.

A shard is one (stage, seed) of a profile. Its tables are stored in

    results/<profile>/shards/<profile digest>/<stage>/seed<k>/   <table>.csv ... and manifest.json

The manifest is written last (so a folder without one is an interrupted shard, recomputed) and records the profile,
its digest, the code digest, the device, the seconds the stage took, the final weights digest of a model stage
and the SHA-256 of every table, which is checked whenever the tables are read back. The profile digest covers
every section that changes a number (data, model, train, eval, line, um, pretrained), not the seeds or the device:
editing the profile starts a new folder instead of mixing old and new tables.

A bundle is one shard folder packed as ``<profile>__<stage>__seed<k>.tar.gz`` (deterministic bytes; small final
weights travel beside it, never inside).
``merge`` puts bundles from other machines back into place after checking that they are complete and intact, of
this profile and digest, of one code version, and not duplicates of each other or of a different shard already
here. Notebooks then read the same tables whether the stages ran in their own kernel, in a shard command, on a
lent GPU or as cluster jobs; ``outputs(..., compute=False)`` never trains, it names the command to run instead.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
import torch

from ood_lib import stages as stages_mod
from ood_lib.atomic import atomic_write
from ood_lib.config import Profile
from ood_lib.paths import PROJECT_ROOT, cache_dir, results_dir
from ood_lib.results import device_name, git_commit, precision

FORMAT = 1
DIGEST_SECTIONS = ("data", "model", "train", "eval", "line", "um", "pretrained")
# Settings that only add stages (diagnostics), never change what a stage computes: left out of the digest, so that
# switching one on reuses every table already computed.
STAGE_SWITCHES = {"um": ("global_arm", "gamma_sweep")}
MANIFEST = "manifest.json"
# The final checkpoint of a model stage that other stages need travels beside its bundle, as
# ``<bundle stem>.weights.pt`` (git-ignored: weights are not results), when it is at most this large: the CPU
# profiles' nets (cifar10-cpu's ResNet-18 at width 24: 6.3 MB), not ResNet-18 (45 MB, more than a device run can
# bring back in one file). A model whose weights did not come is re-trained where needed and its digest compared.
WEIGHTS = "weights.pt"
WEIGHTS_MAX_BYTES = 8 * 2**20


class ShardError(RuntimeError):
    """A shard that is missing, damaged, or that cannot be merged; the message says which and what to do."""


def profile_digest(profile: Profile) -> str:
    """Short SHA-256 of what the stages' tables depend on: ``DIGEST_SECTIONS`` less ``STAGE_SWITCHES``."""
    d = profile.digest_dict()
    kept = {s: {k: v for k, v in d[s].items() if k not in STAGE_SWITCHES.get(s, ())} if isinstance(d[s], dict)
            else d[s] for s in DIGEST_SECTIONS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """The checkout's commit as this process first asked for it (the manifests' ``git_commit``)."""
    return git_commit()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the library's source files (path and content) as this process found them first: the code
    version a bundle was computed by."""
    h = hashlib.sha256()
    root = PROJECT_ROOT / "ood_lib"
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def root(profile: Profile) -> Path:
    return results_dir(profile.name) / "shards" / profile_digest(profile)


def shard_dir(profile: Profile, stage: str, seed: int) -> Path:
    return root(profile) / stage / f"seed{seed}"


def manifest(profile: Profile, stage: str, seed: int) -> dict | None:
    path = shard_dir(profile, stage, seed) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path} is damaged ({e}); remove {path.parent} to recompute the shard") from None


def done(profile: Profile, stage: str, seed: int) -> bool:
    return manifest(profile, stage, seed) is not None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read(profile: Profile, stage: str, seed: int) -> stages_mod.Tables:
    """The tables of a finished shard, each checked against the manifest's SHA-256."""
    m = manifest(profile, stage, seed)
    if m is None:
        raise ShardError(f"stage {stage!r} of seed {seed} has not run on profile {profile.name!r}")
    folder = shard_dir(profile, stage, seed)
    out = {}
    for name, digest in m["tables"].items():
        path = folder / f"{name}.csv"
        if not path.exists() or _sha256(path) != digest:
            raise ShardError(f"{path} is missing or does not match its manifest; remove {folder} to recompute the "
                             f"shard, or merge its bundle again")
        out[name] = _read_csv(path, m["text_columns"][name])
    return out


def _read_csv(path: Path, text: list[str]) -> pd.DataFrame:
    """A table as written: text columns as strings (an empty cell is "", e.g. ``detector`` of ``id_acc``), the
    others parsed (an empty cell is NaN)."""
    table = pd.read_csv(path, dtype={c: str for c in text})
    table[text] = table[text].fillna("")
    return table


def _write(profile: Profile, stage: str, seed: int, tables: stages_mod.Tables, info: dict) -> dict:
    folder = shard_dir(profile, stage, seed)
    folder.mkdir(parents=True, exist_ok=True)
    digests, text = {}, {}
    for name, table in sorted(tables.items()):
        path = folder / f"{name}.csv"
        with atomic_write(path, "w") as f:
            table.to_csv(f, index=False)
        digests[name] = _sha256(path)
        text[name] = [str(c) for c in table.columns if not (pd.api.types.is_numeric_dtype(table[c])
                                                             or pd.api.types.is_bool_dtype(table[c]))]
    m = {"format": FORMAT, "profile": profile.name, "profile_digest": profile_digest(profile),
         "config": {k: v for k, v in profile.to_dict().items() if k in DIGEST_SECTIONS},
         "code_digest": code_digest(), "git_commit": _git_commit(), "stage": stage, "seed": seed,
         "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__, **info, "tables": digests, "text_columns": text}
    with atomic_write(folder / MANIFEST, "w") as f:
        json.dump(m, f, indent=2, sort_keys=True, default=str)
    return m


def command(profile: Profile, stages: Iterable[str], seeds: Iterable[int], reads: Iterable[str] = (),
            bundle_dir: Path | str | None = None) -> str:
    """The shard command of ``stages``; ``reads``: the stages whose bundles (of each seed) it is given."""
    seeds = list(seeds)
    out = (f"python -m ood_lib.reproduce --profile {profile.name} --stages {','.join(stages)} "
           f"--seeds {','.join(str(s) for s in seeds)}")
    folder = Path(bundle_dir) if bundle_dir else Path("results") / profile.name / "bundles"
    if bundle_dir:
        out += f" --bundle-dir {folder}"
    bundles = [str(folder / bundle_name(profile, r, seed)) for seed in seeds for r in reads]
    return out + (f" --inputs {' '.join(bundles)}" if bundles else "")


def device_bundle(profile: Profile, stage: str, seed: int, bundle_dir: Path | str | None = None) -> Path:
    """Where a device command's bundle of (stage, seed) is named (``bundle_dir``, default results/<profile>/bundles,
    relative to the repository root)."""
    folder = Path(bundle_dir) if bundle_dir else Path("results") / profile.name / "bundles"
    return folder / bundle_name(profile, stage, seed)


def device_command(profile: Profile, stages: Iterable[str], seed: int, reads: Iterable[str] = (),
                   bundle_dir: Path | str | None = None, models_only: bool = False) -> str:
    """``command`` as run on a lent GPU machine (``scripts/device_shard.sh``: the carried data, bundles to $OUT);
    ``models_only``: the command that only re-trains the models the stages start from (MODELS_ONLY=1)."""
    bundles = [str(device_bundle(profile, r, seed, bundle_dir)) for r in reads]
    return " ".join(["MODELS_ONLY=1 " * models_only + "bash scripts/device_shard.sh", ",".join(stages), str(seed),
                     *bundles])


def shard_table(profile: Profile, seed: int = 0) -> str:
    """The shards of one seed (``stages.shard_plan``) as the README's markdown table."""
    plan = stages_mod.shard_plan(profile, seed)
    lines = ["| # | stages | reads the bundles of |", "|---|---|---|"]
    for i, (own, reads) in enumerate(plan, 1):
        lines.append(f"| {i} | `{','.join(own)}` | {', '.join(reads) or '-'} |")
    return "\n".join(lines)


class Runner:
    """Runs the stages of one profile in this process, each at most once per seed, reading tables back from disk."""

    def __init__(self, profile: Profile, log: Callable[[str], None] = print, allow_mixed_models: bool = False):
        self.profile = profile
        self.allow_mixed_models = allow_mixed_models  # go on when a re-trained model differs from the recorded one
        self.registry = stages_mod.stages(profile)
        self.ctx = stages_mod.Context(profile, log)
        self.log = log
        self._checked: dict[tuple[str, int], dict] = {}
        self._noted: set[tuple[str, int]] = set()
        code_digest(), _git_commit()  # the code this process runs: read now, not when a stage ends hours later

    def stage(self, name: str) -> stages_mod.Stage:
        if name not in self.registry:
            raise ShardError(f"profile {self.profile.name!r} has no stage {name!r}; its stages: {list(self.registry)}")
        return self.registry[name]

    def tables(self, name: str, seed: int, compute: bool = True) -> stages_mod.Tables:
        """The tables of (stage, seed): read back when done, else computed (after what it depends on). Tables that
        another version of the library computed are used as they are, with a note naming the folder to remove to
        recompute them (they may be the bundles of a GPU run, which this machine could not redo)."""
        m = manifest(self.profile, name, seed)
        if m is None:
            if not compute:
                raise ShardError(f"stage {name!r} of seed {seed} has not run on profile {self.profile.name!r}; run "
                                 f"`{command(self.profile, [name], [seed])}` (or merge its bundle)")
            self._compute(name, seed)
        elif m["code_digest"] != code_digest() and (name, seed) not in self._noted:
            self._noted.add((name, seed))
            self.log(f"note: stage {name} seed {seed} was computed by library version {m['code_digest']} (this is "
                     f"{code_digest()}); remove {shard_dir(self.profile, name, seed)} to recompute it")
        return read(self.profile, name, seed)

    def _compute(self, name: str, seed: int) -> None:
        stage = self.stage(name)
        for dep in stage.inputs:
            self.tables(dep, seed)
        models = {dep: self.model(dep, seed) for dep in stage.models}
        self.log(f"[stage {name} seed {seed}] on {device_name(self.ctx.device)} ...")
        t0 = time.perf_counter()
        tables = stage.compute(self.ctx, seed, lambda dep: self.tables(dep, seed))
        seconds = time.perf_counter() - t0
        info = {"seconds": round(seconds, 3), "device": device_name(self.ctx.device), "models_used": models,
                "precision": precision(self.profile, self.ctx.device),
                "inputs": {dep: manifest(self.profile, dep, seed)["tables"] for dep in stage.inputs}}
        if stage.digest is not None:
            info["final_digest"] = stage.digest(self.ctx, seed)
        weights = self._weights_to_carry(name, seed)
        if weights is not None:
            folder = shard_dir(self.profile, name, seed)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(folder / WEIGHTS) as f:
                f.write(weights)
            info["weights"] = hashlib.sha256(weights).hexdigest()
        _write(self.profile, name, seed, tables, info)
        self.log(f"[stage {name} seed {seed}] done in {seconds:.1f} s -> {shard_dir(self.profile, name, seed)}")

    def _weights_to_carry(self, name: str, seed: int) -> bytes | None:
        """The final checkpoint's bytes of a model stage that another stage of the profile needs, if small enough."""
        stage = self.stage(name)
        if stage.checkpoint is None or not any(name in s.models for s in self.registry.values()):
            return None
        path = stage.checkpoint(self.ctx, seed)
        if not path.exists() or path.stat().st_size > WEIGHTS_MAX_BYTES:
            return None
        return path.read_bytes()

    def _install_weights(self, name: str, seed: int) -> bool:
        """Put the final checkpoint a merged bundle carried where the stage's run keeps it; False if none came."""
        stage, m = self.stage(name), manifest(self.profile, name, seed)
        source = shard_dir(self.profile, name, seed) / WEIGHTS
        if stage.checkpoint is None or not m.get("weights") or not source.exists():
            return False
        data = source.read_bytes()
        if hashlib.sha256(data).hexdigest() != m["weights"]:
            raise ShardError(f"{source} does not match its manifest; merge the bundle of stage {name!r} seed {seed} "
                             "again")
        target = stage.checkpoint(self.ctx, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as f:
            f.write(data)
        self.log(f"[stage {name} seed {seed}] final weights from its bundle -> {target}")
        return True

    def model(self, name: str, seed: int) -> dict:
        """Make sure the trained model of stage ``name`` is on this machine (found, installed from its bundle's
        weights, or re-trained) and that its weights digest is the one the stage's manifest records; a different
        one raises ShardError unless ``allow_mixed_models``. Returns the digest, the recorded one and how it came."""
        key = (name, seed)
        if key in self._checked:
            return self._checked[key]
        stage = self.stage(name)
        if not done(self.profile, name, seed):
            self._compute(name, seed)
        recorded_by = manifest(self.profile, name, seed)
        recorded = recorded_by.get("final_digest")
        digest = stage.digest(self.ctx, seed)
        info = {"digest": digest, "recorded": recorded, "retrained": False}
        if digest is None and self._install_weights(name, seed):
            digest = stage.digest(self.ctx, seed)
            info.update(digest=digest, installed=True)
            if digest != recorded:
                raise ShardError(f"the weights in the bundle of stage {name!r} seed {seed} have digest {digest}, its "
                                 f"manifest records {recorded}; merge the bundle again")
        if digest is None:
            self.log(f"[stage {name} seed {seed}] its tables came from elsewhere; re-training its model here ...")
            for dep in stage.models:
                self.model(dep, seed)
            stage.train(self.ctx, seed, lambda dep: self.tables(dep, seed))
            digest = stage.digest(self.ctx, seed)
            if digest is None:
                raise ShardError(f"re-training stage {name!r} seed {seed} left no final checkpoint to check")
            info.update(digest=digest, retrained=True)
        if recorded is None:
            self.log(f"warning: the manifest of stage {name!r} seed {seed} records no weights digest, so its model "
                     "here cannot be checked against the one its tables were computed with")
        elif digest != recorded:
            said = (f"the {'re-trained ' * info['retrained']}{name} model of seed {seed} here differs from the one "
                    f"its tables were computed with (weights digest {digest[:12]} here, {recorded[:12]} recorded; "
                    f"trained on {recorded_by.get('device')} with {_kernels(recorded_by)} kernels)")
            if not self.allow_mixed_models:
                raise ShardError(
                    f"{said}. The stages that start from it would be refused by --merge (their seed's stages would "
                    f"disagree about its {name}), so this shard stops before computing them. Way out: remove "
                    f"{shard_dir(self.profile, name, seed)} and its model's run folder under "
                    f"{cache_dir(self.profile.name)}, then run {name} again in one command with the stages that need "
                    f"its weights; or pass --allow-mixed-models to compute them from these weights anyway (the merge "
                    f"then needs --allow-mixed-models too)")
            self.log(f"warning: {said}; --allow-mixed-models: the stages using it record this in their manifest")
        info["match"] = digest == recorded
        self._checked[key] = info
        return info


def _kernels(m: dict) -> str:
    """The kernels a shard's model was trained with: its manifest's record; before manifests recorded it (code
    before deterministic CUDA training), 'deterministic' on a CPU and 'nondeterministic' on anything else."""
    recorded = (m.get("precision") or {}).get("training_kernels")
    return recorded or ("deterministic" if str(m.get("device", "")).startswith("cpu") else "nondeterministic")


def outputs(profile: Profile, notebook: str, compute: bool = True,
            log: Callable[[str], None] = print) -> dict[str, dict[int, stages_mod.Tables]]:
    """``{stage: {seed: tables}}`` of every stage ``notebook`` reads, for every seed of the profile."""
    runner = Runner(profile, log)
    return {name: {seed: runner.tables(name, seed, compute) for seed in runner.registry[name].runs_for(profile)}
            for name in stages_mod.of_notebook(profile, notebook)}


def concat(by_seed: dict[int, stages_mod.Tables], table: str) -> pd.DataFrame:
    """One table of a stage over seeds (in the profile's seed order), with a ``seed`` column where it lacks one.
    Empty tables (a stage with nothing to do for a seed, e.g. UM at rule B without a late stage) are left out, so
    they never change a column's type."""
    frames = [t[table].assign(seed=seed) if "seed" not in t[table] else t[table] for seed, t in by_seed.items()]
    full = [f for f in frames if len(f)]
    return pd.concat(full or frames[:1], ignore_index=True)


def gather(runs: dict[str, dict[int, stages_mod.Tables]], names: Iterable[str], table: str) -> pd.DataFrame:
    """``concat`` of one table over several stages (in the order of ``names``), empty ones left out."""
    frames = [concat(runs[name], table) for name in names]
    full = [f for f in frames if len(f)]
    return pd.concat(full or frames[:1], ignore_index=True)


def timing_rows(profile: Profile, notebook: str, seeds: Iterable[int]) -> list[dict]:
    """timings.csv rows of the stages a notebook reads: the seconds each took where it was computed, and on what."""
    rows = []
    for name in stages_mod.of_notebook(profile, notebook):
        for seed in seeds:
            m = manifest(profile, name, seed)
            if m is not None:
                rows.append({"notebook": notebook, "stage": f"stage {name} seed {seed}", "seconds": m["seconds"],
                             "device": m["device"]})
    return rows


# --- bundles ------------------------------------------------------------------------------------------------------

def bundle_name(profile: Profile, stage: str, seed: int) -> str:
    return f"{profile.name}__{stage}__seed{seed}.tar.gz"


def weights_beside(bundle: Path) -> Path:
    """Where the final weights of a bundle's model stage travel: beside it, never inside it."""
    return bundle.with_name(bundle.name.removesuffix(".tar.gz") + ".weights.pt")


def pack(profile: Profile, stage: str, seed: int, out_dir: Path) -> Path:
    """Write the bundle of a finished shard into ``out_dir`` (same bytes for the same tables), and the final weights
    it records, if any, beside it (``weights_beside``)."""
    m = manifest(profile, stage, seed)
    if m is None:
        raise ShardError(f"stage {stage!r} of seed {seed} has not run on profile {profile.name!r}: nothing to pack")
    read(profile, stage, seed)  # verifies every table against the manifest
    folder = shard_dir(profile, stage, seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in [MANIFEST] + sorted(f"{t}.csv" for t in m["tables"]):
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(f"{stage}/seed{seed}/{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    path = Path(out_dir) / bundle_name(profile, stage, seed)
    with atomic_write(path) as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue())
    if m.get("weights"):
        with atomic_write(weights_beside(path)) as f:
            f.write((folder / WEIGHTS).read_bytes())
    return path


def _open_bundle(path: Path) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the files of a bundle, checked for completeness and integrity (nothing is extracted), with
    the weights that came beside it (checked too; absent if they did not come)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"bundle {path} does not exist")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            if not members or any(not m.isfile() for m in members):
                raise ShardError(f"bundle {path} holds something other than plain files")
            files = {m.name: tar.extractfile(m).read() for m in members}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"bundle {path} is not a readable .tar.gz ({e}); copy it again") from None
    prefixes = {name.rsplit("/", 1)[0] for name in files}
    if len(prefixes) != 1:
        raise ShardError(f"bundle {path} holds more than one shard: {sorted(prefixes)}")
    prefix = prefixes.pop()
    try:
        m = json.loads(files[f"{prefix}/{MANIFEST}"])
    except (KeyError, ValueError):
        raise ShardError(f"bundle {path} has no readable {MANIFEST}") from None
    if m.get("format") != FORMAT:
        raise ShardError(f"bundle {path} has format {m.get('format')!r}; this code reads format {FORMAT}")
    if prefix != f"{m['stage']}/seed{m['seed']}":
        raise ShardError(f"bundle {path}: its folder {prefix!r} does not match its manifest "
                         f"(stage {m['stage']!r}, seed {m['seed']})")
    tables = {f"{prefix}/{t}.csv": d for t, d in m["tables"].items()}
    if m.get("weights") and weights_beside(path).is_file():
        files[f"{prefix}/{WEIGHTS}"] = weights_beside(path).read_bytes()
        tables[f"{prefix}/{WEIGHTS}"] = m["weights"]
    extra = sorted(set(files) - set(tables) - {f"{prefix}/{MANIFEST}"})
    if extra:
        raise ShardError(f"bundle {path} holds files its manifest does not list: {extra}")
    for name, digest in tables.items():
        if name not in files or hashlib.sha256(files[name]).hexdigest() != digest:
            raise ShardError(f"bundle {path}: {name} is missing or damaged (SHA-256 differs from the manifest); "
                             "copy or recompute the bundle")
    return m, {name.rsplit("/", 1)[1]: data for name, data in files.items()}


def _config_difference(a: dict, b: dict, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _config_difference(a.get(k), b.get(k), f"{where}.{k}"
                                                                                 if where else k)]
    return [] if a == b else [f"{where}: {a!r} (bundle) vs {b!r} (here)"]


def _mixed_models(manifests: list[dict]) -> list[tuple[str, int, str]]:
    """Where the stages of one seed disagree about a model they share, as (stage, seed, what): a stage that used
    weights of stage X (its ``models_used``) whose digest differs from X's own recorded ``final_digest`` (e.g. a base
    model re-trained on another machine by nondeterministic kernels, while gamma and atypicality were measured on the
    original)."""
    finals = {(m["stage"], int(m["seed"])): m.get("final_digest") for m in manifests}
    problems = []
    for m in manifests:
        for dep, used in (m.get("models_used") or {}).items():
            final = finals.get((dep, int(m["seed"])))
            if final is not None and used.get("digest") != final:
                problems.append((m["stage"], int(m["seed"]), f"stage {m['stage']} of seed {m['seed']} used {dep} "
                                 f"weights {str(used.get('digest'))[:12]}, but {dep}'s own tables were computed with "
                                 f"{final[:12]}"))
    return problems


def _record_mixed_models(profile: Profile, mixed: list[tuple[str, int, str]]) -> None:
    """Write each disagreement merged with ``--allow-mixed-models`` into the manifest of the stage concerned
    (``mixed_models``), so the notebooks' provenance carries it."""
    for stage, seed, what in mixed:
        m = manifest(profile, stage, seed)
        if m is None:
            continue
        m["mixed_models"] = sorted(set(m.get("mixed_models", [])) | {what})
        with atomic_write(shard_dir(profile, stage, seed) / MANIFEST, "w") as f:
            json.dump(m, f, indent=2, sort_keys=True, default=str)


def merge(profile: Profile, bundles: Iterable[Path], allow_mixed_code: bool = False,
          log: Callable[[str], None] = print, allow_mixed_models: bool = False) -> list[tuple[str, int]]:
    """Check every bundle, then put each shard into place; returns the (stage, seed) merged (new or identical).

    Refused, before anything is written: a bundle that is unreadable, damaged or incomplete; of another profile or
    profile digest; a stage this profile does not have; two bundles of the same (stage, seed); bundles of
    different code versions (unless ``allow_mixed_code``); stages of one seed that used other weights of a model
    than the ones that model's stage recorded (unless ``allow_mixed_models``); a shard already here with other
    tables."""
    bundles = [Path(b) for b in bundles]
    if not bundles:
        raise ShardError("no bundle to merge")
    opened = [(b, *_open_bundle(b)) for b in bundles]
    here = {k: v for k, v in profile.to_dict().items() if k in DIGEST_SECTIONS}
    registry = stages_mod.stages(profile)
    seen: dict[tuple[str, int], Path] = {}
    for path, m, _ in opened:
        if m["profile"] != profile.name:
            raise ShardError(f"bundle {path} is of profile {m['profile']!r}, not {profile.name!r}")
        if m["profile_digest"] != profile_digest(profile):
            diff = _config_difference(m["config"], here)
            raise ShardError(f"bundle {path} was computed with other profile settings than {profile.name!r} here "
                             f"({'; '.join(diff) or 'digest ' + m['profile_digest']}); pass the same --set "
                             "overrides as the shard command")
        if m["stage"] not in registry:
            raise ShardError(f"bundle {path}: profile {profile.name!r} has no stage {m['stage']!r} "
                             f"(its stages: {list(registry)})")
        key = (m["stage"], int(m["seed"]))
        if key in seen:
            raise ShardError(f"bundles {seen[key]} and {path} are both stage {key[0]!r} of seed {key[1]}: keep one")
        seen[key] = path
    codes = {m["code_digest"] for _, m, _ in opened}
    for stage, seed in seen:
        old = manifest(profile, stage, seed)
        if old is not None:
            codes.add(old["code_digest"])
    if len(codes) > 1 and not allow_mixed_code:
        by_code = {}
        for path, m, _ in opened:
            by_code.setdefault(m["code_digest"], []).append(path.name)
        raise ShardError(f"the shards come from {len(codes)} code versions ({by_code}; shards already merged may "
                         "add more): their numbers may not be comparable. Recompute them with one version, or pass "
                         "--allow-mixed-code to merge anyway (recorded in each manifest)")
    present = [manifest(profile, name, seed) for name, s in registry.items() for seed in s.runs_for(profile)]
    incoming = {(m["stage"], int(m["seed"])): m for _, m, _ in opened}
    everything = [m for m in present if m is not None and (m["stage"], int(m["seed"])) not in incoming]
    mixed = _mixed_models(everything + list(incoming.values()))
    if mixed and not allow_mixed_models:
        raise ShardError("the stages of a seed disagree about the weights they share: "
                         + "; ".join(what for _, _, what in mixed) + ". "
                         "Recompute the dependent stages where that model's weights are (one command per seed, or "
                         "with the bundle that carries them), or pass --allow-mixed-models to merge anyway")
    if mixed:
        log("warning: merged with --allow-mixed-models although the stages of a seed disagree about the weights they "
            "share (recorded as mixed_models in their manifests and the notebooks' provenance): "
            + "; ".join(what for _, _, what in mixed))
    if code_digest() not in codes:
        log(f"note: the bundles were computed by code {sorted(codes)}, this checkout is {code_digest()}; the analysis "
            "runs with this checkout")
    plan = []
    for path, m, files in opened:
        stage, seed = m["stage"], int(m["seed"])
        old = manifest(profile, stage, seed)
        if old is not None:
            if old["tables"] == m["tables"]:
                log(f"{path.name}: stage {stage} seed {seed} is already here, identical")
                continue
            raise ShardError(f"bundle {path}: stage {stage!r} of seed {seed} is already here with other tables "
                             f"({shard_dir(profile, stage, seed)}); remove that folder to replace it")
        plan.append((path, m, files))
    for path, m, files in plan:
        target = shard_dir(profile, m["stage"], int(m["seed"]))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # an interrupted local shard (no manifest): its partial tables are dropped
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.replace(tmp, target)
        log(f"{path.name}: merged stage {m['stage']} seed {m['seed']} (computed on {m['device']} in "
            f"{m['seconds']:.0f} s)")
    _record_mixed_models(profile, mixed)
    return sorted(seen)


def ready_seeds(profile: Profile, notebook: str) -> list[int]:
    """Seeds for which every stage ``notebook`` reads (and notebook 01's, which 02-04 compare with) is done."""
    registry = stages_mod.stages(profile)
    names = stages_mod.of_notebook(profile, notebook)
    if notebook in ("02", "03", "04") and "base" in registry:
        names = ["base", *names]
    return [s for s in profile.seeds
            if names and all(done(profile, n, s) for n in names if s in registry[n].runs_for(profile))
            and any(s in registry[n].runs_for(profile) for n in names)]


def provenance(profile: Profile, notebook: str, seeds: Iterable[int]) -> dict:
    """Where and by what code each stage a notebook reads was computed (for provenance.json)."""
    out = {}
    for name in stages_mod.of_notebook(profile, notebook):
        for seed in seeds:
            m = manifest(profile, name, seed)
            if m is not None:
                out[f"{name}/seed{seed}"] = {k: m.get(k) for k in ("device", "seconds", "written", "code_digest",
                                                                   "git_commit", "torch", "final_digest",
                                                                   "models_used", "mixed_models")}
    return out
