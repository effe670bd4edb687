"""ASH (Djurisic et al., ICLR 2023): each variant against a plain per-sample reference, at both sites, and the
per-config cache of the one-pass score table."""
import numpy as np
import pytest
import torch

from ood_lib.ash import (ASH_PERCENTILE, ASH_SITE, ASH_VARIANTS, SITE_MAP, SITE_POOLED, ash_from_features, ash_prune,
                         kept_count, percentile_of)
from ood_lib.detectors import energy
from ood_lib.features import FeatureCache, Preprocess, ash_score_table, ash_scores
from ood_lib.models import resnet_small, weights_digest

CPU = torch.device("cpu")


def _reference_shape(v: np.ndarray, variant: str, p: float) -> np.ndarray:
    """One sample, flattened, in float64: keep the k largest, k = n - round(n p / 100), then the variant's rule."""
    n = v.size
    k = n - int(np.round(n * p / 100))
    top = np.argsort(-v, kind="stable")[:k]
    out = np.zeros(n)
    if variant == "ash_p":
        out[top] = v[top]
    elif variant == "ash_b":
        out[top] = v.sum() / k
    else:
        out[top] = v[top] * np.exp(v.sum() / v[top].sum())
    return out


@pytest.mark.parametrize("variant", ["ash_p", "ash_b", "ash_s"])
@pytest.mark.parametrize("p", [0, 50, 65, 90, 99])
def test_prune_matches_a_per_sample_reference(variant, p):
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 6, 4, 3, generator=g, dtype=torch.float64) * (torch.rand(5, 6, 4, 3, generator=g) > 0.3)
    maps[:, 0, 0, 0] += 2.0  # distinct positives, some exact zeros (ReLU-like)
    got = ash_prune(maps, variant, p)
    assert got.shape == maps.shape
    for i in range(5):
        ref = _reference_shape(maps[i].reshape(-1).numpy(), variant, p)
        np.testing.assert_allclose(got[i].reshape(-1).numpy(), ref, rtol=1e-12, atol=1e-12)
    flat, s1 = got.reshape(5, -1), maps.reshape(5, -1).sum(1)
    assert ((flat != 0).sum(1) <= kept_count(72, p)).all()
    if variant == "ash_b":  # the binarised sample keeps its total activation
        torch.testing.assert_close(flat.sum(1), s1)


def test_kept_count_and_bad_arguments():
    assert kept_count(342, 90) == 34 and kept_count(342, 0) == 342 and kept_count(3136, 65) == 1098
    with pytest.raises(ValueError):
        kept_count(10, 100)
    with pytest.raises(ValueError):
        ash_prune(torch.rand(2, 3), "ash_x", 50)


def _model_and_images(n=37):
    torch.manual_seed(0)
    model = resnet_small(num_classes=10, in_channels=1, width=4, blocks=(1, 1, 1)).eval()
    with torch.no_grad():
        model.fc.bias.normal_(0, 0.3)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8)
    return model, images


def _reference_model_scores(model, images, variant, p, site):
    """Per sample: the last feature map, shaped by the reference (over C*H*W, or over D after pooling), pooled,
    through fc, logsumexp in float64."""
    w = model.fc.weight.detach().double().numpy()
    b = model.fc.bias.detach().double().numpy()
    out = []
    with torch.no_grad():
        for i in range(images.shape[0]):
            maps = model.feature_maps(images[i:i + 1].float() / 255)[0].double().numpy()  # (C, H, W)
            if site == SITE_MAP:
                pooled = _reference_shape(maps.ravel(), variant, p).reshape(maps.shape).mean((1, 2))
            else:
                pooled = _reference_shape(maps.mean((1, 2)), variant, p)
            z = w @ pooled + b
            out.append(z.max() + np.log(np.exp(z - z.max()).sum()))
    return np.array(out)


@pytest.mark.parametrize("site", [SITE_MAP, SITE_POOLED])
@pytest.mark.parametrize("variant, p", [("ash_p", 90), ("ash_b", 65), ("ash_s", 90), ("ash_s", 65)])
def test_model_scores_match_the_per_sample_reference(tmp_path, site, variant, p):
    model, images = _model_and_images()
    got = ash_scores(FeatureCache(tmp_path), model, weights_digest(model), images, "sum", Preprocess(12, 1), CPU,
                     variant, p, batch_size=8, site=site)
    ref = _reference_model_scores(model, images, variant, p, site)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, energy(model(images.float() / 255).detach().numpy()), atol=1e-3)


@pytest.mark.parametrize("site", [SITE_MAP, SITE_POOLED])
def test_ash_p_at_percentile_zero_is_plain_energy(tmp_path, site):
    model, images = _model_and_images()
    got = ash_scores(FeatureCache(tmp_path), model, "w", images, "sum", Preprocess(12, 1), CPU, "ash_p", 0, site=site)
    with torch.no_grad():
        plain = energy(model(images.float() / 255).numpy())
    np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-6)


def test_pooled_site_is_a_function_of_the_cached_features(tmp_path):
    model, images = _model_and_images()
    with torch.no_grad():
        feats = model.features(images.float() / 255).numpy()
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    assert ASH_SITE == SITE_POOLED
    for variant in ("ash_p", "ash_b", "ash_s"):
        np.testing.assert_allclose(ash_from_features(feats, w, b, variant),
                                   ash_scores(FeatureCache(tmp_path), model, "w", images, "sum", Preprocess(12, 1),
                                              CPU, variant), rtol=1e-5, atol=1e-5)


def test_each_variant_defaults_to_its_published_cifar10_percentile(tmp_path):
    """ASH-P@90, ASH-B@90, ASH-S@95 (the paper's CIFAR-10 rows): the default of every entry point is the variant's
    own value, checked against the per-sample reference at that percentile (and not at another one)."""
    assert ASH_PERCENTILE == {"ash_p": 90.0, "ash_b": 90.0, "ash_s": 95.0} and set(ASH_PERCENTILE) == set(ASH_VARIANTS)
    assert [percentile_of(v) for v in ("ash_p", "ash_b", "ash_s")] == [90.0, 90.0, 95.0]
    assert percentile_of("ash_s", 65) == 65
    with pytest.raises(ValueError):
        percentile_of("ash_x")
    rng = np.random.default_rng(1)
    feats = rng.random((6, 40)) * (rng.random((6, 40)) > 0.2)
    w, b = rng.normal(size=(10, 40)), rng.normal(size=10)
    for variant, p in (("ash_p", 90), ("ash_b", 90), ("ash_s", 95)):
        ref = [energy((w @ _reference_shape(f, variant, p) + b)[None])[0] for f in feats]
        np.testing.assert_allclose(ash_from_features(feats, w, b, variant), ref, rtol=1e-12)
    other = [energy((w @ _reference_shape(f, "ash_s", 90) + b)[None])[0] for f in feats]
    assert not np.allclose(ash_from_features(feats, w, b, "ash_s"), other)
    model, images = _model_and_images()
    got = ash_scores(FeatureCache(tmp_path), model, "w", images, "sum", Preprocess(12, 1), CPU, "ash_s")
    np.testing.assert_allclose(got, _reference_model_scores(model, images, "ash_s", 95, SITE_POOLED),
                               rtol=1e-4, atol=1e-4)


def test_cached_table_equals_separate_calls_and_runs_one_pass(tmp_path, monkeypatch):
    import ood_lib.ash as ash_module

    shaped = []
    real_prune = ash_module.ash_prune
    monkeypatch.setattr(ash_module, "ash_prune", lambda m, v, p: shaped.append((v, p)) or real_prune(m, v, p))
    model, images = _model_and_images()
    calls = []
    forward_maps = model.feature_maps

    def counting(x):
        calls.append(x.shape[0])
        return forward_maps(x)

    model.feature_maps = counting
    pre, digest = Preprocess(12, 1), weights_digest(model)
    configs = [("ash_p", 90), ("ash_b", 90), ("ash_s", 90), ("ash_s", 65), ("ash_b", 50)]
    table_cache = FeatureCache(tmp_path / "table")
    table = ash_score_table(table_cache, model, digest, images, "sum", pre, CPU, configs, site=SITE_MAP,
                            batch_size=10)
    assert sum(calls) == images.shape[0]  # one forward pass for all five configs
    assert set(table) == set(configs) and table_cache.misses == 5
    for variant, p in configs:
        alone = ash_scores(FeatureCache(tmp_path / f"{variant}{p}"), model, digest, images, "sum", pre, CPU,
                           variant, p, batch_size=10, site=SITE_MAP)
        np.testing.assert_allclose(table[(variant, p)], alone, rtol=1e-6, atol=1e-6)
    calls.clear()
    shaped.clear()
    again = ash_score_table(table_cache, model, digest, images, "sum", pre, CPU,
                            configs[:2] + [("ash_p", 65)], site=SITE_MAP, batch_size=10)
    assert sum(calls) == images.shape[0] and table_cache.hits == 2 and table_cache.misses == 6  # only the new one
    assert set(shaped) == {("ash_p", 65)}
    np.testing.assert_array_equal(again[("ash_p", 90)], table[("ash_p", 90)])
    # the key holds variant, percentile and site
    pooled = ash_scores(table_cache, model, digest, images, "sum", pre, CPU, "ash_p", 90, site=SITE_POOLED)
    assert table_cache.misses == 7 and not np.allclose(pooled, table[("ash_p", 90)])
