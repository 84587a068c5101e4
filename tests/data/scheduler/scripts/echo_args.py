"""Writes its argv and selected environment as JSON to rank-<R>.json beside the checkpoint folder."""

import json
import os
import sys

rank = os.environ.get("RANK", "0")
out = os.path.join(os.environ["RANNC_CHECKPOINT_DIR"], f"argv-{rank}.json")
with open(out, "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in ("HOSTILE", "RANK", "WORLD_SIZE")}}, f)
print("wrote", out, flush=True)
