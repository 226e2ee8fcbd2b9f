#!/usr/bin/env bash
# All GPU checks in one command, for a lent GPU machine (see README "GPU checks"):
#   the CUDA tests (pytest -m gpu), the throughput benchmark, and real training runs.
# Needs: the repo, wheels of hydra-core/omegaconf/antlr4 in .whl/ (when the machine lacks them)
# and, for the Fashion-MNIST run, the gzip IDX files in .fmnist/. Writes logs under $OUT
# (default ./gpu_check_out). Each stage has its own time limit; one failing stage does not stop
# the others. Total under ~8 minutes on an H100/H200.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export SAM_BENCH_RUNS=/tmp/sb_runs SAM_BENCH_MULTIRUN=/tmp/sb_multirun SAM_BENCH_DATA=/tmp/sb_data
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s)"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc"
}
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/env.log" 2>&1
head -n 20 "$OUT/env.log"

stage gpu_tests 150 python3 -m pytest -m gpu tests -q -p no:cacheprovider
stage bench 270 python3 scripts/bench.py --models wrn28_10 --batch 256 --precision bf16 --compile 0,1 --steps 20 --warmup 8 --out "$OUT/bench.json"
stage bench_resnet50 120 python3 scripts/bench.py --models resnet50 --image-size 224 --num-classes 1000 --batch 128 --precision bf16 --compile 1 --m 0 --reference 0 --steps 15 --warmup 5 --out "$OUT/bench_resnet50.json"
stage bench_sam 90 python3 scripts/bench_sam.py --no-cpu --out "$OUT/bench_sam.json"
stage bench_data 45 python3 scripts/bench_data.py
if ls .fmnist/*.gz >/dev/null 2>&1; then
  stage fmnist_sgd_vs_sam 140 python3 -m sam_bench train -m dataset=fashion_mnist dataset.system_dir=$PWD/.fmnist \
    model.kwargs.depth=16 model.kwargs.width=4 trainer.epochs=10 trainer.batch_size=256 trainer.progress=false \
    optimizer=sgd,sam optimizer.rho=0.05 optimizer.lr=0.1 seed=0
  python3 -m sam_bench report "runs=[/tmp/sb_multirun]" out="$OUT/report" >> "$OUT/fmnist_sgd_vs_sam.log" 2>&1
  cat "$OUT/report/summary.md" 2>/dev/null
fi
echo "done $(date +%T)"
