"""Atypical training samples (Unleashing Mask, Zhu et al., ICML 2023; ``docs/methods.md`` §1.6): two views of
them, and the experiment of the claim.

* Mask sensitivity of the FINAL model: for every training image, averaged over random masks (``um.mask_keep``,
  ``um.mask_seeds``; the masks of gamma): the increase of its cross-entropy, KL(masked ‖ full) between the masked
  and the full model's predictions, and the fraction of masks that change the predicted class. The atypicality
  score is the KL, the statistic of the official code's first (later removed) trainer; images are scored without
  augmentation, in eval mode.
* Learning dynamics, from the per-epoch checkpoints of notebook 01: the epoch from which an image stays correctly
  classified to the end (``epochs + 1``: not learned), and its forgetting events (correct at one epoch, wrong at
  the next; Toneva et al., ICLR 2019).
* The experiment: train the base recipe on the training set without the top-k atypical within each class (each
  class loses its share of k), without k random images and, with ``um.global_arm``, without the global top-k; the
  logit detectors are scored on the test sets after every epoch. Each base seed picks its own images
  (``removed_images``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ood_lib import base, masking
from ood_lib.config import Profile, UMConfig
from ood_lib.paths import cache_dir
from ood_lib.train import as_channels_last, evaluation, recorded_digests, train

ARMS = {"no_atypical": "without the top-k atypical", "no_atypical_per_class": "without the top-k atypical, per class",
        "no_random": "without k random"}  # model names in metrics.csv


def arms(u: UMConfig) -> list[str]:
    """The removal arms a profile retrains: per class and random (the headline) and, with ``um.global_arm``, the
    global top-k (a diagnostic)."""
    return [a for a in ARMS if a != "no_atypical" or u.global_arm]


@torch.no_grad()
def _log_probs(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    model.eval().to(device)
    with evaluation(model):
        out = [F.log_softmax(model(as_channels_last(images[i:i + batch_size].to(device).float().div_(255))).double(),
                             1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def mask_sensitivity(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, keep: float,
                     seeds: tuple[int, ...], device: torch.device, batch_size: int = 1000) -> pd.DataFrame:
    """Per image: full-model CE and, averaged over the random masks ``seeds``, the CE increase, KL(masked ‖ full)
    and the rate at which the mask changes the predicted class (and makes it wrong)."""
    full = _log_probs(model, images, device, batch_size)
    y = labels.long()
    rows = torch.arange(len(y))
    ce_full = -full[rows, y]
    ce_up, kl, flip, wrong = (torch.zeros(len(y), dtype=torch.float64) for _ in range(4))
    for s in seeds:
        lm = _log_probs(masking.apply_masks(model, masking.random_masks(model, keep, s)), images, device, batch_size)
        ce_up += -lm[rows, y] - ce_full
        kl += (lm.exp() * (lm - full)).sum(1)
        flip += (lm.argmax(1) != full.argmax(1)).double()
        wrong += (lm.argmax(1) != y).double()
    n = len(seeds)
    return pd.DataFrame({"ce_full": ce_full.numpy(), "ce_increase": (ce_up / n).numpy(), "kl": (kl / n).numpy(),
                         "flip_rate": (flip / n).numpy(), "masked_wrong_rate": (wrong / n).numpy(),
                         "full_pred": full.argmax(1).numpy(), "label": y.numpy()})


def learning_dynamics(correct: np.ndarray) -> pd.DataFrame:
    """``correct``: bool (epochs, images), whether each epoch's model classifies each image correctly.

    learned_epoch: the first epoch e (1-based) with every epoch >= e correct; epochs + 1 if wrong at the end.
    forgetting_events: how often correct at epoch e and wrong at e + 1."""
    correct = np.asarray(correct, bool)
    E = correct.shape[0]
    wrong_from_end = np.flip(~correct, 0)
    last_wrong = np.where(wrong_from_end.any(0), E - 1 - wrong_from_end.argmax(0), -1)  # 0-based, -1 = never
    learned = last_wrong + 2  # the epoch after the last wrong one, 1-based
    forgetting = (correct[:-1] & ~correct[1:]).sum(0)
    return pd.DataFrame({"learned_epoch": learned, "forgetting_events": forgetting})


def epoch_correctness(profile: Profile, data: base.StudyData, seed: int, device: torch.device) -> np.ndarray:
    """bool (epochs, train images) from the checkpoints of notebook 01 (bit vectors through the feature cache)."""
    model = base.build_model(profile, data)
    cache = base.feature_cache(profile)
    directory = base.run_dir(profile, seed)
    digests = recorded_digests(directory)
    out = []
    for epoch in range(1, profile.train.epochs + 1):
        with base.epoch_weights(model, directory, epoch, digests, cache) as digest:
            out.append(base.train_correct(profile, model, digest, data, cache, device))
    return np.stack(out)


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, sorted (ties broken by index)."""
    order = np.lexsort((np.arange(len(score)), -np.asarray(score)))
    return np.sort(order[:k])


def top_k_per_class(score: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The top-k by ``score`` with each class's share of k equal to its share of the images (largest remainders
    first): atypical WITHIN each class, so that removing them does not remove a class."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = k * counts / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[:k - take.sum()]:
        take[i] += 1
    picked = [np.flatnonzero(labels == c)[top_k(np.asarray(score)[labels == c], t)] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def random_k(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def removed_images(arm: str, score: np.ndarray, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k training images an arm leaves out, for the base seed ``seed``: the top-k of that seed's atypicality
    ``score`` (``no_atypical``), the top-k within each class (``no_atypical_per_class``), or k drawn at random with
    ``seed`` (``no_random``). Each seed is a replicate of the whole experiment: its own final model picks its own
    images."""
    if arm == "no_atypical":
        return top_k(score, k)
    if arm == "no_atypical_per_class":
        return top_k_per_class(score, labels, k)
    if arm == "no_random":
        return random_k(len(score), k, seed)
    raise ValueError(f"unknown arm {arm!r}; allowed: {sorted(ARMS)}")


def run_dir(profile: Profile, arm: str, removed: np.ndarray, seed: int) -> Path:
    """``<cache>/without/<hash of data, model, train>/<arm>-<hash of the removed indices>/seed<k>``."""
    key = hashlib.sha256(np.asarray(removed, np.int64).tobytes()).hexdigest()[:12]
    return cache_dir(profile.name) / "without" / profile.digest("data", "model", "train") / f"{arm}-{key}" / f"seed{seed}"


def train_without(profile: Profile, data: base.StudyData, seed: int, arm: str, removed: np.ndarray,
                  device: torch.device, log: Callable[[str], None] = print) -> pd.DataFrame:
    """The base recipe of ``seed`` on the training set minus ``removed``; logit detectors scored every epoch."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; allowed: {sorted(ARMS)}")
    keep = np.setdiff1d(np.arange(len(data.train_labels)), removed)
    torch.manual_seed(seed)
    model = base.build_model(profile, data)  # the same normalisation constants as the base model
    scorer = base.epoch_scorer(profile, data, base.feature_cache(profile), device, base.logit_detectors(profile))
    history = train(model, data.train_images[keep], data.train_labels[keep], profile.train, seed,
                    run_dir(profile, arm, removed, seed), device, on_epoch_end=scorer,
                    log=lambda s: log(f"{arm} {s}"), name=arm, keep_epochs=profile.keep_epoch_checkpoints)
    return pd.DataFrame(history).assign(seed=seed, model=arm)


def evaluate_without(profile: Profile, data: base.StudyData, seed: int, arm: str, removed: np.ndarray,
                     device: torch.device) -> pd.DataFrame:
    """Test rows of every epoch of a ``train_without`` run (logit detectors, from the cache)."""
    model = base.build_model(profile, data)
    return base.evaluate_epochs(profile, data, model, run_dir(profile, arm, removed, seed),
                                list(range(1, profile.train.epochs + 1)), arm, "02", seed,
                                base.feature_cache(profile), device, base.logit_detectors(profile))
