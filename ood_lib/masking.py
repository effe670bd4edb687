"""Weight masks of Unleashing Mask (Zhu et al., ICML 2023; the official ``utils/conv_type.py`` and
``utils/linear_type.py`` of github.com/tmlr-group/Unleashing-Mask; docs/methods.md §1.2 and §1.4).

Every conv and linear layer (first conv and classifier included) is masked on its own: each weight gets a score,
and the layer keeps the ``round(keep * n)`` weights with the largest |score|. ``keep`` is the fraction of weights
KEPT, the official code's ``prune_rate``: 0.965 zeroes 3.5% of every layer (gamma), 0.8 prunes 20% (UMAP).

* Random masks (gamma, atypicality): scores are drawn once from the kaiming-uniform init with a = sqrt(5),
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a seeded generator; they ignore the weights' magnitudes.
* UMAP's learnable masks (edge-popup, Ramanujan et al. 2020): the same scores become parameters; the forward pass
  uses W ⊙ m(s) with m the top-k indicator of |s|, and the backward pass is straight through the indicator:
  dL/ds = dL/dW_eff ⊙ W ⊙ sign(s). ``fold`` writes the mask into the weights and makes the model plain again.
"""
from __future__ import annotations

import copy
from decimal import ROUND_HALF_UP, Decimal

import torch
from torch import nn
from torch.nn.utils import parametrize

MASKED_LAYERS = (nn.Conv2d, nn.Linear)


def kept_count(n: int, keep: float) -> int:
    """Weights a layer of ``n`` keeps: round(keep * n), halves rounded up, in decimal arithmetic (0.7 * 45 keeps 32,
    not the 31 of float 31.499999999999996). The official code's edge-popup zeroes int((1 - keep) * n) instead,
    which can keep one weight more."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep is the fraction of weights kept, in (0, 1]; got {keep}")
    return int((Decimal(repr(keep)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MASKED_LAYERS)]


def random_scores(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform scores with a = sqrt(5): U(-b, b), b = 1 / sqrt(fan_in), fan_in = in-channels x kernel."""
    fan_in = int(torch.Size(shape)[1:].numel())
    bound = fan_in ** -0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def top_k_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """0/1 tensor shaped like ``scores`` with ones at the ``kept_count`` largest |scores|."""
    flat = scores.detach().abs().flatten()
    mask = torch.zeros_like(flat)
    mask[flat.topk(kept_count(flat.numel(), keep), sorted=False).indices] = 1
    return mask.view_as(scores)


def random_masks(model: nn.Module, keep: float, seed: int) -> dict[str, torch.Tensor]:
    """One random mask per conv/linear layer (layer name -> 0/1 tensor), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {name: top_k_mask(random_scores(m.weight.shape, gen), keep) for name, m in masked_layers(model)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose masked weights are zero (the original is untouched)."""
    out = copy.deepcopy(model)
    layers = dict(out.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            layers[name].weight.mul_(mask.to(layers[name].weight.device, layers[name].weight.dtype))
    return out


class _StraightThroughTopK(torch.autograd.Function):
    """Forward: the top-k indicator of |s|. Backward: the incoming gradient, unchanged (straight through)."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, keep: float) -> torch.Tensor:
        return top_k_mask(magnitudes, keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ScoreMask(nn.Module):
    """Parametrization W -> W ⊙ m(s) with learnable scores s (one per weight) and m the top-k indicator of |s|."""

    def __init__(self, shape: torch.Size, keep: float, generator: torch.Generator):
        super().__init__()
        self.keep = keep
        self.scores = nn.Parameter(random_scores(shape, generator))

    def mask(self) -> torch.Tensor:
        return _StraightThroughTopK.apply(self.scores.abs(), self.keep)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask().to(weight.dtype)


def add_score_masks(model: nn.Module, keep: float, seed: int, train_weights: bool = False) -> list[nn.Parameter]:
    """Turn ``model`` (in place) into UMAP's masked network; return the parameters to optimise.

    Every conv/linear weight becomes W ⊙ m(s) with fresh random scores (seeded). With ``train_weights=False``
    (the paper's CIFAR-10 setting) every other parameter, biases and BatchNorm included, is frozen and only the
    scores are returned; otherwise the scores and every parameter are.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(train_weights)
    for _, m in masked_layers(model):
        device = m.weight.device
        parametrize.register_parametrization(m, "weight", ScoreMask(m.weight.shape, keep, gen).to(device))
    scores = score_parameters(model)
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not s for s in scores)]
    return scores + rest


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in masked_layers(model) if parametrize.is_parametrized(m, "weight")
            for p in [m.parametrizations.weight[0].scores]]


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 0/1 mask each score-masked layer applies now."""
    with torch.no_grad():
        return {name: m.parametrizations.weight[0].mask() for name, m in masked_layers(model)
                if parametrize.is_parametrized(m, "weight")}


def fold(model: nn.Module) -> nn.Module:
    """Make a score-masked model plain, in place: every mask multiplied into its weights, the scores dropped.

    The result is an ordinary model of the original class (same state-dict keys), so the feature cache and every
    detector treat it like any other. In place because torch cannot deep-copy parametrized modules."""
    for _, m in masked_layers(model):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
