"""LINe: Leveraging Important Neurons (Ahn, Park & Kim, CVPR 2023; official code
github.com/YongHyun-Ahn/LINe-Out-of-Distribution-Detection-by-Leveraging-Important-Neurons), post hoc on a
linear head.

Notation (docs/methods.md §2): h in R^D is the pooled penultimate feature (post-ReLU), the head is
f_k(h) = W[k] . h + b_k with K classes. Everything here works on cached features and the head.

Offline (``fit_line``, on ID *training* features of the unmodified model, ground-truth labels):
  contributions   C[c] = W[c] * mu_c, mu_c = mean UNCLIPPED training feature of class c. Because the head is
                  linear, this equals the class mean of the first-order Taylor / Shapley score
                  h(x) * d f_y / d h that the official ``precompute.py`` computes with per-sample backward passes.
  activation mask m_c[j]    = C[c, j] > percentile(C[c, :], p_a)                  (signed C, strict, per class)
  weight mask     M_c[k, j] = |C[c, j]| * W[k, j] > percentile(of those K*D values, p_w)  (signed W, one
                  percentile over the whole K x D matrix of class c)
  Percentiles are numpy's default (linear interpolation) in float64; p means "percent pruned".

Test time (``line``; the official code, and the author's answer in issue #1 on how the class-specific logits of
the paper's Eq. 8 give one score), in this order:
  1. clip          h~ = min(h, tau)                  (upper clip only; tau None or inf: off)
  2. predict       c^ = argmax_k (W h~ + b)_k         (FULL head, CLIPPED feature)
  3. AP            h' = h~ * m_c^
  4. WP            g_k = sum_j W[k, j] M_c^[k, j] h'_j + b_k   for ALL k, bias kept
  5. score         logsumexp_k g_k (energy, T = 1); higher = more in-distribution.
Test samples are grouped by predicted class, so scoring costs about one extra N x K x D matrix product.

Switches for ablations and sweeps (the same code path): tau=None (no clipping), p_a=None (activation pruning
off: every mask all True), p_w=None (weight pruning off: all True).

Settings of the official scripts (``demo-cifar.sh``, ``demo-imagenet.sh``): ``LINE_CIFAR10`` (p_a 90, p_w 90,
tau 1.0), ``LINE_CIFAR100`` (10, 90, 1.0), ``LINE_IMAGENET`` (10, 10, 0.8). tau is a raw activation value and
depends on the network; for a new model use ``tau_from_percentile(train, q=90)``, the q-th percentile of all ID
training activations (ReAct's rule; the LINe code itself only ever used raw values).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np

from ood_lib.detectors import energy
from ood_lib.posthoc import CHUNK_ROWS, POSTHOC, Head, PostHoc, TrainSet

PAPER = ("Ahn, Park & Kim, 'LINe: Out-of-Distribution Detection by Leveraging Important Neurons', CVPR 2023 "
         "(arXiv 2303.13995)")

# Default percentile of ID training activations used to pick tau for a network without a published value.
TAU_PERCENTILE = 90.0
# Largest number of float64 entries of the adjusted contribution matrices |C_c| W built at once while fitting.
_CHUNK_ENTRIES = 1 << 24


@dataclass(frozen=True)
class LineSetting:
    """One published LINe configuration: activation / weight pruning percentiles and the clip value."""
    p_a: float | None
    p_w: float | None
    tau: float | None


LINE_CIFAR10 = LineSetting(p_a=90.0, p_w=90.0, tau=1.0)    # DenseNet-101 on CIFAR-10 (demo-cifar.sh)
LINE_CIFAR100 = LineSetting(p_a=10.0, p_w=90.0, tau=1.0)   # DenseNet-101 on CIFAR-100 (demo-cifar.sh)
LINE_IMAGENET = LineSetting(p_a=10.0, p_w=10.0, tau=0.8)   # ResNet-50 on ImageNet-1k (demo-imagenet.sh)


@dataclass(frozen=True)
class LineMasks:
    """activation (K, D) bool: neuron j kept for predicted class c; weight (K, K, D) bool: entry (k, j) of W kept
    when the predicted class is c (index [c, k, j])."""
    activation: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class LineStats:
    """What ``fit_line`` learns: the contribution matrix, the masks built from it, and the settings."""
    contributions: np.ndarray  # (K, D) float64
    masks: LineMasks
    tau: float | None
    p_a: float | None = None
    p_w: float | None = None

    @property
    def clip(self) -> bool:
        return self.tau is not None and math.isfinite(self.tau)

    def setting(self) -> LineSetting:
        return LineSetting(self.p_a, self.p_w, self.tau)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, D) float64 mean feature of each class; streams row chunks (float64 working memory of one chunk).
    Every class must have a training sample."""
    y = np.asarray(labels).astype(np.int64).ravel()
    n = y.shape[0]
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"features {features.shape} and labels {y.shape} do not match")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"no training samples of class(es) {np.flatnonzero(counts == 0).tolist()}: "
                         f"LINe needs the mean feature of every class")
    sums = np.zeros((num_classes, features.shape[1]))
    for s in range(0, n, CHUNK_ROWS):
        yc = y[s:s + CHUNK_ROWS]
        order = np.argsort(yc, kind="stable")
        present, starts = np.unique(yc[order], return_index=True)
        chunk = np.asarray(features[s:s + CHUNK_ROWS], dtype=np.float64)[order]
        sums[present] += np.add.reduceat(chunk, starts, axis=0)
    return sums / counts[:, None]


def contributions(train: TrainSet, head: Head) -> np.ndarray:
    """C (K, D) float64: C[c] = W[c] * mu_c, mu_c the mean unclipped training feature of ground-truth class c."""
    w = np.asarray(head.weight, dtype=np.float64)
    return w * class_means(train.features, train.labels, w.shape[0])


def line_masks(contrib: np.ndarray, weight: np.ndarray, p_a: float | None, p_w: float | None) -> LineMasks:
    """Activation masks (K, D) and per-class weight masks (K, K, D) from C and W (None: that pruning off)."""
    c = np.asarray(contrib, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    k, d = c.shape
    if w.shape != (k, d):
        raise ValueError(f"contributions {c.shape} and weight {w.shape} differ")
    if p_a is None:
        act = np.ones((k, d), dtype=bool)
    else:
        act = c > np.percentile(c, p_a, axis=1, keepdims=True)
    if p_w is None:
        wmask = np.ones((k, k, d), dtype=bool)
    else:
        wmask = np.empty((k, k, d), dtype=bool)
        step = max(1, _CHUNK_ENTRIES // (k * d))
        importance = np.abs(c)
        for s in range(0, k, step):
            adjusted = importance[s:s + step, None, :] * w[None, :, :]  # (chunk, K, D): |C[c, j]| * W[k, j]
            thr = np.percentile(adjusted.reshape(adjusted.shape[0], -1), p_w, axis=1)
            wmask[s:s + step] = adjusted > thr[:, None, None]
    return LineMasks(activation=act, weight=wmask)


def fit_line(train: TrainSet, head: Head, p_a: float | None = LINE_CIFAR10.p_a,
             p_w: float | None = LINE_CIFAR10.p_w, tau: float | None = LINE_CIFAR10.tau) -> LineStats:
    """Contribution matrix and masks from the ID training set. Defaults: the CIFAR-10 setting; others with
    ``fit_line(train, head, **asdict(LINE_CIFAR100))``."""
    c = contributions(train, head)
    return LineStats(contributions=c, masks=line_masks(c, head.weight, p_a, p_w), tau=tau, p_a=p_a, p_w=p_w)


def fit_line_setting(train: TrainSet, head: Head, setting: LineSetting) -> LineStats:
    """``fit_line`` with a named setting, e.g. ``LINE_CIFAR100``."""
    return fit_line(train, head, **asdict(setting))


def tau_from_percentile(train: TrainSet, q: float = TAU_PERCENTILE) -> float:
    """The q-th percentile of all ID training activations (every sample, every unit): a clip value for a network
    whose scale differs from the papers' (their raw tau = 1.0 / 0.8 only suit their networks)."""
    return float(np.percentile(train.features, q))


def line_logits(features: np.ndarray, head: Head, stats: LineStats) -> tuple[np.ndarray, np.ndarray]:
    """LINe logits g (N, K) float64 and the predicted classes (N,) from the full head on clipped features."""
    h = np.asarray(features, dtype=np.float64)
    w = np.asarray(head.weight, dtype=np.float64)
    b = np.asarray(head.bias, dtype=np.float64)
    if stats.clip:
        h = np.minimum(h, stats.tau)
    pred = np.argmax(h @ w.T + b, axis=1)
    out = np.empty((h.shape[0], w.shape[0]))
    act, wmask = stats.masks.activation, stats.masks.weight
    order = np.argsort(pred, kind="stable")
    classes, starts = np.unique(pred[order], return_index=True)
    for c, rows in zip(classes, np.split(order, starts[1:])):
        out[rows] = (h[rows] * act[c]) @ np.where(wmask[c], w, 0.0).T + b
    return out, pred


def line(features: np.ndarray, logits: np.ndarray | None, head: Head, stats: LineStats) -> np.ndarray:
    """LINe score (N,) float64, higher = more ID: energy (T = 1) of the pruned logits. ``logits`` are unused
    (the prediction must come from the clipped features); the argument is there for the PostHoc interface."""
    g, _ = line_logits(features, head, stats)
    return energy(g)


# Registration in the shared registry, with the CIFAR-10 setting. ``ood_lib.posthoc`` imports this module at its
# end (``import ood_lib.line``), so whichever of the two is imported first, "line" is registered.
POSTHOC["line"] = PostHoc("line", functools.partial(fit_line, **asdict(LINE_CIFAR10)), line, PAPER)
