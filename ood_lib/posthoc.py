"""Post-hoc detectors on cached penultimate features and logits, with a fit on ID training data.

Convention (docs/methods.md §0, as in ``ood_lib.detectors``): every score is HIGHER for inputs that look MORE
in-distribution. Each detector is a pair of plain functions

    fit_<name>(train: TrainSet, head: Head, <parameters with the paper's defaults>) -> <Name>Stats
    <name>(features, logits, head, stats) -> (N,) float64 scores

registered in ``POSTHOC`` under its usual short name with the defaults below. Detectors that need no fit
(``msp``, ``maxlogit``, ``energy``, ``gradnorm``, ``gen``) register ``fit=None`` and take their
parameters as keywords of the score function. ``features`` are the penultimate activations h (N, D),
``logits`` = h @ W.T + b (N, C) from the same model, ``head`` = (W, b) of its linear layer.

Defaults are the papers' CIFAR settings unless noted:

* ``mahalanobis``  Lee et al., NeurIPS 2018, single-layer variant: penultimate layer, tied covariance, no input
                   preprocessing, no feature ensemble (OpenOOD v1.5's ``mds``). NOT the multi-layer, tuned
                   baseline of the DICE / LINe / Unleashing Mask tables (docs/methods.md §5).
* ``rmds``         Ren et al., 2021 (relative Mahalanobis): class MD minus the MD of one global Gaussian.
* ``knn``          Sun et al., ICML 2022: L2-normalised features, distance to the k-th neighbour, k = 50.
* ``react``        Sun et al., NeurIPS 2021: clip at the 90th percentile of ID training activations, energy.
* ``react_1``      the same score clipped at the fixed value c = 1.0, the threshold of the LINe and Unleashing
                   Mask code on CIFAR (LINe ``demo-cifar.sh``; UM ``args.py``, react-threshold 1.0). On a network
                   whose activations are small the percentile rule clips far lower (0.40 on the DICE DenseNet,
                   97.7% FPR95 there), so both are reported (docs/methods.md §4).
* ``dice``         Sun & Li, ECCV 2022: keep the weight contributions above their 90th percentile, energy.
* ``vim``          Wang et al., CVPR 2022: energy minus alpha times the residual norm off the principal subspace.
* ``gradnorm``     Huang et al., NeurIPS 2021: L1 norm of the head-weight gradient of KL(u || softmax), T = 1.
* ``gen``          Liu et al., CVPR 2023: generalized entropy of the top-M probabilities, gamma = 0.1, M = 100.

Memory: every fit streams the training features in chunks of ``CHUNK_ROWS`` rows and accumulates in
float64, so a fit needs O(CHUNK_ROWS * D + D^2) extra memory (plus, by nature, the normalised feature
bank for ``knn`` and one float32 copy of the activations for the percentile of ``react``).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ood_lib import detectors

# ----------------------------------------------------------------------------------------------------------
# Defaults (the papers' CIFAR settings)
KNN_K = 50                    # Sun et al. 2022, CIFAR-10 (the paper uses 1000 on ImageNet)
REACT_PERCENTILE = 90.0       # Sun et al. 2021: clip at the 90th percentile of ID activations
REACT_THRESHOLD = 1.0         # react_1: the fixed clip of the LINe / Unleashing Mask CIFAR code
DICE_PERCENTILE = 90.0        # Sun & Li 2022, CIFAR: sparsity p = 0.9 (ImageNet: 0.7)
GEN_GAMMA = 0.1               # Liu et al. 2023
GEN_M = 100                   # Liu et al. 2023 (ImageNet); capped at the number of classes
GRADNORM_TEMPERATURE = 1.0    # Huang et al. 2021

# Chunking: rows of training/test features converted to float64 at a time, and the KNN block sizes
# (query rows x bank rows of float32 similarities: 512 x 65536 x 4 B = 128 MiB; a 50k bank is one block).
CHUNK_ROWS = 4096
KNN_QUERY_ROWS = 512
KNN_BANK_ROWS = 65536


# ----------------------------------------------------------------------------------------------------------
# Shared interface
@dataclass(frozen=True)
class Head:
    """The model's linear head: logits = features @ weight.T + bias; float64 copies."""
    weight: np.ndarray  # (C, D)
    bias: np.ndarray    # (C,)

    def __post_init__(self):
        w = np.array(self.weight, dtype=np.float64)
        b = np.array(self.bias, dtype=np.float64)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head weight must be (C, D) and bias (C,), got {w.shape} and {b.shape}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)

    @classmethod
    def of(cls, model) -> "Head":
        """The ``fc`` layer of an ``ood_lib.models`` network (any module with an ``nn.Linear`` named ``fc``)."""
        fc = model.fc
        w = fc.weight.detach().to("cpu", torch.float64).numpy()
        b = (fc.bias.detach().to("cpu", torch.float64).numpy() if fc.bias is not None
             else np.zeros(w.shape[0]))
        return cls(w, b)

    def logits(self, features) -> np.ndarray:
        """features (N, D) -> logits (N, C), float64."""
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias


@dataclass(frozen=True)
class TrainSet:
    """Cached outputs of the model on the ID TRAINING images (no augmentation)."""
    features: np.ndarray  # (N, D) penultimate, float32
    logits: np.ndarray    # (N, C)
    labels: np.ndarray    # (N,) int

    def __post_init__(self):
        f, z, y = self.features, self.logits, np.asarray(self.labels)
        if f.ndim != 2 or z.ndim != 2 or y.ndim != 1 or not (len(f) == len(z) == len(y)):
            raise ValueError(f"need features (N, D), logits (N, C), labels (N,); got {f.shape}, {z.shape}, {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {y.dtype}")
        object.__setattr__(self, "labels", y)


@dataclass(frozen=True)
class PostHoc:
    """A detector of the registry: ``fit(train, head) -> stats`` (None: no fit) and
    ``score(features, logits, head, stats) -> (N,) float64``, higher = more ID."""
    name: str
    fit: Callable[[TrainSet, Head], Any] | None
    score: Callable[[np.ndarray, np.ndarray, Head, Any], np.ndarray]
    paper: str


# ----------------------------------------------------------------------------------------------------------
# Streaming helpers
def _slices(n: int, rows: int | None = None) -> list[slice]:
    rows = rows or CHUNK_ROWS
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _rowwise(fn: Callable[[slice], np.ndarray], n: int) -> np.ndarray:
    """Concatenate ``fn(chunk)`` over row chunks: constant float64 working memory per chunk."""
    if n == 0:
        return np.zeros(0)
    return np.concatenate([fn(s) for s in _slices(n)])


def _f64(a: np.ndarray, s: slice) -> np.ndarray:
    """A float64 COPY of rows ``s`` (callers may modify it in place)."""
    return np.array(a[s], dtype=np.float64)


def _class_moments(features: np.ndarray, labels: np.ndarray, num_classes: int):
    """Counts (C,), class means (C, D) and the within-class scatter sum_i (h_i - mu_y_i)(h_i - mu_y_i)^T (D, D).

    Two passes over row chunks in float64: means first, then the scatter of exactly centred chunks (no
    E[hh^T] - mu mu^T cancellation). Raises if a class of the head has no training sample."""
    n, d = features.shape
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without training samples: {np.flatnonzero(counts == 0).tolist()}")
    sums = np.zeros((num_classes, d))
    for s in _slices(n):
        onehot = np.zeros((s.stop - s.start, num_classes))
        onehot[np.arange(s.stop - s.start), labels[s]] = 1.0
        sums += onehot.T @ _f64(features, s)
    means = sums / counts[:, None]
    scatter = np.zeros((d, d))
    for s in _slices(n):
        x = _f64(features, s)
        x -= means[labels[s]]
        scatter += x.T @ x
    return counts, means, scatter


def _pinv_sqrt(cov: np.ndarray) -> np.ndarray:
    """A (D, r) with A A^T = pinv(cov), from the symmetric eigendecomposition.

    Eigenvalues at or below D * eps * lambda_max count as zero (the rule of ``scipy.linalg.pinvh``; a naive
    inverse fails on the exactly singular covariances that dead ReLU units give). Then
    (h - mu)^T pinv(cov) (h - mu) = ||(h - mu) A||^2."""
    lam, vec = np.linalg.eigh(cov)
    keep = lam > lam.max() * cov.shape[0] * np.finfo(np.float64).eps
    return vec[:, keep] / np.sqrt(lam[keep])


def _sq_distances(features: np.ndarray, center: np.ndarray, whiten: np.ndarray, means_w: np.ndarray) -> np.ndarray:
    """Squared whitened distances ||(h - center) A - m_c||^2 for every class, (N, C), float64, in chunks."""
    m2 = (means_w ** 2).sum(1)

    def block(s):
        x = _f64(features, s)
        x -= center
        g = x @ whiten
        return np.maximum((g ** 2).sum(1)[:, None] - 2.0 * g @ means_w.T + m2, 0.0)

    n = len(features)
    return np.concatenate([block(s) for s in _slices(n)]) if n else np.zeros((0, len(means_w)))


def _percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) of all entries, interpolated in float64.

    Copies the entries once in their own dtype (float32 features: 4 bytes each) and partitions in O(n)."""
    flat = np.array(values, copy=True).ravel()
    pos = q / 100.0 * (flat.size - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    flat.partition([lo, hi] if hi != lo else lo)
    a, b = float(flat[lo]), float(flat[hi])
    return a + (b - a) * (pos - lo)


# ----------------------------------------------------------------------------------------------------------
# Logit detectors (no fit): the functions of ``ood_lib.detectors`` in the registry's signature
def msp(features, logits, head=None, stats=None) -> np.ndarray:
    """Max softmax probability (Hendrycks & Gimpel, ICLR 2017): ``ood_lib.detectors.msp``."""
    return detectors.msp(logits)


def maxlogit(features, logits, head=None, stats=None) -> np.ndarray:
    """Largest logit (Hendrycks et al., ICML 2022): ``ood_lib.detectors.maxlogit``."""
    return detectors.maxlogit(logits)


def energy(features, logits, head=None, stats=None) -> np.ndarray:
    """Negative free energy logsumexp(f(x)), T = 1 (Liu et al., NeurIPS 2020): ``ood_lib.detectors.energy``."""
    return detectors.energy(logits)


# ----------------------------------------------------------------------------------------------------------
# Mahalanobis (Lee et al., NeurIPS 2018), single-layer variant (OpenOOD's MDS)
@dataclass(frozen=True)
class MahalanobisStats:
    center: np.ndarray   # (D,) global training mean, subtracted first (keeps the whitened values small)
    whiten: np.ndarray   # (D, r) A with A A^T = pinv(Sigma)
    means_w: np.ndarray  # (C, r) whitened class means (mu_c - center) A
    means: np.ndarray    # (C, D) class means mu_c
    cov: np.ndarray      # (D, D) tied covariance Sigma


def fit_mahalanobis(train: TrainSet, head: Head) -> MahalanobisStats:
    """Class means mu_c and ONE tied covariance Sigma = 1/N sum_i (h_i - mu_y_i)(h_i - mu_y_i)^T of the ID
    training features (Lee et al., NeurIPS 2018: the maximum-likelihood estimate). Streaming float64
    two-pass fit; Sigma^-1 is the pseudo-inverse (see ``_pinv_sqrt``)."""
    counts, means, scatter = _class_moments(train.features, train.labels, head.weight.shape[0])
    cov = scatter / counts.sum()
    center = counts @ means / counts.sum()
    whiten = _pinv_sqrt(cov)
    return MahalanobisStats(center, whiten, (means - center) @ whiten, means, cov)


def mahalanobis(features, logits, head, stats: MahalanobisStats) -> np.ndarray:
    """-min_c (h - mu_c)^T Sigma^-1 (h - mu_c), the confidence score M(x) of Lee et al. (NeurIPS 2018, Sec. 2) in
    its single-layer variant: the penultimate layer only, no input preprocessing and no feature ensemble
    (OpenOOD v1.5's ``mds``). The Mahalanobis rows of the DICE / LINe / Unleashing Mask tables are the paper's
    full detector instead: several layers, input preprocessing and a logistic-regression combination tuned on
    held-out data (docs/methods.md §5)."""
    return -_sq_distances(features, stats.center, stats.whiten, stats.means_w).min(1)


# ----------------------------------------------------------------------------------------------------------
# Relative Mahalanobis (Ren et al., 2021)
@dataclass(frozen=True)
class RMDSStats:
    classes: MahalanobisStats  # class means and the tied covariance, as ``mahalanobis``
    bg_mean: np.ndarray        # (D,) global mean mu_0
    bg_whiten: np.ndarray      # (D, r0) A_0 with A_0 A_0^T = pinv(Sigma_0)
    bg_cov: np.ndarray         # (D, D) global covariance Sigma_0


def fit_rmds(train: TrainSet, head: Head) -> RMDSStats:
    """The class Gaussians of ``fit_mahalanobis`` plus one background Gaussian N(mu_0, Sigma_0) of all
    training features (Ren et al., 2021, "A simple fix to Mahalanobis distance"). Sigma_0 comes from
    the same pass: total scatter = within-class scatter + sum_c n_c (mu_c - mu_0)(mu_c - mu_0)^T."""
    counts, means, scatter = _class_moments(train.features, train.labels, head.weight.shape[0])
    n = counts.sum()
    mu0 = counts @ means / n
    dm = means - mu0
    cov = scatter / n
    cov0 = (scatter + (dm * counts[:, None]).T @ dm) / n
    whiten = _pinv_sqrt(cov)
    classes = MahalanobisStats(mu0, whiten, dm @ whiten, means, cov)
    return RMDSStats(classes, mu0, _pinv_sqrt(cov0), cov0)


def rmds(features, logits, head, stats: RMDSStats) -> np.ndarray:
    """-min_c [MD_c(h) - MD_0(h)] with MD_0 the squared Mahalanobis distance to the global Gaussian
    (Ren et al., 2021)."""
    c = stats.classes
    md = _sq_distances(features, c.center, c.whiten, c.means_w)
    md0 = _sq_distances(features, stats.bg_mean, stats.bg_whiten, np.zeros((1, stats.bg_whiten.shape[1])))[:, 0]
    return -(md - md0[:, None]).min(1)


# ----------------------------------------------------------------------------------------------------------
# Deep nearest neighbours (Sun et al., ICML 2022)
@dataclass(frozen=True)
class KNNStats:
    bank: np.ndarray  # (N, D) float32 L2-normalised training features
    k: int


def _normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32; all-zero rows stay zero."""
    out = np.empty(features.shape, dtype=np.float32)
    for s in _slices(len(features)):
        x = _f64(features, s)
        out[s] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def fit_knn(train: TrainSet, head: Head, k: int = KNN_K) -> KNNStats:
    """The bank of L2-normalised ID training features z = h / ||h|| (Sun et al., ICML 2022;
    k = 50 is the paper's CIFAR-10 setting, all training samples used)."""
    if not 1 <= k <= len(train.features):
        raise ValueError(f"k = {k} must lie in [1, {len(train.features)}] (the number of training samples)")
    return KNNStats(_normalise(train.features), int(k))


@torch.no_grad()
def knn(features, logits, head, stats: KNNStats) -> np.ndarray:
    """-||z - z_(k)||, the negated distance of the normalised feature z to its k-th nearest normalised
    training feature (Sun et al., ICML 2022). Exact: blocks of float32 similarities z B^T
    (``KNN_QUERY_ROWS`` x ``KNN_BANK_ROWS``) with a running top-k; the k-th neighbour found this way then gets
    its distance recomputed in float64 from the difference vector (no 2 - 2 cos cancellation)."""
    bank = torch.from_numpy(stats.bank)
    k, nb = stats.k, len(stats.bank)
    queries = torch.from_numpy(_normalise(features))
    out = []
    for qs in _slices(len(queries), KNN_QUERY_ROWS):
        q = queries[qs]
        best_v = best_i = None
        for bs in _slices(nb, KNN_BANK_ROWS):
            sim = q @ bank[bs].T
            v, i = sim.topk(min(k, sim.shape[1]), dim=1, sorted=False)
            i += bs.start
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                if v.shape[1] > k:
                    v, j = v.topk(k, dim=1, sorted=False)
                    i = i.gather(1, j)
            best_v, best_i = v, i
        kth = best_i.gather(1, best_v.argmin(1, keepdim=True))[:, 0]
        out.append(torch.linalg.vector_norm(q.double() - bank[kth].double(), dim=1))
    if not out:
        return np.zeros(0)
    return -torch.cat(out).numpy()


# ----------------------------------------------------------------------------------------------------------
# ReAct (Sun et al., NeurIPS 2021)
@dataclass(frozen=True)
class ReActStats:
    threshold: float
    percentile: float | None  # the percentile the threshold came from; None for a fixed threshold


def fit_react(train: TrainSet, head: Head, percentile: float = REACT_PERCENTILE) -> ReActStats:
    """The clipping threshold c: the p-th percentile of ALL penultimate activations of the ID training set,
    every unit of every image pooled (Sun et al., NeurIPS 2021; p = 90)."""
    return ReActStats(_percentile(train.features, percentile), float(percentile))


def fit_react_fixed(train: TrainSet, head: Head, threshold: float = REACT_THRESHOLD) -> ReActStats:
    """A fixed clipping threshold c (``react_1``: c = 1.0), whatever the training activations."""
    return ReActStats(float(threshold), None)


def react(features, logits, head: Head, stats: ReActStats) -> np.ndarray:
    """Energy of the head on clipped features: logsumexp(W min(h, c) + b) (Sun et al., NeurIPS 2021,
    with the energy score, their default)."""
    def block(s):
        x = _f64(features, s)
        np.minimum(x, stats.threshold, out=x)
        return detectors.energy(x @ head.weight.T + head.bias)

    return _rowwise(block, len(features))


# ----------------------------------------------------------------------------------------------------------
# DICE (Sun & Li, ECCV 2022)
@dataclass(frozen=True)
class DICEStats:
    masked_weight: np.ndarray  # (C, D) W * M
    mask: np.ndarray           # (C, D) bool M
    threshold: float           # the p-th percentile of V
    percentile: float
    mean_feature: np.ndarray   # (D,) mean training feature


def fit_dice(train: TrainSet, head: Head, percentile: float = DICE_PERCENTILE) -> DICEStats:
    """Contribution matrix V = W * mean_i h_i (each weight times the mean activation of its input unit over
    ALL training images); mask M keeps the entries of V strictly above the p-th percentile of the whole
    C x D matrix (Sun & Li, ECCV 2022; p = 90, i.e. 10% of the weights survive)."""
    feats = train.features
    mean = sum(_f64(feats, s).sum(0) for s in _slices(len(feats))) / len(feats)
    contrib = head.weight * mean
    threshold = _percentile(contrib, percentile)
    mask = contrib > threshold
    return DICEStats(head.weight * mask, mask, threshold, float(percentile), mean)


def dice(features, logits, head: Head, stats: DICEStats) -> np.ndarray:
    """Energy of the sparsified head: logsumexp((W * M) h + b) (Sun & Li, ECCV 2022, with the energy score)."""
    return _rowwise(lambda s: detectors.energy(_f64(features, s) @ stats.masked_weight.T + head.bias),
                    len(features))


# ----------------------------------------------------------------------------------------------------------
# ViM (Wang et al., CVPR 2022)
@dataclass(frozen=True)
class ViMStats:
    origin: np.ndarray          # (D,) o = -pinv(W) b
    residual_basis: np.ndarray  # (D, D - dim) orthonormal basis of the complement of the principal subspace
    alpha: float
    dim: int


def vim_dim(feature_dim: int) -> int:
    """The principal-subspace dimension of the ViM paper's settings: 1000 if D >= 2048 (e.g. ResNet-50,
    BiT), 512 if D >= 768 (ViT, DeiT, Swin), else D // 2 (our rule for the small CIFAR networks, e.g. 171
    for DenseNet-BC-100's D = 342, 256 for ResNet-18's D = 512)."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def fit_vim(train: TrainSet, head: Head, dim: int | None = None) -> ViMStats:
    """ViM's fit (Wang et al., CVPR 2022): the origin o = -pinv(W) b (the logits of o are zero); the principal
    subspace P = the top-``dim`` eigenvectors of sum_i (h_i - o)(h_i - o)^T (the training features centred
    at o, the paper's offset, not at their mean); and alpha = mean_i max_c logit_ic / mean_i ||(h_i - o)^{P-perp}||
    over the training set. ``dim`` None: ``vim_dim(D)``. The residual basis is recomputed from ``dim`` on every
    call (OpenOOD's sweep once reused the first one, PR #298)."""
    feats = train.features
    d = feats.shape[1]
    dim = vim_dim(d) if dim is None else int(dim)
    if not 0 < dim < d:
        raise ValueError(f"ViM dim must lie in (0, {d}), got {dim}")
    origin = -np.linalg.pinv(head.weight) @ head.bias
    moment = np.zeros((d, d))
    for s in _slices(len(feats)):
        x = _f64(feats, s)
        x -= origin
        moment += x.T @ x
    _, vec = np.linalg.eigh(moment)        # ascending eigenvalues
    basis = np.ascontiguousarray(vec[:, : d - dim])
    stats = ViMStats(origin, basis, 1.0, dim)
    residual = _vim_residual(feats, stats)
    max_logit = _rowwise(lambda s: _f64(train.logits, s).max(1), len(feats))
    alpha = float(max_logit.mean() / residual.mean())
    return ViMStats(origin, basis, alpha, dim)


def _vim_residual(features, stats: ViMStats) -> np.ndarray:
    def block(s):
        x = _f64(features, s)
        x -= stats.origin
        r = x @ stats.residual_basis
        return np.sqrt(np.einsum("ij,ij->i", r, r))

    return _rowwise(block, len(features))


def vim(features, logits, head, stats: ViMStats) -> np.ndarray:
    """logsumexp(logits) - alpha ||(h - o)^{P-perp}||: the energy minus the virtual logit (Wang et al.,
    CVPR 2022: their softmax of the virtual logit is a monotone function of this difference)."""
    return detectors.energy(logits) - stats.alpha * _vim_residual(features, stats)


# ----------------------------------------------------------------------------------------------------------
# Logit/feature detectors without a fit
def gradnorm(features, logits, head=None, stats=None, temperature: float = GRADNORM_TEMPERATURE) -> np.ndarray:
    """||d KL(u || softmax(f/T)) / dW||_1 for the head weights W (Huang et al., NeurIPS 2021; T = 1).

    Closed form: with p = softmax(z / T), z = W h + b and u = 1/C, KL(u || p) = -log C - 1/C sum_c log p_c, so
    dKL/dz_j = (p_j - u_j) / T and dKL/dW = (p - u) h^T / T, an outer product whose L1 norm factorises:
        ||p - u||_1 * ||h||_1 / T.
    Only the weights count (the paper's choice), not the bias."""
    def block(s):
        z = _f64(logits, s) / temperature
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return np.abs(p - 1.0 / z.shape[1]).sum(1) * np.abs(_f64(features, s)).sum(1) / temperature

    return _rowwise(block, len(logits))


def gen(features, logits, head=None, stats=None, gamma: float = GEN_GAMMA, m: int = GEN_M) -> np.ndarray:
    """Generalized entropy: -sum over the M largest probabilities of p^gamma (1 - p)^gamma (Liu et al.,
    CVPR 2023; gamma = 0.1, M = min(100, C)).

    1 - p is computed as (sum of the other exponentials) / (sum of all), so confident rows do not round to
    1 - p = 0 and tie: no clamping is needed."""
    def block(s):
        z = _f64(logits, s)
        e = np.exp(z - z.max(1, keepdims=True))
        e = -np.sort(-e, axis=1)                       # descending: e[:, 0] == 1, the arg-max class
        total = e.sum(1, keepdims=True)
        top = e[:, : min(m, e.shape[1])]
        rest = total - top
        rest[:, 0] = e[:, 1:].sum(1)                   # exact for the largest probability
        p, q = top / total, rest / total
        return -(p ** gamma * q ** gamma).sum(1)

    return _rowwise(block, len(logits))


# ----------------------------------------------------------------------------------------------------------
# The registry (the short names used in results) and one convenience call
POSTHOC: dict[str, PostHoc] = {p.name: p for p in [
    PostHoc("msp", None, msp, "Hendrycks & Gimpel, ICLR 2017"),
    PostHoc("maxlogit", None, maxlogit, "Hendrycks et al., ICML 2022"),
    PostHoc("energy", None, energy, "Liu et al., NeurIPS 2020"),
    PostHoc("mahalanobis", fit_mahalanobis, mahalanobis,
            "Lee et al., NeurIPS 2018, single layer, no input preprocessing (OpenOOD's MDS)"),
    PostHoc("rmds", fit_rmds, rmds, "Ren et al., arXiv 2021"),
    PostHoc("knn", functools.partial(fit_knn, k=KNN_K), knn, "Sun et al., ICML 2022"),
    PostHoc("react", functools.partial(fit_react, percentile=REACT_PERCENTILE), react, "Sun et al., NeurIPS 2021"),
    PostHoc("react_1", functools.partial(fit_react_fixed, threshold=REACT_THRESHOLD), react,
            "Sun et al., NeurIPS 2021, clipped at 1.0 as in the LINe / Unleashing Mask CIFAR code"),
    PostHoc("dice", functools.partial(fit_dice, percentile=DICE_PERCENTILE), dice, "Sun & Li, ECCV 2022"),
    PostHoc("vim", functools.partial(fit_vim, dim=None), vim, "Wang et al., CVPR 2022"),
    PostHoc("gradnorm", None, functools.partial(gradnorm, temperature=GRADNORM_TEMPERATURE),
            "Huang et al., NeurIPS 2021"),
    PostHoc("gen", None, functools.partial(gen, gamma=GEN_GAMMA, m=GEN_M), "Liu et al., CVPR 2023"),
]}


def fit_and_score(name: str, train: TrainSet, head: Head,
                  sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Fit ``POSTHOC[name]`` once on ``train`` and score every ``(features, logits)`` of ``sets``, by set name."""
    det = POSTHOC[name]
    stats = det.fit(train, head) if det.fit is not None else None
    return {key: np.asarray(det.score(f, z, head, stats), dtype=np.float64) for key, (f, z) in sets.items()}


# Detectors defined in other modules register themselves in ``POSTHOC`` when imported; import them here so that
# ``from ood_lib.posthoc import POSTHOC`` sees every detector. (A module that imports this one first gets this
# module fully initialised before its own registration runs, so the cycle is harmless.)
for _module in ("ood_lib.line",):
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module)
