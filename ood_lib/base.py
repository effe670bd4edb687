"""The base model of the study: the data of a profile, training per seed, every detector after every epoch.

Notebook 01 trains it; notebooks 02-04 load the same runs. A run lives in
``<cache>/base/<hash of the data, model and train sections>/seed<k>/`` (``run_dir``), so any notebook that asks
for the base model of a profile finds the weights 01 trained instead of training again.

Held-out data, so that an epoch can be chosen without looking at test OOD data:
  * ID validation: ``data.id_val_size`` images of the ID training split that are never trained on;
  * OOD validation: each OOD set is split in half (seed ``data.split_seed``); one half (``val``) may be used
    for choosing, the other (``test``) is the only one reported in ``metrics.csv``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ood_lib import epochs, metrics
from ood_lib.config import Profile
from ood_lib.data import DATASETS, ImageArrays, load_dataset
from ood_lib.detectors import LOGIT_DETECTORS
from ood_lib.features import FeatureCache, Preprocess, correct, logits, odin_scores, outputs
from ood_lib.models import ARCHITECTURES, weights_digest
from ood_lib.paths import cache_dir
from ood_lib.train import CheckpointDamaged, load_epoch, recorded_digests, resolve_device, train

NOTEBOOK = "01"


@dataclass(frozen=True)
class EvalSet:
    """A preprocessed set to score: uint8 images (N, C, H, W) on the CPU, labels, and the source checksum."""
    name: str
    split: str
    images: torch.Tensor
    labels: np.ndarray
    checksum: str


@dataclass(frozen=True)
class StudyData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_checksum: str
    id_val: EvalSet
    id_test: EvalSet
    ood_val: dict[str, EvalSet]
    ood_test: dict[str, EvalSet]
    num_classes: int
    pre: Preprocess

    def checksums(self) -> dict[str, str]:
        sets = [self.id_val, self.id_test, *self.ood_val.values(), *self.ood_test.values()]
        return {f"{s.name}/{s.split}": s.checksum for s in sets}


def _subset(arrays: ImageArrays, size: int | None, rng: np.random.Generator) -> ImageArrays:
    if size is None or size >= len(arrays.y):
        return arrays
    return arrays.subset(np.sort(rng.permutation(len(arrays.y))[:size]))


def _eval_set(arrays: ImageArrays, split: str, pre: Preprocess) -> EvalSet:
    return EvalSet(arrays.name, split, pre(arrays.x), arrays.y.copy(), arrays.checksum)


def prepare_data(profile: Profile, with_ood: bool = True) -> StudyData:
    """Load, subset, split and preprocess every set of the profile (deterministic in ``data.split_seed``).
    ``with_ood=False`` loads the ID sets alone (the same subsets: the OOD sets are drawn after them), for choices
    that must not see OOD data (benchmarks/recipe_gate.py)."""
    d = profile.data
    pre = data_pre(profile)
    rng = np.random.default_rng(d.split_seed)
    train_all = load_dataset(d.id_set, "train")
    order = rng.permutation(len(train_all.y))
    val_idx = np.sort(order[:d.id_val_size])
    rest = order[d.id_val_size:]
    if d.balanced and d.train_size is not None:  # the first train_size / K of each class in the same draw
        k = DATASETS[d.id_set].num_classes
        train_idx = np.sort(np.concatenate([rest[train_all.y[rest] == c][:d.train_size // k] for c in range(k)]))
    else:
        train_idx = np.sort(rest[:d.train_size])
    train_set = train_all.subset(train_idx)
    id_val = _eval_set(train_all.subset(val_idx), "val", pre)
    id_test = _eval_set(_subset(load_dataset(d.id_set, "test"), d.id_test_size, rng), "test", pre)
    ood_val, ood_test = {}, {}
    for name in d.ood_sets if with_ood else ():
        arrays = _subset(load_dataset(name, DATASETS[name].ood_split), d.ood_size, rng)
        halves = np.array_split(rng.permutation(len(arrays.y)), 2)
        ood_val[name] = _eval_set(arrays.subset(np.sort(halves[0])), "val", pre)
        ood_test[name] = _eval_set(arrays.subset(np.sort(halves[1])), "test", pre)
    return StudyData(pre(train_set.x), torch.from_numpy(train_set.y.astype(np.int64)), train_set.checksum, id_val,
                     id_test, ood_val, ood_test, DATASETS[d.id_set].num_classes, pre)


def build_model(profile: Profile, data: StudyData) -> torch.nn.Module:
    """The profile's architecture; normalisation constants from the ID training images unless given."""
    x = data.train_images.float().div(255)
    options = {"mean": tuple(round(v, 4) for v in x.mean((0, 2, 3)).tolist()),
               "std": tuple(round(v, 4) for v in x.std((0, 2, 3)).tolist()),
               **profile.model.options}
    if "blocks" in options:
        options["blocks"] = tuple(options["blocks"])
    return ARCHITECTURES[profile.model.arch](num_classes=data.num_classes, in_channels=profile.data.channels,
                                             **options)


def run_dir(profile: Profile, seed: int) -> Path:
    return cache_dir(profile.name) / "base" / profile.digest("data", "model", "train") / f"seed{seed}"


def feature_cache(profile: Profile) -> FeatureCache:
    return FeatureCache(cache_dir(profile.name) / "features")


def score_sets(profile: Profile, model: torch.nn.Module, digest: str, sets: list[EvalSet], cache: FeatureCache,
               device: torch.device, detectors: tuple[str, ...] | None = None) -> dict[tuple[str, str], dict]:
    """Scores of each detector (default: the profile's) and logits on each set, all through the cache (logits
    alone: no features are cached for scoring)."""
    e = profile.eval
    detectors = e.detectors if detectors is None else detectors
    out = {}
    for s in sets:
        z = logits(cache, model, digest, s.images, s.checksum, data_pre(profile), device, e.batch_size)
        scores = {name: LOGIT_DETECTORS[name](z) for name in detectors if name in LOGIT_DETECTORS}
        if "odin" in detectors:
            scores["odin"] = odin_scores(cache, model, digest, s.images, s.checksum, data_pre(profile), device,
                                         e.odin_temperature, e.odin_epsilon, batch_size=min(e.batch_size, 500))
        out[(s.name, s.split)] = {"logits": z, "labels": s.labels, "scores": scores}
    return out


def data_pre(profile: Profile) -> Preprocess:
    return Preprocess(profile.data.input_size, profile.data.channels)


def metric_rows(profile: Profile, scored: dict, data: StudyData, seed: int, epoch: int | None, model_name: str,
                notebook: str, splits: tuple[str, ...] = ("test", "val")) -> list[dict]:
    """Tidy rows (STUDY §6) plus a ``split`` column: ``test`` rows go to metrics.csv, ``val`` rows select."""
    rows = []
    base = {"notebook": notebook, "seed": seed, "model": model_name, "epoch": epoch, "id_set": profile.data.id_set}
    pairs = {"test": (data.id_test, data.ood_test), "val": (data.id_val, data.ood_val)}
    for split in splits:
        id_set, ood = pairs[split]
        id_scored = scored[(id_set.name, id_set.split)]
        acc = metrics.accuracy(id_scored["logits"], id_scored["labels"])
        rows.append({**base, "detector": "", "ood_set": "", "metric": "id_acc", "value": acc, "split": split})
        for name, s in ood.items():
            for det, id_scores in id_scored["scores"].items():
                for m, v in metrics.all_metrics(id_scores, scored[(name, s.split)]["scores"][det]).items():
                    rows.append({**base, "detector": det, "ood_set": name, "metric": m, "value": v, "split": split})
    return rows


def train_outputs(profile: Profile, model: torch.nn.Module, digest: str, data: StudyData, cache: FeatureCache,
                  device: torch.device) -> dict[str, np.ndarray]:
    """Cached logits and features of the ID training images as trained on, without augmentation (the data
    post-hoc detectors fit their statistics on)."""
    out = outputs(cache, model, digest, data.train_images, data.train_checksum, data_pre(profile), device,
                  profile.eval.batch_size)
    return {**out, "labels": data.train_labels.numpy()}


def train_correct(profile: Profile, model: torch.nn.Module, digest: str, data: StudyData, cache: FeatureCache,
                  device: torch.device) -> np.ndarray:
    """Cached correctness (bool, one per image) of the ID training images without augmentation: the per-epoch
    record notebook 02's learning dynamics read."""
    return correct(cache, model, digest, data.train_images, data.train_labels.numpy(), data.train_checksum,
                   data_pre(profile), device, profile.eval.batch_size)


def all_sets(data: StudyData) -> list[EvalSet]:
    return [data.id_test, data.id_val, *data.ood_test.values(), *data.ood_val.values()]


def test_sets(data: StudyData) -> list[EvalSet]:
    return [data.id_test, *data.ood_test.values()]


def logit_detectors(profile: Profile) -> tuple[str, ...]:
    """The profile's detectors that are functions of the logits alone (cheap enough to run after every epoch)."""
    return tuple(d for d in profile.eval.detectors if d in LOGIT_DETECTORS)


def epoch_scorer(profile: Profile, data: StudyData, cache: FeatureCache, device: torch.device,
                 detectors: tuple[str, ...], sets: list[EvalSet] | None = None,
                 with_train_correct: bool = False) -> Callable[[int, torch.nn.Module], dict]:
    """An ``on_epoch_end`` for ``train``: scores ``sets`` (default: the test sets) with ``detectors`` into the cache
    (and the training images' correctness, with ``with_train_correct``) and returns the weights digest and the two
    numbers the training log prints (ID test accuracy, mean test FPR95 of the selection detector)."""
    sets = test_sets(data) if sets is None else sets

    def on_epoch_end(epoch: int, m: torch.nn.Module) -> dict:
        t0 = time.perf_counter()
        digest = weights_digest(m)
        scored = score_sets(profile, m, digest, sets, cache, device, detectors)
        if with_train_correct:
            train_correct(profile, m, digest, data, cache, device)
        sel = profile.eval.selection_detector
        id_test = scored[(data.id_test.name, "test")]
        fpr = [metrics.fpr95(id_test["scores"][sel], scored[(name, "test")]["scores"][sel])
               for name in data.ood_test if sel in id_test["scores"]]
        return {"digest": digest, "eval_seconds": time.perf_counter() - t0,
                "log_test_acc": metrics.accuracy(id_test["logits"], id_test["labels"]),
                f"log_{sel}_fpr95": float(np.mean(fpr)) if fpr else float("nan")}
    return on_epoch_end


@contextlib.contextmanager
def epoch_weights(model: torch.nn.Module, directory: Path, epoch: int, digests: dict[int, str],
                  cache: FeatureCache) -> Iterator[str]:
    """The weights digest of ``epoch`` of the run in ``directory``, for cache keys; inside, the first pass the cache
    has to compute loads that checkpoint into ``model`` first (and checks its digest), so that cached passes need
    no checkpoint (``train.drop_checkpoints``). ``digests``: the run's ``train.recorded_digests``; an epoch without
    one (a run trained before digests were recorded) is loaded at once."""
    digest = digests.get(epoch)
    if digest is None:
        load_epoch(model, directory, epoch)
        yield weights_digest(model)
        return

    def load() -> None:
        load_epoch(model, directory, epoch)
        found = weights_digest(model)
        if found != digest:
            raise CheckpointDamaged(f"the checkpoint of epoch {epoch} in {directory} holds weights with digest "
                                    f"{found}, but its run recorded {digest} for that epoch; remove {directory} "
                                    f"and run again")

    with cache.weights_on_miss(load):
        yield digest


def evaluate_epochs(profile: Profile, data: StudyData, model: torch.nn.Module, directory: Path,
                    epochs: list[int], model_name: str, notebook: str, seed: int, cache: FeatureCache,
                    device: torch.device, detectors: tuple[str, ...]) -> pd.DataFrame:
    """Test-split metric rows of the checkpoints ``epochs`` of a run in ``directory`` (loaded into ``model`` only
    where a pass is not cached)."""
    rows = []
    digests = recorded_digests(directory)
    for epoch in epochs:
        with epoch_weights(model, directory, epoch, digests, cache) as digest:
            scored = score_sets(profile, model, digest, test_sets(data), cache, device, detectors)
        rows += metric_rows(profile, scored, data, seed, epoch, model_name, notebook, splits=("test",))
    return pd.DataFrame(rows)


def train_seed(profile: Profile, data: StudyData, seed: int, log: Callable[[str], None] = print,
               score_epochs: bool = True) -> pd.DataFrame:
    """Train (or resume) the base model for one seed, scoring every set after every epoch into the cache.

    Returns the per-epoch history: train loss and accuracy, lr, seconds, weights digest. A finished run is
    only reloaded. ``evaluate_run`` then turns the cached scores into metric rows. ``score_epochs=False`` trains
    the weights alone (a re-train on a machine whose tables came from elsewhere: a third of a GPU epoch saved).
    """
    device = resolve_device(profile.device)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    torch.manual_seed(seed)
    model = build_model(profile, data)
    # a run whose epoch checkpoints are dropped afterwards records now what notebook 02 later reads of every epoch
    on_epoch_end = (epoch_scorer(profile, data, feature_cache(profile), device, logit_detectors(profile),
                                 all_sets(data), with_train_correct=not profile.keep_epoch_checkpoints)
                    if score_epochs else None)
    history = train(model, data.train_images, data.train_labels, profile.train, seed, run_dir(profile, seed),
                    device, on_epoch_end=on_epoch_end, log=log, name="base")
    return pd.DataFrame(history).assign(seed=seed)


def evaluate_run(profile: Profile, data: StudyData, seed: int, cache: FeatureCache | None = None) -> pd.DataFrame:
    """Metric rows of a trained seed, from the feature cache (weights reloaded per epoch): the logit detectors at
    every epoch; the others (ODIN: three passes with an input gradient) at the final epoch and the epochs the
    selection rules of ``ood_lib.epochs`` pick for the selection detector, which is where notebook 01 reads them."""
    device = resolve_device(profile.device)
    torch.manual_seed(seed)
    model = build_model(profile, data)
    cache = cache or feature_cache(profile)
    sets = all_sets(data)
    directory = run_dir(profile, seed)
    digests = recorded_digests(directory)
    rows = []
    for epoch in range(1, profile.train.epochs + 1):
        with epoch_weights(model, directory, epoch, digests, cache) as digest:
            scored = score_sets(profile, model, digest, sets, cache, device, logit_detectors(profile))
        rows += metric_rows(profile, scored, data, seed, epoch, "base", NOTEBOOK)
    costly = tuple(d for d in profile.eval.detectors if d not in LOGIT_DETECTORS)
    if costly:
        sel = profile.eval.selection_detector
        picks = epochs.selected_epochs(pd.DataFrame(rows)).set_index("detector").loc[sel]
        for epoch in sorted({int(picks[rule]) for rule in epochs.RULES}):
            with epoch_weights(model, directory, epoch, digests, cache) as digest:
                scored = score_sets(profile, model, digest, sets, cache, device, costly)
            rows += [r for r in metric_rows(profile, scored, data, seed, epoch, "base", NOTEBOOK)
                     if r["metric"] != "id_acc"]
    return pd.DataFrame(rows)


def load_base(profile: Profile, data: StudyData, seed: int, epoch: int | None = None) -> torch.nn.Module:
    """The base model of ``seed`` at ``epoch`` (default: the final epoch), in eval mode; trains nothing."""
    torch.manual_seed(seed)
    model = build_model(profile, data)
    try:
        return load_epoch(model, run_dir(profile, seed), epoch or profile.train.epochs).eval()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. The base model of profile {profile.name!r}, seed {seed}, has not been trained: "
                                f"run notebook 01 first (python -m ood_lib.reproduce --profile {profile.name} "
                                f"--notebooks 01)") from None
