#!/usr/bin/env bash
# Paper Table 10: EfficientNet-b7 finetuning at rho = 0.05 and without SAM. These are Table 3's b7 runs (its presets use
# rho = 0.05, as the per-dataset optimal rho is not printed): after scripts/table3.sh they are finished and not retrained.
# Usage: scripts/table10.sh [HYDRA_OVERRIDES...]   (env: SEEDS, PRESETS, PYTHON, REPORT_OUT, DRY_RUN=1; see scripts/_paper.sh)
# SLURM: scripts/table10.sh hydra/launcher=submitit_slurm hydra.launcher.partition=<partition> hydra.launcher.gpus_per_node=1
set -euo pipefail
# shellcheck source=scripts/_paper.sh
source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh"
EXTRA=("$@")
cd "$ROOT"
train_presets "table3_[!i]*_b7" optimizer=sgd,sam   # every b7 dataset but ImageNet (not in Table 10)
report
