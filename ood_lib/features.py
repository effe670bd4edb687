"""Logits and penultimate features, extracted once and cached by content hash.

A cache entry is keyed by (model weights digest, dataset content checksum, preprocessing, extraction
settings), so the same weights on the same images are never run twice, whichever notebook asks. Entries are
``.npz`` files written atomically under the cache folder. Every detector then runs from the cached arrays.

An entry also stores ``__sha256__``: the SHA-256 over its arrays' names, dtypes, shapes and bytes. An entry that
cannot be read back whole (truncated, bad zip CRC, zlib error, missing array, wrong shape or dtype, checksum
mismatch) is never used: it is removed and recomputed, with a one-line ``warnings.warn`` naming the file.
Entries written before the checksum existed are still used (the zip CRC checks their bytes).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ood_lib import ash, detectors, progress
from ood_lib.atomic import atomic_write
from ood_lib.progress import note_work
from ood_lib.train import as_channels_last, evaluation

# ITU-R BT.601 luma weights, for colour images fed to a grayscale model.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocess:
    """How uint8 (N, H, W, C) arrays become model inputs: channel conversion, then bilinear resize."""
    size: int
    channels: int

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, C) numpy -> uint8 (N, channels, size, size) torch tensor on the CPU."""
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        c = t.shape[1]
        if c != self.channels:
            if c == 1 and self.channels == 3:
                t = t.expand(-1, 3, -1, -1)
            elif c == 3 and self.channels == 1:
                w = torch.tensor(LUMA).view(1, 3, 1, 1)
                t = (t.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            else:
                raise ValueError(f"cannot convert {c} channels to {self.channels}")
        if t.shape[-2:] != (self.size, self.size):
            t = F.interpolate(t.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
        return t.contiguous()


class FeatureCache:
    """A folder of ``<sha256>.npz`` entries; ``get(parts, compute)`` returns the cached arrays or computes them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._on_miss: Callable[[], None] | None = None

    @contextlib.contextmanager
    def weights_on_miss(self, load: Callable[[], None]):
        """Inside, the first entry that has to be computed calls ``load()`` first: keys name weights by a recorded
        digest, and ``load`` puts those weights into the model (a run's dropped epochs are answered from the cache
        alone; only a miss reads a checkpoint)."""
        if self._on_miss is not None:
            raise RuntimeError("weights_on_miss does not nest")
        self._on_miss = load
        try:
            yield
        finally:
            self._on_miss = None

    def before_compute(self) -> None:
        """Called before any entry is computed: runs the pending ``weights_on_miss`` load, once."""
        load, self._on_miss = self._on_miss, None
        if load is not None:
            load()

    @staticmethod
    def key(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, parts: dict) -> Path:
        return self.root / f"{self.key(parts)}.npz"

    def get(self, parts: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        path = self.path(parts)
        if path.exists():
            try:
                out = read_entry(path)
                self.hits += 1
                note_work("reused")
                return out
            except Exception as e:  # a damaged entry is recomputed, never trusted
                warnings.warn(f"feature cache entry {path} is damaged ({type(e).__name__}: {e}); "
                              f"removed and recomputed", stacklevel=2)
                path.unlink(missing_ok=True)
        self.before_compute()
        out = compute()
        self.misses += 1
        note_work("computed")
        write_entry(path, out)
        return out


CHECKSUM_KEY = "__sha256__"


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_entry(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` and their ``arrays_digest`` as one ``.npz``, written atomically."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    with atomic_write(path) as f:
        np.savez(f, **arrays, **{CHECKSUM_KEY: np.array(arrays_digest(arrays))})


def read_entry(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an entry, read whole and checked against the stored digest; raises on any damage."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    stored = out.pop(CHECKSUM_KEY, None)
    if not out:
        raise ValueError("no arrays in it")
    if stored is not None:
        found = arrays_digest(out)
        if str(stored) != found:
            raise ValueError(f"its arrays' SHA-256 is {found}, the stored one {stored} (arrays, shapes or dtypes "
                             f"changed)")
    return out


# Evaluation runs in float32 on every device: bf16 logits carry 8 mantissa bits (spacing 0.06-0.125 at the logits'
# scale), enough to tie scores and move FPR95, and post-hoc fits on rounded features. Training may use bf16.
EVAL_PRECISION = "fp32"


def eval_precision(device: torch.device) -> str:
    """What an evaluation pass (``train.evaluation``) computes in on ``device``, as cache keys and manifests name
    it: "fp32" on the CPU, "fp32, no TF32" on other devices. The second sets GPU outputs apart from those of earlier
    code, which left cuDNN's default TF32 convolutions on (the H200 bundles of cifar10 seed 0, 2026-12-04)."""
    return EVAL_PRECISION if torch.device(device).type == "cpu" else f"{EVAL_PRECISION}, no TF32"


@torch.no_grad()
def extract(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
            batch_size: int = 1000, with_features: bool = True) -> dict[str, np.ndarray]:
    """Logits and (unless ``with_features`` is False) penultimate features, float32 and computed in float32 on
    every device, of uint8 images (N, C, H, W); model in eval mode, channels-last for the pass
    (``train.evaluation``). The logits are the same bits either way."""
    model.eval().to(device)
    logits, feats = [], []
    with evaluation(model), progress.Bar(-(-images.shape[0] // batch_size), "extract", unit="batch",
                                         leave=False) as bar:
        for start in range(0, images.shape[0], batch_size):
            x = as_channels_last(images[start:start + batch_size].to(device, non_blocking=True).float().div_(255))
            f = model.features(x)
            z = model.fc(f)
            logits.append(z.float().cpu())
            if with_features:
                feats.append(f.float().cpu())
            bar.update()
    out = {"logits": torch.cat(logits).numpy()}
    if with_features:
        out["features"] = torch.cat(feats).numpy()
    return out


def input_key(model: torch.nn.Module) -> list:
    """The in-model input normalisation (non-persistent buffers, so not in the weights digest)."""
    norm = getattr(model, "normalize", None)
    if norm is None:
        return []
    return [norm.mean.flatten().tolist(), norm.std.flatten().tolist()]


def pass_key(what: str, model: torch.nn.Module, digest: str, checksum: str, pre: Preprocess, device: torch.device,
             **extra) -> dict:
    """The cache key of one evaluation pass: what it stores, the weights, the input normalisation, the source data,
    the preprocessing, and the precision, device type and layout it was computed in (plus ``extra`` settings)."""
    return {"what": what, "weights": digest, "norm": input_key(model), "data": checksum, "pre": pre.key(), **extra,
            "precision": eval_precision(device), "device": device.type, "layout": "channels_last"}


def outputs(cache: FeatureCache, model: torch.nn.Module, digest: str, images: torch.Tensor, checksum: str,
            pre: Preprocess, device: torch.device, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Cached ``extract``: ``images`` are already preprocessed with ``pre``; ``checksum`` is the source data's. The key
    names the precision and the device type the outputs were computed in."""
    return cache.get(pass_key("outputs", model, digest, checksum, pre, device),
                     lambda: extract(model, images, device, batch_size))


def logits(cache: FeatureCache, model: torch.nn.Module, digest: str, images: torch.Tensor, checksum: str,
           pre: Preprocess, device: torch.device, batch_size: int = 1000) -> np.ndarray:
    """Cached logits alone: what the logit detectors need after every epoch. Their entry holds no features
    (ResNet-18 on CIFAR-10: 10 floats an image instead of 522), so a 100-epoch run caches megabytes, not gigabytes."""
    return cache.get(pass_key("logits", model, digest, checksum, pre, device),
                     lambda: extract(model, images, device, batch_size, with_features=False))["logits"]


def correct(cache: FeatureCache, model: torch.nn.Module, digest: str, images: torch.Tensor, labels: np.ndarray,
            checksum: str, pre: Preprocess, device: torch.device, batch_size: int = 1000) -> np.ndarray:
    """Cached ``argmax(logits) == labels`` (bool, one per image), stored as a bit vector: the per-epoch
    correctness of the training images that notebook 02's learning dynamics read."""
    labels = np.asarray(labels)
    parts = pass_key("correct", model, digest, checksum, pre, device,
                     labels=hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest())

    def compute() -> dict[str, np.ndarray]:
        z = extract(model, images, device, batch_size, with_features=False)["logits"]
        return {"bits": np.packbits(z.argmax(1) == labels), "n": np.array(len(labels))}
    out = cache.get(parts, compute)
    return np.unpackbits(out["bits"], count=int(out["n"])).astype(bool)


def odin_scores(cache: FeatureCache, model: torch.nn.Module, digest: str, images: torch.Tensor, checksum: str,
                pre: Preprocess, device: torch.device, temperature: float, epsilon: float,
                batch_size: int = 500) -> np.ndarray:
    """Cached ODIN scores (they need input gradients, so they cannot come from the logits cache)."""
    parts = pass_key("odin", model, digest, checksum, pre, device, temperature=temperature, epsilon=epsilon)

    def compute():
        model.eval().to(device)
        x = as_channels_last(images.float().div_(255))
        chunks = range(0, len(x), batch_size)
        with evaluation(model), progress.Bar(len(chunks), "ODIN", unit="batch", leave=False) as bar:
            scores = []
            for i in chunks:
                scores.append(detectors.odin(model, x[i:i + batch_size], temperature, epsilon, batch_size))
                bar.update()
        return {"scores": np.concatenate(scores)}

    return cache.get(parts, compute)["scores"]


def ash_score_table(cache: FeatureCache, model: torch.nn.Module, digest: str, images: torch.Tensor, checksum: str,
                    pre: Preprocess, device: torch.device, configs: list[tuple[str, float]],
                    site: str = ash.ASH_SITE, batch_size: int = 1000) -> dict[tuple[str, float], np.ndarray]:
    """Cached ``ash.energy_table``: ASH energy scores for several (variant, percentile) pairs; the uncached ones
    share ONE forward pass.

    ``images`` are uint8 (N, C, H, W), already preprocessed with ``pre``; ``checksum`` is the source data's. Each
    pair is its own cache entry (keyed like ``odin_scores`` plus variant, percentile and site), so a later sweep
    only computes the pairs it has not seen. Returns {(variant, percentile): scores (N,) float64}, keyed by the
    pairs as given."""
    configs = list(dict.fromkeys((v, p) for v, p in configs))
    ash.check(configs, site)
    parts = {(v, p): pass_key("ash", model, digest, checksum, pre, device, variant=v, percentile=float(p), site=site)
             for v, p in configs}
    missing = [cfg for cfg in configs if not cache.path(parts[cfg]).exists()]

    def table(pairs):
        model.eval().to(device)
        with evaluation(model):
            return ash.energy_table(model, images, device, pairs, site, batch_size)

    if missing:
        cache.before_compute()
    fresh = table(missing) if missing else {}

    def compute(cfg):
        if cfg not in fresh:  # an entry that existed but could not be read
            fresh.update(table([cfg]))
        return {"scores": fresh[cfg]}

    return {cfg: cache.get(parts[cfg], lambda cfg=cfg: compute(cfg))["scores"] for cfg in configs}


def ash_scores(cache: FeatureCache, model: torch.nn.Module, digest: str, images: torch.Tensor, checksum: str,
               pre: Preprocess, device: torch.device, variant: str, percentile: float | None = None,
               batch_size: int = 1000, site: str = ash.ASH_SITE) -> np.ndarray:
    """Cached ASH energy scores (N,) of one variant and percentile (see ``ash_score_table``); ``percentile``
    None: the variant's ``ash.ASH_PERCENTILE``."""
    percentile = ash.percentile_of(variant, percentile)
    return ash_score_table(cache, model, digest, images, checksum, pre, device, [(variant, percentile)], site,
                           batch_size)[(variant, percentile)]
