"""Parsers against recorded outputs (tests/data/topology/README.md says where each comes from)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rannc_cli.errors import RanncError
from rannc_cli.topology import hostlist, nvsmi, pbs, slurm, sysfs

DATA = Path(__file__).parent / "data" / "topology"


def _read(*parts: str) -> str:
    return DATA.joinpath(*parts).read_text()


# ------------------------------------------------------------------ Slurm
def test_slurm_testbed_recording_both_layouts_agree():
    multi = slurm.parse_scontrol_nodes(_read("slurm", "slurm-22.05-testbed-show-node.txt"))
    one = slurm.parse_scontrol_nodes(_read("slurm", "slurm-22.05-testbed-show-node-oneliner.txt"))
    assert multi == one
    by = {n["name"]: n for n in multi}
    assert by["n1"]["gpus"] == 4 and by["n1"]["gpu_types"] == {"a100": 4} and by["n1"]["gpu_model"] == "a100"
    assert by["n3"]["gpu_types"] == {"v100": 2}
    assert by["n1"]["cpus"] == 2 and by["n1"]["memory_bytes"] == 1000 << 20
    assert (by["n1"]["state"], by["n1"]["available"]) == ("idle", True)
    assert (by["n2"]["state"], by["n2"]["available"]) == ("down", False)
    assert (by["n3"]["state"], by["n3"]["available"]) == ("idle+drain", False)
    assert by["n3"]["reason"].startswith("bad fan on gpu1")
    assert by["n1"]["partitions"] == ["gpu"] and by["n3"]["partitions"] == ["small"]
    parts = slurm.parse_sinfo_partitions(_read("slurm", "slurm-22.05-testbed-sinfo.txt"))
    assert parts == [{"name": "gpu", "state": "up", "default": True, "max_time": "infinite", "nodes": ["n1", "n2"]},
                     {"name": "small", "state": "up", "default": False, "max_time": "infinite", "nodes": ["n3"]}]


def test_slurm_23_site_with_typed_mixed_and_cpu_nodes():
    by = {n["name"]: n for n in slurm.parse_scontrol_nodes(_read("slurm", "slurm-23.02-gpu-site-show-node.txt"))}
    assert list(by) == ["gpu001", "gpu002", "gpu101", "cpu001"]
    assert by["gpu001"]["gpus"] == 8 and by["gpu001"]["cpus"] == 128
    assert by["gpu001"]["memory_bytes"] == 1031000 << 20
    assert by["gpu001"]["state"] == "mixed" and by["gpu001"]["available"]
    assert by["gpu001"]["partitions"] == ["gpu", "gpu-long"]
    assert by["gpu001"]["features"] == ["a100", "ib", "el8"]
    assert by["gpu001"]["sockets"] == 2 and by["gpu001"]["threads_per_core"] == 2
    assert by["gpu002"]["state"] == "down*+drain" and not by["gpu002"]["available"]
    assert by["gpu002"]["reason"] == "Not responding [slurm@2023-10-19T22:10:05]"
    assert by["gpu101"]["gpu_types"] == {"v100": 4, "t4": 2} and by["gpu101"]["gpus"] == 6
    assert by["gpu101"]["gpu_model"] == ""          # two models on one node: no single model
    assert by["cpu001"]["gpus"] == 0 and "gpu_types" not in by["cpu001"]
    assert by["cpu001"]["state"] == "allocated" and by["cpu001"]["available"]
    parts = {p["name"]: p for p in slurm.parse_sinfo_partitions(_read("slurm", "slurm-23.02-gpu-site-sinfo.txt"))}
    assert parts["gpu"]["default"] and not parts["gpu-long"]["default"]
    assert parts["gpu"]["nodes"] == ["gpu001", "gpu002"] and parts["gpu-long"]["max_time"] == "7-00:00:00"
    assert parts["maint"]["state"] == "down"


def test_slurm_20_oneliner_untyped_and_powered_down():
    by = {n["name"]: n for n in slurm.parse_scontrol_nodes(_read("slurm", "slurm-20.11-oneliner-show-node.txt"))}
    assert by["tsgpu01"]["gpu_types"] == {"tesla": 2} and by["tsgpu01"]["available"]
    assert by["tsgpu02"]["state"] == "allocated+drain" and not by["tsgpu02"]["available"]
    assert by["tsgpu02"]["reason"] == "reboot after job [root@2022-05-02T10:11:00]"
    assert by["tsgpu03"]["gpus"] == 4 and by["tsgpu03"]["gpu_types"] == {"": 4} and by["tsgpu03"]["gpu_model"] == ""
    assert not by["tsgpu03"]["available"] and by["tsgpu03"]["partitions"] == ["p100", "cloud"]
    assert by["tsgpu01"]["memory_bytes"] == 257000 << 20


def test_slurm_17_not_responding_star():
    by = {n["name"]: n for n in slurm.parse_scontrol_nodes(_read("slurm", "slurm-17.11-show-node.txt"))}
    assert by["node-gpu-07"]["gpus"] == 4 and by["node-gpu-07"]["available"]
    assert by["node-gpu-08"]["state"] == "idle*" and not by["node-gpu-08"]["available"]


@pytest.mark.parametrize("gres, expected", [
    ("gpu:4", {"": 4}),
    ("gpu:a100:8(S:0-1)", {"a100": 8}),
    ("gpu:v100:4(S:0-1),gpu:t4:2(S:1)", {"v100": 4, "t4": 2}),
    ("gpu:h100:4(S:0-3),shard:h100:32", {"h100": 4}),
    ("mps:100", {}),
    ("(null)", {}),
    ("gpu:tesla_v100-sxm2-16gb:4", {"tesla_v100-sxm2-16gb": 4}),
])
def test_gres_strings(gres, expected):
    assert slurm.parse_gres(gres) == expected


def test_key_values_keep_spaces_in_values():
    kv = slurm.parse_key_values("NodeName=a OS=Linux 5.4 #1 SMP State=IDLE Reason=fan broken [root@x]")
    assert kv == {"NodeName": "a", "OS": "Linux 5.4 #1 SMP", "State": "IDLE", "Reason": "fan broken [root@x]"}


# ------------------------------------------------------------------ host lists
@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[001-003,010],cpu7", ["gpu001", "gpu002", "gpu003", "gpu010", "cpu7"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("x1000c0s1b0n0,x1000c0s1b1n0", ["x1000c0s1b0n0", "x1000c0s1b1n0"]),
])
def test_hostlist_expand(text, hosts):
    assert hostlist.expand(text) == hosts


def test_hostlist_compress_round_trips():
    for hosts in (["n1", "n2", "n3", "n7"], ["gpu001", "gpu002", "gpu010", "login"], ["a"]):
        assert hostlist.expand(hostlist.compress(hosts)) == hosts
    assert hostlist.compress(["n1", "n2", "n3"]) == "n[1-3]"
    with pytest.raises(RanncError, match="unbalanced"):
        hostlist.expand("n[1-3")
    with pytest.raises(RanncError, match="bad range"):
        hostlist.expand("n[a-b]")


# ------------------------------------------------------------------ PBS
def test_pbspro_text_states_queues_and_vnodes():
    by = {n["name"]: n for n in pbs.parse_pbsnodes_text(_read("pbs", "pbspro-19.1-gpu-vnodes.txt"))}
    assert list(by) == ["gpu0001", "gpu0002", "gpu0003", "gpu0004", "big01"]
    g = by["gpu0001"]
    assert (g["gpus"], g["cpus"], g["memory_bytes"]) == (4, 40, 394759168 * 1024)
    assert g["state"] == "job-busy" and g["available"]
    assert g["partitions"] == ["gpu", "gpu_long"]
    assert by["gpu0003"]["state"] == "offline" and not by["gpu0003"]["available"]
    assert by["gpu0003"]["reason"] == "GPU 2 ECC errors, ticket 4411"
    assert not by["gpu0004"]["available"]
    big = by["big01"]          # two vnodes (one per socket) summed into their host
    assert (big["gpus"], big["cpus"], big["memory_bytes"]) == (4, 48, 2 * 196608000 * 1024)
    assert big["vnodes"] == ["big01[0]", "big01[1]"]


def test_openpbs_json_form():
    nodes = pbs.parse_pbsnodes_json(_read("pbs", "openpbs-2022.1-gpu.json"))
    by = {n["name"]: n for n in nodes}
    assert by["x1000c0s1b0n0"]["gpus"] == 4 and by["x1000c0s1b0n0"]["cpus"] == 64
    assert by["x1000c0s1b0n0"]["gpu_model"] == "A100"
    assert by["x1000c0s1b0n0"]["partitions"] == ["prod"]
    assert by["x1000c0s1b1n0"]["state"] == "job-exclusive" and by["x1000c0s1b1n0"]["available"]
    assert by["x1000c0s3b0n0"]["state"] == "down,offline" and not by["x1000c0s3b0n0"]["available"]
    assert by["x1000c0s3b0n0"]["reason"] == "hardware: GPU fell off the bus"


def test_torque_layout():
    by = {n["name"]: n for n in pbs.parse_pbsnodes_text(_read("pbs", "torque-6.1-gpu.txt"))}
    a = by["comp-gc-0001"]
    assert (a["gpus"], a["cpus"], a["memory_bytes"]) == (2, 28, 263871996 * 1024)
    assert a["gpu_model"] == "Tesla P100-PCIE-12GB" and a["gpu_memory_bytes"] == 12198 << 20
    assert a["features"] == ["gpu", "cyberlamp"]
    assert by["comp-gc-0002"]["available"] and by["comp-gc-0002"]["gpus"] == 2
    assert not by["comp-sc-0101"]["available"] and by["comp-sc-0101"]["reason"] == "waiting for DIMM replacement"


def test_old_pbspro_cpu_only():
    by = {n["name"]: n for n in pbs.parse_pbsnodes_text(_read("pbs", "pbspro-11.3-cpu-only.txt"))}
    assert by["b01a07"]["gpus"] == 0 and by["b01a07"]["cpus"] == 8
    assert by["b01a08"]["state"] == "state-unknown,down" and not by["b01a08"]["available"]


def test_pbs_sizes_and_nodefile():
    assert pbs.parse_size("196608000kb") == 196608000 * 1024
    assert pbs.parse_size("512gb") == 512 << 30
    assert pbs.parse_size("1tb") == 1 << 40
    assert pbs.parse_size("4096") == 4096
    assert pbs.parse_size("lots") == 0
    assert pbs.parse_nodefile(_read("pbs", "nodefile.txt")) == ["gpu0001", "gpu0002"]


def test_pbs_bad_outputs_are_clear():
    with pytest.raises(RanncError, match="did not print JSON"):
        pbs.parse_pbsnodes_json("pbsnodes: Unknown option -F")
    with pytest.raises(RanncError, match="no node records"):
        pbs.parse_pbsnodes_text("     state = free\n")


# ------------------------------------------------------------------ nvidia-smi
def test_topo_dgx1_hybrid_cube_mesh():
    t = nvsmi.parse_topo(_read("nvidia-smi", "dgx1-v100-driver418.txt"))
    assert t["gpus"] == 8
    assert t["pairs"]["0-1"] == "NV1" and t["pairs"]["0-3"] == "NV2" and t["pairs"]["0-5"] == "SYS"
    assert len(t["pairs"]) == 28
    assert all(sum(links.values()) == 6 for links in t["nvlinks"].values())   # 6 NVLinks per V100
    assert t["cpu_affinity"][4] == "20-39,60-79"
    assert t["nics"]["mlx5_0"][0] == "PIX" and t["nics"]["mlx5_0"][4] == "SYS"


def test_topo_dgx_a100_new_layout_with_nic_legend():
    t = nvsmi.parse_topo(_read("nvidia-smi", "dgx-a100-driver535.txt"))
    assert t["gpus"] == 8 and set(t["pairs"].values()) == {"NV12"}
    assert t["numa_affinity"] == {0: 3, 1: 3, 2: 1, 3: 1, 4: 7, 5: 7, 6: 5, 7: 5}
    assert sorted(t["nics"]) == [f"mlx5_{k}" for k in range(10)]
    assert t["nics"]["mlx5_0"] == {0: "PXB", 1: "PXB", 2: "SYS", 3: "SYS", 4: "SYS", 5: "SYS", 6: "SYS", 7: "SYS"}


def test_topo_small_nodes():
    p100 = nvsmi.parse_topo(_read("nvidia-smi", "p100x2-driver384.txt"))
    assert p100["pairs"] == {"0-1": "NV2"} and p100["nvlinks"] == {0: {1: 2}, 1: {0: 2}}
    pcie = nvsmi.parse_topo(_read("nvidia-smi", "pcie-2gpu-driver550.txt"))
    assert pcie["pairs"] == {"0-1": "PHB"} and pcie["nvlinks"] == {} and pcie["nics"] == {}
    assert pcie["numa_affinity"] == {0: 0, 1: 0}
    with pytest.raises(ValueError):
        nvsmi.parse_topo("No devices were found\n")


def test_query_csv():
    gpus = nvsmi.parse_query(_read("nvidia-smi", "query-a100.csv"))
    assert len(gpus) == 8 and gpus[3] == {"index": 3, "name": "NVIDIA A100-SXM4-40GB", "memory_bytes": 40960 << 20,
                                          "compute_capability": "8.0", "pci_bus_id": "00000000:4E:00.0"}
    old = nvsmi.parse_query(_read("nvidia-smi", "query-old-driver.csv"))
    assert "compute_capability" not in old[0] and old[1]["memory_bytes"] == 16280 << 20


# ------------------------------------------------------------------ sysfs
def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_sysfs_gpu_node_with_infiniband(tmp_path):
    _tree(tmp_path, {
        "/proc/meminfo": "MemTotal:       528069428 kB\nMemFree:        500000000 kB\n",
        "/sys/devices/system/cpu/online": "0-127\n",
        "/sys/devices/system/node/online": "0-7\n",
        "/sys/class/infiniband/mlx5_0/ports/1/state": "4: ACTIVE\n",
        "/sys/class/infiniband/mlx5_0/ports/1/rate": "200 Gb/sec (4X HDR)\n",
        "/sys/class/infiniband/mlx5_0/ports/1/link_layer": "InfiniBand\n",
        "/sys/class/infiniband/mlx5_1/ports/1/state": "1: DOWN\n",
        "/sys/class/infiniband/mlx5_1/ports/1/rate": "10 Gb/sec (4X SDR)\n",
        "/sys/class/infiniband/mlx5_1/ports/1/link_layer": "InfiniBand\n",
        "/sys/class/infiniband/mlx5_2/ports/1/state": "4: ACTIVE\n",
        "/sys/class/infiniband/mlx5_2/ports/1/rate": "100 Gb/sec (4X EDR)\n",
        "/sys/class/infiniband/mlx5_2/ports/1/link_layer": "Ethernet\n",
    })
    facts = sysfs.host_facts(sysfs.snapshot(str(tmp_path)))
    assert facts["cpus"] == 128 and facts["numa_nodes"] == 8 and facts["memory_bytes"] == 528069428 * 1024
    nics = facts["nics"]
    assert [n["name"] for n in nics] == ["mlx5_0", "mlx5_1", "mlx5_2"]
    assert nics[0] == {"name": "mlx5_0", "port": 1, "state": "ACTIVE", "rate": "200 Gb/sec (4X HDR)",
                       "rate_bytes": 25e9, "link_layer": "InfiniBand"}
    assert nics[2]["link_layer"] == "Ethernet"          # RoCE
    assert sysfs.active_nic_bandwidth(nics) == 25e9 + 12.5e9


def test_sysfs_bare_cpu_node_and_missing_files(tmp_path):
    _tree(tmp_path, {"/sys/devices/system/cpu/online": "0,2-3\n"})
    facts = sysfs.host_facts(sysfs.snapshot(str(tmp_path)))
    assert facts == {"cpus": 3}
    assert sysfs.active_nic_bandwidth([]) is None


def test_sysfs_remote_script_output_round_trip(tmp_path):
    _tree(tmp_path, {"/proc/meminfo": "MemTotal: 1024 kB\n", "/sys/devices/system/cpu/online": "0-3\n"})
    files = sysfs.snapshot(str(tmp_path))
    text = "".join(f"==> {p} <==\n{t}" for p, t in files.items())
    assert sysfs.parse_snapshot_output(text) == files


def test_sysfs_of_this_machine_is_sane():
    import os

    facts = sysfs.host_facts(sysfs.snapshot("/"))
    assert facts["cpus"] == os.cpu_count()
    assert facts["memory_bytes"] > 1 << 26
