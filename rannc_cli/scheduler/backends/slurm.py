"""Slurm backend: sbatch, squeue, scancel; final states from the job's own rannc-exitcode file.

    backend = SlurmBackend(LocalTransport())
    jid = backend.submit("logs/x/profile.sh", None, "logs/x/profile")          # sbatch --parsable
    tid = backend.submit("logs/x/train.sh", jid, "logs/x/train")               # --dependency=afterok:<jid>
    backend.state(tid, "logs/x/train").state                                    # "PENDING", ...

No accounting is assumed (plain ``sacct`` fails without slurmdbd): ``squeue -j ID -t all`` answers
while the controller remembers the job (MinJobAge), the phase's rannc-exitcode file afterwards.
A dependent job is submitted with ``--kill-on-invalid-dep=yes``, so a failed profiling job
cancels the training job instead of leaving it pending forever.
"""

from __future__ import annotations

from rannc_cli.scheduler.backend import Backend, PhaseState, register

SLURM_STATES = {
    "PENDING": "PENDING", "CONFIGURING": "PENDING", "RESV_DEL_HOLD": "PENDING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "SIGNALING": "RUNNING", "STAGE_OUT": "RUNNING",
    "SUSPENDED": "RUNNING", "STOPPED": "RUNNING", "RESIZING": "RUNNING",
    "REQUEUED": "REQUEUED", "REQUEUE_FED": "REQUEUED", "REQUEUE_HOLD": "REQUEUED", "PREEMPTED": "REQUEUED",
    "COMPLETED": "COMPLETED",
    "FAILED": "FAILED", "NODE_FAIL": "FAILED", "BOOT_FAIL": "FAILED", "OUT_OF_MEMORY": "FAILED", "DEADLINE": "FAILED",
    "CANCELLED": "CANCELLED", "REVOKED": "CANCELLED",
    "TIMEOUT": "TIMEOUT",
}


# squeue %r reasons that no amount of waiting changes (Slurm's "Job Reason Codes"); ReqNodeNotAvail
# lists the down/drained nodes a job asked for by name.
NEVER_REASONS = ("PartitionConfig", "BadConstraints", "ReqNodeNotAvail", "PartitionNodeLimit",
                 "PartitionTimeLimit", "InvalidAccount", "InvalidQOS", "QOSMaxGRESPerJob", "AssocMaxJobsLimit")


def never_starts(reason: str) -> bool:
    """True for a pending reason that means the job can never start as submitted."""
    return any(reason.startswith(r) for r in NEVER_REASONS)


def parse_sbatch(stdout: str) -> str:
    """``sbatch --parsable`` prints ``ID`` or ``ID;cluster``."""
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = line.split(";")[0].strip()
    if not job_id.isdigit():
        from rannc_cli.errors import RanncError

        raise RanncError(f"sbatch printed no job id ({stdout.strip()[:200]!r})")
    return job_id


def parse_squeue(stdout: str) -> tuple[str, str] | None:
    """``squeue -h -o '%T|%r'`` -> (Slurm state, reason) of the first line, None when empty."""
    for line in stdout.splitlines():
        if line.strip():
            state, _, reason = line.strip().partition("|")
            return state.split()[0].rstrip("+"), reason
    return None


def _max_cpus_per_node(runner, partition: str) -> int | None:
    """The partition's MaxCPUsPerNode (``scontrol show partition``), None when unlimited or unknown."""
    import re

    res = runner.run(["scontrol", "show", "partition", partition])
    m = re.search(r"MaxCPUsPerNode=(\d+)", res.stdout) if res.rc == 0 else None
    return int(m.group(1)) if m else None


@register
class SlurmBackend(Backend):
    name = "slurm"
    submit_command = "sbatch"
    status_command = "squeue"
    queue_word = "partition"

    @classmethod
    def precheck(cls, spec, runner) -> list[str]:
        """Nodes of the partition (the default one when none is asked) and its time limit."""
        from rannc_cli.scheduler.precheck import check_cpus, check_nodes, check_time, require_command
        from rannc_cli.topology import slurm as slurm_facts

        require_command(spec, runner, cls.submit_command)
        notes: list[str] = []
        facts = slurm_facts.discover(runner, spec.queue)
        default = next((p["name"] for p in facts.partitions if p.get("default")), None)
        if not spec.queue and default:   # sbatch without --partition uses the default partition
            facts.nodes = [n for n in facts.nodes if default in (n.get("partitions") or [default])]
            notes.append(f"checked against the default partition {default}")
        where = f"partition {spec.queue}" if spec.queue else f"default partition {default}" if default else runner.host
        check_nodes(spec, facts.nodes, where)
        part = next((p for p in facts.partitions if p["name"] == spec.queue or (not spec.queue and p.get("default"))), None)
        if part:
            check_time(spec, part.get("max_time"), f"partition {part['name']}")
        check_cpus(spec, facts.nodes, where, _max_cpus_per_node(runner, part["name"]) if part else None)
        return notes

    @staticmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        argv = ["sbatch", "--parsable", f"--output={phase_dir}/batch-%j.log", f"--chdir={phase_dir}"]
        if depends_on:
            argv += [f"--dependency=afterok:{depends_on}", "--kill-on-invalid-dep=yes"]
        return argv + [script]

    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        res = self.run_checked(self.submit_argv(script, depends_on, phase_dir), "sbatch")
        return parse_sbatch(res.stdout)

    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        res = self.t.run(["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T|%r"])
        seen = parse_squeue(res.stdout) if res.rc == 0 else None
        if res.rc != 0 and "Invalid job id" not in res.stderr:
            self.run_checked(["squeue", "-h", "-j", job_id], "squeue")   # raises with Slurm's message
        ended = self.ended(phase_dir)
        if seen is None:
            return self.forgotten(job_id, phase_dir, "Slurm no longer knows the job", ended)
        raw, reason = seen
        state = SLURM_STATES.get(raw, "UNKNOWN")
        restarts = self.restarts(phase_dir)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            code = ended.exit_code if ended is not None else None
            if state == "COMPLETED" and ended is not None and ended.state != "COMPLETED":
                state = ended.state     # the batch script exited 0 but the phase recorded a failure
            return PhaseState(state, code, reason=None if reason in ("None", "") else reason, restarts=restarts)
        if state == "PENDING" and reason == "DependencyNeverSatisfied":
            return PhaseState("CANCELLED", reason="its dependency failed", restarts=restarts)
        return PhaseState(state, reason=None if reason in ("None", "") else reason, restarts=restarts,
                          never=state == "PENDING" and never_starts(reason))

    def cancel(self, job_id: str) -> None:
        self.run_checked(["scancel", job_id], "scancel")
