"""Feature cache (content-hash keys, atomic, self-healing), preprocessing, and the results files."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ood_lib import results
from ood_lib.config import load_profile
from ood_lib.features import FeatureCache, Preprocess, correct, extract, logits, outputs
from ood_lib.models import resnet_small, weights_digest


def test_cache_computes_once_and_keys_on_content(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5.0)}

    parts = {"weights": "w1", "data": "d1"}
    first = cache.get(parts, compute)
    second = cache.get(parts, compute)
    assert len(calls) == 1 and np.array_equal(first["a"], second["a"]) and cache.hits == 1
    cache.get({"weights": "w2", "data": "d1"}, compute)
    assert len(calls) == 2
    cache.path(parts).write_bytes(b"not an npz")  # a damaged entry is recomputed, with a warning
    with pytest.warns(UserWarning, match="is damaged"):
        assert np.array_equal(cache.get(parts, compute)["a"], np.arange(5.0)) and len(calls) == 3
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_outputs_match_a_direct_forward_pass(tmp_path):
    torch.manual_seed(0)
    model = resnet_small(num_classes=4, in_channels=1, width=4, blocks=(1, 1, 1)).eval()
    images = torch.randint(0, 256, (10, 1, 12, 12), dtype=torch.uint8)
    cache = FeatureCache(tmp_path)
    pre = Preprocess(12, 1)
    o = outputs(cache, model, weights_digest(model), images, "sum", pre, torch.device("cpu"), batch_size=3)
    with torch.no_grad():
        ref = model(images.float() / 255)
    np.testing.assert_allclose(o["logits"], ref.numpy(), rtol=1e-5, atol=1e-6)
    assert o["features"].shape == (10, model.feature_dim)
    direct = extract(model, images, torch.device("cpu"), batch_size=3)  # same batches: bit-identical
    np.testing.assert_array_equal(direct["logits"], o["logits"])


def test_per_epoch_entries_hold_logits_or_bits_only(tmp_path):
    """Scoring after every epoch caches the logits alone, and the training images' correctness as a bit vector
    (issue 18: 106 MB of features per ResNet-18 epoch otherwise); both equal what the full pass gives."""
    torch.manual_seed(0)
    model = resnet_small(num_classes=4, in_channels=1, width=4, blocks=(1, 1, 1)).eval()
    images = torch.randint(0, 256, (13, 1, 12, 12), dtype=torch.uint8)
    labels = np.arange(13) % 4
    cache, pre, cpu, digest = FeatureCache(tmp_path), Preprocess(12, 1), torch.device("cpu"), weights_digest(model)
    full = outputs(cache, model, digest, images, "sum", pre, cpu, batch_size=5)
    z = logits(cache, model, digest, images, "sum", pre, cpu, batch_size=5)
    np.testing.assert_array_equal(z, full["logits"])
    ok = correct(cache, model, digest, images, labels, "sum", pre, cpu, batch_size=5)
    assert ok.dtype == bool and np.array_equal(ok, full["logits"].argmax(1) == labels)
    entries = {tuple(sorted(np.load(e).files)) for e in tmp_path.glob("*.npz")}
    assert entries == {("__sha256__", "features", "logits"), ("__sha256__", "logits"), ("__sha256__", "bits", "n")}
    bits = [np.load(e)["bits"] for e in tmp_path.glob("*.npz") if "bits" in np.load(e).files][0]
    assert bits.dtype == np.uint8 and bits.shape == (2,)  # 13 images in 2 bytes
    hits = cache.hits
    assert np.array_equal(correct(cache, model, digest, images, labels, "sum", pre, cpu), ok) and cache.hits == hits + 1
    other = correct(cache, model, digest, images, (labels + 1) % 4, "sum", pre, cpu)  # other labels: another entry
    assert np.array_equal(other, full["logits"].argmax(1) == (labels + 1) % 4) and cache.hits == hits + 1


def test_preprocess_converts_channels_and_size():
    gray = np.full((2, 28, 28, 1), 100, np.uint8)
    rgb = Preprocess(32, 3)(gray)
    assert rgb.shape == (2, 3, 32, 32) and rgb.dtype == torch.uint8 and int(rgb[0, 2, 5, 5]) == 100
    colour = np.zeros((1, 32, 32, 3), np.uint8)
    colour[..., 1] = 200
    g = Preprocess(28, 1)(colour)
    assert g.shape == (1, 1, 28, 28) and int(g[0, 0, 10, 10]) == round(0.587 * 200)
    same = Preprocess(28, 1)(gray)
    assert torch.equal(same, torch.from_numpy(gray).permute(0, 3, 1, 2))


def _rows(notebook, value):
    return pd.DataFrame([{"notebook": notebook, "seed": 0, "model": "base", "epoch": 1, "detector": "msp",
                          "id_set": "fashion_mnist", "ood_set": "mnist", "metric": "auroc", "value": value,
                          "split": "test"}])


def test_metrics_csv_replaces_only_the_notebooks_own_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path))
    results.write_metrics("p", "01", _rows("01", 0.5))
    results.write_metrics("p", "03", _rows("03", 0.7))
    results.write_metrics("p", "01", pd.concat([_rows("01", 0.6), _rows("01", 0.61)]))
    m = results.read_metrics("p")
    assert list(m.columns) == results.METRIC_COLUMNS
    assert sorted(m[m.notebook == "01"]["value"]) == [0.6, 0.61]
    assert list(m[m.notebook == "03"]["value"]) == [0.7]


def test_timings_and_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_RESULTS_DIR", str(tmp_path))
    t = results.Timer("smoke", "01", "cpu")
    with t.stage("train"):
        pass
    t.save()
    timings = pd.read_csv(tmp_path / "smoke" / "timings.csv", dtype={"notebook": str})
    assert list(timings.columns) == results.TIMING_COLUMNS + ["cached"] and timings.loc[0, "stage"] == "train"
    assert not timings.loc[0, "cached"]  # nothing was reused from a cache
    results.write_provenance(load_profile("smoke"), "01", "cpu", {"mnist/test": "abc"})
    doc = json.loads((tmp_path / "smoke" / "provenance.json").read_text())["01"]
    for key in ("git_commit", "packages", "device", "data_checksums", "profile", "seeds"):
        assert key in doc
    assert doc["packages"]["torch"] == torch.__version__.split("+")[0] or doc["packages"]["torch"].startswith("2.")


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    from ood_lib.atomic import atomic_write

    target = tmp_path / "metrics.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the new cont")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"


def test_evaluation_runs_channels_last_and_gives_the_model_back_in_its_layout():
    """extract() runs the convolutions on channels-last tensors and returns the plain forward pass's values (to
    float32 rounding); the model leaves in the layout it came in, so a training loop keeps its own."""
    torch.manual_seed(0)
    model = resnet_small(num_classes=3, in_channels=1, width=4, blocks=(1, 1)).eval()
    x = torch.randint(0, 256, (20, 1, 12, 12), dtype=torch.uint8)
    conv = model.layers[1][0].conv2  # 8 -> 8 channels, 3x3: its two layouts differ
    seen = []
    hook = conv.register_forward_hook(lambda m, inp, out: seen.append(
        inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    out = extract(model, x, torch.device("cpu"), batch_size=8)
    hook.remove()
    assert seen and all(seen)
    assert conv.weight.is_contiguous()  # contiguous again
    with torch.no_grad():
        plain = model(x.float() / 255).numpy()
    assert np.allclose(out["logits"], plain, rtol=1e-5, atol=1e-6)
    model.to(memory_format=torch.channels_last)
    extract(model, x, torch.device("cpu"), batch_size=8)
    assert not conv.weight.is_contiguous()  # a channels-last model stays channels-last
