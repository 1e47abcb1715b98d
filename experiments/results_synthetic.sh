#!/usr/bin/env bash
# Reproduces the "Synthetic task" section of RESULTS.md: every algorithm x 3 seeds, the p ablation and the
# BD ablations on the default synthetic task, then the report. Two sweeps run side by side with one torch
# thread each (~30 min on 2 CPU cores).
#   bash experiments/results_synthetic.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/results_synthetic}
run() { python experiments/run.py -m progress=false threads=1 "$@"; }
python experiments/generate.py threads=1   # the shared offline teacher data, once, before the parallel sweeps
(
  run algo=bc,kd,iql_bd,soft_q seed=0,1,2 hydra.sweep.dir="$OUT/algos"
) > "$OUT.algos.log" 2>&1 &
(
  run algo=iql_bd algo.top_p=0.5,1.0 seed=0,1,2 hydra.sweep.dir="$OUT/p_ablation"
  run algo=iql_bd algo.ce_coef=0.0 seed=0,1,2 hydra.sweep.dir="$OUT/no_lm_term"
  run algo=iql_bd algo.chi2_on=expert_and_policy,vocab seed=0,1,2 hydra.sweep.dir="$OUT/chi2"
) > "$OUT.ablations.log" 2>&1 &
wait
python experiments/report.py "$OUT" --out "$OUT/table.md" --plot "$OUT/teacher_nll.png"
