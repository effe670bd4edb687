"""The model zoo: shapes, the feature/head contract, parameter counts, digests and the pretrained checkpoints."""
import hashlib
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from ood_lib import models
from ood_lib.models import (ARCHITECTURES, PRETRAINED, densenet_bc, load_pretrained, resnet18, resnet_small,
                            weights_digest, wrn)
from ood_lib.paths import PROJECT_ROOT, models_root

SHARED = PROJECT_ROOT.parent / "shared"

# (builder, input shape, feature_dim, feature-map side): tiny inputs, the real architectures where cheap enough.
CASES = {
    "resnet_small": (lambda: resnet_small(num_classes=7), (3, 1, 28, 28), 64, 7),
    "resnet_small_tiny": (lambda: resnet_small(num_classes=3, width=4, blocks=(1, 1, 1)), (3, 1, 28, 28), 16, 7),
    "resnet18": (lambda: resnet18(num_classes=10), (2, 3, 32, 32), 512, 4),
    "wrn40_2": (lambda: wrn(num_classes=10), (2, 3, 32, 32), 128, 8),
    "densenet_bc100": (lambda: densenet_bc(num_classes=10), (2, 3, 32, 32), 342, 8),
    "densenet_bc100_nonaffine": (lambda: densenet_bc(num_classes=100, affine_bn=False), (2, 3, 32, 32), 342, 8),
}


def n_learnable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_path(name: str):
    """Where the library looks for a checkpoint (``paths.models_root``: OOD_MODELS_ROOT, else ../shared/models)."""
    root = models_root()
    return root / PRETRAINED[name].filename if root else None


def needs_checkpoint(name: str):
    path = model_path(name)
    where = path or f"OOD_MODELS_ROOT (unset) and {SHARED / 'models'} (absent)"
    return pytest.mark.skipif(path is None or not path.is_file(),
                              reason=f"checkpoint {PRETRAINED[name].filename} absent: looked in {where}; "
                                     f"set OOD_MODELS_ROOT to the folder that holds it")


@pytest.mark.parametrize("case", CASES)
def test_shapes_and_feature_contract(case):
    torch.manual_seed(0)
    build, shape, dim, side = CASES[case]
    model = build().eval()
    x = torch.rand(shape)
    with torch.no_grad():
        maps, feats, logits = model.feature_maps(x), model.features(x), model(x)
    assert model.feature_dim == dim
    assert maps.shape == (shape[0], dim, side, side)
    assert feats.shape == (shape[0], dim)
    assert logits.shape == (shape[0], model.fc.out_features)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == dim
    assert torch.equal(feats, maps.mean((2, 3)))
    assert torch.equal(logits, model.fc(feats))
    assert (maps >= 0).all()  # after the final ReLU


def test_registry_names_constructors():
    assert set(ARCHITECTURES) == {"resnet_small", "resnet18", "wrn40_2", "densenet_bc100"}
    assert ARCHITECTURES["wrn40_2"] is wrn and ARCHITECTURES["densenet_bc100"] is densenet_bc
    for name, build in ARCHITECTURES.items():  # every constructor takes the keywords the profiles pass
        build(num_classes=3, in_channels=1 if name == "resnet_small" else 3, mean=(0.5,), std=(0.25,))


def test_parameter_counts():
    # Published / checkpoint counts: UM's DenseNet-BC-100 (non-affine BN) 745,174; DICE's (affine) 769,162,
    # i.e. 23,988 more = gamma and beta of the 11,994 BN channels; CIFAR ResNet-18 11.17M; WRN-40-2 2.24M.
    assert n_learnable(densenet_bc(affine_bn=False)) == 745_174
    assert n_learnable(densenet_bc(affine_bn=True)) == 769_162
    assert n_learnable(resnet18(num_classes=10)) == 11_173_962
    assert n_learnable(wrn(num_classes=10)) == 2_243_546
    convs = [m for m in densenet_bc().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 99  # 99 conv layers plus the fc: "DenseNet-101"


def test_nonaffine_bn_everywhere():
    bns = [m for m in densenet_bc(affine_bn=False).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 16 * 2 * 3 + 2 + 1 and not any(bn.affine for bn in bns)
    assert all(bn.affine for bn in densenet_bc().modules() if isinstance(bn, nn.BatchNorm2d))


def test_densenet_module_names_match_checkpoint_layout():
    keys = set(densenet_bc(affine_bn=False).state_dict())
    expected = {"conv1.weight", "fc.weight", "fc.bias"}
    for part in ["bn1"] + [f"trans{t}.bn1" for t in (1, 2)] + [
            f"block{b}.layer.{i}.{bn}" for b in (1, 2, 3) for i in range(16) for bn in ("bn1", "bn2")]:
        expected |= {f"{part}.running_mean", f"{part}.running_var", f"{part}.num_batches_tracked"}
    expected |= {f"trans{t}.conv1.weight" for t in (1, 2)}
    expected |= {f"block{b}.layer.{i}.{c}.weight" for b in (1, 2, 3) for i in range(16) for c in ("conv1", "conv2")}
    assert keys == expected and len(keys) == 398


def test_normalisation_inside_model_and_not_in_state_dict():
    model = resnet_small(width=4, blocks=(1, 1, 1), mean=(0.5,), std=(0.25,)).eval()
    assert not any("normalize" in k or k.endswith((".mean", ".std")) for k in model.state_dict())
    assert {n for n, _ in model.named_buffers() if n.startswith("normalize")} == {"normalize.mean", "normalize.std"}
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)
    other = resnet_small(width=4, blocks=(1, 1, 1), mean=(0.1,), std=(0.25,)).eval()
    other.load_state_dict(model.state_dict(), strict=True)  # same weights, other normaliser: other outputs
    with torch.no_grad():
        assert not torch.allclose(model(x), other(x))


def test_weights_digest_stable_and_sensitive():
    torch.manual_seed(0)
    a = resnet_small(width=4, blocks=(1, 1, 1))
    torch.manual_seed(0)
    b = resnet_small(width=4, blocks=(1, 1, 1))
    d = weights_digest(a)
    assert len(d) == 64 and d == weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.fc.weight[0, 0] += 1e-6
    assert weights_digest(b) != d
    with torch.no_grad():
        b.fc.weight[0, 0] = a.fc.weight[0, 0]
    assert weights_digest(b) == d
    b.layers[0][0].bn1.running_var[0] = 2.0  # buffers count too
    assert weights_digest(b) != d


@pytest.mark.parametrize("via", ["root", "env"])
def test_missing_checkpoint_message(via, tmp_path, monkeypatch):
    monkeypatch.setenv("OOD_MODELS_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_pretrained("um_densenet_cifar10", root=tmp_path if via == "root" else None)
    message = str(err.value)
    assert str(tmp_path / "um_densenet_cifar10_jan2023.state") in message
    assert "OOD_MODELS_ROOT" in message and "Unleashing-Mask" in message


@pytest.mark.parametrize("name", PRETRAINED)
def test_corrupted_checkpoint_fails_hash_check_before_unpickling(name, tmp_path, monkeypatch):
    spec = PRETRAINED[name]
    source = model_path(name)
    target = tmp_path / spec.filename
    if source is not None and source.is_file():  # a copy of the real file with one byte changed
        shutil.copyfile(source, target)
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        torch.save({"state_dict": {}}, target)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called before the hash check")

    monkeypatch.setattr(models.torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=f"expected {spec.sha256}, found [0-9a-f]{{64}}"):
        load_pretrained(name, root=tmp_path)


# The input normalisation of each checkpoint's own training code, written out here (not the library's constants):
# DICE/LINe's transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)); Unleashing Mask's
# mean (125.3, 123.0, 113.9) / 255 and std (63.0, 62.1, 66.7) / 255.
DICE_NORMALISE = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
UM_NORMALISE = (tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)))


@pytest.mark.parametrize("name, affine, normalise", [
    pytest.param("dice_densenet100_cifar10", True, DICE_NORMALISE, marks=needs_checkpoint("dice_densenet100_cifar10")),
    pytest.param("um_densenet_cifar10", False, UM_NORMALISE, marks=needs_checkpoint("um_densenet_cifar10")),
])
def test_pretrained_loads_strictly(name, affine, normalise):
    model = load_pretrained(name)
    assert not model.training and model.feature_dim == 342 and model.fc.out_features == 10
    assert all(m.affine == affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    mean, std = (torch.tensor(v, dtype=model.normalize.mean.dtype) for v in normalise)
    assert torch.allclose(model.normalize.mean.flatten(), mean) and torch.allclose(model.normalize.std.flatten(), std)
    # against the file itself, read here without load_pretrained: its pinned hash, then every tensor by name
    spec, data = PRETRAINED[name], model_path(name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == spec.sha256
    raw = torch.load(model_path(name), map_location="cpu", weights_only=spec.weights_only)[spec.state_dict_key]
    raw = {k[len(spec.strip_prefix):] if k.startswith(spec.strip_prefix) else k: v for k, v in raw.items()}
    loaded = model.state_dict()
    assert set(loaded) == set(raw) and len(raw) > 300
    for k, v in raw.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


@pytest.fixture(scope="module")
def cifar10_test_subset():
    """The first 50 test images of each class of CIFAR-10 (the JPEG copy in ../shared/data, 500 images), found
    as the library finds it: OOD_DATA_ROOT, else ../shared/data (the Makefile's default, conftest's ``data_root``),
    then data/raw and the array cache. Skipped, with every place looked, only when it is nowhere."""
    from ood_lib.data import DatasetMissing, load_dataset
    try:
        test = load_dataset("cifar10", "test")
    except DatasetMissing as e:
        pytest.skip(f"CIFAR-10 is in none of the places looked: {e}")
    idx = np.concatenate([np.flatnonzero(test.y == c)[:50] for c in range(10)])
    x = torch.from_numpy(test.x[idx]).permute(0, 3, 1, 2).float().div(255)
    return x, torch.from_numpy(test.y[idx])


@pytest.mark.parametrize("name", [
    pytest.param("dice_densenet100_cifar10", marks=needs_checkpoint("dice_densenet100_cifar10")),
    pytest.param("um_densenet_cifar10", marks=needs_checkpoint("um_densenet_cifar10")),
])
def test_pretrained_accuracy_on_cifar10_jpeg(name, cifar10_test_subset):
    # About 94-95% on the original test set, about 82% on the JPEG (q75) copy (these 500 images: 82.2% and 80.2%);
    # a wrong normalisation or layer order lands far lower.
    x, y = cifar10_test_subset
    assert len(y) == 500 and torch.equal(torch.bincount(y), torch.full((10,), 50))
    model = load_pretrained(name)
    with torch.no_grad():  # batches of 32: DenseNet's fastest on 2 cores (11 s for the 500, against 17 s at 100)
        pred = torch.cat([model(x[i:i + 32]).argmax(1) for i in range(0, len(x), 32)])
    accuracy = (pred == y).float().mean().item()
    assert 0.75 <= accuracy <= 0.90, f"{name}: top-1 {accuracy:.4f} on 500 CIFAR-10 JPEG test images"


def _basic_block_parameters(c_in: int, c_out: int) -> int:
    """Two 3x3 convs without bias, two BatchNorms (weight and bias), and a 1x1 projection with its BatchNorm when
    the width changes."""
    params = 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out
    return params + (c_in * c_out + 2 * c_out if c_in != c_out else 0)


@pytest.mark.parametrize("blocks, widths", [((1, 1, 1), (16, 32, 64)), ((1, 1, 1, 1), (16, 32, 64, 128))])
def test_resnet_small_stages_and_parameter_count_by_hand(blocks, widths):
    """One stage per entry of ``blocks``, widths doubling: 77,754 parameters for the default's three stages,
    308,538 with a fourth (the candidate C3 of docs/default_recipe.md)."""
    model = resnet_small(num_classes=10, width=16, blocks=blocks)
    stem = 9 * 1 * 16 + 2 * 16
    body = sum(_basic_block_parameters(a, b) for a, b in zip((16,) + widths[:-1], widths))
    head = widths[-1] * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == stem + body + head
    assert model.feature_dim == widths[-1]
    side = 28
    for _ in blocks[1:]:  # each later stage: a stride-2 3x3 conv with padding 1, so the side halves rounding up
        side = (side + 1) // 2
    assert model.feature_maps(torch.zeros(2, 1, 28, 28)).shape == (2, widths[-1], side, side)  # 7 or 4
