#!/bin/bash
#PBS -N mlp-train
#PBS -q regular-g
#PBS -l select=2:mpiprocs=1
#PBS -l place=scatter
#PBS -l walltime=1:00:00
#PBS -W group_list=grp1
#PBS -r y
# rannc job 0123abcd: training phase, 2 node(s) x 1 GPUs, from templates/pbs/train.sh.j2
set -u
umask 077
JOB_DIR=/home/alice/logs/20260101-120000-bert-0123abcd
PHASE_DIR="$JOB_DIR/train"
mkdir -p "$PHASE_DIR"
module load nvidia
module load nv-hpcx
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
export RANNC_GPUS_PER_NODE=1   # for a site's `submit: mpi:` line

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
/home/alice/venv/bin/python -m rannc_cli.scheduler.phase plan --job-dir "$JOB_DIR" --nodes "$NNODES" --gpus 1 --mem-per-gpu 103079215104 || exit $?

# PBS's own commands (pbs_tmrsh, qrerun): where pbs_tmrsh is on PATH, else in PBS_EXEC/bin as pbs.conf names it
# (other batch systems install their own qrerun, so only pbs_tmrsh tells where PBS is).
PBS_BIN=$(dirname "$(command -v pbs_tmrsh 2>/dev/null || echo "$(sed -n 's/^PBS_EXEC=//p' "${PBS_CONF_FILE:-/etc/pbs.conf}" 2>/dev/null)/bin/pbs_tmrsh")")
TMRSH="$PBS_BIN/pbs_tmrsh"
QRERUN="$PBS_BIN/qrerun"
[ -x "$QRERUN" ] || QRERUN=qrerun

# PBS sends no warning before the walltime (SIGTERM reaches every process of the job at once, then
# SIGKILL after kill_delay), so the job warns itself 120 s ahead (SIGUSR1 to this shell,
# which may also come from outside). Either way every rank is asked to checkpoint and stop.
RANNC_WARNED=0
rannc_signal_ranks() {
    [ -n "${MPI_PID:-}" ] && kill "-$1" "$MPI_PID" 2>/dev/null
}
rannc_warning() {
    RANNC_WARNED=1
    echo "rannc: $1: asking every rank to checkpoint"
    rannc_signal_ranks USR1
}
trap 'rannc_warning SIGUSR1' USR1
trap 'rannc_warning SIGTERM' TERM
RANNC_WARN_IN=$((3480 - SECONDS))   # SECONDS: since this job started
( sleep "$((RANNC_WARN_IN > 1 ? RANNC_WARN_IN : 1))" && kill -USR1 $$ ) &
RANNC_TIMER=$!

cd /home/alice/src
date +%s > "$PHASE_DIR/rannc-train-start"
rm -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" "$PHASE_DIR"/rank-*.pid   # the ranks write them
# The site's MPI launcher (site config `submit: mpi:`) starts one process per PBS_NODEFILE line.
mpirun -npernode ${RANNC_GPUS_PER_NODE} -hostfile $PBS_NODEFILE -n 2 bash "$JOB_DIR/rank.sh" &
MPI_PID=$!
while :; do
    wait "$MPI_PID"
    code=$?
    kill -0 "$MPI_PID" 2>/dev/null || break
done
[ -n "${RANNC_TIMER:-}" ] && kill "$RANNC_TIMER" 2>/dev/null
if [ "$RANNC_WARNED" = 1 ] && [ -f "$RANNC_CHECKPOINT_DIR/rannc-preempted" ] && [ "$RANNC_RESTART_COUNT" -lt 3 ]; then
    # Rerun this job (-r y): it keeps its id and resumes from the checkpoint. qrerun needs operator
    # rights on many sites; where it is refused the job ends with that message and the checkpoint kept.
    RANNC_REQUEUING=1
    echo $((RANNC_RESTART_COUNT + 1)) > "$PHASE_DIR/rannc-requeued"
    echo "rannc: ranks stopped (code $code); rerunning job $PBS_JOBID to resume from $RANNC_CHECKPOINT_DIR"
    trap 'exit 0' TERM   # PBS ends this run with SIGTERM to every process of the job, then queues it again
    if ( trap '' TERM; exec "$QRERUN" "$PBS_JOBID" ); then
        sleep 300 & wait $!
        exit 0
    fi
    RANNC_REQUEUING=0
    echo $((RANNC_RESTART_COUNT)) > "$PHASE_DIR/rannc-requeued"
    echo "rannc: qrerun was refused: submit again to resume from $RANNC_CHECKPOINT_DIR"
    exit 75
fi
exit "$code"
