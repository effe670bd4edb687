"""Unleashing Mask (Zhu et al., ICML 2023, arXiv 2306.03715; official code github.com/tmlr-group/Unleashing-Mask):
the loss constraint gamma, UM and UMAP. What the study takes from the paper and the code: docs/methods.md §1.

* gamma: the mean training cross-entropy of the FINAL model with a random ``um.mask_keep`` mask (0.965: 3.5% of
  every conv/linear layer zeroed), in eval mode, over the training images with their training augmentation (the
  official ``estimate_loss.py`` with ``configs/estimate_loss/estimate_loss_cifar10.yaml``). It varies from mask to
  mask, so it is estimated over ``um.mask_seeds`` and the value used is a visible choice: ``um.gamma`` when set,
  else the median of the estimates (rule A; of that seed's final model).
* UM: fine-tune the final model on the flooding objective |L - gamma| + gamma (flooding, Ishida et al., ICML 2020:
  |J - b| + b at flood level b = gamma), L the mini-batch MEAN cross-entropy (the official ``utils/custom_loss.py``):
  descent while L > gamma, ascent while L < gamma; flooding each sample separately would be another method.
* UMAP: the same objective, but the final model's weights stay frozen (by default) and a per-layer top-k mask over
  learnable scores (``masking.add_score_masks``, keep ``um.umap_keep``) is trained; exported folded. Its initial
  scores come from their own seed stream (``umap_score_seed``), never from one of gamma's mask seeds.
* ``um_gamma<g>``: UM at each fixed flood level of ``um.gamma_sweep``, to show how much the choice of gamma matters.
* ``ft_ce``: the same schedule with plain cross-entropy, a control that separates the flooding from the effect of
  simply training on. The official README's commands, taken literally, run this: its configs set
  ``criterion: CrossEntropyLoss``, and the UM loss is only used for another criterion (docs/methods.md §1.5).

The schedule is SGD with the base recipe's momentum, weight decay, batch and augmentation, cosine from ``um.lr``
over ``um.epochs`` epochs (the official configs: 100 epochs at 0.1). Runs live in
``<cache>/um/<hash of data, model, train and the um fields they use>/<name>/seed<k>/`` and resume like any
training run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ood_lib import base, masking
from ood_lib.atomic import atomic_write
from ood_lib.config import Profile, TrainConfig
from ood_lib.models import load_pretrained, weights_digest
from ood_lib.paths import cache_dir
from ood_lib.train import as_channels_last, augment, evaluation, load_epoch, recorded_digests, train


def flood(loss: torch.Tensor, gamma: float) -> torch.Tensor:
    """|L - gamma| + gamma: the gradient is dL above gamma and -dL below it."""
    return (loss - gamma).abs() + gamma


@torch.no_grad()
def mean_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              batch_size: int, aug: TrainConfig | None = None, seed: int = 0) -> float:
    """Mean cross-entropy over uint8 ``images`` in eval mode (``train.evaluation``: float32, channels-last); with
    ``aug``, its crop/flip (seeded by ``seed``)."""
    model.eval().to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    with evaluation(model):
        for first in range(0, len(labels), batch_size):
            x = images[first:first + batch_size].to(device).float().div_(255)
            if aug is not None:
                x = augment(x, gen, aug.crop_padding, aug.flip)
            total += F.cross_entropy(model(as_channels_last(x)), labels[first:first + batch_size].to(device),
                                     reduction="sum").item()
    return total / len(labels)


def masked_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, keep: float, seed: int,
                device: torch.device, batch_size: int, aug: TrainConfig | None) -> float:
    """Mean training loss of ``model`` under the random mask ``seed`` keeping ``keep`` of every layer."""
    masked = masking.apply_masks(model, masking.random_masks(model, keep, seed))
    return mean_loss(masked, images, labels, device, batch_size, aug, seed)


@dataclass(frozen=True)
class Gamma:
    """The estimates of gamma over mask seeds, and the value used: ``um.gamma`` when given, else the MEDIAN over the
    masks (rule A: the paper's protocol; the median, because a few masks that hit important weights give losses
    several times the others', e.g. 0.18 to 2.32 over five masks of a small network)."""
    keep: float
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    given: float | None = None   # um.gamma, when the profile fixes it

    @property
    def used(self) -> float:
        return self.given if self.given is not None else float(np.median(self.values))

    def summary(self) -> dict:
        v = np.asarray(self.values)
        return {"mask_keep": self.keep, "masks": len(v), "mean": v.mean(), "median": float(np.median(v)),
                "std": v.std(ddof=1), "min": v.min(), "max": v.max(), "used": self.used,
                "rule": "um.gamma (given)" if self.given is not None else "rule A: median over masks"}


def estimate_gamma(profile: Profile, data: base.StudyData, model: torch.nn.Module,
                   device: torch.device) -> Gamma:
    """gamma of one final model: ``masked_loss`` over the training images with the training augmentation, for
    every seed of ``um.mask_seeds`` (docs/methods.md §1.2)."""
    u = profile.um
    values = tuple(masked_loss(model, data.train_images, data.train_labels, u.mask_keep, s, device,
                               profile.eval.batch_size, profile.train) for s in u.mask_seeds)
    return Gamma(u.mask_keep, tuple(u.mask_seeds), values, u.gamma)


# Rule B (pre-registered before it was run on any OOD data): the flood level is the loss the base run had where it
# stopped generalising better, i.e. before the late stage that the paper blames on memorising atypical samples.
RULE_B_LATE = 0.9   # no late stage when the ID-val loss bottoms out after this fraction of the epochs


@dataclass(frozen=True)
class RuleB:
    """gamma by rule B for one base seed. ``val_loss``: the ID-val cross-entropy of every epoch's checkpoint (eval
    mode, no augmentation); ``smoothed``: its centred 3-epoch moving average (truncated at the ends); ``epoch``: where
    the smoothed curve is lowest (earliest on ties); ``gamma``: the UNMASKED model of that epoch measured like rule A
    (eval mode, the training images with their augmentation, mean over the augmentation draws of ``um.mask_seeds``),
    or None when ``epoch`` > RULE_B_LATE x epochs: no late stage, nothing for UM to undo."""
    val_loss: tuple[float, ...]
    smoothed: tuple[float, ...]
    epoch: int
    gamma: float | None


def smoothed_minimum(val_loss) -> tuple[np.ndarray, int]:
    """The centred 3-epoch moving average (truncated at the ends) and the 1-based epoch of its first minimum."""
    v = np.asarray(val_loss, float)
    padded = np.concatenate([[np.nan], v, [np.nan]])
    smooth = np.nanmean(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)
    return smooth, int(np.argmin(smooth)) + 1


def id_val_losses(profile: Profile, data: base.StudyData, seed: int, device: torch.device) -> list[float]:
    """Mean ID-val cross-entropy after each epoch of the base run of ``seed`` (logits from the feature cache)."""
    model = base.build_model(profile, data)
    cache = base.feature_cache(profile)
    directory = base.run_dir(profile, seed)
    digests = recorded_digests(directory)
    labels = torch.as_tensor(data.id_val.labels)
    losses = []
    for epoch in range(1, profile.train.epochs + 1):
        with base.epoch_weights(model, directory, epoch, digests, cache) as digest:
            logits = base.score_sets(profile, model, digest, [data.id_val], cache, device, ())
        z = torch.as_tensor(logits[(data.id_val.name, "val")]["logits"])
        losses.append(F.cross_entropy(z.double(), labels).item())
    return losses


def rule_b_epoch(profile: Profile, data: base.StudyData, seed: int, device: torch.device) -> int:
    """The epoch rule B reads gamma at (whether or not it is late enough to count): the smoothed ID-val minimum."""
    return smoothed_minimum(id_val_losses(profile, data, seed, device))[1]


def rule_b(profile: Profile, data: base.StudyData, seed: int, device: torch.device) -> RuleB:
    """Rule B for the base run of ``seed`` (its per-epoch checkpoints; ID-val logits come from the feature cache)."""
    model = base.build_model(profile, data)
    losses = id_val_losses(profile, data, seed, device)
    smooth, epoch = smoothed_minimum(losses)
    gamma = None
    if epoch <= RULE_B_LATE * profile.train.epochs:
        load_epoch(model, base.run_dir(profile, seed), epoch)
        gamma = float(np.mean([mean_loss(model, data.train_images, data.train_labels, device,
                                         profile.eval.batch_size, profile.train, s) for s in profile.um.mask_seeds]))
    return RuleB(tuple(losses), tuple(float(x) for x in smooth), epoch, gamma)


def stratified_subset(labels, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified random subset of ``n`` images (None or >= all: every index).

    Each class gets its share of n in proportion to its count (floor of the quota, then the largest remainders,
    ties to the lower class), drawn uniformly without replacement within the class from
    ``np.random.default_rng(seed)``. The first n of a class-ordered source (the CIFAR-10 archive) would be one or two
    classes; this is not."""
    y = np.asarray(labels).ravel()
    if n is None or n >= len(y):
        return np.arange(len(y))
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    classes, counts = np.unique(y, return_counts=True)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[:n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(y == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def loss_curve(profile: Profile, data: base.StudyData, model: torch.nn.Module, device: torch.device,
               images: int | None = None) -> pd.DataFrame:
    """The masked model's mean training loss at every ``um.curve_keep`` and mask seed (the paper's loss vs mask
    ratio figure, Fig. 3 of Zhu et al.); ``images``: a class-stratified subset of that many training images
    (``stratified_subset`` seeded by ``data.split_seed``), None = all."""
    idx = torch.from_numpy(stratified_subset(data.train_labels.numpy(), images, profile.data.split_seed))
    x, y = data.train_images[idx], data.train_labels[idx]
    rows = [{"keep": keep, "masked": 1 - keep, "mask_seed": s,
             "loss": masked_loss(model, x, y, keep, s, device, profile.eval.batch_size, profile.train)}
            for keep in profile.um.curve_keep for s in profile.um.mask_seeds]
    return pd.DataFrame(rows)


def umap_score_seed(seed: int) -> int:
    """The seed of UMAP's initial (random) scores for base seed ``seed``: the first 8 hex digits of
    SHA-256("umap-scores/<seed>"), a 32-bit number. Gamma's random masks use the small seeds of ``um.mask_seeds``
    (0..4); had UMAP used the base seed itself, the scores of base seed s would be the scores of gamma's mask s,
    so gamma's 3.5% zeroed weights would be a subset of UMAP's initial 20% pruned ones."""
    return int(hashlib.sha256(f"umap-scores/{seed}".encode()).hexdigest()[:8], 16)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning runs: UM, UMAP and the plain cross-entropy control.

@dataclass(frozen=True)
class FineTune:
    """One way to continue from the final base model (or from a pretrained checkpoint of ``models.PRETRAINED``:
    the authors' own final model); ``name`` is its ``model`` in metrics.csv."""
    name: str
    flooded: bool   # the loss is flood(CE, gamma) instead of CE
    masked: bool    # UMAP: learnable top-k masks over (frozen) weights, folded on export
    pretrained: str | None = None  # start from this checkpoint instead of the base model of the seed

    def start(self, profile: Profile, data: base.StudyData, seed: int) -> tuple[torch.nn.Module, list | None]:
        """The final base model of ``seed`` (or the pretrained checkpoint), set up for this fine-tuning; and the
        parameters to optimise. UMAP's initial scores are seeded by ``umap_score_seed(seed)``, a stream of their
        own."""
        model = (load_pretrained(self.pretrained) if self.pretrained else base.load_base(profile, data, seed)).train()
        if not self.masked:
            return model, None
        return model, masking.add_score_masks(model, profile.um.umap_keep, umap_score_seed(seed),
                                              profile.um.umap_train_weights)

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        return masking.fold(model) if self.masked else model


UM = FineTune("um", flooded=True, masked=False)        # at gamma by rule A (the paper's)
UM_B = FineTune("um_b", flooded=True, masked=False)    # at gamma by rule B
UMAP = FineTune("umap", flooded=True, masked=True)     # at gamma by rule A
FT_CE = FineTune("ft_ce", flooded=False, masked=False)


def fine_tunes(profile: Profile) -> list[FineTune]:
    return [UM] + ([UM_B] if profile.um.rule_b else []) + [UMAP] + ([FT_CE] if profile.um.ce_control else [])


def at_gamma(gamma: float) -> FineTune:
    """UM at a fixed flood level (``um.gamma_sweep``), named ``um_gamma<value>`` in metrics.csv."""
    return FineTune(f"um_gamma{gamma:g}", flooded=True, masked=False)


def schedule(profile: Profile) -> TrainConfig:
    return dataclasses.replace(profile.train, epochs=profile.um.epochs, lr=profile.um.lr)


# The fields of the um section a fine-tuning run depends on (the others only shape notebook 02 or the sweep list).
RUN_FIELDS = ("mask_keep", "mask_seeds", "gamma", "epochs", "lr", "umap_keep", "umap_train_weights")
# Bumped when the code changes what a run with the same fields does, so that earlier runs are not reused
# (2: UMAP's initial scores from their own seed stream; gamma by rule A is the median over masks).
RUN_VERSION = 2


def run_dir(profile: Profile, seed: int, ft: FineTune) -> Path:
    """``<cache>/um/<hash of data, model, train>-<hash of RUN_FIELDS and RUN_VERSION>/<name>/seed<k>``."""
    fields = json.dumps({"version": RUN_VERSION, **{f: getattr(profile.um, f) for f in RUN_FIELDS}}, sort_keys=True)
    key = f"{profile.digest('data', 'model', 'train')}-{hashlib.sha256(fields.encode()).hexdigest()[:8]}"
    return cache_dir(profile.name) / "um" / key / ft.name / f"seed{seed}"


def _check_gamma(directory: Path, gamma: float | None) -> None:
    """A run keeps the gamma it started with; a different one (e.g. edited by hand) is an error, not a mix."""
    path = directory / "gamma.json"
    if path.exists():
        old = json.loads(path.read_text())["gamma"]
        if (old is None) != (gamma is None) or (gamma is not None and abs(old - gamma) > 1e-9):
            raise ValueError(f"{directory} was trained with gamma {old}, now asked for {gamma}; remove it to rerun")
        return
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        json.dump({"gamma": gamma}, f)


def fine_tune(profile: Profile, data: base.StudyData, seed: int, ft: FineTune, gamma: float,
              device: torch.device, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train (or resume, or reload) ``ft`` from the final base model of ``seed``; the test sets are scored with
    the logit detectors after every epoch (into the cache). Returns the per-epoch history."""
    model, params = ft.start(profile, data, seed)
    directory = run_dir(profile, seed, ft)
    _check_gamma(directory, gamma if ft.flooded else None)
    objective = (lambda ce: flood(ce, gamma)) if ft.flooded else None
    cache = base.feature_cache(profile)
    scorer = base.epoch_scorer(profile, data, cache, device, base.logit_detectors(profile))
    history = train(model, data.train_images, data.train_labels, schedule(profile), seed, directory, device,
                    on_epoch_end=scorer, log=lambda s: log(f"{ft.name} {s}"), objective=objective,
                    parameters=params, name=ft.name, keep_epochs=profile.keep_epoch_checkpoints)
    return pd.DataFrame(history).assign(seed=seed, model=ft.name, gamma=gamma if ft.flooded else np.nan)


def load(profile: Profile, data: base.StudyData, seed: int, ft: FineTune, epoch: int | None = None) -> torch.nn.Module:
    """The fine-tuned model of ``seed`` after ``epoch`` (default: the last), exported as a plain model, eval mode."""
    model, _ = ft.start(profile, data, seed)
    load_epoch(model, run_dir(profile, seed, ft), epoch or profile.um.epochs)
    return ft.export(model).eval()


def finished(profile: Profile, seed: int, ft: FineTune) -> bool:
    return (run_dir(profile, seed, ft) / f"epoch_{profile.um.epochs:03d}.pt").exists()


def evaluate(profile: Profile, data: base.StudyData, seed: int, ft: FineTune, device: torch.device,
             notebook: str = "03") -> pd.DataFrame:
    """Test rows of ``ft``: every epoch but the last with the logit detectors (from the cache), the last epoch's
    exported model with every profile detector (ODIN included)."""
    cache = base.feature_cache(profile)
    model, _ = ft.start(profile, data, seed)
    E = profile.um.epochs
    rows = base.evaluate_epochs(profile, data, model, run_dir(profile, seed, ft), list(range(1, E)), ft.name,
                                notebook, seed, cache, device, base.logit_detectors(profile))
    final = load(profile, data, seed, ft)
    scored = base.score_sets(profile, final, weights_digest(final), base.test_sets(data), cache, device)
    last = pd.DataFrame(base.metric_rows(profile, scored, data, seed, E, ft.name, notebook, splits=("test",)))
    return pd.concat([rows, last], ignore_index=True)
