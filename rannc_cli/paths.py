"""Where the project's bundled files live.

    from rannc_cli.paths import project_root
    configs = project_root() / "configs"
"""

from __future__ import annotations

from pathlib import Path


def project_root() -> Path:
    """The folder holding configs/, templates/ and docs/ (the checkout root)."""
    return Path(__file__).resolve().parent.parent
