"""The shard plan (``stages.shard_plan``): every stage of a seed in exactly one shard, after the shards it reads;
the README's tables are the plan's own; ``--plan`` prints the commands with the bundles they read."""
import pytest

from ood_lib import reproduce, shards, stages
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
