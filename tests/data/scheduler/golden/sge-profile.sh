#!/bin/bash
#$ -N bert-profile
#$ -S /bin/bash
#$ -V
#$ -pe smp 1
#$ -l gpu=1
#$ -q gpu.q
#$ -l h_rt=2:00:00
# rannc-qsub: -P proj42
#$ -r n
# rannc job 0123abcd: profiling phase (one node, one process), from templates/sge/profile.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/profile"
mkdir -p "$PHASE_DIR"
module load cuda/12.4
module load nccl
source /home/alice/venv/bin/activate
export NCCL_DEBUG=WARN
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
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase profile --job-dir "$JOB_DIR" --device auto --cache-key cafe0123 -- /home/alice/src/train.py --lr 0.1
