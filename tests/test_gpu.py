"""The GPU paths, checked on a machine with CUDA (skipped elsewhere, so CI without GPUs skips them).

    python -m pytest tests/test_gpu.py -v          # on a GPU node

- NVML discovery agrees with what CUDA reports (count, names, memory);
- `rannc profile --device cuda` measures every block with CUDA timing and allocator statistics;
- the runtime engine trains on a GPU over an NCCL process group and matches plain single-GPU
  training number by number. One GPU cannot hold two NCCL ranks (NCCL refuses "duplicate GPU"),
  so this runs the engine as a world of one with microbatches: the CUDA placement of stages,
  inputs, parameters and optimizer state, the CUDA RNG streams, and NCCL's all-reduce of the loss.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def world_of_one(wrapped):
    """Run a RaNNCModule through its engine as a world of one (NCCL), then leave the process group."""
    import torch.distributed as dist

    from rannc_cli.runtime.env import DistEnv
    from rannc_cli.runtime.launcher import free_port

    wrapped._env = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "torchrun")
    try:
        yield wrapped
        assert wrapped._engine is not None and wrapped._engine.device.type == "cuda"
        assert dist.get_backend() == "nccl"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_nvml_probe_matches_cuda():
    from rannc_cli.topology import nvml

    gpus, _pairs, status = nvml.probe()
    assert status == "ok", status
    assert len(gpus) == torch.cuda.device_count()
    for gpu in gpus:
        props = torch.cuda.get_device_properties(gpu["index"])
        assert gpu["name"] == props.name
        # NVML counts the whole framebuffer, CUDA what it can allocate: within a few percent.
        assert abs(gpu["memory_bytes"] - props.total_memory) / props.total_memory < 0.05


def test_topology_cli_reports_this_nodes_gpus(tmp_path):
    res = run_cli("topology", "--scheduler", "local", "--json", "--out", str(tmp_path / "topo.yaml"))
    assert res.returncode == 0, res.stderr
    topo = json.loads(res.stdout)
    assert topo["discovery"]["nvml"] == "ok", topo["discovery"]
    node = topo["nodes"][0]
    assert node["gpus"] == torch.cuda.device_count()
    assert node["gpu_model"] == torch.cuda.get_device_name(0)
    assert abs(node["gpu_memory_bytes"] - torch.cuda.get_device_properties(0).total_memory) < \
        0.05 * node["gpu_memory_bytes"]
    print(json.dumps({"discovery": topo["discovery"], "node": node, "links": topo["links"]}))


def test_cuda_profile_measures_every_block(tmp_path):
    from rannc_cli.profiler.format import Profile

    out = tmp_path / "prof.yaml"
    res = run_cli("profile", "--device", "cuda", "--no-cache", "--json", "--out", str(out),
                  str(ROOT / "examples" / "transformer_lm.py"), "--", "--layers", "2", "--d-model", "256",
                  "--batch-size", "8", "--seq-len", "64")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    prof = Profile.load(out)
    assert summary["mode"] == "measured" and prof.device["type"] == "cuda"
    assert prof.device["name"] == torch.cuda.get_device_name(0)
    for cls in prof.classes:
        for cost in cls.costs:
            assert cost.forward_seconds > 0 and cost.backward_seconds >= 0
    # the allocator saw the activations that backward keeps: more for a bigger microbatch
    big, small = max(prof.microbatch_sizes), min(prof.microbatch_sizes)
    assert big > small
    saved = {mb: sum(c.costs[i].activation_bytes for c in prof.classes) for i, mb in enumerate(prof.microbatch_sizes)}
    assert saved[big] > saved[small] > 0


@pytest.mark.parametrize("model_name, batch_device", [("example_transformer", "cuda"), ("example_mlp", "cpu"),
                                                      ("fork_join", "cuda")])
def test_engine_on_cuda_equals_plain_cuda_training(model_name, batch_device):
    """The model stays where the user built it (on the CPU: too big for one GPU); the batch is on the
    GPU or the CPU. Losses, final parameters and the no_grad / eval losses (a second capture, after
    the stage moved to the GPU) must match plain training on the GPU."""
    import runtime_cases as rc
    from rannc_cli import RaNNCModule

    case = {"id": model_name, "model": model_name, "steps": 4}
    ref_model, batch = rc.build(case)
    dist_model = copy.deepcopy(ref_model)
    cuda_batch = rc.pytree.tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) else t, batch)
    run_batch = cuda_batch if batch_device == "cuda" else batch

    ref_model.cuda()
    ref_opt = rc.make_optimizer(case, ref_model.parameters())
    ref = {"losses": rc._train(case, ref_model, ref_model, ref_opt, cuda_batch),
           **rc._evaluate(ref_model, ref_model, cuda_batch)}

    opt = rc.make_optimizer(case, dist_model.parameters())
    with world_of_one(RaNNCModule(dist_model, opt, plan={"replicas": [1], "microbatches": 4}, quiet=True)) as wrapped:
        got = {"losses": rc._train(case, dist_model, wrapped, opt, run_batch),
               **rc._evaluate(wrapped, wrapped, run_batch)}
        assert all(p.is_cuda for p in dist_model.parameters())
        got["state"] = {k: v.detach().cpu() for k, v in wrapped.state_dict().items()}
    ref["state"] = {k: v.detach().cpu() for k, v in ref_model.state_dict().items()}
    bad, worst = rc.compare(ref, got, rtol=1e-4, atol=1e-5)
    assert not bad, f"{bad[:5]} (largest difference {worst:.3g})"
    print(f"{model_name} (batch on {batch_device}): losses {got['losses']}, largest difference {worst:.3g}")


POSITIONS_SCRIPT = """
import torch
from torch import nn
from rannc_cli import RaNNCModule


class Positions(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(100, 32), nn.Embedding(16, 32)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(4)])
        self.head = nn.Linear(32, 100)

    def forward(self, tokens, targets):
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # recorded with the capture's device
        h = self.body(self.tok(tokens) + self.pos(positions))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (8, 16), generator=g), torch.randint(0, 100, (8, 16), generator=g)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = RaNNCModule(Positions())
    model(*batch()).backward()
"""


def test_plan_from_a_cuda_profile_runs_on_the_engine(tmp_path):
    """`rannc profile --device cuda` captures on the GPU, recording torch.arange(..., device=cuda);
    the engine captures on the CPU. The plan's graph hash must still match, and the stage must make
    its positions on the GPU."""
    import importlib.util

    import runtime_cases as rc
    from rannc_cli import RaNNCModule

    script, profile, plan = tmp_path / "positions.py", tmp_path / "prof.yaml", tmp_path / "plan.yaml"
    script.write_text(POSITIONS_SCRIPT)
    res = run_cli("profile", "--device", "cuda", "--no-cache", "--out", str(profile), str(script))
    assert res.returncode == 0, res.stderr
    res = run_cli("plan", "--profile", str(profile), "--nodes", "1", "--gpus", "1", "--microbatches", "2",
                  "--out", str(plan))
    assert res.returncode == 0, res.stderr

    spec = importlib.util.spec_from_file_location("positions_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Positions()
    reference = copy.deepcopy(model).cuda()
    batch = (tuple(t.cuda() for t in mod.batch()), {})
    case = {"steps": 3}
    ref_losses = rc._train(case, reference, reference, torch.optim.SGD(reference.parameters(), lr=0.05), batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with world_of_one(RaNNCModule(model, opt, plan=str(plan), quiet=True)) as wrapped:
        losses = rc._train(case, model, wrapped, opt, batch)
        assert wrapped._engine.plan.microbatches == 2 and wrapped._engine.plan.graph_hash
    assert torch.allclose(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5), (losses, ref_losses)
