"""The ID-only gate that sizes a profile's training recipe, run before any OOD metric is looked at
(docs/default_recipe.md for `default`, docs/cifar10_cpu_recipe.md for `cifar10-cpu`).

    python benchmarks/recipe_gate.py --profile cifar10-cpu --gate cifar10-cpu [--set model.options.width=24 ...]
    python benchmarks/recipe_gate.py --profile default [--set train.crop_padding=1 ...] [--seed 0] [--threads 1]

Trains one seed of the profile's base recipe (in a temporary folder; nothing of the study's results is touched),
then prints the gate. Only the ID sets are loaded (``base.prepare_data(with_ood=False)``); no OOD set is loaded or
scored.

`default` (issue 10):
  G1 clean fit:      final clean training accuracy (eval mode, every training image, no augmentation) >= 99.5%
  G2 augmented fit:  final training accuracy under augmentation (the last epoch's running train_acc) >= 98.0%
  G3 late stage:     the epoch of the lowest 3-epoch-smoothed ID-val loss <= 0.9 E (a memorising phase follows it)
  G4 budget:         training seconds per seed, as measured here (state the thread count and the machine's load)
`cifar10-cpu` (issue 17):
  G1 clean fit:      as above, >= 99.5%
  G2 late stage:     the smoothed ID-val minimum at <= 0.8 E
  G3 ID accuracy:    final ID test accuracy (the whole test split) >= 80%
  G4 base stage:     training + E float32 evaluation passes over the images the profile scores after every epoch
                     (timed on as many ID training images) <= 45 minutes
  G5 whole study:    3 seeds of notebooks 01-04's headline stages, estimated from the same timings, <= 10 h
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ood_lib import base
from ood_lib.config import Profile, load_profile, parse_override
from ood_lib.data import DATASETS
from ood_lib.features import extract
from ood_lib.train import train, training_precision
from ood_lib.um import smoothed_minimum


@dataclass(frozen=True)
class Gate:
    clean_acc: float                   # G1: final clean training accuracy at least this
    late_stage: float                  # smoothed ID-val-loss minimum at most this fraction of E
    augmented_acc: float | None = None  # final running training accuracy under augmentation at least this
    test_acc: float | None = None      # final ID test accuracy (whole test split) at least this
    base_minutes: float | None = None  # base stage of one seed with its per-epoch evaluation at most this
    study_hours: float | None = None   # the whole study's estimate at most this


GATES = {
    "default": Gate(clean_acc=0.995, augmented_acc=0.98, late_stage=0.9),
    "cifar10-cpu": Gate(clean_acc=0.995, late_stage=0.8, test_acc=0.80, base_minutes=45, study_hours=10),
}


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500):
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(labels), batch):
        out = model(images[i:i + batch].float().div(255))
        loss += F.cross_entropy(out, labels[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == labels[i:i + batch]).sum().item()
    return loss / len(labels), correct / len(labels)


def scored_per_epoch(profile: Profile, n_train: int) -> tuple[int, int]:
    """(images the base run scores after every epoch, of which the test sets that fine-tunes score): ID test, ID val
    and both OOD halves, from the profile's sizes and the registry's counts (no OOD image is read)."""
    d = profile.data
    n_test_split = DATASETS[d.id_set].counts.get("test") or 10_000
    id_test = d.id_test_size or n_test_split
    ood = sum(d.ood_size or DATASETS[o].counts.get(DATASETS[o].ood_split) or 10_000 for o in d.ood_sets)
    return id_test + d.id_val_size + ood, id_test + ood // 2


def timed_pass(model: torch.nn.Module, images: torch.Tensor, n: int, batch: int) -> float:
    """Seconds of one float32 extraction pass over n images (``images`` tiled to n)."""
    x = images.repeat((-(-n // len(images)), 1, 1, 1))[:n]
    extract(model, x[:batch], torch.device("cpu"), batch)  # warm-up
    t0 = time.perf_counter()
    extract(model, x, torch.device("cpu"), batch)
    return time.perf_counter() - t0


def study_estimate(profile: Profile, t_train: float, t_eval_all: float, t_eval_test: float, t_train_pass: float,
                   t_once: float) -> dict:
    """Seconds of the headline study from per-epoch timings (docs/cifar10_cpu_recipe.md, G5)."""
    E, Eft = profile.train.epochs, profile.um.epochs
    per_seed = {
        "01 base (train + per-epoch scoring)": E * (t_train + t_eval_all),
        "02 learning dynamics (training-set pass per epoch)": E * t_train_pass,
        "02 removal arms (per class, random)": 2 * E * t_train,
        "03 UM A, UM B, UMAP, CE control": 4 * Eft * (t_train + t_eval_test),
        "gamma, atypicality, post-hoc (once)": t_once,
    }
    return {"per_seed": per_seed, "seconds": len(profile.seeds) * sum(per_seed.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--gate", choices=sorted(GATES), default=None, help="the gate to apply (default: the profile's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the history and the verdict here")
    args = ap.parse_args(argv)
    profile = load_profile(args.profile, dict(parse_override(o) for o in args.overrides))
    gate = GATES[args.gate or (profile.name if profile.name in GATES else "default")]
    torch.set_num_threads(args.threads or profile.threads or torch.get_num_threads())
    cpu = torch.device("cpu")
    data = base.prepare_data(profile, with_ood=False)
    torch.manual_seed(args.seed)
    model = base.build_model(profile, data)
    val_x, val_y = data.id_val.images, torch.from_numpy(data.id_val.labels).long()

    def on_epoch_end(epoch, m):
        loss, acc = loss_and_accuracy(m, val_x, val_y)
        return {"val_loss": loss, "val_acc": acc}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        history = train(model, data.train_images, data.train_labels, profile.train, args.seed, Path(run_dir),
                        cpu, on_epoch_end=on_epoch_end, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    clean_loss, clean_acc = loss_and_accuracy(model, data.train_images, data.train_labels)
    E = profile.train.epochs
    _, vmin = smoothed_minimum([h["val_loss"] for h in history])  # rule B's smoothing (docs/methods.md §1.2)
    train_seconds = sum(h["train_seconds"] for h in history)
    found = {"G1 clean train acc": clean_acc, "late stage: val-minimum epoch / E": vmin / E}
    need = {"G1 clean train acc": (">=", gate.clean_acc), "late stage: val-minimum epoch / E": ("<=", gate.late_stage)}
    if gate.augmented_acc is not None:
        found["augmented train acc"] = history[-1]["train_acc"]
        need["augmented train acc"] = (">=", gate.augmented_acc)
    timings = {}
    if gate.test_acc is not None:
        from ood_lib.data import load_dataset  # the ID test split only
        test = load_dataset(profile.data.id_set, "test")
        test_x = data.pre(test.x)
        found["ID test acc"] = loss_and_accuracy(model, test_x, torch.from_numpy(test.y.astype("int64")))[1]
        need["ID test acc"] = (">=", gate.test_acc)
    if gate.base_minutes is not None or gate.study_hours is not None:
        n_all, n_test = scored_per_epoch(profile, len(data.train_labels))
        b = profile.eval.batch_size
        t_all = timed_pass(model, data.train_images, n_all, b)
        t_test = t_all * n_test / n_all
        t_trainpass = timed_pass(model, data.train_images, len(data.train_labels), b)
        t_once = 12 * t_trainpass + 2 * t_all  # gamma's and atypicality's 5 masked passes each, fits, final scoring
        timings = {"train s/epoch": train_seconds / E, f"eval s/epoch ({n_all} images)": t_all,
                   f"training-set pass s ({len(data.train_labels)} images)": t_trainpass}
        base_minutes = (train_seconds + E * t_all) / 60
        study = study_estimate(profile, train_seconds / E, t_all, t_test, t_trainpass, t_once)
        found["base stage minutes"] = base_minutes
        need["base stage minutes"] = ("<=", gate.base_minutes)
        found["study CPU-hours"] = study["seconds"] / 3600
        need["study CPU-hours"] = ("<=", gate.study_hours)
        timings.update({f"  {k} (min/seed)": v / 60 for k, v in study["per_seed"].items()})
    passed = {k: (found[k] >= v if op == ">=" else found[k] <= v) for k, (op, v) in need.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"\nprofile {profile.name} {args.overrides} seed {args.seed}: {params:,} parameters, "
          f"{torch.get_num_threads()} thread(s), training in {training_precision(profile.train, cpu)}")
    for k, (op, v) in need.items():
        print(f"  {k:36s} {found[k]:.4f}   need {op} {v}   {'pass' if passed[k] else 'FAIL'}")
    print(f"  training seconds/seed  {train_seconds:.0f} s ({wall:.0f} s with the ID-val pass)")
    for k, v in timings.items():
        print(f"  {k:48s} {v:.1f}")
    print(f"  clean train loss {clean_loss:.4f}; ID-val loss: min (smoothed) at epoch {vmin}, final "
          f"{history[-1]['val_loss']:.4f}, final ID-val acc {history[-1]['val_acc']:.4f}")
    print("verdict:", "PASS" if all(passed.values()) else "FAIL")
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.overrides, "seed": args.seed, "params": params,
                                         "found": found, "passed": passed, "train_seconds": train_seconds,
                                         "timings": timings, "clean_train_loss": clean_loss,
                                         "history": history}, indent=1))
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
