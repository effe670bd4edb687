"""Model zoo: small and CIFAR-scale classifiers, and the pretrained DenseNet-BC-100 checkpoints.

Every model takes inputs in [0, 1] of shape (N, C, H, W) and normalises inside itself (the Unleashing Mask
convention, so that input-space perturbations such as ODIN's epsilon live in pixel units). The normalisation
constants are non-persistent buffers: they never appear in a state_dict, so checkpoints load strictly.

Every model exposes the same interface, which the detectors rely on:
  feature_maps(x)  the last convolutional feature map (after the final BN-ReLU), before global pooling;
  features(x)      the penultimate vector: global average of feature_maps(x), shape (N, feature_dim);
  fc               the nn.Linear(feature_dim, num_classes) head; forward(x) == fc(features(x)).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .paths import PROJECT_ROOT, models_root

# Normalisation constants (per channel, on [0, 1] inputs).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # Unleashing Mask's in-model normaliser
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
DICE_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # DICE/LINe transforms ("classic" std, not the true one)
DICE_CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as non-persistent buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Shared interface: subclasses set `normalize`, `fc`, `feature_dim` and define `feature_maps`."""

    normalize: Normalize
    fc: nn.Linear
    feature_dim: int

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan-out), BN at identity, zero linear bias: the ResNet/DenseNet/WRN inits."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


# ----------------------------------------------------------------------------------------------------------
# ResNet (He et al. 2016), CIFAR style: 3x3 stem, no max-pool, post-activation BasicBlocks.

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity (or 1x1 conv-BN projection), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, affine_bn: bool):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out, affine=affine_bn)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out, affine=affine_bn)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out, affine=affine_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Classifier):
    """Stem conv3x3-BN-ReLU, then stages of BasicBlocks (first stage stride 1, the others stride 2)."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int, in_channels: int,
                 mean: Sequence[float], std: Sequence[float], affine_bn: bool):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], affine=affine_bn)
        stages, c_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stages.append(nn.Sequential(*[BasicBlock(c, width, s, affine_bn)
                                          for c, s in zip([c_in] + [width] * (n - 1), strides)]))
            c_in = width
        self.layers = nn.Sequential(*stages)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init_weights(self)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(self.normalize(x)))))


def resnet_small(num_classes: int = 10, in_channels: int = 1, width: int = 16, blocks: Sequence[int] = (2, 2, 2),
                 mean: Sequence[float] = FASHION_MNIST_MEAN, std: Sequence[float] = FASHION_MNIST_STD,
                 affine_bn: bool = True) -> ResNet:
    """Small CIFAR-style ResNet (He et al. 2016, Sec. 4.2) for CPU profiles on 28x28 grayscale inputs:
    3x3 stem, then one stage of BasicBlocks per entry of ``blocks``, widths (w, 2w, 4w, ...) and strides
    (1, 2, 2, ...); feature dim w * 2**(stages - 1). The defaults (w=16, 2 blocks in each of 3 stages) give a
    ResNet-14 with a 64-d feature. A fourth stage (8w at 4x4) adds most of the parameters for a third more
    compute."""
    widths = tuple(width * 2 ** i for i in range(len(blocks)))
    return ResNet(widths, blocks, num_classes, in_channels, mean, std, affine_bn)


def resnet18(num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
             std: Sequence[float] = CIFAR10_STD, affine_bn: bool = True) -> ResNet:
    """CIFAR ResNet-18 (He et al. 2016, the common CIFAR adaptation): 3x3 stem with no max-pool, four stages of
    two BasicBlocks with widths 64, 128, 256, 512 and strides 1, 2, 2, 2; 512-d feature."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, mean, std, affine_bn)


# ----------------------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, widths 16k, 32k, 64k.

class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, plus identity or a 1x1 projection
    of the pre-activated input when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float, affine_bn: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, affine=affine_bn)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out, affine=affine_bn)
        self.conv2 = _conv3x3(c_out, c_out)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.dropout(F.relu(self.bn2(out)), p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(Classifier):
    """conv3x3(16), three groups of (depth-4)/6 WideBlocks, final BN-ReLU."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int, dropout: float,
                 mean: Sequence[float], std: Sequence[float], affine_bn: bool):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(in_channels, 16)
        groups, c_in = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            groups.append(nn.Sequential(*[WideBlock(c_in if i == 0 else width, width, stride if i == 0 else 1,
                                                    dropout, affine_bn) for i in range(n)]))
            c_in = width
        self.blocks = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[-1], affine=affine_bn)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init_weights(self)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.blocks(self.conv1(self.normalize(x)))))


def wrn(depth: int = 40, widen: int = 2, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0,
        mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
        affine_bn: bool = True) -> WideResNet:
    """Wide-ResNet-depth-widen (Zagoruyko & Komodakis 2016), default WRN-40-2: 3x3 stem with 16 channels,
    three groups of 6 pre-activation blocks with widths 32, 64, 128 and strides 1, 2, 2, final BN-ReLU;
    128-d feature."""
    return WideResNet(depth, widen, num_classes, in_channels, dropout, mean, std, affine_bn)


# ----------------------------------------------------------------------------------------------------------
# DenseNet-BC (Huang et al. 2017). Module names follow the DICE / Unleashing Mask checkpoints exactly.

class DenseLayer(nn.Module):
    """Bottleneck layer: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); its output is concatenated to its input."""

    def __init__(self, c_in: int, growth: int, dropout: float, affine_bn: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, affine=affine_bn)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth, affine=affine_bn)
        self.conv2 = _conv3x3(4 * growth, growth)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.conv1(F.relu(self.bn1(x))), p=self.dropout, training=self.training)
        out = F.dropout(self.conv2(F.relu(self.bn2(out))), p=self.dropout, training=self.training)
        return torch.cat([x, out], 1)


class DenseBlock(nn.Module):
    def __init__(self, n: int, c_in: int, growth: int, dropout: float, affine_bn: bool):
        super().__init__()
        self.layer = nn.Sequential(*[DenseLayer(c_in + i * growth, growth, dropout, affine_bn) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class Transition(nn.Module):
    """Compression between dense blocks: BN-ReLU-conv1x1, then 2x2 average pooling."""

    def __init__(self, c_in: int, c_out: int, dropout: float, affine_bn: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, affine=affine_bn)
        self.conv1 = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.conv1(F.relu(self.bn1(x))), p=self.dropout, training=self.training)
        return F.avg_pool2d(out, 2)


class DenseNet(Classifier):
    """conv3x3(2k), dense block, transition, dense block, transition, dense block, BN-ReLU."""

    def __init__(self, depth: int, growth: int, reduction: float, num_classes: int, in_channels: int,
                 affine_bn: bool, dropout: float, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6  # bottleneck layers per block (each has two convs)
        self.normalize = Normalize(mean, std)
        c = 2 * growth
        self.conv1 = _conv3x3(in_channels, c)
        self.block1 = DenseBlock(n, c, growth, dropout, affine_bn)
        c, c_prev = int((c + n * growth) * reduction), c + n * growth
        self.trans1 = Transition(c_prev, c, dropout, affine_bn)
        self.block2 = DenseBlock(n, c, growth, dropout, affine_bn)
        c, c_prev = int((c + n * growth) * reduction), c + n * growth
        self.trans2 = Transition(c_prev, c, dropout, affine_bn)
        self.block3 = DenseBlock(n, c, growth, dropout, affine_bn)
        self.feature_dim = c + n * growth
        self.bn1 = nn.BatchNorm2d(self.feature_dim, affine=affine_bn)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        _init_weights(self)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.trans1(self.block1(out))
        out = self.trans2(self.block2(out))
        return F.relu(self.bn1(self.block3(out)))


def densenet_bc(depth: int = 100, growth: int = 12, reduction: float = 0.5, num_classes: int = 10,
                affine_bn: bool = True, dropout: float = 0.0, in_channels: int = 3,
                mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> DenseNet:
    """DenseNet-BC (Huang et al. 2017), default DenseNet-BC-100 with k=12 ("DenseNet-101" in the OOD
    literature): 3x3 stem with 2k channels, three dense blocks of 16 bottleneck layers, transitions with
    compression 0.5 and 2x2 average pooling, final BN-ReLU; 342-d feature (8x8 map on 32x32 inputs).
    affine_bn=False gives BatchNorm without gamma/beta everywhere, as in the Unleashing Mask checkpoint."""
    return DenseNet(depth, growth, reduction, num_classes, in_channels, affine_bn, dropout, mean, std)


ARCHITECTURES: dict[str, Callable[..., Classifier]] = {
    "resnet_small": resnet_small,
    "resnet18": resnet18,
    "wrn40_2": wrn,
    "densenet_bc100": densenet_bc,
}


# ----------------------------------------------------------------------------------------------------------
# Pretrained checkpoints (files in ../shared/models; see MANIFEST.md there).

@dataclass(frozen=True)
class PretrainedSpec:
    """A checkpoint file, its SHA-256, the architecture it fits and the input normalisation it was trained with."""

    name: str
    filename: str
    sha256: str
    builder: Callable[..., Classifier]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where the file comes from, for the missing-file message
    weights_only: bool = True  # False: a pickle, unpickled only after the hash check
    state_dict_key: str = "state_dict"
    strip_prefix: str = ""


PRETRAINED: dict[str, PretrainedSpec] = {
    "dice_densenet100_cifar10": PretrainedSpec(
        name="dice_densenet100_cifar10",
        filename="dice_densenet100_cifar10.pth.tar",
        sha256="deaefd082911a1c6c92aacdcfecf03c71b932acc5c08b779c85c44eccdc0c817",
        builder=partial(densenet_bc, affine_bn=True),
        mean=DICE_CIFAR10_MEAN, std=DICE_CIFAR10_STD,
        source="github.com/deeplearning-wisc/dice, checkpoints/CIFAR-10/densenet/checkpoint_100.pth.tar "
               "(commit 8acfb8d)",
    ),
    "um_densenet_cifar10": PretrainedSpec(
        name="um_densenet_cifar10",
        filename="um_densenet_cifar10_jan2023.state",
        sha256="741c266f805503d1527efe16b9efdcc3ff12db5aa2495ff3e193e5ed33576ac0",
        builder=partial(densenet_bc, affine_bn=False),
        mean=CIFAR10_MEAN, std=CIFAR10_STD,
        source="github.com/tmlr-group/Unleashing-Mask, pretrained/pretrained_model.state (commit 312c2c5)",
        weights_only=False,
        strip_prefix="module.",
    ),
}


def load_pretrained(name: str, root: str | Path | None = None) -> Classifier:
    """Build `name`'s architecture and load its checkpoint strictly; returns the model in eval mode.

    The file's SHA-256 is checked on the bytes in memory before anything is unpickled; those same bytes are loaded.
    Raises FileNotFoundError (naming the file, where it looked and how to get it) or ValueError (hash mismatch).
    """
    spec = PRETRAINED[name]
    folder = Path(root).expanduser().resolve() if root is not None else models_root()
    path = (folder or PROJECT_ROOT.parent / "shared" / "models") / spec.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained checkpoint {spec.filename!r} for {name!r} not found. Looked in: {path}. "
            f"Get it from {spec.source} and put it in a folder named by OOD_MODELS_ROOT "
            f"(default: ../shared/models beside the project), or pass root=...")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != spec.sha256:
        raise ValueError(f"SHA-256 mismatch for {path}: expected {spec.sha256}, found {found}. "
                         f"The file is corrupt or not the checkpoint {name!r}; it was not unpickled.")
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=spec.weights_only)
    state = checkpoint[spec.state_dict_key]
    state = {k.removeprefix(spec.strip_prefix): v for k, v in state.items()}
    model = spec.builder(mean=spec.mean, std=spec.std)
    model.load_state_dict(state, strict=True)
    return model.eval()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the state_dict (sorted by name): each tensor's name, dtype, shape and raw bytes, on CPU."""
    return state_digest(model.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """``weights_digest`` of a state_dict itself (e.g. the weights a checkpoint holds)."""
    h = hashlib.sha256()
    for key, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
