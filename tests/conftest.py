"""Fixtures shared by the test files."""
import pytest

from ood_lib import execute, paths

# The raw-data root when OOD_DATA_ROOT is unset: the Makefile's rule (and .ci/run's), ../shared/data when it exists.
SHARED_DATA = paths.PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def data_root():
    """OOD_DATA_ROOT as ``make test`` sets it, for every test and the notebooks they run: the variable when set, else
    ../shared/data when that folder exists. So a plain ``pytest`` runs the real-data tests where the data is; they
    skip only when a set is in none of the places the library looks (the skip reason lists them). A test that needs
    the variable unset or elsewhere sets it with monkeypatch. Returns the root in use (None: none)."""
    mp = pytest.MonkeyPatch()
    if paths.data_root() is None and SHARED_DATA.is_dir():
        mp.setenv("OOD_DATA_ROOT", str(SHARED_DATA))
    yield paths.data_root()
    mp.undo()


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
    done = execute.run("smoke", ["01", "02", "03", "04", "05"])
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
