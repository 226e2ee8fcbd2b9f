#!/usr/bin/env bash
# Paper Table 3: finetuning EfficientNet-b7 and -L2 on each dataset, SGD and SAM (5 seeds).
# Usage: scripts/table3.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table3.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
# Size: the presets keep the paper's batch 1024 (b7, m = 16: 64 GPUs) or 512 (L2, m = 4: 128 GPUs). On one process the whole batch runs at once
# (m-sharpness per chunk, no gradient accumulation), which these models do not fit on one GPU: run them
# under torchrun with batch/m ranks (an sbatch script running torchrun; the submitit launcher is one process
# per job), or lower trainer.batch_size/optimizer.m and say so beside the numbers.
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table3_*" optimizer=sgd,sam
report
