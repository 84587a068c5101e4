"""Runtime pieces that need no second process: slicing, schedule progress, rendezvous variables,
launcher checks, single-process pass-through and deferred init."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from conftest import run_cli
from rannc_cli.errors import RanncError
from rannc_cli.planner.schedules import rank_ops, stage_ops
from rannc_cli.runtime.env import detect_env
from rannc_cli.runtime.microbatch import overlap, slice_ranges, split_sizes
from rannc_cli.runtime.planning import even_plan


@pytest.mark.parametrize("batch,m,r", [(8, 2, 2), (10, 3, 3), (7, 1, 4), (5, 5, 1), (9, 2, 4)])
def test_slices_cover_every_sample_once(batch, m, r):
    ranges = slice_ranges(batch, m, r)
    flat = [s for row in ranges for lo, hi in row for s in range(lo, hi)]
    assert flat == list(range(batch))
    assert split_sizes(batch, m) == [sum(hi - lo for lo, hi in row) for row in ranges]


@pytest.mark.parametrize("batch,m,ra,rb", [(12, 2, 2, 3), (10, 3, 1, 3), (9, 1, 4, 2)])
def test_redistribution_pieces_tile_each_consumer_slice(batch, m, ra, rb):
    a, b = slice_ranges(batch, m, ra), slice_ranges(batch, m, rb)
    for mb in range(m):
        for theirs in b[mb]:
            pieces = [p for mine in a[mb] if (p := overlap(mine, theirs))]
            assert pieces[0][0] == theirs[0] and pieces[-1][1] == theirs[1]
            assert all(x[1] == y[0] for x, y in zip(pieces, pieces[1:]))


def _runs_to_completion(schedule: str, stages: int, microbatches: int) -> bool:
    """Replay the executor's rules: sends never block, an op waits for its inputs. Every stage
    exchanges with every other (skip connections), the worst case for deadlocks."""
    ops = stage_ops(schedule, stages, microbatches)
    done: set[tuple[str, int, int]] = set()
    pos = [0] * stages
    while any(p < len(o) for p, o in zip(pos, ops)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(ops[s]):
                continue
            kind, m = ops[s][pos[s]]
            if kind == "F":
                ready = all(("F", t, m) in done for t in range(s))
            else:
                ready = ("F", s, m) in done and all(("B", t, m) in done for t in range(s + 1, stages))
            if ready:
                done.add((kind, s, m))
                pos[s] += 1
                progressed = True
        if not progressed:
            return False
    return True


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_schedules_never_deadlock_with_skip_connections(schedule):
    for stages, microbatches in itertools.product(range(1, 6), range(1, 9)):
        assert _runs_to_completion(schedule, stages, microbatches), (schedule, stages, microbatches)


def _rank_ops_run_to_completion(schedule: str, groups: int, microbatches: int, virtual: int) -> bool:
    """The same replay for rank_ops (several stages per group, W ops): every stage still exchanges
    with every other, and a group's ops wait for their inputs in list order."""
    ops = rank_ops(schedule, groups, microbatches, virtual)
    stages = groups * virtual
    done: set[tuple[str, int, int]] = set()
    pos = [0] * groups
    while any(p < len(o) for p, o in zip(pos, ops)):
        progressed = False
        for g in range(groups):
            while pos[g] < len(ops[g]):
                kind, m, s = ops[g][pos[g]]
                if kind == "F":
                    ready = all(("F", m, t) in done for t in range(s))
                elif kind == "B":
                    ready = ("F", m, s) in done and all(("B", m, t) in done for t in range(s + 1, stages))
                else:
                    ready = ("B", m, s) in done
                if not ready:
                    break
                done.add((kind, m, s))
                pos[g] += 1
                progressed = True
        if not progressed:
            return False
    return True


@pytest.mark.parametrize("schedule,virtual", [("interleaved", 2), ("interleaved", 3), ("zb", 1)])
def test_multi_stage_schedules_never_deadlock_with_skip_connections(schedule, virtual):
    for groups, microbatches in itertools.product(range(1, 6), range(1, 9)):
        assert _rank_ops_run_to_completion(schedule, groups, microbatches, virtual), (groups, microbatches)


def test_rendezvous_from_torchrun_slurm_and_pbs(tmp_path):
    assert detect_env({}) is None
    e = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.nodes, e.master_addr, e.master_port, e.source) == \
        (3, 8, 1, 4, "n1", 1234, "torchrun")
    e = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4",
                    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.source) == \
        (5, 8, 1, 4, "gpu07", "slurm")
    assert 20000 <= e.master_port < 40000
    nodefile = tmp_path / "nodes"
    nodefile.write_text("cn12\ncn12\ncn13\ncn13\n")
    e = detect_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "7.srv"})
    assert (e.rank, e.world_size, e.local_rank, e.nodes, e.master_addr, e.source) == (2, 4, 0, 2, "cn12", "pbs")


def test_even_plan_places_replicas_on_consecutive_ranks():
    plan = even_plan(10, [2, 1, 1], microbatches=2, batch_size=8)
    assert [(s.start, s.end, s.replicas) for s in plan.stages] == [(0, 3, 2), (3, 7, 1), (7, 10, 1)]
    assert [d for s in plan.stages for d in s.devices] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    with pytest.raises(RanncError):
        even_plan(2, [1, 1, 1], 1, 8)


@pytest.mark.parametrize("flags,message", [
    (["--nproc", "2", "--replicas", "2,1"], "use 3 processes, --nproc is 2"),
    (["--nproc", "4", "--replicas", "2,1"], "give replica counts that sum to 4"),  # no rank left idle
    (["--nproc", "2", "--schedule", "zigzag"], "--schedule='zigzag' is invalid"),
    (["--nproc", "2", "--stages", "3"], "--stages 3 must be between 1"),
])
def test_run_rejects_bad_flags_in_one_line(flags, message):
    proc = run_cli("run", *flags, "examples/mlp.py")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_run_rejects_a_missing_script():
    proc = run_cli("run", "--nproc", "2", "no_such_script.py")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def _clear_dist_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                 "PMIX_RANK", "PALS_RANKID"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_plain_pytorch(monkeypatch):
    from rannc_cli import RaNNCModule
    from zoo import ZOO

    _clear_dist_env(monkeypatch)
    torch.manual_seed(0)
    model, (args, kwargs) = ZOO["fork_join"]()
    reference = copy.deepcopy(model)
    wrapped = RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not wrapped.distributed
    loss, expected = wrapped(*args, **kwargs), reference(*args, **kwargs)
    loss.backward()
    expected.backward()
    assert torch.equal(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert list(wrapped.state_dict()) == list(reference.state_dict())


def test_deferred_init_builds_on_meta_and_materialises_alone(monkeypatch):
    import rannc_cli
    from rannc_cli import RaNNCModule
    from zoo import ZOO

    _clear_dist_env(monkeypatch)
    with rannc_cli.deferred_init():
        model, (args, kwargs) = ZOO["tied_weights"]()
    assert all(p.is_meta for p in model.parameters())
    assert model.proj.weight is model.emb.weight  # ties survive
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = RaNNCModule(model, opt)
    assert not any(p.is_meta for p in model.parameters())
    assert opt.param_groups[0]["params"][0] is model.emb.weight
    assert model.emb.weight.std() > 0.5  # nn.Embedding.reset_parameters draws N(0, 1)
    loss = wrapped(*args, **kwargs)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_a_plan_for_another_shape_or_contradicting_flags_is_refused(tmp_path):
    from rannc_cli.planner.synthetic import bert_profile
    from rannc_cli.runtime.planning import Constraints, _plan_from_spec

    prof, plan = tmp_path / "p.yaml", tmp_path / "plan.yaml"
    bert_profile(layers=4, hidden=256, seq=64, vocab=4000, batch_size=16).save(prof)
    assert run_cli("plan", "--profile", str(prof), "--nodes", "1", "--gpus", "4", "--out", str(plan)).returncode == 0
    shape = run_cli("run", "--nproc", "2", "--plan", str(plan), "examples/mlp.py")  # refused before any worker
    assert shape.returncode == 2 and "Traceback" not in shape.stderr
    assert "was made for 1 node(s) x 4 GPUs (4 processes); this run has 1 node(s) x 2 process(es)" in shape.stderr
    assert "--nproc 4" in shape.stderr
    flags = run_cli("run", "--nproc", "4", "--plan", str(plan), "--schedule", "gpipe", "examples/mlp.py")
    assert flags.returncode == 2 and "--schedule gpipe contradicts" in flags.stderr
    # the same checks inside the job (torchrun, srun: no launcher in front)
    with pytest.raises(RanncError, match="this run has 2 node"):
        _plan_from_spec(str(plan), 6, 16, world_size=4, gpus_per_node=2, c=Constraints())
    with pytest.raises(RanncError, match="--schedule gpipe contradicts"):
        _plan_from_spec(str(plan), 6, 16, world_size=4, gpus_per_node=4, c=Constraints(schedule="gpipe"))
