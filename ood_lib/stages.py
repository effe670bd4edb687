"""The study's units of work: a stage computes, for one seed, the tables that a notebook analyses.

A stage is the smallest piece of the study that can run on its own machine. Each one trains or scores one thing
for one seed and returns named tables (``pandas.DataFrame``); ``ood_lib.shards`` stores them, packs them into
bundles and merges bundles from other machines. Notebooks only analyse these tables, so a notebook gives the same
numbers whether its stages ran in the same process, in a separate shard command or on a cluster.

Two kinds of dependency:
  * ``inputs``: stages whose TABLES (of the same seed) this one reads, e.g. the removal arms read the per-image
    atypicality scores. Tables travel in bundles, so these stages may run anywhere.
  * ``models``: stages whose trained WEIGHTS this one needs on this machine, e.g. UM starts from the final base
    model. The final checkpoint of a stage that others need travels beside its bundle when it is small
    (``shards.WEIGHTS_MAX_BYTES``: the CPU profiles' nets) and is put in place on the machine that merges it.
    Where it is missing (a larger net, e.g. ResNet-18 on a GPU), the weights are re-trained from the same recipe
    and seed and their digest is compared with the recorded one: equal on the same hardware and software, possibly
    different on a GPU, and then said so in the dependent stage's manifest. Only the FINAL checkpoint travels: a
    stage that reads every epoch of a run (``atypical``, ``gamma``'s rule B) runs where that run was trained.

Stages of a profile (``stages(profile)``), in an order that respects both kinds of dependency:

  notebook 01  ``base``                 train the base recipe, every detector after every epoch (+ the selection
                                        detector's final scores for 03's histograms)
  notebook 02  ``atypical``             per-image mask sensitivity and learning dynamics, the loss-vs-mask curve
               ``no_atypical_per_class``, ``no_random``, ``no_atypical`` (with ``um.global_arm``)
                                        the base recipe without k images chosen from THIS seed's atypicality
  notebook 03  ``gamma``                the loss constraint over random masks
               ``um``, ``um_b``, ``umap``, ``ft_ce``, ``um_gamma<g>`` (with ``um.gamma_sweep``)
                                        the fine-tunes from the final base model
  notebook 04  ``posthoc_<model>``      every post-hoc detector, LINe's ablation and sensitivity on one model
                                        (``base``, ``um``, ``umap``, or a pretrained checkpoint)
  notebook 06  ``paper_start``          every detector on the authors' final checkpoint (``um.paper_checkpoint``)
               ``paper_gamma``          gamma of that checkpoint by the paper's rule
               ``paper_um``, ``paper_um_ours``, ``paper_umap``, ``paper_ft_ce``
                                        UM at the authors' gamma and at ours, UMAP, and the CE control from it
                                        (only for ``um.paper_seeds``)

Which notebooks, stages and pretrained checkpoints a run needs (``notebooks_to_run``, ``needed_stages``,
``checkpoints_needed``) is decided here too, for the runner (``ood_lib.execute``) and the jobs (``ood_lib.cluster``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ood_lib import atypical, base, comparison, epochs, um
from ood_lib.config import Profile, ProfileError, available_profiles, load_profile
from ood_lib.models import load_pretrained, weights_digest
from ood_lib.paths import PROJECT_ROOT
from ood_lib.results import METRIC_COLUMNS
from ood_lib.train import drop_checkpoints, resolve_device

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
STAGED_NOTEBOOKS = ("01", "02", "03", "04", "06")  # the notebooks that read stages (and take the `compute` parameter)

Tables = dict[str, pd.DataFrame]
Read = Callable[[str], Tables]          # stage name -> that stage's tables for the same seed


@dataclass
class Context:
    """What every stage of one profile shares in one process: the profile, the device and the prepared data."""
    profile: Profile
    log: Callable[[str], None] = print
    device: torch.device = field(init=False)
    _data: base.StudyData | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.device = resolve_device(self.profile.device)
        if self.profile.threads:
            torch.set_num_threads(self.profile.threads)

    @property
    def data(self) -> base.StudyData:
        if self._data is None:
            self._data = base.prepare_data(self.profile)
        return self._data


@dataclass(frozen=True)
class Stage:
    """One unit of work for one seed. ``compute`` returns its tables. Model stages also have ``train``, which only
    (re-)trains the model (on a machine that has the stage's tables but not its weights), and ``digest``, the final
    model's weights digest, None while its checkpoint is absent."""
    name: str
    notebook: str
    compute: Callable[[Context, int, Read], Tables]
    inputs: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    train: Callable[[Context, int, Read], None] | None = None
    digest: Callable[[Context, int], str | None] | None = None
    checkpoint: Callable[[Context, int], Path] | None = None  # the final model's checkpoint file (model stages)
    seeds: tuple[int, ...] | None = None   # the seeds it runs for; None: every seed of the profile
    epochs: Callable[[Profile], int] | None = None  # epochs it trains on base's training set at base's speed (plans)

    def runs_for(self, profile: Profile) -> list[int]:
        return [s for s in profile.seeds if self.seeds is None or s in self.seeds]


def _drop_log(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns=[c for c in history.columns if c.startswith("log_")])


def _final_scores(ctx: Context, model: torch.nn.Module, model_name: str) -> pd.DataFrame:
    """The selection detector's scores of ``model`` on every test set (notebook 03's histograms and ROC curves)."""
    sel = ctx.profile.eval.selection_detector
    data = ctx.data
    scored = base.score_sets(ctx.profile, model, weights_digest(model), base.test_sets(data),
                             base.feature_cache(ctx.profile), ctx.device, (sel,))
    return pd.concat([pd.DataFrame({"model": model_name, "set": name, "split": split, "detector": sel,
                                    "score": s["scores"][sel]}) for (name, split), s in scored.items()],
                     ignore_index=True)


# --- notebook 01 ------------------------------------------------------------------------------------------------

def _base_train(ctx: Context, seed: int, read: Read) -> None:
    """The weights alone, for stages that start from them on a machine whose base tables came in a bundle."""
    base.train_seed(ctx.profile, ctx.data, seed, log=ctx.log, score_epochs=False)


def _base_checkpoint(ctx: Context, seed: int) -> Path:
    return base.run_dir(ctx.profile, seed) / f"epoch_{ctx.profile.train.epochs:03d}.pt"


def _base_digest(ctx: Context, seed: int) -> str | None:
    if not _base_checkpoint(ctx, seed).exists():
        return None
    return weights_digest(base.load_base(ctx.profile, ctx.data, seed))


def _drop_epochs(ctx: Context, directory: Path, keep: set[int], what: str) -> None:
    """With ``keep_epoch_checkpoints: false``, drop the epoch checkpoints of a finished, fully scored run but
    ``keep`` and the last (``train.drop_checkpoints``)."""
    if ctx.profile.keep_epoch_checkpoints:
        return
    freed = drop_checkpoints(directory, keep)
    ctx.log(f"[{what}] {freed / 1e6:.0f} MB of epoch checkpoints dropped; kept: the last epoch"
            + (f" and epochs {sorted(keep)}" if keep else ""))


def _base(ctx: Context, seed: int, read: Read) -> Tables:
    history = base.train_seed(ctx.profile, ctx.data, seed, log=ctx.log)
    rows = base.evaluate_run(ctx.profile, ctx.data, seed)
    final = base.load_base(ctx.profile, ctx.data, seed)
    if not ctx.profile.keep_epoch_checkpoints:  # weights read again: the rules' epochs (ODIN there), rule B's gamma
        sel = ctx.profile.eval.selection_detector
        picks = epochs.selected_epochs(rows, sel).set_index("detector").loc[sel]
        keep = {int(picks[rule]) for rule in epochs.RULES}
        if ctx.profile.um.rule_b:
            keep.add(um.rule_b_epoch(ctx.profile, ctx.data, seed, ctx.device))
        _drop_epochs(ctx, base.run_dir(ctx.profile, seed), keep, f"base seed {seed}")
    return {"rows": rows, "history": _drop_log(history), "scores": _final_scores(ctx, final, "base")}


# --- notebook 02 ------------------------------------------------------------------------------------------------

def _atypical(ctx: Context, seed: int, read: Read) -> Tables:
    p, data, u = ctx.profile, ctx.data, ctx.profile.um
    final = base.load_base(p, data, seed)
    sens = atypical.mask_sensitivity(final, data.train_images, data.train_labels, u.mask_keep, u.mask_seeds,
                                     ctx.device, p.eval.batch_size)
    dyn = atypical.learning_dynamics(atypical.epoch_correctness(p, data, seed, ctx.device))
    per_image = sens.join(dyn)
    per_image.insert(0, "image", np.arange(len(per_image)))
    curve = um.loss_curve(p, data, final, ctx.device, u.curve_images)
    return {"per_image": per_image, "loss_curve": curve}


def _arm(arm: str) -> Stage:
    def removed(ctx: Context, seed: int, read: Read) -> np.ndarray:
        per_image = read("atypical")["per_image"]
        return atypical.removed_images(arm, per_image["kl"].to_numpy(), per_image["label"].to_numpy(),
                                       ctx.profile.um.atypical_remove, seed)

    def train(ctx: Context, seed: int, read: Read) -> None:
        atypical.train_without(ctx.profile, ctx.data, seed, arm, removed(ctx, seed, read), ctx.device, log=ctx.log)

    def compute(ctx: Context, seed: int, read: Read) -> Tables:
        idx = removed(ctx, seed, read)
        history = atypical.train_without(ctx.profile, ctx.data, seed, arm, idx, ctx.device, log=ctx.log)
        rows = atypical.evaluate_without(ctx.profile, ctx.data, seed, arm, idx, ctx.device)
        _drop_epochs(ctx, atypical.run_dir(ctx.profile, arm, idx, seed), set(), f"{arm} seed {seed}")
        return {"rows": rows, "history": _drop_log(history), "removed": pd.DataFrame({"image": idx})}

    return Stage(arm, "02", compute, inputs=("atypical",), train=train, epochs=lambda p: p.train.epochs)


# --- notebook 03 ------------------------------------------------------------------------------------------------

def _gamma(ctx: Context, seed: int, read: Read) -> Tables:
    tables = _gamma_of(ctx, base.load_base(ctx.profile, ctx.data, seed))
    if ctx.profile.um.rule_b:
        b = um.rule_b(ctx.profile, ctx.data, seed, ctx.device)
        tables["rule_b"] = pd.DataFrame({"epoch": range(1, len(b.val_loss) + 1), "id_val_loss": b.val_loss,
                                         "smoothed": b.smoothed, "chosen": [e == b.epoch for e in
                                                                            range(1, len(b.val_loss) + 1)]})
        tables["summary"] = tables["summary"].assign(**{"rule B epoch": b.epoch, "rule B gamma": b.gamma})
    return tables


def _gamma_of(ctx: Context, final: torch.nn.Module) -> Tables:
    p, data = ctx.profile, ctx.data
    g = um.estimate_gamma(p, data, final, ctx.device)
    unmasked = um.mean_loss(final, data.train_images, data.train_labels, ctx.device, p.eval.batch_size, p.train)
    per_mask = pd.DataFrame({"mask_seed": list(g.seeds), "gamma": list(g.values)})
    summary = pd.DataFrame([{**g.summary(), "unmasked final loss": unmasked}])
    return {"per_mask": per_mask, "summary": summary}


def gamma_rule_b(profile: Profile, tables: Tables) -> float:
    """UM_B's flood level for a seed from its ``gamma`` tables: NaN when rule B found no late stage."""
    value = tables["summary"]["rule B gamma"].iloc[0]
    return float("nan") if value == "" else float(value)


def gamma_used(profile: Profile, tables: Tables) -> float:
    """The flood level UM and UMAP use for a seed (rule A, or ``um.gamma``), from that seed's ``gamma`` tables."""
    per_mask = tables["per_mask"]
    return um.Gamma(profile.um.mask_keep, tuple(per_mask["mask_seed"]), tuple(per_mask["gamma"]), profile.um.gamma).used


def _fine_tune(ft: um.FineTune, fixed_gamma: float | None = None, gamma_stage: str = "gamma", notebook: str = "03",
               seeds: tuple[int, ...] | None = None, gamma_of: Callable[[Profile, Tables], float] = gamma_used) -> Stage:
    flooded_by_estimate = ft.flooded and fixed_gamma is None

    def level(ctx: Context, seed: int, read: Read) -> float:
        if fixed_gamma is not None:
            return fixed_gamma
        return gamma_of(ctx.profile, read(gamma_stage)) if flooded_by_estimate else float("nan")

    def train(ctx: Context, seed: int, read: Read) -> pd.DataFrame:
        return um.fine_tune(ctx.profile, ctx.data, seed, ft, level(ctx, seed, read), ctx.device, log=ctx.log)

    def digest(ctx: Context, seed: int) -> str | None:
        if not um.finished(ctx.profile, seed, ft):
            return None
        return weights_digest(um.load(ctx.profile, ctx.data, seed, ft))

    def checkpoint(ctx: Context, seed: int) -> Path:
        return um.run_dir(ctx.profile, seed, ft) / f"epoch_{ctx.profile.um.epochs:03d}.pt"

    def compute(ctx: Context, seed: int, read: Read) -> Tables:
        if ft.flooded and np.isnan(level(ctx, seed, read)):  # rule B: no late stage, nothing for UM to undo
            ctx.log(f"[stage {ft.name} seed {seed}] no flood level (rule B found no late stage): not trained")
            return {"rows": pd.DataFrame(columns=[*METRIC_COLUMNS, "split"]), "history": pd.DataFrame(columns=["epoch"])}
        history = train(ctx, seed, read)
        rows = um.evaluate(ctx.profile, ctx.data, seed, ft, ctx.device)
        tables = {"rows": rows, "history": _drop_log(history)}
        if ft is um.UM:
            tables["scores"] = _final_scores(ctx, um.load(ctx.profile, ctx.data, seed, ft), ft.name)
        _drop_epochs(ctx, um.run_dir(ctx.profile, seed, ft), set(), f"{ft.name} seed {seed}")
        return tables

    return Stage(ft.name, notebook, compute, inputs=(gamma_stage,) if flooded_by_estimate else (),
                 models=() if ft.pretrained else ("base",), train=train, digest=digest, checkpoint=checkpoint,
                 seeds=seeds, epochs=None if ft.pretrained else lambda p: p.um.epochs)


# --- notebook 04 ------------------------------------------------------------------------------------------------

def _posthoc(model_stage: str, load: Callable[[Context, int], torch.nn.Module], epoch: Callable[[Profile], int | None],
             pretrained: bool = False) -> Stage:
    def compute(ctx: Context, seed: int, read: Read) -> Tables:
        p = ctx.profile
        ev = comparison.evaluate_model(p, ctx.data, load(ctx, seed), model_stage, seed, epoch(p),
                                       base.feature_cache(p), ctx.device)
        scores = comparison.scores_of(ev, p)
        return {"rows": pd.DataFrame(comparison.metric_rows(p, ctx.data, ev, scores)),
                "ablation": comparison.ablation(ev, p), "sensitivity": comparison.sensitivity(ev, p),
                "tau": pd.DataFrame([{"model": model_stage, "seed": seed, "tau": ev.tau}])}

    return Stage(f"posthoc_{model_stage}", "04", compute, models=() if pretrained else (model_stage,))


# --- notebook 06 ------------------------------------------------------------------------------------------------

def _paper_stages(profile: Profile) -> list[Stage]:
    """Notebook 06: the fine-tunes of notebook 03, from the authors' own final model instead of ours."""
    u = profile.um
    name, seeds = u.paper_checkpoint, tuple(u.paper_seeds)

    def start(ctx: Context, seed: int, read: Read) -> Tables:
        model = load_pretrained(name).eval()
        scored = base.score_sets(ctx.profile, model, weights_digest(model), base.test_sets(ctx.data),
                                 base.feature_cache(ctx.profile), ctx.device)
        return {"rows": pd.DataFrame(base.metric_rows(ctx.profile, scored, ctx.data, seed, 0, name, "06",
                                                      splits=("test",)))}

    def gamma(ctx: Context, seed: int, read: Read) -> Tables:
        return _gamma_of(ctx, load_pretrained(name))

    fts = [(um.FineTune("paper_um", True, False, name), u.paper_gamma),
           (um.FineTune("paper_um_ours", True, False, name), None),
           (um.FineTune("paper_umap", True, True, name), u.paper_gamma),
           (um.FineTune("paper_ft_ce", False, False, name), None)]
    return ([Stage("paper_start", "06", start, seeds=seeds), Stage("paper_gamma", "06", gamma, seeds=seeds)]
            + [_fine_tune(ft, g, gamma_stage="paper_gamma", notebook="06", seeds=seeds) for ft, g in fts])


def stages(profile: Profile) -> dict[str, Stage]:
    """Every stage the profile's notebooks need, in dependency order."""
    nbs = set(profile.notebooks)
    out: list[Stage] = []
    if profile.pretrained:
        if "04" in nbs:
            names = profile.line.pretrained if profile.line.pretrained is not None else profile.pretrained
            out += [_posthoc(name, lambda ctx, seed, name=name: load_pretrained(name), lambda p: None, pretrained=True)
                    for name in names]
        return {s.name: s for s in out}
    if nbs & {"01", "02", "03", "04"}:
        out.append(Stage("base", "01", _base, train=_base_train, digest=_base_digest, checkpoint=_base_checkpoint,
                         epochs=lambda p: p.train.epochs))
    if "02" in nbs:
        out.append(Stage("atypical", "02", _atypical, models=("base",)))
        out += [_arm(arm) for arm in atypical.arms(profile.um)]
    fine_tunes = []
    if "03" in nbs:
        out.append(Stage("gamma", "03", _gamma, models=("base",)))
        fine_tunes = um.fine_tunes(profile)
        out += [_fine_tune(ft, gamma_of=gamma_rule_b if ft is um.UM_B else gamma_used) for ft in fine_tunes]
        out += [_fine_tune(um.at_gamma(g), g) for g in profile.um.gamma_sweep]
    if "04" in nbs:
        out.append(_posthoc("base", lambda ctx, seed: base.load_base(ctx.profile, ctx.data, seed),
                            lambda p: p.train.epochs))
        for ft in (f for f in fine_tunes if f in (um.UM, um.UMAP)):
            out.append(_posthoc(ft.name, lambda ctx, seed, ft=ft: um.load(ctx.profile, ctx.data, seed, ft),
                                lambda p: p.um.epochs))
    if "06" in nbs and profile.um.paper_checkpoint:
        out += _paper_stages(profile)
    return {s.name: s for s in out}


def of_notebook(profile: Profile, notebook: str) -> list[str]:
    """The stages whose tables ``notebook`` reads."""
    return [name for name, s in stages(profile).items() if s.notebook == notebook]


CLAIMS_FIRST = ("01", "03", "04", "02", "06")  # the intermediate stage and UM first, the removal arms and 06 last


def shard_plan(profile: Profile, seed: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The shard commands of one seed, in the order that answers notebooks 01 and 03 first: (stages, the stages of
    the same seed whose bundles they read). A stage that trains starts a shard; a stage that only scores runs in
    the shard of the model it scores (gamma, atypicality and rule B read every epoch of the base run, which stays
    on the machine that trained it), or, scoring a pretrained model, in the first shard of its notebook."""
    registry = {n: s for n, s in stages(profile).items() if seed in s.runs_for(profile)}
    groups: dict[str, list[str]] = {}   # first stage of a shard -> its stages
    home: dict[str, str] = {}           # stage -> first stage of its shard
    for name, s in registry.items():
        scored = next((home[m] for m in s.models if m in home), None)  # the shard of the model it scores
        first_of_notebook = next((g for g in groups if registry[g].notebook == s.notebook), None)
        lead = name if s.train is not None else scored or first_of_notebook or name
        groups.setdefault(lead, []).append(name)
        home[name] = lead
    order = sorted(groups, key=lambda g: CLAIMS_FIRST.index(registry[g].notebook)
                   if registry[g].notebook in CLAIMS_FIRST else len(CLAIMS_FIRST))
    plan = []
    for lead in order:
        own = groups[lead]
        reads = [d for n in own for d in (*registry[n].inputs, *registry[n].models) if d not in own]
        plan.append((tuple(own), tuple(dict.fromkeys(reads))))
    return plan


# --- which notebooks, stages and checkpoints a run needs ---------------------------------------------------------

def notebook_files() -> dict[str, Path]:
    """'01' -> notebooks/01_intermediate_stage.ipynb, for every notebook present."""
    return {p.name[:2]: p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))}


def notebooks_to_run(profile_name: str, notebooks: list[str] | None, overrides: dict) -> tuple[Profile, list[Path]]:
    """Validate the profile, the overrides and the notebook numbers up front; return the profile and the notebooks
    to run, in order (default: the profile's own list)."""
    if profile_name not in available_profiles():
        raise ProfileError(f"unknown profile {profile_name!r}; allowed: {available_profiles()}")
    profile = load_profile(profile_name, overrides)
    files = notebook_files()
    wanted = notebooks or list(profile.notebooks)
    unknown = [n for n in wanted if n not in files]
    if unknown:
        raise ProfileError(f"unknown notebook(s) {unknown}; allowed: {sorted(files)}")
    return profile, [files[n] for n in sorted(wanted)]


def needed_stages(profile: Profile, notebooks: list[str]) -> list[str]:
    """The stages the given notebooks read (02-04 also compare with ``base``), with everything they depend on, in
    the registry's dependency order."""
    registry = stages(profile)
    wanted: set[str] = set()
    for nb in notebooks:
        if nb in STAGED_NOTEBOOKS:
            wanted |= set(of_notebook(profile, nb))
            if nb != "01" and "base" in registry:
                wanted.add("base")
    todo = list(wanted)
    while todo:
        s = registry[todo.pop()]
        for dep in (*s.inputs, *s.models):
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [name for name in registry if name in wanted]


def checkpoints_needed(profile: Profile, stage_names: list[str] | None = None) -> list[str]:
    """The pretrained checkpoints (``models.PRETRAINED`` names) that the given stages, or the profile's notebooks,
    load: notebook 00 and 04's ``profile.pretrained``, notebook 06's ``um.paper_checkpoint``."""
    nbs = set(profile.notebooks)
    wanted = []
    if profile.pretrained and nbs & {"00", "04"}:
        wanted += [n for n in profile.pretrained
                   if stage_names is None or f"posthoc_{n}" in stage_names or "00" in nbs]
    if profile.um.paper_checkpoint and "06" in nbs and (
            stage_names is None or any(s.startswith("paper_") for s in stage_names)):
        wanted.append(profile.um.paper_checkpoint)
    return list(dict.fromkeys(wanted))
