#!/bin/bash
# rannc job 0123abcd: one training rank (started by srun), from templates/slurm/rank.sh.j2
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-8}" PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
exec /home/alice/venv/bin/python /home/alice/src/train.py --lr 0.1
