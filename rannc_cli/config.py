"""One registry of settings, with defaults, docs and overrides.

    from rannc_cli.config import settings
    settings.get("cache_dir")            # RANNC_CACHE_DIR, then the config file, then the default

Order of precedence (highest first): an explicit value given to ``get``'s caller
(CLI flag), the environment variable ``RANNC_<NAME>``, the user config file
(``RANNC_CONFIG`` or ``~/.config/rannc/config.yaml``), the registry default.
``rannc config`` lists every setting with its current value and source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from rannc_cli.errors import RanncError


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _comma_ints(text: str) -> str:
    """``"2,1,1"`` (kept as text); every item a positive integer."""
    items = [x.strip() for x in str(text).strip("[]() ").split(",") if x.strip()]
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise ValueError("not a comma list of integers like 2,1,1") from None
    if any(v < 1 for v in values):
        raise ValueError("every count must be at least 1")
    return ",".join(map(str, values))


def _comma_ints_or_empty(text: str) -> str:
    """``_comma_ints`` or empty (empty: decide for me)."""
    return _comma_ints(text) if str(text).strip("[]() ") else ""


def _existing_file_or_empty(text: str) -> str:
    """A path to a file that exists (kept as given), or empty."""
    if str(text).strip() and not Path(str(text)).expanduser().is_file():
        raise ValueError(f"{text} is not a file")
    return str(text).strip()


def _memory_size(text: str) -> str:
    """``"4GiB"`` (kept as text) or empty; must read as a positive size."""
    if str(text).strip():
        from rannc_cli.planner.cluster import parse_size

        parse_size(str(text))
    return str(text).strip()


@dataclass(frozen=True)
class Setting:
    """One setting: its default, meaning, parser and the values it allows.

        Setting("profile_repeats", 5, "timed runs per block", int, minimum=1)
        Setting("checkpoint", "auto", "activation checkpointing", choices=("auto", "on", "off"))

    ``minimum``/``maximum`` bound numbers inclusively, ``above`` exclusively; ``choices`` lists the
    allowed texts (``""`` among them where empty means "decide for me").
    """

    name: str
    default: Any
    doc: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None

    @property
    def env_var(self) -> str:
        return "RANNC_" + self.name.upper()

    def allowed(self) -> str:
        """What the setting accepts, for error hints: ``one of auto, on, off`` / ``a number >= 1``."""
        if self.choices:
            return "one of " + ", ".join(c for c in self.choices if c)
        kind = "an integer" if self.parse is int else "a number" if self.parse is float else "a value"
        bounds = [f">= {_num(self.minimum)}" if self.minimum is not None else "",
                  f"> {_num(self.above)}" if self.above is not None else "",
                  f"<= {_num(self.maximum)}" if self.maximum is not None else ""]
        bounds = [b for b in bounds if b]
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def convert(self, value: Any) -> Any:
        """Parse and check ``value`` (text from the environment, or a config file's YAML value).

        Raises ValueError saying what is wrong; the caller names where the value came from.
        """
        if isinstance(value, (list, tuple)) and self.parse is _comma_ints:
            value = ",".join(map(str, value))
        if isinstance(value, bool) and self.parse in (int, float):
            raise ValueError(f"expected {self.allowed()}")
        try:
            parsed = self.parse(value if isinstance(value, str) else str(value))
        except RanncError as exc:
            raise ValueError(exc.message) from None
        except ValueError as exc:
            raise ValueError(f"expected {self.allowed()}" if self.parse in (int, float) else
                             "expected true or false" if self.parse is _parse_bool else str(exc)) from None
        if self.choices and parsed not in self.choices:
            raise ValueError(f"expected {self.allowed()}")
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            if parsed != parsed or (self.minimum is not None and parsed < self.minimum) or \
                    (self.maximum is not None and parsed > self.maximum) or \
                    (self.above is not None and parsed <= self.above):
                raise ValueError(f"expected {self.allowed()}")
        return parsed


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


REGISTRY: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("cache_dir", str(Path.home() / ".cache" / "rannc"), "Where profiles (and later plans) are cached."),
        Setting("logs_dir", "logs", "Folder holding one sub-folder per job."),
        Setting("capture_reuse_layers", True, "Capture: trace each run of identical sibling layers once and copy its graph (false: export the whole model; docs/capture.md).", _parse_bool),
        Setting("block_target", 64, "Capture: split modules until about this many atomic blocks exist.", int, minimum=1),
        Setting("profile_warmup", 2, "Profiling: untimed warm-up runs per block and microbatch size.", int, minimum=0),
        Setting("profile_repeats", 5, "Profiling: timed runs per block and size; the median is kept.", int, minimum=1),
        Setting("profile_budget_seconds", 1.0, "Profiling: stop timing a block once this much timed work is done (at least one run).", float, above=0),
        Setting("profile_microbatch_sizes", "", "Profiling: microbatch sizes to measure (comma list); empty means powers of two up to the batch, at most 4 sizes.", parse=_comma_ints_or_empty),
        Setting("device_spec", "", "Estimate mode: device spec name from configs/devices.yaml (empty: the current device's, else the generic CPU).", str),
        Setting("memory_margin", 0.1, "Planner: fraction of GPU memory kept free.", float, minimum=0, maximum=0.99),
        Setting("optimizer_state_factor", 2.0, "Planner: optimizer state bytes per parameter byte (Adam: 2).", float, minimum=0),
        Setting("link_intra_bandwidth", 25e9, "Planner without a topology file: GPU-to-GPU bytes/s inside a node (default: PCIe 4.0 x16 peer-to-peer).", float, above=0),
        Setting("link_intra_latency", 10e-6, "Planner without a topology file: seconds per message inside a node.", float, minimum=0),
        Setting("link_inter_bandwidth", 12.5e9, "Planner without a topology file: GPU-to-GPU bytes/s between nodes (default: 100 Gb/s InfiniBand).", float, above=0),
        Setting("link_inter_latency", 20e-6, "Planner without a topology file: seconds per message between nodes.", float, minimum=0),
        Setting("allreduce_intra_bandwidth", 20e9, "Planner without a topology file: ring all-reduce bus bytes/s inside a node.", float, above=0),
        Setting("allreduce_intra_latency", 20e-6, "Planner without a topology file: seconds per ring step inside a node.", float, minimum=0),
        Setting("allreduce_inter_bandwidth", 10e9, "Planner without a topology file: ring all-reduce bus bytes/s across nodes.", float, above=0),
        Setting("allreduce_inter_latency", 40e-6, "Planner without a topology file: seconds per ring step across nodes.", float, minimum=0),
        Setting("planner_max_units", 24, "Planner: coarsen the profile's blocks to at most this many units before the search.", int, minimum=1),
        Setting("planner_dp_budget", 40, "Planner: most DP runs per (schedule, microbatch count) before the search stops and reports its optimality gap (0: no cap).", int, minimum=0),
        Setting("planner_max_microbatches", 256, "Planner: largest microbatch count the search tries.", int, minimum=1),
        Setting("scheduler", "", "rannc submit: scheduler when neither --scheduler nor --site names one (slurm, pbs, local; empty: local).", str),
        Setting("poll_seconds", 5.0, "rannc submit --wait / logs --follow: seconds between scheduler queries.", float, above=0),
        Setting("requeue", True, "rannc submit: checkpoint on the scheduler's warning signal and requeue the training job.", _parse_bool),
        Setting("requeue_signal_seconds", 120, "rannc submit: send the warning signal (SIGUSR1) this many seconds before the time limit.", int, minimum=0),
        Setting("max_requeues", 3, "rannc submit: requeue a training job at most this many times.", int, minimum=0),
        Setting("remote_dir", "rannc-jobs", "rannc submit --host: folder for job folders on the login node (relative: under the remote home).", str),
        Setting("remote_python", "python3", "rannc submit --host: the Python that runs rannc and the script on the cluster (site configs may set submit.python).", str),
        Setting("templates_dir", "", "rannc submit: a folder of job script templates searched before templates/ (per backend: <dir>/slurm/train.sh.j2).", str),
        Setting("profile_script_check", True, "rannc submit --profile: refuse a profile made from a script of another name (false: only the training job's graph check).", _parse_bool),
        Setting("pbs_directives_on_command_line", True, "rannc submit on PBS: repeat the script's #PBS directives as qsub options (needed by Slurm's PBS wrappers; harmless on PBS).", _parse_bool),
        # runtime (RaNNCModule under `rannc run`, torchrun, srun or mpiexec; docs/runtime.md)
        Setting("plan", "", "Runtime: plan file to run (`rannc plan --out`); empty means rank 0 profiles and plans at the first forward.", parse=_existing_file_or_empty),
        Setting("stages", 0, "Runtime planning: force this many pipeline stages (0: the planner decides).", int, minimum=0),
        Setting("replicas", "", "Runtime planning: force replicas per stage, a comma list like 2,1,1 (implies stages).", parse=_comma_ints_or_empty),
        Setting("microbatches", 0, "Runtime planning: force this many microbatches (0: the planner decides).", int, minimum=0),
        Setting("schedule", "", "Runtime planning: force the pipeline schedule, 1f1b, gpipe, interleaved or zb (empty, the default: the planner decides; a plan file keeps its own).", str, choices=("1f1b", "gpipe", "interleaved", "zb", "")),
        Setting("virtual_stages", 0, "Runtime planning: force v model chunks per GPU group (v > 1: the interleaved schedule; 0: the planner decides).", int, minimum=0),
        Setting("zero", "", "Runtime planning: ZeRO-1, the optimizer state sharded over a stage's replicas: 1 on, 0 off (empty: the planner decides).", str, choices=("0", "1", "")),
        Setting("checkpoint", "auto", "Runtime: activation checkpointing per stage: auto (as the plan says), on or off.", str, choices=("auto", "on", "off")),
        Setting("runtime_timeout", 300.0, "Runtime: seconds a collective or transfer may wait before the job fails (bounds hangs when a rank dies).", float, above=0),
        Setting("hang_timeout_seconds", 60.0, "Runtime: a rank whose heartbeat has not changed for this many seconds is named as hung and the job ends (0: off, then runtime_timeout bounds a hang).", float, minimum=0),
        Setting("heartbeat_dir", "", "Runtime: folder of the ranks' heartbeat files (`rannc run` and the Slurm/PBS job scripts set RANNC_HEARTBEAT_DIR; empty: no heartbeats).", str),
        Setting("runtime_device", "auto", "Runtime: auto (the local GPU if any, else CPU), cpu or cuda.", str, choices=("auto", "cpu", "cuda")),
        Setting("runtime_profile", "auto", "Runtime planning: how rank 0 profiles, measured or estimated (auto: measured on CPU, estimated on GPUs).", str, choices=("auto", "measured", "estimated")),
        Setting("runtime_memory", "", "Runtime planning: memory per process to plan for, like 4GiB (empty: the GPU's, or host memory / processes).", parse=_memory_size),
        Setting("checkpoint_dir", "", "Runtime: on SIGUSR1 checkpoint here and exit 0; resume from here at the next start (job scripts set RANNC_CHECKPOINT_DIR).", str),
        Setting("loss_reduction", "mean", "Runtime: how the model's loss reduces over the batch, mean or sum (microbatch losses are combined to match).", str, choices=("mean", "sum")),
        Setting("allreduce_bucket_mb", 25.0, "Runtime: MiB per gradient all-reduce bucket when the plan overlaps the all-reduce with the backward (allreduce_overlap).", float, above=0),
        Setting("batchnorm", "local", "Runtime: BatchNorm statistics per microbatch slice (local) or shared across a stage's replicas (sync, as SyncBatchNorm).", str, choices=("local", "sync")),
    ]
}


# RANNC_* variables that are not settings: read by rannc itself, or set by its job scripts for the ranks.
ENVIRONMENT_ONLY: dict[str, str] = {
    "RANNC_CONFIG": "the user config file (default ~/.config/rannc/config.yaml)",
    "RANNC_DEBUG": "print tracebacks behind error lines",
    "RANNC_JOB_DIR": "set by job scripts: the job folder",
    "RANNC_RESTART_COUNT": "set by job scripts: how often the training job was requeued",
    "RANNC_MASTER_ADDR": "job scripts: rendezvous host instead of the first node",
    "RANNC_MASTER_PORT": "job scripts: rendezvous port",
    "RANNC_REQUEUING": "job scripts: a requeue is under way",
    "RANNC_WARNED": "job scripts: the warning signal arrived",
    "RANNC_GPUS_PER_NODE": "job scripts: GPUs per node, for a site's `submit: mpi:` line",
    "RANNC_AFTER": "Grid Engine job scripts: the profiling job the training job waits for",
    "RANNC_UPDATE_GOLDEN": "tests: rewrite the golden job scripts",
    "RANNC_TEST_OPENPBS": "tests: the prebuilt OpenPBS install tree for the real-server tests",
    "RANNC_TESTBED_CACHE": "tests: where testbed packages are unpacked",
}


class Settings:
    """Resolved view of the registry (environment and config file).

        Settings(environ={"RANNC_STAGES": "2"}).check_all()    # RanncError naming every bad or unknown variable
    """

    def __init__(self, registry: dict[str, Setting] = REGISTRY, environ: Mapping[str, str] | None = None):
        self._registry = registry
        self._environ = environ
        self._file_values: dict[str, Any] | None = None

    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def config_file(self) -> Path:
        return Path(self.environ.get("RANNC_CONFIG") or Path.home() / ".config" / "rannc" / "config.yaml")

    def _from_file(self) -> dict[str, Any]:
        if self._file_values is None:
            path = self.config_file()
            values: dict[str, Any] = {}
            if self.environ.get("RANNC_CONFIG") and not path.is_file():
                raise RanncError(f"RANNC_CONFIG names {path}, which is not a file",
                                 hint="create it (setting: value lines) or unset RANNC_CONFIG")
            if path.is_file():
                import yaml

                try:
                    loaded = yaml.safe_load(path.read_text()) or {}
                except yaml.YAMLError as exc:
                    from rannc_cli.fileio import yaml_problem

                    raise RanncError(f"config file {path} is not valid YAML ({yaml_problem(exc)})",
                                     hint="fix or remove it") from None
                except (OSError, UnicodeDecodeError) as exc:
                    raise RanncError(f"cannot read config file {path} ({getattr(exc, 'strerror', None) or exc})",
                                     hint="fix its permissions or unset RANNC_CONFIG") from None
                if not isinstance(loaded, dict):
                    raise RanncError(f"config file {path} must be a mapping of setting: value")
                unknown = sorted(set(map(str, loaded)) - set(self._registry))
                if unknown:
                    raise RanncError(f"config file {path} has unknown settings: "
                                     f"{', '.join(_did_you_mean(u, self._registry) for u in unknown)}",
                                     hint="`rannc config` lists the known ones")
                values = loaded
            self._file_values = values
        return self._file_values

    def get(self, name: str) -> Any:
        return self.resolve(name)[0]

    def resolve(self, name: str) -> tuple[Any, str]:
        """Return (value, source) where source is 'env', 'file' or 'default'."""
        try:
            setting = self._registry[name]
        except KeyError:
            raise RanncError(f"unknown setting {name!r}") from None
        raw = self.environ.get(setting.env_var)
        if raw is not None:
            return self.check(name, raw, setting.env_var), "env"
        file_values = self._from_file()
        if name in file_values:
            return self.check(name, file_values[name], f"{name} in {self.config_file()}"), "file"
        return setting.default, "default"

    def check(self, name: str, value: Any, origin: str | None = None) -> Any:
        """``value`` parsed and checked against the registry; ``origin`` (``--checkpoint``,
        ``RANNC_STAGES``, or a form like ``RaNNCModule(checkpoint={})``) names it in the error.

            settings.check("checkpoint", "maybe", "--checkpoint")   # RanncError: --checkpoint='maybe' ...
        """
        setting = self._registry[name]
        try:
            return setting.convert(value)
        except ValueError as exc:
            shown = origin.format(repr(value)) if origin and "{}" in origin else f"{origin or setting.env_var}={value!r}"
            raise RanncError(f"{shown} is invalid: {exc}",
                             hint=f"`rannc config` lists every setting ({setting.name}: {setting.doc})") from None

    def value(self, name: str, override: Any = None, origin: str | None = None) -> Any:
        """An explicit value (a CLI flag, a RaNNCModule option) checked like the setting, else the setting."""
        return self.get(name) if override is None else self.check(name, override, origin or name)

    def unknown_variables(self) -> list[str]:
        """``RANNC_SHEDULE (did you mean RANNC_SCHEDULE?)`` for every RANNC_* variable rannc does not know."""
        known = {s.env_var for s in self._registry.values()} | set(ENVIRONMENT_ONLY)
        return [_did_you_mean(var, known) for var in sorted(self.environ) if var.startswith("RANNC_") and var not in known]

    def check_all(self) -> None:
        """Refuse unknown RANNC_* variables and every setting whose value is invalid, in one RanncError."""
        problems = []
        unknown = self.unknown_variables()
        if unknown:
            problems.append(f"unknown variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        for name in self._registry:
            try:
                self.resolve(name)
            except RanncError as exc:
                if exc.message.startswith(("config file", "RANNC_CONFIG", "cannot read config")):
                    raise
                problems.append(exc.message)
        if problems:
            raise RanncError("; ".join(problems), hint=f"fix or unset {'it' if len(problems) == 1 and len(unknown) < 2 else 'them'}; "
                                                        "`rannc config` lists every setting")

    def table(self) -> list[tuple[str, Any, str, str]]:
        return [(s.name, *self.resolve(s.name), s.doc) for s in self._registry.values()]


def _did_you_mean(name: str, known: Any) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f"{name} (did you mean {close[0]}?)" if close else name


settings = Settings()
