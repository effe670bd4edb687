"""Notebook 04: LINe against every post-hoc baseline on one model, its ablation and its sensitivity.

Everything runs from cached outputs: the model's logits and penultimate features on the ID training images
(what ``fit`` sees), the ID test set and the test half of each OOD set. ASH needs the feature maps, so its
scores come from one extra cached pass per set.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ood_lib import metrics
from ood_lib.ash import ASH_PERCENTILE, SITE_MAP, ash_from_features
from ood_lib.base import StudyData, data_pre, train_outputs
from ood_lib.config import Profile
from ood_lib.features import FeatureCache, ash_score_table, outputs
from ood_lib.line import fit_line, line, tau_from_percentile
from ood_lib.models import weights_digest
from ood_lib.posthoc import POSTHOC, Head, TrainSet

# ASH is reported at two sites (see ood_lib.ash): where the authors' code shapes, the pooled vector (ash_p, ash_b,
# ash_s: computed from the cached features, no forward pass), and on the last feature map (ash_p_map, ...); each
# variant at its own published CIFAR-10 percentile (``ASH_PERCENTILE``: ASH-P 90, ASH-B 90, ASH-S 95).


@dataclass(frozen=True)
class Evaluated:
    """One model's cached outputs: the head, the training outputs, and (features, logits) per test set."""
    name: str
    seed: int
    epoch: int | None
    head: Head
    train: TrainSet
    sets: dict[str, tuple[np.ndarray, np.ndarray]]  # "id" and each OOD set name -> (features, logits)
    ash: dict[str, dict[str, np.ndarray]]            # ash variant -> set name -> scores
    tau: float                                       # LINe's clip for this model (the profile's or the rule's)


def evaluate_model(profile: Profile, data: StudyData, model: torch.nn.Module, name: str, seed: int,
                   epoch: int | None, cache: FeatureCache, device: torch.device) -> Evaluated:
    model.eval()
    digest = weights_digest(model)
    tr = train_outputs(profile, model, digest, data, cache, device)
    train = TrainSet(features=tr["features"], logits=tr["logits"], labels=tr["labels"])
    pre = data_pre(profile)
    head = Head.of(model)
    sets, ash = {}, {}
    test_sets = {"id": data.id_test, **data.ood_test}
    for key, s in test_sets.items():
        o = outputs(cache, model, digest, s.images, s.checksum, pre, device, profile.eval.batch_size)
        sets[key] = (o["features"], o["logits"])
        for variant in profile.line.ash:  # pooled site: a function of the cached features and the head
            ash.setdefault(variant, {})[key] = ash_from_features(o["features"], head.weight, head.bias, variant,
                                                                 ASH_PERCENTILE[variant])
        if profile.line.ash:  # map site: needs the feature maps, so one (cached) forward pass for all variants
            table = ash_score_table(cache, model, digest, s.images, s.checksum, pre, device,
                                    [(v, ASH_PERCENTILE[v]) for v in profile.line.ash], site=SITE_MAP,
                                    batch_size=profile.eval.batch_size)
            for (variant, _), scores in table.items():
                ash.setdefault(variant + "_map", {})[key] = scores
    tau = profile.line.tau if profile.line.tau is not None else tau_from_percentile(train, profile.line.tau_percentile)
    return Evaluated(name, seed, epoch, head, train, sets, ash, float(tau))


def scores_of(ev: Evaluated, profile: Profile) -> dict[str, dict[str, np.ndarray]]:
    """Every detector's scores on every set: the baselines, ASH and LINe at the profile's setting."""
    out = {}
    for name in profile.line.baselines:
        det = POSTHOC[name]
        stats = det.fit(ev.train, ev.head) if det.fit is not None else None
        out[name] = {k: det.score(f, z, ev.head, stats) for k, (f, z) in ev.sets.items()}
    out.update(ev.ash)
    stats = fit_line(ev.train, ev.head, p_a=profile.line.p_a, p_w=profile.line.p_w, tau=ev.tau)
    out["line"] = {k: line(f, z, ev.head, stats) for k, (f, z) in ev.sets.items()}
    return out


def metric_rows(profile: Profile, data: StudyData, ev: Evaluated, scores: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """Tidy rows (metrics.csv) for notebook 04, plus the ID accuracy of the unmodified model."""
    base = {"notebook": "04", "seed": ev.seed, "model": ev.name, "epoch": ev.epoch, "id_set": profile.data.id_set}
    acc = metrics.accuracy(ev.sets["id"][1], data.id_test.labels)
    rows = [{**base, "detector": "", "ood_set": "", "metric": "id_acc", "value": acc}]
    for det, by_set in scores.items():
        for ood in (k for k in by_set if k != "id"):
            for m, v in metrics.all_metrics(by_set["id"], by_set[ood]).items():
                rows.append({**base, "detector": det, "ood_set": ood, "metric": m, "value": v})
    return rows


def _mean_metrics(id_scores: np.ndarray, ood: dict[str, np.ndarray]) -> dict[str, float]:
    per = [metrics.all_metrics(id_scores, s) for s in ood.values()]
    return {"fpr95": float(np.mean([p["fpr95"] for p in per])), "auroc": float(np.mean([p["auroc"] for p in per]))}


def _line_mean(ev: Evaluated, p_a, p_w, tau) -> dict[str, float]:
    stats = fit_line(ev.train, ev.head, p_a=p_a, p_w=p_w, tau=tau)
    s = {k: line(f, z, ev.head, stats) for k, (f, z) in ev.sets.items()}
    return _mean_metrics(s["id"], {k: v for k, v in s.items() if k != "id"})


def ablation(ev: Evaluated, profile: Profile) -> pd.DataFrame:
    """All 8 on/off combinations of clipping (AC), activation pruning (AP) and weight pruning (WP)."""
    rows = []
    for ac, ap, wp in itertools.product((False, True), repeat=3):
        m = _line_mean(ev, profile.line.p_a if ap else None, profile.line.p_w if wp else None, ev.tau if ac else None)
        rows.append({"model": ev.name, "seed": ev.seed, "clip (AC)": ac, "activation pruning (AP)": ap,
                     "weight pruning (WP)": wp, **m})
    return pd.DataFrame(rows)


def sensitivity(ev: Evaluated, profile: Profile) -> pd.DataFrame:
    """Mean FPR95 / AUROC over OOD sets as one of p_a, p_w, tau varies and the other two stay at the setting."""
    c = profile.line
    rows = []
    for p_a in c.sweep_p_a:
        rows.append({"parameter": "p_a", "value": p_a, **_line_mean(ev, p_a, c.p_w, ev.tau)})
    for p_w in c.sweep_p_w:
        rows.append({"parameter": "p_w", "value": p_w, **_line_mean(ev, c.p_a, p_w, ev.tau)})
    for q in c.sweep_tau_percentiles:
        tau = tau_from_percentile(ev.train, q)
        rows.append({"parameter": "tau percentile", "value": q, "tau": tau, **_line_mean(ev, c.p_a, c.p_w, tau)})
    return pd.DataFrame(rows).assign(model=ev.name, seed=ev.seed)
