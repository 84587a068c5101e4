"""`rannc plan` end to end, through the real command line."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from rannc_cli.planner.synthetic import bert_profile, hybrid_profile


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "bert.yaml"
    bert_profile(layers=8, hidden=512, seq=128, vocab=8000, batch_size=64).save(path)
    return path


def test_table_baselines_files(profile_file, tmp_path):
    out, png = tmp_path / "plan.yaml", tmp_path / "plan.png"
    res = run_cli("plan", "--profile", str(profile_file), "--nodes", "2", "--gpus", "4", "--mem-per-gpu", "16GiB",
                  "--out", str(out), "--timeline", str(png), "--explain")
    assert res.returncode == 0, res.stderr
    for text in ("stage", "replicas", "placement", "predicted step", "samples/s", "data-parallel", "uniform",
                 "parameters", "time", "vs plan", "chosen:", "alternative:"):
        assert text in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = yaml.safe_load(out.read_text())
    assert data["format"] == "rannc-plan" and data["stages"][0]["blocks"][0] == 0
    assert data["cluster"]["gpu_model"] == "V100-16GB"  # no topology: the profile's GPU
    assert "V100-16GB" in res.stdout


def test_json_fields_and_forced_parts(profile_file):
    res = run_cli("plan", "--profile", str(profile_file), "--nodes", "2", "--gpus", "4", "--replicas", "4,2,2",
                  "--microbatches", "8", "--schedule", "gpipe", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert [s["replicas"] for s in data["stages"]] == [4, 2, 2]
    assert data["microbatches"] == 8 and data["schedule"] == "gpipe"
    for s in data["stages"]:
        assert {"blocks", "replicas", "devices", "memory_bytes", "forward_seconds", "backward_seconds"} <= set(s)
        assert len(s["devices"]) == s["replicas"]
    assert sorted(b for s in data["stages"] for b in s["blocks"]) == list(range(10))
    assert set(data["baselines"]) == {"data-parallel", "uniform", "parameters", "time"}
    assert data["predicted_step_seconds"] > 0


def test_exhaustive_agrees_with_the_search(tmp_path):
    prof = tmp_path / "h.yaml"
    hybrid_profile(cnn_width=1, cnn_depths=(1, 1), layers=3, hidden=256, batch_size=16).save(prof)
    runs = [json.loads(run_cli("plan", "--profile", str(prof), "--nodes", "1", "--gpus", "4", "--mem-per-gpu", "2GiB",
                               "--json", *extra).stdout) for extra in ([], ["--exhaustive"])]
    assert runs[1]["search"]["exhaustive_plans"] > 100
    assert runs[0]["objective_seconds"] <= runs[1]["objective_seconds"] * (1 + 1e-9)


@pytest.mark.parametrize("forced", [["--schedule", "zb"], ["--schedule", "interleaved", "--virtual-stages", "2"]])
def test_exhaustive_honours_a_forced_zb_or_interleaved_schedule(tmp_path, forced):
    """--exhaustive prices every 1F1B structure and turns the best into the forced schedule, as the DP path does."""
    prof = tmp_path / "h.yaml"
    hybrid_profile(cnn_width=1, cnn_depths=(1, 1), layers=3, hidden=256, batch_size=16).save(prof)
    runs = []
    for extra in ([], ["--exhaustive"]):
        res = run_cli("plan", "--profile", str(prof), "--nodes", "1", "--gpus", "4", "--mem-per-gpu", "2GiB",
                      "--json", *forced, *extra)
        assert res.returncode == 0, res.stderr
        runs.append(json.loads(res.stdout))
    assert runs[1]["search"]["exhaustive_plans"] > 100
    for data in runs:
        assert data["schedule"] == forced[1]
        assert data.get("virtual_stages", 1) == (2 if "interleaved" in forced else 1)
    assert runs[0]["objective_seconds"] <= runs[1]["objective_seconds"] * (1 + 1e-9)


def test_infeasible_is_one_clear_line(profile_file):
    res = run_cli("plan", "--profile", str(profile_file), "--nodes", "1", "--gpus", "1", "--mem-per-gpu", "200MiB")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no plan fits")
    assert "GiB" in lines[0] and "smallest cluster that fits is" in lines[0]
    assert "Traceback" not in res.stderr


def test_block_too_big_for_any_gpu(profile_file):
    res = run_cli("plan", "--profile", str(profile_file), "--nodes", "4", "--gpus", "8", "--mem-per-gpu", "20MiB")
    assert res.returncode == 2
    assert "block" in res.stderr and "no number of these GPUs is enough" in res.stderr


def test_plan_for_another_cluster_is_refused(profile_file, tmp_path):
    out = tmp_path / "plan.yaml"
    assert run_cli("plan", "--profile", str(profile_file), "--nodes", "2", "--gpus", "4", "--out", str(out)).returncode == 0
    ok = run_cli("plan", "--profile", str(profile_file), "--nodes", "2", "--gpus", "4", "--evaluate", str(out))
    assert ok.returncode == 0, ok.stderr
    res = run_cli("plan", "--profile", str(profile_file), "--nodes", "4", "--gpus", "4", "--evaluate", str(out))
    assert res.returncode == 2 and "was made for 2 x 4 GPUs" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["--nodes", "2"], "say which cluster"),
    (["--nodes", "2", "--gpus", "4", "--replicas", "3,x"], "comma list"),
    (["--nodes", "2", "--gpus", "4", "--replicas", "6"], "cannot be placed"),
    (["--nodes", "2", "--gpus", "4", "--schedule", "zigzag"], "not known"),
    (["--nodes", "2", "--gpus", "4", "--mem-per-gpu", "big"], "memory size"),
    (["--nodes", "1", "--gpus", "8", "--exhaustive", "--stages", "2"], None),
    # each impossible forced part gets its own cause, not "no plan fits ... memory"
    (["--nodes", "2", "--gpus", "4", "--stages", "9"], "--stages 9 needs at least 9 GPUs"),
    (["--nodes", "2", "--gpus", "4", "--microbatches", "100"], "more than the batch of 64 samples"),
    (["--nodes", "2", "--gpus", "4", "--replicas", "8", "--microbatches", "16"], "needs microbatches of at least 8"),
    (["--nodes", "2", "--gpus", "4", "--checkpoint", "maybe"], "--checkpoint 'maybe' is not known"),
])
def test_bad_input(profile_file, args, message):
    res = run_cli("plan", "--profile", str(profile_file), *args)
    if message is None:
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 2, res.stdout
    assert message in res.stderr and "Traceback" not in res.stderr


def test_missing_profile():
    res = run_cli("plan", "--profile", "/nonexistent.yaml", "--nodes", "1", "--gpus", "1")
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_forced_parts_hold_through_refinement_and_baselines_say_why(tmp_path):
    """34 blocks are coarsened to 24 units, so the refine step runs (it used to split --stages 3 into 6)."""
    prof = tmp_path / "bert32.yaml"
    bert_profile(layers=32, hidden=512, seq=128, vocab=8000, batch_size=64).save(prof)
    res = run_cli("plan", "--profile", str(prof), "--nodes", "2", "--gpus", "4", "--stages", "3", "--microbatches", "4",
                  "--checkpoint", "on", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert len(data["stages"]) == 3 and data["microbatches"] == 4
    assert all(s["checkpoint"] for s in data["stages"])
    assert data["baselines"]["data-parallel"] == "not applicable with --stages 3"
    table = run_cli("plan", "--profile", str(prof), "--nodes", "2", "--gpus", "4", "--replicas", "4,2,2",
                    "--microbatches", "2")
    assert table.returncode == 0, table.stderr
    assert "2 microbatches of 32" in table.stdout and "not applicable with --stages 3" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines() if line.strip()[:1].isdigit() and "GiB" in line]
    assert len(rows) % 3 == 0 and [int(r[-3]) for r in rows] == [4, 2, 2] * (len(rows) // 3)  # interleaved: v chunks


def test_a_directory_is_named_as_a_directory(tmp_path, profile_file):
    for args in (["plan", "--profile", str(tmp_path), "--nodes", "1", "--gpus", "1"], ["profile", str(tmp_path)],
                 ["run", "--nproc", "2", str(tmp_path)], ["submit", str(tmp_path), "--nodes", "1", "--gpus", "1"]):
        res = run_cli(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert f"{tmp_path} is a directory" in res.stderr and "does not exist" not in res.stderr, res.stderr
