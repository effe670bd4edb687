"""Profiles: every shipped profile loads; bad names and values fail early, listing what is allowed."""
import pytest

from ood_lib.config import ProfileError, available_profiles, load_profile, parse_override


def test_shipped_profiles_load():
    names = available_profiles()
    assert {"smoke", "default", "cifar10", "cifar10-pretrained"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.seeds


def test_default_profile_follows_the_study():
    p = load_profile("default")
    assert p.data.id_set == "fashion_mnist" and {"mnist", "animal_mnist"} <= set(p.data.ood_sets)
    assert len(p.seeds) >= 3
    c = load_profile("cifar10")
    assert c.model.arch == "resnet18" and c.train.epochs == 100 and len(c.seeds) == 3
    assert (c.train.lr, c.train.momentum, c.train.batch_size) == (0.1, 0.9, 256)


def test_unknown_profile_lists_allowed():
    with pytest.raises(ProfileError, match=r"unknown profile 'nope'.*'smoke'"):
        load_profile("nope")


@pytest.mark.parametrize("override,message", [
    ({"train.epoch": 3}, r"unknown parameter\(s\) \['epoch'\]; allowed: \[.*'epochs'"),
    ({"trian.epochs": 3}, r"unknown parameter\(s\) \['trian'\]; allowed: \[.*'train'"),
    ({"train.epochs": "three"}, r"train.epochs: expected an integer"),
    ({"train.flip": "yes"}, r"train.flip: expected true or false"),
    ({"data.ood_sets": ["mnist", "svhm"]}, r"unknown dataset 'svhm'; allowed: \[.*'svhn'"),
    ({"eval.detectors": ["energy", "enrgy"]}, r"unknown detector 'enrgy'; allowed: \[.*'energy'"),
    ({"model.arch": "resnet19"}, r"unknown architecture 'resnet19'; allowed: \[.*'resnet18'"),
    ({"device": "tpu"}, r"unknown device 'tpu'"),
    ({"train.epochs": 0}, r"train.epochs must be at least 1"),
    ({"line.baselines": ["energy", "mahalanobys"]}, r"unknown post-hoc detector 'mahalanobys'; allowed: \[.*'mahalanobis'"),
    ({"line.ash": ["ash_x"]}, r"unknown ASH variant 'ash_x'"),
    ({"line.p_a": 120}, r"line.p_a is a percentile"),
    ({"line.pa": 90}, r"unknown parameter\(s\) \['pa'\]; allowed: \[.*'p_a'"),
])
def test_bad_parameters_fail_with_the_allowed_names(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("smoke", override)


def test_overrides_apply_and_digest_tracks_training_settings():
    a = load_profile("smoke")
    b = load_profile("smoke", {"train.epochs": 5, "eval.batch_size": 7})
    assert b.train.epochs == 5 and b.eval.batch_size == 7
    assert a.digest("data", "model", "train") != b.digest("data", "model", "train")
    c = load_profile("smoke", {"eval.batch_size": 7})
    assert a.digest("data", "model", "train") == c.digest("data", "model", "train")  # eval never retrains
    assert parse_override("train.lr=0.2") == ("train.lr", 0.2)
    with pytest.raises(ProfileError):
        parse_override("train.lr")


def test_cifar10_cpu_follows_the_papers_where_issue_17_says_it_must():
    """The papers' setting that cifar10-cpu may not trade for budget: CIFAR-10 ID, the papers' OOD sets that are
    offline here (iSUN among them), crop with padding 4 + flip, SGD 0.1 / 0.9 cosine, fine-tunes at lr 0.1, the
    removal arms at 2% of the training images; a class-balanced subset; CPU training in bf16, 3 seeds."""
    p = load_profile("cifar10-cpu")
    assert p.data.id_set == "cifar10" and p.data.channels == 3 and p.data.input_size == 32
    assert set(p.data.ood_sets) == {"tinyimagenet32", "isun", "mnist", "fashion_mnist", "animal_mnist"}
    assert (p.train.crop_padding, p.train.flip, p.train.lr, p.train.momentum) == (4, True, 0.1, 0.9)
    assert p.data.balanced and p.data.train_size % 10 == 0
    assert p.um.atypical_remove == p.data.train_size // 50 and p.um.lr == 0.1 and p.um.mask_keep == 0.965
    assert p.train.cpu_bf16 and p.device == "cpu" and p.seeds == (0, 1, 2)
    for name in ("cifar10", "cifar10-pretrained"):
        assert "isun" in load_profile(name).data.ood_sets


def test_switches_added_later_do_not_rekey_the_runs_they_leave_alone():
    """data.balanced and train.cpu_bf16 are left out of the digests while at their default (config.LATE_FIELDS): the
    runs and shards computed before they existed keep their keys; turning one on re-keys."""
    from ood_lib import shards
    from ood_lib.config import LATE_FIELDS

    a = load_profile("smoke")
    assert set(LATE_FIELDS) == {"data", "train"}
    assert "cpu_bf16" not in a.digest_dict()["train"] and "balanced" not in a.digest_dict()["data"]
    assert "cpu_bf16" in a.to_dict()["train"]
    for key, value in (("train.cpu_bf16", True), ("data.balanced", True)):
        b = load_profile("smoke", {key: value, "data.train_size": 200} if key == "data.balanced" else {key: value})
        c = load_profile("smoke", {"data.train_size": 200} if key == "data.balanced" else {})
        assert b.digest("data", "model", "train") != c.digest("data", "model", "train")
        assert shards.profile_digest(b) != shards.profile_digest(c)
    # the digest of a profile without the new fields is what it was before they were added (commit 3d4d862)
    assert load_profile("default").digest("data", "model", "train") == "8615966c86f1740a"


@pytest.mark.parametrize("override,message", [
    ({"data.balanced": True, "data.train_size": 205}, r"data.balanced.*multiple of the 10 classes"),
    ({"data.balanced": True, "data.train_size": None}, r"data.balanced.*multiple of the 10 classes"),
    ({"data.balanced": True, "data.train_size": 59000}, r"data.train_size.*with data.balanced"),
])
def test_a_balanced_subset_must_be_possible(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("smoke", override)
