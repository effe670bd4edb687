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
