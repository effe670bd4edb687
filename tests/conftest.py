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
