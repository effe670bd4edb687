"""Paper-quality result tables from the tidy rows of ``results/<profile>/metrics.csv``.

Conventions:
  * Rows hold fractions in [0, 1]; every table shows percentages (value × 100) with ``DIGITS`` decimals.
  * A cell is the mean ± std over seeds (ddof=1; a single seed shows the mean alone, its std is NaN).
  * Each metric has, per OOD set (sorted by name), a column, then ``mean``: the unweighted mean over the OOD sets
    taken PER SEED first, then mean ± std over seeds (so its std is the seed spread of the OOD-mean).
  * ``ID acc`` (``id_acc`` rows, detector "") joins on the row keys without ``detector``.
  * Bold: the best mean of a column (by ``HIGHER_IS_BETTER``, compared at the displayed precision, ties all
    bold), over the whole column or within groups (``best_within``). Paper columns never compete.
  * Paper values (``PAPER_VALUES``) are in % and are other people's numbers in other settings: show them only
    with ``paper_caption()``, which states the known differences.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ood_lib.atomic import atomic_write

DIGITS = 2
HIGHER_IS_BETTER = {"auroc": True, "aupr_in": True, "aupr_out": True, "id_acc": True,
                    "fpr95": False, "fpr95_id": False}
METRIC_LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out", "fpr95": "FPR95",
                 "fpr95_id": "FPR95-ID", "id_acc": "ID acc"}
DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "mnist": "MNIST",
                  "fashion_mnist": "Fashion-MNIST", "animal_mnist": "Animal-MNIST",
                  "tinyimagenet32": "Tiny-ImageNet-32", "textures": "Textures", "lsun": "LSUN-Crop",
                  "lsun_resize": "LSUN-Resize", "isun": "iSUN", "places365": "Places365"}
ID_ACC = ("id_acc", "")  # the ID-accuracy column


def higher_is_better(metric: str) -> bool:
    """The direction of ``metric``: the one place that knows it."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


# ----------------------------------------------------------------------------------------------- paper values

@dataclass(frozen=True)
class PaperValue:
    """One published number (in %) with its setting and how it differs from ours."""
    paper: str
    source: str               # where the number is from
    short: str                # the column label: "paper (<short>)"
    id_set: str
    model: str
    ood_sets: tuple[str, ...]  # the OOD sets the paper averaged over
    detector: str             # the method as the paper names it
    metric: str
    value: float              # %
    std: float | None         # %, over the paper's runs, when given
    status: str               # verified, or recollection with its confidence
    differences: tuple[str, ...]


JPEG = ("our CIFAR-10 is a JPEG (quality 75) re-encoding: models trained on the original images lose about "
        "12 points of accuracy on it (shared/models/MANIFEST.md)")
UM_README = dict(
    paper="Zhu et al., Unleashing Mask, ICML 2023", short="UM README", id_set="CIFAR-10",
    source="the README of the authors' repository (github.com/tmlr-group/Unleashing-Mask), 'Sample Results'",
    model="DenseNet-101 (DenseNet-BC-100), the authors' runs",
    ood_sets=("CIFAR-100", "iNaturalist", "SUN", "Places", "Textures", "LSUN-Crop", "SVHN"),
    status="verified (the authors' own numbers)")
UM_DIFFERENCES = (JPEG, "the README does not name its OOD sets: the list given is the repository's CIFAR-10 config",
                  "the README gives mean (std) over an unstated number of runs")
OE_DIFFERENCE = "OE fine-tunes on 50,000 auxiliary outliers from downsampled ImageNet, which we do not have"
# reference name: (method, {metric: (value %, std %)}); AUPR is AUPR-In (ID positive: the official utils/get_metrics.py)
UM_VALUES = {
    "um_readme:energy": ("Energy", {"auroc": (92.07, 0.22), "aupr_in": (92.72, 0.39), "fpr95": (42.69, 1.31),
                                    "id_acc": (94.01, 0.08)}),
    "um_readme:energy+um": ("Energy + UM", {"auroc": (93.73, 0.36), "aupr_in": (94.27, 0.60),
                                            "fpr95": (33.29, 1.70), "id_acc": (92.80, 0.47)}),
    "um_readme:oe": ("OE", {"auroc": (97.07, 0.01), "aupr_in": (97.31, 0.05), "fpr95": (13.80, 0.28),
                            "id_acc": (92.59, 0.32)}),
    "um_readme:oe+um": ("OE + UM", {"auroc": (97.60, 0.03), "aupr_in": (97.87, 0.02), "fpr95": (11.22, 0.16),
                                    "id_acc": (93.66, 0.12)}),
}
LINE_PAPER = dict(
    paper="Ahn et al., LINe, CVPR 2023", short="LINe, unverified", id_set="CIFAR-10",
    source="recollection of the paper's CIFAR-10 table, average over 6 OOD sets (the table could not be "
           "retrieved)",
    model="DenseNet-101 (DenseNet-BC-100), the DICE checkpoint dice_densenet100_cifar10",
    ood_sets=("SVHN", "LSUN-Crop", "LSUN-Resize", "iSUN", "Textures", "Places365"),
    differences=(JPEG, "the LINe CIFAR-10 numbers are recollection, not checked against the paper",
                 "the paper's Places365 is an unpublished random subset of 10,000 images"))
LINE_VALUES = {  # reference name: (method, confidence of the recollection, FPR95 %, AUROC %)
    "line:msp": ("MSP", "medium (DICE Table 1)", 48.73, 92.46),
    "line:odin": ("ODIN", "medium", 24.57, 93.71),
    "line:energy": ("Energy", "medium", 26.55, 94.57),
    "line:react": ("ReAct", "medium", 26.45, 94.95),
    "line:dice": ("DICE", "medium-high", 20.83, 95.24),
    "line:line": ("LINe", "low", 14.72, 96.99),
}
# Published numbers keyed by (reference name, metric); the reference names are the keys of UM_VALUES and LINE_VALUES.
PAPER_VALUES: dict[tuple[str, str], PaperValue] = {}
for _name, (_method, _values) in UM_VALUES.items():
    _diffs = UM_DIFFERENCES + ((OE_DIFFERENCE,) if _method.startswith("OE") else ())
    for _metric, (_v, _s) in _values.items():
        PAPER_VALUES[_name, _metric] = PaperValue(**UM_README, detector=_method, metric=_metric, value=_v, std=_s,
                                                  differences=_diffs)
for _name, (_method, _confidence, _fpr, _auroc) in LINE_VALUES.items():
    for _metric, _v in (("fpr95", _fpr), ("auroc", _auroc)):
        PAPER_VALUES[_name, _metric] = PaperValue(**LINE_PAPER, detector=_method, metric=_metric, value=_v,
                                                  std=None, status=f"recollection, confidence {_confidence}")


def words(names) -> str:
    """A list in a sentence: 'A', 'A and B', 'A, B and C'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _names(sets) -> str:
    return ", ".join(DATASET_LABELS.get(s, s) for s in sets)


def paper_caption(entries, our_ood_sets) -> str:
    """Caption sentences: for each paper source shown, its setting and the known differences from ours."""
    parts, seen = [], set()
    for e in entries:
        if e.short in seen:
            continue
        seen.add(e.short)
        same = [x for x in entries if x.short == e.short]
        statuses = list(dict.fromkeys(x.status for x in same))
        status = statuses[0] if len(statuses) == 1 else "; ".join(dict.fromkeys(f"{x.detector} {x.status}"
                                                                                for x in same))
        diffs = list(dict.fromkeys(d for x in same for d in x.differences))
        diffs.append(f"our OOD sets are {_names(our_ood_sets)}, not the paper's {', '.join(e.ood_sets)}")
        parts.append(f"Paper ({e.short}): {e.paper}, {e.source}; {e.id_set}, {e.model}, mean over "
                     f"{len(e.ood_sets)} OOD sets; {status}. Known differences: {'; '.join(diffs)}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True, eq=False)
class Table:
    """Numbers of a result table, in %; render with ``to_markdown``, ``to_latex``, ``to_csv`` or ``save``.

    ``mean`` and ``std``: index = the row keys (a MultiIndex named by the keys, even for one key); columns = a
    MultiIndex (metric, OOD set | "mean" | "paper (<short>)"), with ``("id_acc", "")`` for ID accuracy.
    ``n_seeds``: seeds per row. ``paper_columns``/``references``: the paper columns and the values shown in them.
    """
    mean: pd.DataFrame
    std: pd.DataFrame
    n_seeds: pd.Series
    best_within: tuple[str, ...] = ()
    paper_columns: tuple[tuple[str, str], ...] = ()
    references: tuple[PaperValue, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.mean.index.names)

    def ood_sets(self) -> list[str]:
        return sorted({c for m, c in self.mean.columns if c not in ("", "mean") and (m, c) not in self.paper_columns})

    def best(self) -> pd.DataFrame:
        """True where a cell is the best mean of its column (within ``best_within`` groups); ties all True."""
        out = pd.DataFrame(False, index=self.mean.index, columns=self.mean.columns)
        groups = [self.mean.index.get_level_values(k) for k in self.best_within] or [np.zeros(len(self.mean))]
        for col in self.mean.columns:
            if col in self.paper_columns:
                continue
            shown = self.mean[col].round(DIGITS)
            best = shown.groupby(groups, dropna=False).transform("max" if higher_is_better(col[0]) else "min")
            out[col] = shown.eq(best)
        return out

    def with_paper(self, mapping: dict) -> "Table":
        """Add a column "paper (<short>)" after each metric's columns, filled on the rows that ``mapping`` maps
        (row key tuple, or value for one key) to a reference name of ``PAPER_VALUES`` having that metric."""
        names = {name for name, _ in PAPER_VALUES}
        cells = {}
        for row, name in mapping.items():
            row = row if isinstance(row, tuple) else (row,)
            if row not in self.mean.index:
                raise ValueError(f"row {row} is not in the table; rows: {list(self.mean.index)}")
            if name not in names:
                raise ValueError(f"unknown paper reference {name!r}; known: {', '.join(sorted(names))}")
            for metric in dict.fromkeys(m for m, _ in self.mean.columns):
                entry = PAPER_VALUES.get((name, metric))
                if entry is not None:
                    cells[(row, (metric, f"paper ({entry.short})"))] = entry
        new = [c for c in dict.fromkeys(col for _, col in cells) if c not in self.mean.columns]
        columns = []
        for metric, group in itertools.groupby(self.mean.columns, key=lambda c: c[0]):
            columns += list(group) + [c for c in new if c[0] == metric]
        columns = pd.MultiIndex.from_tuples(columns)
        mean, std = self.mean.reindex(columns=columns), self.std.reindex(columns=columns)
        for (row, col), entry in cells.items():
            i, j = mean.index.get_loc(row), mean.columns.get_loc(col)
            mean.iat[i, j], std.iat[i, j] = entry.value, np.nan if entry.std is None else entry.std
        return dataclasses.replace(self, mean=mean, std=std, paper_columns=self.paper_columns + tuple(new),
                                   references=tuple(dict.fromkeys(self.references + tuple(cells.values()))))

    def paper_caption(self) -> str:
        """The known differences between the paper values shown and this table's setting ("" when none)."""
        return paper_caption(self.references, self.ood_sets())

    def frame(self) -> pd.DataFrame:
        """Tidy numbers: keys..., metric, column, mean, std, n_seeds (empty for paper cells), best; no empty cell."""
        mean, std, best, out = self.mean.to_numpy(), self.std.to_numpy(), self.best().to_numpy(), []
        for i, (row, n) in enumerate(zip(self.mean.index, self.n_seeds)):
            for j, col in enumerate(self.mean.columns):
                if np.isnan(mean[i, j]):
                    continue
                out.append({**dict(zip(self.keys, row)), "metric": col[0], "column": col[1], "mean": mean[i, j],
                            "std": std[i, j], "n_seeds": pd.NA if col in self.paper_columns else int(n),
                            "best": bool(best[i, j])})
        columns = [*self.keys, "metric", "column", "mean", "std", "n_seeds", "best"]
        return pd.DataFrame(out, columns=columns).astype({"n_seeds": "Int64"})

    # -------------------------------------------------------------------------------------------- renderers

    def _cells(self, pm: str, bold: str, missing: str) -> list[list[str]]:
        rows = []
        for means, stds, bests in zip(self.mean.to_numpy(), self.std.to_numpy(), self.best().to_numpy()):
            cells = []
            for m, s, b in zip(means, stds, bests):
                text = missing if np.isnan(m) else f"{m:.{DIGITS}f}" + ("" if np.isnan(s) else f"{pm}{s:.{DIGITS}f}")
                cells.append(bold.format(text) if b else text)
            rows.append(cells)
        return rows

    def _label(self, col) -> str:
        return col[1] if col in self.paper_columns else DATASET_LABELS.get(col[1], col[1])

    def to_markdown(self, caption: str | None = None) -> str:
        """A Markdown table, cells "63.15 ± 5.81" (one seed: "63.15"), best in **bold**; caption below it."""
        def esc(x):
            return str(x).replace("|", r"\|")

        head = [*self.keys, "seeds"] + [" ".join(filter(None, [METRIC_LABELS[m] + " %", self._label((m, c))]))
                                        for m, c in self.mean.columns]
        lines = ["| " + " | ".join(esc(h) for h in head) + " |",
                 "|" + "---|" * len(self.keys) + "---:|" * (1 + len(self.mean.columns))]
        for row, n, cells in zip(self.mean.index, self.n_seeds, self._cells(" ± ", "**{}**", "")):
            lines.append("| " + " | ".join([esc(v) for v in row] + [str(n)] + cells) + " |")
        return "\n".join(lines) + (f"\n\n{caption}\n" if caption else "\n")

    def to_latex(self, caption: str, label: str) -> str:
        """A booktabs table: metric (in %) over its columns (\\cmidrule), cells "63.15 $\\pm$ 5.81", best in
        \\textbf; names and caption escaped as plain text, ``label`` used as is."""
        nk = len(self.keys) + 1  # keys and seeds
        top, rules, start = [""] * nk, [], nk + 1
        for metric, group in itertools.groupby(self.mean.columns, key=lambda c: c[0]):
            n = len(list(group))
            top.append(f"\\multicolumn{{{n}}}{{c}}{{{_tex(METRIC_LABELS[metric] + ' (%)')}}}")
            rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
            start += n
        head = [_tex(k) for k in self.keys] + ["seeds"] + [_tex(self._label(c)) for c in self.mean.columns]
        cells = self._cells(r" $\pm$ ", r"\textbf{{{}}}", "")
        body = [" & ".join([_tex(v) for v in row] + [str(n)] + c) + r" \\"
                for row, n, c in zip(self.mean.index, self.n_seeds, cells)]
        return "\n".join([
            r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex(caption)}}}", f"\\label{{{label}}}",
            f"\\begin{{tabular}}{{{'l' * len(self.keys)}{'r' * (1 + len(self.mean.columns))}}}", r"\toprule",
            " & ".join(top) + r" \\", " ".join(rules), " & ".join(head) + r" \\", r"\midrule", *body,
            r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])

    def to_csv(self, path) -> Path:
        """Write ``frame()`` (numbers in %, full precision), atomically."""
        path = Path(path)
        with atomic_write(path, "w") as f:
            f.write(self.frame().to_csv(index=False))
        return path

    def save(self, directory, stem: str, caption: str, label: str | None = None) -> list[Path]:
        """Write ``<stem>.md``, ``<stem>.tex`` (label ``tab:<stem>`` unless given) and ``<stem>.csv``; when paper
        columns are shown, ``paper_caption()`` is appended to the caption."""
        directory = Path(directory)
        caption = " ".join(filter(None, [caption, self.paper_caption()]))
        paths = []
        texts = {".md": self.to_markdown(caption), ".tex": self.to_latex(caption, label or f"tab:{stem}")}
        for suffix, text in texts.items():
            paths.append(directory / f"{stem}{suffix}")
            with atomic_write(paths[-1], "w") as f:
                f.write(text)
        return paths + [self.to_csv(directory / f"{stem}.csv")]


_TEX = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                      "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"})


def _tex(text) -> str:
    return str(text).translate(_TEX)


# ----------------------------------------------------------------------------------------------- summarize

def _keyed(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if not isinstance(frame.index, pd.MultiIndex):
        frame.index = pd.MultiIndex.from_arrays([frame.index], names=keys)
    return frame


def summarize(rows: pd.DataFrame, keys=("model", "detector"), metrics=("fpr95", "auroc"), order=None,
              best_within=None, id_acc: bool = True) -> Table:
    """Mean ± std over seeds (in %) per row key, metric and OOD set, plus the per-seed OOD-mean and ``ID acc``.

    ``rows``: tidy metrics rows already filtered to what is compared (e.g. one notebook, one epoch per model):
    more than one value per (keys, seed, metric, OOD set) is an error, and so is a row key or seed that lacks an
    OOD set that others have (its mean would be over other sets); keep the ``id_acc`` rows (detector "") when
    filtering by detector. Rows keep their first-seen order; ``order`` (key tuples, or values for one key) puts
    those rows first. ``ID acc`` is added when ``keys`` include ``model`` and ``id_acc`` rows are present
    (``id_acc=False``: never). ``best_within``: key name(s) whose groups get their own bold.
    """
    keys, metrics = list(keys), list(metrics)
    for m in metrics:
        higher_is_better(m)
    if "id_acc" in metrics:
        raise ValueError("id_acc is not an OOD metric: it becomes the 'ID acc' column by itself")
    best_within = (best_within,) if isinstance(best_within, str) else tuple(best_within or ())
    if set(best_within) - set(keys):
        raise ValueError(f"best_within {best_within} must be among the keys {keys}")
    missing = set(keys) | {"seed", "metric", "ood_set", "value"}
    if missing - set(rows.columns):
        raise ValueError(f"rows lack the columns {sorted(missing - set(rows.columns))}")
    values = rows["value"].astype(float)
    if ((values < 0) | (values > 1)).any():
        raise ValueError("values must be fractions in [0, 1] (tables show them × 100)")
    rows = rows.assign(value=100 * values, ood_set=rows["ood_set"].fillna(""))

    ood = rows[rows["metric"].isin(metrics) & (rows["ood_set"] != "")]
    if ood.empty:
        raise ValueError(f"no rows with an OOD set for the metrics {metrics}")
    cell = keys + ["seed", "metric", "ood_set"]
    if ood.duplicated(cell).any():
        raise ValueError(f"several values per ({', '.join(cell)}): filter the rows first (one notebook, one "
                         "epoch per model)")
    sets = ood.groupby("metric")["ood_set"].unique()
    counts = ood.groupby(keys + ["seed", "metric"], sort=False)["ood_set"].count()
    lacking = counts[counts.values != sets[counts.index.get_level_values("metric")].map(len).values]
    if len(lacking):
        raise ValueError(f"rows lacking some OOD set of their metric (keys, seed, metric): {list(lacking.index)}")

    per_set = ood.groupby(keys + ["metric", "ood_set"], sort=False)["value"].agg(["mean", "std"])
    per_seed = ood.groupby(keys + ["metric", "seed"], sort=False)["value"].mean()
    over = per_seed.groupby(level=keys + ["metric"], sort=False).agg(["mean", "std"])
    over = over.set_index(pd.Index(["mean"] * len(over), name="ood_set"), append=True)
    stats = pd.concat([per_set, over])

    index = list(dict.fromkeys(ood[keys].itertuples(index=False, name=None)))
    if order is not None:
        first = [r if isinstance(r, tuple) else (r,) for r in order]
        if set(first) - set(index):
            raise ValueError(f"order names rows that are not there: {sorted(set(first) - set(index))}")
        index = first + [r for r in index if r not in first]
    index = pd.MultiIndex.from_tuples(index, names=keys)
    columns = pd.MultiIndex.from_tuples([(m, s) for m in metrics for s in sorted(sets[m]) + ["mean"]])
    mean = _keyed(stats["mean"].unstack(["metric", "ood_set"]), keys).reindex(index=index, columns=columns)
    std = _keyed(stats["std"].unstack(["metric", "ood_set"]), keys).reindex(index=index, columns=columns)

    acc = rows[rows["metric"] == "id_acc"]
    if id_acc and "model" in keys and len(acc):
        join = [k for k in keys if k != "detector"]
        if acc.duplicated(join + ["seed"]).any():
            raise ValueError(f"several id_acc values per ({', '.join(join)}, seed): filter the rows first")
        a = _keyed(acc.groupby(join)["value"].agg(["mean", "std"]), join)
        at = pd.MultiIndex.from_arrays([index.get_level_values(k) for k in join], names=join)
        mean[ID_ACC] = a["mean"].reindex(at).to_numpy()
        std[ID_ACC] = a["std"].reindex(at).to_numpy()
    n_seeds = _keyed(ood.groupby(keys)["seed"].nunique().to_frame(), keys)["seed"].reindex(index)
    return Table(mean=mean, std=std, n_seeds=n_seeds, best_within=best_within)
