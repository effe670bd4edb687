"""Fixtures shared by the test files."""
import pytest

from ood_lib import reproduce


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Every notebook run once per session on the smoke profile, through the runner, into a temporary folder.

    Yields ``(out, done)``: ``out`` holds ``results/smoke/`` (executed notebooks, report.html, ...) and
    ``figures/smoke/``; OOD_RESULTS_DIR and OOD_FIGURES_DIR point there until the session ends.
    """
    out = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("OOD_RESULTS_DIR", str(out / "results"))
    mp.setenv("OOD_FIGURES_DIR", str(out / "figures"))
    done = reproduce.run("smoke", ["01", "02", "03", "04", "05"])
    yield out, done
    mp.undo()


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """``machine(name)`` points the results and figures folders at a fresh folder: another machine's disk, or a
    cluster's shared folder. Returns that folder."""
    def use(name):
        monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path / name / "results"))
        monkeypatch.setenv("OOD_FIGURES_DIR", str(tmp_path / name / "figures"))
        return tmp_path / name
    return use
