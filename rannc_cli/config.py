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
from typing import Any, Callable

from rannc_cli.errors import RanncError


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    doc: str
    parse: Callable[[str], Any] = str

    @property
    def env_var(self) -> str:
        return "RANNC_" + self.name.upper()


REGISTRY: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("cache_dir", str(Path.home() / ".cache" / "rannc"), "Where profiles (and later plans) are cached."),
        Setting("logs_dir", "logs", "Folder holding one sub-folder per job."),
        Setting("block_target", 64, "Capture: split modules until about this many atomic blocks exist.", int),
        Setting("profile_warmup", 2, "Profiling: untimed warm-up runs per block and microbatch size.", int),
        Setting("profile_repeats", 5, "Profiling: timed runs per block and size; the median is kept.", int),
        Setting("profile_budget_seconds", 1.0, "Profiling: stop timing a block once this much timed work is done (at least one run).", float),
        Setting("profile_microbatch_sizes", "", "Profiling: microbatch sizes to measure (comma list); empty means powers of two up to the batch, at most 4 sizes.", str),
        Setting("device_spec", "", "Estimate mode: device spec name from configs/devices.yaml (empty: the current device's, else the generic CPU).", str),
        Setting("memory_margin", 0.1, "Planner: fraction of GPU memory kept free.", float),
        Setting("optimizer_state_factor", 2.0, "Planner: optimizer state bytes per parameter byte (Adam: 2).", float),
        Setting("link_intra_bandwidth", 25e9, "Planner without a topology file: GPU-to-GPU bytes/s inside a node (default: PCIe 4.0 x16 peer-to-peer).", float),
        Setting("link_intra_latency", 10e-6, "Planner without a topology file: seconds per message inside a node.", float),
        Setting("link_inter_bandwidth", 12.5e9, "Planner without a topology file: GPU-to-GPU bytes/s between nodes (default: 100 Gb/s InfiniBand).", float),
        Setting("link_inter_latency", 20e-6, "Planner without a topology file: seconds per message between nodes.", float),
        Setting("allreduce_intra_bandwidth", 20e9, "Planner without a topology file: ring all-reduce bus bytes/s inside a node.", float),
        Setting("allreduce_intra_latency", 20e-6, "Planner without a topology file: seconds per ring step inside a node.", float),
        Setting("allreduce_inter_bandwidth", 10e9, "Planner without a topology file: ring all-reduce bus bytes/s across nodes.", float),
        Setting("allreduce_inter_latency", 40e-6, "Planner without a topology file: seconds per ring step across nodes.", float),
        Setting("planner_max_units", 24, "Planner: coarsen the profile's blocks to at most this many units before the search.", int),
        Setting("planner_dp_budget", 40, "Planner: most DP runs per (schedule, microbatch count) before the search stops and reports its optimality gap (0: no cap).", int),
        Setting("planner_max_microbatches", 256, "Planner: largest microbatch count the search tries.", int),
        Setting("scheduler", "", "rannc submit: scheduler when neither --scheduler nor --site names one (slurm, pbs, local; empty: local).", str),
        Setting("poll_seconds", 5.0, "rannc submit --wait / logs --follow: seconds between scheduler queries.", float),
        Setting("requeue", True, "rannc submit: checkpoint on the scheduler's warning signal and requeue the training job.", _parse_bool),
        Setting("requeue_signal_seconds", 120, "rannc submit: send the warning signal (SIGUSR1) this many seconds before the time limit.", int),
        Setting("max_requeues", 3, "rannc submit: requeue a training job at most this many times.", int),
        Setting("remote_dir", "rannc-jobs", "rannc submit --host: folder for job folders on the login node (relative: under the remote home).", str),
        Setting("remote_python", "python3", "rannc submit --host: the Python that runs rannc and the script on the cluster (site configs may set submit.python).", str),
        Setting("templates_dir", "", "rannc submit: a folder of job script templates searched before templates/ (per backend: <dir>/slurm/train.sh.j2).", str),
        Setting("pbs_directives_on_command_line", True, "rannc submit on PBS: repeat the script's #PBS directives as qsub options (needed by Slurm's PBS wrappers; harmless on PBS).", _parse_bool),
        # runtime (RaNNCModule under `rannc run`, torchrun, srun or mpiexec; docs/runtime.md)
        Setting("plan", "", "Runtime: plan file to run (`rannc plan --out`); empty means rank 0 profiles and plans at the first forward.", str),
        Setting("stages", 0, "Runtime planning: force this many pipeline stages (0: the planner decides).", int),
        Setting("replicas", "", "Runtime planning: force replicas per stage, a comma list like 2,1,1 (implies stages).", str),
        Setting("microbatches", 0, "Runtime planning: force this many microbatches (0: the planner decides).", int),
        Setting("schedule", "1f1b", "Runtime planning: pipeline schedule, 1f1b or gpipe (empty: the planner decides).", str),
        Setting("checkpoint", "auto", "Runtime: activation checkpointing per stage: auto (as the plan says), on or off.", str),
        Setting("runtime_timeout", 300.0, "Runtime: seconds a collective or transfer may wait before the job fails (bounds hangs when a rank dies).", float),
        Setting("hang_timeout_seconds", 60.0, "Runtime: a rank whose heartbeat has not changed for this many seconds is named as hung and the job ends (0: off, then runtime_timeout bounds a hang).", float),
        Setting("heartbeat_dir", "", "Runtime: folder of the ranks' heartbeat files (`rannc run` and the Slurm/PBS job scripts set RANNC_HEARTBEAT_DIR; empty: no heartbeats).", str),
        Setting("runtime_device", "auto", "Runtime: auto (the local GPU if any, else CPU), cpu or cuda.", str),
        Setting("runtime_profile", "auto", "Runtime planning: how rank 0 profiles, measured or estimated (auto: measured on CPU, estimated on GPUs).", str),
        Setting("runtime_memory", "", "Runtime planning: memory per process to plan for, like 4GiB (empty: the GPU's, or host memory / processes).", str),
        Setting("checkpoint_dir", "", "Runtime: on SIGUSR1 checkpoint here and exit 0; resume from here at the next start (job scripts set RANNC_CHECKPOINT_DIR).", str),
        Setting("loss_reduction", "mean", "Runtime: how the model's loss reduces over the batch, mean or sum (microbatch losses are combined to match).", str),
        Setting("batchnorm", "local", "Runtime: BatchNorm statistics per microbatch slice (local) or shared across a stage's replicas (sync, as SyncBatchNorm).", str),
    ]
}


class Settings:
    """Resolved view of the registry (environment and config file)."""

    def __init__(self, registry: dict[str, Setting] = REGISTRY):
        self._registry = registry
        self._file_values: dict[str, Any] | None = None

    def config_file(self) -> Path:
        return Path(os.environ.get("RANNC_CONFIG", Path.home() / ".config" / "rannc" / "config.yaml"))

    def _from_file(self) -> dict[str, Any]:
        if self._file_values is None:
            path = self.config_file()
            values: dict[str, Any] = {}
            if path.is_file():
                import yaml

                try:
                    loaded = yaml.safe_load(path.read_text()) or {}
                except yaml.YAMLError as exc:
                    raise RanncError(f"config file {path} is not valid YAML ({exc})", hint="fix or remove it") from None
                if not isinstance(loaded, dict):
                    raise RanncError(f"config file {path} must be a mapping of setting: value")
                unknown = sorted(set(loaded) - set(self._registry))
                if unknown:
                    raise RanncError(f"config file {path} has unknown settings: {', '.join(unknown)}",
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
        raw = os.environ.get(setting.env_var)
        if raw is not None:
            try:
                return setting.parse(raw), "env"
            except ValueError as exc:
                raise RanncError(f"{setting.env_var}={raw!r} is invalid ({exc})") from None
        file_values = self._from_file()
        if name in file_values:
            value = file_values[name]
            return (setting.parse(str(value)) if isinstance(value, str) else value), "file"
        return setting.default, "default"

    def table(self) -> list[tuple[str, Any, str, str]]:
        return [(s.name, *self.resolve(s.name), s.doc) for s in self._registry.values()]


settings = Settings()
