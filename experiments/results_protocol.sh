#!/usr/bin/env bash
# Reproduces the fair-protocol tables of RESULTS.md (issue 8) on the default synthetic task: one sequential
# stream of runs, one torch thread (single-process; 1-4.5 min per run on 2 shared cores, 42 runs at the defaults).
#   bash experiments/results_protocol.sh [OUT_DIR]
# Protocol (every run): selection=best (SFT until the validation KL stops improving, at most 3000 steps,
# cached and shared by every method of a seed; the best validated checkpoint, step 0 = the SFT start
# included), student decoding at top-p 1.0 and 0.8 side by side.
#  1. lr sweep on seed 0 for bc, kd, iql_bd (LRS), the lr picked by validation (experiments/sweep_lr.py);
#  2. SEEDS of bc, kd and iql_bd at their chosen lrs (seed 0 of these is the sweep's run at the chosen lr,
#     the same config, not run twice);
#  3. ABLATION_SEEDS of the p ablation, algo.top_p in P_GRID for the three BD forms (iql_bd, iql_bd_math,
#     iql_bd_released), then soft_q, all at iql_bd's chosen lr (not swept). At p = 1 the released form runs
#     without its KD half (algo.kd_coef=0: the KD term reads the cached top-0.8 set, which the
#     full-vocabulary MDP has not);
#  4. the table (experiments/report.py --protocol).
# SEEDS, ABLATION_SEEDS (default 0,1,2 both) and P_GRID (0.8,1.0,0.5) can be narrowed from the environment;
# RESULTS.md says which were. Other tasks: TASK_ARGS (overrides given to every run and to the data generation,
# e.g. "task=synthetic_lm model=small_lm"), SFT_MAX (the SFT cap, default 3000), STEPS (default 1000), EXTRA
# (more overrides of every run, e.g. "selection.every=20"); LR_BC, LR_KD and LR_BD (all three) skip the sweep
# and run every seed of bc, kd and iql_bd at those lrs instead (RESULTS.md says where this was done).
#   TASK_ARGS="task=synthetic_lm model=small_lm" LR_BC=3e-4 LR_KD=3e-4 LR_BD=1e-3 SEEDS=0 ABLATION_SEEDS=0 \
#       bash experiments/results_protocol.sh multirun/results_protocol_lm
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/results_protocol}
SEEDS=${SEEDS:-0,1,2}
ABLATION_SEEDS=${ABLATION_SEEDS:-0,1,2}
P_GRID=${P_GRID:-0.8,1.0,0.5}   # the order the p ablation runs in
LRS=${LRS:-3e-4,1e-3,3e-3}
read -r -a TASK <<< "${TASK_ARGS:-}"
read -r -a MORE <<< "${EXTRA:-}"
PROTOCOL=(threads=1 progress=false selection=best sft_steps="${SFT_MAX:-3000}" steps="${STEPS:-1000}"
          'eval.decode_top_p=[1.0,0.8]' "${TASK[@]}" "${MORE[@]}")
FIXED_LRS=$(( ${LR_BC:+1}+0 + ${LR_KD:+1}+0 + ${LR_BD:+1}+0 ))
if (( FIXED_LRS == 1 || FIXED_LRS == 2 )); then
  echo "error: set all three of LR_BC, LR_KD and LR_BD (fixed lrs, no sweep) or none of them (the lr sweep)" >&2
  exit 2
fi
mkdir -p "$OUT"
run() { python experiments/run.py -m "${PROTOCOL[@]}" "$@"; }
# A failed setting (e.g. stopped by the divergence guard) is reported and skipped; the table omits it.
try() { "$@" || echo "warning: failed, no table row: ${*:2}" | tee -a "$OUT/failed.txt" >&2; }
chosen() { python -c "import json, sys; print(json.load(open('$OUT/lr_sweep/chosen.json'))['$1'][sys.argv[1]])" "$2"; }
# Seeds other than 0 (seed 0 of a swept setting is the sweep's run); empty if SEEDS is just 0.
OTHER_SEEDS=$(echo "$SEEDS" | tr ',' '\n' | grep -v '^0$' | paste -sd, || true)
OTHER_P=$(echo "$P_GRID" | tr ',' '\n' | grep -v '^0.8$' || true)   # P_GRID without 0.8, one a line

python experiments/generate.py threads=1 "${TASK[@]}"   # the shared offline teacher data, once
SWEEP=1
if (( FIXED_LRS == 3 )); then
  SWEEP=0; OTHER_SEEDS=$SEEDS   # no sweep: seed 0 runs below with the others
  echo "fixed lr (no sweep): bc $LR_BC, kd $LR_KD, iql_bd $LR_BD (also every TD variant)"
else
  if [[ ! -f "$OUT/lr_sweep/chosen.json" ]]; then
    python experiments/sweep_lr.py --algos bc,kd,iql_bd --lrs "$LRS" --seeds 0 --out "$OUT/lr_sweep" -- "${PROTOCOL[@]}"
  fi
  LR_BC=$(chosen bc lr); LR_KD=$(chosen kd lr); LR_BD=$(chosen iql_bd lr)
  echo "chosen lr: bc $LR_BC, kd $LR_KD, iql_bd $LR_BD (also every unswept TD variant)"
fi

if [[ -n "$OTHER_SEEDS" ]]; then
  run algo=bc algo.lr="$LR_BC" seed="$OTHER_SEEDS" hydra.sweep.dir="$OUT/main/bc"
  run algo=kd algo.lr="$LR_KD" seed="$OTHER_SEEDS" hydra.sweep.dir="$OUT/main/kd"
  run algo=iql_bd algo.lr="$LR_BD" seed="$OTHER_SEEDS" hydra.sweep.dir="$OUT/main/iql_bd_p0.8"
fi
# The p ablation, the most informative runs first (a stream stopped early keeps them): the paper's and the
# release's forms at the paper's p = 0.8, then the other p values for the three forms (1.0, the paper's
# comparison, before 0.5).
td() {  # td ALGO P: one BD form at one p, ABLATION_SEEDS
  local extra=()
  [[ $1 == iql_bd_released && $2 == 1.0 ]] && extra=(algo.kd_coef=0.0)
  try run algo="$1" algo.lr="$LR_BD" algo.top_p="$2" "${extra[@]}" seed="$ABLATION_SEEDS" hydra.sweep.dir="$OUT/main/$1_p$2"
}
if [[ ",$P_GRID," == *",0.8,"* ]]; then td iql_bd_math 0.8; td iql_bd_released 0.8; fi
for p in $OTHER_P; do
  for algo in iql_bd iql_bd_math iql_bd_released; do td "$algo" "$p"; done
done
try run algo=soft_q algo.lr="$LR_BD" seed="$ABLATION_SEEDS" hydra.sweep.dir="$OUT/main/soft_q"

# The table: the sweep's seed-0 runs at the chosen lrs (if swept) plus every run above.
SWEPT=()
if [[ $SWEEP == 1 ]]; then
  mapfile -t SWEPT < <(python -c "import json; [print(d) for a in json.load(open('$OUT/lr_sweep/chosen.json')).values() for d in a['runs']]")
fi
python experiments/report.py "${SWEPT[@]}" "$OUT/main" --protocol --label algo.lr --curves --out "$OUT/table.md"
