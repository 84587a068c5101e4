#!/bin/bash
# rannc job 0123abcd: one training rank (started by the MPI launcher), from templates/nqsv/rank.sh.j2
# Open MPI (-T openmpi) sets OMPI_COMM_WORLD_RANK; other MPIs PMIX_RANK / PMI_RANK.
RANK=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-}}}
LOCAL_RANK=${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-}}
if [ -z "$RANK" ]; then
    echo "rannc: cannot tell this process's rank: no MPI rank variable is set" >&2
    exit 2
fi
export RANK WORLD_SIZE=2 LOCAL_RANK="${LOCAL_RANK:-$((RANK % 1))}"
export LOCAL_WORLD_SIZE=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
cd /home/alice/src || exit 2
exec >> "$RANNC_JOB_DIR/train/rank-$RANK.log" 2>&1
exec /home/alice/venv/bin/python <repo>/examples/mlp.py --steps 20
