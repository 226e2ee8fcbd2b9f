#!/usr/bin/env bash
# Prepares, on this (networked) machine, what scripts/gpu_check.sh needs on a lent GPU machine that
# lacks them and cannot download: wheels of hydra-core, omegaconf and antlr4 (the versions installed
# here; antlr4 4.9.3 exists only as an sdist, so it is built into a wheel) in .whl/, and the
# Fashion-MNIST gzip IDX files (stage fmnist) in .fmnist/. Both folders are git-ignored: pass them
# to the device tool's carry, e.g. carry [".whl", ".fmnist"].
# Usage: bash scripts/gpu_carry.sh [PYTHON]   (PYTHON: the interpreter whose versions to take; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
pins=$("$PY" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{d}=={version(d)}" for d in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
PY
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip wheel -q --no-deps --wheel-dir .whl $pins
FMNIST=/usr/share/datasets/fashion-mnist
if [[ -d $FMNIST ]]; then
  mkdir -p .fmnist && cp "$FMNIST"/*-ubyte.gz .fmnist/
else
  echo "gpu_carry.sh: $FMNIST is missing (apt-get install dataset-fashion-mnist); .fmnist/ not made" >&2
fi
ls -l .whl .fmnist 2>/dev/null
