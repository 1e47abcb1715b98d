#!/usr/bin/env bash
# The prepared GPU check of issue 22: the CUDA tests, training-step costs in bf16 at GPT-2-small and Qwen2.5-0.5B
# shape, teacher-data generation against transformers' generate at batch 64, the README main job with
# device=cuda and a one-process nccl torchrun, every table into ONE markdown file. Under 8 minutes on one H200:
# each stage runs within its own limit and what is left of --budget (470 s); a failed, timed-out or skipped
# stage is marked in the file and the next one runs; the exit status is 1 if any stage did not pass.
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--wheels DIR] [--peak-tflops X] [--budget S]   # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run [--out FILE]                      # the same code, tiny, on CPU
#   bash benchmarks/gpu_check.sh --download-wheels DIR                           # where PyPI is reachable
#
# Packages. The check needs what the project imports. A GPU image with torch, transformers and tensorboard but
# without hydra-core, omegaconf, gymnasium and rouge-score (this workplace's device machine, which reaches no
# registry) gets them as wheels: here, from the repository root,
#     echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu_check.sh --download-wheels .whl
# builds or downloads pure-Python wheels of exactly the versions installed here (hydra-core, omegaconf,
# antlr4-python3-runtime, gymnasium, farama-notifications, rouge-score, nltk, defusedxml: `pip wheel --no-deps`,
# since antlr4 4.9.3 and rouge-score are source-only on PyPI, so `pip download --only-binary` finds no file);
# then on the GPU machine (the device tool: carry [".whl"]):
#     bash benchmarks/gpu_check.sh --wheels .whl --out "$OUT/gpu_check.md"
# installs them with `pip install --no-index --no-deps --target` into a private folder on PYTHONPATH. A package
# still missing stops the check at its first stage with a message naming it and this fix.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
OUT=outputs/gpu_check.md
BUDGET=470  # seconds for all stages: a stage gets at most its own limit and what is left of this
DRY=""
WHEELS=""
PEAK=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --cpu-dry-run) DRY="--cpu-dry-run"; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --peak-tflops) PEAK=(--peak-tflops "$2"); shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --download-wheels)
            DIR=${2:?--download-wheels needs a folder}
            SPECS=$("$PYTHON" -c "
import importlib.metadata as m
names = ['hydra-core', 'omegaconf', 'antlr4-python3-runtime', 'gymnasium', 'farama-notifications', 'rouge-score',
         'nltk', 'defusedxml']
print(' '.join(f'{n}=={m.version(n)}' for n in names))") || { echo "gpu_check: install the project here first (pip install -e .)" >&2; exit 2; }
            mkdir -p "$DIR" && exec "$PYTHON" -m pip wheel -q --no-deps -w "$DIR" $SPECS ;;
        *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done

if [[ -n "$WHEELS" ]]; then
    SITE=${TMPDIR:-/tmp}/tokenrl_gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || { echo "gpu_check: could not install the wheels in $WHEELS" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tokenrl_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"
if [[ -n "$DRY" ]]; then
    DEVICE=cpu
    TITLE="GPU check, CPU dry run (tiny shapes: checks the code, measures nothing)"
    # The main job shortened; the compile tests are left to tests/test_precision.py (inductor's C++ compile
    # takes minutes on a small CPU).
    MAIN_ARGS=(algo=iql_bd device=cpu threads=1 progress=false steps=20 sft_steps=10 "eval.seeds=[0]" eval.n_prompts=8)
    TEST_ARGS=(-k "not compiled")
else
    DEVICE=cuda
    TITLE="GPU check"
    MAIN_ARGS=(algo=iql_bd device=cuda threads=0 progress=false)
    TEST_ARGS=()
fi
printf '# %s\n\n`bash benchmarks/gpu_check.sh %s` (commit %s)\n\n' "$TITLE" "$*" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" > "$OUT"

SUMMARY=("| stage | result | seconds |" "|---|---|---:|")
FAILED=0
DEADLINE=$(( $(date +%s) + BUDGET ))
stage() {  # stage NAME LIMIT_S COMMAND...: run within min(limit, budget left), record the result and the seconds
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    if (( DEADLINE - start < 15 )); then
        FAILED=1
        SUMMARY+=("| $name | **SKIPPED** (the ${BUDGET} s budget is spent) | 0 |")
        echo "gpu_check: $name: ${SUMMARY[-1]}" >&2
        return 1
    fi
    (( limit > DEADLINE - start )) && limit=$(( DEADLINE - start ))
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    local seconds=$(( $(date +%s) - start ))
    if [[ $rc -eq 0 ]]; then
        SUMMARY+=("| $name | ok | $seconds |")
    else
        FAILED=1
        local why="exit $rc"
        [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit} s"
        SUMMARY+=("| $name | **FAILED** ($why) | $seconds |")
        { printf '## %s: FAILED (%s)\n\n```\n' "$name" "$why"; tail -n 40 "$WORK/$name.log"; printf '```\n\n'; } >> "$OUT"
    fi
    echo "gpu_check: $name: ${SUMMARY[-1]}" >&2
    return $rc
}

stage preflight 120 "$PYTHON" benchmarks/gpu_check.py preflight --out "$OUT" $DRY "${PEAK[@]}" || {
    cat "$WORK/preflight.log" >&2
    printf '%s\n' "${SUMMARY[@]}" >> "$OUT"
    exit 2
}
if stage cuda-tests 200 env TOKENRL_TEST_DEVICE=$DEVICE "$PYTHON" -m pytest -q -rfE -p no:cacheprovider \
        tests/test_cuda.py "${TEST_ARGS[@]}"; then
    { printf '## CUDA tests (TOKENRL_TEST_DEVICE=%s)\n\n```\n' "$DEVICE"; tail -n 1 "$WORK/cuda-tests.log"; printf '```\n\n'; } >> "$OUT"
fi
stage steps 150 "$PYTHON" benchmarks/gpu_check.py steps --out "$OUT" $DRY "${PEAK[@]}"
stage generate 120 "$PYTHON" benchmarks/gpu_check.py generate --out "$OUT" $DRY
stage torchrun 120 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/gpu_check.py nccl \
    --out "$OUT" $DRY
MAIN_CMD="python experiments/run.py ${MAIN_ARGS[*]}"
start=$(date +%s)
if stage main-job 200 "$PYTHON" experiments/run.py "${MAIN_ARGS[@]}" "hydra.run.dir=$WORK/main" "data_dir=$WORK/data"; then
    stage main-job-table 60 "$PYTHON" benchmarks/gpu_check.py main-job --out "$OUT" --run-dir "$WORK/main" \
        --seconds $(( $(date +%s) - start )) --command "$MAIN_CMD"
fi

printf '## Stages\n\n' >> "$OUT"
printf '%s\n' "${SUMMARY[@]}" >> "$OUT"
echo "gpu_check: tables in $OUT" >&2
exit $FAILED
