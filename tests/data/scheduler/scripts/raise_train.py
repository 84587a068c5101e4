"""A training script whose rank 1 raises at step 2 (the others keep going), for failure tests;
with ``--crash`` rank 1 dies of a segmentation fault there instead (no Python exception)."""

import ctypes
import os
import sys
import time

rank = int(os.environ.get("RANK", "0"))
for step in range(100):
    print(f"step {step} loss {1.0 / (step + 1):.4f}", flush=True)
    if rank == 1 and step == 2:
        if "--crash" in sys.argv:
            ctypes.string_at(0)
        raise ValueError("boom from rank 1")
    time.sleep(0.2)
