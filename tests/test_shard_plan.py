"""The shard plan (``stages.shard_plan``): every stage of a seed in exactly one shard, after the shards it reads;
the README's tables are the plan's own; ``--plan`` prints the commands with the bundles they read."""
import shutil

import pytest

from ood_lib import plan, reproduce, shards, stages
from ood_lib.config import load_profile
from ood_lib.paths import PROJECT_ROOT


@pytest.mark.parametrize("name", ["cifar10", "cifar10-cpu", "smoke", "default", "cifar10-pretrained"])
def test_every_stage_once_after_what_it_reads(name):
    p = load_profile(name)
    registry = stages.stages(p)
    for seed in p.seeds:
        plan = stages.shard_plan(p, seed)
        placed = [n for own, _ in plan for n in own]
        assert sorted(placed) == sorted(n for n, s in registry.items() if seed in s.runs_for(p)), (name, seed)
        earlier: set[str] = set()
        for own, reads in plan:
            needs = {d for n in own for d in (*registry[n].inputs, *registry[n].models)} - set(own)
            assert set(reads) == needs and needs <= earlier, (own, reads, earlier)
            assert sum(registry[n].train is not None for n in own) <= 1, own  # one training per shard
            earlier |= set(own)


def test_the_base_shard_keeps_what_reads_every_base_epoch_and_claims_1_and_3_come_first():
    p = load_profile("cifar10")
    plan = stages.shard_plan(p, 0)
    assert plan[0] == (("base", "atypical", "gamma", "posthoc_base"), ())
    assert plan[1] == (("um", "posthoc_um"), ("gamma", "base"))
    notebooks = [stages.stages(p)[own[0]].notebook for own, _ in plan]
    assert notebooks == sorted(notebooks, key=stages.CLAIMS_FIRST.index)
    assert (("paper_um_ours",), ("paper_gamma",)) in plan
    assert [own for own, _ in stages.shard_plan(p, 1) if own[0].startswith("paper")] == []  # um.paper_seeds: 0


@pytest.mark.parametrize("name", ["cifar10", "cifar10-cpu"])
def test_the_readme_shows_the_plan_itself(name):
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert shards.shard_table(load_profile(name)) in readme, (
        f"README's shard table of {name} is not the plan's; paste shards.shard_table(load_profile({name!r}))")


def test_plan_prints_each_missing_shard_with_the_bundles_it_reads(machine, capsys, tmp_path):
    machine("m")
    assert reproduce.main(["--profile", "cifar10-cpu", "--plan", "--bundle-dir", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("python -m ood_lib.reproduce")]
    p = load_profile("cifar10-cpu")
    assert len(commands) == sum(len(stages.shard_plan(p, s)) for s in p.seeds)
    um = next(c for c in commands if "--stages um,posthoc_um --seeds 1" in c)
    assert um.endswith(f"--bundle-dir {tmp_path / 'b'} --inputs {tmp_path / 'b'}/cifar10-cpu__gamma__seed1.tar.gz "
                       f"{tmp_path / 'b'}/cifar10-cpu__base__seed1.tar.gz")


def test_plan_counts_the_bundles_in_the_bundle_folder_and_says_what_a_shard_re_trains(machine, capsys, tmp_path):
    """Issue 17: on a fresh machine, the committed bundles are the study's state. --plan counts an intact bundle of
    this profile's settings as done without merging it, names a bundle that cannot count and why, prints only the
    commands still to run, and says which of them re-train a model whose weights did not travel."""
    folder = tmp_path / "bundles"
    p = load_profile("cifar10-cpu")
    machine("a")
    for stage in ("base", "atypical", "gamma", "posthoc_base", "ft_ce"):
        _measured(p, stage, 1, 1200.0 if stage == "base" else 60.0, device="cpu (x86_64, 2 threads)",
                  train_seconds=900.0 if stage == "base" else None, weights=b"base" if stage == "base" else None)
        shards.pack(p, stage, 1, folder)
    beside = shards.weights_beside(folder / "cifar10-cpu__base__seed1.tar.gz")
    weights = beside.read_bytes()
    beside.unlink()  # git-ignored: lost with the machine
    other = load_profile("cifar10-cpu", {"train.epochs": 3})
    _measured(other, "base", 2, 30.0)
    shards.pack(other, "base", 2, folder)
    (folder / "cifar10-cpu__ft_ce__seed1.tar.gz").write_bytes(b"cut short")
    shutil.copy(folder / "cifar10-cpu__gamma__seed1.tar.gz", folder / "cifar10-cpu__gamma__seed2.tar.gz")
    shutil.copy(folder / "cifar10-cpu__gamma__seed1.tar.gz", folder / "cifar10-cpu__gamma__seed1 (copy).tar.gz")
    machine("b")  # a fresh machine with the committed bundles only

    table = plan.table(plan.Done.read(p, folder)).set_index(["stage", "seed"])
    assert table.loc[("base", 1), "done"] and table.loc[("base", 1), "where"] == "bundle"
    assert table.loc[("base", 1), "seconds"] == 1200.0 and table.loc[("gamma", 1), "where"] == "bundle"
    assert not table.loc[("ft_ce", 1), "done"] and table.loc[("ft_ce", 1), "where"] == "damaged bundle"
    assert not table.loc[("base", 2), "done"] and table.loc[("base", 2), "where"] == "bundle of other settings"
    assert not table.loc[("gamma", 2), "done"] and table.loc[("gamma", 2), "where"] == "misnamed bundle"
    assert not table.loc[("base", 0), "done"] and table.loc[("base", 0), "where"] == ""
    assert not plan.table(plan.Done.read(p)).done.any()  # without the folder: nothing is here

    assert reproduce.main(["--profile", "cifar10-cpu", "--plan", "--bundle-dir", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if line.startswith("python -m ood_lib.reproduce")]
    assert not any("--stages base,atypical,gamma,posthoc_base --seeds 1 " in c for c in commands)  # in bundles
    assert sum("--stages base,atypical,gamma,posthoc_base --seeds 2 " in c for c in commands) == 1  # other settings
    assert sum("--stages ft_ce --seeds 1 " in c for c in commands) == 1  # damaged
    assert ("# stage ft_ce seed 1 does not count as done: cifar10-cpu__ft_ce__seed1.tar.gz is a damaged bundle "
            "(bundle") in "\n".join(out)
    assert any(line.startswith("# stage base seed 2 does not count as done: cifar10-cpu__base__seed2.tar.gz is a "
                               "bundle of other settings") for line in out)
    assert any(line.startswith("# stage gamma seed 2 does not count as done: cifar10-cpu__gamma__seed2.tar.gz is a "
                               "misnamed bundle (its manifest: profile 'cifar10-cpu', stage 'gamma', seed 1)")
               for line in out)
    um = next(i for i, c in enumerate(out) if "--stages um,posthoc_um --seeds 1 " in c)
    assert out[um - 1] == ("# it re-trains base of seed 1 first: its final weights are neither on this machine nor "
                           "beside its bundle (base trained for 15 min)")
    seed2 = next(i for i, c in enumerate(out) if "--stages um,posthoc_um --seeds 2 " in c)
    assert not out[seed2 - 1].startswith("#")  # seed 2's base comes from the command before it, on this machine
    beside.write_bytes(b"other weights")
    assert plan.Done.read(p, folder).weights_missing(("um", "posthoc_um"), 1) == ["base"]  # not the ones recorded
    beside.write_bytes(weights)
    assert plan.Done.read(p, folder).weights_missing(("um", "posthoc_um"), 1) == []
    assert plan.Done.read(p).weights_missing(("um", "posthoc_um"), 1) == ["base"]
    machine("merged")
    shards.merge(p, [folder / "cifar10-cpu__base__seed1.tar.gz"])  # the weights come along, into the shard folder
    assert plan.Done.read(p).weights_missing(("um", "posthoc_um"), 1) == []


def _measured(p, stage, seed, seconds, device="NVIDIA H200", train_seconds=None, weights=None):
    """A finished shard as a stage writes it; ``weights``: the bytes of a final checkpoint that travels beside its
    bundle."""
    import hashlib

    import pandas as pd
    tables = {"rows": pd.DataFrame({"value": [0.5]})}
    if train_seconds is not None:
        tables["history"] = pd.DataFrame({"epoch": [1, 2], "train_seconds": [train_seconds / 2] * 2})
    info = {"seconds": seconds, "device": device}
    if weights is not None:
        shards.shard_dir(p, stage, seed).mkdir(parents=True, exist_ok=True)
        (shards.shard_dir(p, stage, seed) / shards.WEIGHTS).write_bytes(weights)
        info["weights"] = hashlib.sha256(weights).hexdigest()
    shards._write(p, stage, seed, tables, info)


def test_device_plan_is_sized_from_committed_bundles_as_from_merged_shards(machine, tmp_path):
    """A fresh machine has the committed bundles only: the device plan reads their manifests and training histories
    as it reads merged shards, so its sizes, re-trainings and blocks are the same."""
    p = load_profile("cifar10")
    machine("gpu")
    _measured(p, "base", 0, 432.0, train_seconds=192.0)
    _measured(p, "base", 1, 440.0, train_seconds=200.0)
    _measured(p, "gamma", 1, 25.0)
    for stage, seed in (("base", 0), ("base", 1), ("gamma", 1)):
        shards.pack(p, stage, seed, tmp_path / "bundles")
    merged = {seed: plan.device_plan(plan.Done.read(p), seed, 540) for seed in (0, 1, 2)}
    _measured(p, "um_gamma9", 1, 99.0, train_seconds=90.0)  # a stage of other settings (um.gamma_sweep)
    shards.pack(p, "um_gamma9", 1, tmp_path / "bundles")
    assert plan.bundled(p, tmp_path / "bundles")[("um_gamma9", 1)][0].startswith("bundle of a stage this profile")
    retrain = next(x for x in merged[2] if x.row == 2 and x.models_only)  # seed 2's base: not done anywhere
    assert retrain.seconds == plan.STARTUP_SECONDS + 196.0  # the median of the two trainings
    machine("fresh")
    assert all(x.seconds is None for x in plan.device_plan(plan.Done.read(p), 1, 540))  # nothing is known here
    assert {seed: plan.device_plan(plan.Done.read(p, tmp_path / "bundles"), seed, 540) for seed in (0, 1, 2)} == merged


def test_device_plan_cuts_rows_to_the_budget_from_what_was_measured_on_a_gpu(machine, capsys):
    """Issue 18: --plan --device-minutes sizes each row from the GPU stages measured (here: the H200's seconds of
    2026-12-04), adds the base re-training where its weights do not travel, cuts a row between stages onto the
    same warm machine, and says which pieces do not fit, rather than printing a plan that cannot run."""
    machine("m")
    p = load_profile("cifar10")
    _measured(p, "base", 0, 432.0, train_seconds=192.0)
    _measured(p, "atypical", 0, 77.0)
    _measured(p, "gamma", 0, 25.0)
    _measured(p, "posthoc_base", 0, 20.0)
    _measured(p, "um", 0, 5.0, device="cpu (x86_64, 2 threads)")  # another device kind sizes nothing here
    _measured(p, "paper_start", 0, 30.0)  # these two train nothing: they size no stage that trains
    _measured(p, "paper_gamma", 0, 30.0)
    start = plan.STARTUP_SECONDS
    pieces = {(x.row, x.stages): x for x in plan.device_plan(plan.Done.read(p), 1, 9 * 60)}
    one = pieces[1, ("base",)]
    assert one.seconds == start + 432 and one.fits(540) and not one.warm
    rest = pieces[1, ("atypical", "gamma", "posthoc_base")]
    assert rest.seconds == start + 77 + 25 + 20 and rest.warm and rest.reads == ()
    # row 2 re-trains base (192 s) in a command of its own (with um's 100 epochs at base's 4.32 s it would not fit),
    # then um and posthoc_um on the same warm machine
    retrain, um = [x for x in plan.device_plan(plan.Done.read(p), 1, 9 * 60) if x.row == 2]
    assert retrain.models_only and retrain.stages == ("um", "posthoc_um") and retrain.reads == ("gamma", "base")
    assert retrain.seconds == start + 192 and retrain.fits(540) and "re-trains base" in retrain.basis
    assert not retrain.warm and not retrain.blocked
    assert um.stages == ("um", "posthoc_um") and um.warm and um.reads == () and not um.models_only
    assert um.seconds == pytest.approx(start + 432 + 20) and um.fits(540)
    # seed 0's base was trained on the GPU before deterministic kernels: no re-training can reproduce it
    blocked = [x for x in plan.device_plan(plan.Done.read(p), 0, 9 * 60) if x.row in (2, 3, 4, 5)]
    assert blocked and all("nondeterministic" in x.blocked and not x.fits(540) for x in blocked)
    assert not any(x.blocked for x in plan.device_plan(plan.Done.read(p), 0, 9 * 60)
                   if x.row > 5)  # they train from scratch
    assert pieces[8, ("no_random",)].seconds == pytest.approx(start + 432)
    paper = next(x for x in plan.device_plan(plan.Done.read(p), 0, 540) if x.stages == ("paper_um",))  # seed 0 only
    assert paper.seconds is None and not paper.fits(540)  # DenseNet: nothing measured sizes it
    assert sorted(n for _, own in pieces for n in own) == sorted(n for own, _ in stages.shard_plan(p, 1) for n in own)

    assert reproduce.main(["--profile", "cifar10", "--plan", "--device-minutes", "9"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if "bash scripts/device_shard.sh" in line]
    assert "bash scripts/device_shard.sh atypical,gamma,posthoc_base 1" in commands
    # row by row across the seeds: every seed's base row (claim 1) before any fine-tune row (claim 3)
    first_um = next(i for i, c in enumerate(commands) if "um,posthoc_um" in c)
    assert commands.index("bash scripts/device_shard.sh base 2") < first_um
    assert commands.index("bash scripts/device_shard.sh no_random 0 results/cifar10/bundles/cifar10__atypical__seed0"
                          ".tar.gz") > max(i for i, c in enumerate(commands) if " ft_ce " in c)
    # seed 0's base row is done, but with nondeterministic kernels: it is planned again, after the other seeds' base
    # rows and before the rows it blocks, with the bundles it replaces named
    assert commands.index("bash scripts/device_shard.sh base 0") > commands.index("bash scripts/device_shard.sh base 2")
    assert commands.index("bash scripts/device_shard.sh base 0") < first_um
    assert commands.count("bash scripts/device_shard.sh base 0") == 1
    again = next(line for line in out if line.startswith("# seed 0, row 1 again, with this code"))
    assert "results/cifar10/bundles/cifar10__base__seed0.tar.gz" in again and "posthoc_base__seed0" in again
    assert "MODELS_ONLY=1 bash scripts/device_shard.sh um,posthoc_um 1 results/cifar10/bundles/cifar10__gamma__seed1" \
        ".tar.gz results/cifar10/bundles/cifar10__base__seed1.tar.gz" in commands
    assert commands[commands.index(next(c for c in commands if c.startswith("MODELS_ONLY=1") and " 1 " in c)) + 1] \
        == "bash scripts/device_shard.sh um,posthoc_um 1"
    assert any(line.startswith("# seed 0, row 2") and "BLOCKED (base seed 0 was trained with nondeterministic" in line
               for line in out)
    assert "# MODELS_ONLY=1 bash scripts/device_shard.sh um,posthoc_um 0 results/cifar10/bundles/cifar10__gamma__seed0" \
        ".tar.gz results/cifar10/bundles/cifar10__base__seed0.tar.gz" in out  # blocked: commented out
    assert any("fit unknown (not measured on a GPU)" in line and "paper_um not measured" in line for line in out)
    assert not any("DOES NOT FIT" in line for line in out)  # every sized piece fits 9 minutes
    assert reproduce.main(["--profile", "cifar10", "--device-minutes", "9"]) == 2  # only with --plan


def test_machine_plan_fits_the_time_left_and_re_trains_a_lost_base_once(machine, capsys, tmp_path):
    """--plan --machine-minutes: the commands one CPU machine can finish one after another, in the plan's order,
    sized from the shards measured on a CPU plus a start-up allowance (the seed's own training time for a
    re-training); a model re-trained by one command is on the machine for the next ones; a row that does not fit is
    left out with the rows that need it, and a later row that fits is still taken; a row half done elsewhere runs
    whole; a re-training that cannot reproduce its record (GPU kernels) is not planned."""
    p = load_profile("cifar10-cpu", {"seeds": [0, 1, 2, 3]})
    folder = tmp_path / "bundles"
    machine("a")
    cpu, start = "cpu (x86_64, 2 threads)", plan.STARTUP_SECONDS
    for seed in (0, 1):
        _measured(p, "base", seed, 4000.0 + 1000 * seed, device=cpu, train_seconds=2000.0 + 1000 * seed,
                  weights=b"base" if seed == 0 else None)
        for stage, sec in (("atypical", 1400.0), ("gamma", 140.0), ("posthoc_base", 30.0)):
            _measured(p, stage, seed, sec, device=cpu)
    for stage, sec in (("um", 1820.0), ("posthoc_um", 30.0), ("um_b", 1700.0), ("umap", 1700.0),
                       ("posthoc_umap", 20.0), ("ft_ce", 1400.0), ("no_atypical_per_class", 3200.0),
                       ("no_random", 3300.0)):
        _measured(p, stage, 0, sec, device=cpu, train_seconds=1500.0 if stage == "um" else None)
    _measured(p, "base", 2, 4500.0, device=cpu, train_seconds=2500.0)  # its row cut short after base
    for stage in ("base", "atypical", "gamma", "posthoc_base"):  # seed 3's row 1 on a GPU
        _measured(p, stage, 3, 100.0, train_seconds=50.0 if stage == "base" else None)
    for name in stages.stages(p):
        for seed in p.seeds:
            if shards.done(p, name, seed):
                shards.pack(p, name, seed, folder)
    machine("b")  # fresh: seed 1's base weights did not travel (none were recorded beside its bundle)
    done = plan.Done.read(p, folder)
    commands, left = plan.machine_plan(done, 150 * 60)
    assert [(c.seed, c.stages) for c in commands] == [(1, ("um", "posthoc_um")), (1, ("um_b",)),
                                                     (1, ("umap", "posthoc_umap"))]
    first = commands[0]
    assert first.retrains == ("base",) and first.seconds == start + 3000 + 1820 + 30  # seed 1's own training
    assert commands[1].retrains == () and commands[1].seconds == start + 1700  # base is here by then
    assert left[0] == "ft_ce seed 1: ~24 min, 9 min left"  # 150 - 81.8 - 29.3 - 29.7 min
    assert "no_random seed 2: needs atypical first" in left
    # a row too long for the time left is passed over; a later one that fits is taken
    commands, left = plan.machine_plan(done, 75 * 60)
    assert [(c.seed, c.stages) for c in commands] == [(1, ("ft_ce",))]
    assert commands[0].retrains == ("base",) and commands[0].seconds == start + 3000 + 1400
    assert left[0] == "um,posthoc_um seed 1: ~82 min, 75 min left"
    # seed 2's row runs whole: atypical and gamma read every epoch of the base run, which only its machine had;
    # seed 3's base was trained on a GPU: no re-training here gives its weights, so what starts from it waits
    commands, left = plan.machine_plan(done, 10_000 * 60)
    planned = [(c.seed, c.stages) for c in commands]
    assert (2, ("base", "atypical", "gamma", "posthoc_base")) in planned
    assert [own for s, own in planned if s == 3] == [("no_atypical_per_class",), ("no_random",)]
    assert ("um,posthoc_um seed 3: base seed 3 was trained with nondeterministic kernels (NVIDIA H200): no "
            "re-training reproduces it") in left
    gpu, left = plan.machine_plan(done, 150 * 60, cpu=False)  # seed 1's base was trained on a CPU
    assert ("um,posthoc_um seed 1: base seed 1 was trained on cpu (x86_64, 2 threads): a re-training on a GPU would "
            "not reproduce it") == left[0]
    # a model here without its weights is re-trained from the models it starts from, re-trained first
    _measured(p, "um", 1, 1820.0, device=cpu)
    done = plan.Done.read(p, folder)
    assert done.weights_missing(("posthoc_um",), 1) == ["base", "um"]
    first = plan.machine_plan(done, 150 * 60)[0][0]
    assert (first.stages, first.retrains, first.reads) == (("posthoc_um",), ("base", "um"), ("um", "gamma", "base"))
    assert first.seconds == start + 3000 + 1500 + 30  # um's re-training: seed 0's training (seed 1's is unknown)
    shards.shard_dir(p, "um", 1).joinpath(shards.MANIFEST).unlink()

    args = ["--profile", "cifar10-cpu", "--set=seeds=[0,1,2,3]", "--plan", "--bundle-dir", str(folder)]
    assert reproduce.main([*args, "--machine-minutes", "150"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "# this machine, 150 min: 3 command(s), ~141 min, one after another (sized from the shards measured on a " \
           "CPU)" in out
    assert "# ~82 min: re-trains base first (50 min); um measured (30 min); posthoc_um measured (0 min)" in out
    assert "# not in it: ft_ce seed 1: ~24 min, 9 min left" in out
    assert reproduce.main(["--profile", "cifar10-cpu", "--machine-minutes", "150"]) == 2  # only with --plan
    for bad in (["--machine-minutes", "nan"], ["--machine-minutes", "0"], ["--device-minutes", "inf"]):
        assert reproduce.main([*args, *bad]) == 2
    assert reproduce.main(["--profile", "cifar10-cpu", "--next-shards", "nan"]) == 2
    assert "--next-shards nan: a positive number of minutes" in capsys.readouterr().err
