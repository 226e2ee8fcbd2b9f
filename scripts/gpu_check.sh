#!/usr/bin/env bash
# All GPU checks in one command, for a lent GPU machine (see README "Speed"):
#   the CUDA tests (pytest -m gpu), the SAM-family step times (SGD/SAM/m-SAM/ASAM, WRN-28-10 bf16,
#   eager, then SAM and m-SAM under torch.compile), ResNet-50 at 224 px (SAM images/s, compiled),
#   and on request a Fashion-MNIST SGD-vs-SAM training run (stage fmnist) and, with
#   GPU_CHECK_WRN=1, the full WRN-28-10 grid of scripts/bench.py (eager + compiled + reference loop).
# Needs: the repo, wheels of hydra-core/omegaconf/antlr4 in .whl/ (when the machine lacks them)
# and, for the Fashion-MNIST run, the gzip IDX files in .fmnist/ (scripts/gpu_carry.sh makes both). Writes under $OUT (default
# ./gpu_check_out) summary.log (environment + the tail of every stage), one log per stage run (stage
# fmnist's is fmnist_sgd_vs_sam.log) and the JSON of stages bench_sam, bench_resnet50 and msam_graphed:
# 7 files with the default stages, 17 with every stage and GPU_CHECK_WRN=1. Each stage has its own
# time limit; one failing stage does not stop the others. On an H200 (eighth session) the first
# three default stages took 92 + 43 + 154 s; ResNet-50 ran past its then 100 s limit on a fresh machine while compiling SAM's step (66 s with warm compile
# caches), hence 165 s now. The limits add up to 480 s, with thin margins (gpu_tests 105 s against 92
# measured, bench_sam_compiled 160 against 154); GPU_TESTS_LIMIT raises the first.
# STAGES (space-separated) picks stages: gpu_tests bench_sam bench_sam_compiled bench_resnet50
# fmnist hessian msam_cli msam_engines profile_resnet50 msam_profile_compiled msam_cudagraphs msam_graphed
# (default: the first four; hessian needs fmnist's runs: STAGES="fmnist hessian"; an unknown name
# stops the script with exit 2 before anything runs, listing these); GPU_TESTS overrides
# the pytest targets (default: every file with gpu tests, m-SAM's first, all 14 passed on an H200 in
# the eighth session; the inductor replay tests of tests/test_models_zoo.py, which compile whole
# models, only when named here);
# BENCH_SAM_VARIANTS / BENCH_SAM_PROFILE / BENCH_SAM_STEPS go to bench_sam.py
# (BENCH_SAM_COMPILED_VARIANTS, default msam,sam, for the compiled stage);
# RESNET50_COMPILE_MODE (default: default) and RESNET50_BATCH (default 256) set the ResNet-50 stage.
set -uo pipefail
KNOWN_STAGES="gpu_tests bench_sam bench_sam_compiled bench_resnet50 fmnist hessian msam_cli msam_engines profile_resnet50 msam_profile_compiled msam_cudagraphs msam_graphed"
STAGES=${STAGES:-gpu_tests bench_sam bench_sam_compiled bench_resnet50}
read -ra ASKED <<< "$STAGES"
for s in "${ASKED[@]}"; do  # a misspelt stage would run nothing and say nothing
  if [[ " $KNOWN_STAGES " != *" $s "* ]]; then
    echo "gpu_check.sh: unknown stage '$s' in STAGES; known stages: $KNOWN_STAGES" >&2
    [[ $s != fmnist_sgd_vs_sam ]] || echo "(fmnist_sgd_vs_sam is the log of stage fmnist)" >&2
    exit 2
  fi
done
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.log"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export SAM_BENCH_RUNS=/tmp/sb_runs SAM_BENCH_MULTIRUN=/tmp/sb_multirun SAM_BENCH_DATA=/tmp/sb_data
stage() {  # stage NAME SECONDS CMD...   (log: $OUT/NAME.log; its tail goes to summary.log)
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "=== $name ($(date +%T), limit ${secs}s)" | tee -a "$SUMMARY"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log" | tee -a "$SUMMARY"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee -a "$SUMMARY"

want() { [[ " $STAGES " == *" $1 "* ]]; }
GPU_TESTS=${GPU_TESTS:-tests/test_sam_family.py tests/test_gpu.py tests/test_hessian.py tests/test_data_zoo.py}
want gpu_tests && stage gpu_tests ${GPU_TESTS_LIMIT:-105} python3 -m pytest -m gpu $GPU_TESTS -q -p no:cacheprovider -rA --durations=0
# (engine "auto" = "msam" takes vmap for an eager CUDA model: msam_split times the split engine eager)
want bench_sam && stage bench_sam 50 python3 scripts/bench_sam.py --no-cpu --gpu-steps ${BENCH_SAM_STEPS:-15} --warmup 3 \
  --variants ${BENCH_SAM_VARIANTS:-sgd,sam,msam,msam_split,asam} ${BENCH_SAM_PROFILE:+--profile $BENCH_SAM_PROFILE} \
  --out "$OUT/bench_sam.json"
# the same WRN-28-10 steps under torch.compile (trainer.compile=true): SAM and the split m-SAM engine
# (the first step of each compiles: m-SAM's graphs hold every chunk's kernels, about 2.7 times SAM's
# compile on the CPU, so m-SAM runs first; its JSON stays on the machine, the log has the figures)
want bench_sam_compiled && stage bench_sam_compiled 160 python3 scripts/bench_sam.py --no-cpu --compile \
  --gpu-steps ${BENCH_SAM_STEPS:-15} --warmup 3 --variants ${BENCH_SAM_COMPILED_VARIANTS:-msam,sam} \
  --out /tmp/bench_sam_compiled.json
want bench_resnet50 && stage bench_resnet50 165 python3 scripts/bench.py --models resnet50 --image-size 224 --num-classes 1000 --batch ${RESNET50_BATCH:-256} \
  --precision bf16 --compile 1 --compile-mode ${RESNET50_COMPILE_MODE:-default} --m 0 --reference 0 --steps 15 --warmup 5 \
  --out "$OUT/bench_resnet50.json"
# on request: split vs vmap m-SAM engine (eager) as the chunk count grows; on an H200 (eighth session,
# ResNet-32, 4/16/64 chunks) vmap won at each, so engine auto takes vmap for an eager CUDA model
want msam_engines && stage msam_engines 120 bash -c 'for m in 64 16 4 1; do python3 scripts/bench_sam.py --no-cpu \
  --gpu-arch resnet32 --gpu-m $m --gpu-steps 5 --warmup 2 --no-diagnostics --variants sam,msam_split,msam_vmap; done'
# on request: where the ResNet-50 SAM step's time goes (kernel tables of the compiled SGD and SAM steps)
want profile_resnet50 && stage profile_resnet50 150 python3 scripts/bench_sam.py --no-cpu --compile --gpu-arch resnet50 \
  --image-size 224 --num-classes 1000 --gpu-batch ${RESNET50_BATCH:-256} --gpu-steps 5 --warmup 3 --no-diagnostics \
  --variants sgd,sam --profile sgd,sam --out /tmp/profile_resnet50.json
# on request: is the compiled split m-SAM step (WRN-28-10, m = 32 of 256) host-bound? Its kernel table
# (the sum of kernel times against the step's wall time); eager it was: 78 of 167 ms (eighth session)
want msam_profile_compiled && stage msam_profile_compiled 150 python3 scripts/bench_sam.py --no-cpu --compile \
  --gpu-steps 5 --warmup 2 --no-diagnostics --variants msam --profile msam
# on request: why CUDA graphs (reduce-overhead) made the compiled split m-SAM step slower (297 against
# 106 ms, eighth session): the skip and re-record reasons of cudagraph trees, then SAM for comparison;
# then the same m-SAM step with a step boundary marked for cudagraph trees (--mark-step; compile cached)
want msam_cudagraphs && stage msam_cudagraphs 300 bash -c 'TORCH_LOGS=perf_hints,cudagraphs python3 scripts/bench_sam.py \
  --no-cpu --compile --compile-mode reduce-overhead --gpu-steps 10 --warmup 3 --no-diagnostics --variants msam,sam; \
  python3 scripts/bench_sam.py --no-cpu --compile --compile-mode reduce-overhead --gpu-steps 10 --warmup 3 \
  --no-diagnostics --variants msam --mark-step'
# on request: the eager SAM and split m-SAM steps (WRN-28-10, m = 32 of 256) with their host work
# removed: each step captured once in a CUDA graph and replayed (bench_sam.py *_graphed; never run
# before the next GPU session), beside the same steps launched from Python
want msam_graphed && stage msam_graphed 120 python3 scripts/bench_sam.py --no-cpu --gpu-steps 10 --warmup 3 \
  --no-diagnostics --variants sam,msam_split,sam_graphed,msam_graphed --out "$OUT/bench_msam_graphed.json"
if [ "${GPU_CHECK_WRN:-0}" = 1 ]; then
  stage bench_wrn 270 python3 scripts/bench.py --models wrn28_10 --batch 256 --precision bf16 --compile 0,1 \
    --steps 15 --warmup 5 --out /tmp/bench_wrn.json
fi
if want msam_cli && ls .fmnist/*.gz >/dev/null 2>&1; then  # m-SAM through the trainer, real data
  stage msam_cli 75 python3 -m sam_bench train dataset=fashion_mnist dataset.system_dir=$PWD/.fmnist \
    dataset.train_subset=15360 model.kwargs.depth=16 model.kwargs.width=4 trainer.epochs=2 trainer.batch_size=256 \
    trainer.progress=false optimizer=sam optimizer.m=32 optimizer.diagnostics=true seed=0 hydra.run.dir=/tmp/sb_msam
fi
if want fmnist && ls .fmnist/*.gz >/dev/null 2>&1; then
  stage fmnist_sgd_vs_sam 70 python3 -m sam_bench train -m dataset=fashion_mnist dataset.system_dir=$PWD/.fmnist \
    model.kwargs.depth=16 model.kwargs.width=4 trainer.epochs=5 trainer.batch_size=256 trainer.progress=false \
    optimizer=sgd,sam optimizer.rho=0.05 optimizer.lr=0.1 seed=0
  python3 -m sam_bench report "runs=[/tmp/sb_multirun]" out=/tmp/sb_report >> "$OUT/fmnist_sgd_vs_sam.log" 2>&1
  cat /tmp/sb_report/summary.md 2>/dev/null | tee -a "$SUMMARY"
fi
if want hessian && ls -d /tmp/sb_multirun/*/ >/dev/null 2>&1; then  # after fmnist: the Hessian spectra of its SGD and SAM runs
  stage hessian 120 bash -c 'for d in /tmp/sb_multirun/*/; do python3 -m sam_bench hessian checkpoint="$d" images=5000 iters=20; done'
fi
for s in msam_cli fmnist; do  # asked for, but nothing to train on: say so instead of skipping silently
  if want $s && ! ls .fmnist/*.gz >/dev/null 2>&1; then echo "stage $s skipped: no .fmnist/*.gz (carry the Fashion-MNIST gzip files)" | tee -a "$SUMMARY"; fi
done
if want hessian && ! ls -d /tmp/sb_multirun/*/ >/dev/null 2>&1; then
  echo "stage hessian skipped: no runs in /tmp/sb_multirun (it needs stage fmnist first)" | tee -a "$SUMMARY"
fi
echo "done $(date +%T)" | tee -a "$SUMMARY"
