"""NEC NQSV (Tsukuba's Pegasus, Osaka's SQUID): qsub, qstat, qdel behind a ``#PBS`` prefix with NQSV's own syntax.

    backend = NQSVBackend(transport)
    rid = backend.submit("logs/x/train.sh", None, "logs/x/train")    # "Request 12345.nqsv submitted to queue: gen_S." -> "12345.nqsv"
    backend.state(rid, "logs/x/train")

Directives: ``-A`` group, ``-q`` queue, ``-b`` nodes, ``-T openmpi``, ``-l gpunum_job=``, ``-l elapstim_req=``.
No dependency option is used: a training job submitted behind a profiling job waits at its start
for the profile (templates/nqsv/train.sh.j2). NQSV's qstat lists a request while it is queued or
running (STT column); afterwards the phase's rannc-exitcode says how it ended. No NQSV server
exists outside its sites: the parsers are tested on outputs composed from the documented formats
(tests/data/scheduler/nqsv/README.md).
"""

from __future__ import annotations

import re

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backend import Backend, PhaseState, register

# qstat STT column (NQSV user's guide, request states)
NQSV_STATES = {
    "ARI": "PENDING", "WAT": "PENDING", "QUE": "PENDING", "HLD": "PENDING", "HOL": "PENDING", "RST": "PENDING",
    "PRR": "RUNNING", "RUN": "RUNNING", "POR": "RUNNING", "EXT": "RUNNING", "SUS": "RUNNING", "CHK": "RUNNING",
    "TRS": "PENDING", "MIG": "RUNNING", "GHD": "PENDING",
}


def parse_qsub(stdout: str) -> str:
    """``Request 12345.nqsv submitted to queue: gen_S.`` -> ``12345.nqsv``."""
    m = re.search(r"Request (\S+) submitted to queue", stdout)
    if not m:
        raise RanncError(f"qsub printed no request id ({stdout.strip()[:200]!r})")
    return m.group(1)


def parse_qstat(stdout: str) -> dict[str, str]:
    """NQSV's qstat table (``RequestID ReqName UserName Queue Pri STT ...``) -> {request id: STT}."""
    out: dict[str, str] = {}
    header = None
    for line in stdout.splitlines():
        words = line.split()
        if words[:1] == ["RequestID"]:
            header = words
            continue
        if header and len(words) >= len(header) - 2 and "STT" in header and not set(words[0]) <= {"-"}:
            out[words[0]] = words[header.index("STT")]
    return out


@register
class NQSVBackend(Backend):
    name = "nqsv"
    submit_command = "qsub"
    status_command = "qstat"

    @staticmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        return ["qsub", "-o", f"{phase_dir}/batch.log", script]

    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        res = self.run_checked(self.submit_argv(script, depends_on, phase_dir), "qsub")
        return parse_qsub(res.stdout + "\n" + res.stderr)

    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        res = self.t.run(["qstat", job_id])
        stt = parse_qstat(res.stdout).get(job_id) if res.rc == 0 else None
        if stt is None:
            stt = next((v for k, v in parse_qstat(res.stdout).items() if k.split(".")[0] == job_id.split(".")[0]), None)
        restarts = self.restarts(phase_dir)
        if stt is None:
            return self.forgotten(job_id, phase_dir, "NQSV no longer lists the request")
        state = NQSV_STATES.get(stt, "UNKNOWN")
        return PhaseState(state, reason=None if stt in ("QUE", "RUN") else f"qstat {stt}", restarts=restarts)

    def cancel(self, job_id: str) -> None:
        self.run_checked(["qdel", job_id], "qdel")
