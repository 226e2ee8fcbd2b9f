#!/usr/bin/env bash
# Paper Figs. 4-5: SAM with and without the second-order terms, WRN-40-2 on CIFAR-10 (the preset's sweeper
# runs both); test error in summary.md, the cosine between the two updates in TensorBoard (sam/second_order_cosine).
# Usage: scripts/fig4.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/fig4.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "fig4_*"
report
