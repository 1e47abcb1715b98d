#!/usr/bin/env bash
# Reproduces the "SmolLM2 distillation" section of RESULTS.md on 2 CPU cores (~1 h, can run in the
# background): SmolLM2-135M-Instruct (GGUF) -> a layer-pruned copy (every 3rd block), offline teacher data
# with its top-p cache, then bc, kd, iql_bd (p = 0.8 and 1.0) and soft_q with 2 seeds, two sweeps side by
# side with one torch thread each, then the report.
#   bash scripts/fetch_smollm2.sh && bash experiments/results_smollm2.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/results_smollm2}
mkdir -p "$OUT"
COMMON=(task=smollm2 model=pruned model.keep_every=3 steps=40 sft_steps=0 batch_size=8 eval.seeds=[0,1]
        eval.batch_size=24 progress=false threads=1)
python experiments/generate.py task=smollm2 threads=1 | tee "$OUT/data.txt"
run() { python experiments/run.py -m "${COMMON[@]}" "$@"; }
(
  # the teacher and untrained-student rows are the same for every run: the iql_bd sweep computes them
  run algo=bc,kd,soft_q seed=0,1 teacher_eval=false init_eval=false hydra.sweep.dir="$OUT/algos"
) > "$OUT/algos.log" 2>&1 &
(
  run algo=iql_bd algo.top_p=0.8,1.0 seed=0,1 hydra.sweep.dir="$OUT/iql_bd"
) > "$OUT/iql_bd.log" 2>&1 &
wait
python experiments/report.py "$OUT" --out "$OUT/table.md" --plot "$OUT/teacher_nll.png"
