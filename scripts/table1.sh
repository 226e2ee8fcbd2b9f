#!/usr/bin/env bash
# Paper Table 1: every model x Basic/Cutout/AA x CIFAR-10/100, SGD and SAM (5 seeds), plus SGD at twice the epochs.
# Usage: scripts/table1.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table1.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table1_*[^x]" optimizer=sgd,sam   # the cells (SGD and SAM); *_sgd2x end in x
train_presets "table1_*_sgd2x"                   # the 2x-epochs SGD baseline (Sec. 3.1)
report
