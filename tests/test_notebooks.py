"""Every notebook runs under papermill on the smoke profile, through the runner, and writes its contracts."""
import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ood_lib import execute, reproduce
from ood_lib.config import load_profile
from ood_lib.metrics import METRICS


def assert_figure(folder, stem):
    """``stem``.png and .pdf as ``plots.save`` writes them: a PNG of a figure a few inches wide at 200 dpi (the
    default profile's are 669 to 1519 x 427 to 467 pixels) with something drawn on it, and a PDF."""
    with Image.open(folder / f"{stem}.png") as im:
        assert im.format == "PNG", stem
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert 300 <= width <= 4000 and 150 <= height <= 4000, (stem, im.size)
    inked = float((pixels < 245).any(axis=2).mean())  # not a blank (white) or a filled page
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert 0.01 < inked < 0.99 and colours > 20, (stem, inked, colours)
    assert (folder / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem


def test_notebook_01_writes_every_metric_row(smoke_run):
    out, done = smoke_run
    assert [name for name, _ in done] == ["01_intermediate_stage.ipynb", "02_atypical_samples.ipynb",
                                          "03_unleashing_mask.ipynb", "04_line.ipynb", "05_report.ipynb"]
    p = load_profile("smoke")
    m = pd.read_csv(out / "results/smoke/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    m = m[m.notebook == "01"]
    ood = m[m.metric != "id_acc"]
    logit = [d for d in p.eval.detectors if d != "odin"]
    every = ood[ood.detector.isin(logit)]  # the logit detectors after every epoch
    assert len(every) == len(p.seeds) * p.train.epochs * len(logit) * len(p.data.ood_sets) * len(METRICS)
    assert not ood.duplicated(["seed", "epoch", "detector", "ood_set", "metric"]).any()
    assert set(ood.metric) == set(METRICS) and set(ood.detector) == set(p.eval.detectors)
    # ODIN only at the final epoch and the epochs the rules pick with the selection detector
    sel = pd.read_csv(out / "results/smoke/01_epoch_selection.csv")
    for seed in p.seeds:
        picks = sel[(sel.seed == seed) & (sel.detector == p.eval.selection_detector)].epoch
        assert set(ood[(ood.detector == "odin") & (ood.seed == seed)].epoch.astype(int)) == set(picks)
        odin = sel[(sel.seed == seed) & (sel.detector == "odin")].set_index("rule").epoch
        assert odin.to_dict() == sel[(sel.seed == seed) & (sel.detector == p.eval.selection_detector)].set_index(
            "rule").epoch.to_dict()
    acc = m[m.metric == "id_acc"]
    assert len(acc) == len(p.seeds) * p.train.epochs and (acc.ood_set == "").all()
    assert ((m.value >= 0) & (m.value <= 1)).all() and (m.model == "base").all()


def test_notebook_01_writes_figures_tables_timings_provenance(smoke_run):
    out, _ = smoke_run
    figs = {f.name for f in (out / "figures/smoke").iterdir()}
    for stem in ("01_training_curves", "01_energy_fpr95_per_epoch", "01_energy_auroc_per_epoch",
                 "01_detectors_fpr95_per_epoch", "01_energy_figure1"):
        assert {f"{stem}.pdf", f"{stem}.png"} <= figs
        assert_figure(out / "figures/smoke", stem)
    sel = pd.read_csv(out / "results/smoke/01_epoch_selection.csv")
    assert set(sel.rule) == {"final", "oracle", "ood_val", "id_val"}
    # the oracle is the best test FPR95 by construction: never worse than any other rule (for the detectors scored
    # after every epoch; ODIN takes the selection detector's epochs, test_notebook_01_writes_every_metric_row)
    for _, g in sel[sel.detector != "odin"].groupby(["seed", "detector"]):
        assert g.set_index("rule").loc["oracle", "fpr95"] <= g.fpr95.min() + 1e-12
    timings = pd.read_csv(out / "results/smoke/timings.csv", dtype={"notebook": str})
    assert set(timings.notebook) == {"01", "02", "03", "04"} and (timings.seconds >= 0).all()  # 05 times nothing
    prov = json.loads((out / "results/smoke/provenance.json").read_text())["01"]
    assert prov["seeds"] == [0, 1] and prov["data_checksums"] and prov["profile"]["name"] == "smoke"
    executed = json.loads((out / "results/smoke/notebooks/01_intermediate_stage.ipynb").read_text())
    text = json.dumps(executed)
    assert "Verdict:" in text and "seed-mean curve is lowest at epoch" in text  # the computed verdict rendered
    # each figure the notebook shows is the PNG file it wrote, at the size the inline backend would have drawn it
    shown = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    files = {(out / "figures/smoke" / f"{stem}.png").read_bytes() for stem in (
        "01_training_curves", "01_energy_fpr95_per_epoch", "01_energy_auroc_per_epoch",
        "01_detectors_fpr95_per_epoch", "01_energy_figure1")}
    assert {base64.b64decode(o["data"]["image/png"]) for o in shown} == files and len(shown) == len(files)
    for o in shown:
        with Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))) as im:
            assert o["metadata"]["image/png"]["width"] == round(im.size[0] * 150 / 200)  # figure.dpi / savefig.dpi


def test_notebook_04_compares_line_with_every_detector(smoke_run):
    from ood_lib.posthoc import POSTHOC

    out, _ = smoke_run
    p = load_profile("smoke")
    m = pd.read_csv(out / "results/smoke/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    m = m[m.notebook == "04"]
    detectors = set(m[m.metric != "id_acc"].detector)
    assert {"line", "energy", "react", "dice", "ash_p", "ash_p_map"} <= detectors
    assert set(p.line.baselines) <= detectors and set(p.line.baselines) <= set(POSTHOC)
    per = m[m.metric != "id_acc"].groupby(["model", "seed", "detector", "ood_set"]).size()
    assert (per == len(METRICS)).all() and len(per) == 3 * len(p.seeds) * len(detectors) * len(p.data.ood_sets)
    epochs = m[m.metric == "id_acc"].groupby("model").epoch.apply(lambda e: set(e.astype(int)))
    assert epochs.to_dict() == {"base": {p.train.epochs}, "um": {p.um.epochs}, "umap": {p.um.epochs}}  # final models
    abl = pd.read_csv(out / "results/smoke/04_ablation.csv")
    assert len(abl) == 8 * 3 * len(p.seeds)  # every on/off combination of clipping, activation and weight pruning
    sens = pd.read_csv(out / "results/smoke/04_sensitivity.csv")
    assert set(sens.parameter) == {"p_a", "p_w", "tau percentile"}
    # LINe with only clipping at the ReAct threshold IS ReAct: the ablation row must equal the react row
    react = m[(m.model == "base") & (m.detector == "react") & (m.metric == "fpr95")].groupby("seed").value.mean().mean()
    abl = abl[abl.model == "base"]
    clip_only = abl[(abl["clip (AC)"]) & (~abl["activation pruning (AP)"]) & (~abl["weight pruning (WP)"])]
    assert clip_only.fpr95.mean() == pytest.approx(react, abs=1e-9)
    for stem in ("04_detectors_fpr95", "04_line_sensitivity", "04_line_ablation"):
        assert_figure(out / "figures/smoke", stem)


def test_notebook_02_atypicality_and_the_experiment(smoke_run):
    out, _ = smoke_run
    p = load_profile("smoke")
    m = pd.read_csv(out / "results/smoke/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    m = m[m.notebook == "02"]
    logit = {"msp", "maxlogit", "energy"} & set(p.eval.detectors)
    ood = m[m.metric != "id_acc"]
    assert set(ood.model) == {"no_atypical", "no_atypical_per_class", "no_random"} and set(ood.detector) == logit
    assert len(ood) == 3 * len(p.seeds) * p.train.epochs * len(logit) * len(p.data.ood_sets) * len(METRICS)
    per_seed = pd.read_csv(out / "results/smoke/02_atypicality_per_seed.csv")
    assert len(per_seed) == len(p.seeds) * p.data.train_size
    assert (per_seed.kl >= 0).all() and per_seed.learned_epoch.between(1, p.train.epochs + 1).all()
    curve = pd.read_csv(out / "results/smoke/02_loss_vs_mask_ratio.csv")
    assert len(curve) == len(p.seeds) * len(p.um.curve_keep) * len(p.um.mask_seeds)
    assert (curve.loss > 0).all() and curve.masked.between(0, 1).all()
    prov = json.loads((out / "results/smoke/provenance.json").read_text())["02"]
    removed = prov["removed"]
    assert len(removed) == 3 and {len(idx) for by_seed in removed.values() for idx in by_seed.values()} == {
        p.um.atypical_remove}
    for seed in p.seeds:  # each seed removes the top-k of its own final model's KL, and per class its share of k
        kl = per_seed[per_seed.seed == seed].set_index("image").kl
        top = kl.sort_values(ascending=False, kind="stable").index[:p.um.atypical_remove]
        assert set(removed["no_atypical"][str(seed)]) == set(top)
        labels = per_seed[per_seed.seed == seed].set_index("image").label
        share = labels.loc[removed["no_atypical_per_class"][str(seed)]].value_counts()
        assert (share - labels.value_counts().loc[share.index] * p.um.atypical_remove / len(labels)).abs().max() < 1
    assert removed["no_random"]["0"] != removed["no_random"]["1"]
    for stem in ("02_loss_vs_mask_ratio", "02_atypicality_views", "02_atypical_gallery", "02_without_atypical_energy"):
        assert_figure(out / "figures/smoke", stem)
    text = json.dumps(json.loads((out / "results/smoke/notebooks/02_atypical_samples.ipynb").read_text()))
    assert "Verdict:" in text and "Two views." in text


def test_notebook_03_gamma_um_umap(smoke_run):
    out, _ = smoke_run
    p = load_profile("smoke")
    m = pd.read_csv(out / "results/smoke/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    m = m[m.notebook == "03"]
    sweep = {f"um_gamma{g:g}" for g in p.um.gamma_sweep}
    trained_b = set(m.model) & {"um_b"}  # UM at rule B runs only where rule B finds a late stage
    assert sweep and set(m.model) == {"um", "umap", "ft_ce"} | sweep | trained_b
    final = m[(m.epoch.astype(int) == p.um.epochs) & (m.metric != "id_acc")]
    per = final.groupby(["model", "seed", "detector", "ood_set"]).size()
    assert (per == len(METRICS)).all()
    gamma_b = pd.read_csv(out / "results/smoke/03_gamma.csv")
    assert (gamma_b["rule B epoch"].between(1, p.train.epochs)).all()
    late = gamma_b["rule B epoch"] <= 0.9 * p.train.epochs
    assert bool(trained_b) == late.any() and gamma_b.loc[late, "rule B gamma"].astype(float).gt(0).all()
    models = 3 + len(sweep) + bool(trained_b)
    assert len(per) == models * len(p.seeds) * len(p.eval.detectors) * len(p.data.ood_sets)  # every detector, ODIN too
    gamma = pd.read_csv(out / "results/smoke/03_gamma_per_mask.csv")
    assert len(gamma) == len(p.seeds) * len(p.um.mask_seeds) and (gamma.gamma > 0).all()
    history = pd.read_csv(out / "results/smoke/03_training_history.csv")
    assert len(history) == models * len(p.seeds) * p.um.epochs - (len(p.seeds) - late.sum()) * bool(trained_b) * p.um.epochs
    fixed = history[history.model.isin(sweep)].groupby("model").gamma.unique()
    assert {f"um_gamma{g[0]:g}" for g in fixed} == sweep  # each sweep run used its own fixed gamma
    used = pd.read_csv(out / "results/smoke/03_gamma.csv").set_index("seed")["used"]
    um_gamma = history[history.model == "um"].groupby("seed").gamma.first()
    assert (um_gamma - used).abs().max() < 1e-12  # UM used the mean over masks of its own seed's gamma
    table = pd.read_csv(out / "results/smoke/03_um_comparison.csv")
    assert {"base, final", "base, OOD-val epoch", "base, oracle epoch", "UM (rule A)", "UMAP"} <= set(table.model)
    assert not any("fixed" in m for m in table.model)  # the fixed-γ diagnostic stays out of the headline table
    for stem in ("03_fine_tuning_curves", "03_um_gamma_sensitivity", "03_um_vs_final_fpr95", "03_energy_roc_um"):
        assert_figure(out / "figures/smoke", stem)
    text = json.dumps(json.loads((out / "results/smoke/notebooks/03_unleashing_mask.ipynb").read_text()))
    assert re.search(r"clearly improves? on the final model", text), text[-3000:]


def test_notebook_05_assembles_every_claim(smoke_run):
    out, _ = smoke_run
    tables = out / "results/smoke/tables"
    for claim in ("claim1_intermediate_stage", "claim2_without_atypical", "claim3_unleashing_mask", "claim4_line"):
        assert {f"{claim}.md", f"{claim}.tex", f"{claim}.csv"} <= {p.name for p in tables.iterdir()}, claim
        tex = (tables / f"{claim}.tex").read_text()
        assert "\\toprule" in tex and "\\bottomrule" in tex and "\\textbf{" in tex
    claim3 = pd.read_csv(tables / "claim3_unleashing_mask.csv")
    assert {"base, final", "base, OOD-val epoch", "UM (rule A)", "UMAP"} <= set(claim3.model)
    executed = json.loads((out / "results/smoke/notebooks/05_report.ipynb").read_text())
    shown = json.dumps([o for c in executed["cells"] if c["cell_type"] == "code" for o in c["outputs"]])
    assert shown.count("**Verdict") == 4 and "has not run on profile" in shown  # 00 did not run on smoke


def test_notebooks_02_03_05_without_the_diagnostics_reuse_every_table(smoke_run, tmp_path, monkeypatch):
    """`default`'s setting: no global top-k arm, no fixed-gamma sweep. The switches only add stages, so on a copy of
    the smoke results nothing is recomputed (no new shard folder, no stage table written), and the notebooks say
    what did not run."""
    import shutil

    out, _ = smoke_run
    shutil.copytree(out, tmp_path / "copy")
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path / "copy/results"))
    monkeypatch.setenv("OOD_FIGURES_DIR", str(tmp_path / "copy/figures"))
    shard_root = tmp_path / "copy/results/smoke/shards"
    before = {f: f.stat().st_mtime_ns for f in shard_root.rglob("*") if f.is_file()}
    execute.run("smoke", ["02", "03", "05"], {"um.global_arm": False, "um.gamma_sweep": []})
    assert {f: f.stat().st_mtime_ns for f in shard_root.rglob("*") if f.is_file()} == before

    def shown(nb):
        executed = json.loads((tmp_path / f"copy/results/smoke/notebooks/{nb}.ipynb").read_text())
        return json.dumps([o for c in executed["cells"] if c["cell_type"] == "code" for o in c["outputs"]])

    assert "was not retrained on this profile" in shown("02_atypical_samples")
    assert "um.gamma_sweep is empty" in shown("03_unleashing_mask")
    assert shown("05_report").count("**Verdict") == 4 and "(global)" not in shown("05_report")
    m = pd.read_csv(tmp_path / "copy/results/smoke/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    assert set(m[m.notebook == "02"].model) == {"no_atypical_per_class", "no_random"}
    assert not m[m.notebook == "03"].model.str.startswith("um_gamma").any()


def test_rerun_reuses_checkpoints_and_cache(smoke_run):
    out, _ = smoke_run
    from ood_lib import base
    p = load_profile("smoke")
    data = base.prepare_data(p)
    cache = base.feature_cache(p)
    history = base.train_seed(p, data, p.seeds[0], log=lambda s: None)  # finished run: reloads, trains nothing
    assert list(history.epoch) == list(range(1, p.train.epochs + 1))
    base.evaluate_run(p, data, p.seeds[0], cache)
    assert cache.misses == 0 and cache.hits > 0


def test_runner_rejects_unknown_names_before_work(capsys):
    assert reproduce.main(["--profile", "nope"]) == 2
    assert "allowed: [" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--notebooks", "09"]) == 2
    assert "unknown notebook(s) ['09']" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--set", "train.epoch=2"]) == 2
    assert "allowed:" in capsys.readouterr().err


def test_notebook_00_scores_the_pretrained_checkpoints(tmp_path, monkeypatch):
    from ood_lib.models import PRETRAINED, load_pretrained

    # The checkpoints and CIFAR-10 are found as `make test` finds them (OOD_MODELS_ROOT, else ../shared/models;
    # conftest's ``data_root``: OOD_DATA_ROOT, else ../shared/data); skipped only when they are nowhere.
    try:
        for name in PRETRAINED:
            load_pretrained(name)
    except FileNotFoundError as e:
        pytest.skip(f"a pretrained checkpoint is in none of the places looked: {e}")
    from ood_lib.data import DatasetMissing, load_dataset
    try:
        load_dataset("cifar10", "test")
    except DatasetMissing as e:
        pytest.skip(f"CIFAR-10 is in none of the places looked: {e}")
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("OOD_FIGURES_DIR", str(tmp_path / "figures"))
    small = {"data.id_test_size": 200, "data.ood_size": 100, "data.id_val_size": 10,
             "um.curve_images": 30, "um.curve_keep": [0.965], "um.gallery_size": 1}  # gamma on 30 images, not 1,000
    execute.run("cifar10-pretrained", ["00"], small)
    m = pd.read_csv(tmp_path / "results/cifar10-pretrained/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    acc = m[m.metric == "id_acc"].set_index("model")["value"]
    assert set(acc.index) == set(PRETRAINED)
    assert (acc > 0.7).all(), acc  # about 82% on the JPEG copy; a wrong normalisation lands far lower
    p = load_profile("cifar10-pretrained")
    ood = m[m.metric != "id_acc"]
    assert len(ood) == len(PRETRAINED) * len(p.eval.detectors) * len(p.data.ood_sets) * len(METRICS)
    assert (m.epoch == "").all()
