"""`rannc profile`: run a training script until RaNNCModule's first forward, then profile.

    profile_command(script=Path("examples/mlp.py"), script_args=["--layers", "8"], estimate=False,
                    device="cpu", device_spec=None, out=None, microbatch_sizes=None,
                    use_cache=True, as_json=False, top=10)
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.fileio import require_file


class _Progress:
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""

    def __init__(self, quiet: bool):
        self.bar = None
        self.quiet = quiet

    def __call__(self, message: str, step: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="profiling", unit="block", file=sys.stderr, disable=None, leave=False)
        self.bar.set_postfix_str(message[:60])
        self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _user_frame(exc: BaseException, script: Path) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    target = os.path.abspath(script)
    chosen = next((f for f in reversed(frames) if os.path.abspath(f.filename) == target), None)
    chosen = chosen or next((f for f in reversed(frames) if "site-packages" not in f.filename
                             and "rannc_cli" not in f.filename), None)
    return f" at {os.path.relpath(chosen.filename)}:{chosen.lineno}" if chosen else ""


def run_until_first_forward(script: Path, script_args: list[str], on_forward) -> Any:
    """Run ``script`` as __main__; ``on_forward(model, args, kwargs)`` returns the result."""
    from rannc_cli.runtime.hooks import StopScript, first_forward_hook

    require_file(script, "script", "pass the path of your training script")
    if script.suffix != ".py":
        raise RanncError(f"script {script} is not a Python file", hint="pass a .py training script")

    def hook(model: Any, args: tuple, kwargs: dict) -> None:
        try:
            result = on_forward(model, args, kwargs)
        except (RanncError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - ours, not the script's
            raise RanncError(f"internal error in rannc while profiling: {type(exc).__name__}: {str(exc)[:300]}",
                             hint="please report it; RANNC_DEBUG=1 prints the traceback", cause=exc) from None
        raise StopScript(result)

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *script_args]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        with first_forward_hook(hook):
            runpy.run_path(str(script), run_name="__main__")
    except StopScript as stop:
        return stop.result
    except RanncError:
        raise
    except SyntaxError as exc:
        raise RanncError(f"{script} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    except SystemExit as exc:
        raise RanncError(f"{script} exited (code {exc.code}) before calling the model",
                         hint="check the script's arguments (pass them after `--`)") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the user's script failed: one line, no traceback
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise RanncError(f"{script} raised {type(exc).__name__}{_user_frame(exc, script)}: {first[:300]}",
                         hint="fix the script so that it runs as plain PyTorch, then profile it", cause=exc) from None
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise RanncError(f"{script} finished without calling a RaNNCModule",
                     hint="wrap the model with `model = RaNNCModule(model, optimizer)` and call it on a batch")


def profile_command(*, script: Path, script_args: list[str], estimate: bool, device: str, device_spec: str | None,
                    out: Path | None, microbatch_sizes: str | None, use_cache: bool, as_json: bool,
                    top: int) -> None:
    if device not in ("cpu", "cuda"):
        raise RanncError(f"unknown device {device!r}", hint="use --device cpu or --device cuda")
    if device_spec and not estimate:
        raise RanncError("--device-spec only applies to --estimate", hint="add --estimate or drop --device-spec")
    out = out or Path("rannc-profile.yaml")
    progress = _Progress(quiet=as_json)

    def on_forward(model: Any, args: tuple, kwargs: dict) -> Any:
        import torch

        from rannc_cli.profiler.build import profile_model

        if device == "cuda":
            if not torch.cuda.is_available():
                raise RanncError("--device cuda was asked for but no CUDA device is visible",
                                 hint="run on a GPU node, or use --device cpu or --estimate")
            model = model.to("cuda")
            args, kwargs = torch.utils._pytree.tree_map(
                lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t, (args, kwargs))
        return profile_model(model, args, kwargs, mode="estimated" if estimate else "measured",
                             device_spec=device_spec, microbatch_sizes=microbatch_sizes, use_cache=use_cache,
                             script=str(script), progress=progress)

    try:
        prof, cached = run_until_first_forward(script, script_args, on_forward)
    finally:
        progress.close()
    prof.save(out)
    from rannc_cli.profiler.report import render_table, summary

    if as_json:
        print(json.dumps(summary(prof, str(out), cached, top), indent=2))
    else:
        print(render_table(prof, str(out), cached, top))
