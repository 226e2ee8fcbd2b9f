#!/usr/bin/env bash
# Paper Table 2: ImageNet ResNet-50/101/152 x 100/200/400 epochs, SGD and SAM (5 seeds).
# Usage: scripts/table2.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table2.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
# Size: the presets keep the paper's batch 4096 with m = 128 per device, i.e. 32 GPUs. On one process the whole batch runs at once
# (m-sharpness per chunk, no gradient accumulation), which these models do not fit on one GPU: run them
# under torchrun with batch/m ranks (an sbatch script running torchrun; the submitit launcher is one process
# per job), or lower trainer.batch_size/optimizer.m and say so beside the numbers.
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table2_*" optimizer=sgd,sam
report
