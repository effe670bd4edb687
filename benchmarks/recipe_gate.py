"""The ID-only gate that sizes a profile's training recipe (issue 10; docs/default_recipe.md), run before any OOD
metric is looked at.

    python benchmarks/recipe_gate.py --profile default [--set train.crop_padding=1 ...] [--seed 0] [--threads 1]

Trains one seed of the profile's base recipe (in a temporary folder; nothing of the study's results is touched),
then prints the gate. No OOD set is loaded or scored.

  G1 clean fit:      final clean training accuracy (eval mode, every training image, no augmentation) >= 99.5%
  G2 augmented fit:  final training accuracy under augmentation (the last epoch's running train_acc) >= 98.0%
  G3 late stage:     the epoch of the lowest 3-epoch-smoothed ID-val loss <= 0.9 E (a memorising phase follows it)
  G4 budget:         training seconds per seed, as measured here (state the thread count and the machine's load)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ood_lib import base
from ood_lib.config import load_profile, parse_override
from ood_lib.train import train
from ood_lib.um import smoothed_minimum

GATE = {"G1 clean train acc": 0.995, "G2 augmented train acc": 0.98, "G3 val-minimum epoch / E": 0.9}


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500):
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(labels), batch):
        out = model(images[i:i + batch].float().div(255))
        loss += F.cross_entropy(out, labels[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == labels[i:i + batch]).sum().item()
    return loss / len(labels), correct / len(labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the history and the verdict here")
    args = ap.parse_args(argv)
    profile = load_profile(args.profile, dict(parse_override(o) for o in args.overrides))
    torch.set_num_threads(args.threads or profile.threads or torch.get_num_threads())
    data = base.prepare_data(profile)
    torch.manual_seed(args.seed)
    model = base.build_model(profile, data)
    val_x, val_y = data.id_val.images, torch.from_numpy(data.id_val.labels).long()

    def on_epoch_end(epoch, m):
        loss, acc = loss_and_accuracy(m, val_x, val_y)
        return {"val_loss": loss, "val_acc": acc}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        history = train(model, data.train_images, data.train_labels, profile.train, args.seed, Path(run_dir),
                        torch.device("cpu"), on_epoch_end=on_epoch_end, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    clean_loss, clean_acc = loss_and_accuracy(model, data.train_images, data.train_labels)
    E = profile.train.epochs
    _, vmin = smoothed_minimum([h["val_loss"] for h in history])  # rule B's smoothing (docs/methods.md §1.2)
    train_seconds = sum(h["train_seconds"] for h in history)
    found = {"G1 clean train acc": clean_acc, "G2 augmented train acc": history[-1]["train_acc"],
             "G3 val-minimum epoch / E": vmin / E}
    passed = {k: found[k] >= GATE[k] if k != "G3 val-minimum epoch / E" else found[k] <= GATE[k] for k in GATE}
    params = sum(p.numel() for p in model.parameters())
    print(f"\nprofile {profile.name} {args.overrides} seed {args.seed}: {params:,} parameters, "
          f"{torch.get_num_threads()} thread(s)")
    for k in GATE:
        print(f"  {k:26s} {found[k]:.4f}   need {'<=' if k.startswith('G3') else '>='} {GATE[k]}   "
              f"{'pass' if passed[k] else 'FAIL'}")
    print(f"  G4 training seconds/seed  {train_seconds:.0f} s ({wall:.0f} s with the ID-val pass)")
    print(f"  clean train loss {clean_loss:.4f}; ID-val loss: min (smoothed) at epoch {vmin}, final "
          f"{history[-1]['val_loss']:.4f}, final ID-val acc {history[-1]['val_acc']:.4f}")
    print("verdict:", "PASS" if all(passed.values()) else "FAIL")
    if args.json:
        args.json.write_text(json.dumps({"overrides": args.overrides, "seed": args.seed, "params": params,
                                         "found": found, "passed": passed, "train_seconds": train_seconds,
                                         "clean_train_loss": clean_loss, "history": history}, indent=1))
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
