"""Training: SGD with momentum and a per-epoch cosine schedule (the Unleashing Mask recipe, research notes §1).

The whole training set sits on the device as uint8; each batch is gathered, converted and augmented there
(random crop with zero padding, horizontal flip), so no data loader is involved. Tensors are channels-last; on
CUDA (and on the CPU where the profile sets ``train.cpu_bf16``) the forward pass runs in bf16 autocast. After every
epoch the weights are written to ``run_dir/epoch_NNN.pt`` and the resume state to ``run_dir/state.pt``, both
atomically, and the weights digest (``models.weights_digest``) goes into the history. Everything random in epoch e
(batch order, crops, flips, dropout) is drawn from a generator seeded by (seed, e), so a run resumed after an
interruption gives exactly the weights of an uninterrupted one. On CUDA, training runs with deterministic kernels
(``deterministic_kernels``), so a run re-trained on another machine of the same GPU model and PyTorch build gives
the same weights too; the CPU is deterministic as it is.

Checkpoint files carry their own checksum. PyTorch checks nothing on load (a flipped bit loads as a different
weight), so every file ``save_checkpoint`` writes is one header line, then the bytes of ``torch.save``::

    ood_lib-checkpoint sha256=<64 hex digits of the SHA-256 of the torch.save bytes that follow>\n
    <torch.save bytes>

One file holds both, so no crash between two writes can leave them disagreeing. ``read_checkpoint`` checks the
digest on the bytes in memory and unpickles those same bytes only when it matches; ``load_epoch`` and the
resume in ``train`` read through it. A damaged or truncated checkpoint stops with ``CheckpointDamaged``, naming
the file and the way out: remove the run folder and train again (only the latest optimizer state is kept, in
``state.pt``, so a run cannot restart at an earlier epoch exactly). Outside the library, read a file with
``read_checkpoint(path)``; by hand: ``tail -c +92 epoch_001.pt | sha256sum`` gives the digest in its first
line, and ``torch.load(io.BytesIO(data[91:]))`` its content. Files written before checksums existed (plain
``torch.save`` zip files) still load, with a warning that they are unchecked.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ood_lib import progress
from ood_lib.atomic import atomic_write
from ood_lib.config import TrainConfig
from ood_lib.models import state_digest
from ood_lib.progress import note_work

CHECKPOINT_MAGIC = b"ood_lib-checkpoint sha256="
HEADER_SIZE = len(CHECKPOINT_MAGIC) + 64 + 1   # magic, hex digest, newline: 91 bytes


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose content does not match its recorded SHA-256, or that cannot be read at all."""


# Device types on which training autocasts to bf16 when TrainConfig.bf16 asks for it; the CPU only where a profile
# also sets TrainConfig.cpu_bf16 (cifar10-cpu), otherwise it trains in exact float32, deterministically. Evaluation
# (features.extract, ODIN, the masked losses) is float32 on every device. Channels-last tensors
# (TrainConfig.channels_last) are used on every device but CPUs without AVX-512 (CHANNELS_LAST_CPUS): in float32 on
# an AVX-512 CPU, the default profile's weights came out bit-identical to the contiguous layout's at every epoch
# (PyTorch 2.14), at the same training speed within a few percent. Tests add "cpu" here to exercise the CUDA path
# on a machine without a GPU.
BF16_DEVICES = ("cuda",)


# Device types on which training turns on deterministic kernels (``deterministic_kernels``). By default cuDNN may
# pick convolution algorithms by benchmark and several CUDA backward kernels accumulate with atomics, so two runs of
# one seed need not give the same weights; the CPU kernels this library trains with are deterministic as they are
# (a re-trained base matches its recorded digest: tests/test_shards.py). Tests add "cpu".
DETERMINISTIC_DEVICES = ("cuda",)
# Ops that warned, in this process, that they have no deterministic kernel (warn-only mode): a run that used one is
# not reproducible after all, and ``training_kernels`` says so from then on.
NONDETERMINISTIC_OPS: set[str] = set()
_NO_DETERMINISTIC_KERNEL = "does not have a deterministic implementation"


@contextlib.contextmanager
def deterministic_kernels(device: torch.device):
    """Training on a device of DETERMINISTIC_DEVICES with deterministic kernels: ``torch.use_deterministic_algorithms``
    (warn-only: an op without a deterministic kernel warns once and the run goes on), cuDNN's deterministic
    algorithms without benchmarking, and cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set; it
    must be in the environment before the process's first cuBLAS call, so ``scripts/device_shard.sh`` exports it).
    What a re-training reproduces is checked by its weights digest, never assumed (``shards.Runner.model``).
    Restores the previous torch and cuDNN settings on exit (a strict mode set by the caller stays strict; the
    environment variable stays); elsewhere it changes nothing."""
    if device.type not in DETERMINISTIC_DEVICES:
        yield
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and device.type == "cuda" and torch.cuda.is_initialized():
        warnings.warn("CUBLAS_WORKSPACE_CONFIG is set only now, after CUDA was initialised in this process: if cuBLAS "
                      "has run already, its matmuls may stay nondeterministic (export CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                      "before starting Python; the weights digest check will tell)", stacklevel=3)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=before[1] if before[0] else True)
    cudnn.deterministic, cudnn.benchmark = True, False
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message=f".*{_NO_DETERMINISTIC_KERNEL}")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]
        for w in caught:  # shown once training ends; the ops without a deterministic kernel are remembered
            text = str(w.message)
            if _NO_DETERMINISTIC_KERNEL in text:
                NONDETERMINISTIC_OPS.add(text.split(f" {_NO_DETERMINISTIC_KERNEL}")[0].strip())
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def training_kernels(device: torch.device) -> str:
    """'deterministic' where training is reproducible bit for bit on the same hardware and PyTorch build: the CPU,
    and the devices of DETERMINISTIC_DEVICES unless an op of this process warned it has no deterministic kernel
    (then 'nondeterministic: <ops>'); recorded in provenance and shard manifests."""
    if device.type not in DETERMINISTIC_DEVICES:
        return "deterministic" if device.type == "cpu" else "nondeterministic"
    return f"nondeterministic: {', '.join(sorted(NONDETERMINISTIC_OPS))}" if NONDETERMINISTIC_OPS else "deterministic"


# PyTorch CPU kernel sets (``cpu_capability``) on which training may use channels-last. oneDNN's AVX2 kernel for
# the weight gradient of a 1x1 convolution in channels-last layout (jit_1x1:avx2 backward_weights, PyTorch 2.14.1)
# hangs or corrupts memory: on a 2-core AMD EPYC (Zen 1, AVX2; 2026-12-05), 12 of 15 short training runs of a
# width-4 ResNet in channels-last hung in their first steps or aborted ("double free or corruption"), none of 10 in
# the contiguous layout. Training on such CPUs keeps the contiguous layout; evaluation (forward passes and ODIN's
# input gradient, no weight gradient) ran clean there and stays channels-last everywhere.
CHANNELS_LAST_CPUS = ("AVX512",)


def cpu_capability() -> str:
    """The instruction set of PyTorch's CPU kernels on this machine ("AVX2", "AVX512", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def fast_paths(device: torch.device, bf16: bool, channels_last: bool, cpu_bf16: bool = False) -> tuple[bool, bool]:
    """(bf16 autocast, channels-last) of a training run on ``device``: bf16 where asked for on a device of
    BF16_DEVICES, or on the CPU with ``cpu_bf16``; channels-last where asked for, on the CPU only where its kernels
    are among CHANNELS_LAST_CPUS."""
    on = device.type in BF16_DEVICES or (device.type == "cpu" and cpu_bf16)
    return on and bf16, channels_last and (device.type != "cpu" or cpu_capability() in CHANNELS_LAST_CPUS)


def native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (x86 with AVX-512 or AMX; PyTorch's own check). Elsewhere CPU
    bf16 autocast is emulated and far slower than float32: cifar10-cpu's net (ResNet-18 at width 24, batch 64,
    2 threads) trained at 8 images/s in bf16 against 74 in float32 on an AVX2 AMD EPYC (2026-12-05), where an
    avx512_bf16 Xeon of the same size trains it at about 360 images/s in bf16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def training_precision(cfg: TrainConfig, device: torch.device) -> str:
    """'bf16-autocast' or 'fp32': what a run of ``cfg`` on ``device`` trains in (recorded in provenance)."""
    return "bf16-autocast" if fast_paths(device, cfg.bf16, False, cfg.cpu_bf16)[0] else "fp32"


# The float32 backends of convolutions and matmuls that may trade precision for speed: cuDNN's convolutions default
# to TF32 (10 mantissa bits) on Ampere and later GPUs, and PyTorch can be told to run float32 matmuls in TF32 or, on
# oneDNN CPUs, in bf16. An evaluation pass pins them all to IEEE float32 (PyTorch >= 2.9 names them this way).
FP32_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _backend(name: str):
    """``torch.backends.<name>`` where it has an ``fp32_precision`` switch, else None."""
    obj = torch.backends
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj if hasattr(obj, "fp32_precision") else None


@contextlib.contextmanager
def evaluation(model: torch.nn.Module):
    """An evaluation pass of ``model`` in the study's one convention: float32 with IEEE arithmetic on every device
    (no autocast, even inside an enclosing one; no TF32 or implicit bf16 for float32 convolutions and matmuls,
    ``FP32_BACKENDS``), and channels-last memory format. The model and the backends are put back as they were
    afterwards, also when the pass fails. Training has its own switches (``TrainConfig.bf16``, ``.channels_last``).
    Channels-last gives the same values to rounding; on 2 CPU cores the study's per-epoch scoring ran about 10%
    faster in it (42 s against 47 s per 30-epoch run)."""
    # a conv weight whose two layouts differ (more than one input channel and a spatial kernel) tells which one it has
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    was = bool(convs) and not convs[0].is_contiguous()
    device_type = next(model.parameters()).device.type
    backends = [b for b in map(_backend, FP32_BACKENDS) if b is not None]
    before = [b.fp32_precision for b in backends]
    legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if not backends else None
    model.to(memory_format=torch.channels_last)
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        if legacy is not None:  # PyTorch before 2.9
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device_type=device_type, enabled=False):
            yield model
    finally:
        for b, value in zip(backends, before):
            b.fp32_precision = value
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
        if not was:
            model.to(memory_format=torch.contiguous_format)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(name)


def save_checkpoint(obj, path: Path) -> str:
    """``torch.save`` ``obj`` behind a header line with the SHA-256 of the saved bytes (module docstring),
    through ``atomic_write``: a crash never leaves half a checkpoint. Returns the hex digest."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    with atomic_write(path) as f:
        f.write(CHECKPOINT_MAGIC + digest.encode() + b"\n")
        f.write(payload)
    return digest


def read_checkpoint(path: Path, way_out: str = "", map_location="cpu", weights_only: bool = True):
    """The object ``save_checkpoint`` wrote to ``path``, after checking its SHA-256 on the bytes in memory.

    Raises ``CheckpointDamaged`` (naming ``path`` and ending with ``way_out``) when the file is truncated, altered
    or unreadable; ``FileNotFoundError`` when it does not exist. A file without a header (written before
    checksums were recorded) is loaded unchecked, with a warning.
    """
    path = Path(path)

    def damaged(reason: str) -> CheckpointDamaged:
        return CheckpointDamaged(f"checkpoint {path} is damaged: {reason}. Its content cannot be trusted and was "
                                 f"not used." + (f" {way_out}" if way_out else ""))

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise damaged(f"it cannot be read ({e.strerror or e})") from None
    if data.startswith(CHECKPOINT_MAGIC):
        header, payload = data[:HEADER_SIZE], memoryview(data)[HEADER_SIZE:]
        recorded = header[len(CHECKPOINT_MAGIC):-1].decode("ascii", "replace")
        if len(header) < HEADER_SIZE or not header.endswith(b"\n"):
            raise damaged(f"its header line is incomplete or damaged ({len(data)} bytes in all; truncated?)")
        found = hashlib.sha256(payload).hexdigest()
        if found != recorded:
            raise damaged(f"the SHA-256 of its content is {found}, the one recorded when it was written is "
                          f"{recorded} ({len(payload)} bytes of content: truncated or altered)")
        source = io.BytesIO(payload)
    elif data.startswith(b"PK\x03\x04"):
        warnings.warn(f"checkpoint {path} has no recorded checksum (written before checksums were recorded); "
                      f"it is loaded unchecked. {way_out}".rstrip(), stacklevel=3)
        source = io.BytesIO(data)
    else:
        raise damaged(f"it starts with {bytes(data[:16])!r}, neither the checkpoint header "
                      f"{CHECKPOINT_MAGIC.decode()}... nor a torch zip file ({len(data)} bytes)")
    try:
        return torch.load(source, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # a matching checksum makes this unlikely; an unchecked old file may well be broken
        raise damaged(f"torch.load failed: {type(e).__name__}: {e}") from None


def _retrain_hint(run_dir: Path) -> str:
    return (f"Way out: remove the run folder {run_dir} (rm -r '{run_dir}') and run again: that run is trained "
            f"afresh from epoch 1 (an earlier epoch cannot be resumed exactly, since only the latest optimizer "
            f"state is kept). Feature caches are keyed by the weights, so nothing else needs removing.")


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """lr for 0-based epoch e of E: base * (1 + cos(pi e / E)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * base_lr


def augment(x: torch.Tensor, gen: torch.Generator, crop_padding: int, flip: bool) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a float batch (B, C, H, W), on its own device."""
    b, c, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * p)
        padded = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
        x = padded.gather(3, cols)
    if flip:
        mask = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, seed: int,
          run_dir: Path, device: torch.device,
          on_epoch_end: Callable[[int, torch.nn.Module], dict] | None = None,
          log: Callable[[str], None] = print,
          objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
          parameters: list[torch.nn.Parameter] | None = None, name: str = "train",
          keep_epochs: bool = True) -> list[dict]:
    """Train ``model`` on uint8 ``images`` (N, C, H, W) and int64 ``labels``; return the per-epoch history.

    Resumes from ``run_dir/state.pt`` when it exists. ``on_epoch_end(epoch, model)`` may return extra values
    for the history (it runs after the epoch's checkpoint is written). Epochs are numbered from 1.
    ``objective`` maps the mini-batch mean cross-entropy to the loss that is minimised (default: itself; UM's
    flooding in ``ood_lib.um``); the history's ``train_loss`` is always the cross-entropy. ``parameters`` are
    what the optimiser updates (default: every parameter of the model). ``name`` labels the progress bar.
    ``keep_epochs=False``: an epoch's checkpoint is removed once the next epoch's resume state is written (after
    ``on_epoch_end`` scored it), so the folder holds at most two epoch checkpoints and, at the end, only the last;
    for runs whose later passes all come from the cache (their digests stay in the history, ``drop_checkpoints``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    cuda = device.type == "cuda"
    bf16, channels_last = fast_paths(device, cfg.bf16, cfg.channels_last, cfg.cpu_bf16)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters() if parameters is None else parameters, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    history: list[dict] = []
    start = 1
    state_path = run_dir / "state.pt"
    if state_path.exists():
        state = read_checkpoint(state_path, "It is the resume state: it holds the optimizer state that an exact "
                                "resume needs and that is kept nowhere else, so the run cannot continue from its "
                                "epoch checkpoints. " + _retrain_hint(run_dir), map_location=device,
                                weights_only=False)
        if state["config"] != cfg.__dict__ or state["seed"] != seed:
            raise ValueError(f"{state_path} was written by another configuration or seed; "
                             f"remove {run_dir} to train afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"] + 1
        if start <= cfg.epochs:
            log(f"resuming seed {seed} from epoch {state['epoch']} ({run_dir})")
        else:
            note_work("reused")  # a finished run: only reloaded

    n = images.shape[0]
    with progress.Bar(cfg.epochs, f"{name} seed {seed}", unit="epoch", initial=start - 1) as bar, \
            deterministic_kernels(device):
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = cosine_lr(cfg.lr, epoch - 1, cfg.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            gen = torch.Generator(device=device).manual_seed(_epoch_seed(seed, epoch))
            torch.manual_seed(_epoch_seed(seed, epoch))  # dropout and anything else drawing from the global RNG
            model.train()
            order = torch.randperm(n, generator=gen, device=device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for step, first in enumerate(range(0, n, cfg.batch_size)):
                idx = order[first:first + cfg.batch_size]
                if idx.numel() < 2:  # BatchNorm cannot train on a single image
                    continue
                x = augment(images[idx].float().div_(255), gen, cfg.crop_padding, cfg.flip)
                y = labels[idx]
                if channels_last:
                    x = as_channels_last(x)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                    ce = F.cross_entropy(out.float(), y)
                loss = ce if objective is None else objective(ce)
                if (step % 20 == 0 or not cuda) and not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"training loss is {loss.item()} at epoch {epoch}, step {step} (lr {lr:.4g}, seed {seed}). "
                        f"Nothing was saved for this epoch; the last good checkpoint is "
                        f"{run_dir / f'epoch_{epoch - 1:03d}.pt'}. Lower train.lr or check the data.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += ce.detach() * y.numel()
                correct += (out.argmax(1) == y).sum()
                seen += y.numel()
            mean_loss = (loss_sum / seen).item()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"training loss is {mean_loss} over epoch {epoch} (seed {seed}); "
                                       f"the last good checkpoint is {run_dir / f'epoch_{epoch - 1:03d}.pt'}")
            seconds = time.perf_counter() - t0
            entry = {"epoch": epoch, "lr": lr, "train_loss": mean_loss, "train_acc": correct.item() / seen,
                     "train_seconds": seconds, "images_per_second": seen / seconds}
            # contiguous copies: the file's bytes do not depend on the layout the model trained in
            weights = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                       for k, v in model.state_dict().items()}
            entry["digest"] = state_digest(weights)
            save_checkpoint(weights, run_dir / f"epoch_{epoch:03d}.pt")
            note_work("computed")
            if on_epoch_end is not None:
                entry.update(on_epoch_end(epoch, model) or {})
                model.train()
            history.append(entry)
            save_checkpoint({"epoch": epoch, "seed": seed, "config": cfg.__dict__, "model": weights,
                         "optimizer": opt.state_dict(), "history": history}, state_path)
            if not keep_epochs:
                (run_dir / f"epoch_{epoch - 1:03d}.pt").unlink(missing_ok=True)
            log(f"seed {seed} epoch {epoch:3d}/{cfg.epochs}  lr {lr:.4f}  loss {mean_loss:.4f}  "
                f"acc {entry['train_acc']:.4f}  {seconds:.1f}s ({entry['images_per_second']:.0f} img/s)"
                + "".join(f"  {k} {v:.4f}" for k, v in entry.items() if k.startswith("log_")))
            bar.update()
    return history


def load_epoch(model: torch.nn.Module, run_dir: Path, epoch: int) -> torch.nn.Module:
    """Load the weights saved after ``epoch`` into ``model`` (strictly), after checking the file's SHA-256.

    Raises ``FileNotFoundError`` when the checkpoint does not exist and ``CheckpointDamaged`` when it is
    truncated or altered (the message names the file and the way out)."""
    path = Path(run_dir) / f"epoch_{epoch:03d}.pt"
    if not path.exists():
        if epoch in recorded_digests(run_dir):
            raise FileNotFoundError(
                f"the checkpoint of epoch {epoch} was dropped after its run finished ({path}; the profile sets "
                f"keep_epoch_checkpoints: false), and a pass over it that was never cached needs it now. Way out: "
                f"remove {run_dir} and run again with keep_epoch_checkpoints: true (it is re-trained).")
        raise FileNotFoundError(f"no checkpoint for epoch {epoch}: {path} is missing; train first")
    model.load_state_dict(read_checkpoint(path, _retrain_hint(Path(run_dir)), map_location="cpu"))
    note_work("reused")
    return model


def recorded_digests(run_dir: Path) -> dict[int, str]:
    """{epoch: weights digest} of the epochs a run in ``run_dir`` has finished, from its resume state (empty when
    there is none). Runs trained before ``train`` recorded digests for every epoch miss those it did not score."""
    path = Path(run_dir) / "state.pt"
    if not path.exists():
        return {}
    state = read_checkpoint(path, _retrain_hint(Path(run_dir)), weights_only=False)
    return {int(h["epoch"]): str(h["digest"]) for h in state["history"] if isinstance(h.get("digest"), str)}


def drop_checkpoints(run_dir: Path, keep) -> int:
    """Remove the epoch checkpoints of a FINISHED run in ``run_dir`` except the epochs in ``keep`` and its last
    one; returns the bytes freed. The resume state stays, so the run still counts as finished and is not
    re-trained; what the dropped epochs gave is read from the feature cache by their recorded digests
    (``recorded_digests``), and only a pass that was never cached needs them again (``load_epoch`` then says so)."""
    run_dir = Path(run_dir)
    done = recorded_digests(run_dir)
    if not done:
        raise ValueError(f"{run_dir} holds no finished epochs with recorded digests; nothing is dropped")
    keep = {int(e) for e in keep} | {max(done)}
    freed = 0
    for path in sorted(run_dir.glob("epoch_*.pt")):
        epoch = int(path.stem.removeprefix("epoch_"))
        if epoch in keep or epoch not in done:
            continue
        freed += path.stat().st_size
        path.unlink()
    return freed
