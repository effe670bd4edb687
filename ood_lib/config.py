"""Profiles: one YAML file per profile in ``configs/``, read into frozen dataclasses.

Every field and its default is visible below. A key the dataclasses do not know, a wrong type or an unknown
name (profile, dataset, architecture, detector) raises ``ProfileError`` that lists the allowed names, before
any work starts. ``load_profile(name, overrides)`` also takes dotted overrides such as ``{"train.epochs": 3}``.

Values are checked at load time too, so that nothing fails late: distinct seeds; an ID set with train and test
splits that is not also an OOD set; positive learning rates and sizes, within the splits where the dataset
registry knows their sizes; ``model.options`` that build the architecture and run one forward pass at
``data.input_size``; ``device: cuda`` only where torch sees a CUDA device. Each ``ProfileError`` is one
paragraph: the profile, the parameter, its value, what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ood_lib.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "configs"


class ProfileError(ValueError):
    """A profile or parameter that does not exist or has a wrong value."""


@dataclass(frozen=True)
class DataConfig:
    id_set: str = "fashion_mnist"
    ood_sets: tuple[str, ...] = ("mnist", "animal_mnist")
    train_size: int | None = None    # images drawn once (seed-independent) from the ID train split; None = all
    id_val_size: int = 1000          # held out from the ID train split, never trained on (for OOD-free selection)
    id_test_size: int | None = None  # ID test images scored; None = the whole split
    ood_size: int | None = None      # images per OOD set before the val/test halving; None = all
    input_size: int = 28             # images are resized to input_size x input_size
    channels: int = 1                # 1 = grayscale, 3 = RGB (sets are converted to this)
    split_seed: int = 0              # fixes the subsets and the OOD val/test halves for every training seed
    balanced: bool = False           # draw train_size with the same number of images from every class


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet_small"
    options: dict = field(default_factory=dict)  # keyword arguments of the architecture's constructor


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and a per-epoch cosine schedule, lr_e = lr * (1 + cos(pi e / E)) / 2 (UM's recipe)."""
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    crop_padding: int = 4            # random crop with zero padding; 0 disables
    flip: bool = True                # random horizontal flip
    bf16: bool = True                # autocast training to bfloat16 on CUDA
    cpu_bf16: bool = False           # also on the CPU (cifar10-cpu: 1.6-2.3x faster where it has avx512_bf16);
                                     # evaluation is float32 everywhere (features.extract)
    channels_last: bool = True       # channels-last memory format (on AVX-512 CPUs too: train.CHANNELS_LAST_CPUS)


@dataclass(frozen=True)
class EvalConfig:
    detectors: tuple[str, ...] = ("msp", "maxlogit", "energy", "odin")
    batch_size: int = 1000
    odin_temperature: float = 1000.0
    odin_epsilon: float = 0.0014     # on [0, 1] inputs
    selection_detector: str = "energy"  # the detector whose curves the notebooks headline


@dataclass(frozen=True)
class LineConfig:
    """Notebook 04: LINe's setting (``docs/methods.md`` §2; CIFAR-10: p_a 90, p_w 90, tau 1.0), the grids of its
    sensitivity study, and the detectors compared with it. p_a and p_w are percentiles PRUNED."""
    p_a: float = 90.0
    p_w: float = 90.0
    tau: float | None = None          # activation clip; None = the tau_percentile-th percentile of ID train activations
    tau_percentile: float = 90.0      # the rule for models without a published tau (raw tau depends on the network)
    sweep_p_a: tuple[float, ...] = (0.0, 10.0, 30.0, 50.0, 70.0, 80.0, 90.0, 95.0, 99.0)
    sweep_p_w: tuple[float, ...] = (0.0, 10.0, 30.0, 50.0, 70.0, 80.0, 90.0, 95.0, 99.0)
    sweep_tau_percentiles: tuple[float, ...] = (50.0, 70.0, 80.0, 90.0, 95.0, 99.0, 100.0)
    baselines: tuple[str, ...] = ("msp", "maxlogit", "energy", "mahalanobis", "rmds", "knn", "react", "react_1", "dice",
                                  "vim", "gradnorm", "gen")
    ash: tuple[str, ...] = ("ash_p", "ash_b", "ash_s")
    pretrained: tuple[str, ...] | None = None  # checkpoints notebook 04 evaluates; None = every one in `pretrained`


@dataclass(frozen=True)
class UMConfig:
    """Notebooks 02, 03 and 06: Unleashing Mask (``docs/methods.md`` §1). Every mask fraction here is the fraction
    of each conv/linear layer's weights KEPT (the paper's ``prune_rate``): 0.965 masks 3.5%, 0.8 prunes 20%."""
    mask_keep: float = 0.965          # random mask of gamma and of the atypicality scores (paper: 0.965)
    mask_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # gamma and atypicality are averaged over these random masks
    curve_keep: tuple[float, ...] = (1.0, 0.995, 0.99, 0.98, 0.965, 0.95, 0.9, 0.85, 0.8, 0.7)  # loss vs mask ratio
    curve_images: int | None = 2000   # training images the loss-vs-mask-ratio curve averages over; None = all
    atypical_remove: int = 1000       # k: the top-k atypical (or k random) training images left out (paper: 1000)
    global_arm: bool = True           # notebook 02 also retrains without the global top-k (a diagnostic: the headline
                                      # is per class vs random; the global top-k's class composition is shown anyway)
    gallery_size: int = 5             # images per class shown as most / least atypical
    gamma: float | None = None        # flood level; None = the median over mask_seeds of the masked final model's loss
    gamma_sweep: tuple[float, ...] = ()  # extra UM runs at these fixed flood levels: how much gamma matters
    epochs: int = 100                 # UM / UMAP schedule: from the final base model, SGD + cosine (paper: 100, 0.1)
    lr: float = 0.1
    umap_keep: float = 0.8            # UMAP keeps the top 80% |score| of every layer (prunes 20%)
    umap_train_weights: bool = False  # False: only the scores learn (the paper's CIFAR-10 setting)
    ce_control: bool = True           # also fine-tune with plain cross-entropy on the same schedule (no flooding)
    rule_b: bool = True               # also UM at gamma by rule B (um.RuleB: the base run's loss at its ID-val minimum)
    # Notebook 06: the same fine-tunes from the authors' own final model, a checkpoint of models.PRETRAINED
    paper_checkpoint: str | None = None   # e.g. um_densenet_cifar10; None: notebook 06 has nothing to run
    paper_gamma: float | None = None      # the flood level the authors configured for it (0.15 for that checkpoint)
    paper_seeds: tuple[int, ...] = (0,)   # fine-tuning seeds (batch order, augmentation, UMAP's initial scores)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    notebooks: tuple[str, ...] = ("01",)   # the notebooks `make reproduce` / the runner runs by default
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"                   # auto | cpu | cuda
    threads: int | None = None             # torch CPU threads; None = torch's default
    # False: once a model stage has scored every epoch of a run into the feature cache, the run keeps only the epoch
    # checkpoints the study reads weights from again (the last, the selection rules' epochs, rule B's), not all
    # 100 (ResNet-18: 45 MB each); fine-tunes and removal arms, which read only their last, drop each epoch's as
    # soon as the next is written (at most two on disk). Only disk changes; no table does.
    keep_epoch_checkpoints: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    line: LineConfig = field(default_factory=LineConfig)
    um: UMConfig = field(default_factory=UMConfig)
    pretrained: tuple[str, ...] = ()       # checkpoints of ood_lib.models.PRETRAINED evaluated by this profile

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest_dict(self) -> dict:
        """``to_dict`` less the fields added after digests were first used, while they are at their default
        (``LATE_FIELDS``): adding a switch does not re-key the runs and shards it does not change."""
        d = self.to_dict()
        for section, late in LATE_FIELDS.items():
            d[section] = {k: v for k, v in d[section].items() if not (k in late and v == late[k])}
        return d

    def digest(self, *sections: str) -> str:
        """Short SHA-256 of the named sections (e.g. ``digest("data", "model", "train")`` keys trained models)."""
        d = self.digest_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# section -> {field: default}: fields left out of Profile.digest while at their default (see there)
LATE_FIELDS = {"data": {"balanced": False}, "train": {"cpu_bf16": False}}
DEVICES = ("auto", "cpu", "cuda")
NOTEBOOKS = ("00", "01", "02", "03", "04", "05", "06")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (the few types used above) and convert lists to tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ProfileError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ProfileError(f"{where}: expected a mapping of {cls.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ProfileError(f"{where or 'top level'}: unknown parameter(s) {unknown}; allowed: {allowed}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()})


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _check_override_key(dotted: str, profile: str) -> None:
    """Every key of ``dotted`` must name a field (free keys only below a mapping such as ``model.options``)."""
    cls, path = Profile, []
    for k in dotted.split("."):
        if cls is dict:
            return
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ProfileError(f"profile {profile!r}: override {dotted!r}: {'.'.join(path)} is a value, not a "
                               f"section, so it has no parameter {k!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        if k not in allowed:
            where = ".".join(path) or "the top level"
            raise ProfileError(f"profile {profile!r}: override {dotted!r}: {where}: unknown parameter(s) [{k!r}]; "
                               f"allowed: {allowed}")
        tp = _unwrap_optional(typing.get_type_hints(cls)[k])
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif tp is dict or typing.get_origin(tp) is dict:
            cls = dict
        else:
            cls = None
        path.append(k)


def _apply_overrides(raw: dict, overrides: dict, profile: str = "") -> dict:
    raw = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for dotted, value in overrides.items():
        _check_override_key(dotted, profile)
        keys = dotted.split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ProfileError(f"profile {profile!r}: override {dotted!r}: {k!r} is not a section in the profile "
                                   f"file, so it has no parameter {keys[-1]!r}")
        node[keys[-1]] = value
    return raw


def _validate_names(p: Profile) -> None:
    """Every name must be known and every value usable (module docstring); raises ``ProfileError``."""
    from ood_lib.ash import ASH_VARIANTS
    from ood_lib.data import DATASETS
    from ood_lib.detectors import DETECTORS
    from ood_lib.models import ARCHITECTURES, PRETRAINED
    from ood_lib.posthoc import POSTHOC

    def check(kind, name, allowed):
        if name not in allowed:
            raise ProfileError(f"profile {p.name!r}: unknown {kind} {name!r}; allowed: {sorted(allowed)}")

    for s in (p.data.id_set, *p.data.ood_sets):
        check("dataset", s, DATASETS)
    check("architecture", p.model.arch, ARCHITECTURES)
    for d in p.eval.detectors:
        check("detector", d, DETECTORS)
    check("detector", p.eval.selection_detector, DETECTORS)
    for m in p.pretrained:
        check("pretrained model", m, PRETRAINED)
    for d in p.line.baselines:
        check("post-hoc detector", d, POSTHOC)
    for a in p.line.ash:
        check("ASH variant", a, ASH_VARIANTS)
    for m in p.line.pretrained or ():
        check("pretrained model of this profile", m, p.pretrained)
    check("device", p.device, DEVICES)
    for nb in p.notebooks:
        check("notebook", nb, NOTEBOOKS)
    _validate_values(p, DATASETS)
    _validate_model(p, ARCHITECTURES, DATASETS)


def _validate_values(p: Profile, datasets: dict) -> None:
    def bad(param: str, value, allowed: str):
        raise ProfileError(f"profile {p.name!r}: {param} must be {allowed}, got {value!r}")

    # seeds, device, threads
    if not p.seeds:
        raise ProfileError(f"profile {p.name!r}: seeds must list at least one seed")
    if len(set(p.seeds)) != len(p.seeds):
        bad("seeds", list(p.seeds), "distinct (each seed is one training run: a repeated seed repeats a run and "
                                    "counts it twice in every mean and spread)")
    if p.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            bad("device", p.device, "'auto' or 'cpu' on this machine: torch sees no CUDA device here "
                                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    if p.threads is not None and p.threads < 1:
        bad("threads", p.threads, "at least 1, or null (torch's default)")

    # data: the sets
    d = p.data
    spec = datasets[d.id_set]
    if len(set(d.ood_sets)) != len(d.ood_sets):
        bad("data.ood_sets", list(d.ood_sets), "a list of distinct sets")
    if not d.ood_sets:
        bad("data.ood_sets", list(d.ood_sets), "a list of at least one OOD set")
    if "train" not in spec.splits or "test" not in spec.splits or spec.num_classes is None:
        usable = sorted(n for n, s in datasets.items()
                        if {"train", "test"} <= set(s.splits) and s.num_classes is not None)
        bad("data.id_set", d.id_set, f"a labelled set with a train and a test split ({d.id_set} has the split(s) "
                                     f"{', '.join(spec.splits)}{'' if spec.num_classes else ', no labels'}); "
                                     f"allowed: {usable}")
    if d.id_set in d.ood_sets:
        bad("data.id_set", d.id_set, f"a set that is not also among data.ood_sets {list(d.ood_sets)} (a set cannot be "
                                     f"in-distribution and out-of-distribution at once)")
    if d.channels not in (1, 3):
        bad("data.channels", d.channels, "1 or 3")

    # data: the sizes, positive and within the splits where the registry knows them
    for param, v, least, none in [("data.train_size", d.train_size, 1, "null (every image)"),
                                  ("data.id_val_size", d.id_val_size, 1, None),
                                  ("data.id_test_size", d.id_test_size, 1, "null (the whole split)"),
                                  ("data.ood_size", d.ood_size, 2,
                                   "null (every image); it is halved into val and test"),
                                  ("data.input_size", d.input_size, 1, None)]:
        if v is not None and v < least:
            bad(param, v, f"at least {least}" + (f", or {none}" if none else ""))
    if d.balanced:
        k = spec.num_classes
        if d.train_size is None or d.train_size % k:
            bad("data.balanced", d.balanced, f"false, unless data.train_size is a multiple of the {k} classes of "
                                             f"{d.id_set} (got {d.train_size})")
        per_class = spec.class_counts.get("train")
        if per_class and d.train_size // k + d.id_val_size > min(per_class):
            bad("data.train_size", d.train_size, f"at most {k * (min(per_class) - d.id_val_size)} with "
                                                 f"data.balanced (every class must keep train_size / {k} images "
                                                 f"beside the held-out ID-val images)")
    n_train = spec.counts.get("train")
    if n_train is not None:
        used = d.id_val_size + (d.train_size or 1)
        if used > n_train:
            what = ("data.train_size + data.id_val_size" if d.train_size is not None
                    else "data.id_val_size (leaving at least one training image)")
            bad(what, used, f"at most {n_train}, the images of {d.id_set}'s train split")
    n_test = spec.counts.get("test")
    if d.id_test_size is not None and n_test is not None and d.id_test_size > n_test:
        bad("data.id_test_size", d.id_test_size, f"at most {n_test}, the images of {d.id_set}'s test split, or null")
    if d.ood_size is not None:
        for name in d.ood_sets:
            n = datasets[name].counts.get(datasets[name].ood_split)
            if n is not None and d.ood_size > n:
                bad("data.ood_size", d.ood_size, f"at most {n}, the images of {name}'s "
                                                 f"{datasets[name].ood_split} split (the smallest OOD set), or null")

    # training and evaluation
    t = p.train
    for param, v in [("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                     ("eval.batch_size", p.eval.batch_size)]:
        if v < 1:
            raise ProfileError(f"profile {p.name!r}: {param} must be at least 1, got {v}")
    if not t.lr > 0:
        bad("train.lr", t.lr, "a positive learning rate")
    if not 0 <= t.momentum < 1:
        bad("train.momentum", t.momentum, "in [0, 1)")
    if not t.weight_decay >= 0:
        bad("train.weight_decay", t.weight_decay, "at least 0")
    if t.crop_padding < 0:
        bad("train.crop_padding", t.crop_padding, "at least 0 (0: no random crop)")
    if not p.eval.odin_temperature > 0:
        bad("eval.odin_temperature", p.eval.odin_temperature, "positive")
    if not p.eval.odin_epsilon >= 0:
        bad("eval.odin_epsilon", p.eval.odin_epsilon, "at least 0")

    # line
    ln = p.line
    for name, v in [("line.p_a", ln.p_a), ("line.p_w", ln.p_w), ("line.tau_percentile", ln.tau_percentile)]:
        if not 0 <= v < 100 and not (name == "line.tau_percentile" and v == 100):
            raise ProfileError(f"profile {p.name!r}: {name} is a percentile in [0, 100), got {v}")
    for name, values in [("line.sweep_p_a", ln.sweep_p_a), ("line.sweep_p_w", ln.sweep_p_w)]:
        if any(not 0 <= v < 100 for v in values):
            bad(name, list(values), "percentiles pruned, each in [0, 100)")
    if any(not 0 < v <= 100 for v in ln.sweep_tau_percentiles):
        bad("line.sweep_tau_percentiles", list(ln.sweep_tau_percentiles), "percentiles, each in (0, 100]")
    if ln.tau is not None and not ln.tau > 0:
        bad("line.tau", ln.tau, "a positive activation clip, or null (the tau_percentile rule)")

    # um (after the data sizes, so that a bad data.train_size is named as such)
    u = p.um
    for name, v in [("um.mask_keep", u.mask_keep), ("um.umap_keep", u.umap_keep),
                    *((f"um.curve_keep[{i}]", k) for i, k in enumerate(u.curve_keep))]:
        if not 0 < v <= 1:
            raise ProfileError(f"profile {p.name!r}: {name} is the fraction of weights KEPT, in (0, 1], got {v}")
    if len(set(u.mask_seeds)) < 5:
        raise ProfileError(f"profile {p.name!r}: um.mask_seeds needs at least 5 distinct seeds (gamma varies a lot "
                           f"from mask to mask), got {list(u.mask_seeds)}")
    if any(g <= 0 for g in u.gamma_sweep):
        raise ProfileError(f"profile {p.name!r}: um.gamma_sweep values must be positive, got {list(u.gamma_sweep)}")
    if u.gamma is not None and u.gamma <= 0:
        raise ProfileError(f"profile {p.name!r}: um.gamma must be positive or null (estimate it), got {u.gamma}")
    train_size = d.train_size if d.train_size is not None else (None if n_train is None else n_train - d.id_val_size)
    if u.atypical_remove < 1 or (train_size is not None and u.atypical_remove >= train_size):
        raise ProfileError(f"profile {p.name!r}: um.atypical_remove must be in [1, data.train_size), "
                           f"got {u.atypical_remove}" + (f" (data.train_size: {train_size})" if train_size else ""))
    for name, v in [("um.epochs", u.epochs), ("um.gallery_size", u.gallery_size)]:
        if v < 1:
            raise ProfileError(f"profile {p.name!r}: {name} must be at least 1, got {v}")
    if u.curve_images is not None and u.curve_images < 1:
        bad("um.curve_images", u.curve_images, "at least 1, or null (every training image)")
    if not u.lr > 0:
        raise ProfileError(f"profile {p.name!r}: um.lr must be positive, got {u.lr}")
    if u.paper_checkpoint is not None:
        from ood_lib.models import PRETRAINED
        if u.paper_checkpoint not in PRETRAINED:
            bad("um.paper_checkpoint", u.paper_checkpoint, f"a checkpoint of {sorted(PRETRAINED)}, or null")
        if u.paper_gamma is None or not u.paper_gamma > 0:
            bad("um.paper_gamma", u.paper_gamma, "the positive flood level the authors used for um.paper_checkpoint")
        if not u.paper_seeds or len(set(u.paper_seeds)) != len(u.paper_seeds) or set(u.paper_seeds) - set(p.seeds):
            bad("um.paper_seeds", list(u.paper_seeds), f"distinct seeds among the profile's seeds {list(p.seeds)}")


_MODEL_CHECKS: dict[str, str | None] = {}   # arguments (JSON) -> the error they gave, or None


def _validate_model(p: Profile, architectures: dict, datasets: dict) -> None:
    """Build ``model.arch`` with ``model.options`` as ``base.build_model`` does and run one image of
    ``data.input_size`` through it (eval mode, global RNG untouched); any error is a ProfileError."""
    import inspect
    import warnings

    import torch

    c, size = p.data.channels, p.data.input_size
    num_classes = datasets[p.data.id_set].num_classes
    options = {"mean": (0.5,) * c, "std": (0.25,) * c, **p.model.options}
    if isinstance(options.get("blocks"), list):
        options["blocks"] = tuple(options["blocks"])
    key = json.dumps([p.model.arch, num_classes, c, size, options], sort_keys=True, default=str)
    if key not in _MODEL_CHECKS:
        error = None
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors is a no-op"
                model = architectures[p.model.arch](num_classes=num_classes, in_channels=c, **options).eval()
                out = model(torch.zeros(1, c, size, size))
            if tuple(out.shape) != (1, num_classes):
                error = f"the model's output has shape {tuple(out.shape)}, expected (1, {num_classes})"
        except Exception as e:  # whatever the constructor or the forward pass raises
            error = f"{type(e).__name__}: {e}".strip()
        _MODEL_CHECKS[key] = error
    error = _MODEL_CHECKS[key]
    if error:
        builder = architectures[p.model.arch]
        raise ProfileError(
            f"profile {p.name!r}: model.options must build a {p.model.arch} for {c}-channel {size}x{size} inputs "
            f"(data.channels, data.input_size) and {num_classes} classes, got {dict(p.model.options)!r}, which "
            f"fails with {error.splitlines()[0][:300]}. Allowed: keyword arguments of "
            f"ood_lib.models.{getattr(builder, '__name__', p.model.arch)}{inspect.signature(builder)} with usable "
            f"values (num_classes and in_channels come from the data)")


def load_profile(name: str, overrides: dict | None = None, config_dir: Path | None = None) -> Profile:
    """Read ``configs/<name>.yaml``, apply dotted ``overrides`` and validate every name and value."""
    config_dir = Path(config_dir) if config_dir else CONFIG_DIR
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        allowed = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise ProfileError(f"unknown profile {name!r}; allowed: {allowed}")
    raw = yaml.safe_load(path.read_text()) or {}
    if "name" in raw:
        raise ProfileError(f"{path}: 'name' is taken from the file name; remove it")
    raw = _apply_overrides(raw, overrides or {}, name)
    if "name" in raw:
        raise ProfileError(f"profile {name!r}: 'name' is taken from the file name and cannot be overridden")
    try:
        profile = _build(Profile, {"name": name, **raw}, "")
    except ProfileError as e:
        raise ProfileError(f"profile {name!r} ({path}): {e}") from None
    _validate_names(profile)
    return profile


def parse_override(text: str) -> tuple[str, object]:
    """``"train.epochs=3"`` -> ("train.epochs", 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ProfileError(f"override {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
