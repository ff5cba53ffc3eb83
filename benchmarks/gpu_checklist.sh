#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command. Run it from the project root whenever a GPU is at hand:
#   bash benchmarks/gpu_checklist.sh [out_root]          (default out/gpu_checklist; about 10 minutes on one H100)
# It needs the fixtures of ../shared (or MOELORA_SHARED) and transformers + peft (requirements-dev.txt).
#   1. bf16 and fp16 (with its gradient scaler) training and grading on the real stories260K checkpoint
#   2. data parallel over NCCL with every GPU present (skipped on one GPU)
#   3. the loss alone: peak memory with fp32 and bf16 logits at LLaMA-7B's micro-batch
#   4. a training step at LLaMA-7B's shape: memory and tokens/s, eager, then with --grad_checkpointing and --compile
# Each part prints its figures; benchmarks/README.md is where they go, with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_checklist}
SHARED=${MOELORA_SHARED:-../shared}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"

echo "== 1. mixed precision on stories260K"
for dtype in bf16 fp16; do
  python train.py --task gsm8k --model "$SHARED/models/stories260K-hf" --data_dir "$SHARED/data" --device cuda \
    --dtype "$dtype" --max_steps 30 --batch_size 16 --micro_batch_size 8 --max_seq_len 512 --log_interval 10 \
    --eval_limit 200 --max_new_tokens 64 --out_dir "$OUT/stories_$dtype" --overwrite
done

echo "== 2. NCCL data parallel"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$GPUS" train.py --task gsm8k --model "$SHARED/models/stories260K-hf" \
    --data_dir "$SHARED/data" --dtype bf16 --max_steps 30 --batch_size 16 --micro_batch_size 4 --max_seq_len 512 \
    --log_interval 10 --eval_limit 200 --max_new_tokens 64 --out_dir "$OUT/stories_ddp" --overwrite
else
  echo "one GPU: skipped"
fi

echo "== 3. the loss alone at LLaMA-7B's micro-batch"
python benchmarks/bench_cross_entropy.py --device cuda --rounds 5

echo "== 4. a training step at LLaMA-7B's shape"
python benchmarks/bench_vs_hf.py --device cuda --dtype bf16 --shape 7b --methods lora,moelora,moelora-cl0
python benchmarks/bench_vs_hf.py --device cuda --dtype bf16 --shape 7b --methods lora,moelora,moelora-cl0 --grad_checkpointing
python benchmarks/bench_vs_hf.py --device cuda --dtype bf16 --shape 7b --methods lora,moelora,moelora-cl0 --compile
