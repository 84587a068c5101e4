"""Capture that traces repeated layers once gives the same graph as exporting the whole model.

Each model is captured both ways (``reuse_layers=False``: today's whole-model export; ``True``:
graph/reuse.py); the graph hash, every block (name, type, signature, class, parameters, input
wiring, op targets), the op sequence with its module paths, the parameter names and the inputs
must be identical, and stage modules built from either graph give bitwise equal losses and
gradients. The runtime test trains under `rannc run` on 2 stages with both capture paths and
compares the losses and final parameters exactly.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_example
from rannc_cli.graph.blocks import build_blocks, graph_hash
from rannc_cli.graph.capture import capture
from rannc_cli.graph.repeats import find_runs
from rannc_cli.graph.stages import build_block_stages, build_stages, run_stages
from runtime_cases import load_result
from zoo import ZOO

ROOT = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    def __init__(self, d: int, shared_norm: nn.LayerNorm | None = None):
        super().__init__()
        self.norm = shared_norm if shared_norm is not None else nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.down(F.gelu(self.up(self.norm(x))))


class Widening(nn.Module):
    """Two runs of layers that differ in width between the runs (they must not be merged)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList([Block(16), Block(16), Block(16), Block(32), Block(32)])
        self.widen = nn.Linear(16, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i, layer in enumerate(self.layers):
            if i == 3:
                h = self.widen(h)
            h = layer(h)
        return F.cross_entropy(self.out(h), y)


class SharedNormStack(nn.Module):
    """Layers that all share one LayerNorm, and a head tied to the embedding."""

    def __init__(self, vocab: int = 24, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        norm = nn.LayerNorm(d)
        self.layers = nn.Sequential(*[Block(d, norm) for _ in range(4)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.layers(self.emb(tokens))).flatten(0, 1), targets.flatten())


class CalledDifferently(nn.Module):
    """Identical layers, but each is called with its own constant: the copies would be wrong."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, scale=float(i + 1))
        return x.pow(2).mean()


class BatchNormStack(nn.Module):
    """Identical layers whose BatchNorm updates buffers in place: not reused (whole-model export)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU()) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).pow(2).mean()


class PairLayer(nn.Module):
    """Takes and returns two tensors (a run whose stubs pass two values each on)."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.gate = nn.Linear(d, 1)

    def forward(self, h: torch.Tensor, aux: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + torch.tanh(self.lin(h)).masked_fill(mask, 0.0)
        return h, aux + self.gate(h)


class InPlaceParentStack(nn.Module):
    """The parent builds a mask in place (so the graph is functionalised) and feeds it to every
    layer; ``collect`` also reads every layer's output (the stubs then do not form a pure chain)."""

    def __init__(self, d: int = 8, layers: int = 5, collect: bool = False):
        super().__init__()
        self.collect = collect
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList([PairLayer(d) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, 0] = True
        h = self.inp(x)
        aux = h.sum(-1, keepdim=True)
        seen = []
        for layer in self.layers:
            h, aux = layer(h, aux, mask)
            if self.collect:
                seen.append(h.sum())
        return h.pow(2).mean() + aux.mean() + (torch.stack(seen).mean() if seen else 0.0)


def _tokens(vocab: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, vocab, (b, n + 1), generator=torch.Generator().manual_seed(0))
    return seq[:, :-1], seq[:, 1:]


def transformer(layers: int):
    def make():
        ex = load_example("transformer_lm")
        tokens, targets, padding = next(ex.batches(1, 4, 8, 64, 0))
        return ex.TransformerLM(vocab=64, d_model=16, heads=2, layers=layers, seq_len=8), \
            ((tokens, targets), {"padding": padding})
    return make


MODELS = {
    "transformer_2": transformer(2),
    "transformer_5": transformer(5),
    "widening": lambda: (Widening(), ((torch.randn(6, 8), torch.randint(0, 3, (6,))), {})),
    "shared_norm_tied": lambda: (SharedNormStack(), (_tokens(24, 4, 6), {})),
    "called_differently": lambda: (CalledDifferently(), ((torch.randn(5, 8),), {})),
    "batch_norm_stack": lambda: (BatchNormStack(), ((torch.randn(5, 8),), {})),
    "in_place_parent": lambda: (InPlaceParentStack(), ((torch.randn(5, 8),), {})),
    "in_place_parent_collecting": lambda: (InPlaceParentStack(collect=True), ((torch.randn(5, 8),), {})),
    **{f"zoo_{name}": make for name, make in ZOO.items()},
}
# what the fast path must do with each (the rest have no run of identical layers)
REUSED = {"transformer_2", "transformer_5", "in_place_parent", "in_place_parent_collecting", "widening", "shared_norm_tied", "zoo_tied_weights", "zoo_example_transformer",
          "zoo_example_mlp", "zoo_example_cnn"}


def describe(bg) -> dict:
    """Everything of a blocked capture that must not depend on how it was captured (node names aside)."""
    c = bg.captured
    nodes = list(c.graph.nodes)
    producer = bg.value_producer

    def paths(n):
        return [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()]

    def source(a):  # a parameter shared under several names may be read through any of its placeholders
        return c.param_names.get(a.name) or nodes.index(a)

    return {
        "hash": graph_hash(bg),
        "ops": [(n.op, str(n.target), paths(n)) for n in nodes],
        "wiring": [[source(a) for a in n.all_input_nodes] for n in nodes],
        "blocks": [(b.name, b.module_type, b.signature, b.cls, b.params, [producer[v] for v in b.inputs],
                    len(b.outputs), [str(c.node(n).target) for n in b.owned], len(b.floating),
                    [buf for _, buf in b.buffer_updates]) for b in bg.blocks],
        "params": [c.param_names[n.name] for n in nodes if n.name in c.param_names],
        "inputs": [(i.path, i.is_tensor, i.batch_dim, repr(i.constant)) for i in c.inputs],
        "misc": (c.batch_size, c.dynamic_batch, str(c.batch_symbol), c.aliases, sorted(c.buffer_mutations.values()),
                 bg.depth),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_same_graph_both_ways(name):
    torch.manual_seed(0)
    model, (args, kwargs) = MODELS[name]()
    whole = build_blocks(capture(model, args, kwargs, reuse_layers=False))
    reused = build_blocks(capture(model, args, kwargs, reuse_layers=True))
    assert whole.captured.method == "whole model"
    assert reused.captured.method == ("reused layers" if name in REUSED else "whole model")
    a, b = describe(whole), describe(reused)
    for key in a:
        assert a[key] == b[key], f"{name}: {key} differs between the two capture paths"


@pytest.mark.parametrize("name", ["transformer_5", "widening", "shared_norm_tied"])
def test_stages_of_reused_graph_compute_the_same(name):
    """Two-stage modules from either graph: bitwise equal loss and gradients (dropout included: the
    same ops in the same order draw the same masks)."""
    torch.manual_seed(0)
    model, (args, kwargs) = MODELS[name]()
    results = []
    for reuse in (False, True):
        copy_ = copy.deepcopy(model)
        captured = capture(copy_, args, kwargs, reuse_layers=reuse)
        bg = build_blocks(captured)
        half = len(bg.blocks) // 2
        stages = build_stages(bg, [0] * half + [1] * (len(bg.blocks) - half))
        torch.manual_seed(1)
        loss = run_stages(stages, captured, args, kwargs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in copy_.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), f"gradient of {n} differs"


def _graph_text(captured) -> list[tuple]:
    """Every node of a captured graph: op, target, wiring, value shape, module path (not its name:
    the decomposition's name counters also count the sizes the left-out stubs computed)."""
    index = {n: i for i, n in enumerate(captured.graph.nodes)}
    out = []
    for n in captured.graph.nodes:
        val = n.meta.get("val")
        stack = n.meta.get("nn_module_stack") or {}
        out.append((n.op, str(n.target), str(torch.fx.node.map_arg((n.args, n.kwargs), lambda a: index[a])),
                    str((val.shape, val.stride(), val.dtype, val.requires_grad)) if isinstance(val, torch.Tensor)
                    else str(val), [p for p, _ in stack.values()]))
    return out


@pytest.mark.parametrize("name,collapses", [("transformer_5", True), ("in_place_parent", True),
                                            ("in_place_parent_collecting", False), ("transformer_2", False)])
def test_decomposition_leaving_out_ghost_stubs_gives_the_plain_one(name, collapses, monkeypatch):
    """Functionalising with stubs 2.. of a run left out (reuse.decompose_collapsing_stubs) gives node
    for node the graph of ``run_decompositions`` on the whole stubbed program, and the same hash;
    a run whose stubs the parent also reads, or with one stub, is decomposed as it is."""
    from rannc_cli.graph import reuse

    torch.manual_seed(0)
    model, (args, kwargs) = MODELS[name]()
    plans = []
    collapse = reuse._collapse_chain
    monkeypatch.setattr(reuse, "_collapse_chain", lambda graph, run: plans.append(collapse(graph, run)) or plans[-1])
    fast = capture(model, args, kwargs, reuse_layers=True)
    monkeypatch.setattr(reuse, "decompose_collapsing_stubs", lambda program, runs: program.run_decompositions({}))
    plain = capture(model, args, kwargs, reuse_layers=True)
    assert fast.method == plain.method == "reused layers"
    assert plans and any(p is not None for p in plans) == collapses
    assert _graph_text(fast) == _graph_text(plain)
    assert graph_hash(build_blocks(fast)) == graph_hash(build_blocks(plain))


def test_runs_group_only_identical_siblings():
    runs = find_runs(Widening())
    assert [(r.container, r.members) for r in runs] == [
        ("layers", ["layers.0", "layers.1", "layers.2"]), ("layers", ["layers.3", "layers.4"])]
    hooked = Widening()
    hooked.layers[1].register_forward_hook(lambda m, a, out: out)
    assert [r.members for r in find_runs(hooked)] == [["layers.3", "layers.4"]]


def test_runtime_trains_the_same_with_either_capture(tmp_path):
    """`rannc run --nproc 2`, 2 stages: losses over 5 steps and final parameters equal bit for bit."""
    cases = [{"id": f"{m}_2stages", "model": m, "options": {"plan": {"replicas": [1, 1], "microbatches": 2,
                                                                     "schedule": "1f1b", "checkpoint": False}}}
             for m in ("example_transformer", "tied_weights")]
    outs = {}
    for reuse in ("0", "1"):
        work = tmp_path / f"reuse{reuse}"
        work.mkdir()
        (work / "cases.json").write_text(json.dumps(cases))
        env = {**os.environ, "RANNC_RUNTIME_TIMEOUT": "60", "RANNC_CAPTURE_REUSE_LAYERS": reuse}
        proc = subprocess.run([sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", "2",
                               str(ROOT / "tests" / "runtime_worker.py"), "--", "--cases", str(work / "cases.json"),
                               "--out", str(work / "out")], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outs[reuse] = work / "out"
    for case in cases:
        whole, reused = (load_result(outs[r] / f"{case['id']}.pt") for r in ("0", "1"))
        assert whole["losses"] == reused["losses"], case["id"]
        assert len(whole["losses"]) >= 3
        for key, value in whole["state"].items():
            assert torch.equal(value, reused["state"][key]), f"{case['id']}: {key} differs"


def test_block_stages_are_those_of_build_stages():
    """The profiler builds stage modules for one block per class only; they equal build_stages' ones."""
    torch.manual_seed(0)
    model, (args, kwargs) = MODELS["shared_norm_tied"]()
    bg = build_blocks(capture(model, args, kwargs))
    every = build_stages(bg, list(range(len(bg.blocks))))
    some = build_block_stages(bg, [members[0] for members in bg.classes])
    assert len(some) == len(bg.classes) < len(bg.blocks)
    for b, stage in some.items():
        assert (stage.input_names, stage.output_names, stage.graph_module.code) == \
            (every[b].input_names, every[b].output_names, every[b].graph_module.code)
