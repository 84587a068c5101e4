#!/bin/bash
#$ -N mlp-profile
#$ -S /bin/bash
#$ -V
#$ -l node_q=1
#$ -l h_rt=1:00:00
# rannc-qsub: -g grp1
#$ -r n
# rannc job 0123abcd: profiling phase (one node, one process), from templates/sge/profile.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/profile"
mkdir -p "$PHASE_DIR"
module load cuda
module load openmpi
export RANNC_JOB_DIR="$JOB_DIR"

# Record how this phase ended (rannc status reads it once Grid Engine has forgotten the job).
rannc_finish() {
    code=$?
    if [ "${RANNC_REQUEUING:-0}" = 1 ]; then return; fi
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT

cd /home/alice/src
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase profile --job-dir "$JOB_DIR" --device auto --cache-key cafe0123 -- <repo>/examples/mlp.py --steps 20
