#!/bin/bash
# rannc job 0123abcd: one training rank, from templates/pbs/rank.sh.j2
# Started as `rank.sh RANK ENVFILE` by train.sh through pbs_tmrsh (PBS's task launch: the task gets PBS's
# environment, the batch shell's is in ENVFILE), or by the site's MPI launcher with no arguments: then the
# rank comes from whichever launcher started us (Open MPI, MPICH/Hydra, PMIx, Cray PALS, Slurm).
if [ $# -ge 2 ]; then
    . "$2"
    RANK=$1
    LOCAL_RANK=$((RANK % 8))
else
    RANK=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-${PALS_RANKID:-${SLURM_PROCID:-}}}}}
    LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${PALS_LOCAL_RANKID:-${SLURM_LOCALID:-}}}}
fi
if [ -z "$RANK" ]; then
    echo "rannc: cannot tell this process's rank: no MPI rank variable is set" >&2
    exit 2
fi
export RANK WORLD_SIZE=32 LOCAL_RANK="${LOCAL_RANK:-$((RANK % 8))}"
export LOCAL_WORLD_SIZE=8 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
cd /home/alice/src || exit 2
exec >> "$RANNC_JOB_DIR/train/rank-$RANK.log" 2>&1
printf '%s %s\n' "$(hostname)" "$$" > "$RANNC_JOB_DIR/train/rank-$RANK.pid"
exec /home/alice/venv/bin/python /home/alice/src/train.py --lr 0.1
