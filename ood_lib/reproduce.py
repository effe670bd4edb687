"""Run the study: its notebooks headlessly with papermill, or its stages as shards, and merge shards.

    python -m ood_lib.reproduce --profile default [--notebooks 01,03] [--set train.epochs=3 ...]
        every notebook of the profile in order; each computes the stages it reads that have not run yet.

    python -m ood_lib.reproduce --profile cifar10 --stages base,atypical,gamma --seeds 0 [--bundle-dir DIR]
        a shard command: those stages for those seeds, in this process, without papermill or Jupyter; writes one
        bundle per (stage, seed) to DIR (default results/<profile>/bundles). Stages whose tables come from
        another machine are given with --inputs BUNDLE ... (merged first, with the checks of --merge). A model
        re-trained here because its bundle carried no weights must reproduce the digest its bundle recorded, or
        the command stops (--allow-mixed-models goes on). With --models-only: only those models, no bundle.

    python -m ood_lib.reproduce --profile cifar10 --merge BUNDLE ...
        check and merge bundles from other machines, then run the analysis: every notebook whose stages are
        complete, on the seeds they are complete for, without training anything; then report.html.

    python -m ood_lib.reproduce --profile cifar10 --plan [--bundle-dir DIR]
        every (stage, seed) of the profile: done or not (a shard here, or an intact bundle in the bundle folder of
        this profile's settings, e.g. a committed one); then the command of each shard still to run, in the order
        that answers notebooks 01 and 03 first, with the bundles it reads (``stages.shard_plan``).
        With --device-minutes M: those shards as lent-GPU commands (scripts/device_shard.sh) of at most M minutes
        each where they can be, sized from the stages measured on a GPU, here or in those bundles
        (``plan.device_plan``). With --machine-minutes M: the commands this machine can finish one after another
        in M minutes, sized from the stages measured on this kind of device (``plan.machine_plan``).

    python -m ood_lib.reproduce --profile cifar10-cpu --next-shards 170 [--bundle-dir DIR]
        run those commands: the next shard that fits the time left, then the plan read again, until none fits.
        Each bundle lands in the bundle folder as its stage finishes. A command that stops leaves out what needs
        it, the rest goes on, and the exit status is then 1.

Executed notebooks go to ``results/<profile>/notebooks/``. The profile and every ``--set`` override are validated
before any work (an unknown name fails with the allowed names listed), and so are the output folders (writable)
and the data sets (present). The kernel's progress bars (training epochs, extraction) are drawn on this console
(``ood_lib.progress``). A failing notebook, a full disk or an unwritable folder ends in one paragraph: the
notebook, the cell, the exception and its message (or the path and the fix), and the executed copy that holds
the full traceback. ``--set`` overrides must be the same for the shard commands and the merge (the bundles record
the profile's digest).

This module is only the command line: the work is done by ``ood_lib.execute`` (notebooks, shard commands),
``ood_lib.shards`` (bundles, merge), ``ood_lib.plan`` (what is done, what to run next) and ``ood_lib.cluster``
(jobs); ``ood_lib.stages`` decides what a run needs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ood_lib import plan
from ood_lib import stages as stages_mod
from ood_lib.config import ProfileError, available_profiles, parse_override
from ood_lib.execute import (RunError, emulated_bf16_cpu, explain_os_error, preflight, run, run_next_shards,
                             run_shards)
from ood_lib.paths import results_dir
from ood_lib.train import resolve_device


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
    if args.stages or args.merge or args.plan or args.next_shards is not None:
        raise ProfileError(f"--executor {args.executor} runs the whole study: not with --stages, --merge, --plan or "
                           "--next-shards")
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
    mode.add_argument("--next-shards", type=float, default=None, metavar="MINUTES",
                      help="run the shards still to run that this machine can finish in MINUTES, one after another "
                           "(what --plan --machine-minutes prints); exit status 1 if one of them stopped")
    ap.add_argument("--device-minutes", type=float, default=None, metavar="M",
                    help="with --plan: print the shards still to run as lent-GPU commands of at most M minutes where "
                         "the stages measured here say they fit")
    ap.add_argument("--machine-minutes", type=float, default=None, metavar="M",
                    help="with --plan: print only the shard commands this machine can finish one after another in M "
                         "minutes")
    ap.add_argument("--seeds", default=None, help="with --stages: comma-separated seeds (default: the profile's)")
    ap.add_argument("--bundle-dir", type=Path, default=None, help="with --stages: where bundles go; with --plan: "
                    "where the printed commands put and read them, and where bundles count as done "
                    "(default: results/<profile>/bundles)")
    ap.add_argument("--inputs", nargs="+", type=Path, default=[], metavar="BUNDLE",
                    help="with --stages: bundles from other machines that these stages read")
    ap.add_argument("--allow-mixed-code", action="store_true", help="with --merge: accept bundles computed by "
                                                                    "different versions of the library")
    ap.add_argument("--allow-mixed-models", action="store_true", help="with --merge: accept stages of a seed that "
                    "used other weights of a model (e.g. a re-trained base) than that model's own stage recorded; "
                    "with --stages: compute them from such weights instead of stopping")
    ap.add_argument("--models-only", action="store_true", help="with --stages: only put the trained models these "
                    "stages start from on this machine (re-trained where their bundles carry no weights, and checked "
                    "against the recorded digest); the stages in a later command on this machine")
    ap.add_argument("--allow-emulated-bf16", action="store_true", help="train in bf16 on the CPU as the profile "
                    "says (train.cpu_bf16) even where this CPU has no native bf16 kernels (about ten times slower "
                    "than float32 there)")
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
        profile, _ = stages_mod.notebooks_to_run(args.profile, notebooks, overrides)
        seeds = [int(s) for s in _list(args.seeds)] if args.seeds else None
        if (args.seeds or args.inputs or args.models_only) and not args.stages \
                or args.bundle_dir and not (args.stages or args.plan or args.next_shards is not None):
            raise ProfileError("--seeds, --inputs and --models-only go with --stages, --bundle-dir with --stages, "
                               "--plan or --next-shards")
        if args.allow_mixed_models and not (args.stages or args.merge):
            raise ProfileError("--allow-mixed-models goes with --stages or --merge")
        for flag, minutes, plan_only in (("--device-minutes", args.device_minutes, True),
                                         ("--machine-minutes", args.machine_minutes, True),
                                         ("--next-shards", args.next_shards, False)):
            if minutes is not None and (plan_only and not args.plan or not math.isfinite(minutes) or minutes <= 0):
                raise ProfileError(f"{flag} {minutes:g}: a positive number of minutes" + ", with --plan" * plan_only)
        if args.device_minutes is not None and args.machine_minutes is not None:
            raise ProfileError("--device-minutes or --machine-minutes, not both")
        if seeds is not None and set(seeds) - set(profile.seeds):
            raise ProfileError(f"--seeds {seeds}: profile {profile.name!r} has seeds {list(profile.seeds)}")
        if args.stages:
            registry = stages_mod.stages(profile)
            unknown = [s for s in _list(args.stages) if s not in registry]
            if unknown:
                raise ProfileError(f"unknown stage(s) {unknown} of profile {profile.name!r}; allowed: {list(registry)}")
        job_options = _job_options(args)
    except (ProfileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.shared_dir and args.plan:  # the status of a study whose jobs write to a shared folder
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
            folder = args.bundle_dir or results_dir(profile.name) / "bundles"  # where the shard commands put them
            done = plan.Done.read(profile, folder)
            cpu = resolve_device(profile.device).type == "cpu"
            lines = plan.report(done, args.bundle_dir, args.device_minutes, args.machine_minutes, cpu)
            emulated = emulated_bf16_cpu(profile) if args.machine_minutes is not None else None
            if emulated:
                lines.append(f"# NOT on this CPU ({emulated}): it has no native bf16 kernels and {profile.name} "
                             "trains in bf16 autocast, so each of these commands stops at once here; run them on a "
                             "CPU with AVX-512 or AMX")
            print("\n".join(lines))
            return 0
        todo = _list(args.stages)
        if args.next_shards is not None:  # the checkpoints of the stages still to run, not of every stage
            done = plan.Done.read(profile, args.bundle_dir or results_dir(profile.name) / "bundles")
            todo = [n for _, row, _ in plan.to_run(done) for n in row]
        preflight(profile, data=not args.merge, stages=todo, allow_emulated_bf16=args.allow_emulated_bf16)
        if args.next_shards is not None:
            _, failed = run_next_shards(args.profile, args.next_shards, overrides, args.bundle_dir)
            return 1 if failed else 0
        if args.stages:
            run_shards(args.profile, _list(args.stages), seeds, overrides, args.bundle_dir, args.inputs,
                       models_only=args.models_only, allow_mixed_models=args.allow_mixed_models)
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
