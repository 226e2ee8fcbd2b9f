#!/usr/bin/env bash
# Paper Table 5: SVHN and Fashion-MNIST, WRN-28-10 and Shake-Shake, Basic and 'Auto augment', SGD and SAM (5 seeds).
# Usage: scripts/table5.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table5.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table5_*" optimizer=sgd,sam
report
