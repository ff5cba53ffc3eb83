#!/usr/bin/env bash
# The real-model runs of tutorial/experiments.md ("A real pretrained model"): SmolLM2-135M-Instruct from its GGUF file,
# on a CPU with the small_cpu preset (20 steps of batch 8, cutoff 256, lr 1e-3, graded on GSM8K's first 100 questions),
# in its own ChatML format; one seed. About 40 minutes on 2 cores.
#   bash tutorial/real_model.sh [out_root] [model]      (default out/smollm2, ../shared's GGUF file)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/smollm2}
MODEL=${2:-../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
COMMON=(--task gsm8k --model "$MODEL" --prompt_format chatml --log_interval 1)
timed() {  # name, then train.py's flags: the run's log in $OUT/<name>.log, its wall time in $OUT/<name>.time
  local name=$1; shift
  local start=$(date +%s)
  python train.py "${COMMON[@]}" --out_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$(( $(date +%s) - start ))" > "$OUT/$name.time"
}
timed base --eval_only                       # the base alone: no run in its out_dir, the adapters' B is zero
timed lora --method lora --r 32              # plain LoRA, rank 32 on wq and wv: 8 x 4's trainable A/B weights
timed moelora --method moelora               # 8 experts of rank 4, top-2, the balance loss
