"""PJM (Fujitsu) and NQSV (NEC) backends: parsers on documented outputs, submit command lines, and the
state/cancel flow through the same commands as scripts on PATH that print those outputs.

No server of either exists outside its sites (tests/data/scheduler/pjm/README.md, .../nqsv/README.md);
the rendered scripts are golden files (tests/test_scheduler_templates.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backends.nqsv import NQSVBackend, parse_qstat, parse_qsub
from rannc_cli.scheduler.backends.pjm import PJMBackend, parse_pjstat, parse_pjsub, step_base
from rannc_cli.scheduler.transport import LocalTransport

DATA = Path(__file__).parent / "data" / "scheduler"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_pjsub_ids_from_the_guide():
    assert parse_pjsub(read("pjm/composed-pjsub.txt")) == "1234567"
    lines = read("pjm/fugaku-pjsub-step.txt").splitlines()
    assert parse_pjsub(lines[1]) == "64856_0" and parse_pjsub(lines[3]) == "64856_1"
    assert step_base("64856_1") == "64856"
    with pytest.raises(RanncError, match="pjsub printed no job id"):
        parse_pjsub(read("pjm/composed-pjsub-rejected.txt"))


def test_pjstat_tables():
    jobs = parse_pjstat(read("pjm/fugaku-pjstat.txt"))
    assert jobs == {"238": "RUN", "239": "RUN", "240": "RUN", "241": "RUN"}
    assert parse_pjstat(read("pjm/composed-pjstat-E-step.txt"))["64856_1"] == "QUE"
    hist = parse_pjstat(read("pjm/composed-pjstat-H-E.txt"))
    assert hist == {"64856_0": "EXT", "64856_1": "CCL"}


def test_pjm_step_job_dependency_and_options():
    assert PJMBackend.submit_argv("/j/profile.sh", None, "/j/profile") == \
        ["pjsub", "--step", "-o", "/j/profile/batch.log", "-j", "/j/profile.sh"]
    assert PJMBackend.submit_argv("/j/train.sh", "64856_0", "/j/train")[-3:] == \
        ["--sparam", "jid=64856,sd=ec!=0:all", "/j/train.sh"]


def test_nqsv_outputs():
    assert parse_qsub(read("nqsv/composed-qsub.txt")) == "12345.nqsv"
    with pytest.raises(RanncError, match="qsub printed no request id"):
        parse_qsub(read("nqsv/composed-qsub-rejected.txt"))
    assert parse_qstat(read("nqsv/composed-qstat.txt")) == {"12345.nqsv": "RUN", "12346.nqsv": "QUE"}
    assert NQSVBackend.submit_argv("/j/train.sh", "12346.nqsv", "/j/train") == ["qsub", "-o", "/j/train/batch.log",
                                                                                  "/j/train.sh"]


def _commands(bin_dir: Path, outputs: dict[str, tuple[str, int]]) -> None:
    """Put scripts named like the batch system's commands on PATH that print the given output."""
    bin_dir.mkdir()
    for name, (text, rc) in outputs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {bin_dir}/calls\ncat <<'OUT'\n{text}OUT\nexit {rc}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_pjm_flow_states_and_errors(tmp_path, monkeypatch):
    """submit/state/cancel run pjsub/pjstat/pjdel and read their documented outputs; the exit file decides
    once pjstat shows EXT; a rejection is one line with PJM's words."""
    _commands(tmp_path / "bin", {"pjsub": (read("pjm/fugaku-pjsub-step.txt").splitlines()[3] + "\n", 0),
                                 "pjstat": (read("pjm/composed-pjstat-E-step.txt"), 0), "pjdel": ("", 0)})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    b = PJMBackend(LocalTransport())
    phase = tmp_path / "train"
    phase.mkdir()
    assert b.submit(str(tmp_path / "train.sh"), "64856_0", str(phase)) == "64856_1"
    st = b.state("64856_1", str(phase))
    assert st.state == "PENDING"
    b.cancel("64856_1")
    calls = (tmp_path / "bin" / "calls").read_text()
    assert "pjsub --step -o" in calls and "jid=64856,sd=ec!=0:all" in calls and "pjdel 64856_1" in calls
    (tmp_path / "bin" / "pjstat").write_text(f"#!/bin/sh\ncat <<'OUT'\n{read('pjm/composed-pjstat-H-E.txt')}OUT\n")
    (phase / "rannc-exitcode").write_text("0\n")
    assert b.state("64856_0", str(phase)).state == "COMPLETED"
    assert b.state("64856_1", str(phase)).state == "CANCELLED"
    (tmp_path / "bin" / "pjsub").write_text(f"#!/bin/sh\necho '{read('pjm/composed-pjsub-rejected.txt').strip()}' >&2\nexit 1\n")
    with pytest.raises(RanncError) as err:
        b.submit(str(tmp_path / "train.sh"), None, str(phase))
    assert "pjsub failed on local: [ERR.] PJM 0039 pjsub Specified resource group" in err.value.one_line()


def test_nqsv_flow_states(tmp_path, monkeypatch):
    _commands(tmp_path / "bin", {"qsub": (read("nqsv/composed-qsub.txt"), 0),
                                 "qstat": (read("nqsv/composed-qstat.txt"), 0), "qdel": ("", 0)})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    b = NQSVBackend(LocalTransport())
    phase = tmp_path / "train"
    phase.mkdir()
    assert b.submit(str(tmp_path / "train.sh"), None, str(phase)) == "12345.nqsv"
    assert b.state("12345.nqsv", str(phase)).state == "RUNNING"
    assert b.state("12346.nqsv", str(phase)).state == "PENDING"
    (phase / "rannc-exitcode").write_text("3\n")
    gone = b.state("99999.nqsv", str(phase))
    assert (gone.state, gone.exit_code) == ("FAILED", 3)
