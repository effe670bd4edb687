"""Training: augmentation, schedule, determinism, exact resume after an interruption, the NaN guard."""
import dataclasses
import hashlib
import io
import math
import os
import warnings

import pytest
import torch

from ood_lib.config import TrainConfig
from ood_lib.models import resnet_small
from ood_lib.train import TrainingDiverged, augment, cosine_lr, load_epoch, read_checkpoint, train

CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, weight_decay=5e-4, crop_padding=2, flip=True)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return resnet_small(num_classes=3, in_channels=1, width=4, blocks=(1, 1, 1))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_cosine_schedule():
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 99, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.99)))


def test_augment_matches_a_manual_crop_and_flip():
    x = torch.rand(6, 2, 5, 7)
    out = augment(x, torch.Generator().manual_seed(3), crop_padding=2, flip=True)
    g = torch.Generator().manual_seed(3)  # replay the same draws
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7]
        expected = crop.flip(2) if flips[i] else crop
        assert torch.equal(out[i], expected)
    assert torch.equal(augment(x, torch.Generator(), crop_padding=0, flip=False), x)


def test_training_is_deterministic_on_cpu(tmp_path):
    x, y = _data()
    a, b = _model(), _model()
    ha = train(a, x, y, CFG, seed=1, run_dir=tmp_path / "a", device=torch.device("cpu"), log=lambda s: None)
    hb = train(b, x, y, CFG, seed=1, run_dir=tmp_path / "b", device=torch.device("cpu"), log=lambda s: None)
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = _model()
    train(c, x, y, CFG, seed=2, run_dir=tmp_path / "c", device=torch.device("cpu"), log=lambda s: None)
    assert not torch.equal(c.fc.weight, a.fc.weight)  # another seed, another run
    assert sorted(p.name for p in (tmp_path / "a").glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    x, y = _data()
    full = _model()
    train(full, x, y, CFG, seed=0, run_dir=tmp_path / "full", device=torch.device("cpu"), log=lambda s: None)

    def interrupt(epoch, model):
        if epoch == 2:
            raise KeyboardInterrupt  # killed after epoch 2's weights, before its resume state
        return {}

    first = _model()
    with pytest.raises(KeyboardInterrupt):
        train(first, x, y, CFG, seed=0, run_dir=tmp_path / "cut", device=torch.device("cpu"),
              on_epoch_end=interrupt, log=lambda s: None)
    assert read_checkpoint(tmp_path / "cut" / "state.pt", weights_only=False)["epoch"] == 1
    resumed = _model(seed=123)  # a fresh model with other weights: everything must come from the checkpoint
    history = train(resumed, x, y, CFG, seed=0, run_dir=tmp_path / "cut", device=torch.device("cpu"),
                    log=lambda s: None)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # a finished run is only reloaded
    again = _model(seed=7)
    train(again, x, y, CFG, seed=0, run_dir=tmp_path / "cut", device=torch.device("cpu"), log=lambda s: None)
    assert torch.equal(again.fc.weight, full.fc.weight)
    # and load_epoch gives the saved intermediate weights
    mid = load_epoch(_model(seed=9), tmp_path / "full", 2)
    assert not torch.equal(mid.fc.weight, full.fc.weight)


def test_a_run_that_keeps_no_epochs_holds_at_most_two_checkpoints_and_resumes_exactly(tmp_path):
    """Issue 18 (bounded disk): with ``keep_epochs=False`` every epoch is still written and scored (its digest in
    the history), but the previous epoch's checkpoint goes once the resume state is written: never more than two
    epoch files on disk, only the last at the end; an interrupted run resumes to the same weights."""
    x, y = _data()
    full = _model()
    history = train(full, x, y, CFG, seed=0, run_dir=tmp_path / "full", device=torch.device("cpu"),
                    log=lambda s: None)
    on_disk = []

    def count(epoch, model):
        on_disk.append(sorted(p.name for p in (tmp_path / "lean").glob("epoch_*.pt")))
        if epoch == 2 and len(on_disk) == 2:
            raise KeyboardInterrupt  # killed after epoch 2's weights, before its resume state
        return {}

    lean = _model()
    with pytest.raises(KeyboardInterrupt):
        train(lean, x, y, CFG, seed=0, run_dir=tmp_path / "lean", device=torch.device("cpu"), on_epoch_end=count,
              log=lambda s: None, keep_epochs=False)
    resumed = train(_model(seed=5), x, y, CFG, seed=0, run_dir=tmp_path / "lean", device=torch.device("cpu"),
                    on_epoch_end=count, log=lambda s: None, keep_epochs=False)
    assert on_disk == [["epoch_001.pt"], ["epoch_001.pt", "epoch_002.pt"], ["epoch_001.pt", "epoch_002.pt"],
                       ["epoch_002.pt", "epoch_003.pt"]]
    assert sorted(p.name for p in (tmp_path / "lean").glob("epoch_*.pt")) == ["epoch_003.pt"]
    assert [h["digest"] for h in resumed] == [h["digest"] for h in history]
    assert torch.equal(load_epoch(_model(seed=9), tmp_path / "lean", 3).fc.weight, full.fc.weight)


def test_resume_refuses_another_configuration(tmp_path):
    x, y = _data()
    train(_model(), x, y, TrainConfig(epochs=1, batch_size=16), seed=0, run_dir=tmp_path, device=torch.device("cpu"),
          log=lambda s: None)
    with pytest.raises(ValueError, match="another configuration"):
        train(_model(), x, y, TrainConfig(epochs=2, batch_size=16), seed=0, run_dir=tmp_path,
              device=torch.device("cpu"), log=lambda s: None)


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path):
    x, y = _data()
    model = _model()

    def poison(epoch, m):
        if epoch == 1:
            with torch.no_grad():
                m.fc.bias.fill_(float("nan"))
        return {}

    with pytest.raises(TrainingDiverged, match=r"epoch 2.*last good checkpoint.*epoch_001\.pt"):
        train(model, x, y, CFG, seed=0, run_dir=tmp_path, device=torch.device("cpu"), on_epoch_end=poison,
              log=lambda s: None)
    assert not (tmp_path / "epoch_002.pt").exists()
    # the checkpoint named as the last good one is good: read by hand (train.py's docstring: a 91-byte header line
    # with the SHA-256 of the torch.save bytes that follow), every tensor of the model's, all finite
    data = (tmp_path / "epoch_001.pt").read_bytes()
    assert data[:91] == b"ood_lib-checkpoint sha256=" + hashlib.sha256(data[91:]).hexdigest().encode() + b"\n"
    weights = torch.load(io.BytesIO(data[91:]), map_location="cpu", weights_only=True)
    assert set(weights) == set(_model().state_dict())
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# --- the fast paths: channels-last everywhere, bf16 autocast on CUDA (exercised here on the CPU) -------------------

def test_bf16_is_off_on_the_cpu_and_channels_last_is_on_where_asked(monkeypatch):
    from ood_lib import train as train_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_mod, "cpu_capability", lambda: "AVX512")
    assert train_mod.fast_paths(cpu, True, True) == (False, True)  # CPU runs stay float32
    assert train_mod.fast_paths(cpu, True, False) == (False, False)
    assert train_mod.fast_paths(torch.device("cuda"), True, False) == (True, False)
    monkeypatch.setattr(train_mod, "BF16_DEVICES", ("cuda", "cpu"))
    assert train_mod.fast_paths(cpu, True, True) == (True, True)
    # oneDNN's AVX2 channels-last weight gradient hangs or corrupts memory (train.CHANNELS_LAST_CPUS): contiguous
    for capability in ("AVX2", "DEFAULT", "NO AVX"):
        monkeypatch.setattr(train_mod, "cpu_capability", lambda: capability)
        assert train_mod.fast_paths(cpu, True, True) == (True, False)
        assert train_mod.fast_paths(torch.device("cuda"), True, True) == (True, True)
    monkeypatch.undo()
    assert train_mod.cpu_capability() == torch.backends.cpu.get_cpu_capability()
    assert train_mod.fast_paths(cpu, False, True)[1] == (train_mod.cpu_capability() == "AVX512")


def test_cpu_training_is_channels_last_deterministic_and_matches_contiguous_to_rounding(tmp_path):
    """On an AVX-512 CPU the convolutions see channels-last float32 tensors (elsewhere contiguous ones: the
    channels-last path is not run where oneDNN's AVX2 kernel hangs); two runs give identical weights, a run in the
    contiguous layout the same losses to rounding, and the checkpoints hold contiguous tensors either way."""
    from ood_lib.train import CHANNELS_LAST_CPUS, cpu_capability

    x, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=2, flip=True)
    model = _model()
    seen = []
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    conv.register_forward_hook(lambda m, inp, out: seen.append(
        (out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous())))
    runs = [train(m, x, y, cfg, seed=0, run_dir=tmp_path / name, device=torch.device("cpu"), log=lambda s: None)
            for m, name in ((model, "a"), (_model(), "b"))]
    assert seen and all(dtype == torch.float32 and cl == (cpu_capability() in CHANNELS_LAST_CPUS) for dtype, cl in seen)
    a, b = (read_checkpoint(tmp_path / name / "epoch_002.pt") for name in "ab")
    assert all(torch.equal(a[k], b[k]) and a[k].is_contiguous() for k in a)
    contiguous = train(_model(), x, y, dataclasses.replace(cfg, channels_last=False), seed=0,
                       run_dir=tmp_path / "c", device=torch.device("cpu"), log=lambda s: None)
    for r, c in zip(runs[0], contiguous):
        assert r["train_loss"] == pytest.approx(c["train_loss"], rel=1e-4)


def test_training_on_the_gpu_paths_runs_in_bf16_and_channels_last(tmp_path, monkeypatch):
    """The code that runs only on CUDA (autocast to bf16), with channels-last weights and batches, executed on the CPU:
    the convolutions see bf16 channels-last inputs, and the losses follow the float32 run's to bf16 precision."""
    from ood_lib import train as train_mod

    x, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=2, flip=True)
    exact = train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "fp32", device=torch.device("cpu"),
                  log=lambda s: None)
    monkeypatch.setattr(train_mod, "BF16_DEVICES", ("cuda", "cpu"))
    model = _model()
    seen = []
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # one with several input channels
    assert conv.in_channels > 1
    conv.register_forward_hook(lambda m, inp, out: seen.append(
        (out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous(),
         m.weight.is_contiguous(memory_format=torch.channels_last))))
    fast = train(model, x, y, cfg, seed=0, run_dir=tmp_path / "bf16", device=torch.device("cpu"), log=lambda s: None)
    assert seen and all(dtype == torch.bfloat16 for dtype, _, _ in seen)
    on_cuda = train_mod.fast_paths(torch.device("cuda"), True, True)[1]  # channels-last; on this CPU only with AVX-512
    expected = train_mod.cpu_capability() in train_mod.CHANNELS_LAST_CPUS
    assert on_cuda and all(cl_in == expected and (cl_w or not expected) for _, cl_in, cl_w in seen)
    for a, b in zip(exact, fast):
        assert math.isfinite(b["train_loss"]) and b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
    # the saved weights are plain float32 and load into a fresh model
    assert all(v.dtype in (torch.float32, torch.int64) for v in load_epoch(_model(), tmp_path / "bf16", 2)
               .state_dict().values())


def test_extraction_is_float32_on_the_gpu_paths_and_inside_an_autocast(monkeypatch):
    """Evaluation never runs in bf16 (issue 18): with the CUDA-only fast paths switched on for the CPU, and even
    inside an enclosing bf16 autocast, extract gives exactly the plain float32 forward pass."""
    from ood_lib import train as train_mod
    from ood_lib.features import extract

    x, _ = _data(n=40)
    model = _model().eval()
    with torch.no_grad():
        f = model.features(x.float() / 255)
        plain = {"features": f, "logits": model.fc(f)}
    monkeypatch.setattr(train_mod, "BF16_DEVICES", ("cuda", "cpu"))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            rounded = model(x.float() / 255)
        assert rounded.dtype == torch.bfloat16  # the autocast is really on around the call below
        out = extract(model, x, torch.device("cpu"), batch_size=16)
    for k in ("features", "logits"):
        assert out[k].dtype == "float32"
        assert abs(out[k] - plain[k].numpy()).max() <= 1e-5 * max(1.0, abs(plain[k].numpy()).max())
    assert abs(rounded.float().numpy() - plain["logits"].numpy()).max() > 1e-4  # bf16 would have shown


def _fp32_switches():
    from ood_lib.train import FP32_BACKENDS, _backend
    return {n: _backend(n).fp32_precision for n in FP32_BACKENDS}


def test_every_evaluation_pass_runs_in_ieee_float32_and_puts_the_switches_back(tmp_path):
    """Issue 18: cuDNN's convolutions default to TF32 on a GPU and PyTorch can be told to compute float32 matmuls in
    TF32 or bf16, so "fp32" evaluation needs more than autocast off. Every evaluation path of the library (extract,
    ODIN, ASH, the atypicality log-probabilities, UM's loss) runs its forward passes with every switch of
    FP32_BACKENDS at "ieee", with autocast off inside an enclosing bf16 autocast, channels-last; afterwards the
    switches, the autocast and the model's layout are as they were, also when a pass fails."""
    from ood_lib import atypical, features, um
    from ood_lib.train import FP32_BACKENDS, _backend, evaluation

    assert set(_fp32_switches()) == set(FP32_BACKENDS)  # this PyTorch has every switch (>= 2.9)
    x, y = _data(n=24)
    model = _model().eval()
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # every path runs it
    first_conv.register_forward_hook(lambda m, i, o: seen.append(
        (_fp32_switches(), torch.is_autocast_enabled("cpu"), i[0].is_contiguous(memory_format=torch.channels_last))))
    original = _fp32_switches()
    fast = {"cuda.matmul": "tf32", "cudnn.conv": "tf32", "cudnn.rnn": "tf32", "mkldnn.matmul": "bf16",
            "mkldnn.conv": "bf16", "mkldnn.rnn": "bf16"}
    cpu, pre = torch.device("cpu"), features.Preprocess(size=12, channels=1)
    cache = features.FeatureCache(tmp_path)
    try:
        for name, value in fast.items():
            _backend(name).fp32_precision = value
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            passes = [lambda: features.extract(model, x, cpu, batch_size=8),
                      lambda: features.odin_scores(cache, model, "w", x, "d", pre, cpu, 1000.0, 0.001),
                      lambda: features.ash_score_table(cache, model, "w", x, "d", pre, cpu, [("ash_p", 90.0)]),
                      lambda: atypical._log_probs(model, x, cpu, 8),
                      lambda: um.mean_loss(model, x, y, cpu, 8)]
            for run in passes:
                n = len(seen)
                run()
                assert len(seen) > n  # this path ran forward passes
            assert torch.is_autocast_enabled("cpu")
        assert _fp32_switches() == fast
        with pytest.raises(ZeroDivisionError):
            with evaluation(model):
                1 / 0
        assert _fp32_switches() == fast
    finally:
        for name, value in original.items():
            _backend(name).fp32_precision = value
    assert all(sw == dict.fromkeys(FP32_BACKENDS, "ieee") and not amp and cl for sw, amp, cl in seen)
    assert next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1).is_contiguous()


def test_cache_keys_name_the_precision_and_device_type_actually_used():
    """Issue 18: an evaluation entry's key names what it was computed in, never what a profile asked for: "fp32"
    on the CPU, "fp32, no TF32" on CUDA (earlier code left TF32 convolutions on there, under a key saying
    "fp32"), and the device type; the training precision (bf16 or not) is not part of it, because evaluation is
    float32 either way. So a CPU entry and a CUDA entry never share a file, and the CPU keys are those of the
    caches already on disk."""
    from ood_lib import results
    from ood_lib.config import load_profile
    from ood_lib.features import FeatureCache, Preprocess, input_key, pass_key

    model, pre = _model(), Preprocess(size=12, channels=1)
    key = {d: pass_key("logits", model, "w", "d", pre, torch.device(d)) for d in ("cpu", "cuda")}
    assert key["cpu"]["precision"] == "fp32" and key["cpu"]["device"] == "cpu"
    assert key["cuda"]["precision"] == "fp32, no TF32" and key["cuda"]["device"] == "cuda"
    assert FeatureCache.key(key["cpu"]) != FeatureCache.key(key["cuda"])
    assert {k: v for k, v in key["cpu"].items() if k not in ("precision", "device")} == \
        {k: v for k, v in key["cuda"].items() if k not in ("precision", "device")}
    # the CPU key as it was before this change: caches on disk stay valid
    assert FeatureCache.key(key["cpu"]) == FeatureCache.key(
        {"what": "logits", "weights": "w", "norm": input_key(model), "data": "d", "pre": pre.key(), "precision": "fp32",
         "device": "cpu", "layout": "channels_last"})
    # manifests and provenance say the same; a bf16-training profile evaluates in fp32 all the same
    profile = load_profile("cifar10")
    assert profile.train.bf16
    assert results.precision(profile, "cuda")["evaluation"] == "fp32, no TF32"
    assert results.precision(profile, "cpu")["evaluation"] == "fp32"


def test_training_on_a_gpu_turns_on_deterministic_kernels_and_restores_them(tmp_path, monkeypatch):
    """Issue 18: on CUDA, training runs with torch.use_deterministic_algorithms, cuDNN's deterministic algorithms
    without benchmarking and a fixed cuBLAS workspace (here "cpu" stands in for a device of
    DETERMINISTIC_DEVICES), so a base re-trained on another GPU machine can reproduce its recorded digest. The
    switches are on during every epoch and as before afterwards, and they change no CPU weights."""
    from ood_lib import train as train_mod

    x, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=2, flip=True)
    plain = train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "plain", device=torch.device("cpu"),
                  log=lambda s: None)
    monkeypatch.setattr(train_mod, "DETERMINISTIC_DEVICES", ("cpu",))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    cudnn.benchmark = True  # as a user's session might have it
    seen = []

    def look(epoch, model):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                     cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
    try:
        strict = train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "det", device=torch.device("cpu"),
                       on_epoch_end=look, log=lambda s: None)
        assert seen == [(True, True, True, False, ":4096:8")] * 2
        assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark) == \
            (before[0], before[1], True)

        def stop(epoch, model):
            raise RuntimeError("stopped by the test")
        with pytest.raises(RuntimeError, match="stopped by the test"):  # an interrupted run restores them too
            train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "stopped", device=torch.device("cpu"),
                  on_epoch_end=stop, log=lambda s: None)
        assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark) == \
            (before[0], before[1], True)
    finally:
        cudnn.benchmark = before[2]
    assert [h["digest"] for h in strict] == [h["digest"] for h in plain]
    assert train_mod.training_kernels(torch.device("cpu")) == "deterministic"

    # warn-only: an op without a deterministic kernel warns and the run goes on, not reproducible after all
    monkeypatch.setattr(train_mod, "NONDETERMINISTIC_OPS", set())

    def warned(epoch, model):  # the words torch uses
        warnings.warn("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but you set "
                      "'torch.use_deterministic_algorithms(True, warn_only=True)'.")
    with pytest.warns(UserWarning, match="adaptive_avg_pool2d_backward_cuda does not have"):  # still shown
        train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "warned", device=torch.device("cpu"),
              on_epoch_end=warned, log=lambda s: None)
    assert train_mod.training_kernels(torch.device("cpu")) == "nondeterministic: adaptive_avg_pool2d_backward_cuda"
    monkeypatch.setattr(train_mod, "NONDETERMINISTIC_OPS", set())
    monkeypatch.setattr(train_mod, "DETERMINISTIC_DEVICES", ("cuda",))
    assert train_mod.training_kernels(torch.device("cuda")) == "deterministic"
    monkeypatch.setattr(train_mod, "DETERMINISTIC_DEVICES", ())
    assert train_mod.training_kernels(torch.device("cuda")) == "nondeterministic"
    assert train_mod.training_kernels(torch.device("cpu")) == "deterministic"


def test_cpu_bf16_is_a_profile_switch_for_training_only():
    """train.cpu_bf16 turns bf16 autocast on for CPU training (cifar10-cpu); it means nothing on CUDA, where bf16
    training is already on; train.bf16 false turns it off everywhere."""
    from ood_lib.train import fast_paths, training_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast_paths(cpu, True, False, cpu_bf16=True) == (True, False)
    assert fast_paths(cpu, False, False, cpu_bf16=True) == (False, False)
    assert fast_paths(cuda, True, False, cpu_bf16=False) == (True, False)
    assert training_precision(TrainConfig(cpu_bf16=True), cpu) == "bf16-autocast"
    assert training_precision(TrainConfig(), cpu) == "fp32"
    assert training_precision(TrainConfig(bf16=False), cuda) == "fp32"


def test_cpu_bf16_training_runs_in_bf16_and_follows_float32(tmp_path):
    x, y = _data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, crop_padding=2, flip=True)
    exact = train(_model(), x, y, cfg, seed=0, run_dir=tmp_path / "fp32", device=torch.device("cpu"),
                  log=lambda s: None)
    model, seen = _model(), []
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    conv.register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    fast = train(model, x, y, dataclasses.replace(cfg, cpu_bf16=True), seed=0, run_dir=tmp_path / "bf16",
                 device=torch.device("cpu"), log=lambda s: None)
    assert seen and set(seen) == {torch.bfloat16}
    for a, b in zip(exact, fast):
        assert a["train_loss"] != b["train_loss"] and b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)


def test_dropped_epochs_are_answered_from_the_cache_by_their_recorded_digests(tmp_path):
    """Issue 18 (bounded disk): ``drop_checkpoints`` removes a finished run's epoch files but the kept ones and the
    last; ``base.epoch_weights`` keys each epoch by the digest ``train`` recorded, reads a checkpoint only when a
    pass must be computed, checks that checkpoint against the recorded digest, and names a dropped one clearly."""
    import numpy as np
    from ood_lib import base
    from ood_lib.features import FeatureCache, Preprocess, extract, logits
    from ood_lib.models import weights_digest
    from ood_lib.train import CheckpointDamaged, drop_checkpoints, recorded_digests, save_checkpoint

    x, y = _data()
    cpu, run = torch.device("cpu"), tmp_path / "run"
    train(_model(), x, y, CFG, seed=1, run_dir=run, device=cpu, log=lambda s: None)  # no on_epoch_end: still recorded
    digests = recorded_digests(run)
    probe = _model(5)
    assert digests == {e: weights_digest(load_epoch(probe, run, e)) for e in (1, 2, 3)}
    assert len(set(digests.values())) == 3
    cache, pre = FeatureCache(tmp_path / "cache"), Preprocess(12, 1)

    def z(epoch, data="set-a"):
        with base.epoch_weights(probe, run, epoch, digests, cache) as digest:
            return logits(cache, probe, digest, x, data, pre, cpu, 16)

    first = z(1)  # probe held epoch 3: the miss loads epoch 1 first
    assert np.array_equal(first, extract(load_epoch(_model(), run, 1), x, cpu, with_features=False)["logits"])
    with pytest.raises(ValueError, match="nothing is dropped"):
        drop_checkpoints(tmp_path / "empty", keep=())
    assert drop_checkpoints(run, keep={2}) > 0
    assert sorted(p.name for p in run.iterdir()) == ["epoch_002.pt", "epoch_003.pt", "state.pt"]
    load_epoch(probe, run, 3)
    assert np.array_equal(z(1), first) and cache.hits == 1  # from the cache: epoch 1's file is gone
    with pytest.raises(FileNotFoundError, match="dropped after its run finished"):
        z(1, data="set-b")  # a pass never cached needs the dropped file
    assert cache._on_miss is None  # the pending load never outlives its block
    save_checkpoint(_weights(load_epoch(probe, run, 3)), run / "epoch_002.pt")  # epoch 3's weights under 2's name
    with pytest.raises(CheckpointDamaged, match="recorded"):
        z(2)
