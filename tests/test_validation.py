"""Profile values that used to pass validation and fail late (issue 11): each is now a ProfileError at load time,
one paragraph naming the profile, the parameter, the value and what is allowed."""
import pytest
import torch

from ood_lib import reproduce
from ood_lib.config import ProfileError, load_profile


@pytest.mark.parametrize("override, parameter, detail", [
    ({"seeds": [0, 0]}, "seeds", r"distinct.*got \[0, 0\]"),
    ({"seeds": [1, 2, 1]}, "seeds", r"distinct.*got \[1, 2, 1\]"),
    ({"data.id_set": "mnist"}, "data.id_set", r"not also among data.ood_sets.*got 'mnist'"),
    ({"data.id_set": "animal_mnist", "data.ood_sets": ["mnist"]}, "data.id_set",
     r"train and a test split \(animal_mnist has the split\(s\) test\); allowed: \[.*'fashion_mnist'"
     r".*got 'animal_mnist'"),
    ({"data.id_set": "textures", "data.ood_sets": ["mnist"]}, "data.id_set", r"no labels"),
    ({"data.ood_sets": ["mnist", "mnist"]}, "data.ood_sets", "distinct"),
    ({"data.ood_sets": []}, "data.ood_sets", "at least one"),
    ({"train.lr": -1}, "train.lr", r"positive learning rate, got -1\.0"),
    ({"train.lr": 0}, "train.lr", r"positive learning rate, got 0\.0"),
    ({"train.momentum": 1.5}, "train.momentum", r"\[0, 1\)"),
    ({"train.weight_decay": -0.1}, "train.weight_decay", "at least 0"),
    ({"um.lr": -0.1}, "um.lr", "positive"),
    ({"data.ood_size": 0}, "data.ood_size", r"at least 2.*got 0"),
    ({"data.ood_size": 1}, "data.ood_size", r"halved into val and test, got 1"),
    ({"data.ood_size": 20000}, "data.ood_size", r"at most 10000.*got 20000"),
    ({"data.train_size": 0}, "data.train_size", r"at least 1.*got 0"),
    ({"data.train_size": -5}, "data.train_size", r"at least 1.*got -5"),
    ({"data.id_val_size": 0}, "data.id_val_size", r"at least 1, got 0"),
    ({"data.id_test_size": 0}, "data.id_test_size", r"at least 1.*got 0"),
    ({"data.id_test_size": 10001}, "data.id_test_size", r"at most 10000.*fashion_mnist's test split.*got 10001"),
    ({"data.train_size": 59801}, r"data.train_size \+ data.id_val_size", r"at most 60000.*got 60001"),
    ({"data.train_size": None, "data.id_val_size": 60000}, "data.id_val_size", r"at most 60000"),
    ({"data.input_size": 0}, "data.input_size", r"at least 1, got 0"),
    ({"model.options.width": -1}, "model.options", r"'width': -1.*RuntimeError.*Allowed: keyword arguments of "
                                                   r"ood_lib\.models\.resnet_small\(.*width"),
    ({"model.options.width": 0}, "model.options", r"'width': 0"),
    ({"model.options.blocks": []}, "model.options", r"'blocks': \[\]"),
    ({"model.options.depth": 3}, "model.options", r"TypeError.*depth"),
    ({"model.options.blocks": "many"}, "model.options", r"'blocks': 'many'"),
    ({"threads": 0}, "threads", "at least 1"),
    ({"eval.odin_temperature": 0}, "eval.odin_temperature", "positive"),
    ({"line.sweep_p_a": [0, 120]}, "line.sweep_p_a", r"\[0, 100\)"),
    ({"line.tau": -1}, "line.tau", "positive"),
    ({"um.curve_images": 0}, "um.curve_images", "at least 1"),
])
def test_bad_value_is_a_profile_error_naming_the_parameter(override, parameter, detail):
    with pytest.raises(ProfileError, match=rf"^profile 'smoke': {parameter}( \(.*\))? must .*{detail}") as e:
        load_profile("smoke", override)
    assert "\n" not in str(e.value)  # one paragraph


def test_train_size_zero_is_blamed_on_train_size_not_on_atypical_remove():
    with pytest.raises(ProfileError) as e:
        load_profile("smoke", {"data.train_size": 0})
    assert "data.train_size" in str(e.value) and "atypical" not in str(e.value)
    # and atypical_remove is still checked against the training images there are
    with pytest.raises(ProfileError, match=r"um.atypical_remove must be in \[1, data.train_size\).*got 100 "
                                           r"\(data.train_size: 50\)"):
        load_profile("smoke", {"data.train_size": 50})


def test_cuda_without_a_cuda_device_is_refused_at_load_time(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProfileError, match=r"^profile 'smoke': device must be 'auto' or 'cpu' on this machine: torch "
                                           r"sees no CUDA device.*got 'cuda'"):
        load_profile("smoke", {"device": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_profile("smoke", {"device": "cuda"}).device == "cuda"


@pytest.mark.parametrize("override, message", [
    ({"foo.bar": 3}, r"^profile 'smoke': override 'foo.bar': the top level: unknown parameter\(s\) \['foo'\]; "
                     r"allowed: \[.*'data'.*'train'"),
    ({"data.foo": 3}, r"^profile 'smoke': override 'data.foo': data: unknown parameter\(s\) \['foo'\]; "
                      r"allowed: \[.*'id_set'"),
    ({"train.lr.x": 3}, r"^profile 'smoke': override 'train.lr.x': train.lr is a value, not a section"),
    ({"foo": 3}, r"override 'foo': the top level: unknown parameter\(s\) \['foo'\]"),
])
def test_unknown_override_names_the_key_and_the_allowed_names(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile("smoke", override)


def test_free_keys_below_model_options_are_allowed():
    p = load_profile("smoke", {"model.options.width": 4})
    assert p.model.options == {"width": 4, "blocks": [1, 1, 1]}


def test_runner_reports_an_unknown_override_before_any_work(capsys):
    assert reproduce.main(["--profile", "smoke", "--set", "foo.bar=3"]) == 2
    err = capsys.readouterr().err
    assert "'foo.bar'" in err and "unknown parameter(s) ['foo']" in err and "'train'" in err


def test_validation_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_profile("smoke", {"model.options.width": 6})  # builds and runs the model once
    assert torch.equal(torch.rand(3), expected)


def test_every_shipped_profile_still_loads():
    from ood_lib.config import available_profiles
    for name in available_profiles():
        assert load_profile(name).name == name
