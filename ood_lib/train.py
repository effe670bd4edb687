"""Training: SGD with momentum and a per-epoch cosine schedule (the Unleashing Mask recipe, research notes §1).

The whole training set sits on the device as uint8; each batch is gathered, converted and augmented there
(random crop with zero padding, horizontal flip), so no data loader is involved. On CUDA the forward pass runs
in bf16 autocast with channels-last tensors. After every epoch the weights are written to
``run_dir/epoch_NNN.pt`` and the resume state to ``run_dir/state.pt``, both atomically. Everything random in
epoch e (batch order, crops, flips, dropout) is drawn from a generator seeded by (seed, e), so a run resumed
after an interruption gives exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ood_lib.atomic import atomic_write
from ood_lib.config import TrainConfig


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(name)


def atomic_save(obj, path: Path) -> None:
    """torch.save through ``atomic_write``: a crash never leaves half a checkpoint."""
    with atomic_write(path) as f:
        torch.save(obj, f)


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
          parameters: list[torch.nn.Parameter] | None = None) -> list[dict]:
    """Train ``model`` on uint8 ``images`` (N, C, H, W) and int64 ``labels``; return the per-epoch history.

    Resumes from ``run_dir/state.pt`` when it exists. ``on_epoch_end(epoch, model)`` may return extra values
    for the history (it runs after the epoch's checkpoint is written). Epochs are numbered from 1.
    ``objective`` maps the mini-batch mean cross-entropy to the loss that is minimised (default: itself; UM's
    flooding in ``ood_lib.um``); the history's ``train_loss`` is always the cross-entropy. ``parameters`` are
    what the optimiser updates (default: every parameter of the model).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters() if parameters is None else parameters, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    history: list[dict] = []
    start = 1
    state_path = run_dir / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != cfg.__dict__ or state["seed"] != seed:
            raise ValueError(f"{state_path} was written by another configuration or seed; "
                             f"remove {run_dir} to train afresh")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"] + 1
        if start <= cfg.epochs:
            log(f"resuming seed {seed} from epoch {state['epoch']} ({run_dir})")

    n = images.shape[0]
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
            if cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda and cfg.bf16):
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
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_save(weights, run_dir / f"epoch_{epoch:03d}.pt")
        if on_epoch_end is not None:
            entry.update(on_epoch_end(epoch, model) or {})
            model.train()
        history.append(entry)
        atomic_save({"epoch": epoch, "seed": seed, "config": cfg.__dict__, "model": weights,
                     "optimizer": opt.state_dict(), "history": history}, state_path)
        log(f"seed {seed} epoch {epoch:3d}/{cfg.epochs}  lr {lr:.4f}  loss {mean_loss:.4f}  "
            f"acc {entry['train_acc']:.4f}  {seconds:.1f}s ({entry['images_per_second']:.0f} img/s)"
            + "".join(f"  {k} {v:.4f}" for k, v in entry.items() if k.startswith("log_")))
    return history


def load_epoch(model: torch.nn.Module, run_dir: Path, epoch: int) -> torch.nn.Module:
    """Load the weights saved after ``epoch`` into ``model`` (strictly)."""
    path = Path(run_dir) / f"epoch_{epoch:03d}.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint for epoch {epoch}: {path} is missing; train first")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model
