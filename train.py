"""
Fine-tune LLaMA with MoELoRA (or plain LoRA, or all weights) on a reasoning task, then grade it. One file.

    python train.py --task gsm8k                                  # built-in tiny LLaMA, CPU, a few minutes
    python train.py --task gsm8k --model path/to/llama-2-7b       # a real Meta or Hugging Face checkpoint
    torchrun --nproc_per_node=4 train.py --task gsm8k --model ... # data-parallel on 4 GPUs
    torchrun --nproc_per_node=8 train.py --fsdp --model ...       # a base too large for one GPU, sharded over 8
    python train.py --task svamp --model ... --train_file math_10k.json
    python train.py --task gsm8k --model ... --eval_only          # grade out_dir/ckpt.pt (or the bare base)
    python train.py --help                                        # every flag and its default

Three presets hold the defaults that depend on the model's size: tiny for a base under 100M parameters (the built-in
1.3M one, or stories260K), small_cpu for one under 1B on a CPU (SmolLM2-135M) and llama-7b otherwise; see PRESETS below. Flags given on the command line win.

Read top to bottom: the settings, main, the training loop (train -> forward_backward -> optimizer_step). Beside this
file: evaluate.py grades (generation, answer extraction, the result files); runs.py is the plumbing that is not a
loop (processes, precision, out_dir, the model of a new run or of a saved one, checkpoints that resume exactly, stop
signals); fsdp.py shards a base over torchrun's processes (--fsdp); data/training.py reads what a run trains on,
and tiny_base.py builds the built-in base.
"""
import argparse
import contextlib
import gc
import math
import os
import random
import re
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from data.batches import collate
from data.grading import EVAL_KINDS
from data.prompts import IGNORE_INDEX, PROMPT_FORMATS, tokenize_dataset
from data.tasks import ALL_TASKS, FAMILIES, find_data_dir
from data.training import hold_out, load_training_examples, tokenize_train_set
from evaluate import grade, load_tests, validation_loss
from checkpoints import HF_NAMES, read_model_args
from model import Transformer
from moelora import (GATES, MoELoRAConfig, moelora_aux_losses, moelora_config, moelora_routing_stats,
                     moelora_token_mask)
from runs import (Run, all_reduce_sum, base_fingerprint, best_val_loss, catch_stop_signals, check_against_the_run,
                  check_out_dir, default_device, keep_best, keep_checkpoint, load_run, new_model,
                  one_line_if_a_collective_fails, open_run, plot_curves,
                  prepare_out_dir, resume_from_checkpoint, run_info, save_checkpoint, settings_from_run,
                  setup_distributed, setup_precision, stop_requested)
from tiny_base import TINY_MODEL, build_tiny_base, tiny_base_cache, tiny_base_dir

# -----------------------------------------------------------------------------------------------------
# settings: each default is written once, here or in moelora.MoELoRAConfig; `python train.py --help` prints them

# the training and evaluation settings that depend on the model's size; a flag given on the command line wins
PRESETS = {
    # the built-in tiny base on a CPU: the whole job in a few minutes (80 steps, 0.17 of an epoch of GSM8K)
    "tiny": dict(lr=3e-3, epochs=None, max_steps=80, warmup_steps=10, batch_size=16, micro_batch_size=16,
                 max_seq_len=384, eval_batch_size=64, max_new_tokens=160, eval_limit=None),
    # LLaMA-7B as LLM-Adapters trains it (its finetune.py and published commands), except the cutoff: theirs is
    # 256 tokens, which cuts the end of the answer (where the final number is) off 17.8% of GSM8K's training
    # examples (1,329 of 7,473 with the Alpaca prompt and the LLaMA-2 tokenizer); 512 cuts 0.04%
    # a real 100M-class model (SmolLM2-135M) on a CPU, where a step of 8 examples takes about half a minute: a short
    # run that shows what the adapters do, graded on the first 100 questions (on a GPU such a base gets llama-7b's)
    "small_cpu": dict(lr=1e-3, epochs=None, max_steps=20, warmup_steps=2, batch_size=8, micro_batch_size=4,
                      max_seq_len=256, eval_batch_size=16, max_new_tokens=200, eval_limit=100),
    "llama-7b": dict(lr=3e-4, epochs=3, max_steps=None, warmup_steps=100, batch_size=16, micro_batch_size=4,
                     max_seq_len=512, eval_batch_size=16, max_new_tokens=256, eval_limit=None),
}
SMALL_BASE = 100e6  # parameters: a smaller base gets the tiny preset, a larger one llama-7b's ...
CPU_BASE = 1e9  # ... except a base under a billion on a CPU: small_cpu


def preset_default(key: str) -> str:
    """How --help states a default that comes from the presets, e.g. '(preset tiny: 0.003; llama-7b: 0.0003)'."""
    return "(preset " + "; ".join(f"{name}: {preset[key]}" for name, preset in PRESETS.items()) + ")"


class Settings:
    """The run's settings, resolved once by parse_args and read-only from then on: what the code reads, and what
    run.json and ckpt.pt save (vars(settings)). Read as argparse's Namespace is; setting a field raises."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, key, value):
        raise AttributeError(f"the settings are read-only once resolved: {key} (parse_args resolves them)")

    def __delattr__(self, key):
        raise AttributeError(f"the settings are read-only once resolved: {key} (parse_args resolves them)")

    def __repr__(self):
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"


def argument_parser():
    adapter = MoELoRAConfig()  # the adapter defaults live in moelora.py
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--task", default="gsm8k", choices=ALL_TASKS + tuple(FAMILIES), help="what to train on and grade: a benchmark, "
      "or a family (math, commonsense: train on its mixture, grade all its benchmarks) (default %(default)s)")
    a("--eval_tasks", default=None, help="comma-separated benchmarks to grade after training (default: the task, or "
      "the family's benchmarks)")
    a("--model", default=None, help="LLaMA checkpoint: a Meta or HF directory, a llama2.c .bin or a GGUF file; default: the built-in tiny LLaMA "
      "(1.3M parameters, pretrained here on the task's training text and cached in $MOELORA_CACHE or ~/.cache/moelora)")
    a("--preset", default=None, choices=list(PRESETS), help="the size-dependent defaults below (default: tiny for a base under 100M parameters, small_cpu under 1B on a CPU, else llama-7b)")
    a("--pretrain_steps", type=int, default=150, help="steps (16 x 256 tokens) to pretrain the built-in tiny base (default %(default)s)")
    a("--data_dir", default=None, help="datasets root (gsm8k/, llm-adapters/); default $MOELORA_DATA_DIR or data/cache")
    a("--train_file", default=None, help="training JSON (e.g. Math10K / Commonsense170K) instead of the task's train split")
    a("--out_dir", default="out", help="checkpoints, logs, predictions (default %(default)s)")
    a("--method", default="moelora", choices=["moelora", "lora", "full"], help="what to train (default %(default)s)")
    a("--num_experts", type=int, default=adapter.num_experts, help="MoELoRA experts (default %(default)s)")
    a("--top_k", type=int, default=adapter.top_k, help="experts per token (default %(default)s)")
    a("--gate", default=adapter.gate, choices=list(GATES), help="mixtral: softmax over the k kept logits; switch: their "
      "probabilities among all N, which also trains a top-1 router (default %(default)s)")
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
    a("--router_z_weight", type=float, default=adapter.router_z_weight, help="weight of ST-MoE's router z-loss, which keeps "
      "the router's logits small; ST-MoE used 1e-3 (default %(default)s: off)")
    a("--router_jitter", type=float, default=adapter.router_jitter, help="multiplicative noise U(1-eps, 1+eps) on the "
      "router's input in training; Switch used 0.01 (default %(default)s: off)")
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
    a("--quantize", default="none", choices=["none", "int8", "nf4"], help="store the frozen base as int8 (a scale per 64 weights: LLaMA-7B in 7.1 GB, "
      "not 13.5) or as 4-bit NormalFloat (QLoRA's NF4, blocks of 64, the output layer kept: 4.0 GB) (quantize.py; default %(default)s)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--fsdp", action="store_true", help="under torchrun: shard the base and adapters over the processes (FSDP2, "
      "fsdp.py), each holding 1/N of every weight, instead of a whole copy each (DDP, the default)")
    a("--dist_timeout", type=float, default=30.0, help="minutes a process waits for the others in a collective "
      "before it stops with an error (a process that died or hangs) (default %(default)s)")
    a("--grad_checkpointing", action="store_true", help="recompute each block in backward: less memory, one more forward pass per step")
    a("--prompt_format", default="alpaca", choices=list(PROMPT_FORMATS), help="how a question is put to the model, in "
      "training, grading and sample.py: LLM-Adapters' Alpaca template, or ChatML for instruction-tuned models such as "
      "SmolLM2 (data/prompts.py) (default %(default)s)")
    a("--eval_file", default=None, help="your own test set, graded instead of the task's benchmarks (add --eval_tasks to grade those too): --train_file's format with an answer per record")
    a("--eval_kind", default=None, choices=EVAL_KINDS, help="how --eval_file is graded: the last number, one of its answer labels, or exact text (default: inferred from its answers, and printed)")
    a("--eval_only", action="store_true", help="no training: grade the run in out_dir (its base, --quantize and adapter "
      "come from its run.json), or the base model when out_dir holds no run")
    a("--eval_limit", type=int, default=None, help="grade only the first N test examples " + preset_default("eval_limit"))
    a("--eval_batch_size", type=int, default=None, help="prompts per generation batch " + preset_default("eval_batch_size"))
    a("--max_new_tokens", type=int, default=None, help="generation budget per answer " + preset_default("max_new_tokens"))
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt; every setting not given again comes from the run's run.json")
    a("--overwrite", action="store_true", help="start over in an out_dir that holds a run: everything the earlier run wrote moves to out_dir/earlier_<time>/ (nothing is deleted)")
    a("--stop_after", type=int, default=None, help="stop (resumably) after this many steps in this session, e.g. for a time-limited job")
    a("--log_interval", type=int, default=10, help="steps between log lines (default %(default)s)")
    a("--save_interval", type=int, default=100, help="steps between checkpoints, and one at the end (default %(default)s)")
    a("--keep_last", type=int, default=0, help="also keep the last K checkpoints as out_dir/checkpoints/step_<n>.pt (default 0: only ckpt.pt, the latest)")
    a("--eval_interval", type=int, default=0, help="every N steps, the answer loss on --val_examples training examples held out "
      "of training, logged to metrics.jsonl and curves.png; the best checkpoint by it is kept in out_dir/best/ (default 0: off)")
    a("--val_examples", type=int, default=200, help="how many training examples --eval_interval holds out (default %(default)s)")
    a("--seed", type=int, default=1337, help="batch order, adapter initialisation, dropout (default %(default)s)")
    p.error = lambda message: p.exit(2, f"error: {message} (python train.py --help lists the flags)\n")  # not the usage
    return p


def parse_args(argv=None) -> Settings:
    """The settings, resolved once: the command line; with --eval_only or --resume, what comes from the run in out_dir
    (runs.settings_from_run); the preset's values for what is still unset; then every check. Read-only from then on."""
    p = argument_parser()
    values, given, notes = vars(p.parse_args(argv)), flags_given(p, argv), []
    saved = open_run(Path(values["out_dir"])) if values["eval_only"] or values["resume"] else None
    if saved is not None:
        values, notes = settings_from_run(values, given, saved)
    try:  # the base's shape from its config alone, before any weight is read
        shape = TINY_MODEL if values["model"] is None else read_model_args(values["model"])
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise SystemExit(f"error: cannot load --model {values['model']}: {e}")
    with torch.device("meta"):
        base = Transformer(shape)
    n_params = sum(p.numel() for p in base.parameters())
    on_cpu = default_device(values["device"]) == "cpu"
    preset = values["preset"] or ("tiny" if n_params < SMALL_BASE else "small_cpu" if n_params < CPU_BASE and on_cpu
                                  else "llama-7b")
    from_preset = tuple(key for key in PRESETS[preset] if values[key] is None)
    values.update({key: PRESETS[preset][key] for key in from_preset}, preset=preset, from_preset=from_preset,
                  preset_why=f"the base has {n_params / 1e6:,.1f}M parameters" + ", on a CPU" * (preset == "small_cpu"))
    adapter = MoELoRAConfig()
    if values["r"] is None:
        values["r"] = adapter.num_experts * adapter.r if values["method"] == "lora" else adapter.r
    if values["lora_alpha"] is None:
        values["lora_alpha"] = 2.0 * values["r"]
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes, each with its share of a batch
    batch, micro = values["batch_size"], values["micro_batch_size"]
    if "micro_batch_size" in from_preset and batch % (world_size * micro) and batch % world_size == 0:
        values["micro_batch_size"] = math.gcd(micro, batch // world_size)  # the preset's, split: every process gets one
        notes.append(f"--micro_batch_size {values['micro_batch_size']}: the preset's, made to fit {world_size} processes")
    settings = Settings(**values, notes=tuple(notes))  # notes: what main logs about how the settings were resolved
    check_args(settings, base, world_size)
    return settings


def flags_given(p, argv) -> set:
    """The flags given on the command line (not left at their defaults)."""
    defaults = {action: action.default for action in p._actions}
    for action in defaults:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(p.parse_args(argv)))
    finally:
        for action, default in defaults.items():
            action.default = default


def check_args(args, base, world_size: int):
    """Every value that cannot work, found before any expensive work: one line naming the flag, the value and the fix.
    The adapter's settings are checked by MoELoRAConfig itself, whose messages name its fields: the flags of the
    same names."""
    positive = ("lr", "batch_size", "micro_batch_size", "max_seq_len", "eval_batch_size", "max_new_tokens",
                "log_interval", "save_interval", "pretrain_steps", "val_examples")
    problems = [f"--{k} {getattr(args, k)} must be > 0" for k in positive if getattr(args, k) <= 0]
    problems += [f"--{k} {getattr(args, k)} must be > 0 (or leave it out)" for k in ("max_steps", "epochs", "eval_limit",
                                                                                     "stop_after")
                 if getattr(args, k) is not None and getattr(args, k) <= 0]
    problems += [f"--{k} {getattr(args, k)} must be >= 0" for k in ("warmup_steps", "weight_decay", "grad_clip",
                                                                    "contrastive_warmup", "keep_last", "eval_interval")
                 if getattr(args, k) < 0]
    try:
        moelora_config_from(args)
    except ValueError as e:  # "MoELoRAConfig: top_k 9 must be ..." -> "--top_k 9 must be ..."
        flags = "|".join(f.name for f in fields(MoELoRAConfig))
        problems.append(re.sub(rf"\b({flags})\b", r"--\1", str(e).removeprefix("MoELoRAConfig: ")))
    else:
        problems += target_problems(args, base)
    if args.micro_batch_size > args.batch_size > 0:
        problems.append(f"--micro_batch_size {args.micro_batch_size} must be at most --batch_size {args.batch_size}")
    elif args.micro_batch_size > 0 and args.batch_size % (world_size * args.micro_batch_size):
        problems.append(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size "
                        f"{args.micro_batch_size} x {world_size} process(es)")
    if args.eval_kind and not args.eval_file:
        problems.append(f"--eval_kind {args.eval_kind} grades an --eval_file: give one, or leave out --eval_kind")
    if args.quantize != "none" and args.method == "full":
        problems.append(f"--quantize {args.quantize} freezes the base: it trains adapters, not --method full")
    problems += fsdp_problems(args) if args.fsdp else []
    if args.dist_timeout <= 0:
        problems.append(f"--dist_timeout {args.dist_timeout} must be > 0 (minutes)")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: continue the run, or start it over")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {args.device}, but this torch has no usable CUDA ({torch.__version__}); "
                        "use --device cpu, or install a CUDA build of torch")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def fsdp_problems(args) -> list:
    """What --fsdp does not combine with, each with what to use instead."""
    problems = []
    if "LOCAL_RANK" not in os.environ:
        problems.append("--fsdp shards the base over torchrun's processes: start it with torchrun "
                        "--nproc_per_node=N train.py --fsdp ... (N GPUs; on a CPU, any N)")
    if args.quantize != "none":
        problems.append(f"--fsdp with --quantize {args.quantize}: FSDP would cast the packed 8- or 4-bit codes to the "
                        "compute dtype when it gathers them; shard a bf16 base (leave out --quantize), or train the "
                        f"--quantize {args.quantize} base on one GPU without --fsdp")
    if args.method == "full":
        problems.append("--fsdp trains adapters: --method full would save every weight whole from one process; use "
                        "--method moelora or lora, or DDP (leave out --fsdp) for a base that fits one GPU")
    if args.compile:
        problems.append("--fsdp with --compile is not built here: leave out one of them")
    if args.dtype == "fp16" or (args.dtype == "auto" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported()):
        problems.append("--fsdp with fp16: its gradient scaler would need the gradients' overflow agreed over the "
                        "processes, which is not built here; use --dtype bf16 (or fp32) with --fsdp")
    return problems


def target_problems(args, base) -> list:
    """--target_modules checked against the linear layers of the base built on the meta device, read and not changed:
    before a tiny base is pretrained or 7B loaded."""
    linear = {name for _, parent in base.named_modules() for name, child in parent.named_children()
              if isinstance(child, torch.nn.Linear)}  # model.py's, before any quantisation
    missing = [t for t in moelora_config_from(args).target_modules if t not in linear]
    if args.method == "full" or not missing:
        return []
    meta_names = {hf.split(".")[1]: ours.split(".")[1] for hf, ours in HF_NAMES.items() if "proj" in hf}
    return [f"--target_modules {missing} match no nn.Linear of the model, whose linear layers are {sorted(linear)}. "
            "model.py uses Meta's names; Hugging Face's are " + ", ".join(f"{hf} -> {ours}" for hf, ours in meta_names.items())]


def moelora_config_from(args) -> MoELoRAConfig:
    lora = args.method == "lora"  # plain LoRA is MoELoRA with one expert: the gate is then always 1
    return MoELoRAConfig(
        num_experts=1 if lora else args.num_experts, top_k=1 if lora else args.top_k, gate=args.gate, r=args.r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()),
        contrastive_weight=args.contrastive_weight, contrastive_temperature=args.contrastive_temperature,
        contrastive_samples=args.contrastive_samples, balance_weight=args.balance_weight,
        router_z_weight=args.router_z_weight, router_jitter=args.router_jitter)


# -----------------------------------------------------------------------------------------------------
# main: settings, data, the base and its adapters; then train and grade

def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.device, args.fsdp, args.dist_timeout)
    precision = setup_precision(args.dtype, device)
    run = Run(rank, world_size, precision, precision.grad_scaler(), Path(args.out_dir), sharded=args.fsdp)
    with one_line_if_a_collective_fails(run, args.dist_timeout):  # a process that died or hangs
        check_out_dir(args, run)  # out_dir changes only in prepare_out_dir, once every check below has passed
        for note in args.notes:
            run.log(note)
        run.log(f"preset {args.preset} ({args.preset_why}; --preset chooses): "
                + ", ".join(f"{k} {getattr(args, k)}" for k in PRESETS[args.preset]))
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed + rank)

        data_dir = find_data_dir(args.data_dir)
        tests, missing, graded_as = load_tests(args, run.log, data_dir)
        train_examples = [] if args.eval_only else load_training_examples(args, run.log, data_dir, tests)
        if args.eval_limit:
            tests = {task: examples[:args.eval_limit] for task, examples in tests.items()}
        model, tok, base, step = load_model(args, run, data_dir, train_examples, tests)
        raw_model = model  # what is saved and evaluated; `model` may become a DDP / compiled wrapper

        train_set = val_set = None
        if not args.eval_only:
            train_examples, val_examples = hold_out(args, run.log, train_examples)
            max_seq_len = min(args.max_seq_len, model.args.max_seq_len)
            train_set = tokenize_train_set(args, run.log, tok, train_examples, max_seq_len)
            val_set = tokenize_dataset(tok, val_examples, max_seq_len, args.prompt_format)[0] if val_examples else None
        info = run_info(args, run, base, train_examples, tests)
        check_against_the_run(args, run, info)
        prepare_out_dir(args, run, info)  # every check has passed: only now may an earlier run move aside

        if not args.eval_only:
            if args.compile:
                model = torch.compile(model)
            if world_size > 1 and not args.fsdp:  # (fsdp.py sharded the model when it built it)
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
            step = train(args, run, model, raw_model, tok, train_set, val_set, base)
            if step is None:
                return None
        elif step is None:
            step = 0
            run.log(f"no {run.out_dir / 'ckpt.pt'}: evaluating the base model with fresh (no-op) adapters")

        # every result file says what it graded and which run (run.json) it comes from
        record = {"run_id": info["run_id"], "step": step, "base": base["path"], "model": args.model or "built-in tiny",
                  "method": args.method, "quantize": args.quantize, "autocast": str(run.amp_dtype).removeprefix("torch."),
                  "adapter": None if args.method == "full" else asdict(moelora_config(raw_model)),
                  "code": info["code"]}
        results = grade(args, run, raw_model, tok, tests, missing, graded_as, record)
        if dist.is_initialized():
            # DDP's and FSDP's hooks keep collectives' work objects in reference cycles: freed here, while the process
            # group lives, not by the interpreter's last collection at exit (where gloo's threads can abort it)
            del model, raw_model
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        return results if len(results) > 1 else next(iter(results.values()))


def load_model(args, run: Run, data_dir, train_examples: list, tests: dict) -> tuple:
    """(model, tokenizer, base, step). The base: --model; else, for --eval_only and --resume, the run's own; else the
    built-in tiny base (built once, then found in the cache). --eval_only of a trained run opens it (runs.load_run: its
    trained weights, checked against its base); otherwise the base gets fresh adapters of --method (--resume loads its
    checkpoint into them when training starts). base: its path and fingerprint; step: the run's, or None."""
    saved = open_run(run.out_dir) if args.eval_only or args.resume else None
    adapter = None if args.method == "full" else moelora_config_from(args)
    path = args.model
    if path is None and saved is not None and Path(saved.base).exists():
        path = saved.base  # the run's own tiny base, from the cache
    elif path is None:
        texts = [f"{ex['instruction']}\n{ex['output']}" for ex in train_examples or
                 load_training_examples(args, run.log, data_dir, tests)]
        path = tiny_base_dir(tiny_base_cache(), args.task, texts, args.pretrain_steps, args.seed)
        if run.rank == 0:
            build_tiny_base(path, args.task, texts, args.pretrain_steps, args.seed, run.log, get_lr)
        if run.world_size > 1:
            dist.barrier()  # the other processes wait for rank 0 to build the tiny base
    if args.eval_only and saved is not None and saved.step is not None:  # a trained run, graded again
        model, tok, saved = load_run(run.out_dir, run.precision, path, sharded=args.fsdp)
        base, step = {**saved.fingerprint, "path": saved.base}, saved.step
    else:  # --resume loads its checkpoint into the fresh adapters when training starts
        # DDP starts every process from rank 0's adapters; FSDP shards the whole ones, drawn with rank 0's seed
        seed = args.seed if args.fsdp else args.seed + run.rank
        model, tok = new_model(path, run.precision, args.quantize, adapter, seed, sharded=args.fsdp)
        base, step = base_fingerprint(model, path), None
    model.grad_checkpointing = args.grad_checkpointing
    n = sum(p.numel() for name, p in model.named_parameters() if not name.endswith(("lora_A", "lora_B", "router.weight")))
    run.log(f"base model: {path} ({n / 1e6:.1f}M parameters, {run.precision.weights_dtype(args.method == 'full')}"
            f"{f', {args.quantize} linear layers' * (args.quantize != 'none')}, {run.device}, autocast {run.amp_dtype})")
    if step is not None:
        run.log(f"evaluating {saved.weights} (step {step})")
    return model, tok, base, step


# -----------------------------------------------------------------------------------------------------
# training

def train(args, run: Run, model, raw_model, tok, train_set, val_set, base: dict):
    """Train until --max_steps / --epochs (or --stop_after); the last step when the run is complete, else None.
    val_set: the held-out (tokens, labels) pairs that --eval_interval checks, or None."""
    n_examples = len(train_set.pairs)
    steps_per_epoch = len(batch_order(n_examples, args.batch_size, 0, args.seed))  # main checked that it is > 0
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    if args.warmup_steps >= total_steps:
        run.log(f"WARNING: --warmup_steps {args.warmup_steps} reaches the run's {total_steps} steps: the learning rate "
                f"never gets to --lr {args.lr} (it ends at {get_lr(total_steps - 1, args.lr, args.warmup_steps, total_steps):.3g})")
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  fused=run.device.startswith("cuda") and not args.fsdp)  # sharded: foreach
    step = resume_from_checkpoint(run, args, raw_model, optimizer, base) if args.resume else 0
    saved_step = step if args.resume else None  # the step of the checkpoint on disk, if any
    best = best_val_loss(run) if args.resume else math.inf

    accum = args.batch_size // run.world_size // args.micro_batch_size
    run.log(f"training {sum(p.numel() for p in params):,} parameters ({args.method}) for {total_steps} steps "
            f"({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps), batch {args.batch_size} = "
            f"{run.world_size} process(es) x {accum} micro-batch(es) x {args.micro_batch_size}")
    model.train()
    last_step = total_steps if args.stop_after is None else min(total_steps, step + args.stop_after)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=run.rank != 0, dynamic_ncols=True)
    t0, positions = time.time(), 0
    with catch_stop_signals(run) as stop:  # a first signal: stop after this step, saved; a second: at once
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
            checked = val_set is not None and (step % args.eval_interval == 0 or step == total_steps)
            val_loss = validation_loss(run, model, raw_model, val_set, tok.pad_id, args.eval_batch_size, step) if checked else None
            if step % args.save_interval == 0 or step == last_step or stopping or checked:
                save_checkpoint(run, args, raw_model, optimizer, step, base)
                keep_checkpoint(run, step, args.keep_last)
                saved_step = step
            if checked and val_loss < best:
                best = val_loss
                keep_best(run, step, val_loss)
            if checked:
                plot_curves(run)
            if stopping:
                bar.close()
                name = signal.Signals(stop["signal"]).name if stop["signal"] else "another process's signal"
                run.log(f"stopped by {name} after step {step} of {total_steps}; checkpoint saved in "
                        f"{run.out_dir / 'ckpt.pt'}. Continue with the same command and --resume")
                raise SystemExit(128 + (stop["signal"] or signal.SIGTERM))
    bar.close()
    plot_curves(run)
    if step < total_steps:
        run.log(f"stopped after step {step} of {total_steps} (--stop_after); continue with --resume")
        return None
    if best < math.inf:
        run.log(f"the best checkpoint by validation loss ({best:.4f}) is in {run.out_dir / 'best'}")
    return step


def get_lr(step: int, lr: float, warmup: int, total: int) -> float:
    # linear warm-up, then cosine decay to lr / 10 at the last step
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def micro_batches_of_step(run: Run, args, n_examples: int, step: int, steps_per_epoch: int):
    """This process's share of the global batch of `step`: a list of micro-batches, each a list of example indices.
    A mixture's sources are shuffled together: each epoch visits every example once, so each source's share of
    the training is its share of the examples."""
    epoch, index = divmod(step, steps_per_epoch)
    batch = batch_order(n_examples, args.batch_size, epoch, args.seed)[index]
    per_rank = args.batch_size // run.world_size
    mine = batch[run.rank * per_rank:(run.rank + 1) * per_rank]
    return [mine[j:j + args.micro_batch_size] for j in range(0, per_rank, args.micro_batch_size)]


def batch_order(n_examples: int, batch_size: int, epoch: int, seed: int):
    """The examples of one epoch in global batches: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the batches it would have seen. The last partial batch is dropped."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n_examples - batch_size + 1, batch_size)]


def forward_backward(run: Run, args, model, raw_model, train_set, micro_batches, pad_id: int, step: int,
                     per_source=None):
    """Accumulate the gradients of optimizer step `step` (0-based). Returns the step's losses for the log (lm,
    contrastive as added to the loss, balance, router_z: 0-dim tensors left on the device, so the host waits once
    per step), of the whole batch over all processes, and the number of positions this process processed.
    per_source ([2, sources], for a logged step of a mixture) receives each source's summed target loss and
    target count."""
    pairs, sources = train_set.pairs, train_set.sources
    # every target token of the global batch weighs the same, however the batch is split into micro-batches
    # and processes: weight each micro-batch's mean loss by its share of the targets
    n_targets = [sum(sum(l != IGNORE_INDEX for l in pairs[i][1]) for i in mb) for mb in micro_batches]
    global_targets = all_reduce_sum(sum(n_targets), run)
    sums = {k: torch.zeros((), device=run.device) for k in ("lm", "contrastive", "balance", "router_z")}
    positions = 0
    for j, mb in enumerate(micro_batches):
        x, y, real = collate([pairs[i] for i in mb], pad_id, run.device)  # [B, T] each
        sync = j == len(micro_batches) - 1  # gradients are reduced over processes only on the last micro-batch
        # padding (a third of the positions in the tutorial's runs) stays out of the routers' losses and
        # statistics; the language-model loss already ignores it through the labels
        only_real = moelora_token_mask(raw_model, real) if args.method != "full" else contextlib.nullcontext()
        with gradient_sync(model, sync), run.autocast(), only_real:
            logits, lm_loss = model(x, y)
            aux = (moelora_aux_losses(raw_model, contrastive_scale=contrastive_ramp(args, step))
                   if args.method == "moelora" else {})
            # DDP and FSDP average gradients over processes, hence the world_size factor
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
        sums["lm"] += lm_loss.detach().float() * (n_targets[j] / max(1, global_targets))
        for k, v in aux.items():
            sums[k] += v.detach().float() / (len(micro_batches) * run.world_size)
        positions += x.numel()
    if run.world_size > 1:  # the whole batch's losses, as one process logs them: every process's share added
        totals = torch.stack(list(sums.values()))
        dist.all_reduce(totals)
        sums = dict(zip(sums, totals))
    return sums, positions


def gradient_sync(model, sync: bool):
    """A micro-batch's backward: accumulated locally, or (sync, the step's last) also reduced over processes."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fsdp.py): a flag on the model
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def contrastive_ramp(args, step: int) -> float:
    """The share of --contrastive_weight used at step `step` (0-based): (step + 1) / --contrastive_warmup, capped
    at 1. The layers hold the full weight; moelora_aux_losses applies this share of it."""
    return 1.0 if args.contrastive_warmup == 0 else min(1.0, (step + 1) / args.contrastive_warmup)


def optimizer_step(args, run: Run, optimizer, params, losses: dict, step: int, saved_step):
    """Unscale, clip and step, unless the loss or the gradient is not finite: then stop, keeping the last good checkpoint."""
    if not all(map(math.isfinite, losses.values())):  # before the optimizer step: the weights are still finite
        stop_non_finite(run, "the loss is not finite (" + ", ".join(f"{k} {v}" for k, v in losses.items()) + ")",
                        step, saved_step)
    run.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if isinstance(grad_norm, DTensor):  # --fsdp: the norm over every process's shards, clipped by it already
        grad_norm = grad_norm.full_tensor()
    if not run.scaler.is_enabled() and not torch.isfinite(grad_norm):  # (fp16's scaler skips such steps itself)
        stop_non_finite(run, f"the gradient norm is {grad_norm.item()}", step, saved_step)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)


def stop_non_finite(run: Run, what: str, step: int, saved_step):
    # nothing is saved from here on: the checkpoint on disk is the last one with finite weights
    raise SystemExit(f"error: {what} at step {step}; stopped without saving. The last good checkpoint is "
                     f"{run.out_dir / 'ckpt.pt'}" + (f" (step {saved_step})" if saved_step is not None else " (none yet)")
                     + ". Lower --lr, or use --dtype bf16 instead of fp16.")


def log_step(run: Run, args, raw_model, step: int, lr: float, losses: dict, tokens_per_s: float, source_losses) -> str:
    """Append the step's record to metrics.jsonl and return its log line."""
    record = {"step": step, "lr": lr, "loss": losses["lm"], "contrastive": losses["contrastive"],
              "balance": losses["balance"], "router_z": losses["router_z"], "tokens_per_s": tokens_per_s}
    if source_losses:
        record["loss_per_source"] = source_losses
    line = f"step {step}: loss {losses['lm']:.4f} lr {lr:.2e} {tokens_per_s:.0f} tok/s"
    if args.method == "moelora":
        stats = moelora_routing_stats(raw_model)  # of the step's last micro-batch, real tokens only
        record["routing"] = stats
        load = np.array([s["expert_share"] for s in stats.values()])  # [layers, experts]
        entropy = np.mean([s["router_entropy"] for s in stats.values()])
        z = f" router z {losses['router_z']:.4f}" if args.router_z_weight > 0 else ""
        line += (f" | contrastive {losses['contrastive']:.4f} balance {losses['balance']:.4f}{z} | expert load "
                 f"max {load.max(1).mean():.2f} min {load.min(1).mean():.2f} router entropy {entropy:.2f}")
    run.log_jsonl(record)
    return line


def per_source_losses(run: Run, names: list, per_source):
    """{source: mean target loss in the step's batch} for a mixture (None for one source), over all processes."""
    if per_source is None:
        return None
    if run.world_size > 1:
        dist.all_reduce(per_source)
    totals, counts = per_source.tolist()
    return {name: total / n for name, total, n in zip(names, totals, counts) if n}


if __name__ == "__main__":
    main()
