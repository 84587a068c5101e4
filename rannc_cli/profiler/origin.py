"""Which script a profile was made from, and refusing a profile of another script at submit time.

    stamp_script(prof, Path("train.py"))                      # model.script, model.script_sha256
    notes = check_profile_script(Path("prof.yaml"), Path("train.py"))   # RanncError if made from another script

A profile records the script as given on the command line and a hash of its bytes. ``rannc submit
--profile`` refuses a profile whose script has another file name (another model, almost surely)
before anything is submitted, and notes a same-named script whose contents changed; the training
job still compares the model's graph hash with the plan's when it starts. The setting
``profile_script_check`` (RANNC_PROFILE_SCRIPT_CHECK=0) turns the refusal off for users who
knowingly reuse a profile across scripts that build the same model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError


def script_sha256(path: Path) -> str:
    """First 16 hex digits of the SHA-256 of the script's bytes ("" when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def stamp_script(profile: Any, script: Path) -> None:
    """Record ``script`` (as given) and its hash in ``profile.model``, also for a profile served from the cache."""
    profile.model["script"] = str(script)
    profile.model["script_sha256"] = script_sha256(script)


def check_profile_script(profile_path: Path, script: Path) -> list[str]:
    """Refuse (RanncError) a profile made from a script of another name; return notes for the user."""
    from rannc_cli.config import settings
    from rannc_cli.fileio import read_yaml

    data = read_yaml(profile_path, "profile file", "pass a file written by `rannc profile --out`")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise RanncError(f"--profile {profile_path} is not a rannc profile (no 'model')",
                         hint="pass a file written by `rannc profile --out`")
    recorded = str(model.get("script") or "")
    if not recorded or recorded.startswith("<"):  # synthetic or hand-made: nothing to compare
        return []
    if Path(recorded).name != Path(script).name:
        if not settings.get("profile_script_check"):
            return [f"--profile {profile_path} was made from {recorded}, not {script.name} "
                    "(RANNC_PROFILE_SCRIPT_CHECK=0)"]
        raise RanncError(f"--profile {profile_path} was made from {recorded} (model {model.get('name', '?')}), "
                         f"not {script.name}",
                         hint=f"profile this script (drop --profile, or `rannc profile {script} --out FILE`); "
                              "RANNC_PROFILE_SCRIPT_CHECK=0 uses it anyway")
    digest = str(model.get("script_sha256") or "")
    if digest and digest != script_sha256(script):
        return [f"{script} changed since {profile_path} was made; the training job checks that the model's "
                "graph still matches when it starts"]
    return []
