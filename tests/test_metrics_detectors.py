"""Metrics against scikit-learn and hand-computed cases; detectors against closed forms; the sign convention."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ood_lib import detectors, metrics


def _sk_fpr_at_95(pos, neg):
    """FPR at the first ROC point with TPR >= 0.95, positives scored high (scikit-learn's ROC)."""
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tpr, _ = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    return fpr[np.searchsorted(tpr, 0.95 - 1e-12, side="left")]


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_metrics_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(50, 400, size=2)
    a = rng.normal(1.0, 1.0, n_id)
    b = rng.normal(0.0, 1.5, n_ood)
    if ties:  # coarse scores: many ties within and across sets
        a, b = np.round(a), np.round(b)
    y = np.r_[np.ones(n_id), np.zeros(n_ood)]
    s = np.r_[a, b]
    assert metrics.auroc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert metrics.aupr_in(a, b) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert metrics.aupr_out(a, b) == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert metrics.fpr95(a, b) == pytest.approx(_sk_fpr_at_95(a, b), abs=1e-12)
    assert metrics.fpr95_id(a, b) == pytest.approx(_sk_fpr_at_95(-b, -a), abs=1e-12)


def test_hand_computed_case_with_ties():
    # 20 ID scores 1..20, OOD scores below, at, and above the threshold.
    id_s = np.arange(1, 21, dtype=float)
    # 95% of 20 ID = 19 kept: threshold t = 2 (ID >= 2 are 19 of 20).
    ood_s = np.array([0.0, 1.0, 2.0, 2.0, 3.0, 25.0, -1.0, 1.5])
    # OOD at or above t = 2: {2, 2, 3, 25} -> 4 / 8
    assert metrics.fpr95(id_s, ood_s) == 0.5
    # fpr95_id: lowest t catching >= 95% of 8 OOD (score <= t): need 8 (7.6 rounds up) -> t = 25; all ID <= 25
    assert metrics.fpr95_id(id_s, ood_s) == 1.0
    # AUROC by counting pairs: ties are worth one half.
    wins = sum((i > o) + 0.5 * (i == o) for i in id_s for o in ood_s)
    assert metrics.auroc(id_s, ood_s) == pytest.approx(wins / (20 * 8))


def test_perfect_and_reversed_separation():
    id_s, ood_s = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0])
    m = metrics.all_metrics(id_s, ood_s)
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_id": 0.0}
    r = metrics.all_metrics(ood_s, id_s)  # ID now scores LOW: the worst detector
    assert r["auroc"] == 0.0 and r["fpr95"] == 1.0 and r["fpr95_id"] == 1.0


def test_aupr_in_and_out_are_not_swapped():
    # Few OOD, many ID: AUPR-In (ID positive) of a random detector is near the ID fraction, AUPR-Out near the OOD one.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=9000), rng.normal(size=1000)
    assert metrics.aupr_in(a, b) == pytest.approx(0.9, abs=0.02)
    assert metrics.aupr_out(a, b) == pytest.approx(0.1, abs=0.02)


def test_metrics_reject_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="need ID and OOD"):
        metrics.fpr95([], [0.0])


def test_logit_detectors_closed_forms():
    z = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1000.0, 999.0, 0.0]])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(detectors.msp(z), p.max(1), rtol=1e-12)
    np.testing.assert_allclose(detectors.maxlogit(z), [2.0, 0.5, 1000.0])
    expected_energy = [np.log(np.exp(2) + 1 + np.exp(-1)), 0.5 + np.log(3), 1000 + np.log(1 + np.exp(-1) + np.exp(-1000))]
    np.testing.assert_allclose(detectors.energy(z), expected_energy, rtol=1e-12)
    t = 10.0
    np.testing.assert_allclose(detectors.energy(z[:2], temperature=t), t * np.log(np.exp(z[:2] / t).sum(1)), rtol=1e-12)


def test_sign_convention_confident_scores_higher():
    """Pins STUDY §6: a peaked (ID-like) logit vector scores higher than a flat (OOD-like) one, for every detector."""
    peaked, flat = np.array([[8.0, 0.0, 0.0]]), np.array([[1.0, 1.0, 1.0]])
    for name, fn in detectors.LOGIT_DETECTORS.items():
        assert fn(peaked)[0] > fn(flat)[0], name
    # and through the metrics: ID = peaked rows, OOD = flat rows -> perfect AUROC, zero FPR95
    id_logits = np.array([[8.0, 0, 0], [0, 7.0, 0], [0, 0, 9.0]])
    ood_logits = np.array([[1.0, 1, 1], [0.5, 0.4, 0.6]])
    for fn in detectors.LOGIT_DETECTORS.values():
        assert metrics.auroc(fn(id_logits), fn(ood_logits)) == 1.0
        assert metrics.fpr95(fn(id_logits), fn(ood_logits)) == 0.0


def test_odin_matches_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    d, c, n, T, eps = 12, 4, 7, 1000.0, 0.0014
    lin = torch.nn.Linear(d, c).double()

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x.flatten(1).double())

    model = Flat().eval()
    x = torch.rand(n, 1, 3, 4, dtype=torch.float64)
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    xf = x.flatten(1).numpy()
    z = xf @ W.T + b
    y = z.argmax(1)
    p = np.exp(z / T - (z / T).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(c)[y]
    grad = (p - onehot) @ W / T / n  # d mean-CE / dx
    x_tilde = xf - eps * np.sign(grad)
    z2 = (x_tilde @ W.T + b) / T
    q = np.exp(z2 - z2.max(1, keepdims=True))
    expected = (q / q.sum(1, keepdims=True)).max(1)
    got = detectors.odin(model, x.float(), temperature=T, epsilon=eps, batch_size=3)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn_and_integrates_to_auroc(ties):
    from sklearn.metrics import roc_curve as sk_roc

    rng = np.random.default_rng(3)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    if ties:
        a, b = a.round(1), b.round(1)
    fpr, tpr = metrics.roc_curve(a, b)
    sk_fpr, sk_tpr, _ = sk_roc(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(a, b), abs=1e-12)
