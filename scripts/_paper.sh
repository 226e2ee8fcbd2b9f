# Shared by scripts/table*.sh (sourced, not run): launch paper presets, then regenerate results/.
#
# Environment (all optional):
#   PYTHON    interpreter with sam-bench installed (default: python)
#   SEEDS     Hydra sweep of seeds (default: 0,1,2,3,4 = the paper's 5 runs)
#   PRESETS   glob over conf/experiment/paper/*.yaml stems to restrict a table (e.g. 'table1_wrn28_10_200ep_*')
#   REPORT_OUT where the report goes (default: results)
#   DRY_RUN=1 print the commands instead of running them
# Extra arguments are Hydra overrides passed to every `sam-bench train -m` call, e.g. SLURM:
#   scripts/table1.sh hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \
#       hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=4320
# (needs `pip install hydra-submitit-launcher`; Hydra waits for the jobs, then the report runs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
SEEDS="${SEEDS:-0,1,2,3,4}"
REPORT_OUT="${REPORT_OUT:-results}"

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# presets GLOB: the preset stems under conf/experiment/paper matching GLOB (and PRESETS if set), sorted.
presets() {
  local f stem
  for f in "$ROOT"/conf/experiment/paper/$1.yaml; do
    [[ -e "$f" ]] || continue
    stem="$(basename "$f" .yaml)"
    # shellcheck disable=SC2053
    [[ -z "${PRESETS:-}" || "$stem" == ${PRESETS} ]] && echo "$stem"
  done
}

FAILED=()  # presets whose multirun exited non-zero (e.g. a sweep point diverged); the others still run
GLOBS=()   # every glob train_presets was asked for, and whether any preset matched one
MATCHED=0

# train_presets GLOB [ARGS...]: one multirun per preset matching GLOB; ARGS before the user's overrides.
train_presets() {
  local glob="$1"; shift
  local stem found=0 rc
  for stem in $(presets "$glob"); do
    found=1
    rc=0
    run "$PYTHON" -m sam_bench train -m "experiment=paper/$stem" "seed=$SEEDS" "$@" "${EXTRA[@]}" || rc=$?
    if (( rc == 75 || rc >= 128 )); then  # preempted (sam-bench's 75) or killed by a signal (Ctrl-C): stop here
      echo "$stem: sam-bench train exited $rc (preempted or interrupted); stopping" >&2
      exit "$rc"
    elif [[ $rc != 0 ]]; then
      echo "$stem: sam-bench train exited $rc; going on with the other presets" >&2
      FAILED+=("$stem")
    fi
  done
  GLOBS+=("$glob")
  [[ $found == 0 ]] || MATCHED=1  # PRESETS may pick from one glob of a table only (table1.sh has two)
}

# report: regenerate the tables (runs that failed are listed in them), then exit 1 if any preset failed.
report() {
  local rc=0
  if [[ $MATCHED == 0 ]]; then
    echo "no preset matches ${GLOBS[*]}${PRESETS:+ and PRESETS=$PRESETS}" >&2
    exit 2
  fi
  run "$PYTHON" -m sam_bench report "out=$REPORT_OUT" || rc=$?
  if [[ ${#FAILED[@]} != 0 ]]; then
    echo "failed presets (the report lists their unfinished runs): ${FAILED[*]}" >&2
  fi
  if [[ $rc != 0 ]]; then
    exit "$rc"
  fi
  [[ ${#FAILED[@]} == 0 ]] || exit 1
}
