"""The CLI's fast path and error handling."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, run_cli


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from rannc_cli.cli import main; rc = main(['--help']);"
            "assert 'torch' not in sys.modules, 'torch imported'; main(['--version'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "profile" in out.stdout
    assert "rannc 0." in out.stdout


def test_config_lists_settings_with_sources(monkeypatch):
    res = run_cli("config", "--json", env={"RANNC_PROFILE_REPEATS": "7"})
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(res.stdout)
    assert data["profile_repeats"] == {"value": 7, "source": "env"}
    assert data["block_target"]["source"] == "default"


def test_bad_setting_value_is_one_clear_line():
    res = run_cli("config", env={"RANNC_PROFILE_REPEATS": "many"})
    assert res.returncode == 2
    assert res.stderr.startswith("error: RANNC_PROFILE_REPEATS='many' is invalid")
    assert "Traceback" not in res.stderr
