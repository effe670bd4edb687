"""Execute the study: its notebooks headlessly with papermill (``run``), or some of its stages as a shard command
that writes bundles (``run_shards``), or the shards still to run that fit a machine's time (``run_next_shards``);
and the checks and one-paragraph explanations around them.

``ood_lib.reproduce`` is the command line over these; ``ood_lib.cluster`` calls ``run`` for the analysis after its
jobs. Which notebooks, stages and checkpoints a run needs is decided in ``ood_lib.stages``.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
from pathlib import Path

import torch

from ood_lib import plan, progress, shards
from ood_lib import stages as stages_mod
from ood_lib.config import load_profile
from ood_lib.data import DATASETS
from ood_lib.models import PRETRAINED
from ood_lib.paths import PROJECT_ROOT, data_dir, figures_dir, models_root, results_dir, run_bytes
from ood_lib.report import write_report
from ood_lib.results import cpu_model, device_name
from ood_lib.train import TrainingDiverged, native_cpu_bf16, resolve_device, training_precision


# papermill, zmq and traitlets are imported where notebooks run: a shard command (e.g. on a device machine, whose
# image has none of them) needs only torch, numpy, pandas, PyYAML, Pillow and tqdm.

def kernel_config():  # papermill's kernels: CurveZMQ-encrypted channels (no plain-TCP warning)
    import zmq
    from traitlets.config import Config
    return Config(KernelManager={"transport_encryption": "auto" if zmq.has("curve") else "disabled"})


class RunError(Exception):
    """A run that cannot start or did not finish, explained in one paragraph (the runner prints it, no traceback)."""


def preflight(profile, data: bool = True, stages: list[str] | None = None, allow_emulated_bf16: bool = False) -> None:
    """Before any work: every folder the run writes is writable; then, for a run that computes (``data``), training in
    bf16 on the CPU only where its kernels are native (``check_cpu_bf16``), and every data set the profile names and
    every pretrained checkpoint its stages load present (nothing is read). Raises ``RunError`` naming the folder,
    the set or the file and the fix."""
    for folder, var in [(results_dir(profile.name), "OOD_RESULTS_DIR"), (figures_dir(profile.name), "OOD_FIGURES_DIR"),
                        (data_dir() / "cache", "OOD_DATA_DIR")]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunError(f"cannot write to {folder} ({e.strerror}). Make it writable, or set {var} to a folder "
                           "you can write; nothing was run.") from None
    if not data:
        return
    if not allow_emulated_bf16:
        check_cpu_bf16(profile)
    d = profile.data
    needs = [(d.id_set, "train"), (d.id_set, "test")] + [(n, DATASETS[n].ood_split) for n in d.ood_sets]
    missing = [m for m in (DATASETS[name].present(split) for name, split in needs) if m]
    folder = models_root() or PROJECT_ROOT.parent / "shared" / "models"
    for name in stages_mod.checkpoints_needed(profile, stages):
        path = folder / PRETRAINED[name].filename
        if not path.is_file():
            missing.append(f"pretrained checkpoint {name!r}: {path} does not exist. Set OOD_MODELS_ROOT to the folder "
                           f"that holds {PRETRAINED[name].filename} (on the study machines ../shared/models; on a "
                           f"device machine .device/models, made by scripts/device_data.sh); it comes from "
                           f"{PRETRAINED[name].source}.")
    if missing:
        raise RunError("\n".join(missing) + "\nNothing was run.")


def emulated_bf16_cpu(profile) -> str | None:
    """This CPU, e.g. "AMD EPYC, AVX2", where ``profile`` would train in bf16 autocast on it without native bf16
    kernels (``train.native_cpu_bf16``); else None."""
    device = resolve_device(profile.device)
    if device.type != "cpu" or training_precision(profile.train, device) != "bf16-autocast" or native_cpu_bf16():
        return None
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"


def check_cpu_bf16(profile) -> None:
    """A profile that trains in bf16 autocast on the CPU (``train.cpu_bf16``: cifar10-cpu) is refused on a CPU
    without native bf16 kernels: emulated, it runs about ten times slower than float32, so a shard sized on the
    recipe's machines would take days; and its weights need not be those the committed bundles recorded."""
    cpu = emulated_bf16_cpu(profile)
    if cpu is None:
        return
    raise RunError(
        f"profile {profile.name!r} trains in bf16 autocast on the CPU (train.cpu_bf16), but this CPU ({cpu}) has no "
        "native bf16 kernels: PyTorch emulates them, about ten times slower than float32 (cifar10-cpu's net on an "
        "AVX2 AMD EPYC, 2 threads: 8 against 74 images/s), and the weights need not match those trained where the "
        "kernels are native (a re-trained base is checked against its recorded digest). Nothing was run. Run it on "
        "a CPU with AVX-512 or AMX (the recipe was sized on an avx512_bf16 Xeon), or train in float32 with --set "
        "train.cpu_bf16=false (another recipe: its stages get another profile digest and do not merge with the bf16 "
        "ones), or pass --allow-emulated-bf16 to go on.")


def explain_os_error(errno_: int | None, path: str | None, what: str) -> str | None:
    """One paragraph for a full disk or a folder that cannot be written, or None for other errors."""
    where = path or "a results file"
    if errno_ in (errno.ENOSPC, errno.EDQUOT):
        room = ""
        try:
            room = f" ({shutil.disk_usage(Path(where).parent).free / 1e9:.2f} GB free now)"
        except OSError:
            pass
        return (f"{what}: no space left on the disk that holds {where}{room}. Free space there, or set "
                "OOD_RESULTS_DIR (results, caches, checkpoints) to a disk with room, then run the same command "
                "again: finished work is kept and an interrupted training resumes from its last checkpoint.")
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{what}: {where} cannot be written ({os.strerror(errno_)}). Make it writable, or set "
                "OOD_RESULTS_DIR / OOD_FIGURES_DIR to folders you can write, then run the same command again.")
    return None


def explain_notebook_failure(error, path: Path, executed: Path) -> str:
    """The notebook, the cell, the exception and its message, and where the executed copy (full traceback) is."""
    ename, evalue = getattr(error, "ename", type(error).__name__), getattr(error, "evalue", str(error))
    what = f"notebook {path.name} failed"
    found = re.match(r"\[Errno (\d+)\] [^:]*(?:: '(.*)')?", evalue or "")
    known = explain_os_error(int(found.group(1)), found.group(2), what) if found else None
    count = getattr(error, "exec_count", None)
    where = f" at In [{count}]" if count else ""
    body = known or f"{what}{where}: {ename}: {evalue}"
    return f"{body}\nThe executed copy, with the full traceback, is {executed}"


def _execute(profile, path: Path, out_dir: Path, parameters: dict) -> None:
    """Run one notebook with papermill; its progress bars are drawn on this console (``ood_lib.progress``)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    executed = out_dir / path.name
    events = out_dir / f".progress-{path.stem}.jsonl"
    follower = progress.started(events)
    os.environ[progress.ENV] = str(events)
    try:
        papermill.execute_notebook(str(path), str(executed), cwd=str(stages_mod.NOTEBOOK_DIR), parameters=parameters,
                                   progress_bar=False, log_output=False, config=kernel_config())
    except PapermillExecutionError as e:
        raise RunError(explain_notebook_failure(e, path, executed)) from None
    except OSError as e:
        raise RunError(explain_os_error(e.errno, e.filename, f"notebook {path.name}") or
                       f"notebook {path.name}: {type(e).__name__}: {e}") from None
    finally:
        os.environ.pop(progress.ENV, None)
        follower.stop()
        events.unlink(missing_ok=True)


def run(profile_name: str, notebooks: list[str] | None = None, overrides: dict | None = None,
        compute: bool = True) -> list[tuple[str, float]]:
    """Execute the notebooks. With ``compute=False`` (the analysis after a merge) nothing is trained: each notebook
    runs on the seeds whose stages are complete, and a notebook with none is skipped with a message."""

    overrides = overrides or {}
    profile, paths = stages_mod.notebooks_to_run(profile_name, notebooks, overrides)
    out_dir = results_dir(profile.name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for i, path in enumerate(paths, 1):
        nb = path.name[:2]
        params = {"profile": profile.name, "overrides": overrides}
        if nb in stages_mod.STAGED_NOTEBOOKS:
            params["compute"] = compute
        if not compute and nb in stages_mod.STAGED_NOTEBOOKS:
            seeds = shards.ready_seeds(profile, nb)
            if not seeds:
                print(f"[{i}/{len(paths)}] {path.name}: no seed has all its stages; skipped", flush=True)
                continue
            params["overrides"] = {**overrides, "seeds": seeds}
        print(f"[{i}/{len(paths)}] {path.name} on profile {profile.name} ...", flush=True)
        t0 = time.perf_counter()
        _execute(profile, path, out_dir, params)
        seconds = time.perf_counter() - t0
        done.append((path.name, seconds))
        print(f"[{i}/{len(paths)}] {path.name} done in {seconds:.1f} s -> {out_dir / path.name}", flush=True)
    total = sum(s for _, s in done)
    print(f"profile {profile.name}: {len(done)} notebook(s) in {total:.1f} s")
    t0 = time.perf_counter()
    report = write_report(profile.name)
    print(f"report: {report} ({report.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    return done


def _models_only(profile, runner: shards.Runner, stages: list[str], seeds: list[int], t0: float) -> None:
    """``run_shards(models_only=True)``: the models the listed stages start from, found, installed or re-trained and
    checked, one line each."""
    for seed in seeds:
        # the models the listed stages start from, less those the listed stages train themselves (posthoc_um
        # scores um's model: computing um here is the very work the later command does)
        needed = dict.fromkeys(dep for name in stages if seed in runner.stage(name).runs_for(profile)
                               for dep in runner.stage(name).models if dep not in stages)
        for dep in needed:
            if not shards.done(profile, dep, seed):
                raise shards.ShardError(
                    f"--models-only: stage {dep!r} seed {seed}, whose model the stages {','.join(stages)} start "
                    f"from, has no tables here; give its bundle with --inputs (a models-only command re-trains or "
                    f"installs models whose stage was computed elsewhere, it never computes a stage)")
            info = runner.model(dep, seed)
            how = "re-trained" if info["retrained"] else "installed" if info.get("installed") else "found"
            check = (" = the recorded one" if info["match"] else " (no recorded digest to check it against)"
                     if info["recorded"] is None else f" != the recorded {info['recorded'][:12]}")
            print(f"model {dep} seed {seed}: {how} here, weights digest {str(info['digest'])[:12]}{check} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)


DISK_SAMPLE_SECONDS = 5.0  # a sample of a study's results folder takes a few tens of ms (``paths.run_bytes``)


class DiskPeak:
    """The most bytes a profile's results folder held while the block ran, above what it held at the start
    (``paths.run_bytes``, sampled every ``every`` seconds on a background thread and at both ends): what a shard needs
    of a machine's disk at its peak, where the bytes it leaves are only what stays after the dropped checkpoints."""

    def __init__(self, profile_name: str, every: float = DISK_SAMPLE_SECONDS):
        self.profile_name, self.every = profile_name, every
        self.start = self.peak = self.end = 0
        self._stop = threading.Event()

    def _sample(self) -> int:
        size = run_bytes(self.profile_name)
        self.peak = max(self.peak, size)
        return size

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "DiskPeak":
        self.start = self.peak = run_bytes(self.profile_name)
        self._thread = threading.Thread(target=self._watch, name="disk-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end = self._sample()

    def said(self) -> str:
        return _bytes_said(self.start, self.end, self.peak, self.every)


def _bytes_said(start: int, end: int, peak: int, every: float) -> str:
    return f"{(end - start) / 1e6:.1f} MB written, {(peak - start) / 1e6:.1f} MB at the peak (sampled every {every:g} s)"


def run_shards(profile_name: str, stages: list[str], seeds: list[int] | None, overrides: dict | None = None,
               bundle_dir: Path | None = None, inputs: list[Path] = (), models_only: bool = False,
               allow_mixed_models: bool = False) -> list[Path]:
    """A shard command: merge ``inputs``, run ``stages`` for ``seeds`` in this process, write one bundle each.

    ``models_only``: only make sure the trained models those stages start from are on this machine (installed from
    the bundles' weights, or re-trained and checked against the digest their bundle recorded), and write nothing
    else; the stages then run in a later command on the same machine (a lent GPU's 10-minute commands, where
    re-training the base and a 100-epoch fine-tune do not fit in one). ``allow_mixed_models``: go on from a
    re-trained model whose digest differs from the recorded one (``shards.Runner.model``)."""
    profile = load_profile(profile_name, overrides or {})
    print(f"shard command of profile {profile.name} on {device_name(resolve_device(profile.device))}: torch "
          f"{torch.__version__}, CUDA {torch.version.cuda} (available: {torch.cuda.is_available()})", flush=True)
    if inputs:
        shards.merge(profile, inputs, allow_mixed_models=allow_mixed_models)
    runner = shards.Runner(profile, allow_mixed_models=allow_mixed_models)
    for name in stages:
        runner.stage(name)  # an unknown stage fails before any work
    seeds = list(profile.seeds) if seeds is None else seeds
    if models_only:
        t0 = time.perf_counter()
        with DiskPeak(profile.name) as disk:
            _models_only(profile, runner, stages, seeds, t0)
        print(f"models of profile {profile.name} in {time.perf_counter() - t0:.1f} s: {disk.said()} under "
              f"{results_dir(profile.name)}", flush=True)
        return []
    bundle_dir = Path(bundle_dir) if bundle_dir else results_dir(profile.name) / "bundles"
    order = [name for name in runner.registry if name in stages]
    written = []
    t0 = time.perf_counter()
    start = peak = end = run_bytes(profile.name)
    for seed in seeds:
        for name in (n for n in order if seed in runner.stage(n).runs_for(profile)):
            with DiskPeak(profile.name) as disk:
                runner.tables(name, seed)
                written.append(shards.pack(profile, name, seed, bundle_dir))
            peak, end = max(peak, disk.peak), disk.end
            print(f"bundle: {written[-1]} ({written[-1].stat().st_size / 1e6:.2f} MB); stage {name} seed {seed}: "
                  f"{disk.said()} under the run's folders", flush=True)
    print(f"{len(written)} shard(s) of profile {profile.name} in {time.perf_counter() - t0:.1f} s: "
          f"{_bytes_said(start, end, peak, DISK_SAMPLE_SECONDS)} under {results_dir(profile.name)}", flush=True)
    return written


def run_next_shards(profile_name: str, minutes: float, overrides: dict | None = None, bundle_dir: Path | None = None,
                    clock=time.monotonic) -> tuple[list[plan.Command], dict[tuple[str, int], str]]:
    """The shards still to run that this machine can finish within ``minutes``, one shard command after another:
    the first command of ``plan.machine_plan`` that fits the time left, then the state read again (the bundles it
    wrote, the models it left on this machine), and so on until nothing fits. Every bundle lands in ``bundle_dir``
    (default results/<profile>/bundles) as its stage finishes, where bundles already there count as done. A command
    that stops (e.g. a re-trained model whose weights differ from the recorded ones, a diverged training, a bundle
    that does not merge) does not end the session: its stages are left out from then on, and so is a model it
    starts from whose weights here differ from the recorded ones, with everything that needs them; the others go
    on. Returns the commands run and (stage, seed) -> why it failed."""
    profile = load_profile(profile_name, overrides or {})
    folder = Path(bundle_dir) if bundle_dir else results_dir(profile.name) / "bundles"
    cpu = resolve_device(profile.device).type == "cpu"
    deadline, ran, stopped, failed = clock() + minutes * 60, [], 0, {}
    while True:
        done = plan.Done.read(profile, folder)
        commands, left = plan.machine_plan(done, deadline - clock(), cpu, failed)
        if not commands:
            break
        c = commands[0]
        if any((c.seed, c.stages) == (r.seed, r.stages) for r in ran):
            raise shards.ShardError(f"stages {','.join(c.stages)} seed {c.seed} ran here but are still to run: look "
                                    f"for their shards under {shards.root(profile)} and their bundles in {folder}")
        inputs = [bundle for r in c.reads if (bundle := done.shards.get((r, c.seed), (None, None))[1]) is not None]
        print(f"# next: stages {','.join(c.stages)} seed {c.seed}, ~{c.seconds / 60:.0f} min ({c.basis}); "
              f"{max(deadline - clock(), 0) / 60:.0f} min left", flush=True)
        ran.append(c)
        try:
            run_shards(profile_name, list(c.stages), [c.seed], overrides, folder, inputs)
        except (shards.ShardError, TrainingDiverged) as e:
            stopped += 1
            why = str(e).split(". ")[0]
            new = {(n, c.seed): why for n in c.stages}
            new |= {(m, c.seed): f"its weights here are {d[:12]}, its record {r[:12]}"
                    for m, d, r in _models_unlike_their_record(profile, c, plan.Done.read(profile, folder))}
            failed |= new
            print(f"# stages {','.join(c.stages)} seed {c.seed} stopped: {e}; what needs "
                  f"{', '.join(n for n, _ in new)} is left out, the rest goes on", flush=True)
    print(f"# {len(ran)} shard command(s) ran, {stopped} stopped; {max(deadline - clock(), 0) / 60:.0f} min left; "
          + (f"not run: {'; '.join(left)}" if left else "no shard is left to run"), flush=True)
    return ran, failed


def _models_unlike_their_record(profile, c: plan.Command, done: plan.Done) -> list[tuple[str, str, str]]:
    """The models a command's stages start from whose checkpoint on this machine differs from the weights their
    stage recorded: (model, digest here, recorded digest)."""
    registry = stages_mod.stages(profile)
    ctx = stages_mod.Context(profile, log=lambda _: None)
    models = dict.fromkeys([*c.retrains, *(d for n in c.stages for d in registry[n].models if d not in c.stages)])
    out = []
    for m in models:
        recorded = (done.manifest(m, c.seed) or {}).get("final_digest")
        checkpoint = registry[m].checkpoint
        if recorded and registry[m].digest and checkpoint and checkpoint(ctx, c.seed).exists():
            here = registry[m].digest(ctx, c.seed)
            if here and here != recorded:
                out.append((m, here, recorded))
    return out
