"""
This project against transformers + PEFT: the same LLaMA, the same work, measured in one process.

    python benchmarks/bench_vs_hf.py                          # CPU, float32: 8 layers x dim 512, vocab 32000, batch 4 x 256
    python benchmarks/bench_vs_hf.py --rounds 3 --parts train --no_memory        # a quicker look
    python benchmarks/bench_vs_hf.py --profile                # also: where one training step of each contender spends its time
    python benchmarks/bench_vs_hf.py --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --methods lora,moelora --parts train,generate --no_memory   # a real model: SmolLM2-135M, read by both
    python benchmarks/bench_vs_hf.py --device cuda --dtype bf16 --shape 7b --methods lora,moelora,moelora-cl0 [--compile] [--grad_checkpointing]
                                                   # (benchmarks/README.md "On a GPU": an H200's figures)

Both models are built with the same random weights: transformers' LlamaForCausalLM(LlamaConfig(...)) is
saved with save_pretrained and loaded by checkpoints.from_pretrained (nothing is downloaded). With --model, both
read the same real checkpoint instead (a GGUF file: transformers dequantises it with the gguf package). Contenders
run in turn, round after round in one process (who goes first rotates), so that a slow moment of the
machine hits them all alike; tables show medians. Three parts:

  train     one step = forward + loss + backward + AdamW step, batch x seq tokens, every target a real token
              full      every weight trained: ours | transformers
              lora      rank R on wq/wv: ours = moelora.py with 1 expert, top-1 | PEFT LoraConfig on q_proj/v_proj
              moelora   ours, 8 experts x rank 4, top-2, contrastive + balance losses; moelora-cl0 without the contrastive
  generate  batched greedy generation with a KV cache: ours Transformer.generate | transformers' generate (left
            padding, do_sample=False, use_cache=True, eos_token_id=None so that neither stops early)
  eval      teacher-forced loss on GSM8K-length prompts (random ids, 150-200 tokens, right-padded, batch 16),
            under inference mode: what train.py's answer-loss evaluation does

Memory of a training step (--no_memory skips it): each contender again, alone in a fresh subprocess, so that
no other model and no allocator cache of an earlier contender is counted. On CPU it is the peak resident set
(Linux VmHWM, reset just before training) above the resident set of the built model: gradients, optimizer
state, activations and temporaries, as the operating system sees them. On CUDA: torch.cuda.max_memory_allocated
above memory_allocated before training, and the total. Beside it, an exact count on one forward: the bytes of
the tensors autograd saves for backward (distinct storages, parameters excluded), via saved_tensors_hooks.

Model FLOPs (for tokens/s -> TFLOP/s and MFU), N = weights of the matrix multiplies (lm_head included, the
embedding lookup not), L layers, T sequence length, d width, per trained token:
    full fine-tuning         6 N + 12 L T d     (forward 2N, backward 4N: input and weight gradients)
    LoRA / MoELoRA           4 N + 12 L T d     (the frozen weights need only the input gradient; adapters < 1%)
12 L T d is attention's scores and weighted sum, forward and backward, causal masking not discounted (PaLM's
convention). Recomputation under gradient checkpointing is not counted: these are model FLOPs, not hardware FLOPs.
"""

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: model.py, moelora.py
from bench_moelora import machine, make_step, timed
from data.prompts import IGNORE_INDEX
from checkpoints import from_pretrained
from model import ModelArgs, Transformer, ffn_hidden_dim
from moelora import MoELoRAConfig, inject_moelora, mark_only_moelora_as_trainable

SHAPES = {  # model and training batch; the 7b shape is LLaMA-7B's
    "small": dict(dim=512, n_layers=8, n_heads=8, batch=4, seq=256),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, batch=4, seq=512),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, batch=2, seq=32),  # to try the script out in seconds
}
METHODS = ("full", "lora", "moelora", "moelora-cl0")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks, by GPU name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--device", default="cpu")
    a("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype the models are stored in (adapters stay float32)")
    a("--shape", default="small", choices=list(SHAPES))
    a("--model", default=None, help="a real checkpoint (GGUF file or HF directory) instead of random weights of --shape")
    a("--n_layers", type=int, default=None, help="layers (default: the shape's): fewer layers of a real width, to measure it quickly")
    a("--vocab", type=int, default=32000)
    a("--batch", type=int, default=None, help="training batch (default: the shape's)")
    a("--seq", type=int, default=None, help="training sequence length (default: the shape's)")
    a("--r", type=int, default=32, help="LoRA rank R (lora_alpha = 2R); 32 = the parameters of 8 experts x rank 4")
    a("--parts", default="train,generate,eval")
    a("--methods", default=",".join(METHODS), help="training contenders, among " + ", ".join(METHODS))
    a("--rounds", type=int, default=7)
    a("--warmup", type=int, default=None, help="rounds run first and not counted (default 1, 3 with --compile)")
    a("--gen_batch", type=int, default=8)
    a("--max_new_tokens", type=int, default=64)
    a("--eval_batch", type=int, default=16)
    a("--prompt_len", default="150,200", help="prompt lengths for generate and eval: uniform in [lo, hi]")
    a("--compile", action="store_true", help="torch.compile the training and eval models (generation stays eager)")
    a("--grad_checkpointing", action="store_true", help="recompute each block in backward, both implementations")
    a("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a("--no_memory", action="store_true", help="skip the per-contender memory subprocesses")
    a("--profile", action="store_true", help="print torch.profiler's top operators for one step of each training contender")
    a("--peak_tflops", type=float, default=None, help="the device's peak for MFU (default: known GPUs by name)")
    a("--child", default=None, help=argparse.SUPPRESS)  # internal: measure one contender's memory and print JSON
    args = p.parse_args(argv)
    if args.model and not args.no_memory and not args.child:  # the memory subprocesses build --shape's random model
        p.error("--model measures speed only: add --no_memory")
    shape = SHAPES[args.shape]
    args.batch, args.seq = args.batch or shape["batch"], args.seq or shape["seq"]
    args.parts, args.methods = args.parts.split(","), args.methods.split(",")
    args.prompt_lo, args.prompt_hi = map(int, args.prompt_len.split(","))
    if args.warmup is None:  # compiling takes more than one round: models that share code recompile in round 2
        args.warmup = 3 if args.compile else 1
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return args


# -----------------------------------------------------------------------------------------------------
# the two models, the same weights

def model_args(args) -> ModelArgs:
    s = SHAPES[args.shape]
    max_len = max(args.seq, args.prompt_hi + args.max_new_tokens)
    return ModelArgs(dim=s["dim"], n_layers=args.n_layers or s["n_layers"], n_heads=s["n_heads"], vocab_size=args.vocab, max_seq_len=max_len)


def hf_config(margs: ModelArgs):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=margs.vocab_size, hidden_size=margs.dim, intermediate_size=ffn_hidden_dim(margs),
        num_hidden_layers=margs.n_layers, num_attention_heads=margs.n_heads, num_key_value_heads=margs.n_heads,
        max_position_embeddings=margs.max_seq_len, rms_norm_eps=margs.norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": margs.rope_theta}, attn_implementation="sdpa")


def build_pair(args):
    """(ours, hf): the same random weights in both, or the same --model, on args.device in args.dtype, eval mode."""
    import transformers
    if args.model:
        path = Path(args.model)
        gguf = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent if gguf else path, dtype=args.torch_dtype, **gguf)
        ours = from_pretrained(path, dtype=args.torch_dtype, device=args.device)
        return ours, hf.to(args.device).eval()
    margs = model_args(args)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: a 7B model's random init takes minutes on a CPU
        hf = transformers.LlamaForCausalLM(hf_config(margs)).to(args.torch_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_pretrained(tmp, device=args.device)
    return ours, hf.to(args.device).eval()


def sharing_base(model):
    # a copy of the module tree that shares every parameter with `model`: adapters need only their own
    # modules around the frozen base, and a 7B base held once instead of once per contender
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def our_lora_config(args, method):
    if method == "lora":  # one expert: plain LoRA (moelora.py gives it no router and no auxiliary losses)
        return MoELoRAConfig(num_experts=1, top_k=1, r=args.r, lora_alpha=2 * args.r, target_modules=("wq", "wv"))
    return MoELoRAConfig(num_experts=8, top_k=2, r=4, lora_alpha=8, target_modules=("wq", "wv"),
                         contrastive_weight=0.0 if method == "moelora-cl0" else 0.1)


def contender_names(methods):
    names = {"full": ["full, ours", "full, transformers"], "lora": ["lora, ours", "lora, PEFT"],
             "moelora": ["moelora, ours"], "moelora-cl0": ["moelora-cl0, ours"]}
    for m in methods:
        if m not in names:
            raise ValueError(f"unknown method {m!r}; choose among {', '.join(METHODS)}")
    return [name for m in methods for name in names[m]]


def make_contender(name, args, ours, hf):
    """-> (model in train mode, loss function, add MoELoRA's aux losses?). Full fine-tuning gets its own
    copy of the weights; the adapters share the frozen base."""
    import peft
    method = name.split(", ")[0]
    if name == "full, ours":
        model, loss_fn = copy.deepcopy(ours).requires_grad_(True), our_loss
    elif name == "full, transformers":
        model, loss_fn = copy.deepcopy(hf).requires_grad_(True), hf_loss
    elif name == "lora, PEFT":
        cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=MoELoRAConfig().lora_dropout,
                              target_modules=["q_proj", "v_proj"])
        model, loss_fn = peft.get_peft_model(sharing_base(hf), cfg), hf_loss
    else:  # lora, moelora, moelora-cl0: ours
        model = inject_moelora(sharing_base(ours), our_lora_config(args, method))
        model, loss_fn = mark_only_moelora_as_trainable(model), our_loss
    model.train()
    set_grad_checkpointing(model, args.grad_checkpointing)
    return (torch.compile(model) if args.compile else model), loss_fn, method.startswith("moelora")


def set_grad_checkpointing(model, on):
    if not on:
        return
    if isinstance(model, Transformer):
        model.grad_checkpointing = True
    else:  # transformers / PEFT; non-reentrant as ours, which also needs no enable_input_require_grads for LoRA
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# the same loss in both: mean cross-entropy of each next token, batch x (seq - 1) predictions, logits for all seq

def our_loss(model, tokens):
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE_INDEX)], dim=1)
    return model(tokens, targets)[1]


def hf_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens, use_cache=False).loss  # transformers shifts the labels itself


# -----------------------------------------------------------------------------------------------------
# timing: alternate the contenders, quote medians

def alternate(fns, rounds, warmup, sync):
    """{name: [(wall s, CPU s of this process), ...]} over `rounds` rounds, after `warmup` uncounted ones."""
    names, times = list(fns), {name: [] for name in fns}
    for round_ in range(warmup + rounds):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:  # rotate who goes first
            t = timed(lambda: (fns[name](), sync()))
            if round_ >= warmup:
                times[name].append(t)
    return times


def median_wall(t):
    return statistics.median(w for w, _ in t)


def median_cpu(t):
    return statistics.median(c for _, c in t)


def model_flops_per_token(margs: ModelArgs, seq: int, full: bool) -> float:
    d, L, hidden = margs.dim, margs.n_layers, ffn_hidden_dim(margs)
    kv = (margs.n_kv_heads or margs.n_heads) * (d // margs.n_heads)
    N = L * (2 * d * d + 2 * d * kv + 3 * d * hidden) + margs.vocab_size * d  # matmul weights, lm_head included
    return (6 if full else 4) * N + 12 * L * seq * d


# -----------------------------------------------------------------------------------------------------
# memory: one contender alone in a subprocess

def rss_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_memory_of(step, device: str, calls: int = 2) -> dict:
    """Peak memory while `step` runs `calls` times, above what was in use before (MiB): the GPU allocator's, or on
    the CPU the resident set's; on a GPU also the total."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what building the model left in the allocator's cache is not the step's
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_above_mib": (peak - before) / 2**20, "peak_total_mib": peak / 2**20}
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM (the peak resident set) to the current resident set
    for _ in range(calls):
        step()
    return {"peak_above_mib": (rss_kib("VmHWM") - before) / 1024}


def saved_for_backward_bytes(model, loss_fn, tokens):
    """Bytes autograd holds for backward after one forward: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, tokens)
    del loss
    return sum(seen.values())


def child_memory(args):
    """Build one contender from random weights, train 2 steps, print a JSON line of what training added."""
    import transformers
    margs = model_args(args)
    torch.manual_seed(0)
    with torch.device(args.device):
        ours = args.child.endswith(", ours")
        model = (Transformer(margs) if ours else transformers.LlamaForCausalLM(hf_config(margs))).to(args.torch_dtype)
    model, loss_fn, aux = make_contender(args.child, args, model, model)
    tokens = torch.randint(3, margs.vocab_size, (args.batch, args.seq), device=args.device)
    step = make_step(model, lambda: loss_fn(model, tokens), aux)
    out = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), **peak_memory_of(step, args.device)}
    if not (args.compile or args.grad_checkpointing):  # the hooks see through neither
        out["saved_mib"] = saved_for_backward_bytes(model, loss_fn, tokens) / 2**20
    print(json.dumps(out))


def measure_memory(name):
    argv = [a for a in sys.argv[1:] if a != "--profile"]
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", name], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"memory of {name}: the subprocess failed:\n{r.stderr[-2000:]}")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------------------------------
# the parts

def random_prompts(args, n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(args.prompt_lo, args.prompt_hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (n_,), generator=g).tolist() for n_ in lengths]  # ids 0-2: pad, bos, eos


def bench_train(args, ours, hf, sync):
    margs = ours.args
    tokens = torch.randint(3, margs.vocab_size, (args.batch, args.seq), device=args.device,
                           generator=torch.Generator(args.device).manual_seed(1))
    contenders = {name: make_contender(name, args, ours, hf) for name in contender_names(args.methods)}
    steps = {name: make_step(m, lambda m=m, loss_fn=loss_fn: loss_fn(m, tokens), aux)
             for name, (m, loss_fn, aux) in contenders.items()}
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, (m, _, _) in contenders.items()}
    times = alternate(steps, args.rounds, args.warmup, sync)
    if args.profile:
        profile_steps(steps)
    del contenders, steps
    memory = {}
    if not args.no_memory:
        for name in times:
            memory[name] = measure_memory(name)
    return times, trainable, memory


def profile_steps(steps):
    from torch.profiler import ProfilerActivity, profile
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\nprofile of one training step, {name}: top operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def bench_generate(args, ours, hf, sync):
    prompts = random_prompts(args, args.gen_batch, ours.args.vocab_size, seed=2)
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)  # left padding with id 0, as transformers expects
    attention_mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], attention_mask[b, P - len(p):] = torch.tensor(p), 1
    ids, attention_mask = ids.to(args.device), attention_mask.to(args.device)
    outputs = {}

    def run_ours():
        outputs["ours"] = ours.generate(prompts, args.max_new_tokens, eos_id=None, pad_id=0)

    def run_hf():
        out = hf.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=args.max_new_tokens,
                          do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        outputs["transformers"] = out[:, P:].tolist()
    times = alternate({"ours (Transformer.generate)": run_ours, "transformers (generate)": run_hf}, args.rounds, args.warmup, sync)
    same = sum(a == b for a, b in zip(outputs["ours"], outputs["transformers"]))
    return times, same, len(prompts)


def bench_eval(args, ours, hf, sync):
    prompts = random_prompts(args, args.eval_batch, ours.args.vocab_size, seed=3)
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)  # right padding: causal attention keeps it out of the real tokens
    labels = torch.full((len(prompts), T), IGNORE_INDEX, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = labels[b, :len(p)] = torch.tensor(p)
    ids, labels = ids.to(args.device), labels.to(args.device)
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    ours_m, hf_m = (torch.compile(ours), torch.compile(hf)) if args.compile else (ours, hf)
    losses = {}

    @torch.inference_mode()
    def run_ours():
        losses["ours"] = ours_m(ids, targets)[1].item()

    @torch.inference_mode()
    def run_hf():
        losses["transformers"] = hf_m(input_ids=ids, labels=labels, use_cache=False).loss.item()
    times = alternate({"ours": run_ours, "transformers": run_hf}, args.rounds, args.warmup, sync)
    return times, sum(len(p) for p in prompts), losses


# -----------------------------------------------------------------------------------------------------

def print_throughput(times, reference, n_tokens, unit, fmt):
    """A table of s/batch, tokens/s and speed relative to the `reference` contender."""
    print(f"| contender | s/batch | {unit} | vs transformers |\n| --- | --- | --- | --- |")
    ref_wall = median_wall(times[reference])
    for name, t in times.items():
        wall = median_wall(t)
        print(f"| {name} | {wall:.3f} | {fmt.format(n_tokens / wall)} | {ref_wall / wall:.2f}x as fast |")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_memory(args)
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.compile:
        # the contenders share code (Transformer.forward, MoELoRALinear.forward, ...) but not their guards: every
        # model is compiled again, beyond torch's default of 8 versions of a function before it falls back to eager
        torch._dynamo.config.recompile_limit = 64
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = args.peak_tflops or (next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None) if cuda else None)

    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    print("machine:", machine() + (f", {torch.cuda.get_device_name()}" if cuda else "") + f", transformers {transformers.__version__}, peft {peft.__version__}")
    ours, hf = build_pair(args)
    margs = ours.args
    print(f"model: LLaMA dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads, FFN {ffn_hidden_dim(margs)}, "
          f"vocab {margs.vocab_size}, {args.dtype} on {args.device}; compile {'on' if args.compile else 'off'}, "
          f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'}; medians of {args.rounds} alternating rounds")
    check = torch.randint(3, margs.vocab_size, (2, 32), device=args.device)
    with torch.inference_mode():
        diff = (ours(check)[0] - hf(check).logits.float()).abs().max().item()
    print(f"same weights: max |logit difference| ours vs transformers = {diff:.2e}")

    if "train" in args.parts:
        times, trainable, memory = bench_train(args, ours, hf, sync)
        tokens = args.batch * args.seq
        ref = {"full, ours": "full, transformers", "lora, ours": "lora, PEFT",
               "moelora, ours": "lora, ours", "moelora-cl0, ours": "lora, ours"}
        print(f"\ntraining step (forward + backward + AdamW), batch {args.batch} x {args.seq} tokens:\n")
        cols = ["contender", "trainable params", "s/step", "tokens/s", "vs", "model TFLOP/s"]
        cols += ["MFU"] if peak else []
        cols += ["peak memory above the model (MiB)", "saved for backward (MiB)"] if memory else []
        cols += ["peak allocated (GiB)"] if memory and cuda else []
        print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
        for name, t in times.items():
            wall = median_wall(t)
            flops = model_flops_per_token(margs, args.seq, full=name.startswith("full")) * tokens / wall
            vs = f"{wall / median_wall(times[ref[name]]):.3f}x {ref[name]}" if ref.get(name) in times else ""
            row = [name, f"{trainable[name]:,}", f"{wall:.3f}", f"{tokens / wall:,.0f}", vs, f"{flops / 1e12:.3f}"]
            row += [f"{100 * flops / (peak * 1e12):.1f}%"] if peak else []
            if memory:
                mem = memory.get(name, {})
                row += [f"{mem['peak_above_mib']:,.0f}" if "peak_above_mib" in mem else "n/a",
                        f"{mem['saved_mib']:,.0f}" if "saved_mib" in mem else "n/a"]
                row += [f"{mem['peak_total_mib'] / 1024:.1f}" if "peak_total_mib" in mem else "n/a"] if cuda else []
            print("| " + " | ".join(row) + " |")
        med = {name: median_wall(t) for name, t in times.items()}
        print()
        for label, a, b, target in (("our LoRA / PEFT's LoRA", "lora, ours", "lora, PEFT", 0.90),
                                    ("MoELoRA / our LoRA", "moelora, ours", "lora, ours", 1.10),
                                    ("MoELoRA / MoELoRA without contrastive", "moelora, ours", "moelora-cl0, ours", 1.05)):
            if a in med and b in med:
                ratio, cpu_ratio = med[a] / med[b], median_cpu(times[a]) / median_cpu(times[b])
                print(f"{label} = {ratio:.3f} wall, {cpu_ratio:.3f} CPU time (target <= {target:.2f}: "
                      f"{'met' if ratio <= target else 'MISSED'})")

    if "generate" in args.parts:
        times, same, n = bench_generate(args, ours, hf, sync)
        new = args.gen_batch * args.max_new_tokens
        print(f"\ngreedy generation, {args.gen_batch} prompts of {args.prompt_lo}-{args.prompt_hi} tokens (left-padded), "
              f"{args.max_new_tokens} new tokens each; the same tokens in {same}/{n} sequences:\n")
        print_throughput(times, "transformers (generate)", new, "new tokens/s", "{:,.1f}")

    if "eval" in args.parts:
        times, n_tokens, losses = bench_eval(args, ours, hf, sync)
        print(f"\nevaluation: loss on {args.eval_batch} prompts of {args.prompt_lo}-{args.prompt_hi} tokens ({n_tokens:,} tokens, "
              f"right-padded), inference mode; loss ours {losses['ours']:.5f}, transformers {losses['transformers']:.5f}:\n")
        print_throughput(times, "transformers", n_tokens, "tokens/s", "{:,.0f}")


if __name__ == "__main__":
    main()
