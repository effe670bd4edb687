"""Speed of the post-hoc detectors (ood_lib.posthoc) against pytorch-ood's counterparts, on the CPU.

    python benchmarks/posthoc_speed.py [--quick] [--repeats 3]

For every detector of ``POSTHOC``: the fit on 50,000 x 342 training features of 10 classes (DenseNet-BC-100's
penultimate width on CIFAR-10) and the scoring of 10,000 test features, then the same for pytorch-ood on the
same float32 features (``fit_features`` / ``predict_features`` / ``predict_feature_maps``, or its static
``score`` for logit detectors; GradNorm gets the head as its model, so only the detector's own cost is timed).
Features are ReLU'd Gaussian classes; speed does not depend on their values. Each time is the minimum over
``--repeats`` runs after one warm-up run (the least disturbed by other processes on the machine).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from tabulate import tabulate

from ood_lib import posthoc as ph

N_TRAIN, N_TEST, DIM, CLASSES = 50_000, 10_000, 342, 10


def make_data(n_train: int, n_test: int, d: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (c, d))
    head = ph.Head(rng.normal(0.0, 1.0 / np.sqrt(d), (c, d)), rng.normal(0.0, 0.1, c))

    def draw(n):
        y = rng.integers(0, c, n)
        return np.maximum(means[y] + rng.normal(size=(n, d)), 0.0).astype(np.float32), y

    f, y = draw(n_train)
    train = ph.TrainSet(f, head.logits(f).astype(np.float32), y)
    test, _ = draw(n_test)
    return train, head, test, head.logits(test).astype(np.float32)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pytorch_ood_counterparts(train: ph.TrainSet, head: ph.Head, vim_dim: int):
    """name -> (fit() -> detector or None, score(detector) -> scores), on float32 tensors."""
    from pytorch_ood.detector import (DICE, GEN, KNN, RMD, EnergyBased, GradNorm, Mahalanobis, MaxLogit,
                                      MaxSoftmax, ReAct, ViM)
    z = torch.from_numpy(np.ascontiguousarray(train.features))
    y = torch.from_numpy(train.labels)
    w, b = torch.from_numpy(head.weight).float(), torch.from_numpy(head.bias).float()
    fc = torch.nn.Linear(*w.T.shape)
    with torch.no_grad():
        fc.weight.copy_(w)
        fc.bias.copy_(b)

    def linear(h):
        return h @ w.T + b

    return {
        "msp": (None, lambda d, f, l: MaxSoftmax.score(l)),
        "maxlogit": (None, lambda d, f, l: MaxLogit.score(l)),
        "energy": (None, lambda d, f, l: EnergyBased.score(l)),
        "mahalanobis": (lambda: Mahalanobis(None).fit_features(z, y), lambda d, f, l: d.predict_features(f)),
        "rmds": (lambda: RMD(None).fit_features(z, y), lambda d, f, l: d.predict_features(f)),
        "knn": (lambda: KNN(None, k=ph.KNN_K).fit_features(z, y), lambda d, f, l: d.predict_features(f)),
        "react": (lambda: ReAct(lambda x: x, linear, percentile=ph.REACT_PERCENTILE / 100).fit_feature_maps(z, y),
                  lambda d, f, l: d.predict_feature_maps(f)),
        "dice": (lambda: DICE(None, w, b, p=ph.DICE_PERCENTILE / 100).fit_features(z, y),
                 lambda d, f, l: d.predict_features(f)),
        "vim": (lambda: ViM(None, d=vim_dim, w=w, b=b).fit_features(z, y), lambda d, f, l: d.predict_features(f)),
        "gradnorm": (lambda: GradNorm(fc, param_filter=lambda n: n == "weight"), lambda d, f, l: d.predict(f)),
        "gen": (None, lambda d, f, l: GEN.score(l, gamma=ph.GEN_GAMMA, M=min(ph.GEN_M, l.shape[1]))),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5k x 342 training, 1k test features (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n_train, n_test = (5_000, 1_000) if args.quick else (N_TRAIN, N_TEST)
    per_10k = 10_000 / n_test

    train, head, test, test_logits = make_data(n_train, n_test, DIM, CLASSES)
    try:
        import pytorch_ood
        theirs = pytorch_ood_counterparts(train, head, ph.vim_dim(DIM))
        pood_version = pytorch_ood.__version__
    except ImportError:
        theirs, pood_version = {}, "not installed"
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numpy {np.__version__}, pytorch-ood {pood_version}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"train {n_train} x {DIM} ({CLASSES} classes), test {n_test} x {DIM}; min of {args.repeats} runs; "
          "score times per 10k test features\n")

    tf, tz = torch.from_numpy(test), torch.from_numpy(test_logits)
    rows = []
    for name, det in ph.POSTHOC.items():
        fit_s = best_time(lambda: det.fit(train, head), args.repeats) if det.fit else None
        stats = det.fit(train, head) if det.fit else None
        score_s = best_time(lambda: det.score(test, test_logits, head, stats), args.repeats) * per_10k
        p_fit_s = p_score_s = None
        if name in theirs:
            p_fit, p_score = theirs[name]
            p_fit_s = best_time(p_fit, args.repeats) if p_fit else None
            fitted = p_fit() if p_fit else None
            p_score_s = best_time(lambda: p_score(fitted, tf, tz), args.repeats) * per_10k
        rows.append([name, fit_s, score_s, p_fit_s, p_score_s,
                     None if fit_s is None or p_fit_s is None else p_fit_s / fit_s,
                     None if p_score_s is None else p_score_s / score_s])
    print(tabulate(rows, headers=["detector", "fit (s)", "score 10k (s)", "pytorch-ood fit (s)",
                                  "pytorch-ood score 10k (s)", "fit speed-up", "score speed-up"],
                   floatfmt=".3f", missingval="-"))
    slow = [r[0] for r in rows if r[2] >= 1.0]
    behind = [r[0] for r in rows if r[6] is not None and r[6] < 1.0]
    print(f"\nscore >= 1 s per 10k: {', '.join(slow) or 'none'}; "
          f"slower than pytorch-ood: {', '.join(behind) or 'none'}")


if __name__ == "__main__":
    main()
