"""Figures in one style: seaborn's colour-blind palette, sized for a single paper column, saved as PDF + PNG
under ``figures/<profile>/<name>.{pdf,png}``. Bands are mean ± std over seeds."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ood_lib.epochs import best_epoch_of_mean, mean_over_ood
from ood_lib.paths import figures_dir

COLUMN_WIDTH = 3.4   # inches: one column of a two-column paper
PALETTE = sns.color_palette("colorblind")
METRIC_LABELS = {"fpr95": "FPR95 (%) ↓", "auroc": "AUROC (%) ↑", "aupr_in": "AUPR-In (%) ↑",
                 "aupr_out": "AUPR-Out (%) ↑", "fpr95_id": "FPR95-ID (%) ↓", "id_acc": "ID accuracy (%)"}


def style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=0.9,
                  rc={"figure.dpi": 150, "savefig.dpi": 200, "savefig.bbox": "tight", "axes.titlesize": 9})


def save(fig, profile: str, name: str) -> list[Path]:
    out = figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        fig.savefig(p)
    return paths


def _band(ax, curve: pd.DataFrame, label: str, color, scale: float = 100.0):
    """curve: index epoch, columns seeds."""
    mean, std = curve.mean(axis=1) * scale, curve.std(axis=1, ddof=1).fillna(0) * scale
    ax.plot(mean.index, mean.values, color=color, label=label, lw=1.4)
    ax.fill_between(mean.index, (mean - std).values, (mean + std).values, color=color, alpha=0.2, lw=0)


def training_curves(history: pd.DataFrame, rows: pd.DataFrame):
    """Train loss (log scale) and ID test accuracy per epoch, mean ± std over seeds."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.2))
    loss = history.pivot_table(index="epoch", columns="seed", values="train_loss")
    _band(a, loss, "train loss", PALETTE[0], scale=1.0)
    a.set_yscale("log")
    a.set(xlabel="epoch", ylabel="train cross-entropy", title="Training loss")
    acc = rows[(rows["metric"] == "id_acc") & (rows["split"] == "test")].pivot_table(
        index="epoch", columns="seed", values="value")
    _band(b, acc, "ID test", PALETTE[1])
    tacc = history.pivot_table(index="epoch", columns="seed", values="train_acc")
    _band(b, tacc, "train (as trained)", PALETTE[2])
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="ID accuracy")
    b.legend(loc="lower right")
    fig.tight_layout()
    return fig


def epoch_curves(rows: pd.DataFrame, detector: str, metric: str = "fpr95"):
    """One panel per OOD set and one for their mean: test ``metric`` per epoch, with the seed-mean's best
    epoch (oracle) and the final epoch marked."""
    test = rows[(rows["split"] == "test") & (rows["detector"] == detector) & (rows["metric"] == metric)]
    sets = sorted(test["ood_set"].unique())
    m = mean_over_ood(rows)
    mean = m[(m["split"] == "test") & (m["detector"] == detector) & (m["metric"] == metric)]
    panels = [(s, test[test["ood_set"] == s]) for s in sets] + [("mean over OOD sets", mean)]
    fig, axes = plt.subplots(1, len(panels), figsize=(COLUMN_WIDTH * 0.75 * len(panels), 2.2), sharey=False)
    best = best_epoch_of_mean(rows, detector, metric)
    final = int(test["epoch"].max())
    for i, (ax, (title, d)) in enumerate(zip(axes, panels)):
        _band(ax, d.pivot_table(index="epoch", columns="seed", values="value"), detector, PALETTE[i % len(PALETTE)])
        ax.axvline(best, color="0.3", ls="--", lw=0.9, label=f"best (oracle) {best}")
        ax.axvline(final, color="0.6", ls=":", lw=0.9, label=f"final {final}")
        ax.set(xlabel="epoch", title=title)
    axes[0].set_ylabel(METRIC_LABELS.get(metric, metric))
    axes[-1].legend(loc="best", fontsize=7)
    fig.suptitle(f"{detector}: {METRIC_LABELS.get(metric, metric)} per epoch (mean ± std over seeds)", y=1.02)
    fig.tight_layout()
    return fig


def detectors_mean_curves(rows: pd.DataFrame, metric: str = "fpr95"):
    """Every detector's mean-over-OOD test ``metric`` per epoch in one panel."""
    m = mean_over_ood(rows)
    m = m[(m["split"] == "test") & (m["metric"] == metric)]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
    for i, (det, d) in enumerate(m.groupby("detector")):
        _band(ax, d.pivot_table(index="epoch", columns="seed", values="value"), det, PALETTE[i % len(PALETTE)])
    ax.set(xlabel="epoch", ylabel=METRIC_LABELS.get(metric, metric), title="Mean over OOD sets, per detector")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sensitivity_curves(sens: pd.DataFrame, setting: dict[str, float]):
    """LINe's mean FPR95 (left axis) as p_a, p_w or the tau percentile varies; the setting marked."""
    params = list(dict.fromkeys(sens["parameter"]))
    fig, axes = plt.subplots(1, len(params), figsize=(COLUMN_WIDTH * 0.75 * len(params), 2.2))
    for ax, p in zip(axes, params):
        d = sens[sens["parameter"] == p]
        for i, (model, g) in enumerate(d.groupby("model", sort=False)):
            curve = g.pivot_table(index="value", columns="seed", values="fpr95")
            _band(ax, curve, model, PALETTE[i % len(PALETTE)])
        if p in setting and setting[p] is not None:
            ax.axvline(setting[p], color="0.3", ls="--", lw=0.9, label="setting")
        ax.set(xlabel=p, title=f"LINe vs {p}")
    axes[0].set_ylabel(METRIC_LABELS["fpr95"])
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def detector_bars(table: pd.DataFrame, metric: str = "fpr95"):
    """Mean-over-OOD ``metric`` per detector (mean ± std over seeds), one bar group per model."""
    fig, ax = plt.subplots(figsize=(2 * COLUMN_WIDTH, 2.4))
    sns.barplot(data=table, x="detector", y=metric, hue="model", errorbar="sd", ax=ax, palette=PALETTE)
    ax.set(xlabel="", ylabel=METRIC_LABELS.get(metric, metric))
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig
