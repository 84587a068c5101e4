#!/bin/bash
#PBS -N bert-train
#PBS -q rt_HF
#PBS -l select=4:ncpus=8:ngpus=8:mpiprocs=8
#PBS -l walltime=2:00:00
#PBS -P gaa50000
#PBS -l USE_SSH=1
#PBS -r y
# rannc job 0123abcd: training phase, 4 node(s) x 8 GPUs, from templates/pbs/train.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/train"
mkdir -p "$PHASE_DIR"
module load cuda/12.4
module load nccl
source /home/alice/venv/bin/activate
export NCCL_DEBUG=WARN
export RANNC_JOB_DIR="$JOB_DIR"

# Record how this phase ended (rannc status reads it once PBS has forgotten the job).
rannc_finish() {
    code=$?
    if [ "${RANNC_REQUEUING:-0}" = 1 ]; then return; fi
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT
export RANNC_PLAN="$JOB_DIR/plan.yaml"
export RANNC_CHECKPOINT_DIR="$JOB_DIR/checkpoints"
export RANNC_HEARTBEAT_DIR="$PHASE_DIR/heartbeat"   # each rank beats here; the next rank names one that stops
RUNS=$(cat "$PHASE_DIR/rannc-runs" 2>/dev/null || echo 0)
export RANNC_RESTART_COUNT="$RUNS"
echo $((RUNS + 1)) > "$PHASE_DIR/rannc-runs"
mkdir -p "$RANNC_CHECKPOINT_DIR"

# The allocation: PBS_NODEFILE lists each node once per MPI process (mpiprocs).
# (Slurm's PBS wrappers do not set it; generate_pbs_nodefile writes an equivalent.)
if [ -z "${PBS_NODEFILE:-}" ] && command -v generate_pbs_nodefile >/dev/null 2>&1; then
    PBS_NODEFILE=$(generate_pbs_nodefile)
    export PBS_NODEFILE
fi
NNODES=$(sort -u "$PBS_NODEFILE" | wc -l)
FIRST_NODE=$(head -n 1 "$PBS_NODEFILE")
JOBNUM=${PBS_JOBID:-$$}
JOBNUM=${JOBNUM%%.*}
JOBNUM=${JOBNUM//[^0-9]/}
export MASTER_ADDR="${RANNC_MASTER_ADDR:-$FIRST_NODE}"
export MASTER_PORT="${RANNC_MASTER_PORT:-$((20000 + ${JOBNUM:-0} % 20000))}"
echo "rannc: run $RANNC_RESTART_COUNT of job ${PBS_JOBID:-?} on $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Plan for the nodes actually allocated (a rerun with the same count keeps its plan).
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes "$NNODES" --gpus 8 --mem-per-gpu 85899345920 || exit $?

# Walltime (SIGTERM, then SIGKILL after kill_delay) or a warning (SIGUSR1): ranks checkpoint.
rannc_warning() {
    echo "rannc: $1: asking every rank to checkpoint"
    [ -n "${MPI_PID:-}" ] && kill -USR1 "$MPI_PID" 2>/dev/null
}
trap 'rannc_warning SIGUSR1' USR1
trap 'rannc_warning SIGTERM' TERM

cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
export SLURM_KILL_BAD_EXIT=1   # only read by Slurm-backed mpiexec wrappers; MPI launchers abort on a failed rank
mpiexec -n 32 bash "$JOB_DIR/rank.sh" &
MPI_PID=$!
while :; do
    wait "$MPI_PID"
    code=$?
    kill -0 "$MPI_PID" 2>/dev/null || break
done
exit "$code"
