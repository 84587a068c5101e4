#!/bin/bash
# rannc job 0123abcd: profiling phase on this machine, from templates/local/profile.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/profile"
mkdir -p "$PHASE_DIR"
export RANNC_JOB_DIR="$JOB_DIR"
rannc_finish() {
    code=$?
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT

cd /home/alice/src
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase profile --job-dir "$JOB_DIR" --device auto --cache-key cafe0123 -- /home/alice/src/train.py --lr 0.1
