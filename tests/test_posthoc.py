"""Post-hoc detectors (ood_lib.posthoc): each against an independent computation, the sign convention on
separable data, streaming fits, and cross-checks with pytorch-ood where the definitions coincide."""
import math
import tracemalloc

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from scipy.special import logsumexp, softmax
from sklearn.neighbors import NearestNeighbors

from ood_lib import detectors, metrics
from ood_lib import posthoc as ph
from ood_lib.models import resnet_small

NAMES = {"msp", "maxlogit", "energy", "mahalanobis", "rmds", "knn", "react", "react_1", "dice", "vim", "gradnorm",
         "gen"}


def _problem(seed=0, n=400, d=12, c=4, n_test=60):
    """Gaussian classes with a correlated noise, a random head; float32 features as in a feature cache."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 2.0, (c, d))
    mix = rng.normal(size=(d, d)) / math.sqrt(d) + np.eye(d)
    labels = np.r_[np.arange(c), rng.integers(0, c, n - c)]
    feats = (means[labels] + rng.normal(size=(n, d)) @ mix).astype(np.float32)
    # weights exactly representable in float32, so that pytorch-ood's float32 copies are the same numbers
    head = ph.Head(rng.normal(size=(c, d)).astype(np.float32), rng.normal(size=c).astype(np.float32))
    train = ph.TrainSet(feats, head.logits(feats).astype(np.float32), labels)
    test_labels = rng.integers(0, c, n_test)
    test = (means[test_labels] + 1.5 * rng.normal(size=(n_test, d)) @ mix).astype(np.float32)
    return train, head, test, head.logits(test)


def _energy(z):
    return logsumexp(z, axis=1)


# --------------------------------------------------------------------------------------------------------
# Interface
def test_head_of_model_reproduces_forward():
    torch.manual_seed(0)
    model = resnet_small(num_classes=5, width=4, blocks=(1, 1, 1)).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        feats, logits = model.features(x).numpy(), model(x).double().numpy()
    head = ph.Head.of(model)
    assert head.weight.dtype == np.float64 and head.weight.shape == (5, 16) and head.bias.shape == (5,)
    np.testing.assert_allclose(head.logits(feats), logits, rtol=1e-5, atol=1e-5)
    head.weight[0, 0] += 1.0  # a copy: the model is untouched
    assert model.fc.weight[0, 0].item() != head.weight[0, 0]


def test_registry_names_signatures_and_fit_and_score():
    assert NAMES <= set(ph.POSTHOC)  # other modules (ood_lib.line) add their own detectors
    train, head, test, test_logits = _problem()
    for name in sorted(NAMES):
        det = ph.POSTHOC[name]
        assert det.name == name and det.paper and any(str(y) in det.paper for y in range(2017, 2024)), name
        assert (det.fit is None) == (name in {"msp", "maxlogit", "energy", "gradnorm", "gen"}), name
        stats = det.fit(train, head) if det.fit else None
        s = det.score(test, test_logits, head, stats)
        assert s.dtype == np.float64 and s.shape == (len(test),) and np.isfinite(s).all(), name
        both = ph.fit_and_score(name, train, head, {"a": (test, test_logits), "b": (test[:5], test_logits[:5])})
        assert set(both) == {"a", "b"}
        np.testing.assert_array_equal(both["a"], s)
        np.testing.assert_allclose(both["b"], s[:5], rtol=1e-12)
        assert det.score(test[:0], test_logits[:0], head, stats).shape == (0,), name


def test_logit_wrappers_on_hand_computed_logits():
    """The registry's msp / maxlogit / energy on logits whose softmax is exact by hand: exp(z) = (1, 1, 1, 1),
    (3, 1, 1, 1) and e^5 (1, 1, 1, 1); a logit of 1000 (exp overflows float64) must give 1 and 1000. The features
    and head are not used (zeros and None)."""
    z = np.array([[0.0, 0, 0, 0], [math.log(3), 0, 0, 0], [5.0, 5, 5, 5], [0, 1000.0, 0, 0]])
    feats = np.zeros((4, 12))
    expected = {"msp": [0.25, 0.5, 0.25, 1.0],
                "maxlogit": [0.0, math.log(3), 5.0, 1000.0],
                "energy": [math.log(4), math.log(6), 5 + math.log(4), 1000.0]}  # 1000 + log(1 + 3e-1000)
    for name, want in expected.items():
        got = ph.POSTHOC[name].score(feats, z, None, None)
        assert got.dtype == np.float64 and got.shape == (4,), name
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0, err_msg=name)
    # and on the random problem, against scipy's softmax / logsumexp
    _, head, test, z = _problem(seed=3)
    np.testing.assert_allclose(ph.POSTHOC["msp"].score(test, z, head, None), softmax(z, axis=1).max(1), rtol=1e-12)
    np.testing.assert_array_equal(ph.POSTHOC["maxlogit"].score(test, z, head, None), np.max(z, axis=1))
    np.testing.assert_allclose(ph.POSTHOC["energy"].score(test, z, head, None), logsumexp(z, axis=1), rtol=1e-12)


def test_fit_rejects_missing_classes_and_bad_labels():
    train, head, _, _ = _problem()
    keep = train.labels != 2
    missing = ph.TrainSet(train.features[keep], train.logits[keep], train.labels[keep])
    with pytest.raises(ValueError, match=r"classes without training samples: \[2\]"):
        ph.fit_mahalanobis(missing, head)
    with pytest.raises(ValueError, match="labels must be integers"):
        ph.TrainSet(train.features, train.logits, train.labels.astype(float))
    with pytest.raises(ValueError, match="k = 401"):
        ph.fit_knn(train, head, k=401)


# --------------------------------------------------------------------------------------------------------
# Mahalanobis and RMDS against scipy's per-sample distance
def _pooled_cov(x, y):
    return sum(np.cov(x[y == c].T, bias=True) * (y == c).sum() for c in np.unique(y)) / len(y)


def test_mahalanobis_matches_scipy_per_sample():
    train, head, test, z = _problem()
    x, y = train.features.astype(np.float64), train.labels
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    vi = np.linalg.inv(_pooled_cov(x, y))
    ref = [-min(scipy_mahalanobis(h, mu, vi) ** 2 for mu in means) for h in test.astype(np.float64)]
    stats = ph.fit_mahalanobis(train, head)
    np.testing.assert_allclose(stats.cov, _pooled_cov(x, y), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ph.mahalanobis(test, z, head, stats), ref, rtol=1e-9)


def test_rmds_matches_scipy_per_sample():
    train, head, test, z = _problem(seed=1)
    x, y = train.features.astype(np.float64), train.labels
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    vi = np.linalg.inv(_pooled_cov(x, y))
    vi0 = np.linalg.inv(np.cov(x.T, bias=True))
    mu0 = x.mean(0)
    ref = [-min(scipy_mahalanobis(h, mu, vi) ** 2 - scipy_mahalanobis(h, mu0, vi0) ** 2 for mu in means)
           for h in test.astype(np.float64)]
    np.testing.assert_allclose(ph.rmds(test, z, head, ph.fit_rmds(train, head)), ref, rtol=1e-8, atol=1e-9)


def test_mahalanobis_uses_a_pseudo_inverse_on_singular_covariances():
    """A dead unit (always 0) and a duplicated unit make Sigma singular: no inf/NaN, and the score equals the
    distance with numpy's SVD-based pinv."""
    train, head, test, _ = _problem(seed=2)
    f = train.features.copy()
    f[:, 0] = 0.0
    f[:, 1] = f[:, 2]
    w = np.c_[head.weight, np.zeros(4)]
    head2 = ph.Head(w, head.bias)
    f = np.c_[f, f[:, 3] - f[:, 4]].astype(np.float32)  # and a linear combination
    train2 = ph.TrainSet(f, head2.logits(f), train.labels)
    t = test.copy()
    t[:, 0], t[:, 1] = 0.0, t[:, 2]
    t = np.c_[t, t[:, 3] - t[:, 4]]
    x, y = f.astype(np.float64), train.labels
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    cov = _pooled_cov(x, y)
    assert np.linalg.matrix_rank(cov) == cov.shape[0] - 3
    vi = np.linalg.pinv(cov, rcond=1e-10, hermitian=False)
    ref = [-min(scipy_mahalanobis(h, mu, vi) ** 2 for mu in means) for h in t.astype(np.float64)]
    got = ph.mahalanobis(t, head2.logits(t), head2, ph.fit_mahalanobis(train2, head2))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "vim", "dice", "knn", "react"])
def test_fits_do_not_depend_on_the_chunk_size(monkeypatch, name):
    train, head, test, z = _problem(seed=3)
    det = ph.POSTHOC[name]
    big = det.score(test, z, head, det.fit(train, head))
    monkeypatch.setattr(ph, "CHUNK_ROWS", 7)
    monkeypatch.setattr(ph, "KNN_QUERY_ROWS", 5)
    monkeypatch.setattr(ph, "KNN_BANK_ROWS", 3)  # smaller than k: the running top-k must still be exact
    small = det.score(test, z, head, det.fit(train, head))
    np.testing.assert_allclose(small, big, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds", "vim", "dice"])
def test_fits_stream_in_float64_without_a_full_copy(monkeypatch, name):
    """With chunks of 1000 rows, the peak extra memory of a fit on 20k x 64 float32 features stays under a
    quarter of one float64 copy of them: memory grows with the chunk, not with N."""
    monkeypatch.setattr(ph, "CHUNK_ROWS", 1000)
    rng = np.random.default_rng(0)
    n, d, c = 20000, 64, 10
    f = rng.normal(size=(n, d)).astype(np.float32)
    head = ph.Head(rng.normal(size=(c, d)), rng.normal(size=c))
    train = ph.TrainSet(f, head.logits(f).astype(np.float32), rng.integers(0, c, n))
    ph.POSTHOC[name].fit(train, head)  # warm-up: lazy imports and caches out of the measurement
    tracemalloc.start()
    try:
        ph.POSTHOC[name].fit(train, head)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * d * 8 / 4, f"{name}: peak {peak / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------------------
# KNN against scikit-learn
@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_matches_sklearn_on_normalised_features(k):
    train, head, test, z = _problem(seed=4)
    x = train.features.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = test.astype(np.float64) / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
    dist, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(q)
    got = ph.knn(test, z, head, ph.fit_knn(train, head, k=k))
    np.testing.assert_allclose(got, -dist[:, -1], atol=1e-6)
    assert ph.fit_knn(train, head).k == ph.KNN_K == 50


def test_knn_is_scale_invariant_and_finite_on_zero_features():
    train, head, test, z = _problem(seed=5)
    stats = ph.fit_knn(train, head)
    np.testing.assert_allclose(ph.knn(7.0 * test, z, head, stats), ph.knn(test, z, head, stats), atol=1e-6)
    zero = np.zeros((2, test.shape[1]), dtype=np.float32)
    np.testing.assert_allclose(ph.knn(zero, z[:2], head, stats), -1.0, atol=1e-6)  # |0 - unit vector| = 1


# --------------------------------------------------------------------------------------------------------
# ReAct and DICE against numpy percentiles and explicit loops
def test_react_matches_numpy_percentile_and_energy():
    train, head, test, z = _problem(seed=6)
    thr = np.percentile(train.features.astype(np.float64), 90)
    stats = ph.fit_react(train, head)
    assert stats.threshold == pytest.approx(thr, rel=1e-12)
    assert np.mean(train.features > stats.threshold) == pytest.approx(0.10, abs=0.002)
    ref = _energy(np.minimum(test.astype(np.float64), thr) @ head.weight.T + head.bias)
    np.testing.assert_allclose(ph.react(test, z, head, stats), ref, rtol=1e-10)
    s85 = ph.fit_react(train, head, percentile=85)
    assert s85.threshold == pytest.approx(np.percentile(train.features.astype(np.float64), 85), rel=1e-12)


def test_react_1_is_energy_of_features_clipped_at_one():
    """react_1: logsumexp of the head on min(h, 1.0), whatever the training activations; it differs from react's
    percentile rule when the 90th percentile is not 1.0."""
    train, head, test, z = _problem(seed=6)
    det = ph.POSTHOC["react_1"]
    stats = det.fit(train, head)
    assert stats.threshold == 1.0 and stats.percentile is None
    h = test.astype(np.float64)
    ref = [logsumexp([sum(head.weight[k, j] * min(h[i, j], 1.0) for j in range(h.shape[1])) + head.bias[k]
                      for k in range(head.weight.shape[0])]) for i in range(len(h))]
    np.testing.assert_allclose(det.score(test, z, head, stats), ref, rtol=1e-10)
    assert (test > 1.0).any() and (test < 1.0).any()  # the clip is active and not everything is clipped
    shifted = ph.TrainSet(train.features * 5, train.logits, train.labels)
    assert det.fit(shifted, head).threshold == 1.0  # fixed: the fit ignores the training activations
    assert ph.fit_react(train, head).threshold != pytest.approx(1.0, abs=0.05)
    react = ph.fit_and_score("react", train, head, {"t": (test, z)})["t"]
    assert np.abs(det.score(test, z, head, stats) - react).max() > 0.1


def test_dice_matches_loops():
    train, head, test, z = _problem(seed=7)
    c, d = head.weight.shape
    mean = train.features.astype(np.float64).mean(0)
    v = np.array([[head.weight[i, j] * mean[j] for j in range(d)] for i in range(c)])
    thr = np.percentile(v.ravel(), 90)
    keep = [[v[i, j] > thr for j in range(d)] for i in range(c)]
    ref_logits = np.array([[sum(head.weight[i, j] * h[j] for j in range(d) if keep[i][j]) + head.bias[i]
                            for i in range(c)] for h in test.astype(np.float64)])
    stats = ph.fit_dice(train, head)
    np.testing.assert_allclose(stats.mean_feature, mean, rtol=1e-12)
    np.testing.assert_array_equal(stats.mask, np.array(keep))
    assert stats.mask.sum() == c * d - math.floor(0.9 * (c * d - 1)) - 1  # entries above the interpolated 90%
    np.testing.assert_allclose(ph.dice(test, z, head, stats), _energy(ref_logits), rtol=1e-10)


# --------------------------------------------------------------------------------------------------------
# ViM against an SVD of the offset training features
def _vim_reference(train, head, test, test_logits, dim):
    x = train.features.astype(np.float64)
    origin = np.linalg.lstsq(head.weight, -head.bias, rcond=None)[0]  # minimum-norm o with W o + b = 0
    _, _, vt = np.linalg.svd(x - origin, full_matrices=False)
    p = vt[:dim]

    def residual(h):
        r = h - origin
        return np.linalg.norm(r - (r @ p.T) @ p, axis=1)

    alpha = train.logits.astype(np.float64).max(1).mean() / residual(x).mean()
    return _energy(test_logits) - alpha * residual(test.astype(np.float64))


def test_vim_matches_svd_reference_and_dim_changes_the_scores():
    train, head, test, z = _problem(seed=8)
    got = {}
    for dim in (3, 6):
        stats = ph.fit_vim(train, head, dim=dim)
        assert stats.dim == dim and stats.residual_basis.shape == (12, 12 - dim)
        got[dim] = ph.vim(test, z, head, stats)
        np.testing.assert_allclose(got[dim], _vim_reference(train, head, test, z, dim), rtol=1e-8, atol=1e-8)
    assert np.abs(got[3] - got[6]).max() > 1e-2  # OpenOOD's sweep once kept the first subspace (PR #298)
    np.testing.assert_allclose(ph.vim(test, z, head, ph.fit_vim(train, head)), got[6], rtol=1e-12)  # 12 // 2


def test_vim_dimension_rule():
    assert [ph.vim_dim(d) for d in (4096, 2048, 2047, 1024, 768, 767, 512, 342, 128)] == \
        [1000, 1000, 512, 512, 512, 383, 256, 171, 64]
    train, head, _, _ = _problem()
    with pytest.raises(ValueError, match="ViM dim"):
        ph.fit_vim(train, head, dim=12)


# --------------------------------------------------------------------------------------------------------
# GradNorm against autograd, GEN against a loop in high precision
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_matches_autograd_on_a_linear_head(temperature):
    train, head, test, z = _problem(seed=9)
    fc = torch.nn.Linear(12, 4).double()
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(head.weight))
        fc.bias.copy_(torch.from_numpy(head.bias))
    ref = []
    for h in torch.from_numpy(test.astype(np.float64)):
        fc.zero_grad()
        logp = F.log_softmax(fc(h[None]) / temperature, dim=1)
        uniform = torch.full_like(logp, 1.0 / 4)
        F.kl_div(logp, uniform, reduction="sum").backward()  # KL(u || softmax)
        ref.append(fc.weight.grad.abs().sum().item())
    got = ph.gradnorm(test, head.logits(test), head, None, temperature=temperature)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def _gen_reference(row, gamma, m):
    """Exact in 50-digit arithmetic: no rounding of 1 - p for confident rows."""
    with mpmath.workdps(50):
        e = [mpmath.exp(mpmath.mpf(float(v))) for v in row]
        total = mpmath.fsum(e)
        p = sorted((x / total for x in e), reverse=True)[:m]
        return float(-mpmath.fsum(x ** gamma * (1 - x) ** gamma for x in p))


@pytest.mark.parametrize("gamma,m", [(0.1, 100), (0.1, 2), (0.5, 3)])
def test_gen_matches_high_precision_loop(gamma, m):
    _, head, test, z = _problem(seed=10)
    z = np.r_[z, [[60.0, 0.0, -1.0, 0.5], [45.0, 45.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]  # confident, tied, flat
    ref = [_gen_reference(row, gamma, m) for row in z]
    np.testing.assert_allclose(ph.gen(None, z, head, None, gamma=gamma, m=m), ref, rtol=1e-12)


def test_gen_default_uses_all_classes_up_to_100():
    z = np.random.default_rng(0).normal(size=(5, 7)) * 3
    p = softmax(z, axis=1)
    np.testing.assert_allclose(ph.POSTHOC["gen"].score(None, z, None, None),
                               -(p ** 0.1 * (1 - p) ** 0.1).sum(1), rtol=1e-12)


# --------------------------------------------------------------------------------------------------------
# The sign convention: ID clusters vs far OOD points
def _separable(seed=0, per_class=150, c=4, block=12, extra=8):
    """ID: class k is active on its own block of units (a fixed pattern times a per-sample gain), quiet
    (|N(0, 0.05)|) elsewhere; the head reads each class off its block with random positive weights. OOD 'far':
    large activations on units that ID never uses; 'quiet': nothing active. Both OOD sets give flat logits."""
    rng = np.random.default_rng(seed)
    d = c * block + extra
    patterns = rng.uniform(0.5, 1.5, (c, block))

    def quiet(n):
        return np.abs(rng.normal(0.0, 0.05, (n, d)))

    def id_set(n):
        y = rng.integers(0, c, n)
        h = quiet(n)
        for i, k in enumerate(y):
            h[i, k * block:(k + 1) * block] += rng.uniform(0.7, 1.3) * patterns[k]
        return h.astype(np.float32), y

    w = np.zeros((c, d))
    for k in range(c):
        w[k, k * block:(k + 1) * block] = rng.uniform(0.5, 1.5, block)
    head = ph.Head(w, np.array([0.1, -0.1, 0.2, 0.0]))
    f, y = id_set(c * per_class)
    train = ph.TrainSet(f, head.logits(f).astype(np.float32), y)
    test, _ = id_set(300)
    far = quiet(300)
    far[:, c * block:] = 8.0 + np.abs(rng.normal(0.0, 1.0, (300, extra)))
    return train, head, test, {"far": far.astype(np.float32), "quiet": quiet(300).astype(np.float32)}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_sign_convention_id_scores_higher_on_separable_data(name):
    train, head, test, oods = _separable()
    sets = {"id": (test, head.logits(test)), **{k: (v, head.logits(v)) for k, v in oods.items()}}
    scores = ph.fit_and_score(name, train, head, sets)
    for ood in oods:
        assert metrics.auroc(scores["id"], scores[ood]) > 0.9, (name, ood)


# --------------------------------------------------------------------------------------------------------
# Cross-checks with pytorch-ood (outlier scores: higher = more OOD, so ours = -theirs up to a positive factor)
@pytest.fixture
def pood():
    return pytest.importorskip("pytorch_ood", reason="pytorch-ood is not installed (requirements.txt, # Tests)")


@pytest.fixture
def float64_default():
    """pytorch-ood's Mahalanobis/RMD allocate means and covariances in torch's default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_pytorch_ood_logit_detectors_agree(pood):
    from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax
    _, head, test, z = _problem(seed=11)
    np.testing.assert_allclose(ph.msp(test, z, head, None), -MaxSoftmax.score(_t(z)).numpy(), atol=1e-12)
    np.testing.assert_allclose(ph.maxlogit(test, z, head, None), -MaxLogit.score(_t(z)).numpy(), atol=1e-12)
    np.testing.assert_allclose(ph.energy(test, z, head, None), -EnergyBased.score(_t(z)).numpy(), atol=1e-12)


def test_pytorch_ood_mahalanobis_and_rmd_agree_up_to_their_scale(pood, float64_default):
    """Its Mahalanobis returns 0.5 * min_c MD_c with the scatter matrix S = N * Sigma (not divided by N) plus a
    1e-6 ridge, so ours = -2N * theirs; its RMD returns min_c [MD_c - MD_0] with the same S, so ours = -N * theirs.
    The ridge is 1e-6 / (N * var) relative: below the tolerance."""
    from pytorch_ood.detector import RMD, Mahalanobis
    train, head, test, z = _problem(seed=12)
    n = len(train.labels)
    zt, yt = _t(train.features), torch.from_numpy(train.labels)
    theirs = Mahalanobis(None).fit_features(zt, yt).predict_features(_t(test)).numpy()
    np.testing.assert_allclose(ph.mahalanobis(test, z, head, ph.fit_mahalanobis(train, head)), -2 * n * theirs,
                               atol=1e-5)
    theirs = RMD(None).fit_features(zt, yt).predict_features(_t(test)).numpy()
    np.testing.assert_allclose(ph.rmds(test, z, head, ph.fit_rmds(train, head)), -n * theirs, atol=1e-5)


def test_pytorch_ood_knn_agrees_with_paper_settings_and_differs_with_v02_settings(pood):
    """pytorch-ood 0.4 normalises and defaults to k = 50, as the paper and we do: the scores agree.
    Its v0.2.0 KNN used k = 1 on raw features: a different detector, which we check is not what we compute
    (ours is checked against scikit-learn on normalised features above)."""
    from pytorch_ood.detector import KNN
    train, head, test, z = _problem(seed=13)
    zt, yt = _t(train.features), torch.from_numpy(train.labels)
    ours = ph.knn(test, z, head, ph.fit_knn(train, head))
    theirs = KNN(None).fit_features(zt, yt).predict_features(_t(test)).numpy()
    assert KNN(None).k == 50 and KNN(None).normalize
    np.testing.assert_allclose(ours, -theirs, atol=1e-5)
    old = KNN(None, k=1, normalize=False).fit_features(zt, yt).predict_features(_t(test)).numpy()
    assert np.abs(ours + old).max() > 0.1


def test_pytorch_ood_react_agrees_with_a_fitted_percentile(pood):
    """pytorch-ood 0.4 fits the threshold as the percentile of all ID activations, as the paper: the scores agree.
    With a fixed threshold (v0.2.0: 1.0) the clip differs, so its scores differ from the paper's detector."""
    from pytorch_ood.detector import ReAct
    train, head, test, z = _problem(seed=14)
    w, b = _t(head.weight), _t(head.bias)
    det = ReAct(backbone=lambda x: x, head=lambda h: h @ w.T + b, percentile=0.9)
    det.fit_feature_maps(_t(train.features), torch.from_numpy(train.labels))
    stats = ph.fit_react(train, head)
    assert det.threshold == pytest.approx(stats.threshold, rel=1e-12)
    ours = ph.react(test, z, head, stats)
    np.testing.assert_allclose(ours, -det.predict_feature_maps(_t(test)).numpy(), atol=1e-10)
    fixed = ReAct(backbone=lambda x: x, head=lambda h: h @ w.T + b, threshold=1.0)
    assert np.abs(ours + fixed.predict_feature_maps(_t(test)).numpy()).max() > 0.1


def test_pytorch_ood_dice_agrees(pood):
    """Same mask rule (contributions strictly above the linear-interpolated p-quantile); pytorch-ood forms the
    mask in float32, so the test head is float32-exact."""
    from pytorch_ood.detector import DICE
    train, head, test, z = _problem(seed=15)
    det = DICE(None, w=_t(head.weight), b=_t(head.bias), p=0.9)
    det.fit_features(_t(train.features), torch.from_numpy(train.labels))
    stats = ph.fit_dice(train, head)
    np.testing.assert_array_equal(det.masked_w.numpy() != 0, stats.mask)
    np.testing.assert_allclose(ph.dice(test, z, head, stats), -det.predict_features(_t(test)).numpy(), atol=1e-10)


def test_pytorch_ood_vim_agrees_to_float32_precision(pood):
    """Same origin, subspace (top-d eigenvectors of the offset second moment), alpha and score; pytorch-ood
    computes in float32 (it casts W, b and the features), hence the tolerance."""
    from pytorch_ood.detector import ViM
    train, head, test, z = _problem(seed=16)
    for dim in (3, 6):
        det = ViM(None, d=dim, w=_t(head.weight), b=_t(head.bias))
        det.fit_features(_t(train.features), torch.from_numpy(train.labels))
        stats = ph.fit_vim(train, head, dim=dim)
        assert det.alpha == pytest.approx(stats.alpha, rel=1e-5)
        np.testing.assert_allclose(ph.vim(test, z, head, stats), -det.predict_features(_t(test)).numpy(),
                                   atol=1e-5, rtol=1e-5)


def test_pytorch_ood_gradnorm_agrees(pood):
    """Its GradNorm differentiates the cross-entropy to the uniform distribution (= KL(u || p) + const) with
    autograd per sample; with the head as the model and only its weight selected, it is our closed form."""
    from pytorch_ood.detector import GradNorm
    _, head, test, z = _problem(seed=17)
    fc = torch.nn.Linear(12, 4).double()
    with torch.no_grad():
        fc.weight.copy_(_t(head.weight))
        fc.bias.copy_(_t(head.bias))
    theirs = GradNorm(fc, param_filter=lambda name: name == "weight").predict(_t(test)).numpy()
    np.testing.assert_allclose(ph.gradnorm(test, head.logits(test), head, None), -theirs, rtol=1e-10)


def test_pytorch_ood_gen_agrees_up_to_its_mean(pood):
    """Its GEN averages over the top M (ours sums, as the paper: a factor M) and clamps p to [1e-7, 1 - 1e-7]
    (ours computes 1 - p exactly instead); on logits where no probability reaches the clamp they agree."""
    from pytorch_ood.detector import GEN
    _, head, test, z = _problem(seed=18)
    z = z / np.abs(z).max() * 5.0  # no probability within 1e-7 of 0 or 1
    for m in (2, 4):
        theirs = GEN.score(_t(z), gamma=0.1, M=m).numpy()
        np.testing.assert_allclose(ph.gen(test, z, head, None, m=m), -m * theirs, atol=1e-10)
