"""What a job script runs for the profile and plan phases (on a compute node).

    python -m rannc_cli.scheduler.phase profile --job-dir D --device auto -- train.py --lr 0.1
    python -m rannc_cli.scheduler.phase plan --job-dir D --nodes 2 --gpus 4 [--mem-per-gpu BYTES]

``profile`` writes D/profile.yaml (``--device auto``: CUDA when a GPU is visible, else CPU) and
stores it in the submission cache (rannc_cli.scheduler.submit.profile_cache_key), so the next
``rannc submit`` of the same script skips profiling. ``plan`` writes D/plan.yaml for the nodes the
job holds; a plan already there for the same node and GPU count is kept (a requeued job resumes
with the same plan), any other is replaced (re-planned for the new node count).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rannc_cli.errors import RanncError


def plan_matches(path: Path, nodes: int, gpus: int) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
        cluster = data["cluster"]
        return int(cluster["nodes"]) == nodes and int(cluster["gpus_per_node"]) == gpus
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return False


def make_plan(job_dir: Path, nodes: int, gpus: int, mem_per_gpu: int | None, quiet: bool = False) -> Path:
    from rannc_cli.planner.command import plan_command

    out = job_dir / "plan.yaml"
    if out.is_file() and plan_matches(out, nodes, gpus):
        print(f"rannc: keeping {out} (made for {nodes} node(s) x {gpus} GPUs)", flush=True)
        return out
    if out.is_file():
        old = out.with_name("plan.previous.yaml")
        out.replace(old)
        print(f"rannc: the job now holds {nodes} node(s) x {gpus}; re-planning (old plan kept as {old.name})",
              flush=True)
    profile = job_dir / "profile.yaml"
    if not profile.is_file():
        raise RanncError(f"{profile} is missing: the profiling phase did not produce it")
    plan_command(profile=profile, nodes=nodes, gpus=gpus, mem_per_gpu=str(mem_per_gpu) if mem_per_gpu else None,
                 out=out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rannc-phase")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--job-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-key")
    p.add_argument("command", nargs=argparse.REMAINDER)
    q = sub.add_parser("plan")
    q.add_argument("--job-dir", required=True)
    q.add_argument("--nodes", type=int, required=True)
    q.add_argument("--gpus", type=int, required=True)
    q.add_argument("--mem-per-gpu", type=int)
    args = parser.parse_args(argv)
    try:
        if args.what == "profile":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            device = args.device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            from rannc_cli.profiler.command import profile_command

            out = Path(args.job_dir) / "profile.yaml"
            print(f"rannc: profiling {command[0]} on {device}", flush=True)
            profile_command(script=Path(command[0]), script_args=command[1:], estimate=False, device=device,
                            device_spec=None, out=out, microbatch_sizes=None, use_cache=True, as_json=False, top=10)
            if args.cache_key:
                from rannc_cli.scheduler.submit import store_cached_profile

                store_cached_profile(args.cache_key, out)
        else:
            make_plan(Path(args.job_dir), args.nodes, args.gpus, args.mem_per_gpu)
    except RanncError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
