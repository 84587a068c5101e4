#!/bin/bash
# rannc job 0123abcd: one training rank (started by mpiexec), from templates/pbs/rank.sh.j2
# The rank comes from whichever MPI launcher started us (Open MPI, MPICH/Hydra, PMIx, Cray PALS, Slurm).
RANK=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-${PALS_RANKID:-${SLURM_PROCID:-}}}}}
LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-${PALS_LOCAL_RANKID:-${SLURM_LOCALID:-}}}}
if [ -z "$RANK" ]; then
    echo "rannc: cannot tell this process's rank: no MPI rank variable is set" >&2
    exit 2
fi
export RANK WORLD_SIZE=8 LOCAL_RANK="${LOCAL_RANK:-$((RANK % 2))}"
export LOCAL_WORLD_SIZE=2 PYTHONUNBUFFERED=1
exec >> "$RANNC_JOB_DIR/train/rank-$RANK.log" 2>&1
exec /home/alice/venv/bin/python /home/alice/src/train.py --lr 0.1
