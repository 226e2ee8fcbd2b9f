#!/usr/bin/env bash
# Paper Fig. 6: test error vs rho (1e-6 to 1e3) for p = 2, p = inf and a random direction (the grid is the
# preset's sweeper params), one plot in results/sweeps.md.
# Usage: scripts/fig6.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/fig6.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "fig6_*"
report
