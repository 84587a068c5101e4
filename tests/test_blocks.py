"""Atomic blocks: grouping, floating ops, and deduplication of identical layers."""

from __future__ import annotations

import torch

from conftest import load_example
from rannc_cli.graph.blocks import build_blocks
from rannc_cli.graph.capture import capture
from zoo import ZOO


def _transformer(layers: int):
    ex = load_example("transformer_lm")
    torch.manual_seed(0)
    model = ex.TransformerLM(vocab=64, d_model=16, heads=2, layers=layers, seq_len=8)
    tokens, targets, padding = next(ex.batches(1, 4, 8, 64, 0))
    return capture(model, (tokens, targets), {"padding": padding})


def test_48_layer_transformer_has_about_one_layer_of_distinct_blocks():
    bg = build_blocks(_transformer(48))
    per_layer = [b for b in bg.blocks if b.name == "encoder.layers.7" or b.name.startswith("encoder.layers.7.")]
    assert len(bg.blocks) > 48 * len(per_layer) * 0.9
    # one layer's blocks, plus embeddings/head/loss and the first layer (it owns the shared symbolic sizes)
    assert len(bg.classes) <= 2 * len(per_layer) + 6, (len(bg.classes), len(per_layer))
    layer_classes = {b.cls for b in bg.blocks if b.name.startswith("encoder.layers.") and not
                     b.name.startswith("encoder.layers.0")}
    assert layer_classes == {b.cls for b in per_layer}  # layers 1..47 are all made of layer 7's classes


def test_blocks_are_in_topological_order_and_cover_every_op_once():
    for name, make in ZOO.items():
        torch.manual_seed(0)
        model, (args, kwargs) = make()
        c = capture(model, args, kwargs)
        bg = build_blocks(c)
        owned = [n for b in bg.blocks for n in b.owned]
        assert len(owned) == len(set(owned)), name
        ops = {n.name for n in c.graph.nodes if n.op == "call_function"}
        assert ops == set(owned) | bg.floating, name
        for b in bg.blocks:
            for v in b.inputs:
                p = bg.value_producer[v]
                assert p is None or p < b.id, (name, b.id, v)


def test_parameter_only_ops_are_copied_not_sent():
    torch.manual_seed(0)
    model, (args, kwargs) = ZOO["example_transformer"]()
    bg = build_blocks(capture(model, args, kwargs))
    assert bg.floating, "arange/alias of the causal mask should float"
    for b in bg.blocks:
        for v in b.inputs:
            assert v not in bg.floating
    users = [b.id for b in bg.blocks if any(f.startswith("alias") for f in b.floating)]
    assert len(users) >= 3  # every attention block copies the causal-mask alias


def test_block_target_controls_granularity():
    c = _transformer(4)
    coarse = build_blocks(c, target=4)
    fine = build_blocks(c, target=64)
    assert len(coarse.blocks) < len(fine.blocks)
    assert coarse.depth < fine.depth


def test_first_layer_is_not_deduplicated_with_identical_later_layers():
    """Same shapes, but the first Linear's input needs no gradient: its backward skips a matmul,
    so it must not stand in for the later layers (that made profiles underestimate backward)."""
    ex = load_example("mlp")
    torch.manual_seed(0)
    model = ex.MLP(d_in=32, hidden=32, layers=4)
    x, y = next(ex.batches(1, 8, 32, 10, 0))
    bg = build_blocks(capture(model, (x, y), {}))
    first = next(b for b in bg.blocks if b.name == "layers.0.0")
    later = [b for b in bg.blocks if b.name in ("layers.1.0", "layers.2.0", "layers.3.0")]
    assert len({b.cls for b in later}) == 1
    assert first.cls != later[0].cls
