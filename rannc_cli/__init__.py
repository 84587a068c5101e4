"""rannc: train PyTorch models too large for one GPU, with one added line.

    from rannc_cli import RaNNCModule
    model = RaNNCModule(model, optimizer)

Importing this package is cheap: torch is only imported when ``RaNNCModule``
(or ``deferred_init``, another torch-backed name) is first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["RaNNCModule", "deferred_init", "__version__"]


def __getattr__(name: str):
    if name == "RaNNCModule":
        from rannc_cli.runtime.module import RaNNCModule

        return RaNNCModule
    if name == "deferred_init":
        from rannc_cli.runtime.deferred import deferred_init

        return deferred_init
    raise AttributeError(f"module 'rannc_cli' has no attribute {name!r}")
