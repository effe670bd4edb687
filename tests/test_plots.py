"""plots.figure1 (the shape of Unleashing Mask's Figure 1) draws the numbers it is given: per OOD set and for their
mean, the seed-mean FPR95 per epoch, with the ID test and training accuracy on a second axis."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ood_lib import plots  # noqa: E402


def _rows():
    rng = np.random.default_rng(0)
    rows, hist = [], []
    for seed in (0, 1):
        for epoch in (1, 2, 3):
            rows.append({"split": "test", "seed": seed, "epoch": epoch, "detector": "", "ood_set": "",
                         "metric": "id_acc", "value": 0.5 + 0.1 * epoch + 0.01 * seed})
            hist.append({"seed": seed, "epoch": epoch, "train_acc": 0.6 + 0.1 * epoch})
            for ood in ("isun", "mnist"):
                rows.append({"split": "test", "seed": seed, "epoch": epoch, "detector": "energy", "ood_set": ood,
                             "metric": "fpr95", "value": rng.uniform()})
    return pd.DataFrame(rows), pd.DataFrame(hist)


def test_figure1_draws_the_seed_means_per_set_and_their_mean():
    rows, hist = _rows()
    fig = plots.figure1(rows, hist, "energy")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["isun", "mnist", "mean over OOD sets"]
    fpr = rows[rows.metric == "fpr95"]
    for ax, want in zip(panels, [fpr[fpr.ood_set == "isun"], fpr[fpr.ood_set == "mnist"], fpr]):
        per_seed = want.groupby(["epoch", "seed"]).value.mean()  # the mean panel: mean over sets, then seeds
        expect = per_seed.groupby("epoch").mean().to_numpy() * 100
        assert np.allclose(ax.lines[0].get_ydata(), expect)
    twins = [ax for ax in fig.axes if not ax.get_title()]
    acc = rows[rows.metric == "id_acc"].groupby("epoch").value.mean().to_numpy() * 100
    assert len(twins) == 3 and np.allclose(twins[0].lines[0].get_ydata(), acc)
    assert np.allclose(twins[0].lines[1].get_ydata(), hist.groupby("epoch").train_acc.mean().to_numpy() * 100)
