#!/usr/bin/env bash
# Submit a curriculum's stages to Slurm as a dependency chain (each stage --dependency=afterok on
# the previous one, started from its final checkpoint with train.init_from):
#
#   launch/curriculum.sh minimax /shared/runs/mm --nodes 64 --sbatch=--gpus-per-node=8 \
#       data.blend=[0.3,/data/a_text_document,0.7,/data/b_text_document] \
#       data.qa_blend=[1.0,/data/qa_text_document]
#   launch/curriculum.sh tiny runs/curriculum --local     # the scaled-down curriculum, here
#
# Curricula are recipes/curriculum/*.yaml; this is `mmtrain launch` (see its --help).
# MMTRAIN_PYTHON (default python3 on PATH) is also what launch/slurm.sbatch runs on the nodes.
set -euo pipefail
exec "${MMTRAIN_PYTHON:-python3}" -m mmtrain launch "$@"
