#!/usr/bin/env bash
# Paper Table 8's rho grid on noisy CIFAR-10 (plain SAM: bootstrapping is not implemented), on a 10 % held-out split with clean labels (as the paper); see results/sweeps.md.
# Its 7 rows: rho = 0 (optimizer=sam with rho 0 is SGD, one pass per step; in the sweep so that the grid is one experiment) and 0.01-0.5.
# Usage: scripts/table8.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table8.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table4_*" dataset.val_size=5000 optimizer.rho=0.0,0.01,0.02,0.05,0.1,0.2,0.5
report
