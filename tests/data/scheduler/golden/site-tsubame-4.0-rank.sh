#!/bin/bash
# rannc job 0123abcd: one training rank (started by qrsh -inherit or the site's MPI launcher), from templates/sge/rank.sh.j2
# qrsh -inherit passes RANK and LOCAL_RANK; an MPI launcher sets its own rank variables.
RANK=${RANK:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-}}}}
LOCAL_RANK=${LOCAL_RANK:-${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-}}}
if [ -z "$RANK" ]; then
    echo "rannc: cannot tell this process's rank: neither RANK nor an MPI rank variable is set" >&2
    exit 2
fi
export RANK WORLD_SIZE=8 LOCAL_RANK="${LOCAL_RANK:-$((RANK % 4))}"
export LOCAL_WORLD_SIZE=4 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
exec >> "$RANNC_JOB_DIR/train/rank-$RANK.log" 2>&1
cd /home/alice/src
exec /home/alice/venv/bin/python <repo>/examples/mlp.py --steps 20
