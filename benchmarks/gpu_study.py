"""The paper-scale study's speed on a GPU: the figures its shards are planned with. Prints a table; no test asserts it.

    python benchmarks/gpu_study.py [--quick] [--processes 1,2,3] [--out results.csv]

1. ResNet-18 on CIFAR-10 shapes at batch 256 (bf16 autocast, channels-last, batches and augmentation on the GPU):
   wall seconds per epoch of 49,000 training images, INCLUDING what the `base` stage does around every epoch with
   the stage's own code: the weights digest and checkpoint writes of ``train``, then (``base.epoch_scorer``) logits of
   every evaluation set (10,000 ID test, 1,000 ID val, and a val and a test half of four OOD sets of 10,000) and the
   training set's correctness through a ``FeatureCache`` on disk, and the logit detectors' metrics (goal: at most
   1.0 s beside the training).
   Then training alone with deterministic kernels (``train.deterministic_kernels``, what the study uses on CUDA so
   that a re-trained base reproduces its digest) against the default ones, two runs each: time ratio and whether the
   two runs of one seed end with the same weights.
2. The same run in k processes at once on one GPU (several seeds or arms sharing it): total images per second
   against one process alone, so the shard plan knows whether running stages side by side pays.
3. DenseNet-BC-100 (the Unleashing Mask checkpoint's architecture) training, seconds per epoch at batch 64 (the
   official configuration's) and 256, plain (goal for the 100-epoch fine-tunes: at most 4 s per epoch).
Inputs are random uint8 images (speed does not depend on pixel values); the code timed is the library's own
``train``, ``features.extract``, detectors and metrics. ``--quick`` shrinks everything (a CPU run of the script).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

# the repository root on the path, here and in the worker processes: on the device machine nothing is installed
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

from ood_lib import metrics
from ood_lib.config import TrainConfig
from ood_lib.detectors import LOGIT_DETECTORS
from ood_lib.features import FeatureCache, Preprocess, correct, logits
from ood_lib.models import densenet_bc, resnet18, resnet_small, weights_digest
from ood_lib.train import resolve_device, train

PRE = Preprocess(size=32, channels=3)
EVAL_SETS = {"id_test": 10_000, "id_val": 1_000, **{f"ood{i}_{h}": 5_000 for i in range(4) for h in ("val", "test")}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def study_epochs(arch: str, n: int, epochs: int, batch: int, device: torch.device, evaluate: bool,
                 scale: float = 1.0) -> list[dict]:
    """Train ``arch`` for ``epochs`` on n random images; after each epoch score every evaluation set like the
    base stage does. Returns the per-epoch history with ``train_seconds``, ``eval_seconds`` (with ``evaluate``) and
    ``wall_seconds`` (the whole epoch, checkpoint writes and digests included)."""
    torch.manual_seed(0)
    build = {"resnet18": lambda: resnet18(num_classes=10), "densenet_bc100": lambda: densenet_bc(num_classes=10),
             "resnet_small": lambda: resnet_small(num_classes=10, in_channels=3, width=8, blocks=(1, 1, 1))}[arch]
    model = build()
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    sets = {name: torch.randint(0, 256, (max(2, int(size * scale)), 3, 32, 32), dtype=torch.uint8).to(device)
            for name, size in EVAL_SETS.items()}

    cfg = TrainConfig(epochs=epochs, batch_size=batch)
    with tempfile.TemporaryDirectory() as d:
        cache = FeatureCache(Path(d) / "cache")  # the stage's own cache: entries written to disk and read back
        ends = [time.perf_counter()]

        def on_epoch_end(epoch, m):
            _sync(device)
            t0 = time.perf_counter()
            out = {}
            if evaluate:  # what the base stage's scorer does (base.epoch_scorer, with_train_correct)
                digest = weights_digest(m)
                scores = {}
                for name, images in sets.items():
                    z = logits(cache, m, digest, images, name, PRE, device, batch_size=2000)
                    scores[name] = {d: f(z) for d, f in LOGIT_DETECTORS.items()}
                correct(cache, m, digest, x, y.numpy(), "train", PRE, device, batch_size=2000)
                for split in ("val", "test"):
                    id_name = "id_test" if split == "test" else "id_val"
                    for i in range(4):
                        for det in LOGIT_DETECTORS:
                            metrics.all_metrics(scores[id_name][det], scores[f"ood{i}_{split}"][det])
                _sync(device)
                out["eval_seconds"] = time.perf_counter() - t0
            # the epoch's whole wall time: training, the weights digest, the checkpoint write, this scoring and the
            # resume state of the epoch before (written after this callback)
            ends.append(time.perf_counter())
            out["wall_seconds"] = ends[-1] - ends[-2]
            return out

        return train(model, x, y, cfg, seed=0, run_dir=Path(d) / "run", device=device, on_epoch_end=on_epoch_end,
                     log=lambda s: None)


def _worker(args):
    arch, n, epochs, batch, device_name, scale = args
    device = torch.device(device_name)
    t0 = time.perf_counter()
    hist = study_epochs(arch, n, epochs, batch, device, evaluate=True, scale=scale)
    return time.perf_counter() - t0, sum(h["train_seconds"] for h in hist[1:]), len(hist) - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and a tiny model: a CPU run of the script")
    ap.add_argument("--processes", default="1,2,3", help="process counts for the sharing measurement")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per measurement (the first is warm-up)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV here")
    args = ap.parse_args()
    device = resolve_device("auto")
    quick = args.quick or device.type != "cuda"
    # quick: two batches of 256 and 1/50 of each evaluation set, enough to run every line of the script
    n, scale, arch = (512, 0.02, "resnet_small") if quick else (49_000, 1.0, "resnet18")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (quick: tiny sizes)'}, "
          f"torch {torch.__version__}")
    rows = []

    hist = study_epochs(arch, n, args.epochs, 256, device, evaluate=True, scale=scale)
    warm = hist[1:]
    tr = statistics.median(h["train_seconds"] for h in warm)
    ev = statistics.median(h["eval_seconds"] for h in warm)
    wall = statistics.median(h["wall_seconds"] for h in warm)
    rows.append({"what": f"{arch} epoch of {n} images, batch 256, + per-epoch evaluation", "seconds": wall,
                 "detail": f"train {tr:.2f} s + evaluation {ev:.2f} s ({sum(EVAL_SETS.values()) * scale:.0f} images "
                           f"and the training set's correctness, through the feature cache) + {wall - tr - ev:.2f} s "
                           f"of digests and checkpoint writes"})

    # deterministic kernels (what `train` uses on CUDA, so a re-trained base reproduces its digest) against the
    # default ones, side by side; and whether two runs of one seed give the same weights under each. The default
    # row runs second, with CUBLAS_WORKSPACE_CONFIG already set (it must be set before the first cuBLAS call), so it
    # measures cuDNN's and torch's deterministic switches, not cuBLAS's workspace
    from ood_lib import train as train_mod
    kinds = {}
    for label, devices in (("deterministic", train_mod.DETERMINISTIC_DEVICES), ("default", ())):
        saved = train_mod.DETERMINISTIC_DEVICES
        train_mod.DETERMINISTIC_DEVICES = devices
        try:
            runs = [study_epochs(arch, n, args.epochs, 256, device, evaluate=False) for _ in range(2)]
        finally:
            train_mod.DETERMINISTIC_DEVICES = saved
        kinds[label] = statistics.median(h["train_seconds"] for h in runs[0][1:] + runs[1][1:])
        same = runs[0][-1]["digest"] == runs[1][-1]["digest"]
        same_kernels = " (the same kernels on this device)" if device.type not in saved else ""
        rows.append({"what": f"{arch} epoch, {label} kernels{same_kernels}, no evaluation", "seconds": kinds[label],
                     "detail": f"two runs of one seed: {'same' if same else 'DIFFERENT'} weights after "
                               f"{args.epochs} epochs"})
    rows[-2]["detail"] += f"; {kinds['deterministic'] / kinds['default']:.2f}x the default kernels' time"

    single = None
    for k in (int(p) for p in args.processes.split(",")):
        ctx = mp.get_context("spawn")
        t0 = time.perf_counter()
        with ctx.Pool(k) as pool:
            out = pool.map(_worker, [(arch, n, args.epochs, 256, str(device), scale)] * k)
            pool.close()  # let the workers exit on their own: terminate() can leave their semaphores behind
            pool.join()
        wall = time.perf_counter() - t0
        ips = sum(n * e / s for _, s, e in out)  # summed training throughput of the warm epochs
        single = single or ips
        rows.append({"what": f"{k} process(es) sharing the device", "seconds": wall,
                     "detail": f"{ips:,.0f} training images/s in all ({ips / single:.2f}x one process)"})

    for batch in (64, 256):
        d_arch = "resnet_small" if quick else "densenet_bc100"
        hist = study_epochs(d_arch, n, max(2, args.epochs - 2), batch, device, evaluate=False)
        s = statistics.median(h["train_seconds"] for h in hist[1:])
        rows.append({"what": f"{d_arch} epoch of {n} images, batch {batch}, no evaluation", "seconds": s,
                     "detail": f"{n / s:,.0f} images/s"})

    width = max(len(r["what"]) for r in rows)
    for r in rows:
        print(f"{r['what']:<{width}}  {r['seconds']:8.2f} s  {r['detail']}")
    if args.out:
        import pandas as pd
        pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
