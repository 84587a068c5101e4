#!/bin/bash
#$ -N bert-train
#$ -S /bin/bash
#$ -V
#$ -pe mpi4 8
#$ -l gpu=4
#$ -q gpu.q
#$ -l h_rt=2:00:00
# rannc-qsub: -P proj42
#$ -l s_rt=1:58:00
#$ -r y
# rannc job 0123abcd: training phase, 2 node(s) x 4 GPUs, from templates/sge/train.sh.j2
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

# Record how this phase ended (rannc status reads it once Grid Engine has forgotten the job).
rannc_finish() {
    code=$?
    if [ "${RANNC_REQUEUING:-0}" = 1 ]; then return; fi
    printf '%s\n' "$code" > "$PHASE_DIR/.rannc-exitcode.$$" && mv -f "$PHASE_DIR/.rannc-exitcode.$$" "$PHASE_DIR/rannc-exitcode"
}
rm -f "$PHASE_DIR/rannc-exitcode"
trap rannc_finish EXIT
export RANNC_PLAN="$JOB_DIR/plan.yaml"
export RANNC_CHECKPOINT_DIR="$JOB_DIR/checkpoints"
export RANNC_GPUS_PER_NODE=4   # for a site's `submit: mpi:` line

# Grid Engine starts a -hold_jid successor however its predecessor ended (also after a qdel):
# train only when the profiling job (RANNC_AFTER, set by qsub -v) recorded success.
if [ -n "${RANNC_AFTER:-}" ]; then
    PROFILE_CODE=$(cat "$JOB_DIR/profile/rannc-exitcode" 2>/dev/null || echo none)
    if [ "$PROFILE_CODE" != 0 ]; then
        echo "rannc: the profiling job $RANNC_AFTER did not succeed (its exit code: $PROFILE_CODE); not training" >&2
        : > "$PHASE_DIR/rannc-dependency-failed"
        exit 1
    fi
fi
RUNS=$(cat "$PHASE_DIR/rannc-runs" 2>/dev/null || echo 0)
export RANNC_RESTART_COUNT="$RUNS"
echo $((RUNS + 1)) > "$PHASE_DIR/rannc-runs"
mkdir -p "$RANNC_CHECKPOINT_DIR"

# Time limit warning: the soft limit s_rt sends SIGUSR1 to the whole job; the ranks checkpoint.
# The warning is repeated to the ranks until they checkpointed (a rank still starting up ignores it).
# Son of Grid Engine 8.1.9 warns once per job: in the rerun, s_rt kills without a second warning.
RANNC_WARNED=0
RANK_PIDS=""
rannc_warning() {
    RANNC_WARNED=1
    echo "rannc: SIGUSR1 (time limit ahead): asking every rank to checkpoint"
    [ -n "$RANK_PIDS" ] && kill -USR1 $RANK_PIDS 2>/dev/null
}
trap rannc_warning USR1

# The allocation: $PE_HOSTFILE lines are "host slots queue processors", one per host.
NNODES=$(wc -l < "$PE_HOSTFILE")
FIRST_HOST=$(awk 'NR == 1 {print $1}' "$PE_HOSTFILE")
FIRST_ADDR=$(getent hosts "$FIRST_HOST" | awk '{print $1; exit}')
export MASTER_ADDR="${RANNC_MASTER_ADDR:-${FIRST_ADDR:-$FIRST_HOST}}"
export MASTER_PORT="${RANNC_MASTER_PORT:-$((20000 + JOB_ID % 20000))}"
echo "rannc: run $RANNC_RESTART_COUNT of job $JOB_ID on $NNODES host(s) ($(awk '{printf "%s ", $1}' "$PE_HOSTFILE")), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Plan for the hosts actually granted (a rerun with the same count keeps its plan).
(trap '' USR1; exec /home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes "$NNODES" --gpus 4 --mem-per-gpu 85899345920) || exit $?

cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
rm -f "$RANNC_CHECKPOINT_DIR/rannc-preempted"   # the ranks write it when they checkpointed and stopped early
if [ "$NNODES" = 1 ]; then
    # One host: rannc run starts the ranks here (per-rank logs; one failing rank stops the others).
    /home/alice/venv/bin/python -m rannc_cli.cli run --nproc 4 --log-dir "$PHASE_DIR" /home/alice/src/train.py -- --lr 0.1 &
    RANK_PIDS=$!
else
    # Several hosts: one qrsh -inherit per rank onto the granted hosts (Grid Engine's own task start).
    QRSH=$(command -v qrsh || echo "$SGE_ROOT/bin/$SGE_ARCH/qrsh")
    RANK_ID=0
    for HOST in $(awk '{print $1}' "$PE_HOSTFILE"); do
        for LOCAL_ID in $(seq 0 3); do
            "$QRSH" -inherit -nostdin -V "$HOST" env RANK="$RANK_ID" LOCAL_RANK="$LOCAL_ID" bash "$JOB_DIR/rank.sh" &
            RANK_PIDS="$RANK_PIDS $!"
            RANK_ID=$((RANK_ID + 1))
        done
    done
fi
# Wait for every rank; the first one that fails stops the others.
code=0
while [ -n "$RANK_PIDS" ]; do
    ALIVE=""
    for PID in $RANK_PIDS; do
        if kill -0 "$PID" 2>/dev/null; then
            ALIVE="$ALIVE $PID"
        else
            wait "$PID"
            rc=$?
            [ "$rc" != 0 ] && [ "$code" = 0 ] && code=$rc
        fi
    done
    RANK_PIDS=$ALIVE
    if [ "$code" != 0 ] && [ -n "$RANK_PIDS" ]; then
        echo "rannc: a rank failed (exit code $code): stopping the others"
        sleep 2
        kill -TERM $RANK_PIDS 2>/dev/null
    fi
    if [ "$RANNC_WARNED" = 1 ] && [ -n "$RANK_PIDS" ] && [ ! -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" ]; then
        kill -USR1 $RANK_PIDS 2>/dev/null
    fi
    [ -n "$RANK_PIDS" ] && sleep 0.5
done
if [ "$RANNC_WARNED" = 1 ] && [ -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" ] && [ "$RANNC_RESTART_COUNT" -lt 3 ]; then
    RANNC_REQUEUING=1
    echo $((RANNC_RESTART_COUNT + 1)) > "$PHASE_DIR/rannc-requeued"
    echo "rannc: ranks stopped (code $code); exit 99 makes Grid Engine rerun job $JOB_ID, resuming from $RANNC_CHECKPOINT_DIR"
    exit 99
fi
exit "$code"
