"""Run the study's notebooks headlessly with papermill.

    python -m ood_lib.reproduce --profile default [--notebooks 01,03] [--set train.epochs=3 ...]

Executed copies go to ``results/<profile>/notebooks/``. The profile and every ``--set`` override are
validated before any notebook starts; an unknown name fails with the allowed names listed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ood_lib.config import ProfileError, available_profiles, load_profile, parse_override
from ood_lib.paths import PROJECT_ROOT, results_dir
from ood_lib.report import write_report

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


def notebook_files() -> dict[str, Path]:
    """'01' -> notebooks/01_intermediate_stage.ipynb, for every notebook present."""
    return {p.name[:2]: p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))}


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


def run(profile_name: str, notebooks: list[str] | None = None, overrides: dict | None = None) -> list[tuple[str, float]]:
    import papermill

    overrides = overrides or {}
    profile, paths = plan(profile_name, notebooks, overrides)
    out_dir = results_dir(profile.name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} on profile {profile.name} ...", flush=True)
        t0 = time.perf_counter()
        papermill.execute_notebook(str(path), str(out_dir / path.name), cwd=str(NOTEBOOK_DIR),
                                   parameters={"profile": profile.name, "overrides": overrides},
                                   progress_bar=sys.stderr.isatty(), log_output=False)
        seconds = time.perf_counter() - t0
        done.append((path.name, seconds))
        print(f"[{i}/{len(paths)}] {path.name} done in {seconds:.1f} s -> {out_dir / path.name}", flush=True)
    total = sum(s for _, s in done)
    print(f"profile {profile.name}: {len(done)} notebook(s) in {total:.1f} s")
    t0 = time.perf_counter()
    report = write_report(profile.name)
    print(f"report: {report} ({report.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ood_lib.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help=f"one of {available_profiles()}")
    ap.add_argument("--notebooks", default=None, help="comma-separated notebook numbers, e.g. 01,03 "
                                                      "(default: the profile's own list)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a profile parameter, e.g. --set train.epochs=3 (repeatable)")
    args = ap.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        notebooks = [n.strip().zfill(2) for n in args.notebooks.split(",")] if args.notebooks else None
        plan(args.profile, notebooks, overrides)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(args.profile, notebooks, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
