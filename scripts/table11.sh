#!/usr/bin/env bash
# Paper Table 11: k = 1/2/3/5 ascent steps on CIFAR-10/100 (20 seeds, as the paper).
# Usage: scripts/table11.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table11.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
USER_SEEDS="${SEEDS:-}"  # before _paper.sh sets its default of 5: the paper's Table 11 has 20 runs
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
SEEDS="${USER_SEEDS:-range(20)}" train_presets "table11_*"
report
