#!/usr/bin/env bash
# Paper Table 3: finetuning EfficientNet-b7 and -L2 on each dataset, SGD and SAM (5 seeds).
# Usage: scripts/table3.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table3.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table3_*" optimizer=sgd,sam
report
