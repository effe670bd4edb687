"""The runner's one-paragraph errors and its console progress (issue 11, items 3-5).

The end-to-end tests run real notebooks through papermill and a real kernel: small ones written here, so that a
failure in a known cell, a full disk inside the kernel and the kernel's progress bars can be staged exactly."""
import io
import json
import os
import re

import nbformat
import pytest

from ood_lib import execute, progress, reproduce, stages
from ood_lib.config import load_profile


def _notebook(folder, name, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("profile = 'smoke'\noverrides = {}\ncompute = True")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, folder / name)


@pytest.fixture
def notebooks(tmp_path, monkeypatch, machine):
    """The runner pointed at a folder of small notebooks (``smoke`` profile, results in a fresh folder)."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setattr(stages, "NOTEBOOK_DIR", folder)
    machine("m")
    return folder


def test_a_failing_notebook_is_one_paragraph_naming_notebook_cell_exception_and_copy(notebooks, capsys):
    _notebook(notebooks, "01_fails.ipynb", "x = 1", "def f():\n    raise ValueError('epsilon must be below 1, got 3')\nf()")
    rc = reproduce.main(["--profile", "smoke", "--notebooks", "01"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err and "PapermillExecutionError" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 2, err
    assert lines[0].startswith("error: notebook 01_fails.ipynb failed at In [4]: "
                               "ValueError: epsilon must be below 1, got 3"), err
    copy = re.search(r"is (\S+\.ipynb)$", lines[1]).group(1)
    executed = nbformat.read(copy, as_version=4)  # In [4]: papermill adds a cell of the injected parameters
    failed = [c for c in executed.cells if c.cell_type == "code" and c.execution_count == 4]
    assert len(failed) == 1 and "raise ValueError" in failed[0].source
    assert [o.get("ename") for o in failed[0].outputs] == ["ValueError"]


def test_a_full_disk_inside_a_notebook_names_the_path_and_the_fix(notebooks, capsys):
    _notebook(notebooks, "01_disk.ipynb",
              "import errno, os\nraise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/data/results/x.csv')")
    assert reproduce.main(["--profile", "smoke", "--notebooks", "01"]) == 1
    err = capsys.readouterr().err
    assert "no space left on the disk that holds /data/results/x.csv" in err
    assert "OOD_RESULTS_DIR" in err and "run the same command again" in err and "Traceback" not in err


def test_an_unwritable_results_folder_is_refused_before_any_work(machine, monkeypatch, capsys):
    """The probe write of ``preflight`` fails as it would in a read-only folder (the tests run as root, for whom
    permissions do not stop a write, so the failure is staged)."""
    home = machine("ro")
    real = type(home).write_bytes

    def refuse(self, data):
        if self.name.startswith(".write-test") and "results" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(type(home), "write_bytes", refuse)
    assert reproduce.main(["--profile", "smoke", "--notebooks", "01"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to {home / 'results' / 'smoke'} (Permission denied)")
    assert "OOD_RESULTS_DIR" in err and "nothing was run" in err
    assert not (home / "results" / "smoke" / "notebooks").exists()


def test_a_missing_data_set_is_refused_before_any_work(machine, monkeypatch, tmp_path, capsys):
    machine("nodata")
    monkeypatch.setenv("OOD_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("OOD_DATA_ROOT", str(tmp_path / "empty-root"))
    assert reproduce.main(["--profile", "smoke", "--notebooks", "01"]) == 1
    err = capsys.readouterr().err
    assert re.match(r"error: dataset '(fashion_mnist|mnist|animal_mnist)' \(split '(train|test)'\) not found\. "
                    r"Looked in, in order:", err), err
    assert "Get it with: make data" in err and err.rstrip().endswith("Nothing was run.")


def test_a_missing_checkpoint_is_refused_before_any_work(machine, monkeypatch, tmp_path, capsys):
    """Notebook 06's stages load the authors' checkpoint: on a machine without it (a device machine whose
    .device/models was not carried) the shard command stops before any work, naming the file and the variable."""
    machine("nomodels")
    monkeypatch.setenv("OOD_MODELS_ROOT", str(tmp_path / "no-models"))
    assert reproduce.main(["--profile", "cifar10", "--stages", "paper_start", "--seeds", "0"]) == 1
    err = capsys.readouterr().err
    assert "pretrained checkpoint 'um_densenet_cifar10'" in err and "um_densenet_cifar10_jan2023.state" in err
    assert "OOD_MODELS_ROOT" in err and err.rstrip().endswith("Nothing was run.")
    p = load_profile("cifar10")
    assert stages.checkpoints_needed(p, ["base", "um"]) == []  # stages that load no checkpoint need none
    assert stages.checkpoints_needed(p) == ["um_densenet_cifar10"]
    assert set(stages.checkpoints_needed(load_profile("cifar10-pretrained"))) == {
        "dice_densenet100_cifar10", "um_densenet_cifar10"}


@pytest.mark.parametrize("errno_, words", [(28, "no space left on the disk that holds /r/m.csv"),
                                           (13, "/r/m.csv cannot be written (Permission denied)"),
                                           (30, "/r/m.csv cannot be written (Read-only file system)")])
def test_os_errors_are_explained(errno_, words):
    message = execute.explain_os_error(errno_, "/r/m.csv", "notebook 01")
    assert message.startswith("notebook 01: ") and words in message


def test_other_os_errors_are_not_dressed_up():
    assert execute.explain_os_error(2, "/r/m.csv", "x") is None


def test_bars_write_events_under_the_runner_and_the_follower_draws_them(tmp_path, monkeypatch):
    events = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(events))
    with progress.Bar(3, "base seed 0", unit="epoch") as bar:
        for _ in range(3):
            bar.update()
    lines = [json.loads(l) for l in events.read_text().splitlines()]
    assert [(e["n"], e["closed"]) for e in lines] == [(0, False), (1, False), (2, False), (3, False), (3, True)]
    out = io.StringIO()
    follower = progress.Follower(events, stream=out)
    follower.stop()  # reads everything once and closes the bars
    assert "base seed 0" in out.getvalue() and "3/3" in out.getvalue()
    assert follower.bars == {}


def test_a_bar_with_nothing_to_do_is_silent(tmp_path, monkeypatch):
    events = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(events))
    progress.Bar(5, "resumed", initial=5).close()  # a finished run, only reloaded
    progress.Bar(1, "one batch").close()
    assert not events.exists()


def test_the_runner_shows_the_kernels_progress_on_its_console(notebooks, capfd):
    """The kernel runs in another process: its bar reaches the runner's console through the events file."""
    _notebook(notebooks, "01_bar.ipynb",
              "from ood_lib import progress\nimport time\n"
              "with progress.Bar(4, 'train seed 7', unit='epoch') as bar:\n"
              "    for _ in range(4):\n        time.sleep(0.3)\n        bar.update()")
    assert reproduce.main(["--profile", "smoke", "--notebooks", "01"]) == 0
    err = capfd.readouterr().err
    assert "train seed 7" in err and "4/4" in err
    executed = nbformat.read(os.environ["OOD_RESULTS_DIR"] + "/smoke/notebooks/01_bar.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in executed.cells[1:]), "the bar must not go into the executed notebook"
    assert not list((notebooks.parent / "m" / "results" / "smoke" / "notebooks").glob(".progress-*"))


def test_training_reports_each_epoch_and_a_finished_run_shows_no_bar(tmp_path, monkeypatch):
    import torch

    from ood_lib.config import TrainConfig
    from ood_lib.models import resnet_small
    from ood_lib.train import train

    events = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(events))
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(32) % 3

    def run(epochs):
        torch.manual_seed(0)
        train(resnet_small(num_classes=3, width=4, blocks=(1, 1, 1)), x, y, TrainConfig(epochs=epochs, batch_size=16),
              seed=0, run_dir=tmp_path / "run", device=torch.device("cpu"), log=lambda s: None, name="base")
        lines = [json.loads(l) for l in events.read_text().splitlines()]
        events.unlink()
        return [(e["desc"], e["total"], e["n"], e["closed"]) for e in lines]

    assert run(2) == [("base seed 0", 2, n, False) for n in (0, 1, 2)] + [("base seed 0", 2, 2, True)]
    events.write_text("")
    assert run(2) == []  # a finished run is only reloaded: no bar


def test_a_log_file_gets_the_training_bar_but_not_the_transient_extraction_bars(tmp_path, monkeypatch):
    events = tmp_path / "p.jsonl"
    monkeypatch.setenv(progress.ENV, str(events))
    with progress.Bar(2, "base seed 0", unit="epoch") as train_bar:
        for _ in range(2):
            with progress.Bar(3, "extract", unit="batch", leave=False) as bar:
                for _ in range(3):
                    bar.update()
            train_bar.update()
    log = io.StringIO()  # not a terminal
    progress.Follower(events, stream=log).stop()
    assert "base seed 0" in log.getvalue() and "2/2" in log.getvalue()
    assert "extract" not in log.getvalue()


def test_bf16_training_on_a_cpu_without_native_bf16_is_refused_before_any_work(machine, monkeypatch, capsys):
    """cifar10-cpu trains in bf16 on the CPU. On a CPU without native bf16 kernels (an AVX2 AMD EPYC: 8 images/s
    against 74 in float32) a shard would take days, so it stops at once and says how to go on."""
    machine("nobf16")
    calls = []
    monkeypatch.setattr(reproduce, "run_shards", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(execute, "native_cpu_bf16", lambda: False)
    argv = ["--profile", "cifar10-cpu", "--stages", "base", "--seeds", "0"]
    assert reproduce.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: profile 'cifar10-cpu' trains in bf16 autocast on the CPU") and "Traceback" not in err
    assert "no native bf16 kernels" in err and "Nothing was run." in err
    assert "--set train.cpu_bf16=false" in err and "--allow-emulated-bf16" in err
    assert calls == []
    plan_argv = ["--profile", "cifar10-cpu", "--plan", "--machine-minutes", "170"]
    assert reproduce.main(plan_argv) == 0  # this machine's plan says at its end that it cannot run it here
    assert capsys.readouterr().out.splitlines()[-1].startswith("# NOT on this CPU (")
    assert reproduce.main([*argv, "--allow-emulated-bf16"]) == 0 and len(calls) == 1  # the way out, as said
    assert reproduce.main([*argv, "--set", "train.cpu_bf16=false"]) == 0 and len(calls) == 2  # float32
    execute.check_cpu_bf16(load_profile("default"))  # float32 on the CPU: nothing to refuse
    execute.preflight(load_profile("cifar10-cpu"), data=False)  # a merge trains nothing: not asked
    monkeypatch.setattr(execute, "native_cpu_bf16", lambda: True)
    execute.check_cpu_bf16(load_profile("cifar10-cpu"))
    assert reproduce.main(plan_argv) == 0 and "NOT on this CPU" not in capsys.readouterr().out
