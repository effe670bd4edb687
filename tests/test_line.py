"""LINe (Ahn et al., CVPR 2023; docs/methods.md §2): closed-form contributions vs autograd, mask sizes, the order of operations,
the special cases Energy and DICE, and the real DICE DenseNet checkpoint."""
import math

import numpy as np
import pytest
import torch

from ood_lib.detectors import energy
from ood_lib.line import (LINE_CIFAR10, LINE_CIFAR100, LINE_IMAGENET, LineMasks, LineStats, contributions,
                          fit_line, fit_line_setting, line, line_logits, line_masks, tau_from_percentile)
from ood_lib.models import resnet_small
from ood_lib.posthoc import POSTHOC, Head, TrainSet


def _random_problem(n=600, k=10, d=342, seed=0):
    """Non-negative (post-ReLU-like) features with class-dependent means, a random head, ground-truth labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    centres = rng.gamma(2.0, 0.5, size=(k, d))
    feats = (rng.gamma(2.0, 0.5, size=(n, d)) * centres[labels] / 2).astype(np.float32)
    w = rng.normal(0, 0.3, size=(k, d))
    b = rng.normal(0, 0.1, size=k)
    head = Head(weight=w, bias=b)
    return TrainSet(features=feats, logits=feats @ w.T + b, labels=labels), head


def _logsumexp(z):
    m = z.max()
    return m + np.log(np.exp(z - m).sum())


def test_contributions_equal_the_autograd_taylor_scores_at_the_pooled_feature():
    torch.manual_seed(0)
    model = resnet_small(num_classes=10, in_channels=1, width=4, blocks=(1, 1, 1)).eval()
    with torch.no_grad():  # non-trivial head: random bias too
        model.fc.bias.normal_(0, 0.5)
    x = torch.rand(60, 1, 28, 28)
    y = torch.randperm(60) % 10
    # The paper's route: a hook at the global pool, one backward of each sample's ground-truth logit.
    h = model.feature_maps(x).mean((2, 3))
    h.retain_grad()
    logits = model.fc(h)
    logits.gather(1, y[:, None]).sum().backward()  # samples are independent in eval mode
    taylor = (h * h.grad).detach().double().numpy()  # h(x) * d f_y / d h, per sample
    expected = np.stack([taylor[y.numpy() == c].mean(0) for c in range(10)])

    train = TrainSet(features=h.detach().numpy(), logits=logits.detach().numpy(), labels=y.numpy())
    c = contributions(train, Head.of(model))
    assert c.shape == (10, model.feature_dim) and c.dtype == np.float64
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-6)
    # ground truth, not the prediction: the labels above mostly disagree with the model
    assert (logits.argmax(1) != y).float().mean() > 0.5


@pytest.mark.parametrize("k, p_a, p_w, neurons, weights", [(10, 90, 90, 35, 342), (100, 10, 90, 307, 3420)])
def test_mask_cardinalities_match_the_table(k, p_a, p_w, neurons, weights):
    rng = np.random.default_rng(1)
    c = rng.normal(size=(k, 342))
    w = rng.normal(size=(k, 342))
    m = line_masks(c, w, p_a, p_w)
    assert m.activation.shape == (k, 342) and m.weight.shape == (k, k, 342)
    assert (m.activation.sum(1) == neurons).all()
    assert (m.weight.reshape(k, -1).sum(1) == weights).all()
    # AP ranks the SIGNED contributions of each class: the kept neurons are the largest C[c, j]
    for cls in (0, k - 1):
        top = np.argsort(c[cls])[-neurons:]
        assert set(np.flatnonzero(m.activation[cls])) == set(top)
    # WP ranks |C[c, j]| * SIGNED W[k, j] over the whole K x D matrix of the class
    adjusted = np.abs(c[3])[None, :] * w
    assert set(np.flatnonzero(m.weight[3].ravel())) == set(np.argsort(adjusted.ravel())[-weights:])
    if p_w == 90:
        assert (adjusted[m.weight[3]] > 0).all()  # only positive products survive the top decile


def test_masks_keep_strictly_above_the_percentile_on_ties():
    """Dead units (mean feature 0) give C = 0; when the percentile lands on that tie, none of them is kept."""
    c = np.zeros((2, 20))
    c[:, :8] = np.arange(1, 9)  # 12 exact zeros per class
    w = np.ones((2, 20))
    m = line_masks(c, w, p_a=10, p_w=30)
    assert (m.activation.sum(1) == 8).all()  # percentile 10 is 0: the zeros go
    assert (m.weight.reshape(2, -1).sum(1) == 16).all()  # |C| * W: 24 zeros of 40, percentile 30 is 0


def test_fit_on_random_features_keeps_the_published_counts():
    train, head = _random_problem(k=10, d=342)
    stats = fit_line(train, head)  # CIFAR-10 defaults
    assert (stats.p_a, stats.p_w, stats.tau) == (90, 90, 1.0)
    assert (stats.masks.activation.sum(1) == 35).all()
    assert (stats.masks.weight.reshape(10, -1).sum(1) == 342).all()
    train100, head100 = _random_problem(n=1000, k=100, d=342, seed=3)
    s100 = fit_line_setting(train100, head100, LINE_CIFAR100)
    assert (s100.masks.activation.sum(1) == 307).all()
    assert (s100.masks.weight.reshape(100, -1).sum(1) == 3420).all()


def test_published_settings_and_tau_rule():
    assert (LINE_CIFAR10.p_a, LINE_CIFAR10.p_w, LINE_CIFAR10.tau) == (90, 90, 1.0)
    assert (LINE_CIFAR100.p_a, LINE_CIFAR100.p_w, LINE_CIFAR100.tau) == (10, 90, 1.0)
    assert (LINE_IMAGENET.p_a, LINE_IMAGENET.p_w, LINE_IMAGENET.tau) == (10, 10, 0.8)
    train, _ = _random_problem()
    flat = np.sort(train.features.astype(np.float64).ravel())
    assert tau_from_percentile(train, 90) == pytest.approx(np.percentile(flat, 90))
    assert (flat <= tau_from_percentile(train, 90)).mean() == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("tau", [None, float("inf")])
def test_everything_off_is_plain_energy(tau):
    train, head = _random_problem()
    stats = fit_line(train, head, p_a=None, p_w=None, tau=tau)
    assert stats.masks.activation.all() and stats.masks.weight.all()
    test = train.features[:200] * 1.7
    np.testing.assert_allclose(line(test, None, head, stats), energy(test @ head.weight.T + head.bias),
                               rtol=1e-12, atol=1e-12)


def test_no_activation_pruning_and_the_dice_mask_is_dice():
    train, head = _random_problem(seed=5)
    w, b = head.weight, head.bias
    # DICE (Sun & Li, ECCV 2022), written out independently: one global mask from the mean feature of ALL classes
    contrib = w * train.features.astype(np.float64).mean(0)
    dice_mask = contrib > np.percentile(contrib, 90)
    test = np.random.default_rng(9).gamma(2.0, 0.6, size=(300, 342))
    dice = np.array([_logsumexp((w * dice_mask) @ h + b) for h in test])

    k, d = w.shape
    stats = LineStats(contributions=contributions(train, head),
                      masks=LineMasks(activation=np.ones((k, d), bool),
                                      weight=np.broadcast_to(dice_mask, (k, k, d))), tau=None)
    np.testing.assert_allclose(line(test, None, head, stats), dice, rtol=1e-10)
    assert not np.allclose(dice, energy(test @ w.T + b))  # the mask matters
    shared = POSTHOC["dice"]  # and the library's own DICE agrees
    np.testing.assert_allclose(shared.score(test, None, head, shared.fit(train, head)), dice, rtol=1e-10)


def test_clipping_is_an_upper_clip_only():
    train, head = _random_problem()
    stats = fit_line(train, head, p_a=None, p_w=None, tau=1.0)
    test = np.random.default_rng(2).normal(0, 3, size=(100, 342))  # large negative entries stay as they are
    np.testing.assert_allclose(line(test, None, head, stats),
                               energy(np.minimum(test, 1.0) @ head.weight.T + head.bias), rtol=1e-12)


def _reference_line(features, train, head, p_a, p_w, tau):
    """Per sample, from scratch: class means, C, clip, predict, this sample's masks, masked logits, logsumexp."""
    w, b = np.asarray(head.weight, np.float64), np.asarray(head.bias, np.float64)
    f_train = train.features.astype(np.float64)
    mu = np.stack([f_train[train.labels == c].mean(0) for c in range(w.shape[0])])
    c_mat = w * mu
    scores, preds = [], []
    for h in np.asarray(features, np.float64):
        h = np.minimum(h, tau)
        c = int(np.argmax(w @ h + b))
        keep_neuron = c_mat[c] > np.percentile(c_mat[c], p_a)
        adjusted = np.abs(c_mat[c])[None, :] * w
        w_c = np.where(adjusted > np.percentile(adjusted, p_w), w, 0.0)
        scores.append(_logsumexp(w_c @ (h * keep_neuron) + b))
        preds.append(c)
    return np.array(scores), np.array(preds)


@pytest.mark.parametrize("k, p_a, p_w", [(10, 90, 90), (20, 10, 90), (20, 10, 10)])
def test_grouped_scorer_equals_a_per_sample_reference(k, p_a, p_w):
    train, head = _random_problem(n=40 * k, k=k, d=64, seed=k)
    rng = np.random.default_rng(11)
    test = (train.features[:250] * rng.uniform(0.5, 1.5, size=(250, 64))).astype(np.float32)
    tau = float(np.percentile(train.features, 80))
    stats = fit_line(train, head, p_a=p_a, p_w=p_w, tau=tau)
    ref, ref_pred = _reference_line(test, train, head, p_a, p_w, tau)
    got = line(test, None, head, stats)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    _, pred = line_logits(test, head, stats)
    np.testing.assert_array_equal(pred, ref_pred)
    # the test has power: clipping changes some predictions, and several classes are predicted
    unclipped = np.argmax(test @ head.weight.T + head.bias, axis=1)
    assert (unclipped != ref_pred).any() and len(np.unique(ref_pred)) > 3


def test_missing_class_is_an_error():
    train, head = _random_problem()
    keep = train.labels != 4
    partial = TrainSet(features=train.features[keep], logits=train.logits[keep], labels=train.labels[keep])
    with pytest.raises(ValueError, match=r"class\(es\) \[4\]"):
        fit_line(partial, head)


def test_registered_line_on_a_hand_computed_example():
    """The registry's entry (fit with the CIFAR-10 setting p_a = p_w = 90, tau = 1) on a 2-class, 4-unit head,
    every number worked out by hand. With 4 values, percentile 90 is v3 + 0.7 (v4 - v3), and with 8 values
    v7 + 0.3 (v8 - v7): each mask keeps exactly one entry, the largest."""
    entry = POSTHOC["line"]
    assert entry.name == "line" and "LINe" in entry.paper
    w = np.array([[2.0, 1.5, 0.0, 0.5], [0.0, 1.0, 3.0, 1.0]])
    b = np.array([0.5, -0.5])
    head = Head(weight=w, bias=b)
    feats = np.array([[0.5, 2.5, 1, 2], [1.5, 1.5, 1, 0],   # class 0: mean (1, 2, 1, 1)
                      [2, 0, 1, 1], [0, 2, 1, 1]], np.float32)  # class 1: mean (1, 1, 1, 1)
    train = TrainSet(features=feats, logits=feats @ w.T + b, labels=np.array([0, 0, 1, 1]))
    stats = entry.fit(train, head)
    assert stats.setting() == LINE_CIFAR10
    # C = W * class mean: C0 = (2, 3, 0, .5), C1 = (0, 1, 3, 1). AP keeps unit 1 for class 0 (W alone would
    # pick unit 0: the class mean matters) and unit 2 for class 1.
    np.testing.assert_array_equal(stats.contributions, [[2, 3, 0, 0.5], [0, 1, 3, 1]])
    np.testing.assert_array_equal(stats.masks.activation, [[0, 1, 0, 0], [0, 0, 1, 0]])
    # WP: |C0| * W = [[4, 4.5, 0, .25], [0, 3, 0, .5]] keeps W[0, 1]; |C1| * W = [[0, 1.5, 0, .5], [0, 1, 9, 1]]
    # keeps W[1, 2]
    only = np.zeros((2, 2, 4), bool)
    only[0, 0, 1] = only[1, 1, 2] = True
    np.testing.assert_array_equal(stats.masks.weight, only)
    test = np.array([[0.2, 0.8, 0.1, 0.4],    # full head: 2.3 vs 1.0 -> class 0; g = (1.5 * .8 + .5, -.5)
                     [1.6, 0.1, 0.9, 0.9]])   # unclipped: 4.3 vs 3.2 -> class 0, but clipped to 1: 3.1 vs 3.2
    expected = [math.log(math.exp(1.7) + math.exp(-0.5)),  # -> class 1; g = (.5, 3 * .9 - .5)
                math.log(math.exp(0.5) + math.exp(2.2))]
    # the logits argument is unused: the prediction comes from the clipped features
    np.testing.assert_allclose(entry.score(test, np.zeros((2, 2)), head, stats), expected, rtol=1e-12)
    _, pred = line_logits(test, head, stats)
    assert pred.tolist() == [0, 1]


def test_importing_the_registry_alone_registers_line():
    import subprocess
    import sys

    code = "from ood_lib.posthoc import POSTHOC; assert 'line' in POSTHOC and 'dice' in POSTHOC"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__import__("pathlib").Path(__file__).parents[1])


def test_pretrained_dice_densenet_sanity():
    """The real CIFAR-10 DenseNet-BC-100: C is 10 x 342 and AP keeps 35 neurons per class (a few hundred images).
    The data are found as ``make test`` finds them (conftest's ``data_root``); skipped only when they are nowhere."""
    from ood_lib.data import DatasetMissing, load_dataset
    from ood_lib.features import extract
    from ood_lib.models import load_pretrained

    try:
        model = load_pretrained("dice_densenet100_cifar10")
        ds = load_dataset("cifar10", "train")
    except (FileNotFoundError, DatasetMissing) as e:
        pytest.skip(f"pretrained checkpoint or CIFAR-10 not available: {e}")
    x = torch.from_numpy(np.ascontiguousarray(ds.x[::250])).permute(0, 3, 1, 2).contiguous()  # 200, all classes
    y = np.asarray(ds.y[::250])
    out = extract(model, x, torch.device("cpu"), batch_size=100)
    train = TrainSet(features=out["features"], logits=out["logits"], labels=y)
    head = Head.of(model)
    stats = fit_line(train, head)
    assert stats.contributions.shape == (10, 342)
    assert (stats.masks.activation.sum(1) == 35).all()
    assert (stats.masks.weight.reshape(10, -1).sum(1) == 342).all()
    assert (out["logits"].argmax(1) == y).mean() > 0.6  # the checkpoint and preprocessing are the right ones
    assert np.isfinite(line(out["features"], out["logits"], head, stats)).all()
