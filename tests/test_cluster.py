"""The study's stages as jobs (ood_lib.cluster) on a real one-node Slurm cluster started by these tests.

The ``slurm`` fixture installs Debian's slurm-wlm and munge when absent (scripts/install_slurm.sh, also run by
``make test``), starts ``munged``, ``slurmctld`` and ``slurmd`` for this machine with a generated slurm.conf in a
temporary folder (own ports, own munge socket: nothing of the system's configuration is touched) and stops them
afterwards. The tests submit a cut-down smoke profile and compare what the jobs leave in the shared folder with a
run of ``execute.run`` of the same overrides in another folder. Where the machine cannot start Slurm (not root and
no sudo, no apt, daemons that do not come up) the Slurm tests are skipped with the reason, as a warning too.
"""
import csv
import json
import os
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from ood_lib import cluster, execute, reproduce, shards, stages
from ood_lib.config import load_profile
from ood_lib.paths import PROJECT_ROOT

# A cut-down smoke profile: one seed, two short trainings, notebooks 01 and 03 (base, gamma, um, umap, ft_ce).
TINY = {"seeds": [0], "train.epochs": 2, "data.train_size": 300, "data.id_val_size": 100, "data.id_test_size": 200,
        "data.ood_size": 200, "um.epochs": 1, "um.gamma_sweep": [], "um.curve_images": 100}
NOTEBOOKS = ["01", "03"]
FAST = {"poll_s": 1.0, "cpus_per_job": 1}
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/bin/squeue")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd for this one machine, configured and run from ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]

    def write_conf(self) -> None:
        f = self.folder
        for d in ("state", "spool"):
            (f / d).mkdir(exist_ok=True)
        cpus = os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=oodtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={f}/munge.socket
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
KillWait=2
MinJobAge=600
InactiveLimit=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60) -> float:
        """Start the three daemons; wait until the node is idle. Returns the seconds it took."""
        t0 = time.perf_counter()
        f = self.folder
        self.write_conf()
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        subprocess.run(["/usr/sbin/munged", "--force", f"--socket={f}/munge.socket", f"--pid-file={f}/munged.pid",
                        f"--log-file={f}/munged.log", f"--seed-file={f}/munged.seed"], check=True, env=env,
                       capture_output=True)
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=env, capture_output=True)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", self.host], check=True, env=env,
                       capture_output=True)
        while time.perf_counter() - t0 < timeout_s:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if out.strip() == "idle":
                return time.perf_counter() - t0
            time.sleep(0.5)
        raise RuntimeError(f"the node is not idle after {timeout_s} s ({out.strip()!r}):\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):  # only the daemons this fixture started, by their pid files
            pid_file = self.folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), 15)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)


def _skip(reason: str):
    warnings.warn(f"Slurm tests skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster for this module's tests; ``SLURM_CONF`` points at it while they run."""
    if not all(Path(p).exists() for p in DAEMONS):
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "install_slurm.sh")], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            _skip(f"cannot install slurm-wlm and munge (scripts/install_slurm.sh: {proc.stderr.strip()[-400:]})")
        print(f"install_slurm.sh: {time.perf_counter() - t0:.1f} s")
    if os.geteuid() != 0:
        _skip("the one-node cluster runs its daemons as root; these tests run as another user")
    folder = Path(tmp_path_factory.mktemp("slurm"))
    folder.chmod(0o755)  # munged wants its socket's folder to be reachable by every user
    sl = LocalSlurm(folder)
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(sl.conf))
    try:
        seconds = sl.start()
    except (subprocess.CalledProcessError, RuntimeError) as e:
        sl.stop()
        mp.undo()
        _skip(f"Slurm did not start on this machine: {e}\n{sl.logs()}")
    print(f"one-node Slurm up in {seconds:.1f} s ({folder})")
    yield sl
    sl.stop()
    mp.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The cut-down study run in one piece by ``execute.run`` (the notebooks computing their stages)."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OOD_RESULTS_DIR", str(out / "results"))
        mp.setenv("OOD_FIGURES_DIR", str(out / "figures"))
        t0 = time.perf_counter()
        execute.run("smoke", NOTEBOOKS, TINY)
        print(f"reference run (in-process): {time.perf_counter() - t0:.1f} s")
    return out


def _metrics(root: Path) -> pd.DataFrame:
    m = pd.read_csv(root / "results" / "smoke" / "metrics.csv", dtype=str, keep_default_na=False)
    return m.sort_values(list(m.columns)).reset_index(drop=True)


def _tables(root: Path, stage: str, seed: int) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OOD_RESULTS_DIR", str(root / "results"))
        return shards.read(load_profile("smoke", TINY), stage, seed)


def _same_tables(ours: dict, theirs: dict) -> None:
    """Equal tables, but for the timing columns (seconds, images per second)."""
    assert set(ours) == set(theirs)
    for name, table in ours.items():
        cols = [c for c in table.columns if "second" not in c]
        pd.testing.assert_frame_equal(table[cols], theirs[name][cols], obj=f"table {name}")


def _jobs_csv(shared: Path) -> list[dict]:
    rows = []
    for path in sorted((shared / "results" / "smoke" / "jobs").glob("*/jobs.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


# --- without a cluster ----------------------------------------------------------------------------------------------

def test_jobs_follow_the_stage_dependencies():
    p = load_profile("smoke", {**TINY, "seeds": [0, 1]})
    names = stages.needed_stages(p, ["03"])
    assert names[0] == "base" and set(stages.of_notebook(p, "03")) == set(names) - {"base"}
    by_name = {(u.stages[0], u.seed): u for u in cluster.units(p, ["03"])}
    assert set(by_name) == {(s, k) for s in names for k in (0, 1)}
    registry = stages.stages(p)
    assert all(set(u.needs) == {*registry[s].inputs, *registry[s].models} for (s, _), u in by_name.items())
    assert by_name["base", 0].needs == () and by_name["gamma", 1].needs == ("base",)
    assert set(by_name["um", 0].needs) == {"gamma", "base"} and by_name["ft_ce", 0].needs == ("base",)
    per_seed = cluster.units(p, ["01", "03"], per="seed")
    assert [(u.seed, u.stages[0], u.needs) for u in per_seed] == [(0, "base", ()), (1, "base", ())]
    assert stages.needed_stages(p, ["01"]) == ["base"]


def test_job_options_are_checked(capsys):
    assert reproduce.main(["--profile", "smoke", "--gpus-per-job", "1"]) == 2
    assert "--executor slurm" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--shared-dir", "/tmp/x"]) == 2
    assert reproduce.main(["--profile", "smoke", "--executor", "slurm", "--stages", "base"]) == 2
    assert "not with --stages" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--executor", "slurm", "--cpus-per-job", "0"]) == 2
    assert reproduce.main(["--profile", "smoke", "--executor", "slurm", "--slurm-option", "account"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--executor", "slurm", "--set", "train.epochz=2"]) == 2


# --- on the one-node cluster ----------------------------------------------------------------------------------------

def test_jobs_on_slurm_give_the_metrics_of_a_local_run(slurm, reference, machine):
    shared = machine("cluster")
    out = cluster.run("smoke", NOTEBOOKS, TINY, cluster.Options(executor="slurm", shared_dir=shared, **FAST))
    print(f"cluster run: jobs {out['jobs_s']:.1f} s, analysis (merge) {out['analysis_s']:.1f} s")
    units = cluster.units(load_profile("smoke", TINY), NOTEBOOKS)
    assert out["attempts"] == len(units) and out["resubmitted"] == 0
    pd.testing.assert_frame_equal(_metrics(shared), _metrics(reference))
    jobs = _jobs_csv(shared)
    assert {r["job"] for r in jobs} == {u.name for u in units} >= {"base_seed0", "gamma_seed0", "um_seed0"}
    assert all(Path(r["log"]).exists() for r in jobs)
    # every job was submitted once the stages it depends on had their manifests (the submitter's clock, in s)
    submitted = {r["job"]: time.mktime(time.strptime(r["time"], "%Y-%m-%dT%H:%M:%S"))
                 for r in jobs if r["event"] == "submitted"}
    p = load_profile("smoke", TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OOD_RESULTS_DIR", str(shared / "results"))
        for u in units:
            for dep in u.needs:
                written = (shards.shard_dir(p, dep, u.seed) / shards.MANIFEST).stat().st_mtime
                assert submitted[u.name] >= int(written), (u.name, dep)
    # the same command again: nothing is submitted, only the analysis runs
    again = cluster.run("smoke", NOTEBOOKS, TINY, cluster.Options(executor="slurm", shared_dir=shared,
                                                                 analysis=False, **FAST))
    assert again["attempts"] == 0


@pytest.fixture(scope="module")
def killed(slurm, tmp_path_factory):
    """The base job of notebook 01 cancelled with scancel once its first epoch is saved (state.pt, written after
    the epoch's checkpoint and scores), while it trains the second."""
    shared = tmp_path_factory.mktemp("killed")
    p = load_profile("smoke", TINY)
    from ood_lib import base

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OOD_RESULTS_DIR", str(shared / "results"))
        run_dir = base.run_dir(p, 0)
    cancelled = []

    def kill_mid_training():
        t0 = time.time()
        while time.time() - t0 < 300:
            if (run_dir / "state.pt").exists():
                if not (run_dir / f"epoch_{p.train.epochs:03d}.pt").exists():
                    proc = subprocess.run(["scancel", "--name", "ood-smoke-base_seed0"], capture_output=True,
                                          text=True)
                    cancelled.append(proc.returncode == 0)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_mid_training, daemon=True)
    killer.start()
    out = cluster.run("smoke", ["01"], TINY, cluster.Options(executor="slurm", shared_dir=shared, analysis=False,
                                                            **FAST))
    killer.join(5)
    return shared, out, cancelled


def test_a_job_killed_mid_training_is_resubmitted_and_resumes(reference, killed):
    shared, out, cancelled = killed
    assert cancelled == [True], "the base job finished before it could be cancelled mid-training"
    assert out["resubmitted"] == 1
    jobs = [r for r in _jobs_csv(shared) if r["job"] == "base_seed0"]
    assert [(r["attempt"], r["event"]) for r in jobs] == [("1", "submitted"), ("1", "failed"), ("2", "submitted"),
                                                           ("2", "done")]
    assert jobs[1]["state"] == "CANCELLED"
    assert "resuming seed 0 from epoch 1" in Path(jobs[3]["log"]).read_text()
    _same_tables(_tables(shared, "base", 0), _tables(reference, "base", 0))


def test_a_job_that_keeps_failing_stops_the_study(killed, monkeypatch):
    shared, _, _ = killed  # base of seed 0 is done there: it is not submitted again, and it is kept
    monkeypatch.setenv(cluster.FAIL_ENV, "gamma:0")
    before = _tables(shared, "base", 0)
    with pytest.raises(cluster.ClusterError) as e:
        cluster.run("smoke", ["03"], TINY, cluster.Options(executor="slurm", shared_dir=shared, max_retries=1, **FAST))
    msg = str(e.value)
    assert "job gamma_seed0 (stage gamma, seed 0)" in msg and "failed 2 times" in msg
    assert f"injected failure ({cluster.FAIL_ENV}=gamma:0)" in msg
    log = Path(msg.split("Its log: ")[1].split(". Finished")[0])
    assert log.exists() and "injected failure" in log.read_text()
    jobs = [r["job"] for r in _jobs_csv(shared) if r["event"] == "submitted"]
    assert jobs.count("base_seed0") == 2  # the two of the killed run, none more
    assert jobs.count("gamma_seed0") == 2 and "um_seed0" not in jobs and "umap_seed0" not in jobs
    for name, table in _tables(shared, "base", 0).items():  # finished results are kept as they were
        pd.testing.assert_frame_equal(table, before[name])


def test_a_job_that_cannot_see_the_shared_folder_says_so(slurm, machine, monkeypatch):
    shared = machine("unseen")
    monkeypatch.setattr(cluster, "_write_marker", lambda path, token: None)
    t0 = time.perf_counter()
    with pytest.raises(cluster.ClusterError, match="cannot see the shared folder") as e:
        cluster.run("smoke", ["01"], TINY, cluster.Options(executor="slurm", shared_dir=shared, **FAST))
    assert "shared-dir-marker" in str(e.value) and "job ids" not in str(e.value)  # not retried
    assert time.perf_counter() - t0 < 120


def test_without_slurm_the_same_command_runs_the_jobs_as_local_processes(reference, machine, monkeypatch, capsys):
    shared = machine("local")
    monkeypatch.setattr(cluster, "slurm_available", lambda: False)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert reproduce.main(["--profile", "smoke", "--notebooks", "01", *sets, "--executor", "slurm", "--shared-dir",
                           str(shared), "--cpus-per-job", "1", "--poll-seconds", "1", "--no-analysis"]) == 0
    out = capsys.readouterr().out
    assert "run here as local processes" in out and "submitted job base_seed0" in out
    _same_tables(_tables(shared, "base", 0), _tables(reference, "base", 0))
