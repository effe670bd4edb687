"""Run the study: its notebooks headlessly with papermill, or its stages as shards, and merge shards.

    python -m ood_lib.reproduce --profile default [--notebooks 01,03] [--set train.epochs=3 ...]
        every notebook of the profile in order; each computes the stages it reads that have not run yet.

    python -m ood_lib.reproduce --profile cifar10 --stages base,atypical,gamma --seeds 0 [--bundle-dir DIR]
        a shard command: those stages for those seeds, in this process, without papermill or Jupyter; writes one
        bundle per (stage, seed) to DIR (default results/<profile>/bundles). Stages whose tables come from
        another machine are given with --inputs BUNDLE ... (merged first, with the checks of --merge).

    python -m ood_lib.reproduce --profile cifar10 --merge BUNDLE ...
        check and merge bundles from other machines, then run the analysis: every notebook whose stages are
        complete, on the seeds they are complete for, without training anything; then report.html.

    python -m ood_lib.reproduce --profile cifar10 --plan
        every (stage, seed) of the profile: done or not, and the command of each shard still to run.

Executed notebooks go to ``results/<profile>/notebooks/``. The profile and every ``--set`` override are validated
before any work (an unknown name fails with the allowed names listed), and so are the output folders (writable)
and the data sets (present). The kernel's progress bars (training epochs, extraction) are drawn on this console
(``ood_lib.progress``). A failing notebook, a full disk or an unwritable folder ends in one paragraph: the
notebook, the cell, the exception and its message (or the path and the fix), and the executed copy that holds
the full traceback. ``--set`` overrides must be the same for
the shard commands and the merge (the bundles record the profile's digest).
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sys
import time
from pathlib import Path

from ood_lib.config import ProfileError, available_profiles, load_profile, parse_override
from ood_lib.paths import PROJECT_ROOT, results_dir

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
STAGED_NOTEBOOKS = ("01", "02", "03", "04", "06")  # the notebooks that read stages (and take the `compute` parameter)


def kernel_config():  # papermill's kernels: CurveZMQ-encrypted channels (no plain-TCP warning)
    import zmq
    from traitlets.config import Config
    return Config(KernelManager={"transport_encryption": "auto" if zmq.has("curve") else "disabled"})


def notebook_files() -> dict[str, Path]:
    """'01' -> notebooks/01_intermediate_stage.ipynb, for every notebook present."""
    return {p.name[:2]: p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))}


class RunError(Exception):
    """A run that cannot start or did not finish, explained in one paragraph (the runner prints it, no traceback)."""


def plan(profile_name: str, notebooks: list[str] | None, overrides: dict) -> tuple[object, list[Path]]:
    """Validate everything up front; return the profile and the notebooks to run, in order."""
    if profile_name not in available_profiles():
        raise ProfileError(f"unknown profile {profile_name!r}; allowed: {available_profiles()}")
    profile = load_profile(profile_name, overrides)
    files = notebook_files()
    wanted = notebooks or list(profile.notebooks)
    unknown = [n for n in wanted if n not in files]
    if unknown:
        raise ProfileError(f"unknown notebook(s) {unknown}; allowed: {sorted(files)}")
    return profile, [files[n] for n in sorted(wanted)]


def checkpoints_needed(profile, stages: list[str] | None = None) -> list[str]:
    """The pretrained checkpoints (``models.PRETRAINED`` names) that the given stages, or the profile's notebooks,
    load: notebook 00 and 04's ``profile.pretrained``, notebook 06's ``um.paper_checkpoint``."""
    nbs = set(profile.notebooks)
    wanted = []
    if profile.pretrained and nbs & {"00", "04"}:
        wanted += [n for n in profile.pretrained if stages is None or f"posthoc_{n}" in stages or "00" in nbs]
    if profile.um.paper_checkpoint and "06" in nbs and (stages is None or any(s.startswith("paper_") for s in stages)):
        wanted.append(profile.um.paper_checkpoint)
    return list(dict.fromkeys(wanted))


def preflight(profile, data: bool = True, stages: list[str] | None = None) -> None:
    """Before any work: every folder the run writes is writable, and every data set the profile names and every
    pretrained checkpoint its stages load is present (nothing is read). Raises ``RunError`` naming the folder, the
    set or the file and the fix."""
    from ood_lib.data import DATASETS
    from ood_lib.paths import data_dir, figures_dir

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
    d = profile.data
    needs = [(d.id_set, "train"), (d.id_set, "test")] + [(n, DATASETS[n].ood_split) for n in d.ood_sets]
    missing = [m for m in (DATASETS[name].present(split) for name, split in needs) if m]
    from ood_lib.models import PRETRAINED
    from ood_lib.paths import models_root
    folder = models_root() or PROJECT_ROOT.parent / "shared" / "models"
    for name in checkpoints_needed(profile, stages):
        path = folder / PRETRAINED[name].filename
        if not path.is_file():
            missing.append(f"pretrained checkpoint {name!r}: {path} does not exist. Set OOD_MODELS_ROOT to the folder "
                           f"that holds {PRETRAINED[name].filename} (on the study machines ../shared/models; on a "
                           f"device machine .device/models, made by scripts/device_data.sh); it comes from "
                           f"{PRETRAINED[name].source}.")
    if missing:
        raise RunError("\n".join(missing) + "\nNothing was run.")


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

    from ood_lib import progress

    executed = out_dir / path.name
    events = out_dir / f".progress-{path.stem}.jsonl"
    follower = progress.started(events)
    os.environ[progress.ENV] = str(events)
    try:
        papermill.execute_notebook(str(path), str(executed), cwd=str(NOTEBOOK_DIR), parameters=parameters,
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
    from ood_lib import shards
    from ood_lib.report import write_report

    overrides = overrides or {}
    profile, paths = plan(profile_name, notebooks, overrides)
    out_dir = results_dir(profile.name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for i, path in enumerate(paths, 1):
        nb = path.name[:2]
        params = {"profile": profile.name, "overrides": overrides}
        if nb in STAGED_NOTEBOOKS:
            params["compute"] = compute
        if not compute and nb in STAGED_NOTEBOOKS:
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


def run_shards(profile_name: str, stages: list[str], seeds: list[int] | None, overrides: dict | None = None,
               bundle_dir: Path | None = None, inputs: list[Path] = ()) -> list[Path]:
    """A shard command: merge ``inputs``, run ``stages`` for ``seeds`` in this process, write one bundle each."""
    from ood_lib import shards

    profile = load_profile(profile_name, overrides or {})
    if inputs:
        shards.merge(profile, inputs)
    runner = shards.Runner(profile)
    for name in stages:
        runner.stage(name)  # an unknown stage fails before any work
    seeds = list(profile.seeds) if seeds is None else seeds
    bundle_dir = Path(bundle_dir) if bundle_dir else results_dir(profile.name) / "bundles"
    order = [name for name in runner.registry if name in stages]
    written = []
    t0 = time.perf_counter()
    for seed in seeds:
        for name in (n for n in order if seed in runner.stage(n).runs_for(profile)):
            runner.tables(name, seed)
            written.append(shards.pack(profile, name, seed, bundle_dir))
            print(f"bundle: {written[-1]} ({written[-1].stat().st_size / 1e6:.2f} MB)", flush=True)
    print(f"{len(written)} shard(s) of profile {profile.name} in {time.perf_counter() - t0:.1f} s")
    return written


def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _job_options(args):
    """The ``cluster.Options`` of ``--executor slurm|submitit-local``; None for the runner without jobs. Job options
    without such an executor, or an executor with --stages/--merge/--plan, are a usage error."""
    given = [f"--{k.replace('_', '-')}" for k in ("slurm_partition", "cpus_per_job", "mem_per_job", "time_per_job",
                                                   "max_retries", "max_jobs", "poll_seconds")
             if getattr(args, k) is not None]
    given += ["--gpus-per-job"] * bool(args.gpus_per_job) + ["--slurm-option"] * bool(args.slurm_option)
    given += ["--job-per"] * (args.job_per != "stage") + ["--no-analysis"] * args.no_analysis
    if args.executor == "local":
        if given or (args.shared_dir and not args.plan):
            raise ProfileError(f"{', '.join(given) or '--shared-dir'} go{'es' if len(given) < 2 else ''} with "
                               "--executor slurm or submitit-local")
        return None
    if args.stages or args.merge or args.plan:
        raise ProfileError(f"--executor {args.executor} runs the whole study: not with --stages, --merge or --plan")
    from ood_lib import cluster

    numbers = {"--gpus-per-job": args.gpus_per_job, "--cpus-per-job": args.cpus_per_job,
               "--max-retries": args.max_retries, "--max-jobs": args.max_jobs, "--time-per-job": args.time_per_job,
               "--mem-per-job": args.mem_per_job, "--poll-seconds": args.poll_seconds}
    low = {"--gpus-per-job": 0, "--max-retries": 0}
    bad = [f"{k} {v}" for k, v in numbers.items() if v is not None and v < low.get(k, 1e-9)]
    if bad:
        raise ProfileError(f"{', '.join(bad)}: must be positive (--gpus-per-job and --max-retries may be 0)")
    extra = {}
    for item in args.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ProfileError(f"--slurm-option {item!r}: expected KEY=VALUE, e.g. account=myproject")
        extra[key.strip().lstrip("-")] = value.strip()
    kw = {"cpus_per_job": args.cpus_per_job, "mem_gb": args.mem_per_job, "time_min": args.time_per_job,
          "max_retries": args.max_retries, "max_jobs": args.max_jobs, "poll_s": args.poll_seconds}
    return cluster.Options(executor=args.executor, shared_dir=args.shared_dir, partition=args.slurm_partition,
                           gpus_per_job=args.gpus_per_job, per=args.job_per, slurm_parameters=extra,
                           analysis=not args.no_analysis,
                           **{k: v for k, v in kw.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ood_lib.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help=f"one of {available_profiles()}")
    ap.add_argument("--notebooks", default=None, help="comma-separated notebook numbers, e.g. 01,03 "
                                                      "(default: the profile's own list)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a profile parameter, e.g. --set train.epochs=3 (repeatable)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--stages", default=None, help="shard command: comma-separated stages to run (see --plan)")
    mode.add_argument("--merge", nargs="+", type=Path, metavar="BUNDLE", help="merge bundles, then run the analysis")
    mode.add_argument("--plan", action="store_true", help="list every (stage, seed) of the profile and its status")
    ap.add_argument("--seeds", default=None, help="with --stages: comma-separated seeds (default: the profile's)")
    ap.add_argument("--bundle-dir", type=Path, default=None, help="with --stages: where bundles go "
                                                                  "(default: results/<profile>/bundles)")
    ap.add_argument("--inputs", nargs="+", type=Path, default=[], metavar="BUNDLE",
                    help="with --stages: bundles from other machines that these stages read")
    ap.add_argument("--allow-mixed-code", action="store_true", help="with --merge: accept bundles computed by "
                                                                    "different versions of the library")
    ap.add_argument("--allow-mixed-models", action="store_true", help="with --merge: accept stages of a seed that "
                    "used other weights of a model (e.g. a re-trained base) than that model's own stage recorded")
    jobs = ap.add_argument_group("jobs (ood_lib.cluster, docs/cluster.md)")
    jobs.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                      help="local (default): the notebooks compute their stages in this process; slurm: every "
                           "(stage, seed) as a Slurm job through submitit, then the analysis here (local processes "
                           "when sbatch is missing); submitit-local: those jobs as local processes")
    jobs.add_argument("--shared-dir", type=Path, default=None, help="a folder every node sees at the same path: "
                      "results (and caches, checkpoints, job logs) go to DIR/results, figures to DIR/figures "
                      "(default: this machine's results and figures folders); also with --plan")
    jobs.add_argument("--slurm-partition", default=None, help="Slurm partition of the jobs (default: the cluster's)")
    jobs.add_argument("--gpus-per-job", type=int, default=0, help="GPUs per job (default 0)")
    jobs.add_argument("--cpus-per-job", type=int, default=None, help="CPUs per job (default 2)")
    jobs.add_argument("--mem-per-job", type=float, default=None, metavar="GB", help="memory per job in GB")
    jobs.add_argument("--time-per-job", type=int, default=None, metavar="MIN",
                      help="time limit per job in minutes (default 1440); a job past it requeues and resumes")
    jobs.add_argument("--max-retries", type=int, default=None, help="resubmissions of a failing job (default 2)")
    jobs.add_argument("--job-per", choices=("stage", "seed"), default="stage",
                      help="one job per (stage, seed) (default) or one job per seed running all its stages")
    jobs.add_argument("--max-jobs", type=int, default=None, help="at most this many jobs queued at once")
    jobs.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                      help="any further sbatch option, e.g. --slurm-option account=proj (repeatable)")
    jobs.add_argument("--poll-seconds", type=float, default=None, help="seconds between looks at the queue "
                                                                       "(default 5)")
    jobs.add_argument("--no-analysis", action="store_true", help="only the jobs; the analysis later with the same "
                                                                 "command (nothing is submitted again)")
    args = ap.parse_args(argv)
    from ood_lib import shards

    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        notebooks = [n.strip().zfill(2) for n in args.notebooks.split(",")] if args.notebooks else None
        profile, _ = plan(args.profile, notebooks, overrides)
        seeds = [int(s) for s in _list(args.seeds)] if args.seeds else None
        if (args.seeds or args.bundle_dir or args.inputs) and not args.stages:
            raise ProfileError("--seeds, --bundle-dir and --inputs go with --stages")
        if seeds is not None and set(seeds) - set(profile.seeds):
            raise ProfileError(f"--seeds {seeds}: profile {profile.name!r} has seeds {list(profile.seeds)}")
        if args.stages:
            registry = shards.stages_mod.stages(profile)
            unknown = [s for s in _list(args.stages) if s not in registry]
            if unknown:
                raise ProfileError(f"unknown stage(s) {unknown} of profile {profile.name!r}; allowed: {list(registry)}")
        job_options = _job_options(args)
    except (ProfileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.shared_dir and args.plan:  # the status of a study whose jobs write to a shared folder
        import os
        os.environ["OOD_RESULTS_DIR"] = str(args.shared_dir.expanduser().resolve() / "results")
    if job_options is not None:
        from ood_lib import cluster

        try:
            cluster.run(args.profile, notebooks, overrides, job_options)
        except (cluster.ClusterError, RunError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    from ood_lib.data import DatasetCorrupt, DatasetMissing
    from ood_lib.results import ResultsDamaged
    from ood_lib.train import CheckpointDamaged, TrainingDiverged

    explained = (RunError, shards.ShardError, DatasetMissing, DatasetCorrupt, ResultsDamaged, CheckpointDamaged,
                 TrainingDiverged)  # their messages name the file or value and the way out: no traceback
    try:
        if args.plan:
            table = shards.plan(profile)
            print(table.to_string(index=False))
            todo = table[~table.done]
            for seed, g in todo.groupby("seed", sort=False):
                print(shards.command(profile, g.stage, [seed]))
            return 0
        preflight(profile, data=not args.merge, stages=_list(args.stages))
        if args.stages:
            run_shards(args.profile, _list(args.stages), seeds, overrides, args.bundle_dir, args.inputs)
        elif args.merge:
            shards.merge(profile, args.merge, args.allow_mixed_code, allow_mixed_models=args.allow_mixed_models)
            run(args.profile, notebooks, overrides, compute=False)
        else:
            run(args.profile, notebooks, overrides)
        return 0
    except explained as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, shards.ShardError) else 1
    except OSError as e:
        message = explain_os_error(e.errno, e.filename, "the run stopped")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
