"""The topology file: round trip, validation, the planner's contract keys."""

from __future__ import annotations

import pytest
import yaml

from rannc_cli.errors import RanncError
from rannc_cli.topology.fingerprint import cluster_fingerprint
from rannc_cli.topology.format import LINK_KINDS, Link, Node, Topology


def _topo() -> Topology:
    nodes = [{"name": f"n{i}", "gpus": 4, "gpu_model": "NVIDIA V100-SXM2-16GB", "gpu_memory_bytes": 16 << 30,
              "cpus": 40, "memory_bytes": 256 << 30, "partitions": ["gpu"]} for i in (1, 2)]
    links = {"intra_node": {"bandwidth": 1.5e11, "latency": 5e-6, "source": "config"},
             "inter_node": {"bandwidth": 1.2e10, "latency": 3e-6, "source": "measured"}}
    return Topology(nodes=nodes, links=links, scheduler="slurm")


def test_round_trip_keeps_contract_keys(tmp_path):
    topo = _topo()
    path = topo.save(tmp_path / "t.yaml")
    raw = yaml.safe_load(path.read_text())
    assert raw["format"] == "rannc-topology" and raw["version"] == 1
    assert raw["fingerprint"] == cluster_fingerprint(raw["nodes"])
    assert set(LINK_KINDS) <= set(raw["links"])
    for link in raw["links"].values():
        assert set(link) >= {"bandwidth", "latency", "source"}
    assert raw["links"]["allreduce_inter"]["source"] == "default"     # filled in
    back = Topology.load(path)
    assert back.to_dict() == topo.to_dict()
    assert back.nodes[1]["name"] == "n2" and back.nodes[1].gpus == 4
    assert back.links["inter_node"].bandwidth == 1.2e10
    assert back.links["inter_node"].seconds(1.2e10) == pytest.approx(1.0 + 3e-6)
    assert not list(tmp_path.glob(".*tmp"))   # atomic write left no temporary


def test_groups_and_fingerprint_ignore_names():
    a, b = _topo(), _topo()
    b.nodes[0]["name"] = "other"
    b.nodes[0]["cpus"] = 80
    assert a.refresh_fingerprint() == b.refresh_fingerprint()
    assert [len(g) for _, g in a.groups()] == [2]
    assert [len(g) for _, g in b.groups()] == [1, 1]
    b.nodes[0]["gpus"] = 8
    assert a.refresh_fingerprint() != b.refresh_fingerprint()
    assert a.total_gpus == 8


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="rannc-profile"), "is not a rannc topology file (format: 'rannc-profile'"),
    (lambda d: d.update(version=2), "has topology format version 2; this rannc reads version 1"),
    (lambda d: d.update(nodes=[]), "has no nodes"),
    (lambda d: d["nodes"][0].update(gpus=-1), "node n1: gpus must be a whole number >= 0"),
    (lambda d: d["nodes"][0].pop("name"), "nodes[0] has no name"),
    (lambda d: d["links"]["inter_node"].update(bandwidth=0), "links.inter_node.bandwidth must be a positive"),
    (lambda d: d["links"]["inter_node"].update(source="guessed"), "links.inter_node.source must be one of"),
    (lambda d: d["nodes"][0].update(gpus=8), "does not match its nodes"),
])
def test_bad_files_are_refused_with_one_line(tmp_path, mutate, message):
    data = _topo().to_dict()
    mutate(data)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RanncError) as err:
        Topology.load(path)
    assert message in err.value.one_line()
    assert "\n" not in err.value.one_line()


def test_edited_nodes_accepted_without_fingerprint(tmp_path):
    data = _topo().to_dict()
    data["nodes"][0]["gpus"] = 8
    del data["fingerprint"]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    assert Topology.load(path).fingerprint == cluster_fingerprint(data["nodes"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(RanncError, match="does not exist"):
        Topology.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("nodes: [\n")
    with pytest.raises(RanncError, match="is not valid YAML"):
        Topology.load(tmp_path / "bad.yaml")


def test_node_and_link_defaults():
    n = Node(name="x")
    assert (n.gpus, n.gpu_model, n.gpu_memory_bytes, n.cpus, n.memory_bytes) == (0, "", 0, 0, 0)
    with pytest.raises(AttributeError):
        n.nonexistent  # noqa: B018
    assert Link(bandwidth=1e9, latency=0.0, source="default").seconds(1e9) == 1.0
