"""Beyond one machine: the study's stages as jobs on a Slurm cluster (through submitit), or as local processes.

    python -m ood_lib.reproduce --profile cifar10 --executor slurm --shared-dir /shared/ood \\
        --slurm-partition gpu --gpus-per-job 1

submits the stages of the profile (``ood_lib.stages``) seed by seed as jobs, waits for them, then runs the
analysis notebooks once, in this process, on the tables the jobs left in the shared folder (the notebooks with
``compute=False``: they never train). Without ``sbatch`` on this machine the same command runs the same jobs as
local processes (submitit's ``LocalExecutor``); ``--executor local`` (the default) is the runner without jobs.

Design (why it is built this way):

* One job per (stage, seed) (``per="stage"``, the default), or one job per seed that runs all of that seed's stages
  in order (``per="seed"``: fewer, longer jobs where the start-up of a job costs more than its stage). A job runs
  ``shards.Runner(profile).tables(stage, seed)`` in-process, with ``OOD_RESULTS_DIR`` / ``OOD_FIGURES_DIR``
  pointing into the shared folder: its tables land in ``results/<profile>/shards/...`` with their manifest written
  last, its weights in ``results/<profile>/cache/``, where the jobs after it find them. No bundles are needed.
* Dependencies are kept by the submitting process, not by Slurm: a job is submitted once every stage it depends on
  (``inputs``: tables, ``models``: weights; always of the same seed) has its manifest. Slurm's
  ``--dependency=afterok`` would chain jobs without a waiting submitter, but a resubmitted job gets a new id, and
  every job queued behind the old one would then wait forever (DependencyNeverSatisfied). Waiting for manifests
  costs one poll interval per level of the graph (three levels in the study) and needs no job ids at all.
* The truth about what is finished is the shard manifests (``shards.done``), not Slurm's job state. A job counts
  as done when the manifests of all its stages exist; stages already done when the command starts are never
  submitted again, so running the same command after a stop continues where it stopped.
* Faults. A job that ends without its manifests (failed, cancelled, pre-empted, timed out, node failure, killed)
  is resubmitted, up to ``max_retries`` times. The new job continues: training resumes from the run's ``state.pt``
  (``ood_lib.train``) and stages already finished are read back. Jobs are ``submitit.helpers.Checkpointable``, so a
  job that reaches its time limit (or is pre-empted with Slurm's signal) requeues itself under the same id. A job
  that keeps failing stops the study with ``ClusterError`` naming the job, its Slurm ids, its log and its error;
  jobs still running are cancelled (they resume from their checkpoints next time); finished shards stay.
* Job states come from ``squeue`` (jobs stay listed ``MinJobAge`` seconds after they end), not from ``sacct``, which
  needs Slurm's accounting database (absent on small clusters and on the tests' one-node cluster). A job no longer
  listed is judged by its manifests and by submitit's result file (its Python error, when it raised one). A
  squeue that fails (a busy or restarting controller) is asked again at the next poll, for up to 15 minutes.
* Where state lives: one shared folder (``shared_dir``; default: the results folder this process uses, which must
  then be on a filesystem every node mounts at the same path). It becomes ``OOD_RESULTS_DIR`` (``<shared>/results``)
  and ``OOD_FIGURES_DIR`` (``<shared>/figures``) for the jobs and for the analysis. Every job first checks a marker
  file that the submitter wrote there (with a random token) and stops with a clear error when it cannot see it;
  such a job is not retried. The data caches (``OOD_DATA_DIR``) and raw data (``OOD_DATA_ROOT``) are passed on as
  the submitter resolves them, and every dataset is converted once here before any job starts.
* Logs: ``results/<profile>/jobs/<run>/<stage>_seed<k>/<slurm id>/`` holds each job's log (``<id>_0_log.out``,
  stdout and stderr together on Slurm) and submitit's pickles; ``jobs.csv`` beside them lists every attempt.
"""
from __future__ import annotations

import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import submitit

from ood_lib.paths import figures_dir, results_dir

EXECUTORS = ("slurm", "submitit-local")  # "local" (no jobs, today's runner) is handled by ood_lib.reproduce
MAX_RETRIES = 2                # a job is submitted at most 1 + MAX_RETRIES times
POLL_S = 5.0                   # seconds between two looks at the queue and the manifests
CPUS_PER_JOB = 2
TIME_PER_JOB_MIN = 24 * 60     # Slurm's --time of every job; a job past it requeues itself (Checkpointable)
SIGNAL_DELAY_S = 120           # Slurm warns a job this long before its time limit (submitit then requeues it)
MAX_TIMEOUTS = 3               # requeues after a time limit or pre-emption signal, per job (submitit)
FAIL_ENV = "OOD_CLUSTER_FAIL"  # test hook: "stage" or "stage:seed" makes those jobs raise before any work
MARKER = "shared-dir-marker"
SQUEUE_PATIENCE_S = 900        # squeue may fail this long (a restarting controller) before the study stops
# Slurm states of a job that is not over yet (any other state, or a job squeue no longer lists, is over).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


class ClusterError(RuntimeError):
    """The study's jobs cannot go on: a job that keeps failing, a shared folder a job cannot see, a bad option."""


class SqueueError(RuntimeError):
    """squeue did not answer (a busy or restarting controller): the submitter waits and asks again."""


class SharedDirError(RuntimeError):
    """Raised inside a job that cannot see the marker its submitter wrote into the shared folder (not retried)."""


@dataclass(frozen=True)
class Options:
    """How the jobs are run. Every default is visible here and in ``python -m ood_lib.reproduce --help``."""
    executor: str = "slurm"              # "slurm" (local processes when sbatch is missing) or "submitit-local"
    shared_dir: Path | None = None       # None: the results/figures folders this process uses
    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = CPUS_PER_JOB
    mem_gb: float | None = None
    time_min: int = TIME_PER_JOB_MIN
    max_retries: int = MAX_RETRIES
    per: str = "stage"                   # "stage": a job per (stage, seed); "seed": a job per seed
    max_jobs: int | None = None          # at most this many jobs queued or running at once (None: no limit on
                                         # Slurm; locally, as many as the CPUs hold)
    slurm_parameters: dict = field(default_factory=dict)  # further sbatch options, e.g. {"account": "x"}
    poll_s: float = POLL_S
    analysis: bool = True                # run the analysis notebooks once the jobs are done


@dataclass(frozen=True)
class Unit:
    """The work of one job: ``stages`` of one seed, in order, once the stages in ``needs`` are done."""
    seed: int
    stages: tuple[str, ...]
    needs: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.stages[0]}_seed{self.seed}" if len(self.stages) == 1 else f"seed{self.seed}"

    def describe(self) -> str:
        return f"job {self.name} (stage{'s' if len(self.stages) > 1 else ''} {','.join(self.stages)}, seed {self.seed})"


@dataclass(frozen=True)
class JobSpec:
    """What a job is given (pickled by submitit): the profile, its work, where state lives and the marker."""
    profile: str
    overrides: dict
    unit: Unit
    env: dict
    marker: str
    token: str


class StageJob(submitit.helpers.Checkpointable):
    """The function every job runs: check the shared folder, then run the unit's stages in this process. As a
    ``Checkpointable`` it requeues itself when Slurm signals a time limit or pre-emption; the requeued job resumes
    from the stages' own checkpoints."""

    def __call__(self, spec: JobSpec) -> dict:
        # submitit ignores SIGTERM (to finish a checkpoint after its own pre-emption signal); a stage has nothing
        # to save (its epoch checkpoints are written as it goes), so a cancelled or killed job stops at once
        # instead of training on for Slurm's KillWait seconds.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        host = socket.gethostname()
        marker = Path(spec.marker)
        try:
            seen = marker.read_text().strip()
        except OSError:
            seen = None
        if seen != spec.token:
            what = "missing" if seen is None else "of another run"
            raise SharedDirError(f"{spec.unit.describe()} on host {host} cannot see the shared folder: the marker "
                                 f"{marker} that the submitter wrote is {what}. Give --shared-dir a folder that "
                                 "every node mounts at the same path")
        os.environ.update(spec.env)
        fail = os.environ.get(FAIL_ENV, "")
        for target in filter(None, (t.strip() for t in fail.split(","))):
            stage, _, seed = target.partition(":")
            if stage in spec.unit.stages and (not seed or int(seed) == spec.unit.seed):
                raise RuntimeError(f"injected failure ({FAIL_ENV}={fail}) in {spec.unit.describe()}")
        from ood_lib import shards
        from ood_lib.config import load_profile

        profile = load_profile(spec.profile, spec.overrides)
        runner = shards.Runner(profile, log=lambda s: print(s, flush=True))
        print(f"{spec.unit.describe()} on {host}: results in {os.environ['OOD_RESULTS_DIR']}", flush=True)
        for name in spec.unit.stages:
            runner.tables(name, spec.unit.seed)
        return {name: shards.manifest(profile, name, spec.unit.seed)["seconds"] for name in spec.unit.stages}


# --- what to run ------------------------------------------------------------------------------------------------

def units(profile, notebooks: list[str], per: str = "stage") -> list[Unit]:
    """The jobs of a study: one per (stage, seed), or one per seed."""
    from ood_lib import stages as stages_mod

    registry = stages_mod.stages(profile)
    names = stages_mod.needed_stages(profile, notebooks)

    def runs(name: str, seed: int) -> bool:  # a stage may run for some of the profile's seeds only
        s = registry[name]
        return not hasattr(s, "runs_for") or seed in s.runs_for(profile)

    if per == "seed":
        return [Unit(seed, own, ()) for seed in profile.seeds if (own := tuple(n for n in names if runs(n, seed)))]
    if per != "stage":
        raise ClusterError(f"per={per!r}: expected 'stage' or 'seed'")
    return [Unit(seed, (name,), tuple(dict.fromkeys((*registry[name].inputs, *registry[name].models))))
            for seed in profile.seeds for name in names if runs(name, seed)]


# --- executors ----------------------------------------------------------------------------------------------------

def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def _squeue(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, node)}`` of the jobs squeue still lists (all states; node "" while pending)."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%N"],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SqueueError("squeue did not answer within 120 s") from None
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}  # none of them is listed any more
        raise SqueueError(f"squeue failed ({proc.returncode}): {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


@dataclass
class Attempt:
    unit: Unit
    spec: JobSpec
    number: int
    job: submitit.Job
    submitted: float
    state: str = "SUBMITTED"
    where: str = ""
    ended: float | None = None
    error: str = ""

    @property
    def log(self) -> Path:
        return Path(self.job.paths.stdout)

    def logs(self) -> str:
        err = Path(self.job.paths.stderr)
        return f"{self.log}" + (f" and {err}" if err != self.log and err.exists() else "")

    def succeeded(self, wait_s: float = 0.0) -> bool:
        """Whether submitit's result file says the job returned, and its stages' manifests are all there (looked
        for up to ``wait_s`` seconds: a shared filesystem may show another node's files late)."""
        from ood_lib import shards
        from ood_lib.config import load_profile

        path = Path(self.job.paths.result_pickle)
        try:
            path.parent.chmod(path.parent.stat().st_mode)  # refreshes an NFS client's view of the folder
            outcome, _ = submitit.core.utils.pickle_load(path)
        except Exception:
            return False
        if outcome != "success":
            return False
        spec = self.spec
        profile = load_profile(spec.profile, spec.overrides)
        deadline = time.time() + wait_s
        while True:
            if all(shards.done(profile, s, self.unit.seed) for s in self.unit.stages):
                return True
            if time.time() >= deadline:
                return False
            time.sleep(2)

    def python_error(self) -> str:
        """The job's Python error (last line of its traceback) from submitit's result file, '' when none."""
        path = Path(self.job.paths.result_pickle)
        if not path.exists():
            return ""
        try:
            outcome, payload = submitit.core.utils.pickle_load(path)
        except Exception as e:  # a result file cut short: say so rather than hide the job's state
            return f"(unreadable result file {path}: {e})"
        if outcome != "error":
            return ""
        lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else str(payload)


# --- the submitter ------------------------------------------------------------------------------------------------

def _now() -> str:
    return time.strftime("%H:%M:%S")


def _shared_paths(shared_dir: Path | None) -> tuple[Path, Path]:
    """The results and figures roots of the jobs: ``<shared>/results`` and ``<shared>/figures``, or this process's."""
    if shared_dir is None:
        return results_dir("_").parent, figures_dir("_").parent
    shared = Path(shared_dir).expanduser().resolve()
    try:
        shared.mkdir(parents=True, exist_ok=True)
        probe = shared / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ClusterError(f"--shared-dir {shared} cannot be written here ({e})") from None
    return shared / "results", shared / "figures"


def _write_marker(path: Path, token: str) -> None:
    path.write_text(token + "\n")


def _fetch_data(profile) -> None:
    """Convert every dataset the profile reads once, here, before jobs race to do it (and fail early when one is
    missing, with the data registry's message)."""
    from ood_lib.data import DATASETS, load_dataset

    d = profile.data
    for name, split in [(d.id_set, "train"), (d.id_set, "test")] + [(n, DATASETS[n].ood_split) for n in d.ood_sets]:
        load_dataset(name, split)


class Study:
    """Submits the units of one profile, keeps them going and reports; ``run()`` does it all."""

    def __init__(self, profile_name: str, notebooks: list[str] | None, overrides: dict, options: Options,
                 log: Callable[[str], None] = print):
        from ood_lib.stages import notebooks_to_run

        if options.executor not in EXECUTORS:
            raise ClusterError(f"executor {options.executor!r}: expected one of {EXECUTORS}")
        if options.max_retries < 0 or options.cpus_per_job < 1 or options.gpus_per_job < 0:
            raise ClusterError("--max-retries and --gpus-per-job must be >= 0, --cpus-per-job >= 1")
        self.options, self.overrides, self.log = options, dict(overrides), log
        self.profile, paths = notebooks_to_run(profile_name, notebooks, overrides)
        self.notebooks = [p.name[:2] for p in paths]
        self.kind = options.executor
        if self.kind == "slurm" and not slurm_available():
            log("no sbatch/squeue on this machine: the jobs run here as local processes (submitit's LocalExecutor)")
            self.kind = "submitit-local"
        self.results_root, self.figures_root = _shared_paths(options.shared_dir)
        self.attempts: list[Attempt] = []
        self.squeue_failing_since: float | None = None

    # environment of the jobs and of the analysis
    def env(self) -> dict[str, str]:
        from ood_lib.paths import data_dir, data_root, models_root

        env = {"OOD_RESULTS_DIR": str(self.results_root), "OOD_FIGURES_DIR": str(self.figures_root),
               "OOD_DATA_DIR": str(data_dir()), "PYTHONUNBUFFERED": "1"}
        if data_root() is not None:
            env["OOD_DATA_ROOT"] = str(data_root())
        if models_root() is not None:
            env["OOD_MODELS_ROOT"] = str(models_root())
        return env

    def _executor(self, unit: Unit, folder: Path):
        o = self.options
        if self.kind == "slurm":
            ex = submitit.SlurmExecutor(folder=folder / unit.name / "%j", max_num_timeout=MAX_TIMEOUTS)
            params = {"job_name": f"ood-{self.profile.name}-{unit.name}", "time": o.time_min,
                      "cpus_per_task": o.cpus_per_job, "partition": o.partition,
                      "gpus_per_node": o.gpus_per_job or None,
                      "mem": f"{o.mem_gb:g}GB" if o.mem_gb else None, "signal_delay_s": SIGNAL_DELAY_S,
                      "stderr_to_stdout": True, "additional_parameters": dict(o.slurm_parameters) or None}
            ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        else:
            ex = submitit.LocalExecutor(folder=folder / unit.name / "%j", max_num_timeout=MAX_TIMEOUTS)
            ex.update_parameters(timeout_min=o.time_min, gpus_per_node=o.gpus_per_job)
        return ex

    def _states(self, active: list[Attempt]) -> None:
        """Update ``state``/``where`` of the active attempts; an attempt that is over gets ``ended``."""
        if self.kind == "slurm":
            try:
                listed = _squeue([a.job.job_id for a in active])
                self.squeue_failing_since = None
            except SqueueError as e:  # the jobs go on without us: ask again next time, give up after a while
                since = self.squeue_failing_since = self.squeue_failing_since or time.time()
                if time.time() - since > SQUEUE_PATIENCE_S:
                    raise ClusterError(f"{e}; squeue has failed for {time.time() - since:.0f} s") from None
                self.log(f"[{_now()}] {e}; asking again in {self.options.poll_s:g} s")
                return
            for a in active:
                state, where = listed.get(a.job.job_id, ("NOT LISTED", a.where))
                a.state = state.split()[0] if state else "UNKNOWN"
                a.where = where or a.where
                if a.state not in ACTIVE_STATES:
                    a.ended = time.time()
        else:
            for a in active:
                a.state = a.job.state
                a.where = socket.gethostname()
                if a.state != "RUNNING":
                    a.ended = time.time()

    def _cancel(self, attempts: list[Attempt]) -> None:
        for a in attempts:
            try:
                if self.kind == "slurm":
                    subprocess.run(["scancel", a.job.job_id], capture_output=True, timeout=60)
                else:
                    a.job.cancel(check=False)
            except Exception as e:  # cancelling is best effort; say what could not be cancelled
                self.log(f"could not cancel job {a.job.job_id} of {a.unit.name}: {e}")

    def _record(self, a: Attempt, event: str) -> None:
        path = self.run_dir / "jobs.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "job", "stages", "seed", "attempt", "job_id", "event", "state", "where", "log",
                            "error"])
            w.writerow([time.strftime("%Y-%m-%dT%H:%M:%S"), a.unit.name, ",".join(a.unit.stages), a.unit.seed,
                        a.number, a.job.job_id, event, a.state, a.where, a.log, a.error])

    def run(self) -> dict:
        """Submit, watch and resubmit until every job's stages are done (or one keeps failing); then the analysis.
        Returns timings: ``{"jobs_s", "analysis_s", "attempts", "resubmitted"}``."""
        from ood_lib import shards

        o, p = self.options, self.profile
        saved = {k: os.environ.get(k) for k in ("OOD_RESULTS_DIR", "OOD_FIGURES_DIR")}
        os.environ["OOD_RESULTS_DIR"], os.environ["OOD_FIGURES_DIR"] = str(self.results_root), str(self.figures_root)
        try:
            t0 = time.perf_counter()
            todo = [u for u in units(p, self.notebooks, o.per)
                    if not all(shards.done(p, s, u.seed) for s in u.stages)]
            n_all = len(units(p, self.notebooks, o.per))
            self.log(f"profile {p.name}: {n_all} job(s) for notebooks {','.join(self.notebooks)}, "
                     f"{n_all - len(todo)} already done; executor {self.kind}; shared folder {self.results_root}")
            if todo:
                self._jobs(todo)
            jobs_s = time.perf_counter() - t0
            self.log(f"all jobs of profile {p.name} done in {jobs_s:.1f} s")
            analysis_s = 0.0
            if o.analysis:
                from ood_lib import execute

                t1 = time.perf_counter()
                execute.run(p.name, self.notebooks, self.overrides, compute=False)
                analysis_s = time.perf_counter() - t1
                self.log(f"analysis in {analysis_s:.1f} s: {results_dir(p.name) / 'metrics.csv'}")
            return {"jobs_s": jobs_s, "analysis_s": analysis_s, "attempts": len(self.attempts),
                    "resubmitted": sum(a.number > 1 for a in self.attempts)}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _jobs(self, todo: list[Unit]) -> None:
        from ood_lib import shards

        o, p = self.options, self.profile
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = results_dir(p.name) / "jobs" / f"{stamp}-{os.getpid()}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        marker = self.run_dir / MARKER
        _write_marker(marker, token)
        self.log(f"logs: {self.run_dir} (jobs.csv lists every job)")
        _fetch_data(p)
        env = self.env()
        max_jobs = o.max_jobs
        if max_jobs is None and self.kind != "slurm":
            max_jobs = max(1, (os.cpu_count() or 1) // o.cpus_per_job)
        waiting = list(todo)
        active: list[Attempt] = []
        tries: dict[Unit, int] = {}

        def submit(unit: Unit) -> None:
            tries[unit] = tries.get(unit, 0) + 1
            spec = JobSpec(p.name, self.overrides, unit, env, str(marker), token)
            job = self._executor(unit, self.run_dir).submit(StageJob(), spec)
            try:  # the executor's own folder, named by the pattern; empty once the job has its own
                (self.run_dir / unit.name / "%j").rmdir()
            except OSError:
                pass
            a = Attempt(unit, spec, tries[unit], job, time.time())
            self.attempts.append(a)
            active.append(a)
            self._record(a, "submitted")
            again = f" (attempt {a.number} of {1 + o.max_retries})" if a.number > 1 else ""
            self.log(f"[{_now()}] submitted {unit.describe()} as job {job.job_id}{again}")

        try:
            while waiting or active:
                ready = [u for u in waiting if all(shards.done(p, d, u.seed) for d in u.needs)]
                for unit in ready:
                    if max_jobs is not None and len(active) >= max_jobs:
                        break
                    waiting.remove(unit)
                    submit(unit)
                if not active:
                    missing = {d for u in waiting for d in u.needs if not shards.done(p, d, u.seed)}
                    raise ClusterError(f"no job can start: {[u.name for u in waiting]} wait for {sorted(missing)}, "
                                       "which no job computes")
                time.sleep(o.poll_s)
                self._states(active)
                for a in [a for a in active if a.ended is not None]:
                    active.remove(a)
                    if all(shards.done(p, s, a.unit.seed) for s in a.unit.stages):
                        self._record(a, "done")
                        self.log(f"[{_now()}] {a.unit.name} done (job {a.job.job_id}, {a.state.lower()}, "
                                 f"{a.ended - a.submitted:.0f} s after submission)")
                        continue
                    self._failed(a, active, submit)
        except BaseException:
            if active:
                self.log(f"cancelling {len(active)} job(s) still queued or running: "
                         f"{', '.join(f'{a.unit.name} ({a.job.job_id})' for a in active)}; the same command "
                         "continues them from their checkpoints")
                self._cancel(active)
            raise

    def _failed(self, a: Attempt, active: list[Attempt], submit: Callable[[Unit], None]) -> None:
        """An attempt that ended without its manifests: resubmit it, or stop the study."""
        o = self.options
        if self.kind == "slurm":
            self._cancel([a])  # a pre-empted job that Slurm would requeue must not run beside its replacement
        if a.succeeded(wait_s=60):  # a slow shared filesystem may show the manifests late
            self._record(a, "done")
            self.log(f"[{_now()}] {a.unit.name} done (job {a.job.job_id}; its manifests showed up late)")
            return
        error = a.python_error()
        unseen = "SharedDirError" in error
        no_log = not a.log.exists()
        a.error = reason = error or (f"job state {a.state}" + (" and no log: can its node see the shared folder?"
                                                                if no_log else ""))
        self._record(a, "failed")
        self.log(f"[{_now()}] {a.unit.describe()} ended without its results (job {a.job.job_id}, state {a.state}"
                 f"{' on ' + a.where if a.where else ''}): {reason}")
        if unseen or a.number > o.max_retries:
            ids = [x.job.job_id for x in self.attempts if x.unit == a.unit]
            why = ("it cannot see the shared folder" if unseen
                   else f"it failed {a.number} time{'s' if a.number > 1 else ''}")
            raise ClusterError(
                f"{a.unit.describe()} stopped the study: {why} (job id{'s' if len(ids) > 1 else ''} "
                f"{', '.join(ids)}). Last error: {reason}. Its log: {a.logs()}. Finished stages are kept under "
                f"{results_dir(self.profile.name) / 'shards'}; fix the cause and run the same command again: it "
                "continues where the study stopped.")
        submit(a.unit)


def run(profile_name: str, notebooks: list[str] | None = None, overrides: dict | None = None,
        options: Options | None = None, log: Callable[[str], None] = print) -> dict:
    """Run a profile's stages as jobs (``Options``), then its analysis notebooks on the shared folder."""
    return Study(profile_name, notebooks, overrides or {}, options or Options(), log).run()
