"""base.prepare_data: the class-balanced training subset and the ID-only load of the recipe gate."""
import numpy as np
import torch

from ood_lib import base
from ood_lib.config import load_profile


def test_balanced_subset_has_equal_classes_and_the_id_only_load_gives_the_same_id_sets():
    p = load_profile("smoke", {"data.train_size": 300, "data.balanced": True})
    full = base.prepare_data(p)
    assert np.bincount(full.train_labels.numpy()).tolist() == [30] * 10
    id_only = base.prepare_data(p, with_ood=False)
    assert id_only.ood_val == {} and id_only.ood_test == {} and full.ood_test  # no OOD set loaded
    assert torch.equal(id_only.train_images, full.train_images) and id_only.train_checksum == full.train_checksum
    assert torch.equal(id_only.id_test.images, full.id_test.images)
    assert torch.equal(id_only.id_val.images, full.id_val.images)
    # the held-out ID-val images are the unbalanced draw's: balancing changes the training subset only
    plain = base.prepare_data(load_profile("smoke", {"data.train_size": 300}), with_ood=False)
    assert torch.equal(plain.id_val.images, full.id_val.images)
    assert np.bincount(plain.train_labels.numpy(), minlength=10).tolist() != [30] * 10
