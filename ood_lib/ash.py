"""ASH: activation shaping (Djurisic, Bozanic, Ashok & Liu, ICLR 2023), scored with energy (T = 1).

Per sample, over all n activations of the shaped tensor, keep the k = n - round(n * p / 100) largest
(p = the pruning percentile, "percent removed"; round half to even, as numpy) and zero the rest; then
  ash_p  keep the kept values as they are;
  ash_b  set every kept value to s1 / k, s1 = the sample's sum before pruning (binarise, same total);
  ash_s  multiply the kept values by exp(s1 / s2), s2 = the sum after pruning (scale up).
Global average pooling, the model's fc and the energy score follow; higher = more in-distribution.

Where the activations are shaped (``site``):
  "pooled"  the pooled penultimate vector, i.e. the (N, D, 1, 1) output of the global average pool. This is
            what the authors' code (github.com/andrijazz/ash: ResNet-50, MobileNetV2 and the CIFAR DenseNet-100
            all call the shaping right after the final average pool) and OpenOOD v1.5 do, so it is the default.
            At this site ASH is a function of the cached features and the head alone (``ash_from_features``).
  "map"     the last feature map before pooling (N, C, H, W), every C*H*W activation of a sample ranked
            together: a variant, not the published setting.

Pruning percentile per variant (``ASH_PERCENTILE``), the CIFAR-10 setting on DenseNet-101: ASH-P 90, ASH-B 90,
ASH-S 95. Where each value comes from:
  * the paper's CIFAR results (Djurisic et al., ICLR 2023, Sec. 4, Table 2: CIFAR-10 and CIFAR-100, DenseNet-101,
    energy score) name the rows ASH-P@90, ASH-B@90 and ASH-S@95; transcribed from memory of the paper, no stored
    copy of its table could be read, so the three values are unverified against the PDF;
  * the official repository (github.com/andrijazz/ash) sweeps every variant over p in {65, 70, ..., 95, 99} on the
    CIFAR DenseNet-100 (``run.py``, function ``cifar``); its committed configs shape with ASH-S@90
    (``config/cifar100_config.yml``: DenseNet-100 on CIFAR-100; ``config/cifar10_config.yml``: a ResNet-34 on
    CIFAR-10 against SVHN only), so 90 is the repository's CIFAR-100 value and 95 the paper's CIFAR-10 one;
  * ImageNet, for reference (paper Table 1, ResNet-50): ASH-P@60, ASH-B@65, ASH-S@90.
Sweep p with ``energy_table`` (one forward pass for many pairs; cached by ``features.ash_score_table``).
docs/methods.md §3 has the settings of every activation-shaping baseline.
"""
from __future__ import annotations

import numpy as np
import torch

from ood_lib.detectors import energy

PAPER = ("Djurisic, Bozanic, Ashok & Liu, 'Extremely Simple Activation Shaping for Out-of-Distribution "
         "Detection', ICLR 2023 (arXiv 2209.09858)")

ASH_VARIANTS = ("ash_p", "ash_b", "ash_s")
ASH_PERCENTILE = {"ash_p": 90.0, "ash_b": 90.0, "ash_s": 95.0}  # CIFAR-10, DenseNet-101 (see the module docstring)
SITE_POOLED = "pooled"
SITE_MAP = "map"
ASH_SITE = SITE_POOLED


def percentile_of(variant: str, percentile: float | None = None) -> float:
    """``percentile`` if given, else the variant's published CIFAR-10 value ``ASH_PERCENTILE[variant]``."""
    if variant not in ASH_VARIANTS:
        raise ValueError(f"unknown ASH variant {variant!r}; one of {ASH_VARIANTS}")
    return ASH_PERCENTILE[variant] if percentile is None else float(percentile)


def kept_count(n: int, percentile: float) -> int:
    """How many of n activations survive pruning at ``percentile`` (percent removed), at least one."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    k = n - int(round(n * percentile / 100.0))
    if k < 1:
        raise ValueError(f"percentile {percentile} keeps no activation out of {n}")
    return k


def ash_prune(maps: torch.Tensor, variant: str, percentile: float) -> torch.Tensor:
    """Shape each sample of ``maps`` (N, ...) over all its activations; returns a new tensor of the same shape."""
    if variant not in ASH_VARIANTS:
        raise ValueError(f"unknown ASH variant {variant!r}; one of {ASH_VARIANTS}")
    flat = maps.reshape(maps.shape[0], -1)
    k = kept_count(flat.shape[1], percentile)
    values, index = torch.topk(flat, k, dim=1, sorted=False)
    if variant == "ash_b":
        values = (flat.sum(1, keepdim=True) / k).expand(-1, k)
    elif variant == "ash_s":
        s1, s2 = flat.sum(1, keepdim=True), values.sum(1, keepdim=True)
        # exp(s1 / s2); a sample whose kept activations sum to zero is left unscaled instead of NaN
        values = values * torch.exp(torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, 1), 0))
    return torch.zeros_like(flat).scatter_(1, index, values).reshape(maps.shape)


def check(configs: list[tuple[str, float]], site: str) -> None:
    """ValueError unless every (variant, percentile) pair and the site are valid."""
    if site not in (SITE_POOLED, SITE_MAP):
        raise ValueError(f"unknown ASH site {site!r}; {SITE_POOLED!r} or {SITE_MAP!r}")
    for variant, p in configs:
        if variant not in ASH_VARIANTS:
            raise ValueError(f"unknown ASH variant {variant!r}; one of {ASH_VARIANTS}")
        if not 0 <= p < 100:
            raise ValueError(f"percentile must be in [0, 100), got {p}")


def ash_from_features(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, variant: str,
                      percentile: float | None = None) -> np.ndarray:
    """ASH at the pooled site from cached penultimate features (N, D) and a linear head: energy scores (N,).
    ``percentile`` None: the variant's ``ASH_PERCENTILE``."""
    percentile = percentile_of(variant, percentile)
    f = torch.as_tensor(np.asarray(features, dtype=np.float64))
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    b = torch.as_tensor(np.asarray(bias, dtype=np.float64))
    shaped = ash_prune(f, variant, percentile)
    return energy((shaped @ w.T + b).numpy())


@torch.no_grad()
def energy_table(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                 configs: list[tuple[str, float]], site: str = ASH_SITE,
                 batch_size: int = 1000) -> dict[tuple[str, float], np.ndarray]:
    """ASH energy scores of uint8 images (N, C, H, W) for several (variant, percentile) pairs from ONE forward
    pass: each batch's feature maps are shaped by every pair. Returns {(variant, percentile): scores (N,)}.
    ``features.ash_score_table`` caches it."""
    check(configs, site)
    model.eval().to(device)
    logits: dict[tuple[str, float], list[torch.Tensor]] = {cfg: [] for cfg in configs}
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device).float().div_(255)
        maps = model.feature_maps(x).float()
        if site == SITE_POOLED:
            maps = maps.mean((2, 3), keepdim=True)
        for variant, p in configs:
            pooled = ash_prune(maps, variant, p).mean((2, 3))
            logits[(variant, p)].append(model.fc(pooled).float().cpu())
    return {cfg: energy(torch.cat(z).numpy()) for cfg, z in logits.items()}
