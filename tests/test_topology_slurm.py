"""`rannc topology` against the real Slurm testbed (tests/testbed/slurm.py): discovery, states, --measure."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from rannc_cli.topology import slurm
from rannc_cli.topology.fingerprint import cluster_fingerprint

pytestmark = pytest.mark.slurm


def _topology(cluster, tmp_path, *args: str, prefix: tuple[str, ...] = (), timeout: float = 300):
    out = tmp_path / "topo.yaml"
    if prefix:   # run inside a Slurm allocation (salloc ... python -m rannc_cli.cli ...)
        import subprocess
        import sys

        res = subprocess.run([*prefix, sys.executable, "-m", "rannc_cli.cli", "topology", "--out", str(out), *args],
                             env=cluster.env, capture_output=True, text=True, timeout=timeout)
    else:
        res = run_cli("topology", "--out", str(out), *args, env=cluster.env, timeout=timeout)
    assert res.returncode == 0, res.stderr + cluster.logs()[-2000:]
    return res, yaml.safe_load(out.read_text())


def test_discovery_matches_the_testbed(slurm_cluster, tmp_path):
    res, topo = _topology(slurm_cluster, tmp_path, "--json")
    assert json.loads(res.stdout)["fingerprint"] == topo["fingerprint"]
    assert topo["scheduler"] == "slurm" and topo["discovery"]["method"] == "slurm"
    by = {n["name"]: n for n in topo["nodes"]}
    assert set(by) == set(slurm_cluster.nodes)
    for name, spec in slurm_cluster.nodes.items():
        assert by[name]["gpus"] == spec.gpus
        assert by[name]["gpu_types"] == {spec.gpu_type: spec.gpus}
        assert by[name]["partitions"] == [spec.partition]
        assert by[name]["state"] == "idle" and by[name]["available"] is True
        assert by[name]["memory_bytes"] == 1000 << 20 and by[name]["cpus"] >= 1
    parts = {p["name"]: p for p in topo["partitions"]}
    assert {k: sorted(v["nodes"]) for k, v in parts.items()} == {k: sorted(v) for k, v in slurm_cluster.partitions.items()}
    assert parts["gpu"]["default"] is True
    assert topo["fingerprint"] == cluster_fingerprint(topo["nodes"])
    assert topo["allocation"] is None


def test_auto_detects_slurm_and_prints_a_table(slurm_cluster, tmp_path):
    res, topo = _topology(slurm_cluster, tmp_path, "--partition", "gpu")
    assert topo["scheduler"] == "slurm"
    assert [n["name"] for n in topo["nodes"]] == ["n1", "n2"]
    assert "n[1-2]" in res.stdout and "4 x a100" in res.stdout and "wrote" in res.stdout


def test_drained_node_is_shown_but_not_planned_for(slurm_cluster, tmp_path):
    slurm_cluster.run("scontrol", "update", "nodename=n3", "state=drain", "reason=fan failure", check=True)
    try:
        res, topo = _topology(slurm_cluster, tmp_path)
    finally:
        slurm_cluster.run("scontrol", "update", "nodename=n3", "state=resume", check=True)
    assert [n["name"] for n in topo["nodes"]] == ["n1", "n2"]
    (n3,) = topo["unavailable_nodes"]
    assert n3["name"] == "n3" and "drain" in n3["state"] and n3["reason"].startswith("fan failure")
    assert "n3" in res.stdout and "not used" in res.stdout


def test_live_output_parses_like_the_recording(slurm_cluster):
    live = slurm.parse_scontrol_nodes(slurm_cluster.run(*slurm.SCONTROL_NODES_ARGV, check=True).stdout)
    assert [(n["name"], n["gpus"], n["gpu_types"]) for n in live] == \
        [(k, s.gpus, {s.gpu_type: s.gpus}) for k, s in slurm_cluster.nodes.items()]


def test_hostlist_expansion_matches_scontrol(slurm_cluster):
    from rannc_cli.topology.hostlist import expand

    for text in ("n[1-3]", "n[1,3]", "gpu[001-003,010],cpu7"):
        real = slurm_cluster.run("scontrol", "show", "hostnames", text, check=True).stdout.split()
        assert expand(text) == real


def test_allocation_inside_a_job(slurm_cluster, tmp_path):
    _, topo = _topology(slurm_cluster, tmp_path, "--scheduler", "slurm",
                        prefix=("salloc", "-N", "2", "-p", "gpu", "--time=5"))
    assert topo["allocation"] == ["n1", "n2"]
    assert [n["name"] for n in topo["nodes"]] == ["n1", "n2"]


def test_site_config_fills_model_and_planner_reads_it(slurm_cluster, tmp_path):
    _, topo = _topology(slurm_cluster, tmp_path, "--partition", "gpu", "--site", "generic-slurm-gpu")
    n1 = topo["nodes"][0]
    assert n1["gpus"] == 4 and n1["sources"]["gpus"] == "discovered"
    assert n1["gpu_model"] == "NVIDIA A100-SXM4-80GB" and n1["sources"]["gpu_model"] == "config"   # gres 'a100' agrees
    assert n1["gpu_memory_bytes"] == 80 << 30 and n1["sources"]["gpu_memory_bytes"] == "config"
    assert n1["memory_bytes"] == 1000 << 20 and n1["sources"]["memory_bytes"] == "discovered"      # discovered wins
    assert topo["links"]["inter_node"]["source"] == "config"
    from rannc_cli.planner.cluster import ClusterSpec

    spec = ClusterSpec.from_topology(tmp_path / "topo.yaml")
    assert (spec.nodes, spec.gpus_per_node, spec.memory_per_gpu) == (2, 4, 80 << 30)
    assert spec.fingerprint == topo["fingerprint"]


@pytest.mark.slow
def test_measure_runs_a_real_two_node_gloo_job(slurm_cluster, tmp_path):
    res, topo = _topology(slurm_cluster, tmp_path, "--partition", "gpu", "--measure", "--measure-procs", "2")
    m = topo["measurement"]
    assert (m["how"], m["backend"], m["nodes"], m["processes_per_node"], m["world"]) == ("srun", "gloo", 2, 2, 4)
    for kind in ("intra_node", "inter_node", "allreduce_intra", "allreduce_inter"):
        link = topo["links"][kind]
        assert link["source"] == "measured", kind
        assert 1e6 < link["bandwidth"] < 1e12 and 0 < link["latency"] < 0.1, (kind, link)
    assert "measured with gloo over 2 node(s) x 2 process(es)" in res.stdout


def test_run_on_a_compute_node_adds_that_nodes_own_facts(slurm_cluster, tmp_path):
    _, topo = _topology(slurm_cluster, tmp_path, "--scheduler", "slurm",
                        prefix=("srun", "-N", "1", "-w", "n2", "-p", "gpu", "--time=5"))
    assert topo["allocation"] == ["n2"]
    (n2,) = topo["nodes"]                       # inside a job: the job's nodes only
    assert topo["discovery"]["nvml"].startswith(("unavailable", "ok"))     # NVML was asked on the node itself
    assert n2["name"] == "n2" and n2["numa_nodes"] >= 1                    # and its sysfs facts were added
    assert n2["gpus"] == 4 and n2["memory_bytes"] == 1000 << 20           # the scheduler's view stays
