"""Fujitsu Technical Computing Suite job manager (PJM; Wisteria/BDEC-01, Fugaku): pjsub, pjstat, pjdel.

    backend = PJMBackend(transport)
    jid = backend.submit("logs/x/profile.sh", None, "logs/x/profile")     # pjsub --step  -> "64856_0"
    tid = backend.submit("logs/x/train.sh", jid, "logs/x/train")          # --sparam jid=64856,sd=ec!=0:all -> "64856_1"
    backend.state(tid, "logs/x/train")

The profile -> train dependency is a step job: every phase is a sub job of one step job, and the
training sub job is submitted with ``sd=ec!=0:all`` (a non-zero end code of the sub job before it
deletes the rest). The training script also checks the profile phase's rannc-exitcode itself.
States come from ``pjstat -E`` (sub jobs) while the job is known, then ``pjstat -H -E`` (history),
then the phase's rannc-exitcode. No PJM server exists outside its sites: the parsers are tested
on outputs from the public documentation (tests/data/scheduler/pjm/README.md).
"""

from __future__ import annotations

import re

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backend import Backend, PhaseState, register

# pjstat ST column (TCS job operation software, end-user's guide, "job states")
PJM_STATES = {
    "ACC": "PENDING", "QUE": "PENDING", "HLD": "PENDING", "RNA": "PENDING",
    "RUN": "RUNNING", "RNE": "RUNNING", "RNO": "RUNNING", "SPP": "RUNNING", "SPD": "RUNNING", "RSM": "RUNNING",
    "EXT": "FINISHED", "CCL": "CANCELLED", "ERR": "FAILED", "RJT": "FAILED",
}


def parse_pjsub(stdout: str) -> str:
    """``[INFO] PJM 0000 pjsub Job 12345 submitted.`` (``12345_1`` for a step sub job) -> the id."""
    m = re.search(r"\bJob (\d+(?:_\d+)?(?:\[\d+\])?) submitted", stdout)
    if not m:
        raise RanncError(f"pjsub printed no job id ({stdout.strip()[:200]!r})")
    return m.group(1)


def parse_pjstat(stdout: str) -> dict[str, str]:
    """pjstat's table (``JOB_ID JOB_NAME MD ST USER ...``) -> {job id: ST}."""
    out: dict[str, str] = {}
    header = None
    for line in stdout.splitlines():
        words = line.split()
        if words[:1] == ["JOB_ID"]:
            header = words
            continue
        if header and len(words) >= 4 and "ST" in header:
            out[words[0]] = words[header.index("ST")]
    return out


def step_base(job_id: str) -> str:
    """``64856_1`` -> ``64856`` (the step job a sub job belongs to)."""
    return job_id.split("_")[0]


@register
class PJMBackend(Backend):
    name = "pjm"
    submit_command = "pjsub"
    status_command = "pjstat"
    queue_word = "resource group"

    @staticmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        argv = ["pjsub", "--step", "-o", f"{phase_dir}/batch.log", "-j"]
        if depends_on:
            argv += ["--sparam", f"jid={step_base(depends_on)},sd=ec!=0:all"]
        return argv + [script]

    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        res = self.run_checked(self.submit_argv(script, depends_on, phase_dir), "pjsub")
        return parse_pjsub(res.stdout + "\n" + res.stderr)

    def _pjstat(self, job_id: str) -> str | None:
        for argv in (["pjstat", "-E", step_base(job_id)], ["pjstat", "-H", "-E", step_base(job_id)]):
            res = self.t.run(argv)
            if res.rc == 0:
                st = parse_pjstat(res.stdout).get(job_id)
                if st:
                    return st
        return None

    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        st = self._pjstat(job_id)
        ended = self.ended(phase_dir)
        restarts = self.restarts(phase_dir)
        if st is None or PJM_STATES.get(st) == "FINISHED":
            return self.forgotten(job_id, phase_dir, f"PJM says {st or 'nothing'}", ended)
        state = PJM_STATES.get(st, "UNKNOWN")
        if state in ("CANCELLED", "FAILED"):
            return PhaseState(state, ended.exit_code if ended else None, reason=f"pjstat {st}", restarts=restarts)
        return PhaseState(state, reason=None if st in ("QUE", "RUN") else f"pjstat {st}", restarts=restarts)

    def cancel(self, job_id: str) -> None:
        self.run_checked(["pjdel", job_id], "pjdel")
