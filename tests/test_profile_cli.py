"""`rannc profile` as a user runs it: examples, estimate mode, cache, and one-line errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import ROOT, run_cli
from rannc_cli.profiler.format import Profile

FAST = {"RANNC_PROFILE_WARMUP": "0", "RANNC_PROFILE_REPEATS": "1"}


def _profile(tmp_path, *args, env=None):
    out = tmp_path / "prof.yaml"
    res = run_cli("profile", "--out", str(out), *args, env={**FAST, **(env or {})})
    return res, out


@pytest.mark.parametrize("example, script_args", [
    ("mlp.py", ["--", "--layers", "3", "--hidden", "32"]),
    ("cnn.py", ["--", "--width", "16", "--batch-size", "8"]),
    ("transformer_lm.py", ["--", "--layers", "2", "--d-model", "32", "--batch-size", "4"]),
])
def test_examples_profile_to_a_valid_file(tmp_path, example, script_args):
    res, out = _profile(tmp_path, str(ROOT / "examples" / example), "--json", *script_args)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    prof = Profile.load(out)
    assert summary["blocks"] == len(prof.blocks) > 3
    assert summary["distinct_blocks"] == len(prof.classes) < len(prof.blocks)
    assert summary["mode"] == "measured" and summary["cached"] is False
    assert summary["forward_seconds"] > 0 and summary["parameter_bytes"] > 0
    assert prof.model["script"].endswith(example)
    assert all(len(c.costs) == len(prof.microbatch_sizes) for c in prof.classes)


def test_table_output_and_cache_hit(tmp_path):
    script = str(ROOT / "examples" / "mlp.py")
    first, _ = _profile(tmp_path, script, "--", "--layers", "2")
    assert first.returncode == 0, first.stderr
    assert "costliest blocks" in first.stdout and "fwd ms" in first.stdout and "dedup" in first.stdout
    second, _ = _profile(tmp_path, script, "--", "--layers", "2")
    assert second.returncode == 0 and "(from cache)" in second.stdout
    third, _ = _profile(tmp_path, script, "--no-cache", "--", "--layers", "2")
    assert "(from cache)" not in third.stdout


def test_estimate_mode_with_a_device_spec(tmp_path):
    res, out = _profile(tmp_path, str(ROOT / "examples" / "mlp.py"), "--estimate", "--device-spec", "V100-SXM2-16GB",
                        "--json")
    assert res.returncode == 0, res.stderr
    prof = Profile.load(out)
    assert prof.device["mode"] == "estimated" and prof.device["spec"]["memory_bandwidth"] == 900e9


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


MODEL = """
import torch, torch.nn as nn
from rannc_cli import RaNNCModule
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
    def forward(self, x):
        h = self.l(x)
        {branch}
        return h.pow(2).mean()
model = RaNNCModule(Net())
"""


@pytest.mark.parametrize("case, body, expected", [
    ("raises", MODEL.format(branch="") + "raise ValueError('no data here')\n", "raised ValueError at"),
    ("never calls", MODEL.format(branch="") + "print('done')\n", "finished without calling a RaNNCModule"),
    ("syntax", "def broken(:\n", "syntax error at line 1"),
    ("uncapturable", MODEL.format(branch="if h.max() > 0: h = h * 2") + "model(torch.randn(3, 4))\n",
     "data-dependent control flow"),
    ("exits", "import sys\nsys.exit(3)\n", "exited (code 3) before calling the model"),
])
def test_bad_scripts_give_one_clear_line(tmp_path, case, body, expected):
    res, out = _profile(tmp_path, _script(tmp_path, body))
    assert res.returncode == 2, (case, res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, res.stderr)
    assert expected in lines[0], (case, lines[0])
    assert "Traceback" not in res.stderr and not out.exists()


def test_uncapturable_model_names_module_and_line(tmp_path):
    script = _script(tmp_path, MODEL.format(branch="if h.max() > 0: h = h * 2") + "model(torch.randn(3, 4))\n")
    res, _ = _profile(tmp_path, script)
    assert "in module '<root>' (Net)" in res.stderr and "train.py:10" in res.stderr and "torch.where" in res.stderr


def test_missing_script_and_bad_flags(tmp_path):
    res, _ = _profile(tmp_path, str(tmp_path / "nope.py"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    res, _ = _profile(tmp_path, str(ROOT / "examples" / "mlp.py"), "--device-spec", "V100-SXM2-16GB")
    assert res.returncode == 2 and "--device-spec only applies to --estimate" in res.stderr
    res, _ = _profile(tmp_path, str(ROOT / "examples" / "mlp.py"), "--estimate", "--device-spec", "TPUv9")
    assert res.returncode == 2 and "unknown device spec 'TPUv9'" in res.stderr and "Traceback" not in res.stderr


def test_cuda_requested_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res, _ = _profile(tmp_path, str(ROOT / "examples" / "mlp.py"), "--device", "cuda")
    assert res.returncode == 2 and "no CUDA device is visible" in res.stderr
