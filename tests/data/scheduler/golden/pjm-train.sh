#!/bin/bash
#PJM -N bert-train
#PJM -L rscgrp=regular-a
#PJM -L node=4
#PJM --mpi proc=32
#PJM -L elapse=02:00:00
#PJM -g gz00
#PJM -j
# rannc job 0123abcd: training phase, 4 node(s) x 8 GPUs, from templates/pjm/train.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/train"
mkdir -p "$PHASE_DIR"
module load cuda
module load ompi
source /home/alice/venv/bin/activate
export NCCL_DEBUG=WARN
export RANNC_JOB_DIR="$JOB_DIR"

# Record how this phase ended (rannc status reads it once PJM has forgotten the job).
rannc_finish() {
    code=$?
    if [ "${RANNC_REQUEUING:-0}" = 1 ]; then return; fi
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT
# A step job runs this sub job only when the profiling sub job ended with 0 (sd=ec!=0:all); checked here too.
if [ ! -f "$JOB_DIR/profile.yaml" ]; then
    echo "rannc: no profile.yaml: the profiling phase failed (see $JOB_DIR/profile/)" >&2
    exit 1
fi

# The allocation: PJM_O_NODEINF lists the nodes, one per line.
NNODES=$(sort -u "$PJM_O_NODEINF" | wc -l)
FIRST_NODE=$(head -n 1 "$PJM_O_NODEINF")
export RANNC_PLAN="$JOB_DIR/plan.yaml"
export RANNC_CHECKPOINT_DIR="$JOB_DIR/checkpoints"
export RANNC_HEARTBEAT_DIR="$PHASE_DIR/heartbeat"   # each rank beats here; the next rank names one that stops
RUNS=$(cat "$PHASE_DIR/rannc-runs" 2>/dev/null || echo 0)
export RANNC_RESTART_COUNT="$RUNS"
echo $((RUNS + 1)) > "$PHASE_DIR/rannc-runs"
mkdir -p "$RANNC_CHECKPOINT_DIR"
export RANNC_GPUS_PER_NODE=8   # for a site's `submit: mpi:` line
JOBNUM=${PJM_SUBJOBID:-$$}
JOBNUM=${JOBNUM%%.*}
JOBNUM=${JOBNUM//[^0-9]/}
export MASTER_ADDR="${RANNC_MASTER_ADDR:-$FIRST_NODE}"
export MASTER_PORT="${RANNC_MASTER_PORT:-$((20000 + ${JOBNUM:-0} % 20000))}"
echo "rannc: run $RANNC_RESTART_COUNT of job ${JOBNUM:-?} on $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Plan for the nodes actually allocated (a rerun with the same count keeps its plan).
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes "$NNODES" --gpus 8 --mem-per-gpu 85899345920 || exit $?

# The batch system announces no time limit: the job warns itself 120 s ahead (SIGUSR1 from
# outside works too); the MPI launcher forwards SIGUSR1 to every rank, which checkpoints and stops.
RANNC_WARNED=0
rannc_warning() {
    RANNC_WARNED=1
    echo "rannc: $1: asking every rank to checkpoint"
    [ -n "${MPI_PID:-}" ] && kill -USR1 "$MPI_PID" 2>/dev/null
}
trap 'rannc_warning SIGUSR1' USR1
trap 'rannc_warning SIGTERM' TERM
RANNC_WARN_IN=$((7080 - SECONDS))   # SECONDS: since this job started
( sleep "$((RANNC_WARN_IN > 1 ? RANNC_WARN_IN : 1))" && kill -USR1 $$ ) &
RANNC_TIMER=$!

cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
rm -f "$RANNC_CHECKPOINT_DIR/rannc-preempted"   # the ranks write it when they checkpointed and stopped early
mpiexec -machinefile $PJM_O_NODEINF -npernode ${RANNC_GPUS_PER_NODE} -n 32 bash "$JOB_DIR/rank.sh" &
MPI_PID=$!
while :; do
    wait "$MPI_PID"
    code=$?
    kill -0 "$MPI_PID" 2>/dev/null || break
done
[ -n "${RANNC_TIMER:-}" ] && kill "$RANNC_TIMER" 2>/dev/null
if [ "$RANNC_WARNED" = 1 ] && [ -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" ]; then
    # no user-side rerun exists here: the checkpoint stays for the next submission to resume from
    echo "rannc: ranks checkpointed (code $code); submit again to resume from $RANNC_CHECKPOINT_DIR"
    exit 75
fi
exit "$code"
