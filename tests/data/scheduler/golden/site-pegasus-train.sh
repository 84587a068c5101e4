#!/bin/bash
#PBS -N mlp-train
#PBS -q gen_S
#PBS -A grp1
#PBS -b 2
#PBS -T openmpi
#PBS -l gpunum_job=1
#PBS -l cpunum_job=48
#PBS -l elapstim_req=01:00:00
#PBS -j o
# rannc job 0123abcd: training phase, 2 node(s) x 1 GPUs, from templates/nqsv/train.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/train"
mkdir -p "$PHASE_DIR"
module load openmpi
export RANNC_JOB_DIR="$JOB_DIR"

# Record how this phase ended (rannc status reads it once NQSV has forgotten the job).
rannc_finish() {
    code=$?
    if [ "${RANNC_REQUEUING:-0}" = 1 ]; then return; fi
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT
# NQSV is given no dependency: when a profiling job was submitted, this job waits for its profile.
while [ ! -f "$JOB_DIR/profile.yaml" ]; do
    pcode=$(cat "$JOB_DIR/profile/rannc-exitcode" 2>/dev/null) && [ "$pcode" != 0 ] && {
        echo "rannc: the profiling phase failed (exit $pcode, see $JOB_DIR/profile/)" >&2
        exit 1
    }
    sleep 10
done

# The allocation: -b nodes; this script runs on the first of them. NQSV_MPIOPTS carries the host list to mpirun.
NNODES=2
FIRST_NODE=$(hostname)
export RANNC_PLAN="$JOB_DIR/plan.yaml"
export RANNC_CHECKPOINT_DIR="$JOB_DIR/checkpoints"
export RANNC_HEARTBEAT_DIR="$PHASE_DIR/heartbeat"   # each rank beats here; the next rank names one that stops
RUNS=$(cat "$PHASE_DIR/rannc-runs" 2>/dev/null || echo 0)
export RANNC_RESTART_COUNT="$RUNS"
echo $((RUNS + 1)) > "$PHASE_DIR/rannc-runs"
mkdir -p "$RANNC_CHECKPOINT_DIR"
export RANNC_GPUS_PER_NODE=1   # for a site's `submit: mpi:` line
JOBNUM=${PBS_JOBID:-$$}
JOBNUM=${JOBNUM%%.*}
JOBNUM=${JOBNUM//[^0-9]/}
export MASTER_ADDR="${RANNC_MASTER_ADDR:-$FIRST_NODE}"
export MASTER_PORT="${RANNC_MASTER_PORT:-$((20000 + ${JOBNUM:-0} % 20000))}"
echo "rannc: run $RANNC_RESTART_COUNT of job ${JOBNUM:-?} on $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Plan for the nodes actually allocated (a rerun with the same count keeps its plan).
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes "$NNODES" --gpus 1 --mem-per-gpu 85899345920 || exit $?

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
RANNC_WARN_IN=$((3480 - SECONDS))   # SECONDS: since this job started
( sleep "$((RANNC_WARN_IN > 1 ? RANNC_WARN_IN : 1))" && kill -USR1 $$ ) &
RANNC_TIMER=$!

cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
rm -f "$RANNC_CHECKPOINT_DIR/rannc-preempted"   # the ranks write it when they checkpointed and stopped early
mpirun ${NQSV_MPIOPTS:-} -npernode 1 -n 2 bash "$JOB_DIR/rank.sh" &
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
