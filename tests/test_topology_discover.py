"""`rannc topology` on this machine, from site configs, and the rules that merge facts."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import run_cli
from rannc_cli.errors import RanncError
from rannc_cli.topology import nvml
from rannc_cli.topology.discover import discovered_links
from rannc_cli.topology.format import Node, Topology
from rannc_cli.topology.site import apply_site, available_sites, load_site

SITES = ["reedbush-h", "tsubame-4.0", "abci-3.0", "wisteria-aquarius", "miyabi-g", "pegasus", "generic-slurm-gpu", "local"]


def _topology(tmp_path, *args, env=None):
    out = tmp_path / "topo.yaml"
    res = run_cli("topology", "--out", str(out), *args, env=env, timeout=300)
    return res, (yaml.safe_load(out.read_text()) if out.exists() else None)


# ------------------------------------------------------------------ this machine
def test_local_discovery_works_without_nvml_or_with_it(tmp_path):
    gpus, pairs, status = nvml.probe()
    res, topo = _topology(tmp_path, "--scheduler", "local")
    assert res.returncode == 0, res.stderr
    (node,) = topo["nodes"]
    assert node["cpus"] == os.cpu_count() and node["memory_bytes"] > 0
    assert topo["discovery"]["nvml"] == status
    if status.startswith("unavailable"):        # the CPU-only case (no driver / no library): no crash, no GPUs
        assert node["gpus"] == 0 and node["gpu_model"] == "" and "gpu_devices" not in node
        assert "GPU probe: unavailable" in res.stdout
    else:
        assert node["gpus"] == len(gpus) and node["gpu_memory_bytes"] > 0
    assert Topology.load(tmp_path / "topo.yaml").fingerprint == topo["fingerprint"]


def test_nvml_probe_without_library_is_a_status_not_a_crash(monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert nvml.probe() == ([], {}, "unavailable: NVML Shared Library Not Found")


def test_local_measure_stores_measured_links(tmp_path):
    res, topo = _topology(tmp_path, "--scheduler", "local", "--measure")
    assert res.returncode == 0, res.stderr
    for kind in ("intra_node", "allreduce_intra"):
        link = topo["links"][kind]
        assert link["source"] == "measured" and link["bandwidth"] > 1e6 and 0 < link["latency"] < 0.1
    assert topo["links"]["inter_node"]["source"] == "default"        # one node: nothing to measure between nodes
    m = topo["measurement"]
    assert (m["how"], m["nodes"], m["processes_per_node"]) == ("local", 1, 2)
    assert m["raw"]["intra_node"]["seconds"] > 0


def test_json_output_is_the_file(tmp_path):
    import json

    res, topo = _topology(tmp_path, "--scheduler", "local", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == topo


# ------------------------------------------------------------------ site configs
@pytest.mark.parametrize("name", SITES)
def test_bundled_site_configs_are_complete(name):
    site = load_site(name)
    raw = site.raw
    assert raw["source"] and raw["name"] == name and "uncertain" in raw
    assert name in available_sites()
    if name == "local":
        assert site.scheduler == "local"
        return
    (group,) = site.groups
    assert group["gpus"] > 0 and group["gpu_model"] and group["gpu_memory_bytes"] >= 16 << 30
    assert group["cpus"] > 0 and group["memory_bytes"] > 0 and group["interconnect"]
    links = site.links()
    assert set(links) == {"intra_node", "inter_node", "allreduce_intra", "allreduce_inter"}
    assert all(link.source == "config" and link.bandwidth > 1e9 for link in links.values())
    assert site.supported == (site.scheduler in ("slurm", "pbs")), "unsupported schedulers must be named as such"


def test_site_facts_from_public_docs():
    assert load_site("reedbush-h").groups[0]["gpus"] == 2
    assert load_site("tsubame-4.0").groups[0]["gpus"] == 4 and not load_site("tsubame-4.0").supported
    assert load_site("abci-3.0").groups[0]["gpus"] == 8 and load_site("abci-3.0").scheduler == "pbs"
    assert load_site("wisteria-aquarius").groups[0]["gpu_memory_bytes"] == 40 << 30
    assert load_site("wisteria-aquarius").scheduler == "pjm"


def test_topology_from_a_site_config_feeds_the_planner(tmp_path):
    res, topo = _topology(tmp_path, "--site", "abci-3.0", "--nodes", "2")
    assert res.returncode == 0, res.stderr
    assert topo["discovery"]["method"] == "site" and topo["site"] == "abci-3.0"
    assert len(topo["nodes"]) == 2 and all(n["gpus"] == 8 for n in topo["nodes"])
    assert all(set(n["sources"].values()) == {"config"} for n in topo["nodes"])
    assert "8 x NVIDIA H200*" in res.stdout and "from the site config" in res.stdout
    from rannc_cli.planner.cluster import ClusterSpec

    spec = ClusterSpec.from_topology(tmp_path / "topo.yaml")
    assert (spec.nodes, spec.gpus_per_node, spec.gpu_model) == (2, 8, "NVIDIA H200")
    assert spec.links["inter_node"].bandwidth == 200e9


def test_unsupported_scheduler_site_is_described_not_driven(tmp_path):
    res, topo = _topology(tmp_path, "--site", "tsubame-4.0", "-N", "1")
    assert res.returncode == 0, res.stderr
    assert topo["scheduler"] == "sge" and topo["discovery"]["method"] == "site"
    assert any("rannc topology cannot query" in n for n in topo["notes"])


def test_site_local_discovers_this_machine(tmp_path):
    res, topo = _topology(tmp_path, "--site", "local")
    assert res.returncode == 0, res.stderr
    assert topo["discovery"]["method"] == "local" and topo["nodes"][0]["cpus"] == os.cpu_count()


@pytest.mark.parametrize("args, message", [
    (("--site", "nowhere"), "error: unknown site 'nowhere'; known sites: abci-3.0"),
    (("--scheduler", "lsf"), "error: --scheduler 'lsf' is not one of slurm, pbs, local"),
    (("--site", "abci-3.0", "--partition", "nosuchqueue"), "has no node group serving queue 'nosuchqueue'"),
    (("--scheduler", "pbs", "--site", "abci-3.0", "-N", "1"), "error: `pbsnodes -a` failed on local"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    res, _ = _topology(tmp_path, *args)
    assert res.returncode == 2, res.stdout
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_site_file(tmp_path):
    bad = tmp_path / "mysite.yaml"
    bad.write_text("scheduler: slurm\nnode_groups:\n  - {name: g, gpus: four}\n")
    res, _ = _topology(tmp_path, "--site", str(bad))
    assert res.returncode == 2 and "node group g: gpus must be a whole number" in res.stderr
    bad.write_text("scheduler: slurm\nnode_groups: [{name: g}]\nlinks: {inter_node: {bandwidth: 25e9, latency: 1e-5}}\n")
    with pytest.raises(RanncError, match="numeric bandwidth"):      # YAML 1.1 reads 25e9 as text
        load_site(str(bad))


def test_measure_through_pbs_is_refused_clearly():
    from rannc_cli.topology.measure import measure

    topo = Topology(nodes=[{"name": "a", "gpus": 4}], scheduler="pbs", discovery={"method": "pbs", "host": "local"})
    with pytest.raises(RanncError, match="--measure through pbs is not supported yet"):
        measure(topo)


# ------------------------------------------------------------------ merge rules
def test_gres_type_hint_takes_the_config_model_when_they_agree():
    site = load_site("generic-slurm-gpu")
    nodes = [Node(name="a", gpus=4, gpu_model="a100", gpu_types={"a100": 4}, cpus=8, partitions=["gpu"]),
             Node(name="b", gpus=4, gpu_model="v100", gpu_types={"v100": 4}, cpus=8, partitions=["gpu"]),
             Node(name="c", gpus=0, cpus=48, memory_bytes=1 << 30, partitions=["cpu"])]
    notes: list[str] = []
    apply_site(site, nodes, notes)
    a, b, c = nodes
    assert (a.gpu_model, a.sources["gpu_model"], a.gpu_memory_bytes) == ("NVIDIA A100-SXM4-80GB", "config", 80 << 30)
    assert a.cpus == 8 and a.sources["cpus"] == "discovered" and a.sources["memory_bytes"] == "config"
    assert b.gpu_model == "v100" and any("GPU type 'v100'" in n for n in notes)
    assert c.gpus == 0 and c.gpu_model == "" and c.gpu_memory_bytes == 0      # a CPU node stays a CPU node
    assert c.memory_bytes == 1 << 30 and c.sources["memory_bytes"] == "discovered"


def test_discovered_links_from_hardware():
    node = Node(name="x", gpus=2, gpu_pairs={"0-1": "NV2"},
                gpu_devices=[{"index": 0, "compute_capability": "6.0"}, {"index": 1, "compute_capability": "6.0"}],
                nics=[{"name": "mlx5_0", "state": "ACTIVE", "rate_bytes": 12.5e9},
                      {"name": "mlx5_1", "state": "ACTIVE", "rate_bytes": 12.5e9},
                      {"name": "mlx5_2", "state": "DOWN", "rate_bytes": 12.5e9}])
    links = discovered_links(node)
    assert links["intra_node"].bandwidth == 40e9 and links["intra_node"].source == "discovered"
    assert links["inter_node"].bandwidth == 25e9
    node["gpu_pairs"] = {"0-1": "PHB"}
    assert "intra_node" not in discovered_links(node)


# ------------------------------------------------------------------ NVML logic (no GPU here: a stand-in library)
class _FakeNVML:
    """Stands in for pynvml (no GPU or driver exists on the CI machine): 4 GPUs, either wired
    pairwise by NVLink (0-1 and 2-3, 2 links each) or all through NVSwitches (``switch=True``)."""

    NVML_NVLINK_MAX_LINKS = 6
    NVML_FEATURE_ENABLED = 1

    def __init__(self, switch: bool):
        self.switch = switch
        self.bus = [f"00000000:{b}:00.0" for b in ("07", "0F", "47", "4E")]

    class _Obj:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return "NVIDIA A100-SXM4-40GB"

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._Obj(total=40 << 30)

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (8, 0)

    def nvmlDeviceGetPciInfo(self, h):
        return self._Obj(busId=self.bus[h])

    def nvmlDeviceGetNvLinkState(self, h, link):
        if not self.switch and link >= 2:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        if self.switch:
            return self._Obj(busId=f"00000000:C{link}:00.0")        # an NVSwitch, not a GPU
        return self._Obj(busId=self.bus[h ^ 1].lower().replace("00000000", "0000"))

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return 40 if a // 2 == b // 2 else 50


def test_nvml_pairwise_nvlink_and_common_ancestors():
    gpus, pairs, status = nvml._probe(_FakeNVML(switch=False))
    assert status == "ok" and len(gpus) == 4
    assert gpus[0]["compute_capability"] == "8.0" and gpus[0]["memory_bytes"] == 40 << 30
    assert gpus[0]["nvlinks"] == {1: 2} and gpus[3]["nvlinks"] == {2: 2}
    assert pairs == {"0-1": "NV2", "2-3": "NV2", "0-2": "SYS", "0-3": "SYS", "1-2": "SYS", "1-3": "SYS"}


def test_nvml_nvswitch_counts_as_nvlink_between_every_pair():
    gpus, pairs, _ = nvml._probe(_FakeNVML(switch=True))
    assert all(g["nvswitch_links"] == 6 for g in gpus) and set(pairs.values()) == {"NV6"} and len(pairs) == 6
    node = Node(name="x", gpus=4, gpu_pairs=pairs, gpu_devices=gpus)
    assert discovered_links(node)["intra_node"].bandwidth == 6 * 25e9


# ------------------------------------------------------------------ PBS end to end (no PBS server exists here:
# a `pbsnodes` on PATH prints the recorded outputs of tests/data/topology/pbs/; everything else is real)
DATA = os.path.join(os.path.dirname(__file__), "data", "topology", "pbs")


def _fake_pbsnodes(tmp_path, text_file: str, json_file: str | None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    json_branch = f'cat "{DATA}/{json_file}"' if json_file else 'echo "pbsnodes: invalid option -- \'F\'" >&2; exit 2'
    script = bin_dir / "pbsnodes"
    script.write_text(f'#!/bin/sh\ncase "$*" in *"-F json"*) {json_branch} ;; *) cat "{DATA}/{text_file}" ;; esac\n')
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_pbs_json_form_with_allocation_and_site(tmp_path):
    env = _fake_pbsnodes(tmp_path, "pbspro-19.1-gpu-vnodes.txt", "openpbs-2022.1-gpu.json")
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x1000c0s1b0n0.hsn.cluster.example\n" * 4 + "x1000c0s1b1n0.hsn.cluster.example\n" * 4)
    env["PBS_NODEFILE"] = str(nodefile)
    res, topo = _topology(tmp_path, "--site", "generic-slurm-gpu", "--scheduler", "pbs", env=env)
    assert res.returncode == 0, res.stderr
    assert topo["scheduler"] == "pbs" and topo["allocation"] == ["x1000c0s1b0n0", "x1000c0s1b1n0"]
    assert [n["name"] for n in topo["nodes"]] == ["x1000c0s1b0n0", "x1000c0s1b1n0"]
    assert topo["nodes"][0]["gpu_model"] == "A100" and topo["nodes"][0]["sources"]["gpu_model"] == "discovered"
    assert any("GPU 'A100' found, site generic-slurm-gpu says" in n for n in topo["notes"])


def test_pbs_text_form_auto_detected_with_queue_filter(tmp_path):
    env = _fake_pbsnodes(tmp_path, "pbspro-19.1-gpu-vnodes.txt", None)      # an old PBS without -F json
    res, topo = _topology(tmp_path, "--partition", "gpu_long", env=env)
    assert res.returncode == 0, res.stderr
    assert topo["scheduler"] == "pbs"
    assert [n["name"] for n in topo["nodes"]] == ["gpu0001", "gpu0002"]
    assert [n["name"] for n in topo["unavailable_nodes"]] == ["gpu0003", "gpu0004"]
    assert "GPU 2 ECC errors" in res.stdout
    res, _ = _topology(tmp_path, "--partition", "nosuch", env=env)
    assert res.returncode == 2 and "no node of local lists queue 'nosuch'" in res.stderr
