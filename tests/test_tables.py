"""Result tables: mean ± std over seeds, the per-seed OOD-mean, bold by metric direction, renderers, paper values."""
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from ood_lib import tables
from ood_lib.tables import PAPER_VALUES, higher_is_better, summarize

NOTES = Path(__file__).resolve().parents[2] / "shared" / "research"

# (model, detector) -> metric -> OOD set -> value per seed 0, 1, 2 (fractions). Hand-computed, in %:
#   fpr95  base/energy   mnist 20 ± 10, animal 20 ± 10, per-seed means 20, 20, 20     -> mean 20 ± 0 (not 10)
#          base/msp      mnist 10 ± 5,  animal 70 ± 10, per-seed 32.5, 40, 47.5      -> mean 40 ± 7.5
#          no_atypical/energy  mnist 20 ± 10, animal 20 ± sqrt(300), per-seed 10, 30, 20 -> 20 ± 10 (not 13.66)
#          no_atypical/msp     30 ± 0, 50 ± 0 -> 40 ± 0
#   auroc  base/energy 90, 80 -> 85; base/msp 70, 60 -> 65; no_atypical/energy 95, 85 -> 90; no_atypical/msp 65
#   id_acc base 90, 91, 92 -> 91 ± 1; no_atypical 88 ± 0
VALUES = {
    ("base", "energy"): {"fpr95": {"mnist": [.10, .20, .30], "animal_mnist": [.30, .20, .10]},
                         "auroc": {"mnist": [.90] * 3, "animal_mnist": [.80] * 3}},
    ("base", "msp"): {"fpr95": {"mnist": [.05, .10, .15], "animal_mnist": [.60, .70, .80]},
                      "auroc": {"mnist": [.70] * 3, "animal_mnist": [.60] * 3}},
    ("no_atypical", "energy"): {"fpr95": {"mnist": [.10, .20, .30], "animal_mnist": [.10, .40, .10]},
                                "auroc": {"mnist": [.95] * 3, "animal_mnist": [.85] * 3}},
    ("no_atypical", "msp"): {"fpr95": {"mnist": [.30] * 3, "animal_mnist": [.50] * 3},
                             "auroc": {"mnist": [.70] * 3, "animal_mnist": [.60] * 3}},
}
ID_ACC = {"base": [.90, .91, .92], "no_atypical": [.88] * 3}
ROWS = [("base", "energy"), ("base", "msp"), ("no_atypical", "energy"), ("no_atypical", "msp")]


def rows() -> pd.DataFrame:
    out = []
    common = {"notebook": "02", "epoch": 30, "id_set": "fashion_mnist"}
    for (model, det), metrics in VALUES.items():
        for metric, sets in metrics.items():
            for ood, values in sets.items():
                out += [{**common, "seed": s, "model": model, "detector": det, "ood_set": ood, "metric": metric,
                         "value": v} for s, v in enumerate(values)]
    for model, values in ID_ACC.items():
        out += [{**common, "seed": s, "model": model, "detector": "", "ood_set": "", "metric": "id_acc",
                 "value": v} for s, v in enumerate(values)]
    return pd.DataFrame(out)


def cells(markdown: str) -> dict[tuple, dict[str, str]]:
    """Markdown table -> {(model, detector): {header: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    head = split[0]
    return {tuple(r[:2]): dict(zip(head, r)) for r in split[2:]}


def test_metric_direction_and_unknown_metric():
    assert not higher_is_better("fpr95") and not higher_is_better("fpr95_id")
    assert all(higher_is_better(m) for m in ("auroc", "aupr_in", "aupr_out", "id_acc"))
    with pytest.raises(ValueError) as err:
        higher_is_better("accuracy")
    assert all(name in str(err.value) for name in ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_id", "id_acc"))
    with pytest.raises(ValueError, match="fpr95_id"):
        summarize(rows(), metrics=("fpr95", "accuracy"))


def test_mean_and_std_over_seeds_per_ood_set():
    t = summarize(rows())
    m, s = t.mean, t.std
    assert list(t.mean.index) == ROWS and list(t.n_seeds) == [3] * 4
    assert m.loc[("base", "energy"), ("fpr95", "mnist")] == pytest.approx(20)
    assert s.loc[("base", "energy"), ("fpr95", "mnist")] == pytest.approx(10)
    assert m.loc[("base", "msp"), ("fpr95", "mnist")] == pytest.approx(10)
    assert s.loc[("base", "msp"), ("fpr95", "mnist")] == pytest.approx(5)
    assert m.loc[("base", "msp"), ("fpr95", "animal_mnist")] == pytest.approx(70)
    assert s.loc[("no_atypical", "energy"), ("fpr95", "animal_mnist")] == pytest.approx(math.sqrt(300))
    assert m.loc[("no_atypical", "energy"), ("auroc", "mnist")] == pytest.approx(95)
    assert s.loc[("no_atypical", "energy"), ("auroc", "mnist")] == pytest.approx(0)


def test_mean_column_is_per_seed_ood_mean_then_over_seeds():
    t = summarize(rows())
    m, s = t.mean, t.std
    # base/energy: each set has std 10, but every seed's OOD-mean is 20: std 0, not the average of stds (10)
    assert m.loc[("base", "energy"), ("fpr95", "mean")] == pytest.approx(20)
    assert s.loc[("base", "energy"), ("fpr95", "mean")] == pytest.approx(0)
    assert m.loc[("base", "msp"), ("fpr95", "mean")] == pytest.approx(40)
    assert s.loc[("base", "msp"), ("fpr95", "mean")] == pytest.approx(7.5)
    # no_atypical/energy: stds 10 and 17.32 (average 13.66); per-seed means 10, 30, 20 -> std 10
    assert s.loc[("no_atypical", "energy"), ("fpr95", "mean")] == pytest.approx(10)
    assert m.loc[("no_atypical", "energy"), ("auroc", "mean")] == pytest.approx(90)


def test_columns_order_and_id_acc_joined_without_detector():
    t = summarize(rows())
    assert list(t.mean.columns) == [("fpr95", "animal_mnist"), ("fpr95", "mnist"), ("fpr95", "mean"),
                                    ("auroc", "animal_mnist"), ("auroc", "mnist"), ("auroc", "mean"), ("id_acc", "")]
    assert list(t.mean[("id_acc", "")]) == pytest.approx([91, 91, 88, 88])
    assert list(t.std[("id_acc", "")]) == pytest.approx([1, 1, 0, 0])
    assert ("id_acc", "") not in summarize(rows(), id_acc=False).mean.columns
    one_key = summarize(rows()[rows()["model"] == "base"], keys=("detector",), metrics=("auroc",))
    assert ("id_acc", "") not in one_key.mean.columns  # no model key: nothing to join on
    assert one_key.mean.loc[("msp",), ("auroc", "mean")] == pytest.approx(65)


def test_row_order_first_seen_or_given():
    r = rows()
    assert list(summarize(r.iloc[::-1]).mean.index) == ROWS[::-1]
    t = summarize(r, order=[("no_atypical", "msp"), ("base", "msp")])
    assert list(t.mean.index) == [("no_atypical", "msp"), ("base", "msp"), ("base", "energy"),
                                  ("no_atypical", "energy")]
    t = summarize(r[r["model"] == "base"], keys=("detector",), order=["msp"])
    assert list(t.mean.index) == [("msp",), ("energy",)]
    with pytest.raises(ValueError, match="order"):
        summarize(r, order=[("base", "odin")])


def test_unfiltered_or_incomplete_rows_are_rejected():
    r = rows()
    with pytest.raises(ValueError, match="several values"):
        summarize(pd.concat([r, r.assign(epoch=10)]))  # two epochs per model
    with pytest.raises(ValueError, match="lacking"):
        summarize(r.drop(index=r.index[(r["seed"] == 1) & (r["ood_set"] == "mnist")][:1]))
    with pytest.raises(ValueError, match="fractions"):
        summarize(r.assign(value=100 * r["value"]))


def test_single_seed_has_no_std():
    t = summarize(rows()[rows()["seed"] == 0])
    assert list(t.n_seeds) == [1] * 4 and t.std.isna().all().all()
    md = t.to_markdown()
    assert "±" not in md
    assert cells(md)[("base", "energy")]["FPR95 % MNIST"] == "10.00"
    assert cells(md)[("base", "energy")]["seeds"] == "1"


def test_bold_is_min_for_fpr95_max_for_auroc_and_id_acc_ties_all():
    best = summarize(rows()).best()
    col = best[("fpr95", "mnist")]  # minimum: base/msp 10
    assert list(col) == [False, True, False, False]
    assert list(best[("fpr95", "animal_mnist")]) == [True, False, True, False]  # tie at 20
    assert list(best[("auroc", "mnist")]) == [False, False, True, False]  # maximum: 95
    assert list(best[("auroc", "mean")]) == [False, False, True, False]
    assert list(best[("id_acc", "")]) == [True, True, False, False]  # 91 > 88, both base rows


def test_best_within_restricts_the_comparison():
    best = summarize(rows(), best_within="model").best()
    assert list(best[("fpr95", "mnist")]) == [False, True, True, False]  # base: msp 10; no_atypical: energy 20
    assert list(best[("auroc", "mnist")]) == [True, False, True, False]  # 90 within base, 95 within no_atypical
    assert list(best[("id_acc", "")]) == [True] * 4
    with pytest.raises(ValueError, match="best_within"):
        summarize(rows(), best_within="epoch")


def test_markdown_cells_and_bold():
    c = cells(summarize(rows()).to_markdown("caption text"))
    assert c[("base", "energy")]["FPR95 % MNIST"] == "20.00 ± 10.00"
    assert c[("base", "energy")]["FPR95 % mean"] == "**20.00 ± 0.00**"
    assert c[("base", "msp")]["FPR95 % MNIST"] == "**10.00 ± 5.00**"
    assert c[("no_atypical", "energy")]["FPR95 % Animal-MNIST"] == "**20.00 ± 17.32**"
    assert c[("no_atypical", "energy")]["AUROC % mean"] == "**90.00 ± 0.00**"
    assert c[("base", "msp")]["ID acc %"] == "**91.00 ± 1.00**"
    assert c[("no_atypical", "msp")]["ID acc %"] == "88.00 ± 0.00"
    assert len(c) == 4


def test_latex_booktabs_escaping_and_rows():
    t = summarize(rows())
    tex = t.to_latex("FPR95 in % over 3 seeds", "tab:atypical_fpr")
    for part in (r"\toprule", r"\midrule", r"\bottomrule", r"$\pm$", r"\textbf{", r"\cmidrule",
                 r"\caption{FPR95 in \% over 3 seeds}", r"\label{tab:atypical_fpr}", r"no\_atypical",
                 r"\multicolumn{3}{c}{FPR95 (\%)}"):
        assert part in tex, part
    assert "no_atypical" not in tex.replace(r"no\_atypical", "")
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(t.mean) and all(line.endswith(r"\\") for line in body)
    assert body[0].startswith("base & energy & 3 & ")
    assert r"\textbf{20.00 $\pm$ 0.00}" in body[0]


def test_csv_round_trip(tmp_path):
    t = summarize(rows()).with_paper({("base", "energy"): "um_readme:energy"})
    path = t.to_csv(tmp_path / "t.csv")
    back = pd.read_csv(path, keep_default_na=False, na_values={"std": [""], "n_seeds": [""]})
    assert len(back) == t.mean.notna().sum().sum()
    for _, r in back.iterrows():
        row, col = (r["model"], r["detector"]), (r["metric"], r["column"])
        assert r["mean"] == pytest.approx(t.mean.loc[row, col], abs=1e-12)
        assert r["std"] == pytest.approx(t.std.loc[row, col], abs=1e-12)
    paper = back[back["column"] == "paper (UM README)"]
    assert set(paper["metric"]) == {"fpr95", "auroc", "id_acc"} and paper["n_seeds"].isna().all()
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_writes_md_tex_csv(tmp_path):
    t = summarize(rows()).with_paper({("base", "energy"): "um_readme:energy"})
    paths = t.save(tmp_path / "tables", "02_atypical", "Test FPR95 (%).")
    assert [p.name for p in paths] == ["02_atypical.md", "02_atypical.tex", "02_atypical.csv"]
    tex = (tmp_path / "tables" / "02_atypical.tex").read_text()
    assert r"\label{tab:02_atypical}" in tex and "JPEG" in tex  # the paper caption is appended
    assert "Test FPR95 (\\%)." in tex and "Test FPR95 (%)." in (tmp_path / "tables" / "02_atypical.md").read_text()


def test_paper_registry_values():
    def value(name, metric):
        return PAPER_VALUES[(name, metric)].value

    assert value("um_readme:energy", "fpr95") == 42.69 and value("um_readme:energy+um", "fpr95") == 33.29
    assert value("um_readme:energy", "auroc") == 92.07 and value("um_readme:energy+um", "auroc") == 93.73
    assert value("um_readme:energy", "aupr_in") == 92.72 and value("um_readme:energy+um", "aupr_in") == 94.27
    assert value("um_readme:energy", "id_acc") == 94.01 and value("um_readme:energy+um", "id_acc") == 92.80
    assert value("um_readme:oe", "fpr95") == 13.80 and value("um_readme:oe+um", "fpr95") == 11.22
    assert PAPER_VALUES[("um_readme:energy", "fpr95")].std == 1.31
    assert value("line:energy", "fpr95") == 26.55 and value("line:react", "fpr95") == 26.45
    assert value("line:dice", "fpr95") == 20.83 and value("line:line", "fpr95") == 14.72
    assert value("line:line", "auroc") == 96.99 and ("line:line", "id_acc") not in PAPER_VALUES
    assert len(PAPER_VALUES[("line:line", "auroc")].ood_sets) == 6
    assert "unverified" in PAPER_VALUES[("line:line", "auroc")].short
    for e in PAPER_VALUES.values():
        higher_is_better(e.metric)
        assert 0 < e.value <= 100 and e.paper and e.source and e.ood_sets and e.differences and e.status
        # captions cite papers and repositories, never notes outside the project
        assert "research/" not in e.source and "notes" not in e.source
    assert "github.com/tmlr-group/Unleashing-Mask" in PAPER_VALUES[("um_readme:energy", "fpr95")].source


@pytest.mark.skipif(not (NOTES / "unleashing_mask.md").exists(), reason="research notes not present")
def test_paper_registry_matches_the_research_notes():
    um = (NOTES / "unleashing_mask.md").read_text()
    for name, method in (("um_readme:energy", "Energy"), ("um_readme:energy+um", "Energy + UM"),
                         ("um_readme:oe", "OE"), ("um_readme:oe+um", "OE + UM")):
        line = re.search(rf"^\| {re.escape(method)} \| (.*)$", um, re.M).group(1)
        numbers = [(float(v), float(s)) for v, s in re.findall(r"([\d.]+) \(([\d.]+)\)", line)]
        for metric, (v, s) in zip(("auroc", "aupr_in", "fpr95", "id_acc"), numbers, strict=True):
            assert (PAPER_VALUES[(name, metric)].value, PAPER_VALUES[(name, metric)].std) == (v, s)
    line_notes = (NOTES / "line.md").read_text().split("### 3.2")[1]  # the CIFAR-10 / CIFAR-100 table
    for key, method in (("msp", "MSP"), ("odin", "ODIN"), ("energy", "Energy"), ("react", "ReAct"),
                        ("dice", "DICE"), ("line", "LINe")):
        fpr, auroc = re.search(rf"^\| {method} \| ([\d.]+) / ([\d.]+) \| [\d.]+ / [\d.]+ \|", line_notes,
                               re.M).groups()
        assert value_pair(f"line:{key}") == (float(fpr), float(auroc))


def value_pair(name):
    return PAPER_VALUES[(name, "fpr95")].value, PAPER_VALUES[(name, "auroc")].value


def test_paper_column_on_matched_rows_only_and_never_bold():
    t = summarize(rows()).with_paper({("base", "energy"): "um_readme:energy", ("no_atypical", "energy"): "line:line"})
    um, line = ("fpr95", "paper (UM README)"), ("fpr95", "paper (LINe, unverified)")
    assert list(t.mean.columns[:5]) == [("fpr95", "animal_mnist"), ("fpr95", "mnist"), ("fpr95", "mean"), um, line]
    assert t.mean[um].tolist()[0] == 42.69 and t.mean[um].iloc[1:].isna().all()
    assert t.mean[line].tolist()[2] == 14.72 and t.mean[line].drop(index=[("no_atypical", "energy")]).isna().all()
    assert ("id_acc", "paper (UM README)") in t.mean.columns  # UM gives ID accuracy, LINe does not
    assert ("id_acc", "paper (LINe, unverified)") not in t.mean.columns
    best = t.best()  # 14.72 and 96.99 beat every measured cell, yet never bold, and ours keep theirs
    assert not best[[c for c in t.mean.columns if c[1].startswith("paper")]].any().any()
    assert list(best[("fpr95", "mean")]) == [True, False, True, False]
    c = cells(t.to_markdown())
    assert c[("base", "energy")]["FPR95 % paper (UM README)"] == "42.69 ± 1.31"
    assert c[("no_atypical", "energy")]["FPR95 % paper (LINe, unverified)"] == "14.72"
    assert c[("base", "msp")]["FPR95 % paper (UM README)"] == ""
    with pytest.raises(ValueError, match="um_readme:energy"):
        t.with_paper({("base", "msp"): "um_readme:msp"})
    with pytest.raises(ValueError, match="not in the table"):
        t.with_paper({("base", "odin"): "line:odin"})


def test_paper_caption_lists_the_known_differences():
    t = summarize(rows()).with_paper({("base", "energy"): "um_readme:energy"})
    text = t.paper_caption()
    for part in ("JPEG", "12 points", "our OOD sets are Animal-MNIST, MNIST", "CIFAR-100", "SVHN",
                 "unstated number of runs", "UM README"):
        assert part in text, part
    assert summarize(rows()).paper_caption() == ""
    assert "OE fine-tunes" in tables.paper_caption([PAPER_VALUES[("um_readme:oe", "fpr95")]], ["mnist"])


def test_words_joins_a_list_as_a_sentence_does():
    assert [tables.words(x) for x in (["a"], ["a", "b"], ("a", "b", "c"))] == ["a", "a and b", "a, b and c"]
