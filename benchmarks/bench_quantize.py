"""
The frozen quantised bases of quantize.py, int8 and NF4, against a float one: what they store, how far their logits
move, how MoELoRA trains on them, and what a training step costs.

    python benchmarks/bench_quantize.py                   # CPU, every part, both formats, about 3 minutes on 2 cores
    python benchmarks/bench_quantize.py --parts bytes,accuracy --formats nf4
    python benchmarks/bench_quantize.py --device cuda --dtype bf16 --shape 7b --grad_checkpointing --parts speed
                                                          # benchmarks/gpu_checklist.sh: LLaMA-7B's shape on a GPU

Formats (--formats, comma-separated, default both): int8 (quantize_int8), nf4 (quantize_nf4); each part measures
each format given. --formats int8 prints the int8 tables as they were before NF4 came.

Parts (--parts, comma-separated):
  bytes     the stored base (quantize.stored_bytes), each format against bf16: LLaMA-7B's shape counted on the meta
            device (nothing is allocated) and by a formula written from the shapes, which must agree; stories260K and
            the tiny base's config counted on real tensors too, which must agree with the meta count
  scales    int8: bf16 against fp16 scales: the round-trip error |w - q s| on stories260K's weights and on 4096 x 11008
            random matrices, and the share of groups whose scale fp16 stores as a subnormal number. nf4: bf16,
            float32 (QLoRA's) and double-quantised scales (QLoRA's: 8 bits in blocks of 256): round-trip error on the
            same weights and the bytes of LLaMA-7B's stored base with each
  accuracy  logits and answer loss against the float32 base: the loss of GSM8K's reference solutions under the
            Alpaca prompt, teacher-forced, prompt tokens and padding excluded (what train.py's answer_loss computes),
            on stories260K and on the built-in tiny base (built into --tiny_base_dir unless it is there already),
            and on --extra_base when given
  train     --train_steps MoELoRA steps on stories260K, float32 base and each format's base, the same batches and seed
  speed     one MoELoRA training step (forward, auxiliary losses, backward, AdamW) on a --shape model with random
            weights, each --dtype's float base against each format's base made from it, medians of alternating rounds.
            fp32: no autocast; bf16 / fp16: the base stored in that dtype and autocast to it (fp16 with a gradient
            scaler), adapters float32, as train.py does. Then the peak memory of each contender alone, in a fresh
            subprocess, over two steps: on CUDA torch.cuda.max_memory_allocated above the built model and in all (the
            model included), on the CPU the peak resident set above the built model
"""

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: model.py, quantize.py
import quantize
from bench_moelora import machine, timed
from bench_vs_hf import peak_memory_of, saved_for_backward_bytes
from data.prompts import IGNORE_INDEX, tokenize_dataset
from data.tasks import find_data_dir, load_split
from checkpoints import from_pretrained
from model import ModelArgs, Transformer, ffn_hidden_dim
from moelora import MoELoRAConfig, inject_moelora, mark_only_moelora_as_trainable, moelora_aux_losses
from quantize import (dequantize_nf4_weight, dequantize_weight, nf4_levels, quantize_int8, quantize_nf4,
                      quantize_nf4_weight, quantize_weight, stored_bytes)
from tiny_base import TINY_MODEL, build_tiny_base, tiny_base_dir
from tokenizer import Tokenizer

SHARED = Path(os.environ.get("MOELORA_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
STORIES = SHARED / "models" / "stories260K-hf"
SHAPES = {  # the speed part's model and batch
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, batch=2, seq=32),  # to try the script in seconds
    "small": dict(dim=512, n_layers=4, n_heads=8, vocab_size=8000, batch=2, seq=256),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, batch=4, seq=512),  # LLaMA-7B, the llama-7b preset's micro-batch
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("bytes", "scales", "accuracy", "train", "speed")
FORMATS = {"int8": quantize_int8, "nf4": quantize_nf4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--parts", default=",".join(PARTS), help="among " + ", ".join(PARTS))
    a("--formats", default=",".join(FORMATS), help="the quantised bases, among " + ", ".join(FORMATS))
    a("--device", default="cpu")
    a("--dtype", default="fp32,bf16", help="the speed part's float bases, comma-separated among fp32, bf16, fp16")
    a("--shape", default="small", choices=list(SHAPES), help="the speed part's model")
    a("--n_layers", type=int, default=None, help="layers of the speed part's model (default: the shape's)")
    a("--grad_checkpointing", action="store_true", help="the speed part recomputes each block in backward")
    a("--rounds", type=int, default=5, help="timed rounds of the speed part")
    a("--warmup", type=int, default=1, help="rounds run first and not timed")
    a("--no_memory", action="store_true", help="skip the speed part's memory subprocesses")
    a("--eval_examples", type=int, default=64, help="GSM8K test examples of the accuracy part")
    a("--extra_base", default=None, help="a further checkpoint for the accuracy part, any format checkpoints.py reads "
      "(e.g. ../shared's SmolLM2-135M GGUF file; 4 examples a batch: a large vocabulary's logits are large)")
    a("--train_steps", type=int, default=30)
    a("--tiny_base_dir", default=os.path.join(tempfile.gettempdir(), "moelora_bench_quantize"),
      help="where the accuracy part builds (or finds) the built-in tiny base")
    a("--pretrain_steps", type=int, default=150, help="the tiny base's pretraining steps (train.py's default)")
    a("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a("--child", default=None, help=argparse.SUPPRESS)  # internal: one speed contender's memory, printed as JSON
    args = p.parse_args(argv)
    args.parts, args.dtypes, args.formats = args.parts.split(","), args.dtype.split(","), args.formats.split(",")
    for name, given, known in (("part", args.parts, PARTS), ("dtype", args.dtypes, DTYPES), ("format", args.formats, FORMATS)):
        if set(given) - set(known):
            p.error(f"unknown {name} {sorted(set(given) - set(known))}; choose among {', '.join(known)}")
    return args


def gb(n_bytes):
    return f"{n_bytes / 1e9:,.3f}"


# -----------------------------------------------------------------------------------------------------
# bytes

def linear_shapes(a: ModelArgs, output: bool = True) -> list:
    """(out, in) of every linear layer quantize_int8 replaces (quantize_nf4: output=False, it keeps the output one)."""
    d, h, L = a.dim, ffn_hidden_dim(a), a.n_layers
    kv = (a.n_kv_heads or a.n_heads) * (d // a.n_heads)
    linears = L * [(d, d), (kv, d), (kv, d), (d, d), (h, d), (d, h), (h, d)]  # (out, in): wq wk wv wo w1 w2 w3
    return linears + ([(a.vocab_size, d)] if output and not a.tie_word_embeddings else [])  # output, unless tied


def nf4_double_quant_bytes(n_scales: int) -> int:
    """Bytes of n_scales NF4 scales double-quantised as QLoRA does: 1 byte each, one float32 scale per block of 256,
    and the float32 mean that was subtracted."""
    return n_scales + 4 * math.ceil(n_scales / 256) + 4


def formula_bytes(a: ModelArgs, fmt, block: int = 64) -> int:
    """The stored base from its shapes alone: bf16 everywhere (fmt None), or int8 linears + a bf16 scale per group of
    inputs, or NF4 linears (half a byte a weight) + a bf16 scale per block ("nf4"), or with its scales double-quantised
    ("nf4 dq"), or float32 ("nf4 fp32 scales"). Every NF4 variant keeps an untied output layer in bf16."""
    per_linear = {
        None: lambda o, i: 2 * o * i,
        "int8": lambda o, i: o * math.ceil(i / block) * (block + 2),
        "nf4": lambda o, i: o * math.ceil(i / block) * (block // 2 + 2),
        "nf4 fp32 scales": lambda o, i: o * math.ceil(i / block) * (block // 2 + 4),
        "nf4 dq": lambda o, i: o * math.ceil(i / block) * block // 2 + nf4_double_quant_bytes(o * math.ceil(i / block)),
    }[fmt]
    nf4 = fmt is not None and fmt.startswith("nf4")
    kept_output = 2 * a.vocab_size * a.dim if nf4 and not a.tie_word_embeddings else 0  # quantize_nf4's float output
    embeddings_and_norms = 2 * (a.vocab_size * a.dim + (2 * a.n_layers + 1) * a.dim)
    return sum(per_linear(o, i) for o, i in linear_shapes(a, output=not nf4)) + kept_output + embeddings_and_norms


def base_bytes(a: ModelArgs, device, formats) -> tuple:
    """(bf16 bytes, [bytes of each format]) of Transformer(a), counted by stored_bytes on `device`."""
    def bf16_model():
        with torch.device(device):
            return Transformer(a).to(torch.bfloat16)
    return stored_bytes(bf16_model()), [stored_bytes(FORMATS[f](bf16_model())) for f in formats]


def part_bytes(args):
    print("\n## bytes of the stored base: " + ", ".join(args.formats) + " (blocks of 64, bf16 scales; embeddings and "
          "norms bf16) against bf16\n")
    models = {"LLaMA-7B (model.py's ModelArgs())": ModelArgs(), "built-in tiny base (tiny_base.TINY_MODEL)": TINY_MODEL}
    if STORIES.exists():
        models["stories260K"] = from_pretrained(STORIES).args
    cols = [c for f in args.formats for c in (f"{f} bytes", f"{f} / bf16")]
    print("| base | bf16 bytes | " + " | ".join(cols) + " | meta count = formula | = count on real tensors |")
    print("| --- | ---: |" + " ---: |" * len(cols) + " --- | --- |")
    for name, a in models.items():
        bf16, quantized = base_bytes(a, "meta", args.formats)
        formula = [formula_bytes(a, None)] + [formula_bytes(a, f) for f in args.formats] == [bf16] + quantized
        real = "-" if a.dim > 1024 else str(base_bytes(a, "cpu", args.formats) == (bf16, quantized))  # 7B: not allocated
        row = [f"{n:,} | {n / bf16:.3f}x" for n in quantized]
        print(f"| {name} | {bf16:,} | " + " | ".join(row) + f" | {formula} | {real} |")


# -----------------------------------------------------------------------------------------------------
# scales

def round_trip_errors(weights, scale_dtype):
    """({compute dtype: mean |w - q s| with q s made in that dtype}, share of groups whose scale is below fp16's
    smallest normal number), with the scales stored in scale_dtype."""
    before, quantize.SCALE_DTYPE = quantize.SCALE_DTYPE, scale_dtype
    try:
        err, n, small, groups = dict.fromkeys(DTYPES, 0.0), 0, 0, 0
        for w in weights:
            q, s = quantize_weight(w)
            for name, dtype in DTYPES.items():
                err[name] += (dequantize_weight(q, s, dtype, w.shape[1]).float() - w).abs().sum().item()
            n += w.numel()
            small += int((s.float() < torch.finfo(torch.float16).tiny).sum())
            groups += s.numel()
        return {name: e / n for name, e in err.items()}, small / groups
    finally:
        quantize.SCALE_DTYPE = before


def nf4_with_scales(w, scales, block: int = 64):
    """w [out, in] (in a multiple of block) quantised to NF4 against given scales [out, n_blocks] float32: each weight
    to its nearest level of w / s, the search of quantize_nf4_weight. Returns the dequantised weight, float32."""
    levels = nf4_levels(w.device, torch.float32)
    blocks = w.view(w.shape[0], -1, block) / scales.unsqueeze(-1)
    c = torch.bucketize(blocks, (levels[1:] + levels[:-1]) / 2)
    return (levels[c] * scales.unsqueeze(-1)).view(w.shape)


def double_quantized(scales, block: int = 256):
    """QLoRA's double quantisation of a tensor's absmax scales, as an int8 round trip: the mean subtracted, then 8
    bits (round(c / a), a = max|c| / 127) per block of 256, the mean added back. (QLoRA stores the 8 bits as an
    8-bit float; linear int8 is what quantize.py's int8 path does.)"""
    flat = scales.flatten()
    mean = flat.mean()
    c = F.pad(flat - mean, (0, -len(flat) % block)).view(-1, block)
    a = c.abs().amax(dim=-1, keepdim=True) / 127
    a = torch.where(a > 0, a, 1.0)
    return ((c / a).round().clamp(-127, 127) * a).flatten()[:len(flat)].view(scales.shape) + mean


def nf4_round_trip_errors(weights):
    """{scale storage: mean |w - L[c] s|} over weights, made in float32: the scales stored in bf16 (quantize.py),
    float32 (QLoRA without double quantisation) or double-quantised (QLoRA)."""
    err, n = {"bf16": 0.0, "float32": 0.0, "double-quantised": 0.0}, 0
    for w in weights:
        w = F.pad(w.float(), (0, -w.shape[1] % 64))  # the padding, as quantize_nf4_weight's: zero error
        codes, s = quantize_nf4_weight(w)
        err["bf16"] += (dequantize_nf4_weight(codes, s, torch.float32, w.shape[1]) - w).abs().sum().item()
        amax = w.view(w.shape[0], -1, 64).abs().amax(dim=-1)
        amax = torch.where(amax > 0, amax, 1.0)
        err["float32"] += (nf4_with_scales(w, amax) - w).abs().sum().item()
        err["double-quantised"] += (nf4_with_scales(w, double_quantized(amax)) - w).abs().sum().item()
        n += w.numel()
    return {k: e / n for k, e in err.items()}


def part_scales(args):
    g = torch.Generator().manual_seed(0)
    sets = {f"random 4096 x 11008, std {std}": [torch.randn(4096, 11008, generator=g) * std] for std in (0.02, 0.001)}
    if STORIES.exists():
        model = from_pretrained(STORIES)
        sets = {"stories260K, every linear": [m.weight.detach() for m in model.modules() if type(m) is torch.nn.Linear],
                **sets}
    if "nf4" in args.formats:
        part_scales_nf4(sets)
    if "int8" in args.formats:
        part_scales_int8(sets)


def part_scales_nf4(sets):
    print("\n## nf4: the scales stored in bf16, float32 or double-quantised: LLaMA-7B's stored base and mean "
          "|w - L[c] s| (made in float32)\n")
    seven_b = ModelArgs()
    bf16 = formula_bytes(seven_b, None)
    print("| scales | LLaMA-7B base bytes | / bf16 | " + " | ".join(sets) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(sets) + "")
    errors = {name: nf4_round_trip_errors(ws) for name, ws in sets.items()}
    for scales, fmt in (("bf16", "nf4"), ("float32", "nf4 fp32 scales"), ("double-quantised", "nf4 dq")):
        n = formula_bytes(seven_b, fmt)
        print(f"| {scales} | {n:,} | {n / bf16:.4f}x | " + " | ".join(f"{errors[s][scales]:.4e}" for s in sets) + " |")


def part_scales_int8(sets):
    print("\n## int8: scales stored in bf16 or fp16: mean |w - q s|, q s made in float32 (CPU), bf16 or fp16 (autocast)\n")
    print("| weights | scales | made in float32 | bf16 | fp16 | groups whose scale is subnormal in fp16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, weights in sets.items():
        for scale_dtype in ("bf16", "fp16"):
            err, sub = round_trip_errors(weights, DTYPES[scale_dtype])
            print(f"| {name} | {scale_dtype} | " + " | ".join(f"{err[d]:.4e}" for d in DTYPES) + f" | {100 * sub:.1f}% |")


# -----------------------------------------------------------------------------------------------------
# accuracy: logits and answer loss against the float32 base

def collate(pairs, pad_id):
    """[(tokens, labels)] -> tokens, labels [B, T], right-padded (labels with IGNORE_INDEX), as train.py's."""
    T = max(len(t) for t, _ in pairs)
    tokens = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (t, l) in enumerate(pairs):
        tokens[i, :len(t)], labels[i, :len(l)] = torch.tensor(t), torch.tensor(l)
    return tokens, labels


@torch.no_grad()
def compare(path, examples, fmt, batch=16):
    """Float32 base against its quantised copy (fmt: int8 or nf4) on (prompt, reference solution) pairs: logit
    differences over the real tokens, and each model's answer loss (cross-entropy of the solution's tokens, summed, /
    their number)."""
    tok = Tokenizer.from_dir(path)
    ref = from_pretrained(path)
    q = FORMATS[fmt](from_pretrained(path))
    pairs, _, _ = tokenize_dataset(tok, examples, ref.args.max_seq_len)
    diffs, logits_all, loss, n_targets = [], [], {"float32": 0.0, "quantized": 0.0}, 0
    for i in range(0, len(pairs), batch):
        x, y = collate(pairs[i:i + batch], tok.pad_id)
        real = torch.zeros_like(x, dtype=torch.bool)
        for b, (t, _) in enumerate(pairs[i:i + batch]):
            real[b, :len(t)] = True
        n = int((y != IGNORE_INDEX).sum())
        for name, model in (("float32", ref), ("quantized", q)):
            logits, l = model(x, y)
            loss[name] += l.item() * n
            if name == "float32":
                reference = logits[real]
            else:
                diffs.append((logits[real] - reference).abs().flatten())
        logits_all.append(reference.flatten())
        n_targets += n
    d, ref_logits = torch.cat(diffs), torch.cat(logits_all)
    return dict(max=d.max().item(), mean=d.mean().item(), std=ref_logits.std().item(), tokens=sum(len(t) for t, _ in pairs),
                loss_float=loss["float32"] / n_targets, loss_q=loss["quantized"] / n_targets, targets=n_targets)


def the_tiny_base(args, data_dir) -> Path:
    """The built-in tiny base as train.py --task gsm8k builds it (its key, steps and seed), in --tiny_base_dir."""
    texts = [f"{ex['instruction']}\n{ex['output']}" for ex in load_split("gsm8k", "train", data_dir)]
    path = tiny_base_dir(Path(args.tiny_base_dir), "gsm8k", texts, args.pretrain_steps, seed=1337)

    def lr_at(step, lr, warmup, total):  # warm-up, then cosine to lr / 10 (train.py's get_lr)
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
    start = time.perf_counter()
    build_tiny_base(path, "gsm8k", texts, args.pretrain_steps, 1337, print, lr_at)
    print(f"(tiny base ready in {time.perf_counter() - start:.0f} s)")
    return path


def part_accuracy(args):
    data_dir = find_data_dir(os.environ.get("MOELORA_DATA_DIR"))
    examples = load_split("gsm8k", "test", data_dir)[:args.eval_examples]
    bases = {}
    if STORIES.exists():
        bases["stories260K"] = STORIES
    bases[f"built-in tiny base ({args.pretrain_steps} pretraining steps)"] = the_tiny_base(args, data_dir)
    if args.extra_base:
        bases[Path(args.extra_base).name] = Path(args.extra_base)
    print(f"\n## {', '.join(args.formats)} base against float32: the first {len(examples)} GSM8K test questions with "
          "their reference solutions, Alpaca prompt\n")
    print("| base | format | tokens | max abs logit diff | mean abs | logits' std | mean / std | answer loss float32 | "
          "quantised | change |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, path in bases.items():
        for fmt in args.formats:
            r = compare(path, examples, fmt, batch=4 if str(path) == args.extra_base else 16)
            change = r['loss_q'] - r['loss_float']
            print(f"| {name} | {fmt} | {r['tokens']:,} | {r['max']:.4f} | {r['mean']:.4f} | {r['std']:.3f} | "
                  f"{100 * r['mean'] / r['std']:.2f}% | {r['loss_float']:.4f} | {r['loss_q']:.4f} | "
                  f"{change:+.4f} ({100 * change / r['loss_float']:+.2f}%) |")


# -----------------------------------------------------------------------------------------------------
# train: the same MoELoRA run on the float base and on each format's

def part_train(args):
    data_dir = find_data_dir(os.environ.get("MOELORA_DATA_DIR"))
    tok = Tokenizer.from_dir(STORIES)
    pairs, _, _ = tokenize_dataset(tok, load_split("gsm8k", "train", data_dir), 256)
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    batches = [collate([pairs[j] for j in order[i * 8:(i + 1) * 8]], tok.pad_id) for i in range(args.train_steps)]
    curves = {}
    for name in ["float32"] + args.formats:
        model = from_pretrained(STORIES)
        if name != "float32":
            FORMATS[name](model)
        torch.manual_seed(0)  # the same adapters' start and dropout masks
        inject_moelora(model, MoELoRAConfig())
        mark_only_moelora_as_trainable(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)  # the tiny preset's lr
        curves[name] = []
        for x, y in batches:
            _, loss = model(x, y)
            (loss + sum(moelora_aux_losses(model).values())).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[name].append(loss.item())
    print(f"\n## MoELoRA (defaults: 8 experts, top-2, rank 4, wq and wv) on stories260K, {args.train_steps} steps of 8 "
          "GSM8K training examples (256-token cutoff), AdamW lr 3e-3, the same batches and seed; answer loss per step\n")
    cols = ["float32 base"] + [c for f in args.formats for c in (f"{f} base", "difference")]
    print("| step | " + " | ".join(cols) + " |\n| ---: |" + " ---: |" * len(cols))
    for i, a in enumerate(curves["float32"]):
        print(f"| {i + 1} | {a:.4f} | " + " | ".join(f"{curves[f][i]:.4f} | {curves[f][i] - a:+.4f}" for f in args.formats) + " |")
    last = {name: statistics.mean(c[-10:]) for name, c in curves.items()}
    print(f"\nfloat32 base: final loss {curves['float32'][-1]:.4f}, mean of the last 10 steps {last['float32']:.4f}")
    for f in args.formats:
        diff = [abs(b - a) for a, b in zip(curves["float32"], curves[f])]
        print(f"{f} base: final loss {curves[f][-1]:.4f} ({curves[f][-1] - curves['float32'][-1]:+.4f}), mean of the last "
              f"10 steps {last[f]:.4f} ({last[f] - last['float32']:+.4f}); mean |difference| over the {len(diff)} steps "
              f"{statistics.mean(diff):.4f}, largest {max(diff):.4f}")


# -----------------------------------------------------------------------------------------------------
# speed, and on CUDA memory

def contenders(args):
    """{name: (float dtype, format or None)}: each --dtype's float base, and each format's base made from it."""
    return {name: (d, fmt) for d in args.dtypes
            for name, fmt in [(f"{d} base", None)] + [(f"{f} base, {d}", f) for f in args.formats]}


def build_contender(name, args):
    """(model, autocast dtype) for a speed contender: a --shape LLaMA with random weights, seeded (the float base
    and the quantised bases get the same weights), stored in the dtype, quantised for a format's contender, MoELoRA
    injected."""
    s = SHAPES[args.shape]
    dtype_name, fmt = contenders(args)[name]
    dtype = DTYPES[dtype_name]
    margs = ModelArgs(dim=s["dim"], n_layers=args.n_layers or s["n_layers"], n_heads=s["n_heads"],
                      vocab_size=s["vocab_size"], max_seq_len=s["seq"])
    torch.manual_seed(0)
    with torch.device(args.device):  # made where it runs: a 7B model's random init takes minutes on a CPU
        model = Transformer(margs).to(dtype)
    if fmt:
        FORMATS[fmt](model)
    torch.manual_seed(1)
    inject_moelora(model, MoELoRAConfig())
    mark_only_moelora_as_trainable(model)
    model.grad_checkpointing = args.grad_checkpointing
    return model.train(), dtype


def make_train_step(model, dtype, args):
    """One step as train.py takes it: forward under autocast, + auxiliary losses, (scaled) backward, AdamW."""
    s = SHAPES[args.shape]
    g = torch.Generator(args.device).manual_seed(2)
    tokens = torch.randint(3, s["vocab_size"], (s["batch"], s["seq"]), device=args.device, generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device_type = args.device.split(":")[0]
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    ctx = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext

    def forward():
        with ctx():
            _, loss = model(tokens, targets)
            return loss + sum(moelora_aux_losses(model).values())

    def step():
        scaler.scale(forward()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, forward


def child_memory(args):
    """One contender alone, two steps: a JSON line with the peak above the built model (CUDA: allocated; CPU: the
    resident set, Linux's VmHWM) and, on CUDA, the total peak allocated, the model included."""
    model, dtype = build_contender(args.child, args)
    step, _ = make_train_step(model, dtype, args)
    out = {"model_gib": stored_bytes(model) / 2**30, **peak_memory_of(step, args.device)}
    print(json.dumps(out))


def memory_of(name):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", name], capture_output=True,
                       text=True)
    if r.returncode != 0:
        print(f"memory of {name}: the subprocess failed:\n{r.stderr[-2000:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def alternate(steps, rounds, warmup, sync):
    """{name: [(wall s, CPU s of this process) of each timed round]}: every contender once per round, who goes first
    rotating, so that a slow moment of the machine hits them all alike."""
    names, times = list(steps), {name: [] for name in steps}
    for round_ in range(warmup + rounds):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:
            t = timed(lambda: (steps[name](), sync()))
            if round_ >= warmup:
                times[name].append(t)
    return times


def part_speed(args):
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    s = SHAPES[args.shape]
    names = list(contenders(args))
    models = {name: build_contender(name, args) for name in names}
    steps = {name: make_train_step(m, dtype, args) for name, (m, dtype) in models.items()}
    # what autograd keeps for the backward after one forward, the weights excluded: a quantised base must keep no more
    saved = {name: saved_for_backward_bytes(models[name][0], lambda m, t, f=f: f(), None) / 2**20
             for name, (_, f) in steps.items()} if not args.grad_checkpointing else {}
    steps = {name: step for name, (step, _) in steps.items()}
    stored = {name: stored_bytes(m) - sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
              for name, (m, _) in models.items()}  # the base alone, without the adapters
    times = alternate(steps, args.rounds, args.warmup, sync)
    del models, steps  # the memory subprocesses below need the GPU to themselves
    memory = {}
    if not args.no_memory:
        if cuda:
            torch.cuda.empty_cache()
        memory = {name: memory_of(name) for name in names}
    layers = args.n_layers or s["n_layers"]
    print(f"\n## one MoELoRA training step, LLaMA dim {s['dim']}, {layers} layers, vocab {s['vocab_size']}, batch "
          f"{s['batch']} x {s['seq']} tokens, random weights, on {args.device}; gradient checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}; medians of {args.rounds} alternating rounds\n")
    cols = ["contender", "base MB", "s/step", "vs its float base"] + ([] if cuda else ["CPU s/step", "vs its float base"])
    cols += ["saved for backward (MiB)"] if saved else []
    cols += ["peak above the model (MiB)"] + (["peak allocated, model included (GiB)"] if cuda else []) if memory else []
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for name in names:
        base = f"{contenders(args)[name][0]} base"
        wall, base_wall = (statistics.median(w for w, _ in times[n]) for n in (name, base))
        row = [name, f"{stored[name] / 1e6:,.1f}", f"{wall:.4f}", f"{wall / base_wall:.3f}x"]
        if not cuda:  # CPU time stays meaningful when another program holds a core (see bench_moelora.py)
            cpu, base_cpu = (statistics.median(c for _, c in times[n]) for n in (name, base))
            row += [f"{cpu:.4f}", f"{cpu / base_cpu:.3f}x"]
        row += [f"{saved[name]:,.1f}"] if saved else []
        if memory:
            m = memory.get(name)
            row += [f"{m['peak_above_mib']:,.0f}"] if m else ["n/a"]
            row += ([f"{m['peak_total_mib'] / 1024:.2f}"] if m else ["n/a"]) if cuda else []
        print("| " + " | ".join(row) + " |")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_memory(args)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print("machine:", machine() + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    needs_stories = {"train"} & set(args.parts)
    if needs_stories and not STORIES.exists():
        raise SystemExit(f"error: {STORIES} not found: put the project's shared/ folder beside it or set MOELORA_SHARED")
    for part in args.parts:
        start = time.perf_counter()
        globals()[f"part_{part}"](args)
        print(f"({part}: {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
