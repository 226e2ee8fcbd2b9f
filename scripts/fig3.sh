#!/usr/bin/env bash
# Paper Fig. 3 (middle): test error vs rho for m in {1,4,16,64,256} (the grid is the preset's sweeper params); see results/sweeps.md.
# Usage: scripts/fig3.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/fig3.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "fig3_*"
report
