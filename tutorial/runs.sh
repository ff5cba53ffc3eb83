#!/usr/bin/env bash
# The runs behind the results in tutorial/experiments.md (CPU, about 35 minutes on 2 cores):
#   bash tutorial/runs.sh [out_root]        (default out/tutorial; data from --data_dir / MOELORA_DATA_DIR)
# 1. the default job exactly as a user runs it, timed; it builds the built-in tiny base
# 2. that base alone, graded; then on that base, for 3 seeds: LoRA rank 32, MoELoRA 8 x rank 4 top-2, MoELoRA without the
#    contrastive loss, at equal trainable parameters (the router adds 8 x d_in per adapted layer)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/tutorial}
mkdir -p "$OUT"

start=$(date +%s)
python train.py --task gsm8k --out_dir "$OUT/default"
echo "default run: $(( $(date +%s) - start )) s" | tee "$OUT/default_time.txt"

# the base the default run built (in the cache, ~/.cache/moelora; its run.json says where); the tiny preset stays
TINY=(--model "$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['base']['path'])" "$OUT/default/run.json")" --log_interval 5)
# the base alone, graded the same way (no checkpoint in the directory: --eval_only grades the bare base)
python train.py --task gsm8k "${TINY[@]}" --eval_only --out_dir "$OUT/base"
for seed in 1 2 3; do
  python train.py --task gsm8k "${TINY[@]}" --seed $seed --method lora --r 32 --out_dir "$OUT/lora_s$seed"
  python train.py --task gsm8k "${TINY[@]}" --seed $seed --method moelora --contrastive_weight 0.1 --out_dir "$OUT/moelora_s$seed"
  python train.py --task gsm8k "${TINY[@]}" --seed $seed --method moelora --contrastive_weight 0 --out_dir "$OUT/moelora_cl0_s$seed"
done
