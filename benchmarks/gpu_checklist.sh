#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command. Run it from the project root whenever a GPU is at hand:
#   bash benchmarks/gpu_checklist.sh [out_root] [seconds]     (defaults out/gpu_checklist, 540)
# It needs the fixtures of ../shared (or MOELORA_SHARED) and transformers + peft (requirements-dev.txt).
# Parts, most important first; each has its own time limit and the whole stays inside `seconds`, so a part
# that hangs or runs long costs its limit, not the rest of the list (a GPU is often lent for minutes only):
#   1. bf16 training and grading on the real stories260K checkpoint (GSM8K, 30 steps, 200 questions)
#   2. fp16 with its gradient scaler, stopped after 15 steps and resumed to 30 (the scaler's state is saved)
#   3. the task mixture on CUDA: --task math, per-benchmark grading and routing per task
#   4. a training step at LLaMA-7B's shape (32 layers, dim 4096, 4 x 512 tokens): memory, tokens/s, MFU
#   5. the same with --grad_checkpointing
#   5b. our LoRA against PEFT's in float32 at LLaMA-7B's width (4 layers): is bf16's logit difference only rounding?
#   5c. the int8 base (quantize.py) at LLaMA-7B's shape, bf16, checkpointing: peak memory (goal <= 12 GB, so that
#       7B + MoELoRA trains on a 16 GB GPU) and step time against the bf16 base
#   5d. the same with fp16 and its gradient scaler
#   5e. the NF4 base (quantize.py's quantize_nf4) at LLaMA-7B's shape, bf16, checkpointing: peak memory and step
#       time against the bf16 base (the CPU figures are in benchmarks/README.md; the GPU's are for this part)
#   6. the loss alone: peak memory with fp32 and bf16 logits at LLaMA-7B's micro-batch
#   7. train.py with --compile and --grad_checkpointing on stories260K
#   8. --compile at LLaMA-7B's width (4 layers: compiling 32 takes longer than a short lease)
#   9. NCCL data parallel with every GPU (skipped on one GPU)
#   9b. --fsdp (fsdp.py) with every GPU, world size 1 on one GPU: the NCCL path, FSDP2's bf16 mixed-precision policy,
#       the checkpoint gathered whole; part 1's run sharded (its loss and accuracy should match part 1's within bf16)
#  10. the test suite on this machine's torch / transformers / peft (the tests themselves run on the CPU)
#  11. a real model, whole: SmolLM2-135M-Instruct (the GGUF file of ../shared) on all 7,473 GSM8K training questions
#      (one epoch) and all 1,319 test questions, ChatML, LoRA r32 then MoELoRA 8 x r4 top-2: accuracy and time.
#      Last, since it is the longest: give the whole list about 20 minutes (seconds 1200), or run part 11 alone with
#      ONLY=11 bash benchmarks/gpu_checklist.sh
# Each part prints its figures and ends with "== <part>: rc R in S s"; benchmarks/README.md is where they go.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_checklist}
DEADLINE=$(( $(date +%s) + ${2:-540} ))
SHARED=${MOELORA_SHARED:-../shared}
export MOELORA_SHARED=$SHARED MOELORA_DATA_DIR=$SHARED/data MOELORA_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"

part() {  # part NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds, or what is left before the deadline
  local name=$1 limit=$2 start left rc
  shift 2
  if [[ -n "${ONLY:-}" && "$name" != "$ONLY."* ]]; then return; fi  # ONLY=11: that part alone
  start=$(date +%s)
  left=$(( DEADLINE - start ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then echo "== $name: skipped, no time left"; return; fi
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@"
  rc=$?
  echo "== $name: rc $rc in $(( $(date +%s) - start )) s$( ((rc == 124)) && echo ' (time limit)')"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16',
torch.cuda.is_bf16_supported(), 'transformers', transformers.__version__, 'peft', peft.__version__)"

STORIES=(--model "$SHARED/models/stories260K-hf" --data_dir "$SHARED/data" --device cuda --batch_size 16
         --micro_batch_size 8 --max_seq_len 512 --log_interval 5 --max_new_tokens 64 --overwrite)
part "1. bf16, stories260K, gsm8k" 90 python train.py --task gsm8k "${STORIES[@]}" --dtype bf16 --max_steps 30 \
  --eval_limit 200 --out_dir "$OUT/stories_bf16"
part "2a. fp16, stories260K, stopped after 15 steps" 60 python train.py --task gsm8k "${STORIES[@]}" --dtype fp16 \
  --max_steps 30 --stop_after 15 --eval_limit 200 --out_dir "$OUT/stories_fp16"
part "2b. fp16, resumed to 30 steps" 90 python train.py --task gsm8k "${STORIES[@]/--overwrite/--resume}" --dtype fp16 \
  --max_steps 30 --eval_limit 200 --out_dir "$OUT/stories_fp16"
part "3. bf16, stories260K, --task math" 120 python train.py --task math "${STORIES[@]}" --dtype bf16 --max_steps 20 \
  --eval_limit 25 --out_dir "$OUT/stories_math"

SEVEN_B=(--device cuda --dtype bf16 --shape 7b --parts train --rounds 5 --methods lora,moelora,moelora-cl0)
part "4. training step at LLaMA-7B's shape" 150 python benchmarks/bench_vs_hf.py "${SEVEN_B[@]}"
part "5. the same, gradient checkpointing" 120 python benchmarks/bench_vs_hf.py "${SEVEN_B[@]}" --grad_checkpointing
part "5b. LoRA against PEFT in float32, 7B width, 4 layers" 90 python benchmarks/bench_vs_hf.py --device cuda \
  --dtype fp32 --shape 7b --n_layers 4 --parts train --rounds 3 --methods lora --no_memory
INT8=(--device cuda --shape 7b --grad_checkpointing --parts speed --rounds 5)
part "5c. int8 base at LLaMA-7B's shape, bf16, checkpointing" 150 python benchmarks/bench_quantize.py "${INT8[@]}" --dtype bf16 \
  --formats int8
part "5d. int8 base at LLaMA-7B's shape, fp16, checkpointing" 120 python benchmarks/bench_quantize.py "${INT8[@]}" --dtype fp16 \
  --formats int8
part "5e. NF4 base at LLaMA-7B's shape, bf16, checkpointing" 150 python benchmarks/bench_quantize.py "${INT8[@]}" --dtype bf16 \
  --formats nf4
part "6. the loss alone at LLaMA-7B's micro-batch" 60 python benchmarks/bench_cross_entropy.py --device cuda --rounds 3
part "7. train.py --compile --grad_checkpointing" 120 python train.py --task gsm8k "${STORIES[@]}" --dtype bf16 \
  --max_steps 20 --eval_limit 50 --compile --grad_checkpointing --out_dir "$OUT/stories_compile"
part "8. --compile at LLaMA-7B's width, 4 layers" 150 python benchmarks/bench_vs_hf.py "${SEVEN_B[@]}" --n_layers 4 --compile

GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if (( GPUS > 1 )); then
  part "9. NCCL data parallel on $GPUS GPUs" 120 torchrun --standalone --nproc_per_node="$GPUS" train.py --task gsm8k \
    "${STORIES[@]}" --dtype bf16 --max_steps 30 --micro_batch_size 4 --eval_limit 200 --out_dir "$OUT/stories_ddp"
else
  echo "== 9. NCCL data parallel: skipped, one GPU"
fi
part "9b. --fsdp on $GPUS GPU(s), NCCL" 150 torchrun --standalone --nproc_per_node="$GPUS" train.py --fsdp --task gsm8k \
  "${STORIES[@]}" --dtype bf16 --max_steps 30 --micro_batch_size $(( 8 / GPUS > 0 ? 8 / GPUS : 1 )) --eval_limit 200 \
  --out_dir "$OUT/stories_fsdp"
part "10. the test suite" 150 python -m pytest -q -x -p no:cacheprovider $(python -c "import xdist" 2>/dev/null && echo -n "-n 8")

SMOL=(--task gsm8k --model "$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" --device cuda
      --dtype bf16 --prompt_format chatml --epochs 1 --log_interval 50 --overwrite)
part "11. SmolLM2-135M, full GSM8K, LoRA r32" 300 python train.py "${SMOL[@]}" --method lora --r 32 --out_dir "$OUT/smol_lora"
part "11. SmolLM2-135M, full GSM8K, MoELoRA" 300 python train.py "${SMOL[@]}" --method moelora --out_dir "$OUT/smol_moelora"
