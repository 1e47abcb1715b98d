#!/usr/bin/env bash
# Reproduces the "SmolLM2 distillation" section of RESULTS.md on 2 CPU cores (~1 h, can run in the
# background): SmolLM2-135M-Instruct (GGUF) -> a layer-pruned copy (every 3rd block), offline teacher data
# with its top-p cache, then
#   part 1: bc, kd, iql_bd (p = 0.8 and 1.0) and soft_q from the pruned student, 2 seeds;
#   part 2: bc and iql_bd (p = 0.8) from a 40-step SFT warm start (the paper's recipe), 2 seeds;
# each part as two sweeps side by side with one torch thread each, then the report.
#   bash scripts/fetch_smollm2.sh && bash experiments/results_smollm2.sh [OUT_DIR] [PARTS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-multirun/results_smollm2}
PARTS=${2:-"1 2"}
mkdir -p "$OUT"
COMMON=(task=smollm2 model=pruned model.keep_every=3 steps=40 batch_size=8 eval.seeds=[0,1]
        eval.batch_size=24 progress=false threads=1)
python experiments/generate.py task=smollm2 threads=1 | tee "$OUT/data.txt"
run() { python experiments/run.py -m "${COMMON[@]}" "$@"; }
if [[ " $PARTS " == *" 1 "* ]]; then
  (
    # the teacher and untrained-student rows are the same for every run: the iql_bd sweep computes them
    run algo=bc,kd,soft_q seed=0,1 sft_steps=0 teacher_eval=false init_eval=false hydra.sweep.dir="$OUT/algos"
  ) > "$OUT/algos.log" 2>&1 &
  (
    run algo=iql_bd algo.top_p=0.8,1.0 seed=0,1 sft_steps=0 hydra.sweep.dir="$OUT/iql_bd"
  ) > "$OUT/iql_bd.log" 2>&1 &
  wait
  python experiments/report.py "$OUT/algos" "$OUT/iql_bd" --out "$OUT/table.md" --plot "$OUT/teacher_nll.png"
fi
if [[ " $PARTS " == *" 2 "* ]]; then
  (
    run algo=bc seed=0,1 sft_steps=40 teacher_eval=false init_eval=false hydra.sweep.dir="$OUT/sft_bc"
  ) > "$OUT/sft_bc.log" 2>&1 &
  (
    run algo=iql_bd seed=0,1 sft_steps=40 teacher_eval=false init_eval=false hydra.sweep.dir="$OUT/sft_iql_bd"
  ) > "$OUT/sft_iql_bd.log" 2>&1 &
  wait
  python experiments/report.py "$OUT/sft_bc" "$OUT/sft_iql_bd" --out "$OUT/table_sft.md"
fi
