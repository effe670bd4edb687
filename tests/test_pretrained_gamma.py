"""Notebook 00's gamma of the Unleashing Mask checkpoint: the profile carries the paper's rule (keep 0.965 of every
conv/linear layer, >= 5 masks, crop padding 4 + flip) and the rule's random masks zero exactly the rounded 3.5% of
each of the checkpoint's 99 conv layers and its classifier (counted here independently of ood_lib.masking)."""
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from torch import nn

from ood_lib import masking, um
from ood_lib.config import load_profile
from ood_lib.models import load_pretrained


def test_cifar10_pretrained_profile_holds_rule_a():
    p = load_profile("cifar10-pretrained")
    u = p.um
    assert u.mask_keep == 0.965 and any(np.isclose(k, u.mask_keep) for k in u.curve_keep)
    assert len(set(u.mask_seeds)) >= 5 and u.curve_images == 1000
    assert p.train.crop_padding == 4 and p.train.flip
    assert "um_densenet_cifar10" in p.pretrained and "00" in p.notebooks


def test_rule_a_masks_of_the_um_checkpoint_zero_3_5_percent_of_every_layer():
    try:
        model = load_pretrained("um_densenet_cifar10")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert sum(isinstance(m, nn.Conv2d) for m in layers.values()) == 99 and isinstance(layers["fc"], nn.Linear)
    masks = masking.random_masks(model, 0.965, seed=0)
    assert set(masks) == set(layers)
    for name, m in layers.items():
        n = m.weight.numel()
        kept = int((Decimal("0.965") * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        assert int((masks[name] == 0).sum()) == n - kept, name
    total = sum(m.weight.numel() for m in layers.values())
    zeroed = sum(int((k == 0).sum()) for k in masks.values())
    assert zeroed / total == pytest.approx(0.035, abs=0.001)
    other = masking.random_masks(model, 0.965, seed=1)  # another mask seed: another random 3.5%
    assert any(not bool((masks[k] == other[k]).all()) for k in masks)


def test_the_subset_of_the_class_ordered_archive_is_stratified():
    labels = np.repeat(np.arange(10), 4900)  # class-ordered like the archive (prepare_data keeps its order)
    idx = um.stratified_subset(labels, 1000, seed=0)
    assert np.bincount(labels[idx], minlength=10).tolist() == [100] * 10
