#!/bin/bash
# rannc job 0123abcd: training phase on this machine, 4 processes, from templates/local/train.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/train"
mkdir -p "$PHASE_DIR"
export RANNC_JOB_DIR="$JOB_DIR"
rannc_finish() {
    code=$?
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT
export RANNC_PLAN="$JOB_DIR/plan.yaml"
export RANNC_CHECKPOINT_DIR="$JOB_DIR/checkpoints"
mkdir -p "$RANNC_CHECKPOINT_DIR"

/home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes 1 --gpus 4 || exit $?

# SIGUSR1 (time-limit warning) and SIGTERM reach `rannc run`, which forwards them to every rank
# (one log per rank in $PHASE_DIR/rank-<R>.log).
trap 'kill -USR1 "$LAUNCH_PID" 2>/dev/null' USR1
trap 'kill -TERM "$LAUNCH_PID" 2>/dev/null' TERM
cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
rm -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" "$PHASE_DIR/rannc-preempted"   # the ranks write it when they checkpointed and stopped early
/home/alice/venv/bin/python -m rannc_cli.cli run --nproc 4 --log-dir "$PHASE_DIR" /home/alice/src/train.py -- --lr 0.1 &
LAUNCH_PID=$!
while :; do
    wait "$LAUNCH_PID"
    code=$?
    kill -0 "$LAUNCH_PID" 2>/dev/null || break
done
# Stopped early with a checkpoint (after the time-limit warning): the local backend reports TIMEOUT.
if [ -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" ]; then
    cp "$RANNC_CHECKPOINT_DIR/rannc-preempted" "$PHASE_DIR/rannc-preempted"
fi
exit "$code"
