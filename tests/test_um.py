"""Unleashing Mask: flooding's gradient, random and learnable (straight-through top-k) weight masks and their folding,
training only a parameter list on an objective, the masked losses behind gamma, the atypicality statistics, and the
um profile section's validation. Every check is against an independent computation (autograd on plain functions,
loops, hand counts)."""
import copy
import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ood_lib import atypical, masking, um
from ood_lib.config import ProfileError, TrainConfig, load_profile
from ood_lib.models import resnet_small, weights_digest
from ood_lib.train import train

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and on a busy 2-core machine two spinning threads are ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed=0):
    torch.manual_seed(seed)
    return resnet_small(num_classes=10, in_channels=1, width=4, blocks=(1, 1, 1))


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _kept(n, keep):
    """round(keep * n), half up, in exact decimal arithmetic (independent of masking.kept_count)."""
    return int((Decimal(str(keep)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _conv_linear(model):
    """Every nn.Conv2d / nn.Linear of ``model`` by name, found with isinstance (independent of masked_layers)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


# ---------------------------------------------------------------------------------------------------------------
# 1. Flooding


def test_flood_gradient_is_ce_gradient_above_gamma_and_its_negative_below():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    ce = F.cross_entropy(lin(x), y)
    g_ce = torch.autograd.grad(ce, [lin.weight, lin.bias])
    c = ce.item()
    for gamma, sign in [(c - 0.5, 1.0), (c + 0.5, -1.0)]:
        ce = F.cross_entropy(lin(x), y)
        flooded = um.flood(ce, gamma)
        expected_value = c if sign > 0 else 2 * gamma - c
        assert flooded.item() == pytest.approx(expected_value, abs=1e-6)
        g = torch.autograd.grad(flooded, [lin.weight, lin.bias])
        for a, b in zip(g, g_ce):
            assert b.abs().max() > 0
            torch.testing.assert_close(a, sign * b)


# ---------------------------------------------------------------------------------------------------------------
# 2-4. Random masks


@pytest.mark.parametrize("keep", [0.965, 0.8])
def test_random_masks_zero_exactly_the_rounded_count_in_every_conv_and_linear(keep):
    model = _model()
    layers = _conv_linear(model)
    assert len(layers) == 10  # stem, 2 convs per block x 3 blocks, 2 shortcuts, fc
    assert [n for n, _ in masking.masked_layers(model)] == list(layers)
    masks = masking.random_masks(model, keep, seed=0)
    assert set(masks) == set(layers)
    for name, m in layers.items():
        mask = masks[name]
        n = m.weight.numel()
        assert mask.shape == m.weight.shape
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int((mask == 0).sum()) == n - _kept(n, keep), name
        assert int((mask == 0).sum()) == n - math.floor(keep * n + 0.5), name


def test_random_masks_depend_on_the_seed_only():
    model = _model()
    torch.manual_seed(1)
    a = masking.random_masks(model, 0.8, seed=3)
    torch.manual_seed(2)  # the global RNG must not matter
    b = masking.random_masks(model, 0.8, seed=3)
    c = masking.random_masks(model, 0.8, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], c[k]) for k in a) >= len(a) - 1  # tiny layers may coincide by chance
    # and the same seed gives the same masks on another model of the same architecture (weights ignored)
    d = masking.random_masks(_model(seed=5), 0.8, seed=3)
    assert all(torch.equal(a[k], d[k]) for k in a)


@pytest.mark.parametrize("shape,fan_in", [((64, 16, 3, 3), 16 * 3 * 3), ((8, 30, 5, 7), 30 * 5 * 7),
                                          ((50, 400), 400), ((1000, 20), 20)])
def test_random_scores_are_bounded_by_one_over_sqrt_fan_in(shape, fan_in):
    s = masking.random_scores(torch.Size(shape), torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(fan_in)
    assert s.shape == torch.Size(shape)
    assert s.abs().max() <= bound * (1 + 1e-6)
    assert s.abs().max() >= 0.99 * bound  # >= 8000 draws: P(max below 0.99 bound) < 1e-30
    assert (s > 0).any() and (s < 0).any()


def test_apply_masks_zeroes_exactly_the_masked_weights_on_a_copy():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = masking.random_masks(model, 0.8, seed=1)
    out = masking.apply_masks(model, masks)
    assert out is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the original is untouched
    out_params = dict(out.named_parameters())
    for name, m in _conv_linear(model).items():
        w, mask, w_out = before[f"{name}.weight"], masks[name], out_params[f"{name}.weight"]
        assert (w != 0).all()
        assert (w_out[mask == 0] == 0).all()
        assert torch.equal(w_out[mask == 1], w[mask == 1])
        assert int((w_out == 0).sum()) == w.numel() - _kept(w.numel(), 0.8)
    masked_names = {f"{n}.weight" for n in _conv_linear(model)}
    for k, v in out.state_dict().items():
        if k not in masked_names:
            assert torch.equal(v, before[k]), k  # BN, biases, buffers as they were


# ---------------------------------------------------------------------------------------------------------------
# 5. UMAP: learnable score masks


def test_score_masks_keep_the_top_rounded_count_of_every_layer():
    model = _model()
    originals = {n: m.weight.detach().clone() for n, m in _conv_linear(model).items()}
    masking.add_score_masks(model, keep=0.8, seed=0)
    current = masking.current_masks(model)
    assert set(current) == set(originals)
    for name, m in _conv_linear(model).items():
        w0 = originals[name]
        assert (w0 != 0).all()
        n, k = w0.numel(), _kept(w0.numel(), 0.8)
        w = m.weight.detach()  # the parametrized, effective weight
        same = w == w0
        assert int(same.sum()) == k, name
        assert (w[~same] == 0).all()
        assert int(current[name].sum()) == k and int((current[name] == 0).sum()) == n - k
        assert torch.equal(same, current[name] == 1)
        # the kept weights are those with the largest |score|
        s = m.parametrizations.weight[0].scores.detach().abs()
        assert s[same].min() > s[~same].max()


def test_score_masks_return_only_the_scores_and_freeze_the_rest():
    model = _model()
    params = masking.add_score_masks(model, keep=0.8, seed=0, train_weights=False)
    scores = [m.parametrizations.weight[0].scores for m in _conv_linear(model).values()]
    assert len(params) == len(scores) == 10
    assert all(p is s for p, s in zip(params, scores))
    assert all(p is s for p, s in zip(masking.score_parameters(model), scores))
    for name, p in model.named_parameters():
        is_score = any(p is s for s in scores)
        assert p.requires_grad == is_score, name


def test_score_mask_training_moves_only_the_scores():
    model = _model()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    params = masking.add_score_masks(model, keep=0.8, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "scores" not in n}
    assert any("original" in n for n in frozen) and any("bn1.weight" in n for n in frozen)
    assert "fc.bias" in frozen
    scores0 = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        um.flood(F.cross_entropy(model(x), y), gamma=0.1).backward()
        for p in params:
            assert p.grad is not None and p.grad.abs().max() > 0
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    for p, p0 in zip(params, scores0):
        assert not torch.equal(p, p0)


def test_score_gradient_is_straight_through():
    """dL/ds = dL/dW_eff * W * sign(s), with dL/dW_eff from autograd on a plain linear function."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    lin = net[0]
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x, y = torch.randn(7, 6), torch.randint(0, 5, (7,))
    (scores,) = masking.add_score_masks(net, keep=0.8, seed=2)
    F.cross_entropy(net(x), y).backward()

    s = scores.detach()
    k = _kept(s.numel(), 0.8)  # 24 of 30
    mask = torch.zeros(s.numel())
    mask[s.abs().flatten().argsort(descending=True)[:k]] = 1
    w_eff = (w * mask.view_as(w)).requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(F.linear(x, w_eff, b), y), w_eff)
    expected = g * w * s.sign()
    assert expected.abs().max() > 0
    torch.testing.assert_close(scores.grad, expected)
    # pruned weights get a gradient too (straight through), unlike dL/dW_eff * mask
    assert (scores.grad[mask.view_as(w) == 0] != 0).any()


def test_fold_gives_a_plain_model_with_the_masked_logits():
    model = _model()
    x = torch.rand(8, 1, 28, 28)
    params = masking.add_score_masks(model, keep=0.8, seed=0)
    opt = torch.optim.SGD(params, lr=1.0)  # move the scores so that the masks are not the initial ones
    model.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(8)).backward()
        opt.step()
    masks = {k: v.clone() for k, v in masking.current_masks(model).items()}
    originals = {n: m.parametrizations.weight.original.detach().clone() for n, m in _conv_linear(model).items()}
    model.eval()
    with torch.no_grad():
        expected = model(x)
    folded = masking.fold(model)
    assert folded is model
    for name, m in _conv_linear(model).items():
        assert type(m) in (nn.Conv2d, nn.Linear), name
        assert not parametrize.is_parametrized(m)
        assert not hasattr(m, "parametrizations")
        assert torch.equal(m.weight.detach(), originals[name] * masks[name])
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    # the same keys as a plain model (torch re-registers the weight after the bias, so the order may differ)
    fresh = _model(seed=9)
    assert sorted(model.state_dict()) == sorted(fresh.state_dict())
    assert len(model.state_dict()) == len(fresh.state_dict())
    fresh.load_state_dict(model.state_dict())  # strict
    assert weights_digest(fresh) == weights_digest(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=1e-6)


def test_score_masks_with_train_weights_optimise_everything():
    model = _model()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    params = masking.add_score_masks(model, keep=0.8, seed=0, train_weights=True)
    scores = masking.score_parameters(model)
    assert all(p is s for p, s in zip(params[:len(scores)], scores))
    assert {id(p) for p in params} == {id(p) for p in model.parameters()}
    assert len(params) == len(list(model.parameters()))
    assert all(p.requires_grad for p in model.parameters())
    originals = {n: m.parametrizations.weight.original for n, m in _conv_linear(model).items()}
    before = {n: w.detach().clone() for n, w in originals.items()}
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        um.flood(F.cross_entropy(model(x), y), gamma=0.1).backward()
        opt.step()
    for n, w in originals.items():
        assert not torch.equal(w.detach(), before[n]), n


# ---------------------------------------------------------------------------------------------------------------
# 6. train() with an objective and a parameter list

TINY = TrainConfig(epochs=2, batch_size=32, lr=0.05, crop_padding=0, flip=False)


def test_train_updates_only_the_given_parameters(tmp_path):
    x, y = _images(64)
    model = _model()
    params = masking.add_score_masks(model, keep=0.8, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "scores" not in n}
    scores0 = [p.detach().clone() for p in params]
    history = train(model, x, y, TINY, seed=0, run_dir=tmp_path, device=CPU, log=lambda s: None,
                    objective=lambda ce: um.flood(ce, 0.5), parameters=params)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) for h in history)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert all(not torch.equal(p.detach(), p0) for p, p0 in zip(params, scores0))
    # a plain model, every parameter trainable: only the listed ones move
    plain = _model()
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    train(plain, x, y, TINY, seed=0, run_dir=tmp_path / "plain", device=CPU, log=lambda s: None,
          parameters=[plain.fc.weight, plain.fc.bias])
    for n, p in plain.named_parameters():
        assert torch.equal(p.detach(), before[n]) == (not n.startswith("fc.")), n


def test_train_history_records_the_cross_entropy_not_the_objective(tmp_path):
    """One epoch, one batch of the whole set: train_loss is the initial model's CE (train mode) on it, even when
    the objective is flood(CE, 100) ~ 200 - CE."""
    x, y = _images(64)
    model = _model()
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        ce0 = F.cross_entropy(reference(x.float() / 255), y).item()
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, crop_padding=0, flip=False)
    history = train(model, x, y, cfg, seed=0, run_dir=tmp_path, device=CPU, log=lambda s: None,
                    objective=lambda ce: um.flood(ce, gamma=100.0))
    assert history[0]["train_loss"] == pytest.approx(ce0, rel=1e-5)


def test_flooding_far_above_the_loss_is_gradient_ascent(tmp_path):
    x, y = _images(64)
    runs = {}
    for name, objective in [("ce", None), ("ascent", lambda ce: um.flood(ce, gamma=100.0))]:
        runs[name] = train(_model(), x, y, TINY, seed=0, run_dir=tmp_path / name, device=CPU, log=lambda s: None,
                           objective=objective)
    ce, ascent = runs["ce"], runs["ascent"]
    assert ascent[-1]["train_loss"] > ce[-1]["train_loss"]
    assert ascent[-1]["train_loss"] > ascent[0]["train_loss"]  # the CE rises under ascent
    assert ce[-1]["train_loss"] < ce[0]["train_loss"]


# ---------------------------------------------------------------------------------------------------------------
# 7. The losses of gamma


def test_mean_loss_and_masked_loss():
    x, y = _images(10)
    model = _model().eval()
    with torch.no_grad():
        direct = F.cross_entropy(model(x.float() / 255), y).item()
    full = um.mean_loss(model, x, y, CPU, batch_size=4)  # batches of 4, 4, 2
    assert full == pytest.approx(direct, rel=1e-6)
    a = um.masked_loss(model, x, y, 0.8, 3, CPU, 4, None)
    assert um.masked_loss(model, x, y, 0.8, 3, CPU, 4, None) == a
    assert um.masked_loss(model, x, y, 0.8, 4, CPU, 4, None) != a
    assert a != pytest.approx(full, rel=1e-6)
    assert um.masked_loss(model, x, y, 1.0, 3, CPU, 4, None) == pytest.approx(full, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 8-10. Atypicality


def _dynamics_by_loop(correct):
    E, n = correct.shape
    learned, forgetting = [], []
    for j in range(n):
        e = E + 1
        while e > 1 and correct[e - 2, j]:
            e -= 1
        learned.append(e)
        forgetting.append(sum(bool(correct[t, j]) and not correct[t + 1, j] for t in range(E - 1)))
    return learned, forgetting


def test_learning_dynamics_by_hand():
    T, W = True, False
    columns = [
        [T, T, T, T],  # always correct: learned at 1, never forgotten
        [W, W, T, T],  # correct from epoch 3
        [T, T, T, W],  # wrong at the end: not learned (E + 1), forgotten once
        [T, W, T, T],  # correct-wrong-correct-correct: learned at 3, forgotten once
        [W, W, W, W],  # never correct
        [T, W, T, W],  # forgotten twice, wrong at the end
    ]
    correct = np.array(columns).T  # (epochs, images)
    out = atypical.learning_dynamics(correct)
    assert out["learned_epoch"].tolist() == [1, 3, 5, 3, 5, 5]
    assert out["forgetting_events"].tolist() == [0, 0, 1, 1, 0, 2]
    rng = np.random.default_rng(0)
    random = rng.random((7, 50)) < 0.6
    out = atypical.learning_dynamics(random)
    learned, forgetting = _dynamics_by_loop(random)
    assert out["learned_epoch"].tolist() == learned
    assert out["forgetting_events"].tolist() == forgetting


def test_mask_sensitivity_without_masking_is_zero():
    x, y = _images(12)
    out = atypical.mask_sensitivity(_model(), x, y, keep=1.0, seeds=(0, 1), device=CPU, batch_size=5)
    assert len(out) == 12
    assert (out["ce_increase"] == 0).all() and (out["kl"] == 0).all() and (out["flip_rate"] == 0).all()


def test_mask_sensitivity_against_a_hand_computation():
    x, y = _images(12)
    model = _model()
    out = atypical.mask_sensitivity(model, x, y, keep=0.9, seeds=(0, 1, 2), device=CPU, batch_size=5)
    assert (out["kl"] >= 0).all() and (out["kl"] > 0).any()
    s = 7
    one = atypical.mask_sensitivity(model, x, y, keep=0.9, seeds=(s,), device=CPU, batch_size=5)
    masked = masking.apply_masks(model, masking.random_masks(model, 0.9, s)).eval()
    model.eval()
    with torch.no_grad():
        xf = x.float() / 255
        p_full = torch.softmax(model(xf).double(), 1)
        p_mask = torch.softmax(masked(xf).double(), 1)
    for i in [0, 5, 11]:
        kl = sum(p_mask[i, c].item() * math.log(p_mask[i, c].item() / p_full[i, c].item()) for c in range(10))
        assert one["kl"][i] == pytest.approx(kl, rel=1e-6, abs=1e-9)
        ce_up = -math.log(p_mask[i, y[i]].item()) + math.log(p_full[i, y[i]].item())
        assert one["ce_increase"][i] == pytest.approx(ce_up, rel=1e-6, abs=1e-9)
        assert one["ce_full"][i] == pytest.approx(-math.log(p_full[i, y[i]].item()), rel=1e-6)
        assert one["flip_rate"][i] == float(p_mask[i].argmax() != p_full[i].argmax())
        assert one["masked_wrong_rate"][i] == float(p_mask[i].argmax() != y[i])


def test_top_k_and_random_k():
    score = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.2])
    assert atypical.top_k(score, 3).tolist() == [0, 1, 4]  # both 0.9s, then the first 0.5
    assert atypical.top_k(score, 4).tolist() == [0, 1, 2, 4]
    rng = np.random.default_rng(1)
    ints = rng.integers(0, 5, 40).astype(float)  # many ties
    for k in (1, 7, 20):
        expected = sorted(sorted(range(40), key=lambda i: (-ints[i], i))[:k])
        assert atypical.top_k(ints, k).tolist() == expected
    a, b, c = atypical.random_k(100, 30, seed=3), atypical.random_k(100, 30, seed=3), atypical.random_k(100, 30, 4)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 30 and a.min() >= 0 and a.max() < 100
    assert a.tolist() == sorted(a.tolist())


# ---------------------------------------------------------------------------------------------------------------
# 11. Validation of the um section

VALID = {"um.atypical_remove": 100}  # smoke has 1000 training images; the default k (1000) is not below that


def test_um_overrides_that_are_valid_load():
    p = load_profile("smoke", {**VALID, "um.mask_keep": 1.0, "um.gamma": 0.2,
                               "um.mask_seeds": [0, 1, 2, 3, 4]})
    assert p.um.mask_keep == 1.0 and p.um.gamma == 0.2 and p.um.atypical_remove == 100
    assert load_profile("smoke", {"um.atypical_remove": 999}).um.atypical_remove == 999


@pytest.mark.parametrize("override,message", [
    ({"um.mask_keep": 0}, r"um.mask_keep is the fraction of weights KEPT"),
    ({"um.mask_keep": 1.5}, r"um.mask_keep is the fraction of weights KEPT"),
    ({"um.umap_keep": 0.0}, r"um.umap_keep is the fraction of weights KEPT"),
    ({"um.curve_keep": [1.0, 0.9, -0.1]}, r"um.curve_keep\[2\] is the fraction of weights KEPT"),
    ({"um.mask_seeds": [0, 1, 2]}, r"um.mask_seeds needs at least 5 distinct seeds"),
    ({"um.mask_seeds": [0, 1, 2, 3, 3]}, r"um.mask_seeds needs at least 5 distinct seeds"),
    ({"um.gammma": 0.1}, r"unknown parameter\(s\) \['gammma'\]; allowed: \[.*'gamma'"),
    ({"um.gamma": -1}, r"um.gamma must be positive"),
    ({"um.gamma": 0}, r"um.gamma must be positive"),
    ({"um.atypical_remove": 1000}, r"um.atypical_remove must be in \[1, data.train_size\)"),
    ({"um.atypical_remove": 5000}, r"um.atypical_remove must be in \[1, data.train_size\)"),
    ({"um.atypical_remove": 0}, r"um.atypical_remove must be in \[1, data.train_size\)"),
])
def test_um_overrides_that_are_rejected(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("smoke", {**VALID, **override})


def test_gamma_used_is_the_median_over_masks_unless_given():
    g = um.Gamma(0.965, (0, 1, 2, 3, 4), (0.1, 0.2, 0.3, 0.4, 1.0))
    s = g.summary()
    assert g.used == pytest.approx(0.3) and s["mean"] == pytest.approx(0.4) and s["max"] == 1.0
    assert s["rule"] == "rule A: median over masks"
    assert um.Gamma(0.965, (0, 1, 2, 3), (0.1, 0.2, 0.4, 9.0)).used == pytest.approx(0.3)  # even count: midpoint
    assert s["std"] == pytest.approx(np.std([0.1, 0.2, 0.3, 0.4, 1.0], ddof=1))
    fixed = um.Gamma(0.965, (0, 1, 2, 3, 4), (0.1, 0.2, 0.3, 0.4, 1.0), given=0.15)
    assert fixed.used == 0.15 and fixed.summary()["rule"] == "um.gamma (given)"


def _zeroed_here(model, keep, seed):
    """A copy of ``model`` with mask ``seed``'s weights zeroed, written out from masking's documented rule (not
    with it): one torch.Generator(seed) drawing Kaiming-uniform scores U(-b, b), b = fan_in^-1/2, per conv/linear
    layer in module order; each layer keeps its round-half-up(keep * n) largest |score|."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _conv_linear(out).values():
            n = m.weight.numel()
            score = (torch.rand(m.weight.shape, generator=gen) * 2 - 1) * (n // m.weight.shape[0]) ** -0.5
            m.weight.view(-1)[score.abs().flatten().argsort()[:n - _kept(n, keep)]] = 0
    return out


def _every_augmentation_loss(model, x, y, pad=4):
    """Cross-entropy (N, (2 pad + 1)^2 * 2) of each image under every crop offset of its zero-padded copy and
    both flips: whatever augmentation a seed draws, each image's loss is one of these."""
    xf = F.pad(x.float() / 255, (pad, pad, pad, pad))
    h, w = x.shape[2:]
    out = []
    with torch.no_grad():
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = xf[:, :, dy:dy + h, dx:dx + w]
                out += [F.cross_entropy(model(v).double(), y, reduction="none") for v in (crop, crop.flip(3))]
    return torch.stack(out, 1)


def test_estimate_gamma_against_losses_computed_here():
    """gamma's value for mask seed s = the mean training cross-entropy of the model with mask s's weights zeroed, in
    eval mode, under the training augmentation seeded by s; checked against losses computed here without
    ood_lib.um or ood_lib.masking, in batches of 5 (24 images: a short last batch)."""
    from types import SimpleNamespace
    seeds = [3, 4, 5, 6, 7]
    x, y = _images(24)
    data = SimpleNamespace(train_images=x, train_labels=y)
    model = _model().eval()
    base_sets = {"um.mask_seeds": seeds, "eval.batch_size": 5}
    no_aug = {"train.crop_padding": 0, "train.flip": False}
    with torch.no_grad():
        plain = F.cross_entropy(model(x.float() / 255).double(), y).item()
    # nothing masked, no augmentation: every value is the plain mean cross-entropy
    g = um.estimate_gamma(load_profile("smoke", {**base_sets, **no_aug, "um.mask_keep": 1.0}), data, model, CPU)
    assert g.values == pytest.approx([plain] * 5, rel=1e-6) and g.seeds == tuple(seeds)
    # random masks, no augmentation: each value is the loss of the copy zeroed here by the same seed
    p = load_profile("smoke", {**base_sets, **no_aug})
    g = um.estimate_gamma(p, data, model, CPU)
    masked = {s: _zeroed_here(model, p.um.mask_keep, s) for s in seeds}
    with torch.no_grad():
        want = [F.cross_entropy(masked[s](x.float() / 255).double(), y).item() for s in seeds]
    assert g.keep == 0.965 and g.values == pytest.approx(want, rel=1e-6)
    assert len(set(g.values)) == 5 and plain not in g.values
    # the smoke profile's training augmentation (crop padding 2, flip): reproducible; each value lies between the
    # mean over images of their smallest and of their largest loss over all 5 x 5 crops and 2 flips; the draw
    # depends on the mask seed (unmasked: the five values still differ)
    for keep, nets in ((1.0, {s: model for s in seeds}), (0.965, masked)):
        p = load_profile("smoke", {**base_sets, "um.mask_keep": keep})
        assert (p.train.crop_padding, p.train.flip) == (2, True)
        g = um.estimate_gamma(p, data, model, CPU)
        assert um.estimate_gamma(p, data, model, CPU).values == g.values and len(set(g.values)) == 5
        for s, v in zip(seeds, g.values):
            every = _every_augmentation_loss(nets[s], x, y, pad=2)
            lo, hi = every.min(1).values.mean().item(), every.max(1).values.mean().item()
            assert lo * (1 - 1e-6) <= v <= hi * (1 + 1e-6) and hi - lo > 0.01, (keep, s, lo, v, hi)
        if keep == 1.0:
            assert plain not in g.values


def test_top_k_per_class_takes_each_class_share_of_its_own_top():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    score = rng.random(100) + 10 * (labels == 2)  # class 2 dominates the global top-k
    picked = atypical.top_k_per_class(score, labels, 10)
    assert list(np.bincount(labels[picked], minlength=3)) == [5, 3, 2]
    assert set(atypical.top_k(score, 10)) <= set(np.flatnonzero(labels == 2))  # what the global top-k would do
    for c in range(3):  # within each class, the highest scores
        members = np.flatnonzero(labels == c)
        chosen = np.intersect1d(picked, members)
        assert score[chosen].min() >= np.sort(score[members])[::-1][len(chosen) - 1]
    odd = atypical.top_k_per_class(score, labels, 7)  # 3.5, 2.1, 1.4: the largest remainder gets the extra one
    assert len(odd) == 7 and list(np.bincount(labels[odd], minlength=3)) == [4, 2, 1]


# ---------------------------------------------------------------------------------------------------------------
# 12. The loss curve's class-stratified subset, and UMAP's own seed stream


def test_stratified_subset_of_a_class_ordered_source_covers_every_class():
    labels = np.repeat(np.arange(10), 500)  # class-ordered, like the CIFAR-10 archive: the first 1,000 are 0 and 1
    idx = um.stratified_subset(labels, 1000, seed=3)
    assert list(np.bincount(labels[idx], minlength=10)) == [100] * 10
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(labels)  # sorted, distinct, in range
    assert np.array_equal(idx, um.stratified_subset(labels, 1000, seed=3))          # reproducible
    assert not np.array_equal(idx, um.stratified_subset(labels, 1000, seed=4))      # the seed matters
    assert not np.array_equal(idx[:100], np.arange(100))                            # not the first of a class
    assert np.array_equal(um.stratified_subset(labels, None, 0), np.arange(5000))
    assert np.array_equal(um.stratified_subset(labels, 6000, 0), np.arange(5000))


def test_stratified_subset_quotas_by_largest_remainder():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = um.stratified_subset(labels, 7, seed=0)  # quotas 3.5, 2.1, 1.4: floors 3, 2, 1, the extra one to class 0
    assert list(np.bincount(labels[idx], minlength=3)) == [4, 2, 1]
    idx = um.stratified_subset(labels[::-1], 10, seed=0)
    assert list(np.bincount(labels[::-1][idx], minlength=3)) == [5, 3, 2]


def test_loss_curve_averages_over_the_stratified_subset_of_a_class_ordered_source():
    from types import SimpleNamespace
    p = load_profile("smoke", {"um.curve_keep": [1.0, 0.8]})
    x, _ = _images(40)
    y = torch.arange(4).repeat_interleave(10)  # class-ordered: the first 8 images are all class 0
    data = SimpleNamespace(train_images=x, train_labels=y)
    model = _model().eval()
    curve = um.loss_curve(p, data, model, CPU, images=8)
    rng = np.random.default_rng(p.data.split_seed)  # 2 per class, drawn class after class from one generator
    idx = np.sort(np.concatenate([rng.choice(np.arange(10 * c, 10 * c + 10), 2, replace=False) for c in range(4)]))
    assert np.array_equal(um.stratified_subset(y.numpy(), 8, p.data.split_seed), idx)
    xs, ys = x[torch.from_numpy(idx)], y[torch.from_numpy(idx)]
    for row in curve.itertuples():
        assert row.loss == um.masked_loss(model, xs, ys, row.keep, row.mask_seed, CPU, p.eval.batch_size, p.train)
    first = um.masked_loss(model, x[:8], y[:8], 0.8, p.um.mask_seeds[0], CPU, p.eval.batch_size, p.train)
    assert curve.loc[(curve.keep == 0.8) & (curve.mask_seed == p.um.mask_seeds[0]), "loss"].item() != first

    # Without augmentation each point is the cross-entropy of the subset under the documented mask, built by hand
    plain = load_profile("smoke", {"um.curve_keep": [1.0, 0.8], "train.crop_padding": 0, "train.flip": False})
    curve = um.loss_curve(plain, data, model, CPU, images=8)
    for row in curve.itertuples():
        with torch.no_grad():
            direct = F.cross_entropy(_zeroed_here(model, row.keep, row.mask_seed)(xs.float() / 255), ys).item()
        assert row.loss == pytest.approx(direct, rel=1e-5)
    assert curve.loss.nunique() == len(curve) - len(p.um.mask_seeds) + 1  # the masks matter; keep 1.0 does not


def test_umap_initial_scores_do_not_reuse_a_gamma_mask_seed(monkeypatch):
    """Gamma zeroes the 3.5% smallest |score| of mask seed m; UMAP starts by pruning the 20% smallest |score| of its
    own scores. With the same seed (the old behaviour) gamma's zeroed set is a subset of UMAP's pruned set; with
    independent streams about 20% of gamma's zeroed weights fall in UMAP's pruned set."""
    from types import SimpleNamespace
    p = load_profile("smoke")
    data = SimpleNamespace()
    monkeypatch.setattr(um.base, "load_base", lambda profile, data, seed, epoch=None: _model(0))
    seeds = (0, 1, 2, 3, 4)
    assert not {um.umap_score_seed(s) for s in seeds} & (set(p.um.mask_seeds) | set(range(1000)))
    assert len({um.umap_score_seed(s) for s in range(1000)}) == 1000
    for s in seeds:
        model, _ = um.UMAP.start(p, data, s)
        pruned = masking.current_masks(model)  # 1 = kept by UMAP at step 0
        for m in p.um.mask_seeds:
            zeroed = masking.random_masks(_model(0), p.um.mask_keep, m)
            inside = sum(float(((zeroed[k] == 0) & (pruned[k] == 0)).sum()) for k in zeroed)
            total = sum(float((zeroed[k] == 0).sum()) for k in zeroed)
            assert inside / total < 0.5, (s, m, inside / total)
    # the check above does catch a shared seed: with the base seed itself, the zeroed set lies inside the pruned set
    old = _model(0)
    masking.add_score_masks(old, p.um.umap_keep, 0)
    zeroed = masking.random_masks(_model(0), p.um.mask_keep, 0)
    kept = masking.current_masks(old)
    assert all(bool((kept[k][zeroed[k] == 0] == 0).all()) for k in zeroed)


def test_rule_b_smoothed_minimum_by_hand():
    smooth, epoch = um.smoothed_minimum([0.9, 0.5, 0.2, 0.6, 0.1, 0.8])
    expected = [(0.9 + 0.5) / 2, (0.9 + 0.5 + 0.2) / 3, (0.5 + 0.2 + 0.6) / 3, (0.2 + 0.6 + 0.1) / 3,
                (0.6 + 0.1 + 0.8) / 3, (0.1 + 0.8) / 2]
    assert np.allclose(smooth, expected)
    assert epoch == 4  # 0.3 at epoch 4 beats the single-epoch dip at 5 (smoothed 0.5) and 3 (0.433)
    assert um.smoothed_minimum([0.3, 0.3, 0.3])[1] == 1  # ties: the earliest


def test_rule_b_on_a_trained_run(tmp_path, monkeypatch):
    """Rule B on a real (tiny) base run: the ID-val loss of every checkpoint, computed independently here; gamma is
    the unmasked loss at the chosen epoch measured like rule A, or None in the last 10% of training."""
    from ood_lib import base
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path))
    p = load_profile("smoke", {"train.epochs": 3, "data.train_size": 200, "data.id_val_size": 50,
                               "data.id_test_size": 50, "data.ood_size": 40, "seeds": [0]})
    data = base.prepare_data(p)
    base.train_seed(p, data, 0, log=lambda s: None)
    b = um.rule_b(p, data, 0, torch.device("cpu"))
    model = base.build_model(p, data)
    for epoch, v in enumerate(b.val_loss, 1):
        base.load_epoch(model, base.run_dir(p, 0), epoch)
        with torch.no_grad():
            z = model.eval()(data.id_val.images.float() / 255)
        assert v == pytest.approx(torch.nn.functional.cross_entropy(z.double(), torch.as_tensor(data.id_val.labels))
                                  .item(), rel=1e-5)
    assert b.epoch == um.smoothed_minimum(b.val_loss)[1]
    if b.epoch > 0.9 * p.train.epochs:
        assert b.gamma is None
    else:
        base.load_epoch(model, base.run_dir(p, 0), b.epoch)
        assert b.gamma == pytest.approx(np.mean([um.mean_loss(model, data.train_images, data.train_labels,
                                                              torch.device("cpu"), 500, p.train, s)
                                                 for s in p.um.mask_seeds]))
