#!/bin/bash
# rannc job 0123abcd: one training rank (started by the MPI launcher), from templates/pjm/rank.sh.j2
# Fujitsu MPI and Open MPI set OMPI_COMM_WORLD_RANK / PMIX_RANK.
RANK=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-}}}
LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-}}
if [ -z "$RANK" ]; then
    echo "rannc: cannot tell this process's rank: no MPI rank variable is set" >&2
    exit 2
fi
export RANK WORLD_SIZE=32 LOCAL_RANK="${LOCAL_RANK:-$((RANK % 8))}"
export LOCAL_WORLD_SIZE=8 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
cd /home/alice/src || exit 2
exec >> "$RANNC_JOB_DIR/train/rank-$RANK.log" 2>&1
exec /home/alice/venv/bin/python /home/alice/src/train.py --lr 0.1
