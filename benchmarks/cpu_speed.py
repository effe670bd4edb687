"""CPU speed of `cifar10-cpu`'s net, side by side in one process: prints images/s and seconds per epoch.

    python benchmarks/cpu_speed.py [--quick] [--compile]

The net and batch are the profile's (ResNet-18 at width 24, batch 64, the papers' crop + flip on the device). Each
row trains the same initial weights for two epochs of random uint8 CIFAR-shaped images with the library's own
``train`` and reports the second (warm) epoch; the rows differ only in precision (float32 / bf16 autocast), memory
format (contiguous / channels-last), threads and, with ``--compile``, ``torch.compile``. Then the float32 evaluation
(``features.extract``, what every per-epoch score runs) at 2 threads. The per-epoch seconds are for the profile's
10,000 training images and its 13,000 per-epoch scored images (2,000 ID test, 1,000 ID-val, 2,000 per OOD set).
Machines are noisy: compare rows of one run, not runs of different days.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ood_lib.config import TrainConfig, load_profile
from ood_lib.features import extract
from ood_lib.models import ARCHITECTURES
from ood_lib.results import device_name
from ood_lib.train import fast_paths, train

TRAIN_IMAGES = 10_000     # the profile's training subset, for seconds per epoch
SCORED_IMAGES = 13_000    # scored after every epoch


def timed_epoch(model, x, y, cfg: TrainConfig, threads: int, compile_model: bool = False) -> float:
    """Images/s of the second of two epochs (the first warms the kernels and, with compile, compiles)."""
    torch.set_num_threads(threads)
    m = copy.deepcopy(model)
    if compile_model:
        m = torch.compile(m)
    with tempfile.TemporaryDirectory() as d:
        hist = train(m, x, y, replace(cfg, epochs=2), seed=0, run_dir=Path(d), device=torch.device("cpu"),
                     log=lambda s: None)
    return hist[-1]["images_per_second"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run of the benchmark itself)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (compiling takes minutes)")
    args = ap.parse_args()
    p = load_profile("cifar10-cpu")
    n = 256 if args.quick else 2560
    torch.manual_seed(0)
    model = ARCHITECTURES[p.model.arch](num_classes=10, in_channels=p.data.channels,
                                        **{k: tuple(v) if isinstance(v, list) else v for k, v in p.model.options.items()})
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    cpu = torch.device("cpu")
    print(f"{device_name('cpu')}, torch {torch.__version__}; {p.model.arch} {p.model.options}, "
          f"{sum(q.numel() for q in model.parameters()):,} parameters, batch {p.train.batch_size}, {n} images an epoch")
    rows = []
    for bf16 in (False, True):
        for channels_last in (False, True):
            for threads in ((1, 2) if bf16 and channels_last else (2,)):
                cfg = replace(p.train, cpu_bf16=bf16, channels_last=channels_last)
                used = fast_paths(cpu, cfg.bf16, cfg.channels_last, cfg.cpu_bf16)
                rows.append((f"{'bf16 autocast' if used[0] else 'float32'}, "
                             f"{'channels-last' if used[1] else 'contiguous'}, {threads} thread(s)",
                             timed_epoch(model, x, y, cfg, threads)))
    if args.compile:
        cfg = p.train
        try:
            rows.append(("the profile's (bf16, channels-last), 2 threads, torch.compile",
                         timed_epoch(model, x, y, cfg, 2, compile_model=True)))
        except Exception as e:  # a benchmark reports what failed and goes on
            print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    base = rows[0][1]
    print(f"\ntraining{'':54s} images/s   s/epoch ({TRAIN_IMAGES:,} images)   vs float32 contiguous")
    for name, ips in rows:
        print(f"  {name:60s} {ips:8.0f}   {TRAIN_IMAGES / ips:8.1f}{'':22s} {ips / base:5.2f}x")

    torch.set_num_threads(p.threads)
    xe = torch.randint(0, 256, (4 * n, 3, 32, 32), dtype=torch.uint8)
    extract(model, xe[:p.eval.batch_size], cpu, p.eval.batch_size)  # warm-up
    t0 = time.perf_counter()
    extract(model, xe, cpu, p.eval.batch_size)
    ips = xe.shape[0] / (time.perf_counter() - t0)
    print(f"\nevaluation (float32, channels-last, logits + features, batch {p.eval.batch_size}, {p.threads} threads): "
          f"{ips:.0f} images/s -> {SCORED_IMAGES / ips:.1f} s for the {SCORED_IMAGES:,} images scored after every epoch")


if __name__ == "__main__":
    main()
