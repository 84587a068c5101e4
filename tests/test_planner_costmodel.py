"""Stage costs against hand computations; the analytic profiles; the cluster spec."""

from __future__ import annotations

import random

import pytest

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec, Link, parse_size
from rannc_cli.planner.costmodel import TIE_WEIGHT, CostModel, objective
from rannc_cli.planner.synthetic import bert_profile, hybrid_profile, random_profile, resnet_profile
from rannc_cli.profiler.format import Profile

LINKS = {"intra_node": Link(10e9, 1e-5), "inter_node": Link(1e9, 1e-4),
         "allreduce_intra": Link(5e9, 2e-5), "allreduce_inter": Link(5e8, 2e-4)}


def small():
    prof = bert_profile(layers=4, hidden=256, seq=64, vocab=1000, batch_size=16)
    return prof, CostModel(prof, ClusterSpec(2, 4, 8 << 30, LINKS), memory_margin=0.1, optimizer_state_factor=2.0)


def test_compute_memory_and_p2p_by_hand():
    prof, cm = small()
    sc = cm.stage_cost(1, 3, 2, 4, "inter", "intra", 3, False)
    shard = 2  # ceil(ceil(16 / 4) / 2)
    assert sc.shard == shard
    fwd = sum(prof.block_cost(b, shard).forward_seconds for b in (1, 2))
    bwd = sum(prof.block_cost(b, shard).backward_seconds for b in (1, 2))
    act = sum(prof.block_cost(b, shard).activation_bytes for b in (1, 2))
    peak = max(prof.block_cost(b, shard).peak_bytes for b in (1, 2))
    recv = prof.values["v0"].bytes_at(shard)  # the embedding output; the mask is a user input
    assert sc.compute_forward == pytest.approx(fwd)
    assert sc.p2p_forward == pytest.approx(1e-4 + recv / 1e9)
    assert sc.forward == pytest.approx(fwd + 1e-4 + recv / 1e9)
    assert sc.backward == pytest.approx(bwd + 1e-4 + recv / 1e9)
    params = prof.param_bytes([1, 2])
    assert sc.memory == pytest.approx(params * (1 + 1 + 2.0) + 3 * (act + recv) + peak)
    assert sc.allreduce == pytest.approx(2 * 1 / 2 * params / 5e9 + 2 * 1 * 2e-5)
    assert cm.capacity == pytest.approx(0.9 * (8 << 30))


def test_checkpointing_trades_time_for_memory():
    _, cm = small()
    plain = cm.stage_cost(1, 5, 1, 1, None, "intra", 4, False)
    ck = cm.stage_cost(1, 5, 1, 1, None, "intra", 4, True)
    assert ck.backward > plain.backward and ck.memory < plain.memory


def test_tied_parameters_count_once_per_stage():
    prof, cm = small()
    word = prof.parameters["embeddings.word_embeddings.weight"].bytes
    alone = cm.range_info(0, 1).param_bytes + cm.range_info(len(prof.blocks) - 1, len(prof.blocks)).param_bytes
    both = cm.range_info(0, len(prof.blocks)).param_bytes - sum(cm.range_info(b, b + 1).param_bytes for b in range(1, len(prof.blocks) - 1))
    assert alone - both == word


def test_allreduce_uses_inter_node_bandwidth_across_nodes():
    _, cm = small()
    intra = cm.stage_cost(1, 3, 4, 1, None, "intra", 1, False).allreduce
    inter = cm.stage_cost(1, 3, 4, 1, None, "inter", 1, False).allreduce
    assert inter > intra > 0
    assert cm.stage_cost(1, 3, 1, 1, None, "inter", 1, False).allreduce == 0


def test_objective_formulas():
    _, cm = small()
    a = cm.stage_cost(0, 2, 1, 4, None, "intra", 2, False)
    b = cm.stage_cost(2, 6, 1, 4, "intra", "intra", 1, False)
    u = [a.total, b.total]
    # 1F1B: stage 0 runs one warm-up forward before its first backward, which overlaps the round trip
    assert objective("1f1b", 4, [a, b]) == pytest.approx(sum(u) + max(3 * u[0] - 1 * a.forward, 3 * u[1]))
    # one microbatch: stages run one after another; TIE_WEIGHT of the bottleneck breaks ties toward balance
    assert objective("1f1b", 1, [a, b]) == pytest.approx(sum(u) + TIE_WEIGHT * max(u))
    assert objective("gpipe", 1, [a, b]) == pytest.approx(
        sum(u) + TIE_WEIGHT * (max(a.forward, b.forward) + max(a.backward, b.backward)))
    assert objective("gpipe", 4, [a, b]) == pytest.approx(sum(u) + 3 * (max(a.forward, b.forward) + max(a.backward, b.backward)))


@pytest.mark.parametrize("make", [lambda: bert_profile(layers=6, hidden=512, batch_size=32),
                                  lambda: resnet_profile(width=2, depths=(1, 2, 3, 1), batch_size=32),
                                  lambda: hybrid_profile(cnn_width=2, layers=4, hidden=512, batch_size=32),
                                  lambda: random_profile(random.Random(7), blocks=8)])
def test_analytic_profiles_are_valid_and_round_trip(make, tmp_path):
    prof = make()
    path = prof.save(tmp_path / "p.yaml")
    again = Profile.load(path)
    assert again.content_hash() == prof.content_hash()
    assert again.totals()["parameter_bytes"] > 0


def test_bert_parameter_count_matches_the_formula():
    prof = bert_profile(layers=96, hidden=2048, batch_size=8)
    params = prof.param_bytes(range(len(prof.blocks)), trainable_only=True) / 4
    h, v, s = 2048, 32000, 512
    expect = 96 * (12 * h * h + 13 * h) + (v + s) * h + 2 * h + h * h + 3 * h + v
    assert params == expect and 4.8e9 < params < 5.0e9


def test_sizes_and_cluster_errors():
    assert parse_size("16GiB") == 16 << 30 and parse_size("40GB") == 40 * 10**9 and parse_size(1024) == 1024
    with pytest.raises(RanncError, match="memory size"):
        parse_size("lots")
    with pytest.raises(RanncError, match="at least one node"):
        ClusterSpec.from_flags(0, 8)
    assert ClusterSpec.from_flags(4, 8).fingerprint == ClusterSpec.from_flags(4, 8).fingerprint
    assert ClusterSpec.from_flags(4, 8).fingerprint != ClusterSpec.from_flags(8, 4).fingerprint


def test_cluster_from_topology_file(tmp_path):
    import yaml

    topo = {"format": "rannc-topology", "version": 1,
            "nodes": [{"name": f"n{i}", "gpus": 4, "gpu_model": "V100", "gpu_memory_bytes": 16 << 30} for i in range(3)],
            "links": {"intra_node": {"bandwidth": 50e9, "latency": 5e-6, "source": "measured"},
                      "inter_node": {"bandwidth": 10e9, "latency": 3e-5, "source": "measured"},
                      "allreduce_intra": {"bandwidth": 40e9, "latency": 1e-5, "source": "measured"},
                      "allreduce_inter": {"bandwidth": 8e9, "latency": 5e-5, "source": "measured"}}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topo))
    spec = ClusterSpec.from_topology(path)
    assert (spec.nodes, spec.gpus_per_node, spec.memory_per_gpu) == (3, 4, 16 << 30)
    assert spec.links["inter_node"].bandwidth == 10e9
    assert ClusterSpec.from_topology(path, nodes=2).nodes == 2
    with pytest.raises(RanncError, match="more nodes"):
        ClusterSpec.from_topology(path, nodes=5)


def test_simulator_reduces_tied_parameters_over_all_their_holders():
    """The word embedding (stage 0) is tied to the decoder (last stage): as in the runtime, its
    gradient is summed over the union of both stages' replicas, the rest within each stage."""
    from rannc_cli.planner.plan import Plan, StagePlan
    from rannc_cli.planner.simulate import simulate

    prof, cm = small()
    n = len(prof.blocks)
    word = float(prof.parameters["embeddings.word_embeddings.weight"].bytes)
    assert cm.has_shared_parameters()
    plan = Plan("1f1b", 2, 16, [StagePlan(0, 3, 2, [(0, 0), (0, 1)]), StagePlan(3, n, 1, [(1, 0)])])
    sim = simulate(plan, cm)
    own0 = cm.range_info(0, 3).trainable_bytes - word
    own1 = cm.range_info(3, n).trainable_bytes - word
    union = cm.allreduce(word, 3, "inter")  # holders on two nodes
    assert sim.costs[0].allreduce == pytest.approx(cm.allreduce(own0, 2, "intra") + union, rel=1e-12)
    assert sim.costs[1].allreduce == pytest.approx(cm.allreduce(own1, 1, "intra") + union, rel=1e-12)
    assert union > 0 and sim.step_seconds == pytest.approx(sim.pipeline_seconds + sim.costs[0].allreduce, rel=1e-12)
    # the search's own objective (what DP and exhaustive agree on) still reduces within stages
    from rannc_cli.planner.plan import stage_costs

    within = stage_costs(plan, cm)
    assert within[1].allreduce == 0
    assert sim.objective_seconds == pytest.approx(objective("1f1b", 2, within), rel=1e-12)
