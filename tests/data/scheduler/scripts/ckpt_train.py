"""A training script that honours the scheduler contract without torch (fast), for requeue tests.

    RANNC_CHECKPOINT_DIR=... RANK=0 python ckpt_train.py --steps 40 --delay 0.2

On SIGUSR1 it writes its step to RANNC_CHECKPOINT_DIR/state-<rank>.json (and rank 0 the
rannc-preempted marker the Slurm job script requeues on) and exits 0, as the runtime does; on start
it resumes from that file. The "loss" falls with the step. The requeue test itself runs the real
runtime (examples/mlp.py); this stand-in serves the tests that only need a slow, torch-free rank.
"""

import argparse
import json
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--delay", type=float, default=0.2)
args = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))
ckdir = os.environ["RANNC_CHECKPOINT_DIR"]
path = os.path.join(ckdir, f"state-{rank}.json")
start = json.load(open(path))["step"] if os.path.exists(path) else 0
print(f"rank {rank} of {os.environ.get('WORLD_SIZE')}: " + (f"resumed at step {start}" if start else "fresh start"),
      f"restart {os.environ.get('RANNC_RESTART_COUNT')} plan {os.path.basename(os.environ.get('RANNC_PLAN', ''))}",
      flush=True)
stop = False


def on_usr1(*_):
    global stop
    stop = True


signal.signal(signal.SIGUSR1, on_usr1)
for step in range(start, args.steps):
    if stop:
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(path + ".tmp", path)
        if rank == 0:
            with open(os.path.join(ckdir, "rannc-preempted"), "w") as f:
                f.write(f"{step}\n")
        print(f"checkpointed at step {step}", flush=True)
        sys.exit(0)
    print(f"step {step} loss {1.0 / (step + 1):.4f}", flush=True)
    time.sleep(args.delay)
print("done", flush=True)
