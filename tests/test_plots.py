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


def test_gallery_puts_each_image_in_its_row_and_column_and_names_the_wrong_predictions():
    """plots.gallery: row c holds class c's most atypical images, a blank column, then its most typical ones, each
    image unchanged (grey ones as grey RGB); a red label names the prediction only where it differs."""
    import torch

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8))
    labels = np.array([0] * 6 + [1] * 6)
    preds = labels.copy()
    preds[[1, 7]] = [1, 0]
    most, least = {0: [0, 1], 1: [6, 7]}, {0: [5, 4], 1: [11, 10]}
    fig = plots.gallery(images, labels, preds, most, least, ["cat", "dog"])
    (ax,) = fig.axes
    mosaic = ax.get_images()[0].get_array()
    h, w = 8, 8
    cells = [(m, r, c) for m in (most, least) for r in (0, 1) for c in range(2)]
    boxes = [(y, x) for y in range(mosaic.shape[0] - h + 1) for x in range(mosaic.shape[1] - w + 1)]
    where = {}
    for i in range(12):
        want = images[i].permute(1, 2, 0).numpy()
        where[i] = [(y, x) for y, x in boxes if np.array_equal(mosaic[y:y + h, x:x + w], want)]
    rows = sorted({y for i in (0, 1, 6, 7) for y, _ in where[i]})
    cols = sorted({x for i in (0, 1, 5, 4) for _, x in where[i]})
    assert len(rows) == 2 and len(cols) == 4 and cols[2] - cols[1] > cols[1] - cols[0]  # a blank column between
    for m, r, c in cells:
        i = m[r][c]
        col = c if m is most else 2 + c
        assert where[i] == [(rows[r], cols[col])], (i, where[i])
    assert not where[2] and not where[3] and not where[8] and not where[9]  # not picked: not shown
    red = sorted(t.get_text() for t in ax.texts if t.get_color() == plots.PALETTE[3])
    assert red == ["→cat", "→dog"]
    grey = plots.gallery(images[:, :1], labels, preds, most, least, ["cat", "dog"]).axes[0].get_images()[0]
    first = grey.get_array()[rows[0]:rows[0] + h, cols[0]:cols[0] + w]
    assert (first == images[0, 0].numpy()[..., None]).all()


def test_save_writes_pdf_and_png_and_in_a_notebook_shows_the_png(tmp_path, monkeypatch):
    """In a script the figure stays open; under the inline backend it is shown as the PNG file, at the size the
    inline backend would draw it (figure.dpi, not savefig.dpi), and closed."""
    import matplotlib.pyplot as plt
    import IPython.display

    monkeypatch.setenv("OOD_FIGURES_DIR", str(tmp_path))
    plots.style()
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    pdf, png = plots.save(fig, "p", "line")
    assert pdf.read_bytes()[:5] == b"%PDF-" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.fignum_exists(fig.number)  # Agg: nothing shown, the figure is the caller's
    shown = []
    monkeypatch.setattr(matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    monkeypatch.setattr(IPython.display, "display", shown.append)
    plots.save(fig, "p", "line")
    assert len(shown) == 1 and shown[0].data == png.read_bytes()
    width = int.from_bytes(png.read_bytes()[16:20], "big")
    assert shown[0].width == round(width * 150 / 200) and 150 < shown[0].width < 400
    assert not plt.fignum_exists(fig.number)


def test_bar_charts_colour_each_model_in_order_and_warn_nothing():
    """detector_bars, model_bars and ablation_bars: one colour per model, the palette's first ones in hue order, and
    no warning in the notebooks (a full palette for three models made seaborn warn in every executed notebook)."""
    import warnings

    import seaborn as sns
    from matplotlib.colors import to_rgb

    models = ["base", "um", "umap"]
    table = pd.DataFrame([{"model": m, "detector": d, "seed": s, "fpr95": 10.0 * (i + 1) + j + s}
                          for i, m in enumerate(models) for j, d in enumerate(["energy", "msp"]) for s in (0, 1)])
    abl = pd.DataFrame([{"model": m, "seed": s, "clip (AC)": a, "weight pruning (WP)": w, "fpr95": 0.5}
                        for m in models for s in (0, 1) for a in (False, True) for w in (False, True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = [plots.detector_bars(table), plots.model_bars(table, order=["umap", "base", "um"]),
                plots.ablation_bars(abl, ["clip (AC)", "weight pruning (WP)"])]
    for fig, order in zip(figs, [models, ["umap", "base", "um"], models]):
        legend = fig.axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == order
        got = [to_rgb(h.get_facecolor()) for h in legend.legend_handles]
        assert np.allclose(got, [sns.desaturate(c, 0.75) for c in plots.PALETTE[:3]])  # barplot's saturation
