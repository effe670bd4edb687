"""Figures in one style: seaborn's colour-blind palette, sized for a single paper column, saved as PDF + PNG
under ``figures/<profile>/<name>.{pdf,png}``. Bands are mean ± std over seeds."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ood_lib.metrics import mean_over_ood
from ood_lib.paths import figures_dir

COLUMN_WIDTH = 3.4   # inches: one column of a two-column paper
PALETTE = sns.color_palette("colorblind")
DISTINCT = [PALETTE[i] for i in (0, 1, 2, 4, 7, 5, 3)]  # well separated, for a few curves in one panel
METRIC_LABELS = {"fpr95": "FPR95 (%) ↓", "auroc": "AUROC (%) ↑", "aupr_in": "AUPR-In (%) ↑",
                 "aupr_out": "AUPR-Out (%) ↑", "fpr95_id": "FPR95-ID (%) ↓", "id_acc": "ID accuracy (%)"}


def style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=0.9,
                  rc={"figure.dpi": 150, "savefig.dpi": 200, "savefig.bbox": "tight", "axes.titlesize": 9})


def save(fig, profile: str, name: str) -> list[Path]:
    """Write ``fig`` as PDF and PNG. In a notebook (matplotlib's inline backend) it is then shown as the PNG just
    written, at the size the inline backend would draw it, and closed: what the notebook (and its report) shows is
    the file, and the figure is drawn for the two files only, not a third time for the notebook."""
    out = figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.pdf", out / f"{name}.png"]
    for p in paths:
        fig.savefig(p)
    if "inline" in matplotlib.get_backend():
        from IPython.display import Image, display

        png = paths[1].read_bytes()
        width = int.from_bytes(png[16:20], "big")  # the PNG header's width, in pixels
        display(Image(data=png, width=round(width * fig.dpi / plt.rcParams["savefig.dpi"])))
        plt.close(fig)
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


def epoch_curves(rows: pd.DataFrame, detector: str, metric: str, best: int, best_label: str = "best (oracle)"):
    """One panel per OOD set and one for their mean: test ``metric`` per epoch, with the epoch ``best`` (labelled
    ``best_label``; notebook 01 passes the seed-mean's oracle, ``epochs.best_epoch_of_mean``) and the final epoch
    marked."""
    test = rows[(rows["split"] == "test") & (rows["detector"] == detector) & (rows["metric"] == metric)]
    sets = sorted(test["ood_set"].unique())
    m = mean_over_ood(rows)
    mean = m[(m["split"] == "test") & (m["detector"] == detector) & (m["metric"] == metric)]
    panels = [(s, test[test["ood_set"] == s]) for s in sets] + [("mean over OOD sets", mean)]
    fig, axes = plt.subplots(1, len(panels), figsize=(COLUMN_WIDTH * 0.75 * len(panels), 2.2), sharey=False)
    final = int(test["epoch"].max())
    for i, (ax, (title, d)) in enumerate(zip(axes, panels)):
        _band(ax, d.pivot_table(index="epoch", columns="seed", values="value"), detector, PALETTE[i % len(PALETTE)])
        ax.axvline(best, color="0.3", ls="--", lw=0.9, label=f"{best_label} {best}")
        ax.axvline(final, color="0.6", ls=":", lw=0.9, label=f"final {final}")
        ax.set(xlabel="epoch", title=title)
    axes[0].set_ylabel(METRIC_LABELS.get(metric, metric))
    axes[-1].legend(loc="best", fontsize=7)
    fig.suptitle(f"{detector}: {METRIC_LABELS.get(metric, metric)} per epoch (mean ± std over seeds)", y=1.02)
    fig.tight_layout()
    return fig


def figure1(rows: pd.DataFrame, history: pd.DataFrame, detector: str = "energy"):
    """In the shape of Unleashing Mask's Figure 1: per OOD set (and their mean), the test FPR95 of ``detector`` per
    epoch (left axis) with the ID test accuracy and the training accuracy under augmentation (right axis); bands
    are mean ± std over seeds."""
    test = rows[(rows["split"] == "test") & (rows["detector"] == detector) & (rows["metric"] == "fpr95")]
    m = mean_over_ood(rows)
    panels = [(s, test[test["ood_set"] == s]) for s in sorted(test["ood_set"].unique())]
    panels.append(("mean over OOD sets", m[(m["split"] == "test") & (m["detector"] == detector)
                                           & (m["metric"] == "fpr95")]))
    acc = rows[(rows["metric"] == "id_acc") & (rows["split"] == "test")].pivot_table(
        index="epoch", columns="seed", values="value")
    tacc = history.pivot_table(index="epoch", columns="seed", values="train_acc")
    fig, axes = plt.subplots(1, len(panels), figsize=(COLUMN_WIDTH * 0.75 * len(panels), 2.3))
    for ax, (title, d) in zip(np.atleast_1d(axes), panels):
        _band(ax, d.pivot_table(index="epoch", columns="seed", values="value"), f"{detector} FPR95", PALETTE[3])
        ax.set(xlabel="epoch", title=title)
        twin = ax.twinx()
        _band(twin, acc, "ID test acc.", PALETTE[0])
        _band(twin, tacc, "train acc. (augmented)", PALETTE[2])
        twin.set_ylim(0, 101)
        twin.grid(False)
    axes = np.atleast_1d(axes)
    axes[0].set_ylabel("FPR95 (%) ↓")
    twin.set_ylabel("accuracy (%)")
    handles = [h for a in (axes[-1], twin) for h in a.get_legend_handles_labels()[0]]
    labels = [t for a in (axes[-1], twin) for t in a.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, bbox_to_anchor=(0.5, -0.08))
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
    sns.barplot(data=table, x="detector", y=metric, hue="model", errorbar="sd", ax=ax,
                palette=PALETTE[:table["model"].nunique()])
    ax.set(xlabel="", ylabel=METRIC_LABELS.get(metric, metric))
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def loss_vs_mask(curve: pd.DataFrame, mark: float | None = None):
    """The masked final model's mean training loss against the fraction of weights masked (notebooks 02-03):
    ``curve`` has columns masked, seed, mask_seed, loss; the band spans base seeds and mask seeds."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3))
    c = curve.assign(run=curve["seed"].astype(str) + "/" + curve["mask_seed"].astype(str), pct=100 * curve["masked"])
    _band(ax, c.pivot_table(index="pct", columns="run", values="loss"), "masked model", PALETTE[0], scale=1.0)
    for _, g in c.groupby("seed"):
        m = g.groupby("pct")["loss"].mean()
        ax.plot(m.index, m.values, color=PALETTE[0], lw=0.6, alpha=0.6, ls=":")
    if mark is not None:
        ax.axvline(100 * mark, color="0.3", ls="--", lw=0.9, label=f"gamma's ratio ({100 * mark:g}%)")
    ax.set_yscale("log")
    ax.set(xlabel="weights masked per layer (%)", ylabel="train cross-entropy", title="Loss of the masked final model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def atypicality_views(scores: pd.DataFrame, top: pd.Series):
    """Notebook 02: distribution of the atypicality score (KL), CE increase against KL, and KL against the epoch
    from which an image stays learned; ``top`` marks the top-k atypical images."""
    fig, axes = plt.subplots(1, 3, figsize=(2 * COLUMN_WIDTH, 2.2))
    kl = scores["kl"].clip(lower=1e-12)
    axes[0].hist(kl, bins=np.logspace(np.log10(kl.min()), np.log10(kl.max()), 50),
                 color=PALETTE[0])
    axes[0].set(xscale="log", yscale="log", xlabel="KL(masked ‖ full)", ylabel="training images",
                title="Atypicality score")
    for ax, y, label in ((axes[1], "ce_increase", "CE increase under masks"),
                         (axes[2], "learned_epoch", "epoch learned (stays correct)")):
        ax.scatter(kl[~top], scores.loc[~top, y], s=2, alpha=0.3, color=PALETTE[0], lw=0, label="other")
        ax.scatter(kl[top], scores.loc[top, y], s=2, alpha=0.5, color=PALETTE[3], lw=0, label="top-k atypical")
        ax.set(xscale="log", xlabel="KL(masked ‖ full)", ylabel=label)
    if (scores["ce_increase"] > 0).all():
        axes[1].set_yscale("log")
    axes[2].legend(fontsize=6, markerscale=4)
    fig.tight_layout()
    return fig


def gallery(images, labels, preds, most: dict, least: dict, class_names: list[str]):
    """Per class (rows): the most atypical images (left) and the most typical (right). ``images`` uint8
    (N, C, H, W); ``most``/``least`` map class -> indices. A prediction differing from the label is named above its
    image in red. One mosaic in one axes (a grid of 10 x 11 axes took ~10 s to draw on 2 cores)."""
    classes = sorted(most)
    g = max(len(v) for v in most.values())
    _, _, h, w = images.shape
    gap, head = max(w // 8, 2), max(h // 3, 6)       # between images; above each row, for the red predictions
    cell_w, cell_h = w + gap, h + head
    mosaic = np.full((len(classes) * cell_h, (2 * g + 1) * cell_w, 3), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(2 * COLUMN_WIDTH, 0.42 * len(classes) * 2 + 0.4))
    for r, c in enumerate(classes):
        for j, idx in enumerate(list(most[c]) + [None] + list(least[c])):
            if idx is None:
                continue
            img = images[idx].permute(1, 2, 0).numpy()
            y, x = r * cell_h + head, j * cell_w
            mosaic[y:y + h, x:x + w] = img if img.shape[-1] == 3 else img[..., :1]
            if preds[idx] != labels[idx]:
                ax.text(x + w / 2, y - 1, f"→{class_names[preds[idx]][:7]}", ha="center", va="bottom", fontsize=5,
                        color=PALETTE[3])
        ax.text(-gap, r * cell_h + head + h / 2, class_names[c][:11], ha="right", va="center", fontsize=6)
    ax.imshow(mosaic)
    for j, title in ((g // 2, "most atypical"), (g + 1 + g // 2, "most typical")):
        ax.text(j * cell_w + w / 2, -head, title, ha="center", va="bottom", fontsize=7)
    ax.set_axis_off()
    return fig


def arm_curves(curves: pd.DataFrame, labels: dict[str, str], metrics: tuple[str, ...] = ("fpr95", "id_acc")):
    """Per-epoch test curves of several training runs (``arm`` column), mean ± std over seeds; ``curves`` has
    columns arm, seed, epoch, metric, value (OOD metrics already averaged over the OOD sets)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(COLUMN_WIDTH * len(metrics), 2.3))
    for ax, metric in zip(axes, metrics):
        for color, (arm, label) in zip(DISTINCT, labels.items()):
            d = curves[(curves["arm"] == arm) & (curves["metric"] == metric)]
            if len(d):
                _band(ax, d.pivot_table(index="epoch", columns="seed", values="value"), label, color)
        ax.set(xlabel="epoch", ylabel=METRIC_LABELS.get(metric, metric))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def fine_tune_curves(history: pd.DataFrame, curves: pd.DataFrame, reference: dict[str, float], detector: str):
    """Notebook 03: per fine-tuning epoch, the train cross-entropy against gamma, the ID test accuracy and the mean
    test FPR95 of ``detector``, one line per model (mean ± std over seeds); ``reference`` values (e.g. the final
    base model's) are dashed horizontal lines. ``curves``: model, seed, epoch, metric, value."""
    fig, axes = plt.subplots(1, 3, figsize=(2 * COLUMN_WIDTH, 2.3))
    models = list(dict.fromkeys(history["model"]))
    for i, model in enumerate(models):
        h = history[history["model"] == model]
        _band(axes[0], h.pivot_table(index="epoch", columns="seed", values="train_loss"), model, PALETTE[i], 1.0)
        for ax, metric in ((axes[1], "id_acc"), (axes[2], "fpr95")):
            d = curves[(curves["model"] == model) & (curves["metric"] == metric)]
            _band(ax, d.pivot_table(index="epoch", columns="seed", values="value"), model, PALETTE[i])
    gamma = history["gamma"].dropna()
    if len(gamma):
        axes[0].axhline(gamma.mean(), color="0.2", ls="--", lw=0.9, label=f"gamma (mean {gamma.mean():.3g})")
    for ax, key in ((axes[1], "id_acc"), (axes[2], "fpr95")):
        if key in reference:
            ax.axhline(100 * reference[key], color="0.5", ls=":", lw=0.9, label="final base model")
    loss = history["train_loss"]
    axes[0].set(yscale="log" if loss.max() > 10 * loss.min() else "linear", xlabel="fine-tuning epoch",
                ylabel="train cross-entropy", title="Training loss")
    axes[1].set(xlabel="fine-tuning epoch", ylabel=METRIC_LABELS["id_acc"], title="ID test accuracy")
    axes[2].set(xlabel="fine-tuning epoch", ylabel=METRIC_LABELS["fpr95"], title=f"{detector}, mean over OOD sets")
    axes[0].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    return fig


def score_histograms(scores: dict[str, np.ndarray], detector: str, id_name: str):
    """Distribution of one detector's scores on the ID test set and each OOD set (density, shared bins)."""
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2))
    allv = np.concatenate(list(scores.values()))
    lo, hi = np.percentile(allv, [0.5, 99.5])
    bins = np.linspace(lo, hi, 60)
    for i, (name, s) in enumerate(scores.items()):
        ax.hist(np.clip(s, lo, hi), bins=bins, density=True, histtype="stepfilled" if name == id_name else "step",
                alpha=0.35 if name == id_name else 1.0, lw=1.2, color=PALETTE[i % len(PALETTE)],
                label=f"{name} (ID)" if name == id_name else name)
    ax.set(xlabel=f"{detector} score (higher = more ID)", ylabel="density", title=f"{detector}: ID vs OOD scores")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def roc_curves(id_scores: np.ndarray, ood: dict[str, np.ndarray], detector: str):
    """ROC curve (ID positive) of one detector against each OOD set, with the 95% TPR line and each AUROC."""
    from ood_lib.metrics import auroc, roc_curve

    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 0.8, 2.6))
    for i, (name, s) in enumerate(ood.items()):
        fpr, tpr = roc_curve(id_scores, s)
        ax.plot(100 * fpr, 100 * tpr, color=PALETTE[(i + 1) % len(PALETTE)], lw=1.3,
                label=f"{name} (AUROC {100 * auroc(id_scores, s):.1f})")
    ax.axhline(95, color="0.5", ls=":", lw=0.9)
    ax.plot([0, 100], [0, 100], color="0.8", lw=0.8)
    ax.set(xlabel="OOD accepted (FPR, %)", ylabel="ID accepted (TPR, %)", title=f"{detector}: ROC, ID positive",
           xlim=(0, 100), ylim=(0, 101))
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def model_bars(table: pd.DataFrame, metric: str = "fpr95", order: list[str] | None = None):
    """Mean-over-OOD ``metric`` (%) per detector for several models (e.g. final, best intermediate, UM, UMAP),
    mean ± std over seeds; ``table`` has columns model, detector, seed and ``metric``."""
    n_models = len(order or table["model"].unique())
    fig, ax = plt.subplots(figsize=(2 * COLUMN_WIDTH, 2.4))
    sns.barplot(data=table, x="detector", y=metric, hue="model", hue_order=order, errorbar="sd", ax=ax,
                palette=PALETTE[:n_models])
    ax.set(xlabel="", ylabel=METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize=6, ncols=min(4, n_models), loc="upper center",
              bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    return fig


def gamma_curves(points: pd.DataFrame, reference: dict[str, dict[str, float]], detector: str):
    """UM's final test metrics against its flood level gamma (log axis): ``points`` has columns gamma, seed,
    fpr95, id_acc (fractions); each seed's estimated gamma is a marker of its own. ``reference`` maps a label
    (e.g. "final base model") to {"fpr95": ..., "id_acc": ...}, drawn as horizontal lines."""
    fig, axes = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.3))
    sweep, estimated = points[~points["estimated"]], points[points["estimated"]]
    for ax, metric in zip(axes, ("fpr95", "id_acc")):
        curve = sweep.pivot_table(index="gamma", columns="seed", values=metric)
        if len(curve):
            _band(ax, curve, "UM, fixed gamma", PALETTE[0])
            ax.plot(curve.index, 100 * curve.mean(axis=1), "o", color=PALETTE[0], ms=3)
        ax.scatter(estimated["gamma"], 100 * estimated[metric], color=PALETTE[3], s=14, zorder=3,
                   label="UM, estimated gamma (per seed)")
        for i, (label, values) in enumerate(reference.items()):
            ax.axhline(100 * values[metric], color=("0.3", "0.6")[i % 2], ls=("--", ":")[i % 2], lw=0.9, label=label)
        ax.set(xscale="log", xlabel="flood level gamma", ylabel=METRIC_LABELS[metric])
    axes[0].set_title(f"{detector}, mean over OOD sets")
    axes[1].set_title("ID test accuracy")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def ablation_bars(abl: pd.DataFrame, parts: list[str]):
    """LINe's ablation: mean-over-OOD FPR95 (%) of every on/off combination of its ``parts`` (boolean columns of
    ``abl``; short names are the parentheses of the column names), one bar per model, mean ± std over seeds."""
    short = {p: p[p.find("(") + 1:p.find(")")] if "(" in p else p for p in parts}
    d = abl.assign(parts=abl[parts].apply(lambda r: "+".join(short[p] for p in parts if r[p]) or "none (energy)",
                                          axis=1), fpr95=100 * abl["fpr95"])
    order = list(dict.fromkeys(d.sort_values(parts, key=lambda c: c.astype(int))["parts"]))
    fig, ax = plt.subplots(figsize=(2 * COLUMN_WIDTH, 2.3))
    sns.barplot(data=d, x="parts", y="fpr95", hue="model", order=order, errorbar="sd", ax=ax,
                palette=PALETTE[:d["model"].nunique()])
    ax.set(xlabel="parts of LINe switched on", ylabel=METRIC_LABELS["fpr95"], title="LINe ablation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
