"""What is done of a profile's shards and what to run next: ``python -m ood_lib.reproduce --plan``.

The state is read once (``Done.read``): the shards of this machine's results and the bundles of one folder (e.g. the
committed ones, not merged here). From it come

* ``table``: every (stage, seed), done or not, where, how long it ran and on what;
* ``report``: the lines ``--plan`` prints: that table, the bundles that cannot count and why, and the command of
  every shard still to run (``stages.shard_plan``'s order), with the models it must re-train first;
* ``device_plan``: a seed's shards as lent-GPU commands of at most a time budget each (``--device-minutes``);
* ``machine_plan``: the shards one machine can finish, one after another, within a time budget
  (``--machine-minutes``; ``execute.run_next_shards`` runs them).

Sizes are the seconds the stages took where they ran (manifests here or in the bundles), the median over seeds,
measured on the same kind of device (``cpu`` or a GPU) only.
"""
from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from ood_lib import shards
from ood_lib import stages as stages_mod
from ood_lib.config import Profile

Key = tuple[str, int]  # (stage, seed)

# A device command's start-up beyond its stages (Python and torch import, data decoding, CUDA context): an allowance,
# not a measurement (the device tool's wall_s includes it; stage seconds do not).
STARTUP_SECONDS = 60.0


def bundled(profile: Profile, folder: Path | str | None) -> dict[Key, tuple[dict | str, Path]]:
    """The bundles of ``profile`` in ``folder``: (stage, seed) -> (the manifest of an intact bundle of this profile,
    of one of its stages and of its settings, or why the bundle cannot count; the file). Where two files claim one
    shard, an intact one wins. Nothing is extracted or merged; a bundle that counts may still be refused by
    ``shards.merge`` (other code versions, or other weights of a model)."""
    found: dict[Key, tuple[dict | str, Path]] = {}
    if folder is None or not Path(folder).is_dir():
        return found
    registry, digest = stages_mod.stages(profile), shards.profile_digest(profile)
    for path in sorted(Path(folder).glob(f"{profile.name}__*__seed*.tar.gz")):
        parts = path.name.removesuffix(".tar.gz").split("__")
        if len(parts) != 3 or not parts[2].removeprefix("seed").isdigit():
            continue  # not a name ``shards.bundle_name`` writes
        key = (parts[1], int(parts[2].removeprefix("seed")))
        try:
            m, _ = shards._open_bundle(path)
        except shards.ShardError as e:
            entry: dict | str = f"damaged bundle ({e})"
        else:
            if (m["profile"], m["stage"], int(m["seed"])) != (profile.name, *key):
                entry = (f"misnamed bundle (its manifest: profile {m['profile']!r}, stage {m['stage']!r}, seed "
                         f"{m['seed']})")
            elif m["stage"] not in registry:
                entry = f"bundle of a stage this profile does not have ({m['stage']!r})"
            elif m["profile_digest"] != digest:
                entry = f"bundle of other settings (profile digest {m['profile_digest']}, here {digest})"
            else:
                entry = m
        if key not in found or not isinstance(found[key][0], dict):
            found[key] = (entry, path)
    return found


@dataclass(frozen=True)
class Done:
    """The shards of a profile done, read once: ``shards`` maps (stage, seed) to (manifest, None) for a shard of this
    machine's results, or (manifest, bundle) for an intact bundle of this profile's settings in the bundle folder (a
    shard here wins); ``found`` is ``bundled``'s answer, bundles that cannot count included."""
    profile: Profile
    found: dict[Key, tuple[dict | str, Path]]
    shards: dict[Key, tuple[dict, Path | None]]

    @classmethod
    def read(cls, profile: Profile, bundle_dir: Path | str | None = None) -> Done:
        found = bundled(profile, bundle_dir)
        done = {key: (m, path) for key, (m, path) in found.items() if isinstance(m, dict)}
        for name, s in stages_mod.stages(profile).items():
            for seed in s.runs_for(profile):
                m = shards.manifest(profile, name, seed)
                if m is not None:
                    done[(name, seed)] = (m, None)
        return cls(profile, found, done)

    def manifest(self, stage: str, seed: int) -> dict | None:
        return self.shards.get((stage, seed), (None, None))[0]

    def table(self, stage: str, seed: int, name: str) -> pd.DataFrame | None:
        """Table ``name`` of a shard done, read here or from its bundle; None if the shard is not done or has none."""
        m, bundle = self.shards.get((stage, seed), (None, None))
        if m is None or name not in m["tables"]:
            return None
        if bundle is None:
            return shards.read(self.profile, stage, seed)[name]
        data = shards._open_bundle(bundle)[1][f"{name}.csv"]
        return shards._read_csv(io.BytesIO(data), m["text_columns"][name])

    def training_seconds(self, stage: str, seed: int) -> float | None:
        """How long the model of a done stage trained: its history's ``train_seconds``, None if unknown."""
        history = self.table(stage, seed, "history")
        return float(history["train_seconds"].sum()) if history is not None and "train_seconds" in history else None

    def travels(self, model: str, seed: int) -> bool:
        """The final weights the intact bundle of ``model`` records lie beside it (``shards._open_bundle`` has
        checked them against its manifest; a bundle with other weights beside it is damaged)."""
        m, bundle = self.found.get((model, seed), (None, None))
        return isinstance(m, dict) and bool(m.get("weights")) and shards.weights_beside(bundle).is_file()

    def weights_missing(self, own: Iterable[str], seed: int) -> list[str]:
        """The models the shard of stages ``own`` starts from that it must re-train first (checking the recorded
        digest), those a re-training starts from first: the models whose final weights are not on this machine (a
        checkpoint, or weights merged with their bundle) and not beside their bundle with the checksum its manifest
        records."""
        registry, own = stages_mod.stages(self.profile), list(own)
        ctx = stages_mod.Context(self.profile, log=lambda _: None)
        missing: list[str] = []

        def need(m: str) -> None:
            if m in own or m in missing or registry[m].checkpoint is None or registry[m].checkpoint(ctx, seed).exists():
                return
            recorded, bundle = self.shards.get((m, seed), (None, None))
            merged = recorded is not None and bundle is None and recorded.get("weights") and (
                shards.shard_dir(self.profile, m, seed) / shards.WEIGHTS).is_file()
            if not merged and not self.travels(m, seed):
                for dep in registry[m].models:  # its re-training starts from them
                    need(dep)
                missing.append(m)

        for m in dict.fromkeys(m for n in own for m in registry[n].models):
            need(m)
        return missing


def table(done: Done) -> pd.DataFrame:
    """Every (stage, seed) of the profile: done or not, where it is (``here``: a shard of this machine's results;
    ``bundle``: an intact bundle of this profile's settings, not merged yet; else why a bundle there cannot count),
    where and how long it ran, and what it needs first."""
    rows = []
    for name, s in stages_mod.stages(done.profile).items():
        for seed in s.runs_for(done.profile):
            m, bundle = done.shards.get((name, seed), (None, None))
            why = done.found.get((name, seed), ("", None))[0]
            if m is not None:
                where = "bundle" if bundle else "here"
            else:  # why a bundle there cannot count, in short ("damaged bundle", ...), or nothing there
                where = why.split(" (")[0] if isinstance(why, str) else ""
            rows.append({"stage": name, "seed": seed, "notebook": s.notebook, "done": m is not None, "where": where,
                         "seconds": m["seconds"] if m else None, "device": m["device"] if m else "",
                         "needs tables of": ",".join(s.inputs), "needs weights of": ",".join(s.models)})
    return pd.DataFrame(rows)


def _on_cpu(m: dict) -> bool:
    return str(m["device"]).startswith("cpu")


class _Sizes:
    """Stage sizes from the shards done on one kind of device (``cpu``: a CPU; else a GPU): the median over seeds
    of each stage measured; a stage that trains ``Stage.epochs`` on the base model's training set scaled from
    ``base``'s seconds per epoch (its per-epoch scoring included); one that trains nothing sized as a measured one
    of its notebook that trains nothing either (``posthoc_um`` as ``posthoc_base``); anything else unsized. A
    re-training costs the training seconds of that model and seed, or the median over seeds where that seed's
    training was not measured on this kind of device."""

    def __init__(self, done: Done, cpu: bool):
        self.registry = stages_mod.stages(done.profile)
        keys = [key for key, (m, _) in done.shards.items() if _on_cpu(m) == cpu]
        seconds: dict[str, list[float]] = {}
        self.runs: dict[Key, float] = {}  # training seconds of a model stage, by (stage, seed)
        for n, s in keys:
            seconds.setdefault(n, []).append(float(done.manifest(n, s)["seconds"]))
            took = done.training_seconds(n, s) if self.registry[n].train is not None else None
            if took is not None:
                self.runs[(n, s)] = took
        self.measured = {n: float(statistics.median(v)) for n, v in seconds.items()}
        self.trained = {n: float(statistics.median(v for (m, _), v in self.runs.items() if m == n))
                        for n in dict.fromkeys(m for m, _ in self.runs)}
        base_epochs = self.registry["base"].epochs(done.profile) if "base" in self.registry else None
        self.per_epoch = self.measured["base"] / base_epochs if "base" in self.measured and base_epochs else None
        self.profile = done.profile

    def stage(self, name: str) -> tuple[float | None, str]:
        """(seconds or None, how they were found)."""
        stage = self.registry[name]
        if name in self.measured:
            return self.measured[name], f"{name} measured"
        if stage.epochs is not None and self.per_epoch is not None:
            return self.per_epoch * stage.epochs(self.profile), f"{name} scaled from base's s/epoch"
        like = None if stage.train is not None else next(
            (n for n in self.measured if self.registry[n].notebook == stage.notebook
             and self.registry[n].train is None and bool(self.registry[n].models) == bool(stage.models)), None)
        if like is not None:
            return self.measured[like], f"{name} sized as {like}"
        return None, f"{name} not measured"

    def retraining(self, model: str, seed: int) -> float | None:
        return self.runs.get((model, seed), self.trained.get(model))


@dataclass(frozen=True)
class Piece:
    """One device command of a seed's shard plan, sized to a time budget (``device_plan``)."""
    row: int                   # the row of ``stages.shard_plan`` it comes from (1-based)
    stages: tuple[str, ...]
    reads: tuple[str, ...]     # the stages whose bundles it is given
    seconds: float | None      # estimated, start-up included; None where no measurement sizes one of its stages
    basis: str                 # how the estimate was made
    warm: bool                 # reads the run folders the piece before it left: the same, still warm, machine
    models_only: bool = False  # only re-trains the models its stages start from (``run_shards(models_only=True)``)
    blocked: str = ""          # why it cannot give mergeable bundles as things stand ("" when it can)
    blocked_by: tuple[str, ...] = ()  # the models whose row must run again, with this code, to unblock it

    def fits(self, budget_s: float) -> bool:
        return not self.blocked and self.seconds is not None and self.seconds <= budget_s


def device_plan(done: Done, seed: int, budget_s: float) -> list[Piece]:
    """The shard plan of ``seed`` cut into lent-GPU commands of at most ``budget_s`` seconds where it can be.

    Sizes are ``_Sizes`` of the shards done on a GPU, plus ``STARTUP_SECONDS`` a command. A row that starts from a
    model whose final weights did not travel with its bundle (ResNet-18: 45 MB) re-trains it first, in a piece of
    its own (``Piece.models_only``) where the re-training and the row's first stage do not fit in one budget. The
    re-training must reproduce the recorded weights, so a row whose model was trained with nondeterministic kernels
    (a GPU before ``train.deterministic_kernels``) is ``Piece.blocked``. A row longer than the budget is cut between
    stages; the later pieces read the run folders of the first, so they must run on the same machine while it is
    warm. A single stage longer than the budget stays one piece that does not fit (``Piece.fits``)."""
    registry, sizes = stages_mod.stages(done.profile), _Sizes(done, cpu=False)
    pieces = []
    for row, (own, reads) in enumerate(stages_mod.shard_plan(done.profile, seed), 1):
        retrain = [m for m in dict.fromkeys(m for n in own for m in registry[n].models)
                   if m not in own and not done.travels(m, seed)]
        first, notes, blocked, blocked_by = STARTUP_SECONDS, [], [], []
        for m in retrain:
            took = sizes.retraining(m, seed)
            first = first + took if took is not None and first is not None else None
            notes.append(f"re-trains {m} first (its weights do not travel)")
            done_m = done.manifest(m, seed)
            if done_m is not None and shards._kernels(done_m) == "deterministic":
                notes.append(f"its digest is reproducible on a {done_m['device']} with torch {done_m.get('torch')} "
                             f"and this training code only")
            elif done_m is not None:
                blocked.append(f"{m} seed {seed} was trained with nondeterministic kernels ({done_m['device']}, code "
                               f"{done_m['code_digest']}): a re-training cannot reproduce it, so re-run {m}'s row "
                               f"with this code first, its bundles replacing the ones recorded")
                blocked_by.append(m)
        current: list[str] = []
        total, why, warm = first, list(notes), False
        if retrain and first is not None and own:
            sec, _ = sizes.stage(own[0])
            if sec is None or first + sec > budget_s:  # the re-training alone, then the stages on the warm machine
                pieces.append(Piece(row, tuple(own), reads, first, "; ".join(notes), False, models_only=True,
                                    blocked="; ".join(blocked), blocked_by=tuple(blocked_by)))
                total, why, warm = STARTUP_SECONDS, [], True
        for name in own:
            sec, how = sizes.stage(name)
            grown = None if total is None or sec is None else total + sec
            if current and (grown is None or grown > budget_s) and total is not None:
                pieces.append(Piece(row, tuple(current), reads if not warm else (), total, "; ".join(why), warm,
                                    blocked="; ".join(blocked), blocked_by=tuple(blocked_by)))
                current, warm, why = [], True, []
                total = STARTUP_SECONDS
                grown = None if sec is None else total + sec
            current.append(name)
            why.append(how)
            total = grown
        pieces.append(Piece(row, tuple(current), reads if not warm else (), total, "; ".join(why), warm,
                            blocked="; ".join(blocked), blocked_by=tuple(blocked_by)))
    return pieces


@dataclass(frozen=True)
class Command:
    """One shard command of a machine's session (``machine_plan``)."""
    seed: int
    stages: tuple[str, ...]    # a row of ``stages.shard_plan``, or its stages not done yet where the rest are here
    reads: tuple[str, ...]     # the done stages they and the re-trainings need (bundles, or shards here)
    seconds: float             # estimated: start-up, those stages, and the models it re-trains first
    basis: str
    retrains: tuple[str, ...]  # the models it re-trains first (later commands of the session find them here)


def to_run(done: Done) -> list[tuple[int, tuple[str, ...], tuple[str, ...]]]:
    """The rows of ``stages.shard_plan`` not done yet, seed by seed: (seed, stages, reads)."""
    return [(seed, tuple(own), tuple(reads)) for seed in done.profile.seeds
            for own, reads in stages_mod.shard_plan(done.profile, seed)
            if not all(done.manifest(n, seed) for n in own)]


def _reproducible(done: Done, model: str, seed: int, cpu: bool) -> str:
    """Why re-training ``model`` of ``seed`` on this kind of device cannot reproduce its recorded weights ("" when it
    can, as far as the record tells: deterministic kernels, the same kind of device)."""
    m = done.manifest(model, seed)
    if m is None:
        return ""
    if shards._kernels(m) != "deterministic":
        return f"{model} seed {seed} was trained with nondeterministic kernels ({m['device']}): no re-training " \
               f"reproduces it"
    if _on_cpu(m) != cpu:
        return f"{model} seed {seed} was trained on {m['device']}: a re-training on a {'CPU' if cpu else 'GPU'} " \
               f"would not reproduce it"
    return ""


def machine_plan(done: Done, budget_s: float, cpu: bool = True,
                 failed: dict[Key, str] | None = None) -> tuple[list[Command], list[str]]:
    """The shard commands one machine (``cpu``: a CPU; else a GPU) can finish one after another within ``budget_s``
    seconds, in ``stages.shard_plan``'s order seed by seed, sized by ``_Sizes`` of the shards done on the same kind
    of device plus ``STARTUP_SECONDS`` a command; and why each row left out was left out. A command runs a row's
    stages not done yet where the done ones are here, else the whole row (the base row's stages read every epoch
    of the base run, which only the machine that trained it has). A model re-trained by one command (its weights did
    not travel) is on the machine for the commands after it. A row that does not fit, cannot be sized, or would
    re-train a model that its record says no re-training here reproduces is left out, and so is every later one
    that needs its stages. ``failed``: (stage, seed) -> why it failed on this machine (``execute.run_next_shards``):
    a row that would compute, re-train or read one is left out, with the reason."""
    registry, sizes = stages_mod.stages(done.profile), _Sizes(done, cpu)
    commands: list[Command] = []
    left: list[str] = []
    spent, here, skipped = 0.0, set(), set()  # here: (model, seed) trained on this machine by an earlier command
    for seed, row, _ in to_run(done):
        if all(done.shards.get((n, seed), (None, None))[1] is None for n in row):  # the done ones, if any, are here
            row = tuple(n for n in row if done.manifest(n, seed) is None)
        retrain = tuple(m for m in done.weights_missing(row, seed) if (m, seed) not in here)
        reads = tuple(dict.fromkeys(d for n in (*row, *retrain) for d in (*registry[n].inputs, *registry[n].models)
                                    if d not in row))  # a model re-trained here is checked against its bundle's record
        label = f"{','.join(row)} seed {seed}"
        reasons = [x for x in (_reproducible(done, m, seed, cpu) for m in retrain) if x]
        gone = [n for n in dict.fromkeys((*row, *retrain, *reads)) if (n, seed) in (failed or {})]
        if gone:
            reasons.append(f"{', '.join(gone)} of seed {seed} failed here "
                           f"({'; '.join(dict.fromkeys(failed[(n, seed)] for n in gone))})")
        why = "; ".join(reasons)
        first = [n for n in reads if (n, seed) in skipped]  # a row left out above makes them
        if first or why:
            left.append(f"{label}: " + (why or f"needs {', '.join(first)} first"))
            skipped |= {(n, seed) for n in row}
            continue
        total: float | None = STARTUP_SECONDS
        basis = []
        for m in retrain:
            took = sizes.retraining(m, seed)
            total = None if took is None or total is None else total + took
            basis.append(f"re-trains {m} first (" + (f"{took / 60:.0f} min)" if took is not None else "unsized)"))
        for name in row:
            sec, how = sizes.stage(name)
            total = None if sec is None or total is None else total + sec
            basis.append(how + (f" ({sec / 60:.0f} min)" if sec is not None else ""))
        if total is None or spent + total > budget_s:
            left.append(f"{label}: " + (f"size unknown ({'; '.join(basis)})" if total is None else
                                        f"~{total / 60:.0f} min, {max(budget_s - spent, 0) / 60:.0f} min left"))
            skipped |= {(n, seed) for n in row}
            continue
        spent += total
        here |= {(m, seed) for m in retrain} | {(n, seed) for n in row if registry[n].checkpoint is not None}
        commands.append(Command(seed, row, reads, total, "; ".join(basis), retrain))
    return commands, left


def report(done: Done, bundle_dir: Path | str | None = None, device_minutes: float | None = None,
           machine_minutes: float | None = None, cpu: bool = True) -> list[str]:
    """The lines ``--plan`` prints: ``table``, the bundles that do not count and why, then the commands still to
    run (``bundle_dir``: where they put and read bundles; None for the default), as plain shard commands, as
    lent-GPU commands of at most ``device_minutes`` each, or as the commands this machine (``cpu``: a CPU one)
    finishes within ``machine_minutes``."""
    profile = done.profile
    lines = [table(done).to_string(index=False)]
    for (stage, seed), (why, path) in done.found.items():
        if isinstance(why, str) and (stage, seed) not in done.shards:
            lines.append(f"# stage {stage} seed {seed} does not count as done: {path.name} is a {why}")
    if device_minutes is not None:
        return lines + _device_lines(done, device_minutes, bundle_dir)
    if machine_minutes is not None:
        return lines + _machine_lines(done, machine_minutes, bundle_dir, cpu)
    said: set[Key] = set()
    for seed, own, reads in to_run(done):
        for m in done.weights_missing(own, seed):
            if done.manifest(m, seed) is None:
                continue  # the shard that makes it comes first, on the same machine
            took = done.training_seconds(m, seed)
            took_s = f" ({m} trained for {took / 60:.0f} min)" if took else ""
            if (m, seed) in said:
                lines.append(f"# it re-trains {m} of seed {seed} first too, unless it runs after the command that "
                             f"did on the same machine")
            else:
                lines.append(f"# it re-trains {m} of seed {seed} first: its final weights are neither on this "
                             f"machine nor beside its bundle{took_s}")
            said.add((m, seed))
        lines.append(shards.command(profile, own, [seed], reads, bundle_dir))
    return lines


def _device_lines(done: Done, minutes: float, bundle_dir: Path | str | None) -> list[str]:
    """The lent-GPU commands, row by row across the seeds (``device_plan``): every seed's base row first (claim 1),
    then the fine-tune rows (claim 3, then 04), the removal arms and notebook 06's rows, as ``stages.shard_plan``
    orders a seed's rows. A seed whose rows are blocked by a model trained before deterministic kernels gets that
    model's row again, after the other seeds' runs of that row, with what to do with the bundles it replaces."""
    pieces = {seed: device_plan(done, seed, minutes * 60) for seed in done.profile.seeds}
    blocking = {seed: {m for x in seed_pieces for m in x.blocked_by} for seed, seed_pieces in pieces.items()}
    again = {seed: {x.row for x in seed_pieces if blocking[seed] & set(x.stages)}  # the rows that make them
             for seed, seed_pieces in pieces.items()}
    todo = [(seed, piece, False) for seed, seed_pieces in pieces.items() for piece in seed_pieces
            if not all(done.manifest(n, seed) for n in piece.stages)]
    todo += [(seed, piece, True) for seed, seed_pieces in pieces.items() for piece in seed_pieces
             if piece.row in again[seed]]
    todo.sort(key=lambda t: (t[1].row, t[2], t[0]))  # stable: a row's pieces of one seed stay in their order
    lines, said = [], ""
    for seed, piece, rerun in todo:
        if rerun and not piece.warm:
            row = [n for x in pieces[seed] if x.row == piece.row for n in x.stages]
            lines.append(f"# seed {seed}, row {piece.row} again, with this code: its recorded bundles were trained with "
                         f"nondeterministic kernels and block seed {seed}'s later rows; the new bundles replace "
                         f"{', '.join(str(shards.device_bundle(done.profile, n, seed, bundle_dir)) for n in row)} "
                         f"(move those aside before merging the new ones)")
        size = "size unknown" if piece.seconds is None else f"~{piece.seconds / 60:.1f} min"
        fit = (", fit unknown (not measured on a GPU)" if piece.seconds is None
               else f", DOES NOT FIT {minutes:g} min" * (piece.seconds > minutes * 60))
        why = "as above" if piece.blocked == said else piece.blocked
        verdict = fit + f", BLOCKED ({why})" * bool(piece.blocked)
        said = piece.blocked
        warm = "; on the machine of the command above, while it is warm" if piece.warm else ""
        lines.append(f"# seed {seed}, row {piece.row}{' again' * rerun}: {size}{verdict} ({piece.basis}){warm}")
        command = shards.device_command(done.profile, piece.stages, seed, piece.reads, bundle_dir,
                                        piece.models_only)
        lines.append(f"# {command}" if piece.blocked else command)  # a blocked command is not to be run
    return lines


def _machine_lines(done: Done, minutes: float, bundle_dir: Path | str | None, cpu: bool) -> list[str]:
    commands, left = machine_plan(done, minutes * 60, cpu)
    total = sum(c.seconds for c in commands)
    lines = [f"# this machine, {minutes:g} min: {len(commands)} command(s), ~{total / 60:.0f} min, one after another "
             f"(sized from the shards measured on a {'CPU' if cpu else 'GPU'})"]
    for c in commands:
        lines.append(f"# ~{c.seconds / 60:.0f} min: {c.basis}")
        lines.append(shards.command(done.profile, c.stages, [c.seed], c.reads, bundle_dir))
    lines += [f"# not in it: {why}" for why in left]
    return lines
