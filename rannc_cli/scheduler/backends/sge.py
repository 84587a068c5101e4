"""Grid Engine backend (Son of / Univa / Altair Grid Engine; TSUBAME 4.0): qsub, qstat, qacct, qdel.

    backend = SGEBackend(transport)
    jid = backend.submit("logs/x/profile.sh", None, "logs/x/profile")     # qsub -terse -> "41"
    tid = backend.submit("logs/x/train.sh", jid, "logs/x/train")          # -hold_jid 41 -v RANNC_AFTER=41
    backend.state(tid, "logs/x/train")                                     # PhaseState("PENDING", reason=...)

Grid Engine starts a ``-hold_jid`` successor once its predecessor left the system, however it
ended (even after a qdel), so the training script checks the profiling phase's rannc-exitcode
itself and stops, leaving ``rannc-dependency-failed``, when that phase did not succeed. State:
``qstat -u '*' -xml`` (the state letters) while the job is known, ``qstat -j`` for the pending
reason ("scheduling info:"; a reason that says it cannot run is confirmed against an empty
cluster with ``qalter -w v``, which makes it a "never"), then the phase's rannc-exitcode and
``qacct -j`` (``failed 37``: killed at the time limit).

A site describes its request in ``submit: sge:`` of its config (see ``resource_lines``):
``resource_types`` (TSUBAME: ``{4: node_f, 2: node_h, 1: node_q}`` -> ``-l node_f=N``), else a
parallel environment ``pe`` with slots and a ``gpu_complex`` (``-l gpu=G``); ``warning``
(``s_rt``: the soft limit sends SIGUSR1 ``signal_seconds`` before the time limit, or ``none``);
``launcher`` (the site's MPI launcher for the ranks, ``{ranks}``, ``{gpus}``, ``{nodes}`` filled in;
else ``qrsh -inherit`` per rank on several hosts, ``rannc run`` on one).
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backend import CANCELLED_BY_USER, Backend, PhaseState, register

DEPENDENCY_FAILED = "rannc-dependency-failed"
QSUB_LINE = "# rannc-qsub: "     # options a template wants on qsub's command line (e.g. TSUBAME's -g GROUP)
# "scheduling info" phrases that say the job does not fit where it asked; qalter -w v confirms "never".
CANNOT_RUN = ("cannot run in any queue", "cannot run at host", "cannot run in queue", "cannot run in PE",
              "offers only", "no suitable queues")
FAILED_TIME_LIMIT = 37       # qacct "failed 37: qmaster enforced h_rt, h_cpu, or h_vmem limit"
FAILED_RESCHEDULED = 25      # qacct "failed 25: rescheduling" (exit 99 or qmod -rj)


# ---------------------------------------------------------------------- parsers
def parse_qsub(stdout: str) -> str:
    """``qsub -terse`` prints the bare job id (``41``, or ``41.1-4:1`` for an array)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines or not re.fullmatch(r"\d+(\.[\d:-]+)?", lines[-1]):
        raise RanncError(f"qsub printed no job id ({stdout.strip()[:200]!r})")
    return lines[-1].split(".")[0]


def parse_qstat_xml(text: str) -> dict[str, str]:
    """``qstat -u '*' -xml`` -> {job id: state letters} (``qw``, ``hqw``, ``r``, ``Rr``, ``Eqw``, ``dr``, ...)."""
    jobs: dict[str, str] = {}
    root = ET.fromstring(text)
    for item in root.iter("job_list"):
        number = (item.findtext("JB_job_number") or "").strip()
        if number:
            jobs.setdefault(number, (item.findtext("state") or "").strip())
    return jobs


def parse_qstat_j(text: str) -> dict[str, str]:
    """``qstat -j ID`` -> {field: value}; continuation lines (scheduling info) are joined with ``; ``."""
    fields: dict[str, str] = {}
    last: str | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.startswith("="):
            continue
        m = re.match(r"^(\S[^:]*?):\s+(.*)$", raw)
        if m and not raw[0].isspace():
            last = m.group(1).strip()
            fields[last] = m.group(2).strip()
        elif last is not None and raw[0].isspace():
            fields[last] = f"{fields[last]}; {raw.strip()}"
    return fields


def parse_qacct(text: str) -> dict[str, str] | None:
    """``qacct -j ID`` -> the last record's fields (a rerun job has one record per run)."""
    records: list[dict[str, str]] = []
    for raw in text.splitlines():
        if raw.startswith("====="):
            records.append({})
            continue
        parts = raw.split(None, 1)
        if parts and records:
            records[-1][parts[0]] = parts[1].strip() if len(parts) > 1 else ""
    return records[-1] if records else None


def failed_code(record: dict[str, str]) -> int:
    """qacct's ``failed`` field (``37  : qmaster enforced h_rt...``) as a number."""
    m = re.match(r"\s*(\d+)", record.get("failed", "0"))
    return int(m.group(1)) if m else 0


def pending_reason(fields: dict[str, str]) -> str | None:
    """The scheduler's words for why a job waits: the first lines of ``scheduling info``, or its hold."""
    info = fields.get("scheduling info")
    if info and "job dropped because of job dependencies" in info and fields.get("jid_predecessor_list"):
        return f"waiting for job {fields['jid_predecessor_list']} (-hold_jid)"
    if info:
        parts = [p.strip() for p in info.split(";") if p.strip()]
        return "; ".join(parts[:3]) + (f" (+{len(parts) - 3} more)" if len(parts) > 3 else "")
    if fields.get("jid_predecessor_list"):
        return f"waiting for job {fields['jid_predecessor_list']} (-hold_jid)"
    return None


def cannot_run(reason: str | None) -> bool:
    return bool(reason) and any(p in reason for p in CANNOT_RUN)


def directive_words(script_text: str | None) -> list[str]:
    """The words of the script's ``# rannc-qsub:`` lines, for qsub's command line."""
    words: list[str] = []
    for line in (script_text or "").splitlines():
        if line.startswith(QSUB_LINE):
            words += shlex.split(line[len(QSUB_LINE):])
    return words


# ---------------------------------------------------------------------- the request
def resource_lines(spec, nodes: int, gpus: int) -> list[str]:
    """The ``-l``/``-pe`` options of a request for ``nodes`` x ``gpus``, in the site's dialect.

    ``resource_types: {4: node_f, ...}`` (TSUBAME) asks ``-l node_f=<nodes>``; otherwise slots in the
    parallel environment ``pe`` (default ``smp`` on one node, ``mpi`` on several: names every Grid
    Engine install defines differently, so sites set it) plus ``-l <gpu_complex>=<gpus>``."""
    opts = spec.scheduler_options or {}
    types = {int(k): str(v) for k, v in (opts.get("resource_types") or {}).items()}
    if types:
        fitting = sorted(k for k in types if k >= gpus)
        if not fitting:
            raise RanncError(f"--gpus {gpus}: no resource type of site {spec.site} has that many GPUs per node "
                             f"({', '.join(f'{v}: {k}' for k, v in sorted(types.items()))})")
        return [f"-l {types[fitting[0]]}={nodes}"]
    per_gpu = int(opts.get("slots_per_gpu") or spec.cpus_per_gpu or 1)
    if nodes == 1:
        pe = str(opts.get("pe") or "smp")
    else:
        pe = str(opts.get("pe_multinode") or opts.get("pe") or "mpi")
    lines = [f"-pe {pe} {nodes * gpus * per_gpu}"]
    complex_name = opts.get("gpu_complex", "gpu")
    if complex_name:
        lines.append(f"-l {complex_name}={gpus}")
    return lines


def account_line(spec) -> str | None:
    """The group/project option: the site's form (``-g <group>`` on TSUBAME), else ``-P <project>``."""
    if not spec.account:
        return None
    flag = (spec.account_option or "-P <project>").split()[0]
    return f"{flag} {spec.account}"


def launcher_line(spec) -> str | None:
    """The site's MPI launcher command with ranks/gpus/nodes filled in; None: rannc starts the ranks."""
    text = (spec.scheduler_options or {}).get("launcher")
    if text in ("qrsh", "local"):
        return None
    if not text:   # the generic `submit: mpi:` line, as on PBS: rannc adds -n <ranks>
        return f"{spec.mpi} -n {spec.nodes * spec.gpus}" if spec.mpi else None
    return str(text).format(ranks=spec.nodes * spec.gpus, gpus=spec.gpus, nodes=spec.nodes)


@register
class SGEBackend(Backend):
    name = "sge"
    submit_command = "qsub"
    status_command = "qstat"

    def __init__(self, transport):
        super().__init__(transport)
        self._never: dict[str, bool] = {}

    @classmethod
    def template_values(cls, spec) -> dict[str, Any]:
        from rannc_cli.scheduler.spec import hms

        opts = spec.scheduler_options or {}
        warning = str(opts.get("warning", "s_rt"))
        if warning not in ("s_rt", "none"):
            raise RanncError(f"site config {spec.site}: submit: sge: warning {warning!r} is not s_rt or none")
        soft = spec.time_seconds - spec.signal_seconds if spec.time_seconds and spec.requeue and warning == "s_rt" else 0
        return {"sge": {"profile_resources": resource_lines(spec, 1, 1),
                        "train_resources": resource_lines(spec, spec.nodes, spec.gpus),
                        "h_rt": hms(spec.time_seconds) if spec.time_seconds else "",
                        "s_rt": hms(soft) if soft > 0 else "",
                        "account": account_line(spec),
                        "launcher": launcher_line(spec),
                        "qrsh": opts.get("launcher") == "qrsh"}}

    @classmethod
    def precheck(cls, spec, runner) -> list[str]:
        """The queue's h_rt limit, the hosts' GPU complex, then Grid Engine's own verdict on the request
        against an empty cluster (``qsub -w v``, nothing submitted): refused here, it could never start."""
        from rannc_cli.scheduler.precheck import check_nodes, check_time, require_command

        require_command(spec, runner, cls.submit_command)
        if not runner.which("qconf"):
            raise RanncError(f"qconf not found on {runner.host}: its qsub is not Grid Engine's",
                             hint="put Grid Engine's commands first on PATH there (source $SGE_ROOT/default/common/settings.sh)")
        notes: list[str] = []
        opts = spec.scheduler_options or {}
        if spec.queue and not opts.get("resource_types"):
            res = runner.run(["qconf", "-sq", spec.queue])
            if res.rc != 0:
                raise RanncError(f"queue {spec.queue!r} does not exist on {runner.host}: "
                                 f"{' '.join((res.stderr or res.stdout).split())[:200]}",
                                 hint="see qconf -sql for the queues, or drop --queue")
            limit = re.search(r"^h_rt\s+(\S+)", res.stdout, flags=re.M)
            check_time(spec, limit.group(1) if limit else None, f"queue {spec.queue}")
        complex_name = opts.get("gpu_complex", "gpu")
        if complex_name and not opts.get("resource_types"):
            hosts = _exec_hosts(runner, str(complex_name))
            if hosts:
                check_nodes(spec, hosts, f"queue {spec.queue}" if spec.queue else f"Grid Engine on {runner.host}")
            else:
                notes.append(f"no execution host on {runner.host} reports a {complex_name} complex: GPUs not checked")
        lines = resource_lines(spec, spec.nodes, spec.gpus)
        argv = ["qsub", "-w", "v", "-b", "y", "-N", "rannc-precheck"]
        for line in lines + ([f"-l h_rt={spec.time_seconds}"] if spec.time_seconds else []):
            argv += line.split()
        if spec.queue and not opts.get("resource_types"):
            argv += ["-q", spec.queue]
        argv.append("/bin/true")
        res = runner.run(argv)
        verdict = " ".join((res.stdout + " " + res.stderr).split())
        if res.rc != 0 or "no suitable queues" in verdict:
            raise RanncError(f"Grid Engine can never run {spec.nodes} node(s) x {spec.gpus} GPUs "
                             f"({' '.join(lines)}): {verdict[:300]}",
                             hint="ask for what the queues offer (qhost -F, qconf -sq), or another --queue")
        return notes

    @staticmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        argv = ["qsub", "-terse", "-j", "y", "-o", f"{phase_dir}/batch-$JOB_ID.log", "-wd", phase_dir]
        argv += directive_words(script_text)
        if depends_on:
            argv += ["-hold_jid", depends_on, "-v", f"RANNC_AFTER={depends_on}"]
        return argv + [script]

    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        text = self.t.read_text(script)
        res = self.run_checked(self.submit_argv(script, depends_on, phase_dir, text), "qsub")
        return parse_qsub(res.stdout)

    # ------------------------------------------------------------------ state
    def _letters(self, job_id: str) -> str | None:
        res = self.t.run(["qstat", "-u", "*", "-xml"])
        if res.rc != 0:
            self.run_checked(["qstat", "-u", "*"], "qstat")    # raises with Grid Engine's message
        try:
            return parse_qstat_xml(res.stdout).get(job_id)
        except ET.ParseError:
            return None

    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        letters = self._letters(job_id)
        restarts = self.restarts(phase_dir)
        if letters is not None:
            return self._live(job_id, letters, restarts)
        if self.t.exists(f"{phase_dir}/{DEPENDENCY_FAILED}"):
            return PhaseState("CANCELLED", reason="its dependency (the profiling job) did not succeed", restarts=restarts)
        ended = self.ended(phase_dir)
        if ended is not None and ended.state == "COMPLETED":
            return ended
        res = self.t.run(["qacct", "-j", job_id])
        record = parse_qacct(res.stdout) if res.rc == 0 else None
        if record is not None:
            failed = failed_code(record)
            code = _int(record.get("exit_status"))
            if failed == FAILED_TIME_LIMIT:
                return PhaseState("TIMEOUT", code, reason=record.get("failed", "").split(":", 1)[-1].strip() or None,
                                  restarts=restarts)
            if ended is not None:
                return ended
            if self.t.exists(f"{phase_dir}/{CANCELLED_BY_USER}"):
                return PhaseState("CANCELLED", code, reason="cancelled by rannc cancel", restarts=restarts)
            if failed == 100 and code in (137, 143):     # "assumedly after job": killed by qdel
                return PhaseState("CANCELLED", code, reason="deleted (qdel)", restarts=restarts)
            if failed or code:
                why = record.get("failed", "") if failed else f"exit status {code}"
                return PhaseState("FAILED", code, reason=" ".join(why.split()), restarts=restarts)
            return PhaseState("FAILED", code, reason="ended without recording its exit (see the batch log)",
                              restarts=restarts)
        return self.forgotten(job_id, phase_dir, "Grid Engine no longer lists the job, qacct has no record yet", ended)

    def _live(self, job_id: str, letters: str, restarts: int) -> PhaseState:
        if "E" in letters:
            fields = self._fields(job_id)
            why = fields.get("error reason") or "the job is in error state"
            return PhaseState("PENDING", reason=f"error state ({letters}): {' '.join(why.split())}", restarts=restarts,
                              never=True)
        if "d" in letters:
            return PhaseState("RUNNING", reason="being deleted", restarts=restarts)
        if "R" in letters and "q" in letters:
            return PhaseState("REQUEUED", reason="rescheduled", restarts=restarts)
        if any(c in letters for c in "rt"):
            return PhaseState("RUNNING", reason="suspended" if any(c in letters for c in "sST") else None,
                              restarts=restarts)
        if any(c in letters for c in "sST"):
            return PhaseState("RUNNING", reason="suspended", restarts=restarts)
        fields = self._fields(job_id)
        reason = pending_reason(fields)
        never = False
        if cannot_run(reason) and "h" not in letters:
            never = self._never.get(job_id)
            if never is None:
                verdict = self.t.run(["qalter", "-w", "v", job_id])
                never = "no suitable queues" in verdict.stdout + verdict.stderr
                self._never[job_id] = never
        return PhaseState("PENDING", reason=reason, restarts=restarts, never=bool(never))

    def _fields(self, job_id: str) -> dict[str, str]:
        res = self.t.run(["qstat", "-j", job_id])
        return parse_qstat_j(res.stdout) if res.rc == 0 else {}

    def cancel(self, job_id: str) -> None:
        res = self.t.run(["qdel", job_id])
        if res.rc != 0 and "does not exist" not in res.stdout + res.stderr:
            self.run_checked(["qdel", job_id], "qdel")


def _int(text: str | None) -> int | None:
    m = re.match(r"\s*(-?\d+)", text or "")
    return int(m.group(1)) if m else None


def _exec_hosts(runner, complex_name: str, limit: int = 200) -> list[dict[str, Any]]:
    """Execution hosts with their ``complex_values`` GPU count (``qconf -se``) and whether they report load."""
    res = runner.run(["qconf", "-sel"])
    if res.rc != 0:
        return []
    names = [n.strip() for n in res.stdout.split() if n.strip()][:limit]
    up = set()
    qhost = runner.run(["qhost"])
    for line in qhost.stdout.splitlines():
        words = line.split()
        if len(words) > 3 and words[0] not in ("HOSTNAME", "global") and words[3] != "-":
            up.add(words[0])
    hosts = []
    for name in names:
        conf = runner.run(["qconf", "-se", name])
        m = re.search(rf"(?:^|[ ,]){re.escape(complex_name)}=(\d+)", conf.stdout, flags=re.M)
        if m is None and not re.search(r"^complex_values", conf.stdout, flags=re.M):
            continue
        hosts.append({"name": name, "gpus": int(m.group(1)) if m else 0,
                      "available": name in up or name.split(".")[0] in up})
    return hosts
