"""
Fine-tune LLaMA with MoELoRA (or plain LoRA, or all weights) on a reasoning task, then grade it. One file.

    python train.py --task gsm8k                                  # built-in tiny LLaMA, CPU, a few minutes
    python train.py --task gsm8k --model path/to/llama-2-7b       # a real Meta or Hugging Face checkpoint
    torchrun --nproc_per_node=4 train.py --task gsm8k --model ... # data-parallel on 4 GPUs
    python train.py --task svamp --model ... --train_file math_10k.json
    python train.py --task gsm8k --model ... --eval_only          # grade out_dir/ckpt.pt (or the bare base)
    python train.py --help                                        # every flag and its default

Two presets hold the defaults that depend on the model's size: tiny (no --model, or a tiny base built here) and
llama-7b (any other --model); see PRESETS below. Flags given on the command line win.

Read top to bottom: settings, the built-in tiny base, batches, checkpoints, the run's context, training,
evaluation, main.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data.grading import extract_answer, is_correct
from data.mixtures import format_mixture_report, load_benchmarks, load_mixture, overlaps
from data.prompts import IGNORE_INDEX, eval_prompt_tokens, tokenize_dataset
from data.tasks import ALL_TASKS, COMMONSENSE_TASKS, FAMILIES, DataError, find_data_dir, load_split
from model import ModelArgs, Transformer
from moelora import (MoELoRAConfig, inject_moelora, load_moelora_state_dict, mark_only_moelora_as_trainable,
                     moelora_aux_losses, moelora_layers, moelora_routing_stats, moelora_state_dict, moelora_token_mask,
                     save_moelora)
from tokenizer import Tokenizer, train_tokenizer

# -----------------------------------------------------------------------------------------------------
# settings: each default is written once, here or in moelora.MoELoRAConfig; `python train.py --help` prints them

# the built-in tiny base, used when no --model is given: a small LLaMA pretrained here on the task's own training text
TINY_MODEL = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, max_seq_len=512)
TINY_BASE_FILE = "tiny_base.json"  # written into a tiny base's directory by build_tiny_base: how it was built

# the training and evaluation settings that depend on the model's size; a flag given on the command line wins
PRESETS = {
    # the built-in tiny base on a CPU: the whole job in a few minutes (80 steps, 0.17 of an epoch of GSM8K)
    "tiny": dict(lr=3e-3, epochs=None, max_steps=80, warmup_steps=10, batch_size=16, micro_batch_size=16,
                 max_seq_len=384, eval_batch_size=64, max_new_tokens=160),
    # LLaMA-7B as LLM-Adapters trains it (its finetune.py and published commands), except the cutoff: theirs is
    # 256 tokens, which cuts the end of the answer (where the final number is) off 17.8% of GSM8K's training
    # examples (1,329 of 7,473 with the Alpaca prompt and the LLaMA-2 tokenizer); 512 cuts 0.04%
    "llama-7b": dict(lr=3e-4, epochs=3, max_steps=None, warmup_steps=100, batch_size=16, micro_batch_size=4,
                     max_seq_len=512, eval_batch_size=16, max_new_tokens=256),
}


def preset_default(key: str) -> str:
    """How --help states a default that comes from the presets, e.g. '(preset tiny: 0.003; llama-7b: 0.0003)'."""
    return "(preset " + "; ".join(f"{name}: {preset[key]}" for name, preset in PRESETS.items()) + ")"


def is_tiny_base(model_path) -> bool:
    return (Path(model_path) / TINY_BASE_FILE).is_file()


def parse_args(argv=None):
    adapter = MoELoRAConfig()  # the adapter defaults live in moelora.py
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", default="gsm8k", choices=ALL_TASKS + tuple(FAMILIES), help="what to train on and grade: a benchmark, "
      "or a family (math, commonsense: train on its mixture, grade all its benchmarks) (default %(default)s)")
    a("--eval_tasks", default=None, help="comma-separated benchmarks to grade after training (default: the task, or "
      "the family's benchmarks)")
    a("--model", default=None, help="LLaMA checkpoint directory (Meta or HF) or llama2.c .bin; default: the built-in tiny LLaMA")
    a("--preset", default=None, choices=list(PRESETS), help="the size-dependent defaults below: tiny without --model "
      "or when --model is a tiny base that train.py built, llama-7b with any other --model")
    a("--pretrain_steps", type=int, default=150, help="steps (16 x 256 tokens) to pretrain the built-in tiny base (default %(default)s)")
    a("--data_dir", default=None, help="datasets root (gsm8k/, llm-adapters/); default $MOELORA_DATA_DIR or data/cache")
    a("--train_file", default=None, help="training JSON (e.g. Math10K / Commonsense170K) instead of the task's train split")
    a("--out_dir", default="out", help="checkpoints, logs, predictions (default %(default)s)")
    a("--method", default="moelora", choices=["moelora", "lora", "full"], help="what to train (default %(default)s)")
    a("--num_experts", type=int, default=adapter.num_experts, help="MoELoRA experts (default %(default)s)")
    a("--top_k", type=int, default=adapter.top_k, help="experts per token (default %(default)s)")
    a("--r", type=int, default=None, help=f"rank of each expert (default {adapter.r}); of the LoRA for --method lora "
      f"(default {adapter.num_experts * adapter.r}: the parameters of {adapter.num_experts} experts)")
    a("--lora_alpha", type=float, default=None, help="scaling = lora_alpha / r (default 2r, LLM-Adapters' convention)")
    a("--lora_dropout", type=float, default=adapter.lora_dropout, help="dropout on the adapter input (default %(default)s)")
    a("--target_modules", default=",".join(adapter.target_modules), help="comma-separated Linear names to adapt (default %(default)s)")
    a("--contrastive_weight", type=float, default=adapter.contrastive_weight, help="weight of the contrastive loss, 0 = off (default %(default)s)")
    a("--contrastive_temperature", type=float, default=adapter.contrastive_temperature, help="its temperature (default %(default)s)")
    a("--contrastive_samples", type=int, default=adapter.contrastive_samples, help="(token, expert) pairs per layer in it (default %(default)s)")
    a("--contrastive_warmup", type=int, default=0, help="steps over which the contrastive weight rises linearly from 0 "
      "to --contrastive_weight (default 0: full weight from the first step)")
    a("--balance_weight", type=float, default=adapter.balance_weight, help="weight of the load-balancing loss (default %(default)s)")
    a("--lr", type=float, default=None, help="peak learning rate " + preset_default("lr"))
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default %(default)s)")
    a("--warmup_steps", type=int, default=None, help="linear warm-up, then cosine decay to lr/10 " + preset_default("warmup_steps"))
    a("--epochs", type=float, default=None, help="passes over the training set " + preset_default("epochs"))
    a("--max_steps", type=int, default=None, help="optimizer steps; overrides --epochs " + preset_default("max_steps"))
    a("--batch_size", type=int, default=None, help="examples per optimizer step, all processes together " + preset_default("batch_size"))
    a("--micro_batch_size", type=int, default=None, help="examples per forward pass; the rest is gradient accumulation " + preset_default("micro_batch_size"))
    a("--max_seq_len", type=int, default=None, help="cutoff in tokens: longer examples are truncated " + preset_default("max_seq_len"))
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this, 0 = off (default %(default)s)")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype; auto = bf16 on a GPU that supports it, else fp16 with a gradient scaler; fp32 on the CPU unless bf16/fp16 is asked for (default %(default)s)")
    a("--device", default=None, help="cuda, cuda:1, cpu... (default cuda if available)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--grad_checkpointing", action="store_true", help="recompute each block in backward: less memory, one more forward pass per step")
    a("--eval_only", action="store_true", help="no training: grade out_dir/ckpt.pt if it exists, else the base model")
    a("--eval_limit", type=int, default=None, help="grade only the first N test examples")
    a("--eval_batch_size", type=int, default=None, help="prompts per generation batch " + preset_default("eval_batch_size"))
    a("--max_new_tokens", type=int, default=None, help="generation budget per answer " + preset_default("max_new_tokens"))
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    a("--overwrite", action="store_true", help="start over in an out_dir that holds a checkpoint (it and metrics.jsonl are replaced)")
    a("--stop_after", type=int, default=None, help="stop (resumably) after this many steps in this session, e.g. for a time-limited job")
    a("--log_interval", type=int, default=10, help="steps between log lines (default %(default)s)")
    a("--save_interval", type=int, default=100, help="steps between checkpoints, and one at the end (default %(default)s)")
    a("--seed", type=int, default=1337, help="batch order, adapter initialisation, dropout (default %(default)s)")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "tiny" if args.model is None or is_tiny_base(args.model) else "llama-7b"
    args.from_preset = [key for key, value in PRESETS[args.preset].items() if getattr(args, key) is None]
    for key in args.from_preset:
        setattr(args, key, PRESETS[args.preset][key])
    if args.r is None:
        args.r = adapter.num_experts * adapter.r if args.method == "lora" else adapter.r
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.r
    check_args(args)
    return args


def check_args(args):
    """Every value that cannot work, found before any expensive work: one line naming the flag, the value and the fix."""
    positive = ("lr", "batch_size", "micro_batch_size", "max_seq_len", "eval_batch_size", "max_new_tokens",
                "log_interval", "save_interval", "num_experts", "top_k", "r", "lora_alpha", "contrastive_temperature",
                "contrastive_samples", "pretrain_steps")
    problems = [f"--{k} {getattr(args, k)} must be > 0" for k in positive if getattr(args, k) <= 0]
    problems += [f"--{k} {getattr(args, k)} must be > 0 (or leave it out)" for k in ("max_steps", "epochs", "eval_limit",
                                                                                     "stop_after")
                 if getattr(args, k) is not None and getattr(args, k) <= 0]
    problems += [f"--{k} {getattr(args, k)} must be >= 0" for k in ("warmup_steps", "weight_decay", "grad_clip",
                                                                    "contrastive_weight", "contrastive_warmup",
                                                                    "balance_weight")
                 if getattr(args, k) < 0]
    if not 0 <= args.lora_dropout < 1:
        problems.append(f"--lora_dropout {args.lora_dropout} must be in [0, 1)")
    if args.top_k > args.num_experts > 0:
        problems.append(f"--top_k {args.top_k} must be at most --num_experts {args.num_experts}")
    if args.micro_batch_size > args.batch_size > 0:
        problems.append(f"--micro_batch_size {args.micro_batch_size} must be at most --batch_size {args.batch_size}")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: continue the run, or start it over")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}, but this torch has no usable CUDA ({torch.__version__}); "
                        "use --device cpu, or install a CUDA build of torch")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


ADAPTER_FLAGS = ("num_experts", "top_k", "r", "lora_alpha", "target_modules")  # what the checkpoint's shapes depend on


def moelora_config_from(args) -> MoELoRAConfig:
    lora = args.method == "lora"  # plain LoRA is MoELoRA with one expert: the gate is then always 1
    return MoELoRAConfig(
        num_experts=1 if lora else args.num_experts, top_k=1 if lora else args.top_k, r=args.r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        contrastive_weight=args.contrastive_weight, contrastive_temperature=args.contrastive_temperature,
        contrastive_samples=args.contrastive_samples, balance_weight=args.balance_weight)


# -----------------------------------------------------------------------------------------------------
# the built-in tiny base: a tokenizer and a small LLaMA trained here on the task's training text, cached in
# out_dir/tiny_base_<task>_<key> as an ordinary Meta-format checkpoint (params.json, consolidated.00.pth, tokenizer.model)

def tiny_base_dir(out_dir: Path, task: str, texts, steps: int, seed: int) -> Path:
    """out_dir/tiny_base_<task>_<key>: the key covers everything that shapes the base (architecture, pretraining
    steps, seed, the training text), so a cached base is reused only by a run that would build the same one."""
    key = hashlib.sha256(json.dumps({"model": asdict(TINY_MODEL), "steps": steps, "seed": seed}).encode())
    for t in texts:
        key.update(t.encode())
    return out_dir / f"tiny_base_{task}_{key.hexdigest()[:8]}"


def build_tiny_base(base_dir: Path, task: str, texts, steps: int, seed: int, log):
    """A tokenizer and a tiny LLaMA pretrained on texts, in base_dir; nothing to do when it is there already."""
    if (base_dir / "consolidated.00.pth").exists():
        log(f"built-in tiny LLaMA: reusing {base_dir}")
        return
    log(f"no --model given: building the built-in tiny LLaMA in {base_dir} (a stand-in so the pipeline runs "
        "anywhere; its accuracy says nothing about the method at scale)")
    base_dir.mkdir(parents=True, exist_ok=True)
    try:
        tok = train_tokenizer(texts, base_dir / "tokenizer.model", vocab_size=TINY_MODEL.vocab_size)
    except RuntimeError as e:  # SentencePiece: "Vocabulary size too high" when the text is too short
        raise SystemExit(f"error: the built-in tiny base needs more training text than {len(texts)} examples to learn "
                         f"a {TINY_MODEL.vocab_size}-piece tokenizer ({e}); give --model a checkpoint with its own "
                         "tokenizer, or a larger --train_file") from None
    # pack the documents into one stream, BOS ... EOS each, and train on random windows of it
    stream = torch.tensor([i for t in texts for i in tok.encode(t, bos=True, eos=True)], dtype=torch.long)
    torch.manual_seed(seed)
    model = Transformer(TINY_MODEL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    T, B = 256, 16
    log(f"pretraining it: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{steps} steps of {B}x{T} tokens, on {len(stream) / 1e6:.2f}M tokens of the task's training text")
    for step in tqdm(range(steps), desc="pretrain tiny base", dynamic_ncols=True):
        for g in opt.param_groups:
            g["lr"] = get_lr(step, 3e-3, 20, steps)
        starts = torch.randint(0, len(stream) - T - 1, (B,))
        x = torch.stack([stream[s:s + T] for s in starts])
        y = torch.stack([stream[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    log(f"tiny base pretrained: last loss {loss.item():.3f}")
    params = {k: v for k, v in asdict(TINY_MODEL).items() if v is not None}
    (base_dir / "params.json").write_text(json.dumps(params, indent=2))
    # marks the directory as a tiny base, so that `--model <it>` keeps the tiny preset
    (base_dir / TINY_BASE_FILE).write_text(json.dumps({"task": task, "pretrain_steps": steps, "seed": seed,
                                                       "examples": len(texts)}, indent=2))
    atomic_save(model.state_dict(), base_dir / "consolidated.00.pth")  # last: its presence means the base is complete


# -----------------------------------------------------------------------------------------------------
# batches

def batch_order(n_examples: int, batch_size: int, epoch: int, seed: int):
    """The examples of one epoch in global batches: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the batches it would have seen. The last partial batch is dropped."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_examples - batch_size + 1, batch_size)]


def collate(pairs, pad_id: int, device):
    """[(tokens, labels)] -> tokens, labels, real [B, T]: right-padded (labels with IGNORE_INDEX), and True where
    a token is real (not padding: the pad id may also be a real token's id, so the lengths decide)."""
    T = max(len(t) for t, _ in pairs)
    tokens = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (t, l) in enumerate(pairs):
        tokens[i, :len(t)] = torch.tensor(t)
        labels[i, :len(l)] = torch.tensor(l)
    real = torch.arange(T)[None, :] < torch.tensor([len(t) for t, _ in pairs])[:, None]
    return tokens.to(device), labels.to(device), real.to(device)


def get_lr(step: int, lr: float, warmup: int, total: int) -> float:
    # linear warm-up, then cosine decay to lr / 10 at the last step
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------------------------------
# checkpoints: adapter weights only (or all weights for --method full), optimizer, scaler, RNG, step, config

def atomic_save(obj, path: Path):
    # write beside the target and rename: an interrupted save never leaves a truncated checkpoint
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(model, method: str):
    return {k: v.detach().clone() for k, v in model.state_dict().items()} if method == "full" else moelora_state_dict(model)


@torch.no_grad()
def base_fingerprint(model) -> dict:
    # enough to tell one base from another without hashing gigabytes: its shape and two weight sums
    w = model.tok_embeddings.weight
    return {"args": asdict(model.args), "sums": [round(float(model.norm.weight.float().sum()), 3),
                                                 round(float(w[: min(8, w.shape[0])].float().sum()), 3)]}


def rng_state() -> dict:
    """Every generator's state, in types that torch.load(weights_only=True) reads: tensors, ints, floats, strings."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, model, args, fingerprint):
    """Read a checkpoint and load its weights into model after checking it belongs to this base and config."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code runs
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path} ({str(e).splitlines()[0]}); it may be truncated, or "
                         "from an older version of train.py, or not a checkpoint: delete it or choose another --out_dir")
    if ckpt["base"]["args"] != fingerprint["args"] or ckpt["base"]["sums"] != fingerprint["sums"]:
        raise SystemExit(f"error: {path} was trained on a different base model ({ckpt['config']['model'] or 'built-in tiny'}"
                         f", {ckpt['base']}) than this one ({args.model or 'built-in tiny'}, {fingerprint}); "
                         "use the same --model, or another --out_dir")
    if ckpt["config"]["method"] != args.method:
        raise SystemExit(f"error: {path} holds --method {ckpt['config']['method']} weights, not {args.method}")
    try:
        if args.method == "full":
            model.load_state_dict(ckpt["weights"])
        else:
            load_moelora_state_dict(model, ckpt["weights"])
    except (KeyError, ValueError, RuntimeError) as e:
        differ = [f"--{k} {ckpt['config'][k]}" for k in ADAPTER_FLAGS if ckpt["config"].get(k) != getattr(args, k)]
        raise SystemExit(f"error: {path} does not fit this adapter configuration ({str(e).splitlines()[0]}); it was "
                         f"trained with {' '.join(differ) or 'other adapter settings'}: give those flags, or use another --out_dir")
    return ckpt


# -----------------------------------------------------------------------------------------------------
# the run's context: which process this is, where it computes and in which precision, where it writes

@dataclass
class Run:
    rank: int  # this process (torchrun's RANK); rank 0 logs, saves and grades
    world_size: int  # processes under torchrun, else 1
    device: str
    amp_dtype: torch.dtype  # autocast dtype; float32 means no autocast
    scaler: torch.amp.GradScaler  # loss scaling, enabled for fp16 only
    out_dir: Path

    def autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype)

    def log(self, msg: str):
        if self.rank == 0:
            tqdm.write(msg)

    def log_jsonl(self, record: dict):
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def setup_distributed(args):
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one process otherwise (nanoGPT's way)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count() if cuda else 0
    if cuda and per_node > gpus:  # each process takes the GPU of its local rank: some would find none
        raise SystemExit(f"error: torchrun started {per_node} processes on this node, which has {gpus} GPU(s): use "
                         f"--nproc_per_node {gpus} or fewer, or --device cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def setup_precision(dtype: str, device: str):
    """(autocast dtype, gradient scaler). auto: on CUDA, bf16 autocast where the GPU supports it, else fp16, whose
    narrow exponent range needs the loss scaled so that small gradients do not underflow; on CPU, float32. bf16
    and fp16 given explicitly also work on the CPU (slowly): that is how CI exercises these branches."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "fp32" or (dtype == "auto" and not cuda):
        amp_dtype = torch.float32
    elif dtype == "auto":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return amp_dtype, torch.amp.GradScaler(device.split(":")[0], enabled=amp_dtype == torch.float16)


def all_reduce_sum(x: float, run: Run) -> float:
    if run.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.item()


# -----------------------------------------------------------------------------------------------------
# training

def save_checkpoint(run: Run, args, raw_model, optimizer, step: int, fingerprint: dict, init_routers=None):
    # every process's RNG state: a resumed run draws the same dropout masks and contrastive samples
    rngs = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.rank == 0:
        atomic_save({"weights": trainable_state(raw_model, args.method), "optimizer": optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(), "rng": rngs, "step": step, "config": vars(args),
                     "base": fingerprint, "init_routers": init_routers}, run.out_dir / "ckpt.pt")
        if args.method != "full":  # the adapters alone, to share or load elsewhere: no pickle (moelora.load_moelora)
            save_moelora(raw_model, run.out_dir / "adapter.safetensors")


def resume_from_checkpoint(run: Run, args, raw_model, optimizer, fingerprint: dict, init_routers) -> int:
    """Load weights, optimizer, scaler and this process's RNG state from out_dir/ckpt.pt; return its step.
    init_routers (a dict, updated in place) becomes the routers the run started with."""
    ckpt_path = run.out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, raw_model, args, fingerprint)
    optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][min(run.rank, len(ckpt["rng"]) - 1)])
    if init_routers is not None and ckpt.get("init_routers"):
        init_routers.update(ckpt["init_routers"])
    log = run.out_dir / "metrics.jsonl"
    if run.rank == 0 and log.exists():  # steps logged after the checkpoint are redone: keep each step once
        kept = [line for line in log.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= ckpt["step"]]
        tmp = log.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)
    run.log(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"]


def catch_stop_signals() -> dict:
    """SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGINT (Ctrl-C) set stop["signal"]; the
    loop then finishes its step, saves and exits. A second signal stops at once."""
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
    except ValueError:  # not the main thread (train.main called from a thread): signals keep their handlers
        pass
    return stop


def stop_requested(run: Run, stop: dict) -> bool:
    """Whether any process was asked to stop: all of them stop after the same step."""
    flag = stop["signal"] is not None
    if run.world_size > 1:
        t = torch.tensor([float(flag)], device=run.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item() > 0
    return flag


def stop_non_finite(run: Run, what: str, step: int, saved_step):
    # nothing is saved from here on: the checkpoint on disk is the last one with finite weights
    raise SystemExit(f"error: {what} at step {step}; stopped without saving. The last good checkpoint is "
                     f"{run.out_dir / 'ckpt.pt'}" + (f" (step {saved_step})" if saved_step is not None else " (none yet)")
                     + ". Lower --lr, or use --dtype bf16 instead of fp16.")


def micro_batches_of_step(run: Run, args, n_examples: int, step: int, steps_per_epoch: int):
    """This process's share of the global batch of `step`: a list of micro-batches, each a list of example indices.
    A mixture's sources are shuffled together: each epoch visits every example once, so each source's share of
    the training is its share of the examples."""
    epoch, index = divmod(step, steps_per_epoch)
    batch = batch_order(n_examples, args.batch_size, epoch, args.seed)[index]
    per_rank = args.batch_size // run.world_size
    mine = batch[run.rank * per_rank:(run.rank + 1) * per_rank]
    return [mine[j:j + args.micro_batch_size] for j in range(0, per_rank, args.micro_batch_size)]


def contrastive_ramp(args, step: int) -> float:
    """The share of --contrastive_weight used at step `step` (0-based): (step + 1) / --contrastive_warmup, capped
    at 1. The layers hold the full weight; the training loop scales their loss by this."""
    return 1.0 if args.contrastive_warmup == 0 else min(1.0, (step + 1) / args.contrastive_warmup)


def forward_backward(run: Run, args, model, raw_model, train_set, micro_batches, pad_id: int, step: int,
                     per_source=None):
    """Accumulate the gradients of optimizer step `step` (0-based). Returns the step's losses for the log (lm,
    contrastive as added to the loss, balance: 0-dim tensors left on the device, so the host waits once per step)
    and the number of positions processed. per_source ([2, sources], for a logged step of a mixture) receives each
    source's summed target loss and target count."""
    pairs, sources = train_set.pairs, train_set.sources
    # every target token of the global batch weighs the same, however the batch is split into micro-batches
    # and processes: weight each micro-batch's mean loss by its share of the targets
    n_targets = [sum(sum(l != IGNORE_INDEX for l in pairs[i][1]) for i in mb) for mb in micro_batches]
    global_targets = all_reduce_sum(sum(n_targets), run)
    sums = {k: torch.zeros((), device=run.device) for k in ("lm", "contrastive", "balance")}
    positions = 0
    for j, mb in enumerate(micro_batches):
        x, y, real = collate([pairs[i] for i in mb], pad_id, run.device)  # [B, T] each
        sync = j == len(micro_batches) - 1  # DDP all-reduces gradients only on the last micro-batch
        # padding (a third of the positions in the tutorial's runs) stays out of the routers' losses and
        # statistics; the language-model loss already ignores it through the labels
        only_real = moelora_token_mask(raw_model, real) if args.method != "full" else contextlib.nullcontext()
        with (contextlib.nullcontext() if run.world_size == 1 or sync else model.no_sync()), run.autocast(), only_real:
            logits, lm_loss = model(x, y)
            aux = moelora_aux_losses(raw_model) if args.method == "moelora" else {}
            if aux and args.contrastive_warmup:
                aux["contrastive"] = aux["contrastive"] * contrastive_ramp(args, step)
            # DDP averages gradients over processes, hence the world_size factor
            loss = lm_loss * (n_targets[j] * run.world_size / global_targets)
            loss = loss + sum(aux.values()) / len(micro_batches)
        if per_source is not None:
            with torch.no_grad():
                token_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                             reduction="none").view(y.shape)  # [B, T], 0 at ignored targets
                src = torch.tensor([sources[i] for i in mb], device=run.device)  # [B]
                per_source[0].index_add_(0, src, token_loss.sum(1))
                per_source[1].index_add_(0, src, (y != IGNORE_INDEX).sum(1).float())
        del logits  # held through backward, they would be one more logits-sized array at its peak
        run.scaler.scale(loss).backward()
        sums["lm"] += lm_loss.detach().float() * (n_targets[j] / max(1, sum(n_targets)))
        for k, v in aux.items():
            sums[k] += v.detach().float() / len(micro_batches)
        positions += x.numel()
    return sums, positions


def log_step(run: Run, args, raw_model, step: int, lr: float, losses: dict, tokens_per_s: float, source_losses) -> str:
    """Append the step's record to metrics.jsonl and return its log line."""
    record = {"step": step, "lr": lr, "loss": losses["lm"], "contrastive": losses["contrastive"],
              "balance": losses["balance"], "tokens_per_s": tokens_per_s}
    if source_losses:
        record["loss_per_source"] = source_losses
    line = f"step {step}: loss {losses['lm']:.4f} lr {lr:.2e} {tokens_per_s:.0f} tok/s"
    if args.method == "moelora":
        stats = moelora_routing_stats(raw_model)  # of the step's last micro-batch, real tokens only
        record["routing"] = stats
        load = np.array([s["expert_share"] for s in stats.values()])  # [layers, experts]
        entropy = np.mean([s["router_entropy"] for s in stats.values()])
        line += (f" | contrastive {losses['contrastive']:.4f} balance {losses['balance']:.4f} | expert load "
                 f"max {load.max(1).mean():.2f} min {load.min(1).mean():.2f} router entropy {entropy:.2f}")
    run.log_jsonl(record)
    return line


def optimizer_step(args, run: Run, optimizer, params, losses: dict, step: int, saved_step):
    """Unscale, clip and step, unless the loss or the gradient is not finite: then stop, keeping the last good checkpoint."""
    if not all(map(math.isfinite, losses.values())):  # before the optimizer step: the weights are still finite
        stop_non_finite(run, f"the loss is not finite (lm {losses['lm']}, contrastive {losses['contrastive']}, "
                        f"balance {losses['balance']})", step, saved_step)
    run.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if not run.scaler.is_enabled() and not torch.isfinite(grad_norm):  # (fp16's scaler skips such steps itself)
        stop_non_finite(run, f"the gradient norm is {grad_norm.item()}", step, saved_step)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def per_source_losses(run: Run, names: list, per_source):
    """{source: mean target loss in the step's batch} for a mixture (None for one source), over all processes."""
    if per_source is None:
        return None
    if run.world_size > 1:
        dist.all_reduce(per_source)
    totals, counts = per_source.tolist()
    return {name: total / n for name, total, n in zip(names, totals, counts) if n}


def train(args, run: Run, model, raw_model, tok, train_set, init_routers) -> bool:
    """Train until --max_steps / --epochs (or --stop_after); True when the run is complete."""
    n_examples = len(train_set.pairs)
    steps_per_epoch = len(batch_order(n_examples, args.batch_size, 0, args.seed))
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {n_examples} training examples is fewer than one batch of {args.batch_size}")
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  fused=run.device.startswith("cuda"))
    fingerprint = base_fingerprint(raw_model)
    step = resume_from_checkpoint(run, args, raw_model, optimizer, fingerprint, init_routers) if args.resume else 0
    saved_step = step if args.resume else None  # the step of the checkpoint on disk, if any

    accum = args.batch_size // run.world_size // args.micro_batch_size
    run.log(f"training {sum(p.numel() for p in params):,} parameters ({args.method}) for {total_steps} steps "
            f"({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps), batch {args.batch_size} = "
            f"{run.world_size} process(es) x {accum} micro-batch(es) x {args.micro_batch_size}")
    model.train()
    last_step = total_steps if args.stop_after is None else min(total_steps, step + args.stop_after)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=run.rank != 0, dynamic_ncols=True)
    t0, positions = time.time(), 0
    stop = catch_stop_signals()
    try:
        while step < last_step:
            lr = get_lr(step, args.lr, args.warmup_steps, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro_batches = micro_batches_of_step(run, args, n_examples, step, steps_per_epoch)
            logged = (step + 1) % args.log_interval == 0 or step + 1 == last_step
            # a mixture's loss per source, like the logged loss, is that of the logged step's batch
            per_source = None
            if logged and len(train_set.names) > 1:
                per_source = torch.zeros(2, len(train_set.names), device=run.device)  # [loss sum, targets] x sources
            sums, n = forward_backward(run, args, model, raw_model, train_set, micro_batches, tok.pad_id, step,
                                       per_source)
            positions += n
            losses = dict(zip(sums, torch.stack(list(sums.values())).tolist()))  # the step's one host sync
            optimizer_step(args, run, optimizer, params, losses, step, saved_step)
            step += 1
            bar.update(1)
            if logged:
                source_losses = per_source_losses(run, train_set.names, per_source)
                line = log_step(run, args, raw_model, step, lr, losses, positions * run.world_size / (time.time() - t0),
                                source_losses)
                if run.rank == 0:
                    bar.write(line)
                t0, positions = time.time(), 0
            stopping = stop_requested(run, stop)
            if step % args.save_interval == 0 or step == last_step or stopping:
                save_checkpoint(run, args, raw_model, optimizer, step, fingerprint, init_routers)
                saved_step = step
            if stopping:
                bar.close()
                name = signal.Signals(stop["signal"]).name if stop["signal"] else "another process's signal"
                run.log(f"stopped by {name} after step {step} of {total_steps}; checkpoint saved in "
                        f"{run.out_dir / 'ckpt.pt'}. Continue with the same command and --resume")
                raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    finally:
        with contextlib.suppress(ValueError):  # (not the main thread)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    bar.close()
    if step < total_steps:
        run.log(f"stopped after step {step} of {total_steps} (--stop_after); continue with --resume")
    return step == total_steps


# -----------------------------------------------------------------------------------------------------
# evaluation: greedy generation with the KV cache, graded as LLM-Adapters grades; the answer loss; a table of
# the benchmarks; and which experts each benchmark's tokens go to. Every process grades a share of the batches.

COMMONSENSE_NEW_TOKENS = 32  # LLM-Adapters' commonsense_evaluate.py: the answer is one word
ROUTING_EXAMPLES = 200  # prompts per benchmark for the routing-per-task statistics


def my_batches(n_items: int, batch_size: int, run: Run):
    """(batch number, start) of the batches this process grades: batch b goes to rank b % world_size. The batches
    are those one process would make, so the results do not depend on the number of processes."""
    return [(b, i) for b, i in enumerate(range(0, n_items, batch_size)) if b % run.world_size == run.rank]


def gather(run: Run, items: list) -> list:
    """Every process's items, concatenated (on every process)."""
    if run.world_size == 1:
        return items
    everyone = [None] * run.world_size
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


@torch.no_grad()
def answer_loss(args, run: Run, model, tok, examples) -> float:
    """Mean cross-entropy of the reference solutions given the prompt (teacher forcing)."""
    pairs, _, _ = tokenize_dataset(tok, examples, model.args.max_seq_len)
    parts = []
    for b, i in my_batches(len(pairs), args.eval_batch_size, run):
        x, y, _ = collate(pairs[i:i + args.eval_batch_size], tok.pad_id, run.device)
        with run.autocast():
            _, loss = model(x, y)
        parts.append((b, loss.item(), int((y != IGNORE_INDEX).sum())))
    loss_sum, n_tok = 0.0, 0
    for _, loss, n in sorted(gather(run, parts)):  # summed in batch order: the same float for any world size
        loss_sum, n_tok = loss_sum + loss * n, n_tok + n
    return loss_sum / max(1, n_tok)


@torch.no_grad()
def generate_responses(args, run: Run, model, tok, task: str, examples) -> tuple:
    """(the decoded response to each example's prompt, in the examples' order; how many prompts were cut)."""
    new_tokens = args.max_new_tokens if task not in COMMONSENSE_TASKS else min(args.max_new_tokens, COMMONSENSE_NEW_TOKENS)
    # every prompt keeps room for its whole answer: a longer one loses its beginning (the template's opening and
    # the start of the question), keeping the end with the choices and "### Response:". Only a small context
    # meets this (some commonsense prompts pass 800 tokens; the tiny model reads 512)
    room = max(model.args.max_seq_len - new_tokens, model.args.max_seq_len // 2)
    prompts = [eval_prompt_tokens(tok, ex) for ex in examples]
    n_cut = sum(len(p) > room for p in prompts)
    prompts = [p[-room:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    mine = my_batches(len(order), args.eval_batch_size, run)
    responses = []
    for _, i in tqdm(mine, desc=f"eval {task}", disable=run.rank != 0, dynamic_ncols=True):
        idx = order[i:i + args.eval_batch_size]
        budget = min(new_tokens, model.args.max_seq_len - max(len(prompts[j]) for j in idx))
        with run.autocast():
            outs = model.generate([prompts[j] for j in idx], max(1, budget), eos_id=tok.eos_id, pad_id=tok.pad_id)
        responses += [(j, tok.decode(o)) for j, o in zip(idx, outs)]
    return [text for _, text in sorted(gather(run, responses))], n_cut


def graded_name(name: str, args) -> str:
    """The name of a grading's files: a subset (--eval_limit N) gets its own, so it never replaces a full grading."""
    return f"{name}_first{args.eval_limit}" if args.eval_limit else name


def grade_benchmark(args, run: Run, model, tok, task: str, examples) -> dict:
    """Accuracy (and, for GSM8K, the answer loss) on one benchmark; rank 0 writes its predictions and metrics."""
    model.eval()
    # only GSM8K's test set has written reference solutions; the LLM-Adapters files' "output" fields were
    # generated by a model, so no answer loss is reported for the other benchmarks
    loss = answer_loss(args, run, model, tok, examples) if task == "gsm8k" else None
    responses, n_cut = generate_responses(args, run, model, tok, task, examples)
    graded = [is_correct(task, text, ex["answer"]) for ex, text in zip(examples, responses)]
    metrics = {"task": task, "accuracy": sum(graded) / len(examples), "correct": sum(graded), "n": len(examples),
               "answer_loss": loss, "answer_perplexity": math.exp(loss) if loss is not None else None,
               "prompts_cut": n_cut,
               "model": args.model or "built-in tiny", "method": args.method}
    predictions = run.out_dir / f"predictions_{graded_name(task, args)}.jsonl"
    if run.rank == 0:
        with open(predictions, "w") as f:
            for ex, text, ok in zip(examples, responses, graded):
                f.write(json.dumps({"instruction": ex["instruction"], "prediction": text, "extracted":
                                    extract_answer(task, text), "answer": ex["answer"], "correct": ok}) + "\n")
        (run.out_dir / f"metrics_{graded_name(task, args)}.json").write_text(json.dumps(metrics, indent=2))
    loss_text = f", answer loss {loss:.4f} (perplexity {math.exp(loss):.2f})" if loss is not None else ""
    cut_text = f" ({n_cut} prompts longer than the context allows lost their beginning)" if n_cut else ""
    run.log(f"{task}: accuracy {metrics['accuracy']:.2%} ({metrics['correct']}/{metrics['n']}){loss_text}{cut_text}; "
            f"predictions in {predictions}")
    return metrics


def results_table(name: str, args, results: dict, missing: dict) -> str:
    """A Markdown table in the paper's layout: one row for this run, a column per benchmark, then the average."""
    tasks = list(results) + [t for t in missing if t not in results]
    graded = [r["accuracy"] for r in results.values()]
    average = 100 * sum(graded) / len(graded) if graded else float("nan")
    cells = [f"{100 * results[t]['accuracy']:.1f} ({results[t]['correct']}/{results[t]['n']})" if t in results
             else "missing" for t in tasks]
    model = args.model or "built-in tiny"
    lines = [f"| model | method | {' | '.join(tasks)} | average |", "| --- | --- |" + " ---: |" * (len(tasks) + 1),
             f"| {model} | {args.method} | {' | '.join(cells)} | {average:.1f} |"]
    if missing:
        lines.append(f"\n{name}: the average is over the {len(results)} graded benchmarks; missing: "
                     + "; ".join(f"{t} ({why})" for t, why in missing.items()))
    return "\n".join(lines)


def write_results(name: str, args, run: Run, results: dict, missing: dict):
    """results_<name>.json and .md in out_dir (rank 0), and the table in the log."""
    table = results_table(name, args, results, missing)
    graded = [r["accuracy"] for r in results.values()]
    if run.rank == 0:
        summary = {"task": name, "model": args.model or "built-in tiny", "method": args.method,
                   "benchmarks": results, "missing": missing,
                   "average_accuracy": sum(graded) / len(graded) if graded else None}
        (run.out_dir / f"results_{graded_name(name, args)}.json").write_text(json.dumps(summary, indent=2))
        (run.out_dir / f"results_{graded_name(name, args)}.md").write_text(table + "\n")
    run.log(table)


def entropy_bits(p) -> float:
    """Entropy in bits of a distribution given as probabilities or as counts."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))  # max: no "-0.00" for a certain outcome


def mutual_information_bits(counts) -> float:
    """I(row; column) in bits from a [rows, columns] table of counts, e.g. [tasks, experts]."""
    joint = np.asarray(counts, dtype=np.float64)
    joint = joint / joint.sum()
    return entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.flatten())


def common_prefix_length(sequences) -> int:
    n = min(map(len, sequences))
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


def question_spans(prompts) -> list:
    """(start, end) of each prompt's question: the prompts minus the template's opening and closing, which
    every prompt shares (the longest common prefix and suffix, the suffix not reaching into the prefix)."""
    prefix = common_prefix_length(prompts)
    suffix = min(common_prefix_length([p[::-1] for p in prompts]), min(len(p) for p in prompts) - prefix)
    return [(prefix, len(p) - suffix) for p in prompts]


@torch.no_grad()
def routing_counts(args, run: Run, model, tok, tests: dict) -> dict:
    """{layer: (top1 [tasks, experts], slots [tasks, experts])}: how often the tokens of each benchmark's questions
    have an expert as their first choice, and among their k choices. The Alpaca template around the question is
    left out: the same in every task, it would dilute what the routing says about the tasks."""
    prompts = {task: [p for p in (eval_prompt_tokens(tok, ex) for ex in examples[:ROUTING_EXAMPLES])
                      if len(p) <= model.args.max_seq_len]  # a longer one is left out
               for task, examples in tests.items()}
    spans = iter(question_spans([p for ps in prompts.values() for p in ps]))
    layers = moelora_layers(model)
    counts = {name: (np.zeros((len(tests), layer.config.num_experts), dtype=np.int64),
                     np.zeros((len(tests), layer.config.num_experts), dtype=np.int64)) for name, layer in layers}
    model.eval()
    for t, ps in enumerate(prompts.values()):
        for i in range(0, len(ps), args.eval_batch_size):
            batch = ps[i:i + args.eval_batch_size]
            x, _, _ = collate([(p, p) for p in batch], tok.pad_id, run.device)
            counted = torch.zeros(x.shape, dtype=torch.bool, device=x.device)  # [B, T]: the questions' tokens
            for row, (start, end) in enumerate(next(spans) for _ in batch):
                counted[row, start:end] = True
            with moelora_token_mask(model, counted), run.autocast():
                model(x)
            for name, layer in layers:
                top_idx = layer.last_top_idx[layer.last_real].cpu()  # [m, k], best first
                N = layer.config.num_experts
                counts[name][0][t] += np.bincount(top_idx[:, 0].numpy(), minlength=N)
                counts[name][1][t] += np.bincount(top_idx.flatten().numpy(), minlength=N)
    return counts


@contextlib.contextmanager
def adapters_as_initialised(model, init_routers: dict):
    """The adapters as they were at step 0 (B = 0, the routers as drawn), for the untrained-router control."""
    saved = {}
    for name, layer in moelora_layers(model):
        saved[name] = (layer.lora_B.detach().clone(), layer.router.weight.detach().clone())
        layer.lora_B.data.zero_()
        layer.router.weight.data.copy_(init_routers[name])
    try:
        yield
    finally:
        for name, layer in moelora_layers(model):
            layer.lora_B.data.copy_(saved[name][0])
            layer.router.weight.data.copy_(saved[name][1])


def routing_per_task(args, run: Run, model, tok, tests: dict, init_routers) -> dict:
    """Each benchmark's expert share per adapted layer and I(task; top-1 expert) per layer, after training and,
    as the control, with the routers as drawn at step 0 (an untrained router already routes by content)."""
    runs = {"trained": routing_counts(args, run, model, tok, tests)}
    if init_routers is not None:
        with adapters_as_initialised(model, init_routers):
            runs["initial"] = routing_counts(args, run, model, tok, tests)
    h_task = entropy_bits(next(iter(runs["trained"].values()))[0].sum(1))
    report = {"tasks": list(tests), "h_task_bits": h_task, "tokens_per_task": None, "layers": {}}
    for name in runs["trained"]:
        report["layers"][name] = {}
        for which, counts in runs.items():
            top1, slots = counts[name]
            report["tokens_per_task"] = top1.sum(1).tolist()
            report["layers"][name][which] = {
                "expert_share": (slots / slots.sum(1, keepdims=True).clip(min=1)).round(4).tolist(),  # [tasks, experts]
                "top1_counts": top1.tolist(), "mi_bits": mutual_information_bits(top1)}
    for which in runs:
        report[f"mean_mi_bits_{which}"] = float(np.mean([v[which]["mi_bits"] for v in report["layers"].values()]))
    return report


# -----------------------------------------------------------------------------------------------------
# main: settings, data, base model, adapters; then train and grade

@dataclass
class TrainSet:
    pairs: list  # (tokens, labels) per example
    sources: list  # the index in names of each example's source
    names: list  # the sources: one task, a training file, or the tasks of a family's mixture


def load_tests(args, data_dir):
    """({benchmark: test examples}, {benchmark: why it is missing}), whole: --eval_limit applies after the training
    set is checked against them. A single --task must be there; of a family or an --eval_tasks list, a benchmark
    whose file is absent is reported, and the others are graded."""
    family = FAMILIES.get(args.task)
    benchmarks = args.eval_tasks.split(",") if args.eval_tasks else list(family or [args.task])
    unknown = [b for b in benchmarks if b not in ALL_TASKS]
    if unknown:
        raise SystemExit(f"error: --eval_tasks: unknown benchmark(s) {', '.join(unknown)}; the benchmarks are: "
                         f"{', '.join(ALL_TASKS)}")
    if len(benchmarks) == 1 and not family:
        try:
            tests, missing = {benchmarks[0]: load_split(benchmarks[0], "test", data_dir)}, {}
        except DataError as e:
            raise SystemExit(f"error: {e}")
    else:
        tests, missing = load_benchmarks(benchmarks, data_dir)
    return tests, missing


def load_training_examples(args, run: Run, data_dir, tests: dict) -> list:
    """The training examples, each with a "source". A family trains on --train_file or on the mixture of the
    train splits it has, without the questions that any of its benchmarks asks."""
    try:
        if args.task in FAMILIES:
            examples, report = load_mixture(args.task, data_dir, args.train_file, test_sets=tests)
            for line in format_mixture_report(report):
                run.log(line)
            return examples
        examples = load_split(args.task, "train", data_dir, args.train_file)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    source = Path(args.train_file).stem if args.train_file else args.task
    shared = {task: len(idx) for task, idx in overlaps(examples, tests).items() if idx}
    if shared:
        run.log("WARNING: the training examples share questions with the graded benchmarks: " + ", ".join(
            f"{n} with {task} (of its {len(tests[task])})" for task, n in shared.items())
            + ". A model trained on them is graded on questions it has seen.")
    return [dict(ex, source=source) for ex in examples]


def tokenize_train_set(args, run: Run, tok, examples, max_seq_len: int) -> TrainSet:
    names = list(dict.fromkeys(ex["source"] for ex in examples))  # in order of appearance
    pairs, sources, n_trunc, n_drop = [], [], 0, 0
    for s, name in enumerate(names):
        p, t, d = tokenize_dataset(tok, [ex for ex in examples if ex["source"] == name], max_seq_len)
        pairs += p
        sources += [s] * len(p)
        n_trunc, n_drop = n_trunc + t, n_drop + d
    limit = f" (the model's limit; --max_seq_len is {args.max_seq_len})" if max_seq_len < args.max_seq_len else ""
    run.log(f"{len(examples)} training examples: {n_trunc} truncated to {max_seq_len} tokens{limit}, "
            f"{n_drop} dropped (prompt alone over the cutoff)")
    if len(names) > 1:
        run.log("sources, shuffled together (each epoch visits every example once): " + ", ".join(
            f"{name} {sources.count(s):,} ({sources.count(s) / len(pairs):.1%})" for s, name in enumerate(names)))
    if not pairs:
        raise SystemExit("error: no training example is left after tokenization")
    return TrainSet(pairs, sources, names)


def load_base(args, run: Run, model_path, dtype):
    """The frozen base model and its tokenizer, with the adapters of --method injected (none for full), and the
    routers as drawn (for the untrained-router control of the routing statistics; None without routers)."""
    try:
        model = Transformer.from_pretrained(model_path, dtype=dtype, device=run.device)
        tok = Tokenizer.from_dir(model_path)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise SystemExit(f"error: cannot load --model {model_path}: {e}")
    if tok.vocab_size > model.args.vocab_size:
        raise SystemExit(f"error: tokenizer has {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    run.log(f"base model: {model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{dtype}, {run.device}, autocast {run.amp_dtype})")
    init_routers = None
    if args.method == "full":
        model.requires_grad_(True)
    else:
        # the adapters' random start depends on --seed alone, not on whether a tiny base was built in this process
        torch.manual_seed(args.seed + run.rank)
        try:
            inject_moelora(model, moelora_config_from(args))
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: {e}")
        mark_only_moelora_as_trainable(model)
        model.to(run.device)
        if args.method == "moelora":
            init_routers = {name: layer.router.weight.detach().clone() for name, layer in moelora_layers(model)}
    model.grad_checkpointing = args.grad_checkpointing
    return model, tok, init_routers


def prepare_out_dir(args, run: Run):
    """Before any expensive work: out_dir is writable, and a run never replaces earlier work unasked."""
    ckpt, log = run.out_dir / "ckpt.pt", run.out_dir / "metrics.jsonl"
    try:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        probe = run.out_dir / f".write_test_{run.rank}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out_dir {run.out_dir} ({e.strerror}); choose another --out_dir")
    if args.eval_only:
        return
    if args.resume and not ckpt.exists():
        raise SystemExit(f"error: --resume given but {ckpt} does not exist; leave out --resume to start a new run")
    if ckpt.exists() and not args.resume and not args.overwrite:
        raise SystemExit(f"error: {run.out_dir} holds a checkpoint (ckpt.pt) of an earlier run: continue it with --resume, "
                         "start over with --overwrite (replaces it and metrics.jsonl), or choose another --out_dir")
    if run.rank != 0 or args.resume:
        return
    if args.overwrite:
        for f in (ckpt, run.out_dir / "adapter.safetensors", log):
            f.unlink(missing_ok=True)
    elif log.exists():  # a run that stopped before its first checkpoint: keep its log aside, start a new one
        os.replace(log, log.with_name("metrics.jsonl.old"))
        run.log(f"moved the metrics.jsonl of an earlier run that saved no checkpoint to {log.with_name('metrics.jsonl.old')}")


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args)
    amp_dtype, scaler = setup_precision(args.dtype, device)
    run = Run(rank, world_size, device, amp_dtype, scaler, Path(args.out_dir))
    prepare_out_dir(args, run)
    if (args.batch_size % (world_size * args.micro_batch_size) and "micro_batch_size" in args.from_preset
            and args.batch_size % world_size == 0):  # the preset's micro-batch, split so that every process gets one
        args.micro_batch_size = math.gcd(args.micro_batch_size, args.batch_size // world_size)
        run.log(f"--micro_batch_size {args.micro_batch_size}: the preset's, made to fit {world_size} processes")
    if args.batch_size % (world_size * args.micro_batch_size):
        raise SystemExit(f"error: --batch_size {args.batch_size} must be a multiple of --micro_batch_size "
                         f"{args.micro_batch_size} x {world_size} process(es)")
    run.log(f"preset {args.preset}" + ("" if args.preset == "tiny" else f" (--model {args.model})")
            + ": " + ", ".join(f"{k} {getattr(args, k)}" for k in PRESETS[args.preset]))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + rank)

    data_dir = find_data_dir(args.data_dir)
    tests, missing = load_tests(args, data_dir)
    train_examples = [] if args.eval_only else load_training_examples(args, run, data_dir, tests)
    if args.eval_limit:
        tests = {task: examples[:args.eval_limit] for task, examples in tests.items()}
    model_path = args.model
    if model_path is None:
        texts = [f"{ex['instruction']}\n{ex['output']}" for ex in train_examples or
                 load_training_examples(args, run, data_dir, tests)]
        model_path = tiny_base_dir(run.out_dir, args.task, texts, args.pretrain_steps, args.seed)
        if rank == 0:
            build_tiny_base(model_path, args.task, texts, args.pretrain_steps, args.seed, run.log)
        if world_size > 1:
            dist.barrier()  # the other processes wait for rank 0 to build the tiny base
    # a frozen base can be stored in the compute dtype (half the memory); full fine-tuning keeps fp32 master weights
    args.base = str(model_path)  # saved with the config: where the base came from (the tiny base's cache without --model)
    model, tok, init_routers = load_base(args, run, model_path, amp_dtype if args.method != "full" else torch.float32)
    raw_model = model  # what is saved and evaluated; `model` may become a DDP / compiled wrapper

    if not args.eval_only:
        train_set = tokenize_train_set(args, run, tok, train_examples, min(args.max_seq_len, model.args.max_seq_len))
        if args.compile:
            model = torch.compile(model)
        if world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
        if not train(args, run, model, raw_model, tok, train_set, init_routers):
            return None
    elif (run.out_dir / "ckpt.pt").exists():
        ckpt = load_checkpoint(run.out_dir / "ckpt.pt", raw_model, args, base_fingerprint(raw_model))
        init_routers = ckpt.get("init_routers")
        run.log(f"evaluating {run.out_dir / 'ckpt.pt'} (step {ckpt['step']})")
    else:
        run.log(f"no {run.out_dir / 'ckpt.pt'}: evaluating the base model with fresh (no-op) adapters")

    # every process grades a share of each benchmark; rank 0 writes the files
    results = {task: grade_benchmark(args, run, raw_model, tok, task, examples) for task, examples in tests.items()}
    if len(tests) > 1 or missing:
        write_results(args.task, args, run, results, missing)
    if args.method == "moelora" and len(tests) > 1 and rank == 0:
        routing = routing_per_task(args, run, raw_model, tok, tests, init_routers)
        routing_file = run.out_dir / f"routing_{graded_name(args.task, args)}.json"
        routing_file.write_text(json.dumps(routing, indent=2))
        control = (f"; with the routers as drawn at step 0: {routing['mean_mi_bits_initial']:.3f}"
                   if "mean_mi_bits_initial" in routing else "")
        run.log(f"routing per task: I(task; top-1 expert) {routing['mean_mi_bits_trained']:.3f} bits, mean over the "
                f"adapted layers, of H(task) = {routing['h_task_bits']:.3f}{control}; in {routing_file}")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results if len(results) > 1 else next(iter(results.values()))


if __name__ == "__main__":
    main()
