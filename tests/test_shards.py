"""Shards, bundles and merge (ood_lib.shards): what a merge refuses, and that a study run in shards on separate
"machines" (results folders) and merged gives exactly the metrics.csv of the same study run in one piece."""
import json
import os
import re
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from ood_lib import execute, reproduce, shards, stages
from ood_lib.config import load_profile
from ood_lib.data import DatasetMissing, load_dataset


class _Report(HTMLParser):
    """Of an HTML report: its contents' links (``nav#contents a``), how many <img> and their sources' types."""

    def __init__(self, text: str):
        super().__init__()
        self.toc, self.imgs, self.srcs, self._nav = [], 0, [], 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "nav":
            self._nav += bool(self._nav or a.get("id") == "contents")
        elif tag == "a" and self._nav:
            self.toc.append(a.get("href"))
        elif tag == "img":
            self.imgs += 1
            self.srcs.append((a.get("src") or "").split(";")[0])

    def handle_endtag(self, tag):
        if tag == "nav" and self._nav:
            self._nav -= 1


def _report(path) -> _Report:
    return _Report(path.read_text(encoding="utf-8"))


def fake_shard(profile, stage, seed, value=0.5):
    rows = pd.DataFrame({"notebook": ["01"], "seed": [seed], "model": ["base"], "epoch": [1], "detector": [""],
                         "id_set": ["fashion_mnist"], "ood_set": [""], "metric": ["id_acc"], "value": [value],
                         "split": ["test"]})
    shards._write(profile, stage, seed, {"rows": rows}, {"seconds": 1.0, "device": "cpu (test)"})


def test_tables_round_trip_and_are_checked(machine):
    machine("a")
    p = load_profile("smoke")
    fake_shard(p, "base", 0)
    t = shards.read(p, "base", 0)["rows"]
    assert t.loc[0, "detector"] == "" and t.loc[0, "notebook"] == "01" and t.loc[0, "value"] == 0.5
    path = shards.shard_dir(p, "base", 0) / "rows.csv"
    path.write_text(path.read_text().replace("0.5", "0.6"))  # a changed number never passes unnoticed
    with pytest.raises(shards.ShardError, match="does not match its manifest"):
        shards.read(p, "base", 0)


def test_pack_is_deterministic_and_merge_puts_it_back(machine, tmp_path):
    machine("a")
    p = load_profile("smoke")
    fake_shard(p, "base", 0)
    b1 = shards.pack(p, "base", 0, tmp_path / "b1")
    b2 = shards.pack(p, "base", 0, tmp_path / "b2")
    assert b1.read_bytes() == b2.read_bytes() and b1.name == "smoke__base__seed0.tar.gz"
    machine("b")
    assert not shards.done(p, "base", 0)
    assert shards.merge(p, [b1], log=lambda s: None) == [("base", 0)]
    assert shards.read(p, "base", 0)["rows"].loc[0, "value"] == 0.5
    msgs = []
    shards.merge(p, [b2], log=msgs.append)  # the same shard again: accepted, nothing changes
    assert any("already here, identical" in m for m in msgs)


def test_merge_refuses_what_it_cannot_trust(machine, tmp_path, monkeypatch):
    machine("a")
    p = load_profile("smoke")
    fake_shard(p, "base", 0)
    good = shards.pack(p, "base", 0, tmp_path / "good")
    other = tmp_path / "other"
    other.mkdir()
    dup = other / good.name
    dup.write_bytes(good.read_bytes())
    machine("b")
    with pytest.raises(shards.ShardError, match="both stage 'base' of seed 0"):
        shards.merge(p, [good, dup])
    # another profile's bundle, and the same profile with other settings (the difference is named)
    with pytest.raises(shards.ShardError, match="of profile 'smoke', not 'default'"):
        shards.merge(load_profile("default"), [good])
    with pytest.raises(shards.ShardError, match=r"train\.epochs: 3 \(bundle\) vs 4 \(here\)"):
        shards.merge(load_profile("smoke", {"train.epochs": 4}), [good])
    # a stage the profile does not have
    fake_shard(p, "nonsense", 0)
    with pytest.raises(shards.ShardError, match="has no stage 'nonsense'"):
        shards.merge(p, [shards.pack(p, "nonsense", 0, tmp_path / "n")])
    # a damaged bundle: truncated, and one whose table was changed after packing
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(shards.ShardError, match="not a readable"):
        shards.merge(p, [cut])
    with tarfile.open(good) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    files["base/seed0/rows.csv"] = files["base/seed0/rows.csv"].replace(b"0.5", b"0.7")
    forged = tmp_path / "forged.tar.gz"
    with tarfile.open(forged, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(shards.ShardError, match="missing or damaged"):
        shards.merge(p, [forged])
    assert not shards.done(p, "base", 0)  # nothing was written by any refused merge
    # bundles of two code versions
    machine("c")
    monkeypatch.setattr(shards, "code_digest", lambda: "0123456789abcdef")
    fake_shard(p, "base", 1)
    newer = shards.pack(p, "base", 1, tmp_path / "newer")
    monkeypatch.undo()
    machine("d")
    with pytest.raises(shards.ShardError, match="2 code versions"):
        shards.merge(p, [good, newer])
    assert shards.merge(p, [good, newer], allow_mixed_code=True, log=lambda s: None) == [("base", 0), ("base", 1)]
    # a shard already here with other tables
    machine("e")
    fake_shard(p, "base", 0, value=0.9)
    with pytest.raises(shards.ShardError, match="already here with other tables"):
        shards.merge(p, [good])


def test_analysis_without_compute_names_the_missing_shard(machine):
    machine("a")
    p = load_profile("smoke")
    with pytest.raises(shards.ShardError, match="--stages base --seeds 0"):
        shards.outputs(p, "01", compute=False)
    fake_shard(p, "base", 0)
    assert shards.ready_seeds(p, "01") == [0] and shards.ready_seeds(p, "02") == []


def test_every_notebook_reads_its_stages():
    p = load_profile("smoke")
    reg = stages.stages(p)
    assert stages.of_notebook(p, "01") == ["base"]
    assert set(stages.of_notebook(p, "02")) == {"atypical", "no_atypical", "no_atypical_per_class", "no_random"}
    assert {"gamma", "um", "um_b", "umap", "ft_ce", "um_gamma0.5"} == set(stages.of_notebook(p, "03"))
    assert set(stages.of_notebook(p, "04")) == {"posthoc_base", "posthoc_um", "posthoc_umap"}
    order = list(reg)
    for name, s in reg.items():  # every dependency comes first
        assert all(order.index(d) < order.index(name) for d in s.inputs + s.models), name
    pre = load_profile("cifar10-pretrained")
    assert set(stages.stages(pre)) == {f"posthoc_{m}" for m in pre.line.pretrained}
    # the two diagnostics are switches: without them 02 retrains the headline arms only and 03 runs no fixed gamma
    lean = load_profile("smoke", {"um.global_arm": False, "um.gamma_sweep": []})
    assert set(stages.of_notebook(lean, "02")) == {"atypical", "no_atypical_per_class", "no_random"}
    assert set(stages.of_notebook(lean, "03")) == {"gamma", "um", "um_b", "umap", "ft_ce"}
    d = load_profile("default")
    assert not d.um.global_arm and not d.um.gamma_sweep  # default's budget (its header says so)


def test_runner_rejects_bad_shard_arguments(capsys):
    assert reproduce.main(["--profile", "smoke", "--stages", "bsae"]) == 2
    assert "unknown stage(s) ['bsae']" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--stages", "base", "--seeds", "7"]) == 2
    assert "has seeds [0, 1]" in capsys.readouterr().err
    assert reproduce.main(["--profile", "smoke", "--seeds", "0"]) == 2
    assert "go with --stages" in capsys.readouterr().err


# The cifar10 profile at a tiny scale: real CIFAR-10 and Tiny-ImageNet data, 3 channels, 2 epochs on 512 images.
TINY = {"data.train_size": 512, "data.id_val_size": 100, "data.id_test_size": 200, "data.ood_size": 200,
        "model.arch": "resnet_small", "model.options": {"width": 4, "blocks": [1, 1, 1]}, "train.epochs": 2,
        "train.batch_size": 128, "eval.detectors": ["msp", "maxlogit", "energy", "odin"], "eval.batch_size": 256,
        "um.epochs": 2, "um.atypical_remove": 50, "um.curve_images": 100, "um.curve_keep": [1.0, 0.965],
        "um.gamma_sweep": [0.5], "line.sweep_p_a": [0, 90], "line.sweep_p_w": [0, 90],
        "line.sweep_tau_percentiles": [90, 100], "notebooks": ["01", "02", "03", "04"], "seeds": [0, 1],
        "threads": 2}


def test_merged_shards_equal_the_one_piece_run(machine, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shards, "WEIGHTS_MAX_BYTES", 0)  # no weights in the bundles: machine B must re-train
    try:
        for name in ("cifar10", "tinyimagenet32"):
            load_dataset(name, "test" if name == "cifar10" else "val")
    except DatasetMissing as e:
        pytest.fail(f"the CIFAR-10 archives are part of the test data (make test sets OOD_DATA_ROOT): {e}")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    p = load_profile("cifar10", TINY)
    first = ["base", "atypical", "gamma", "posthoc_base"]
    rest = [s for s in stages.stages(p) if s not in first]

    one = machine("one-piece")
    execute.run("cifar10", None, TINY)
    # machine A: seed 0's base run and what needs its checkpoints
    machine("a")
    capsys.readouterr()
    a = execute.run_shards("cifar10", first, [0], TINY, tmp_path / "bundles")
    said = capsys.readouterr().out
    # the bytes the shard leaves and the most it held at once (the base run's checkpoints before they are dropped)
    disk = re.search(r"4 shard\(s\) of profile cifar10 in [\d.]+ s: ([\d.]+) MB written, ([\d.]+) MB at the peak", said)
    assert disk and 0 < float(disk.group(1)) <= float(disk.group(2)), said[-2000:]
    # machine B: the rest of seed 0, given A's bundles only: it re-trains the base model (same digest on CPU)
    machine("b")
    b = execute.run_shards("cifar10", rest, [0], TINY, tmp_path / "bundles", inputs=a[:3])
    used = shards.manifest(p, "um", 0)["models_used"]["base"]
    assert used["retrained"] and used["match"], used
    # machine C: seed 1 in one command
    machine("c")
    c = execute.run_shards("cifar10", list(stages.stages(p)), [1], TINY, tmp_path / "bundles")
    merged = machine("merged")
    assert reproduce.main(["--profile", "cifar10", *sets, "--merge", *map(str, a + b + c)]) == 0
    assert not (merged / "results/cifar10/cache").exists()  # the analysis trained and scored nothing

    want = (one / "results/cifar10/metrics.csv").read_text()
    got = (merged / "results/cifar10/metrics.csv").read_text()
    assert got == want
    m = pd.read_csv(merged / "results/cifar10/metrics.csv", dtype={"notebook": str}, keep_default_na=False)
    assert set(m.notebook) == {"01", "02", "03", "04"} and set(m.seed) == {0, 1}
    # the merged study's report has the one-piece run's contents (same notebooks and sections) and figures
    merged_page, one_page = (_report(m / "results/cifar10/report.html") for m in (merged, one))
    assert merged_page.toc == one_page.toc and len(merged_page.toc) > 4
    assert merged_page.imgs == one_page.imgs > 0 and set(merged_page.srcs) == {"data:image/png"}
    timings = pd.read_csv(merged / "results/cifar10/timings.csv", dtype={"notebook": str})
    assert timings.stage.str.startswith("stage um seed 0").any()  # the real stage times travel with the bundles
    assert max(len(x.read_bytes()) for x in a + b + c) < 16 * 2**20


# cifar10-cpu at a tiny scale: its five OOD sets (iSUN among them), the balanced subset, bf16 training on the CPU.
TINY_CPU = {"data.train_size": 100, "data.id_val_size": 50, "data.id_test_size": 60, "data.ood_size": 20,
            "model.options": {"width": 4, "blocks": [1, 1, 1, 1]}, "train.epochs": 2, "train.batch_size": 50,
            "eval.batch_size": 128, "um.epochs": 1, "um.atypical_remove": 10, "um.curve_images": 40,
            "um.curve_keep": [1.0, 0.965], "line.sweep_p_a": [0, 90], "line.sweep_p_w": [0, 90],
            "line.sweep_tau_percentiles": [90, 100], "seeds": [0]}


def test_cifar10_cpu_stages_run_end_to_end_and_merge(machine, tmp_path, capsys):
    """Every stage of cifar10-cpu for one seed in one shard command; the bundles record bf16 training and float32
    evaluation, and merge on another machine into a seed that notebooks 01-04 can read."""
    p = load_profile("cifar10-cpu", TINY_CPU)
    machine("a")
    first = ["base", "atypical", "gamma"]  # what reads every epoch of the base run: where it was trained
    a = execute.run_shards("cifar10-cpu", first, [0], TINY_CPU, tmp_path / "bundles")
    said = capsys.readouterr().out  # each stage and the command report the bytes they wrote
    written = [(float(x), float(y)) for x, y in re.findall(r"stage \w+ seed 0: ([\d.]+) MB written, ([\d.]+) MB at "
                                                             r"the peak \(sampled every 5 s\) under the run's folders",
                                                             said)]
    total = re.search(r"3 shard\(s\) of profile cifar10-cpu in [\d.]+ s: ([\d.]+) MB written, ([\d.]+) MB at the "
                      r"peak", said)
    assert len(written) == 3 and written[0][0] > 0 and all(w <= peak for w, peak in written), said[-2000:]
    assert total and float(total.group(1)) >= sum(w for w, _ in written) - 0.3, said[-2000:]
    assert float(total.group(2)) >= max(peak for _, peak in written) - 0.1, said[-2000:]
    m = shards.manifest(p, "base", 0)
    assert m["precision"] == {"training": "bf16-autocast", "evaluation": "fp32", "training_kernels": "deterministic"}
    assert m["weights"] and all(shards.manifest(p, s, 0).get("weights") is None for s in ("atypical", "gamma"))
    with tarfile.open(a[0]) as tar:  # the weights travel beside the bundle (git-ignored), never in it
        assert not any(n.endswith(shards.WEIGHTS) for n in tar.getnames())
    assert shards.weights_beside(a[0]).is_file() and not shards.weights_beside(a[1]).exists()
    rows = shards.read(p, "base", 0)["rows"]
    assert set(rows.ood_set) - {""} == {"tinyimagenet32", "isun", "mnist", "fashion_mnist", "animal_mnist"}
    assert set(rows.epoch.dropna().astype(int)) == {1, 2}
    # machine B: the rest, from A's bundles alone; the base weights come in the base bundle, nothing is re-trained
    machine("b")
    rest = [s for s in stages.stages(p) if s not in first]
    b = execute.run_shards("cifar10-cpu", rest, [0], TINY_CPU, tmp_path / "bundles", inputs=a)
    for stage in ("um", "umap", "ft_ce", "posthoc_base"):
        used = shards.manifest(p, stage, 0)["models_used"]["base"]
        assert used["installed"] and used["match"] and not used["retrained"], (stage, used)
    assert shards.manifest(p, "um", 0)["weights"]  # posthoc_um needs it: it travels too
    assert shards.manifest(p, "ft_ce", 0).get("weights") is None  # nothing needs it
    assert sorted(x.name.split("__")[1] for x in a + b) == sorted(stages.stages(p))
    _same_tables_as_the_reference(p)
    machine("merged")
    shards.merge(p, a + b)
    assert all(shards.ready_seeds(p, nb) == [0] for nb in ("01", "02", "03", "04"))


def test_next_shards_run_what_the_machine_plan_prints_re_training_a_lost_base_once(machine, tmp_path, capsys):
    """Issue 17: --next-shards on a fresh machine that has only the committed bundles runs the commands
    --plan --machine-minutes prints, in that order, each bundle landing in the bundle folder; the base whose weights
    were lost is re-trained (to its recorded digest) by the first command only, the later ones find it here."""
    p = load_profile("cifar10-cpu", TINY_CPU)
    folder = tmp_path / "bundles"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_CPU.items()]
    machine("a")
    execute.run_shards("cifar10-cpu", ["base", "atypical", "gamma", "posthoc_base"], [0], TINY_CPU, folder)
    shards.weights_beside(folder / "cifar10-cpu__base__seed0.tar.gz").unlink()  # lost with the machine (seed 1's case)
    machine("b")
    args = ["--profile", "cifar10-cpu", *sets, "--bundle-dir", str(folder)]
    capsys.readouterr()
    assert reproduce.main([*args, "--plan", "--machine-minutes", "600"]) == 0
    planned = re.findall(r"^python -m ood_lib.reproduce .*--stages (\S+) --seeds 0 ", capsys.readouterr().out, re.M)
    assert planned == [",".join(own) for own, _ in stages.shard_plan(p, 0)[1:]]  # all but the row done
    assert reproduce.main([*args, "--next-shards", "600", "--allow-emulated-bf16"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^# next: stages (\S+) seed 0", out, re.M) == planned
    assert sorted(x.name.split("__")[1] for x in folder.glob("*.tar.gz")) == sorted(stages.stages(p))
    used = {s: shards.manifest(p, s, 0)["models_used"]["base"] for s in ("um", "um_b", "umap", "ft_ce")}
    assert used["um"]["retrained"] and used["um"]["match"], used
    assert not any(used[s]["retrained"] for s in ("um_b", "umap", "ft_ce")) and all(u["match"] for u in used.values())
    assert f"# {len(planned)} shard command(s) ran, 0 stopped;" in out and "no shard is left to run" in out
    assert reproduce.main([*args, "--next-shards", "600", "--allow-emulated-bf16"]) == 0  # nothing left: runs nothing
    assert "# 0 shard command(s) ran, 0 stopped;" in capsys.readouterr().out
    assert reproduce.main([*args, "--next-shards", "0"]) == 2


def test_next_shards_go_on_past_a_command_that_stops(machine, tmp_path, capsys):
    """An unattended --next-shards session does not end at a command that stops: here the re-trained base differs
    from the weights its bundle records, so the shards that start from it are left out, saying why, and the removal
    arms, which train from scratch, still run; the exit status says that something failed."""
    folder = tmp_path / "bundles"
    machine("a")
    execute.run_shards("cifar10-cpu", ["base", "atypical", "gamma", "posthoc_base"], [0], TINY_CPU, folder)
    p = load_profile("cifar10-cpu", TINY_CPU)
    for stage in ("base", "atypical", "gamma", "posthoc_base"):  # as if trained where the kernels differ from these
        m = shards.manifest(p, stage, 0)
        if stage == "base":
            m["final_digest"] = "0" * 64
        if "base" in m.get("models_used", {}):
            m["models_used"]["base"]["digest"] = "0" * 64
        (shards.shard_dir(p, stage, 0) / shards.MANIFEST).write_text(json.dumps(m))
        shards.pack(p, stage, 0, folder)
    shards.weights_beside(folder / "cifar10-cpu__base__seed0.tar.gz").unlink()
    machine("b")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_CPU.items()]
    capsys.readouterr()
    assert reproduce.main(["--profile", "cifar10-cpu", *sets, "--bundle-dir", str(folder), "--next-shards", "600",
                           "--allow-emulated-bf16"]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"^# next: stages (\S+) seed 0", out, re.M) == ["um,posthoc_um", "no_atypical_per_class",
                                                                       "no_random"]
    assert re.search(r"^# stages um,posthoc_um seed 0 stopped: the re-trained base model of seed 0 here differs", out,
                     re.M)
    # the digest of the weights trained here depends on the CPU's bf16 kernels (results.cpu_bf16_units)
    assert re.search(r"um_b seed 0: base of seed 0 failed here \(its weights here are [0-9a-f]{12}, its record "
                     r"000000000000\)", out), out[-2000:]
    assert "# 3 shard command(s) ran, 1 stopped;" in out
    assert {x.name.split("__")[1] for x in folder.glob("*.tar.gz")} == {
        "base", "atypical", "gamma", "posthoc_base", "no_atypical_per_class", "no_random"}
    # the next session finds that base on the machine: one command learns it again, not every one that needs it
    assert reproduce.main(["--profile", "cifar10-cpu", *sets, "--bundle-dir", str(folder), "--next-shards", "600",
                           "--allow-emulated-bf16"]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"^# next: stages (\S+) seed 0", out, re.M) == ["um,posthoc_um"]
    assert "# 1 shard command(s) ran, 1 stopped;" in out and "um_b seed 0: base of seed 0 failed here" in out


def test_next_shards_leave_out_only_what_failed(machine, tmp_path, capsys, monkeypatch):
    """A fine-tune that diverges stops its own command only: the base it re-trained (to its recorded digest) is good,
    so the other shards that start from it still run, each stopping on its own."""
    from ood_lib import um
    from ood_lib.train import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged("training loss is nan at epoch 1")
    folder = tmp_path / "bundles"
    machine("a")
    execute.run_shards("cifar10-cpu", ["base", "atypical", "gamma", "posthoc_base"], [0], TINY_CPU, folder)
    shards.weights_beside(folder / "cifar10-cpu__base__seed0.tar.gz").unlink()
    machine("b")
    monkeypatch.setattr(um, "train", diverge)  # every fine-tune of notebook 03 (UM, UMAP, the CE control)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_CPU.items()]
    capsys.readouterr()
    assert reproduce.main(["--profile", "cifar10-cpu", *sets, "--bundle-dir", str(folder), "--next-shards", "600",
                           "--allow-emulated-bf16"]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"^# next: stages (\S+) seed 0", out, re.M) == [
        "um,posthoc_um", "um_b", "umap,posthoc_umap", "ft_ce", "no_atypical_per_class", "no_random"]
    assert "# 6 shard command(s) ran, 4 stopped;" in out and "base of seed 0 failed" not in out
    assert "um_b seed 0: um_b of seed 0 failed here (training loss is nan at epoch 1)" in out


def test_dropped_epoch_checkpoints_change_the_disk_not_the_tables(machine, tmp_path):
    """Issue 18 (bounded disk): with ``keep_epoch_checkpoints: false`` a finished run keeps only the epoch checkpoints
    the study loads again (the base run: the last, the selection rules' and rule B's; a fine-tune or a removal arm:
    the last), the later stages of the seed read the dropped epochs from the feature cache, and every table is the
    one computed with every checkpoint kept."""
    from ood_lib import base, um
    from ood_lib.paths import cache_dir
    names = ["base", "atypical", "gamma", "um", "no_random"]
    digests = {}
    for keep in (True, False):
        machine(f"keep-{keep}")
        over = {**TINY_CPU, "train.epochs": 5, "um.epochs": 2, "keep_epoch_checkpoints": keep}
        execute.run_shards("cifar10-cpu", names, [0], over, tmp_path / f"bundles-{keep}")
        p = load_profile("cifar10-cpu", over)
        digests[keep] = {n: {t: _numbers_digest(x) for t, x in shards.read(p, n, 0).items()} for n in names}
        runs = {"base": base.run_dir(p, 0), "um": um.run_dir(p, 0, um.UM),
                "no_random": next((cache_dir(p.name) / "without").rglob("no_random-*/seed0"))}
        kept = {n: sorted(int(f.stem[6:]) for f in d.glob("epoch_*.pt")) for n, d in runs.items()}
        if keep:
            assert kept == {"base": [1, 2, 3, 4, 5], "um": [1, 2], "no_random": [1, 2, 3, 4, 5]}
        else:
            assert kept["um"] == [2] and kept["no_random"] == [5], kept
            assert 5 in kept["base"] and len(kept["base"]) < 5, kept
    assert digests[False] == digests[True]


REFERENCE = Path(__file__).parent / "data" / "cifar10_cpu_tiny_tables.json"
TIME_COLUMNS = {"train_seconds", "images_per_second", "eval_seconds", "seconds"}  # wall-clock, never reproducible


def _numbers_digest(table: pd.DataFrame) -> str:
    import hashlib
    kept = table.drop(columns=[c for c in table.columns if c in TIME_COLUMNS])
    return hashlib.sha256(kept.to_csv(index=False).encode()).hexdigest()


def _same_tables_as_the_reference(p):
    """The committed cifar10-cpu bundles were computed by one version of the library; a later version may be merged
    with them only if it computes the same numbers (issue 17). This pins the SHA-256 of every table of the tiny run
    above (less the wall-clock columns), as computed by the code of the committed bundles, once for each kind of
    machine the bundles were computed on: a change that moves any CPU number fails here. Where the math kernels differ
    from every reference's (cpu_capability, the CPU's bf16 units, oneDNN, torch, threads), bit-identity is not defined
    and only the tables' presence is checked. OOD_UPDATE_REFERENCE=1 writes this machine's entry: only together with
    new bundles, or with the code of the committed ones."""
    import torch
    from ood_lib.results import machine_info

    info = machine_info()
    here = {"torch": torch.__version__, "cpu_capability": info["cpu_capability"], "onednn": info["onednn_version"],
            "threads": torch.get_num_threads(), "cpu_bf16_units": info["cpu_bf16_units"]}
    got = {name: {t: _numbers_digest(table) for t, table in shards.read(p, name, 0).items()} for name in stages.stages(p)}
    refs = json.loads(REFERENCE.read_text())["references"] if REFERENCE.exists() else []
    if os.environ.get("OOD_UPDATE_REFERENCE"):
        refs = [r for r in refs if r["machine"] != here] + [{"machine": here, "tables": got}]
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps({"references": refs}, indent=1, sort_keys=True) + "\n")
    assert refs
    for ref in refs:
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in ref["tables"].items()}
    for ref in refs:
        if ref["machine"] == here:
            changed = {f"{s}/{t}" for s in got for t in got[s] if got[s][t] != ref["tables"][s][t]}
            assert not changed, f"this code computes other numbers than the code of the committed bundles: {changed}"


def test_merge_refuses_a_seed_whose_stages_used_other_base_weights(machine, tmp_path):
    """Issue 18: gamma measured on one base model and UM fine-tuned from a re-trained one that differs cannot be
    merged into one seed without saying so."""
    machine("a")
    p = load_profile("smoke")
    rows = {"rows": pd.DataFrame({"x": [1.0]})}
    used = lambda d: {"base": {"digest": d, "recorded": "aaaa", "retrained": d != "aaaa", "match": d == "aaaa"}}
    shards._write(p, "base", 0, rows, {"seconds": 1.0, "device": "cpu", "final_digest": "aaaa"})
    shards._write(p, "gamma", 0, rows, {"seconds": 1.0, "device": "cpu", "models_used": used("aaaa")})
    shards._write(p, "um", 0, rows, {"seconds": 1.0, "device": "cpu", "models_used": used("bbbb")})
    bundles = [shards.pack(p, s, 0, tmp_path) for s in ("base", "gamma", "um")]
    machine("b")
    with pytest.raises(shards.ShardError, match=r"stage um of seed 0 used base weights bbbb.*aaaa.*allow-mixed-models"):
        shards.merge(p, bundles)
    assert not shards.done(p, "base", 0)  # refused before anything was written
    shards.merge(p, bundles[:2])  # the consistent part merges
    with pytest.raises(shards.ShardError, match="disagree"):  # and the other one is refused against what is here
        shards.merge(p, bundles[2:])
    said = []
    shards.merge(p, bundles[2:], allow_mixed_models=True, log=said.append)
    assert shards.done(p, "um", 0)
    # the override is said and recorded, in the stage's manifest and so in the notebooks' provenance
    assert any(line.startswith("warning: merged with --allow-mixed-models") and "stage um of seed 0" in line
               for line in said)
    what = ["stage um of seed 0 used base weights bbbb, but base's own tables were computed with aaaa"]
    assert shards.manifest(p, "um", 0)["mixed_models"] == what
    assert "mixed_models" not in shards.manifest(p, "gamma", 0)
    assert shards.provenance(p, "03", [0])["um/seed0"]["mixed_models"] == what


def test_a_retrained_model_must_reproduce_the_recorded_weights(machine, tmp_path, monkeypatch, capsys):
    """Issue 18: a shard whose base weights did not travel re-trains the base, and goes on only if it reproduces the
    digest the base's bundle recorded; --models-only does just that (the first of two commands on a warm GPU
    machine). A base that comes out different stops the shard before any stage that would start from it (the merge
    would refuse those), unless --allow-mixed-models."""
    monkeypatch.setattr(shards, "WEIGHTS_MAX_BYTES", 0)  # no weights in the bundles
    over = {"train.epochs": 2, "seeds": [0]}
    p = load_profile("smoke", over)
    machine("a")
    a = execute.run_shards("smoke", ["base", "gamma"], [0], over, tmp_path / "bundles")
    recorded = shards.manifest(p, "base", 0)["final_digest"]
    assert shards.manifest(p, "base", 0)["precision"]["training_kernels"] == "deterministic"

    machine("b")
    with pytest.raises(shards.ShardError, match=r"--models-only: stage 'base' seed 0.*no tables here.*--inputs"):
        execute.run_shards("smoke", ["um"], [0], over, tmp_path / "bundles-b", models_only=True)  # never computes
    capsys.readouterr()
    # posthoc_um scores um's model: um is one of the stages, so its model is not a model to make ready here
    assert execute.run_shards("smoke", ["um", "posthoc_um"], [0], over, tmp_path / "bundles-b", inputs=a,
                              models_only=True) == []
    said = capsys.readouterr().out
    assert f"model base seed 0: re-trained here, weights digest {recorded[:12]} = the recorded one" in said
    assert "model um" not in said
    assert not shards.done(p, "um", 0) and not (tmp_path / "bundles-b").exists()  # no stage ran, no bundle
    execute.run_shards("smoke", ["um"], [0], over, tmp_path / "bundles-b")  # the stage, on the same machine
    assert shards.manifest(p, "um", 0)["models_used"]["base"]["match"]

    machine("c")
    shards.merge(p, a)
    path = shards.shard_dir(p, "base", 0) / shards.MANIFEST
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "final_digest": "f" * 64}))  # as if recorded by a run that cannot be redone
    with pytest.raises(shards.ShardError, match=r"re-trained base model of seed 0 here differs.*ffffffffffff "
                                                r"recorded.*stops before.*--allow-mixed-models"):
        execute.run_shards("smoke", ["um"], [0], over, tmp_path / "bundles-c")
    assert not shards.done(p, "um", 0) and not (tmp_path / "bundles-c").exists()
    execute.run_shards("smoke", ["um"], [0], over, tmp_path / "bundles-c", allow_mixed_models=True)
    assert not shards.manifest(p, "um", 0)["models_used"]["base"]["match"]
    assert "warning: the base model of seed 0 here differs" in capsys.readouterr().out  # found here: not re-trained
