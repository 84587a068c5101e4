"""The error contract (docs/errors.md), through the installed `rannc` entry point as a user runs it.

Every row is one class of bad input: the command must exit with the code of its class and print
exactly one stderr line, starting with ``error:``, naming the problem, with no traceback.

The runner is the console script of the venv that runs the tests (conftest.run_installed). CI's
venv is itself a fresh install (`.ci/run`: newest typer from PyPI, which vendors click), so these
rows run against what a new user gets; a test building yet another venv would add ~40 s for no
other coverage.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, run_installed

# (id, argv, env, exit code, fragment); {name} in argv/env/fragment is a path from the `files` fixture
ROWS = [
    # usage errors: click's, whatever typer vendors or depends on
    ("bad-int", ["plan", "-p", "{prof}", "--nodes", "abc"], {}, 2, "invalid value for '--nodes'"),
    ("unknown-option", ["plan", "-p", "{prof}", "--bogus"], {}, 2, "no such option: --bogus"),
    ("missing-option", ["plan"], {}, 2, "missing option '--profile'"),
    ("missing-argument", ["status"], {}, 2, "missing argument"),
    ("missing-value", ["plan", "-p", "{prof}", "--nodes"], {}, 2, "option '--nodes' requires an argument"),
    ("unknown-command", ["bogus"], {}, 2, "no such command 'bogus'"),
    ("below-min", ["jobs", "--limit", "0"], {}, 2, "'--limit'"),
    ("bad-choice", ["topology", "--scheduler", "sge2"], {}, 2, "--scheduler 'sge2'"),
    # settings: one registry decides, for the CLI, the launcher and the ranks
    ("misspelt-env", ["config"], {"RANNC_SHEDULE": "gpipe"}, 2, "RANNC_SHEDULE (did you mean RANNC_SCHEDULE?)"),
    ("missing-config", ["config"], {"RANNC_CONFIG": "{missing}"}, 2, "RANNC_CONFIG names"),
    ("config-typo", ["config"], {"RANNC_CONFIG": "{typo_config}"}, 2, "shedule (did you mean schedule?)"),
    ("negative", ["config"], {"RANNC_BLOCK_TARGET": "-5"}, 2, "RANNC_BLOCK_TARGET='-5' is invalid: expected an integer >= 1"),
    ("zero", ["config"], {"RANNC_PROFILE_REPEATS": "0"}, 2, "RANNC_PROFILE_REPEATS='0' is invalid"),
    ("not-a-number", ["config"], {"RANNC_PROFILE_REPEATS": "many"}, 2, "RANNC_PROFILE_REPEATS='many' is invalid"),
    ("device-choice", ["run", "--nproc", "2", "{mlp}"], {"RANNC_RUNTIME_DEVICE": "tpu"}, 2, "expected one of auto, cpu, cuda"),
    ("reduction-choice", ["run", "--nproc", "2", "{mlp}"], {"RANNC_LOSS_REDUCTION": "median"}, 2, "expected one of mean, sum"),
    ("replicas-list", ["run", "--nproc", "2", "{mlp}"], {"RANNC_REPLICAS": "x,y"}, 2, "not a comma list of integers"),
    ("stages-int", ["run", "--nproc", "2", "{mlp}"], {"RANNC_STAGES": "abc"}, 2, "RANNC_STAGES='abc' is invalid"),
    ("missing-plan", ["run", "--nproc", "2", "{mlp}"], {"RANNC_PLAN": "{missing}"}, 2, "RANNC_PLAN='{missing}' is invalid"),
    ("flag-choice", ["run", "--nproc", "2", "--checkpoint", "maybe", "{mlp}"], {}, 2, "--checkpoint='maybe' is invalid"),
    # files
    ("out-suffix", ["plan", "-p", "{prof}", "--nodes", "1", "--gpus", "2", "--out", "{dir}/plan.txt"], {}, 2,
     "rannc writes .yaml, .yml or .json files"),
    ("missing-input", ["plan", "-p", "{missing}", "--nodes", "1", "--gpus", "1"], {}, 2, "does not exist"),
    ("not-a-directory", ["plan", "-p", "{prof}", "--nodes", "1", "--gpus", "2", "--out", "{afile}/plan.yaml"], {}, 2,
     "Not a directory (ENOTDIR)"),
    ("corrupt-job-record", ["status", "abcd1234"], {"RANNC_LOGS_DIR": "{logs}"}, 2, "is not valid YAML (line"),
    ("profile-of-another-script", ["submit", "{cnn}", "--gpus", "2", "--profile", "{mlp_prof}", "--dry-run"], {}, 2,
     "was made from examples/mlp.py (model BERT-L2-H64), not cnn.py"),
]


def _fill(text: str, files: dict[str, str]) -> str:
    return text.format(**files)


def assert_one_error_line(res: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    lines = res.stderr.splitlines()
    assert res.returncode == code, f"exit {res.returncode}, wanted {code}; stderr: {res.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {res.stderr[-2000:]!r}"
    assert "Traceback" not in res.stderr
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from rannc_cli.planner.synthetic import bert_profile

    base = tmp_path_factory.mktemp("contract")
    prof = bert_profile(layers=2, hidden=64, seq=16, vocab=100, batch_size=8)
    prof.save(base / "prof.yaml")
    prof.model["script"] = "examples/mlp.py"  # as `rannc profile examples/mlp.py` records it
    prof.save(base / "mlp-prof.yaml")
    (base / "typo.yaml").write_text("shedule: gpipe\n")
    (base / "afile").write_text("a plain file\n")
    job = base / "logs" / "20261201-101500-mlp-abcd1234"
    job.mkdir(parents=True)
    (job / "job.yaml").write_text("format: rannc-job\nphases: [unclosed\n")
    (job / "train").mkdir()
    return {"dir": str(base), "prof": str(base / "prof.yaml"), "mlp_prof": str(base / "mlp-prof.yaml"),
            "missing": str(base / "missing.yaml"), "typo_config": str(base / "typo.yaml"), "afile": str(base / "afile"),
            "logs": str(base / "logs"), "mlp": str(EXAMPLES / "mlp.py"), "cnn": str(EXAMPLES / "cnn.py")}


@pytest.mark.parametrize("argv,env,code,fragment", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_error_class_is_one_line(files, tmp_path, argv, env, code, fragment):
    res = run_installed(*[_fill(a, files) for a in argv], env={k: _fill(v, files) for k, v in env.items()},
                        cwd=tmp_path, timeout=120)
    assert_one_error_line(res, code, _fill(fragment, files))


def test_corrupt_job_record_is_listed_not_hidden(files, tmp_path):
    res = run_installed("jobs", env={"RANNC_LOGS_DIR": files["logs"]}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("abcd1234"))
    assert "UNKNOWN" in row and "mlp" in row
    assert "note: job abcd1234:" in res.stdout and "is not valid YAML" in res.stdout


def test_out_suffix_picks_json(files, tmp_path):
    import json

    out = tmp_path / "plan.json"
    res = run_installed("plan", "-p", files["prof"], "--nodes", "1", "--gpus", "2", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["format"] == "rannc-plan"
    again = run_installed("plan", "-p", files["prof"], "--nodes", "1", "--gpus", "2", "--evaluate", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # a JSON plan reads back as the same plan of the same profile


def test_full_stdout_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        res = run_installed("config", "--json", stdout=full, cwd=tmp_path)
    assert_one_error_line(res, 2, "No space left on device (ENOSPC)")


def test_help_is_import_light(tmp_path):
    """`rannc --help` through the entry point imports neither torch nor rich (help is plain click text)."""
    res = run_installed("--help", env={"PYTHONPROFILEIMPORTTIME": "1"}, cwd=tmp_path)
    assert res.returncode == 0 and "Usage: rannc" in res.stdout
    modules = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert "typer" in modules, "PYTHONPROFILEIMPORTTIME gave no import list"
    assert not modules & {"torch", "rich", "markdown_it", "numpy", "yaml"}, modules & {"torch", "rich", "markdown_it",
                                                                                        "numpy", "yaml"}


def test_unexpected_exception_is_one_line_with_debug_hint(capsys):
    from rannc_cli.failures import INTERNAL_ERROR, report

    try:
        {}["plan"]
    except KeyError as exc:
        code = report(exc)
    err = capsys.readouterr().err
    assert code == INTERNAL_ERROR
    assert err == "error: internal error in rannc: KeyError: 'plan'; please report it (RANNC_DEBUG=1 for the traceback)\n"


def test_bad_setting_in_a_rank_started_without_the_launcher(tmp_path):
    """torchrun-style ranks (RANK/WORLD_SIZE set, no `rannc run`): rank 0 prints one line, every rank exits 2."""
    from rannc_cli.runtime.launcher import free_port

    env = {**os.environ, "RANNC_LOSS_REDUCTION": "median", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(EXAMPLES / "mlp.py"), "--steps", "2"], cwd=tmp_path,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert outs[0][1].splitlines() == ["error: RANNC_LOSS_REDUCTION='median' is invalid: expected one of mean, sum; "
                                       "fix or unset it; `rannc config` lists every setting"]
    assert outs[1][1] == "" and "step" not in outs[0][0] + outs[1][0]


# ------------------------------------------------------------------ a full disk, for real (tmpfs, needs root)
def _mount_tmpfs(mnt: Path, options: str) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs mounted at tmp_path/full (root only: CI runs as root)."""
    mnt = tmp_path / "full"
    _mount_tmpfs(mnt, "size=64k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_file_system_is_one_line(files, tmp_path):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "ro,size=64k")
    try:
        res = run_installed("plan", "-p", files["prof"], "--nodes", "1", "--gpus", "2", "--out", str(mnt / "plan.yaml"),
                            cwd=tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert_one_error_line(res, 2, f"cannot write plan file {mnt / 'plan.yaml'}: Read-only file system (EROFS)")


def _fill_up(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_full_keeps_the_old_file_and_names_the_path(files, tiny_fs, tmp_path):
    out = tiny_fs / "plan.yaml"
    first = run_installed("plan", "-p", files["prof"], "--nodes", "1", "--gpus", "2", "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    _fill_up(tiny_fs)
    res = run_installed("plan", "-p", files["prof"], "--nodes", "1", "--gpus", "1", "--out", str(out), cwd=tmp_path)
    assert_one_error_line(res, 2, f"cannot write plan file {out}: No space left on device (ENOSPC)")
    assert out.read_bytes() == before  # the old plan is whole
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler", "plan.yaml"]  # no temporary file left behind
    topo = run_installed("topology", "--scheduler", "local", "--out", str(tiny_fs / "topo.yaml"), cwd=tmp_path)
    assert_one_error_line(topo, 2, f"cannot write topology file {tiny_fs / 'topo.yaml'}: No space left on device")


def test_disk_full_submit_leaves_no_half_made_job_folder(files, tiny_fs, tmp_path):
    logs = tiny_fs / "logs"
    _fill_up(tiny_fs)
    res = run_installed("submit", str(EXAMPLES / "mlp.py"), "--gpus", "1", "--profile", files["prof"],
                        env={"RANNC_LOGS_DIR": str(logs)}, cwd=tmp_path)
    assert_one_error_line(res, 2, "No space left on device (ENOSPC)")
    assert "cannot write job" in res.stderr and str(logs) in res.stderr
    assert not logs.exists() or list(logs.iterdir()) == []


# ------------------------------------------------------------------ SSH: one line, never paramiko's tracebacks
class _NotSSH:
    """A TCP server on 127.0.0.1 that answers like a web server, then hangs up."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_ssh_to_a_port_that_is_not_ssh_is_one_line(tmp_path):
    server = _NotSSH()
    try:
        res = run_installed("topology", "--host", f"root@127.0.0.1:{server.port}", "--out", str(tmp_path / "t.yaml"),
                            env={"HOME": str(tmp_path), "SSH_AUTH_SOCK": ""}, cwd=tmp_path, timeout=120)
    finally:
        server.close()
    assert_one_error_line(res, 2, f"127.0.0.1:{server.port} did not answer as an SSH server")
    assert "Exception (client)" not in res.stderr


def test_ssh_to_a_closed_port_is_one_line(tmp_path):
    from rannc_cli.runtime.launcher import free_port

    port = free_port()
    res = run_installed("topology", "--host", f"root@127.0.0.1:{port}", "--out", str(tmp_path / "t.yaml"),
                        env={"HOME": str(tmp_path), "SSH_AUTH_SOCK": ""}, cwd=tmp_path, timeout=120)
    assert_one_error_line(res, 2, f"cannot connect to 127.0.0.1:{port}")


@pytest.mark.ssh
def test_ssh_with_a_key_the_server_does_not_know_is_one_line(sshd_server, tmp_path):
    home = sshd_server.client_home(tmp_path / "home", authorized=False)
    res = run_installed("topology", "--host", sshd_server.target, "--scheduler", "local", "--out",
                        str(tmp_path / "t.yaml"), env={"HOME": str(home), "SSH_AUTH_SOCK": ""}, cwd=tmp_path,
                        timeout=120)
    assert_one_error_line(res, 2, f"login to {sshd_server.target} failed")
    assert "Exception (client)" not in res.stderr and "Secsh" not in res.stderr


def test_sftp_refused_is_one_line(sshd_server, tmp_path):
    """A login node without the sftp subsystem: paramiko's 'Secsh channel ... open FAILED' stays off the terminal."""
    from testbed.sshd import SSHServer

    base = tmp_path / "nosftp"
    server = SSHServer.start(base)
    try:
        conf = base / "sshd_config"
        server.stop()
        conf.write_text("".join(line + "\n" for line in conf.read_text().splitlines() if "Subsystem" not in line))
        server = _restart(server, conf)
        home = server.client_home(tmp_path / "home")
        res = run_installed("submit", str(EXAMPLES / "mlp.py"), "--scheduler", "local", "--host", server.target,
                            "--gpus", "1", env={"HOME": str(home), "SSH_AUTH_SOCK": "",
                                                "RANNC_LOGS_DIR": str(tmp_path / "logs")}, cwd=tmp_path, timeout=120)
    finally:
        server.stop()
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Secsh" not in res.stderr and "Traceback" not in res.stderr


def _restart(server, conf: Path):
    """Start sshd again on the same port with an edited config."""
    import time

    from testbed.sshd import sbin

    log = open(server.base / "sshd.log", "a")
    server.proc = subprocess.Popen([sbin("sshd"), "-D", "-e", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    raise AssertionError("sshd did not come back")


def test_docs_table_lists_every_row():
    """docs/errors.md names every error class this module tests."""
    text = (ROOT / "docs" / "errors.md").read_text()
    for row in ROWS:
        assert f"`{row[0]}`" in text, f"docs/errors.md has no row for {row[0]}"


@pytest.mark.parametrize("option,message", [
    ({"checkpoint": "maybe"}, "RaNNCModule(checkpoint='maybe') is invalid: expected one of auto, on, off"),
    ({"replicas": [2, 0]}, "RaNNCModule(replicas=[2, 0]) is invalid: every count must be at least 1"),
    ({"schedule": "zigzag"}, "RaNNCModule(schedule='zigzag') is invalid: expected one of 1f1b, gpipe, interleaved, zb"),
    ({"microbatches": -1}, "RaNNCModule(microbatches=-1) is invalid: expected an integer >= 0"),
])
def test_module_options_follow_the_settings_rules(option, message):
    """RaNNCModule's options are checked by the same registry rules as the RANNC_* variables."""
    from rannc_cli.errors import RanncError
    from rannc_cli.runtime.planning import Constraints

    with pytest.raises(RanncError) as info:
        Constraints.from_settings(**option)
    assert info.value.message == message
