"""Which epoch detects OOD best, and how honestly can it be chosen? (notebook 01)

Four rules pick one epoch per seed and detector; each is then reported on the TEST split only:
  * ``final``    the last epoch (what one gets by default);
  * ``oracle``   the epoch with the lowest mean test FPR95 over the OOD sets: it looks at test OOD data,
                 so it is an upper bound, not a method;
  * ``ood_val``  the epoch with the lowest mean FPR95 on held-out halves of the OOD sets (against held-out
                 ID validation images): legitimate when a few OOD examples of the same kind may be assumed;
  * ``id_val``   the epoch with the best accuracy on held-out ID validation images: uses no OOD data at all.
Ties go to the earliest epoch. A detector scored only at some epochs (ODIN: too costly after every epoch, so the
base stage scores it at the epochs the rules pick for the selection detector and at the last one) takes the
selection detector's picks.
"""
from __future__ import annotations

import pandas as pd

from ood_lib.metrics import mean_over_ood

RULES = ("final", "oracle", "ood_val", "id_val")
EARLY_FRACTION = 0.2  # epochs up to this fraction of training are its start, not an intermediate stage (``verdict``)
RULE_LABELS = {"final": "final epoch", "oracle": "best epoch (oracle: test OOD)",
               "ood_val": "chosen on OOD-val", "id_val": "chosen on ID-val (no OOD)"}


def _curve(mean_rows: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    sel = mean_rows[(mean_rows["split"] == split) & (mean_rows["metric"] == metric)]
    return sel.pivot_table(index=["seed", "detector"], columns="epoch", values="value")


def selected_epochs(rows: pd.DataFrame, selection_detector: str | None = None) -> pd.DataFrame:
    """One row per (seed, detector) with the epoch each rule picks; a detector without a value at every epoch takes
    ``selection_detector``'s picks."""
    m = mean_over_ood(rows)
    test_fpr, val_fpr = _curve(m, "test", "fpr95"), _curve(m, "val", "fpr95")
    acc = rows[(rows["metric"] == "id_acc") & (rows["split"] == "val")].pivot_table(
        index="seed", columns="epoch", values="value")
    out = {}
    for (seed, det), curve in test_fpr.iterrows():
        if curve.notna().all():
            out[seed, det] = {"seed": seed, "detector": det, "final": int(curve.index.max()),
                              "oracle": int(curve.idxmin()), "ood_val": int(val_fpr.loc[(seed, det)].idxmin()),
                              "id_val": int(acc.loc[seed].idxmax())}
    for (seed, det), curve in test_fpr.iterrows():
        if (seed, det) not in out:
            if (seed, selection_detector) not in out:
                raise ValueError(f"detector {det!r} lacks epochs and no selection detector with every epoch is given")
            out[seed, det] = {**out[seed, selection_detector], "detector": det}
    return pd.DataFrame([out[k] for k in test_fpr.index])


def selection_results(rows: pd.DataFrame, selection_detector: str | None = None) -> pd.DataFrame:
    """Per (seed, detector, rule): the chosen epoch and its TEST mean FPR95, mean AUROC and ID accuracy."""
    m = mean_over_ood(rows)
    test = m[m["split"] == "test"].pivot_table(index=["seed", "detector", "epoch"], columns="metric", values="value")
    acc = rows[(rows["metric"] == "id_acc") & (rows["split"] == "test")].set_index(["seed", "epoch"])["value"]
    out = []
    for _, r in selected_epochs(rows, selection_detector).iterrows():
        for rule in RULES:
            e = r[rule]
            t = test.loc[(r["seed"], r["detector"], e)]
            out.append({"seed": r["seed"], "detector": r["detector"], "rule": rule, "epoch": e,
                        "fpr95": t["fpr95"], "auroc": t["auroc"], "id_acc": acc.loc[(r["seed"], e)]})
    return pd.DataFrame(out)


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per detector and rule (values in %)."""
    def fmt(s):
        s = 100 * s
        return f"{s.mean():.2f} ± {s.std(ddof=1):.2f}" if len(s) > 1 else f"{s.mean():.2f}"

    g = results.groupby(["detector", "rule"], sort=False)
    table = g.agg(epochs=("epoch", lambda e: ", ".join(str(int(v)) for v in e)),
                  fpr95=("fpr95", fmt), auroc=("auroc", fmt), id_acc=("id_acc", fmt)).reset_index()
    table["rule"] = table["rule"].map(RULE_LABELS)
    return table.rename(columns={"epochs": "epoch per seed", "fpr95": "FPR95 % (test, mean over OOD sets)",
                                 "auroc": "AUROC % (test)", "id_acc": "ID acc %"})


def verdict(rows: pd.DataFrame, results: pd.DataFrame, detector: str) -> str:
    """Sentences computed from the numbers: does an intermediate epoch beat the final one, honestly chosen,
    and is it a stable stage (the seed-mean curve is best before the end) or epoch-to-epoch volatility?
    A gain counts only beyond the seed spread of the final FPR95, so one seed gives no verdict. An epoch chosen on
    OOD-val within the first 20% of training (``EARLY_FRACTION``) is the model still learning to classify, not
    the paper's intermediate stage (a model that classifies well but has not yet memorised its atypical images):
    the text says so, and where it holds in every seed, or for the minimum of the seed-mean curve, the verdict does
    too."""
    d = results[results["detector"] == detector]
    r = d.pivot_table(index="seed", columns="rule", values="fpr95") * 100
    ep = d.pivot_table(index="seed", columns="rule", values="epoch")
    acc = d.pivot_table(index="seed", columns="rule", values="id_acc") * 100
    n = len(r)

    def sd(x):
        return x.std(ddof=1) if n > 1 else 0.0

    def pm(x):  # "± spread" over seeds; one seed has none
        return f" ± {sd(x):.2f}" if n > 1 else ""

    gain_oracle, gain_val = r["final"] - r["oracle"], r["final"] - r["ood_val"]
    intermediate = int((ep["oracle"] < ep["final"]).sum())
    val_better = int((gain_val > 0).sum())
    final_epoch = int(ep["final"].max())
    best_mean = best_epoch_of_mean(rows, detector)
    m = mean_over_ood(rows)
    curve = m[(m["split"] == "test") & (m["detector"] == detector) & (m["metric"] == "fpr95")]
    curve = curve.groupby("epoch")["value"].mean() * 100
    parts = [
        f"With {detector}, the oracle-best epoch comes before the last in {intermediate} of {n} seeds "
        f"({_epochs(ep['oracle'])} of {final_epoch}); it lowers the mean FPR95 from "
        f"{r['final'].mean():.2f}% at the final epoch to {r['oracle'].mean():.2f}% (a gain of "
        f"{gain_oracle.mean():.2f}{pm(gain_oracle)} points, chosen on test OOD data).",
        f"Chosen on the held-out OOD-val halves, the epoch reaches {r['ood_val'].mean():.2f}% (gain "
        f"{gain_val.mean():.2f}{pm(gain_val)} points; better than final in {val_better} of {n} seeds) at an "
        f"ID-accuracy cost of {(acc['final'] - acc['ood_val']).mean():.2f} points; chosen without OOD data (best "
        f"ID-val accuracy) it reaches {r['id_val'].mean():.2f}%.",
        f"The seed-mean curve is lowest at epoch {best_mean} ({curve.loc[best_mean]:.2f}% vs "
        f"{curve.loc[final_epoch]:.2f}% at the final epoch).",
    ]
    early = ep["ood_val"] <= EARLY_FRACTION * final_epoch
    if early.any():
        parts.append(f"The OOD-val epoch lies in the first {EARLY_FRACTION:.0%} of training in {int(early.sum())} of "
                     f"{n} seeds ({_epochs(ep['ood_val'][early])}, at "
                     f"{acc['ood_val'][early].mean():.2f}% ID accuracy against {acc['final'][early].mean():.2f}% "
                     "at the final epoch).")
    spread = sd(r["final"])
    mean_early = best_mean <= EARLY_FRACTION * final_epoch
    drop = curve.loc[final_epoch] - curve.loc[best_mean]
    stable = not mean_early and best_mean <= 0.8 * final_epoch and drop > spread
    if n < 2:  # a seed spread of 0.00 would turn any difference into a verdict
        g = gain_val.mean()
        parts.append("Verdict: undecided with one seed, which has no seed spread to judge these gains by; in this "
                     "seed the epoch chosen on OOD-val is "
                     + (f"{abs(g):.2f} points {'better' if g > 0 else 'worse'} than" if round(g, 2) else "as good as")
                     + " the final one.")
    elif val_better == n and gain_val.mean() > spread and early.all():
        parts.append("Verdict: an epoch chosen on OOD-val beats the final one in every seed, but only at the start "
                     "of training, while the model is still learning to classify: that is not the paper's "
                     "intermediate stage.")
    elif val_better == n and gain_val.mean() > spread and mean_early:
        parts.append("Verdict: an honestly chosen epoch beats the final one in every seed, but the seed-mean curve is "
                     f"lowest at the start of training (epoch {best_mean} of {final_epoch}), while the model is still "
                     "learning to classify: that is not the paper's intermediate stage.")
    elif val_better == n and gain_val.mean() > spread and stable:
        parts.append("Verdict: the intermediate-stage effect shows, survives honest epoch selection, and is a stable "
                     "stage of training.")
    elif val_better == n and gain_val.mean() > spread:
        parts.append("Verdict: an honestly chosen intermediate epoch beats the final one in every seed, but the "
                     "seed-mean curve has no clear intermediate minimum: the gain comes from epoch-to-epoch swings "
                     "of individual runs, not from a stable intermediate stage.")
    elif intermediate > n / 2 and gain_oracle.mean() > spread:
        parts.append("Verdict: an intermediate epoch is better in hindsight, but the gain does not clearly survive "
                     f"honest selection (seed spread of the final FPR95: {spread:.2f} points).")
    else:
        parts.append("Verdict: the intermediate-stage effect does not show clearly here "
                     f"(seed spread of the final FPR95: {spread:.2f} points).")
    return " ".join(parts)


def _epochs(values) -> str:
    """'epoch 6' or 'epochs 6, 8'."""
    return ("epoch " if len(values) == 1 else "epochs ") + ", ".join(str(int(e)) for e in values)


def best_epoch_of_mean(rows: pd.DataFrame, detector: str, metric: str = "fpr95") -> int:
    """The epoch minimising (or, for AUROC-like metrics, maximising) the seed-mean of the mean-over-OOD curve."""
    m = mean_over_ood(rows)
    c = m[(m["split"] == "test") & (m["detector"] == detector) & (m["metric"] == metric)]
    curve = c.groupby("epoch")["value"].mean()
    return int(curve.idxmin() if metric.startswith("fpr") else curve.idxmax())



def chosen_epochs(results: pd.DataFrame, detector: str) -> pd.DataFrame:
    """Seed × rule table of the epochs picked with ``detector`` (``results``: ``selection_results``, e.g. read
    back from ``01_epoch_selection.csv``)."""
    return results[results["detector"] == detector].pivot(index="seed", columns="rule", values="epoch").astype(int)


def rows_at(rows: pd.DataFrame, epochs: pd.Series) -> pd.DataFrame:
    """The rows of each seed at that seed's epoch (``epochs``: seed -> epoch); seeds not in ``epochs`` drop out."""
    epoch = pd.to_numeric(rows["epoch"], errors="coerce")
    return rows[epoch == rows["seed"].map(epochs)]
