"""Speed of the training loop and of feature extraction: prints images per second and seconds per epoch.

    python benchmarks/speed.py [--quick]

On the CPU: the default profile's model (Fashion-MNIST shape). On CUDA, in addition: ResNet-18 and
DenseNet-BC-100 on CIFAR-10 shapes at batch 256 with the per-epoch evaluation of notebook 01 (logits of
10,000 ID + 2 x 5,000 OOD images, ODIN on the same), so the figure is comparable with the issue's goals.
Inputs are random uint8 images of the right shape (speed does not depend on pixel values); the code timed
is the library's own ``train`` and ``extract``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ood_lib.config import TrainConfig, load_profile
from ood_lib.detectors import odin
from ood_lib.features import extract
from ood_lib.models import densenet_bc, resnet18, resnet_small
from ood_lib.train import resolve_device, train


def timed_training(model, n, shape, classes, cfg, device, repeats=1):
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    y = torch.randint(0, classes, (n,))
    with tempfile.TemporaryDirectory() as d:
        hist = train(model, x, y, cfg, seed=0, run_dir=Path(d), device=device, log=lambda s: None)
    return hist[-1]["train_seconds"], hist[-1]["images_per_second"]  # last epoch: warm


def timed_eval(model, n, shape, device, batch_size, with_odin=True):
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    extract(model, x[:batch_size], device, batch_size)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    extract(model, x, device, batch_size)
    t_extract = time.perf_counter() - t0
    t_odin = float("nan")
    if with_odin:
        t0 = time.perf_counter()
        odin(model.eval(), x.float().div(255).to(device), batch_size=min(batch_size, 500))
        t_odin = time.perf_counter() - t0
    return t_extract, t_odin


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images (a smoke run of the benchmark itself)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    p = load_profile("default")
    n = 1000 if args.quick else 5000
    torch.manual_seed(0)
    model = resnet_small(num_classes=10, in_channels=1, **{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in p.model.options.items()})
    cfg = TrainConfig(**{**p.train.__dict__, "epochs": 2})
    sec, ips = timed_training(model, n, (1, 28, 28), 10, cfg, device)
    t_ex, t_odin = timed_eval(model, n, (1, 28, 28), device, p.eval.batch_size)
    print(f"default model ({p.model.arch} {p.model.options}, {sum(q.numel() for q in model.parameters()):,} params) "
          f"on {device.type}:")
    print(f"  training      {ips:8.0f} images/s (batch {cfg.batch_size}, {n} images per epoch)")
    print(f"  extraction    {n / t_ex:8.0f} images/s (logits + features, batch {p.eval.batch_size})")
    print(f"  ODIN          {n / t_odin:8.0f} images/s")

    if device.type != "cuda":
        print("no CUDA device: the GPU figures (ResNet-18 / DenseNet-BC-100 on CIFAR-10 shapes) are skipped")
        return
    for name, build, batch in (("resnet18", lambda: resnet18(num_classes=10), 256),
                               ("densenet_bc100", lambda: densenet_bc(num_classes=10), 256)):
        torch.manual_seed(0)
        model = build()
        cfg = TrainConfig(epochs=2, batch_size=batch)
        n_train = 10_000 if args.quick else 50_000
        sec, ips = timed_training(model, n_train, (3, 32, 32), 10, cfg, device)
        t_ex, t_odin = timed_eval(model, 20_000, (3, 32, 32), device, 1000)
        epoch = 50_000 / ips
        print(f"{name} on CIFAR-10 shapes, batch {batch}, channels-last, bf16 training, float32 evaluation:")
        print(f"  training      {ips:8.0f} images/s -> {epoch:.2f} s per 50k-image epoch")
        print(f"  evaluation    {t_ex:.2f} s logits+features of 20k images, {t_odin:.2f} s ODIN "
              f"({100 * t_ex / (epoch + t_ex):.1f}% of an epoch without ODIN)")


if __name__ == "__main__":
    main()
