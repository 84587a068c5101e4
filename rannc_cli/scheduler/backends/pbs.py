"""PBS Pro / OpenPBS backend: qsub, qstat, qdel, with PBS's own states and exit statuses.

    backend = PBSBackend(transport)
    jid = backend.submit("logs/x/profile.sh", None, "logs/x/profile")          # "1234.pbs01"
    tid = backend.submit("logs/x/train.sh", jid, "logs/x/train")               # -W depend=afterok:1234.pbs01
    backend.state(tid, "logs/x/train")

qsub gets the script's own ``#PBS`` directives again as options (the ``pbs_directives_on_command_line``
setting, on by default): real PBS treats them exactly like the directives, and Slurm's PBS
wrappers (slurm-wlm-torque), which read only options, then honour select/walltime/queue too.
State: ``qstat -f -F json`` (PBS Pro >= 18, OpenPBS), else ``qstat -f`` text (older PBS Pro,
Torque, the wrappers), with ``-x`` for finished jobs where job history is on; once PBS forgets
a job, the phase's rannc-exitcode file says how it ended.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from rannc_cli.scheduler.backend import Backend, PhaseState, register

# job_state letters (PBS Pro reference guide, "Job States"; C is Torque's completed).
PBS_STATES = {
    "Q": "PENDING", "H": "PENDING", "W": "PENDING", "T": "PENDING", "M": "PENDING", "S": "RUNNING", "U": "RUNNING",
    "R": "RUNNING", "E": "RUNNING", "B": "RUNNING", "F": "FINISHED", "X": "FINISHED", "C": "FINISHED",
}
# Negative Exit_status values are PBS's own (JOB_EXEC_* in the PBS Pro sources); > 256 means killed by signal N-256.
JOB_EXEC_KILL_WALLTIME = -29


def parse_qsub(stdout: str) -> str:
    """qsub prints ``1234.server`` (PBS Pro, OpenPBS, Torque) or a bare ``1234`` (Slurm's wrapper)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines or not re.fullmatch(r"\d+(\[\d*\])?(\.[\w.-]+)?", lines[-1]):
        from rannc_cli.errors import RanncError

        raise RanncError(f"qsub printed no job id ({stdout.strip()[:200]!r})")
    return lines[-1]


def parse_qstat_full(text: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` text (PBS Pro, OpenPBS, Torque, slurm-wlm-torque) -> {job id: {attribute: value}}.

    Long values wrap onto lines that start with a tab and carry no ``=``; they are joined back."""
    jobs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key: str | None = None
    for raw in text.splitlines():
        if raw.startswith("Job Id:"):
            current = jobs.setdefault(raw.split(":", 1)[1].strip(), {})
            last_key = None
            continue
        if current is None or not raw.strip():
            continue
        line = raw.strip()
        if " = " in line:
            key, _, value = line.partition(" = ")
            current[key.strip()] = value.strip()
            last_key = key.strip()
        elif last_key is not None and raw[:1] == "\t":
            current[last_key] += line
    return jobs


def parse_qstat_json(text: str) -> dict[str, dict[str, Any]]:
    """``qstat -f -F json`` -> {job id: attributes}."""
    data = json.loads(text)
    return {jid: attrs for jid, attrs in (data.get("Jobs") or {}).items()}


def job_state(attrs: dict[str, Any]) -> PhaseState:
    """A normalised state from one job's qstat attributes."""
    letter = str(attrs.get("job_state", "")).strip()[:1]
    state = PBS_STATES.get(letter, "UNKNOWN")
    comment = str(attrs.get("comment", "")) or None
    if state != "FINISHED":
        # the scheduler's comment on a queued job; "Can Never Run: ..." means no node can ever hold it
        return PhaseState(state, reason=comment, never=state == "PENDING" and (comment or "").startswith("Can Never Run"))
    code_text = attrs.get("Exit_status", attrs.get("exit_status"))
    if code_text is None or str(code_text).strip() == "":
        return PhaseState("UNKNOWN", reason="finished; PBS gave no Exit_status")
    code = int(str(code_text).strip())
    if code == 0:
        return PhaseState("COMPLETED", 0)
    if code == JOB_EXEC_KILL_WALLTIME or "walltime" in (comment or "").lower() and "exceed" in (comment or "").lower():
        return PhaseState("TIMEOUT", code, reason=comment)
    if code in (271, 265, -11) or (code > 256 and code - 256 in (9, 15) and "qdel" in (comment or "")):
        return PhaseState("CANCELLED", code, reason=comment)
    return PhaseState("FAILED", code, reason=comment or f"exit status {code}")


def directive_options(script_text: str) -> list[str]:
    """The options of a script's ``#PBS`` lines, as qsub options.

    Several ``-l`` lines become one comma-joined ``-l`` (``select=...,walltime=...``): the same
    request to PBS, and the only form wrappers that keep just the last ``-l`` understand."""
    out: list[str] = []
    resources: list[str] = []
    for line in script_text.splitlines():
        if line.startswith("#PBS "):
            words = shlex.split(line[5:], comments=False)
            while words:
                if words[0] == "-l" and len(words) > 1:
                    resources.append(words[1])
                    words = words[2:]
                else:
                    out.append(words.pop(0))
        elif line.strip() and not line.startswith("#"):
            break   # PBS stops reading directives at the first command
    return out + (["-l", ",".join(resources)] if resources else [])


@register
class PBSBackend(Backend):
    name = "pbs"
    submit_command = "qsub"
    status_command = "qstat"

    @classmethod
    def precheck(cls, spec, runner) -> list[str]:
        """Nodes from pbsnodes; PBS nodes name their queues only where the site sets
        resources_available.Qlist (or similar), else every node is checked."""
        from rannc_cli.scheduler.precheck import check_nodes, require_command
        from rannc_cli.topology import pbs as pbs_facts

        require_command(spec, runner, cls.submit_command)
        notes: list[str] = []
        facts = pbs_facts.discover(runner, None)
        if spec.queue and any(n.get("partitions") for n in facts.nodes):
            facts = pbs_facts.discover(runner, spec.queue)
        elif spec.queue:
            notes.append(f"PBS nodes on {runner.host} do not name their queues: checked every node for queue {spec.queue}")
        check_nodes(spec, facts.nodes, f"queue {spec.queue}" if spec.queue else runner.host)
        return notes

    @staticmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        from rannc_cli.config import settings

        argv = ["qsub"]
        if script_text is not None and settings.get("pbs_directives_on_command_line"):
            argv += directive_options(script_text)
        argv += ["-j", "oe", "-o", f"{phase_dir}/batch.log"]
        if depends_on:
            argv += ["-W", f"depend=afterok:{depends_on}"]
        return argv + [script]

    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        text = self.t.read_text(script)
        res = self.run_checked(self.submit_argv(script, depends_on, phase_dir, text), "qsub")
        return parse_qsub(res.stdout)

    def _qstat(self, job_id: str) -> dict[str, Any] | None:
        for argv, parse in ((["qstat", "-x", "-f", "-F", "json", job_id], parse_qstat_json),
                            (["qstat", "-f", "-F", "json", job_id], parse_qstat_json),
                            (["qstat", "-f", job_id], parse_qstat_full)):
            res = self.t.run(argv)
            if res.rc != 0 or not res.stdout.strip():
                continue
            try:
                jobs = parse(res.stdout)
            except (ValueError, json.JSONDecodeError):
                continue
            short = job_id.split(".")[0]
            for jid, attrs in jobs.items():
                if jid == job_id or jid.split(".")[0] == short:
                    return attrs
        return None

    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        attrs = self._qstat(job_id)
        ended = self.ended(phase_dir)
        restarts = self.restarts(phase_dir)
        if attrs is None:
            return self.forgotten(job_id, phase_dir, "PBS no longer knows the job", ended)
        seen = job_state(attrs)
        seen.restarts = restarts
        if seen.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "UNKNOWN") and ended is not None:
            if seen.state in ("COMPLETED", "UNKNOWN"):
                ended.restarts = restarts
                return ended
            seen.exit_code = ended.exit_code if seen.exit_code is None else seen.exit_code
        return seen

    def cancel(self, job_id: str) -> None:
        self.run_checked(["qdel", job_id], "qdel")
