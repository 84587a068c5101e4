#!/bin/bash
# rannc job 0123abcd: training phase, 4 node(s) x 8 GPUs, from templates/slurm/train.sh.j2
#SBATCH --job-name=bert-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --account=proj42
#SBATCH --time=02:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
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

# Record how this phase ended (rannc status reads it once Slurm has forgotten the job).
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
export RANNC_RESTART_COUNT="${SLURM_RESTART_COUNT:-0}"
mkdir -p "$RANNC_CHECKPOINT_DIR"

# Rendezvous on the first allocated node, at the address Slurm reaches it by.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NODE_ADDR=$(scontrol show node "$FIRST_NODE" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
export MASTER_ADDR="${RANNC_MASTER_ADDR:-${NODE_ADDR:-$FIRST_NODE}}"
export MASTER_PORT="${RANNC_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
echo "rannc: run $RANNC_RESTART_COUNT of job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# Plan for the nodes actually allocated (a requeued run with the same count keeps its plan).
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes "$SLURM_JOB_NUM_NODES" --gpus 8 --mem-per-gpu 85899345920 || exit $?

# Time limit or preemption warning (SIGUSR1 from --signal): ranks checkpoint, then the job is requeued.
RANNC_WARNED=0
rannc_warning() {
    RANNC_WARNED=1
    echo "rannc: SIGUSR1 (time limit or preemption ahead): asking every rank to checkpoint"
    [ -n "${SRUN_PID:-}" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
}
trap rannc_warning USR1

cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
rm -f "$RANNC_CHECKPOINT_DIR/rannc-preempted"   # the ranks write it when they checkpointed and stopped early
srun --kill-on-bad-exit=1 --ntasks=32 --ntasks-per-node=8 --open-mode=append --output="$PHASE_DIR/rank-%t.log" bash "$JOB_DIR/rank.sh" &
SRUN_PID=$!
while :; do
    wait "$SRUN_PID"
    code=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ "$RANNC_WARNED" = 1 ] && [ -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" ] && [ "$RANNC_RESTART_COUNT" -lt 3 ]; then
    RANNC_REQUEUING=1
    echo $((RANNC_RESTART_COUNT + 1)) > "$PHASE_DIR/rannc-requeued"
    echo "rannc: ranks stopped (code $code); requeueing job $SLURM_JOB_ID to resume from $RANNC_CHECKPOINT_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$code"
