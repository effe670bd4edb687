"""benchmarks/recipe_gate.py, the ID-only gate of docs/default_recipe.md and docs/cifar10_cpu_recipe.md: it loads no
OOD set, and its verdict follows the thresholds it prints."""
import importlib.util
import json
import sys

from ood_lib import base, data as data_mod
from ood_lib.paths import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("recipe_gate", PROJECT_ROOT / "benchmarks" / "recipe_gate.py")
gate = importlib.util.module_from_spec(spec)
sys.modules["recipe_gate"] = gate  # its dataclasses look their module up
spec.loader.exec_module(gate)

TINY = ["--set=data.train_size=100", "--set=data.id_val_size=50", "--set=train.epochs=3", "--set=train.batch_size=50",
        '--set=model.options={"width": 4, "blocks": [1, 1, 1, 1]}', "--set=um.atypical_remove=10", "--set=um.epochs=3"]


def test_the_cifar10_cpu_gate_loads_no_ood_set_and_reports_every_criterion(tmp_path, monkeypatch, capsys):
    loaded = []
    real = data_mod.load_dataset

    def spy(name, split):
        loaded.append(name)
        return real(name, split)

    monkeypatch.setattr(base, "load_dataset", spy)
    monkeypatch.setattr(data_mod, "load_dataset", spy)
    out = tmp_path / "gate.json"
    code = gate.main(["--profile", "cifar10-cpu", "--gate", "cifar10-cpu", *TINY, "--json", str(out)])
    assert set(loaded) == {"cifar10"}  # the ID set only: train (subset and ID val) and test
    found = json.loads(out.read_text())
    assert set(found["found"]) == {"G1 clean train acc", "late stage: val-minimum epoch / E", "ID test acc",
                                   "base stage minutes", "study CPU-hours"}
    assert found["found"]["G1 clean train acc"] < 0.995 and code == 1  # 3 epochs of a 4-wide net memorise nothing
    assert not found["passed"]["G1 clean train acc"]
    assert 0 < found["found"]["base stage minutes"] < found["found"]["study CPU-hours"] * 60
    assert len(found["history"]) == 3 and all("val_loss" in h for h in found["history"])
    printed = capsys.readouterr().out
    assert "training in bf16-autocast" in printed and "verdict: FAIL" in printed


def test_study_estimate_adds_the_headline_stages():
    from ood_lib.config import load_profile
    p = load_profile("cifar10-cpu", {"train.epochs": 10, "um.epochs": 5})
    est = gate.study_estimate(p, t_train=2.0, t_eval_all=1.0, t_eval_test=0.5, t_train_pass=0.25, t_once=7.0)
    # per seed: base 10 x (2 + 1), dynamics 10 x 0.25, two arms 2 x 10 x 2, four fine-tunes 4 x 5 x (2 + 0.5), once 7
    assert est["seconds"] == 3 * (30 + 2.5 + 40 + 50 + 7)
