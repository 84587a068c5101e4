"""A training script whose rank 1 raises at step 2 (the others keep going), for failure tests."""

import os
import time

rank = int(os.environ.get("RANK", "0"))
for step in range(100):
    print(f"step {step} loss {1.0 / (step + 1):.4f}", flush=True)
    if rank == 1 and step == 2:
        raise ValueError("boom from rank 1")
    time.sleep(0.2)
