"""
Where a CPU training run's memory goes: train.py run whole on a LLaMA-shaped checkpoint with random weights, its
resident set measured phase by phase (benchmarks/README.md, "CPU bf16 training: where the memory goes").

    python benchmarks/bench_cpu_memory.py                  # a ~1B stand-in for LLaMA-7B, --dtype bf16 and fp32: ~1 min
    python benchmarks/bench_cpu_memory.py --dtypes bf16 --grad_checkpointing both
    python benchmarks/bench_cpu_memory.py --load_only --shards 1         # the loader alone, the checkpoint in one file
    python benchmarks/bench_cpu_memory.py --dim 4096 --n_layers 32 --n_heads 32 --hidden_dim 11008 --dtypes bf16
                                                           # LLaMA-7B's shape: 13.5 GB on disk, ~15 GB of memory

The checkpoint is written once in Hugging Face's layout (config.json, model-0000i-of-0000n.safetensors and their
index, random weights, the LLaMA-2 tokenizer from $MOELORA_SHARED) and reused. Each contender is one run of
`train.py --model DIR --device cpu --dtype D --max_steps 1 --eval_limit 1 --max_new_tokens 2 ...` in a fresh
subprocess, marked between its phases:

  start        imports, data, tokenization: everything before the checkpoint is opened
  load         checkpoints.from_pretrained: the base allocated in the compute dtype and filled from the shards
  inject       the adapters injected and marked trainable
  forward      the first training forward pass (logits and loss)
  backward     its backward pass
  step         clipping and the AdamW step
  save         ckpt.pt and adapter.safetensors
  answer loss  grading: the teacher-forced loss of the reference solution
  generation   grading: greedy generation with the KV cache
  end          the results written

For each phase: the peak resident set inside it, exact (the kernel's VmHWM, reset at every mark through
/proc/self/clear_refs), and its split into anonymous memory (tensors, the allocator's heap) and file-backed pages
(pages of memory-mapped files: they count in the resident set while mapped, and the kernel may drop them, clean,
when memory runs short), from a thread that reads /proc/self/status every --sample_ms. The reset lowers what
getrusage reports too, so the run's peak (/usr/bin/time's "maximum resident set size") is the largest phase peak.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_moelora import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project root: train.py, model.py, checkpoints.py
SHARED = Path(os.environ.get("MOELORA_SHARED", ROOT.parent / "shared"))
TOKENIZER = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PHASES = ("start", "load", "inject", "forward", "backward", "step", "save", "answer loss", "generation", "end")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--dim", type=int, default=2048)
    a("--n_layers", type=int, default=16)
    a("--n_heads", type=int, default=16)
    a("--hidden_dim", type=int, default=5504)
    a("--vocab_size", type=int, default=32000, help="the LLaMA-2 tokenizer's 32000 (no less)")
    a("--shards", type=int, default=2, help="safetensors files the checkpoint is split into, of about equal size "
      "(default %(default)s, as Llama-2-7b-hf; transformers 5's save_pretrained writes 7B as one file)")
    a("--ckpt_dtype", default="bf16", choices=list(DTYPES), help="the checkpoint's stored dtype (default %(default)s)")
    a("--ckpt_dir", default=None, help="where the checkpoint is written, or found (default: a folder of the shape's "
      "name in the temporary directory)")
    a("--dtypes", default="bf16,fp32", help="train.py --dtype of each contender, comma-separated (default %(default)s)")
    a("--grad_checkpointing", default="off", choices=["off", "on", "both"], help="contenders without and/or with "
      "train.py --grad_checkpointing (default %(default)s)")
    a("--max_seq_len", type=int, default=64)
    a("--load_only", action="store_true", help="only checkpoints.from_pretrained in each --dtype: the loader's peak, "
      "in seconds even at LLaMA-7B's shape")
    a("--out_dir", default=os.path.join(tempfile.gettempdir(), "moelora_bench_cpu_memory_run"))
    a("--sample_ms", type=float, default=5.0, help="how often the thread reads /proc/self/status")
    a("--child", default=None, help=argparse.SUPPRESS)  # internal: one contender, its phases printed as JSON
    return p.parse_args(argv)


def gb(n_bytes) -> str:
    return f"{n_bytes / 1e9:.2f}"


# -----------------------------------------------------------------------------------------------------
# the checkpoint: Hugging Face's layout, random weights, written tensor by tensor

def hf_shapes(args) -> list:
    """(HF name, shape) in the order save_pretrained writes them."""
    d, h, V = args.dim, args.hidden_dim, args.vocab_size
    out = [("model.embed_tokens.weight", (V, d))]
    for i in range(args.n_layers):
        pre = f"model.layers.{i}."
        out += [(pre + "self_attn.q_proj.weight", (d, d)), (pre + "self_attn.k_proj.weight", (d, d)),
                (pre + "self_attn.v_proj.weight", (d, d)), (pre + "self_attn.o_proj.weight", (d, d)),
                (pre + "mlp.gate_proj.weight", (h, d)), (pre + "mlp.up_proj.weight", (h, d)),
                (pre + "mlp.down_proj.weight", (d, h)), (pre + "input_layernorm.weight", (d,)),
                (pre + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (V, d))]


def build_checkpoint(args) -> Path:
    """The checkpoint's folder, written unless it is there: --shards files of about equal size, each tensor in the
    file where its first byte falls, in the order save_pretrained writes them. One tensor at a time is drawn."""
    from safetensors.torch import save_file
    name = (f"llama_d{args.dim}_l{args.n_layers}_h{args.hidden_dim}_v{args.vocab_size}_{args.ckpt_dtype}_"
            f"{args.shards}shards")
    path = Path(args.ckpt_dir or Path(tempfile.gettempdir()) / "moelora_bench_cpu_memory" / name)
    if (path / "model.safetensors.index.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    dtype, shapes = DTYPES[args.ckpt_dtype], hf_shapes(args)
    starts = [0]  # each tensor's first byte in the checkpoint as a whole
    for _, shape in shapes:
        starts.append(starts[-1] + torch.Size(shape).numel() * dtype.itemsize)
    files = [f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors" for i in range(args.shards)]
    which = [files[min(args.shards - 1, b * args.shards // starts[-1])] for b in starts[:-1]]
    g, shard = torch.Generator().manual_seed(0), {}
    for j, (name, shape) in enumerate(shapes):
        norm = len(shape) == 1
        shard[name] = torch.ones(shape, dtype=dtype) if norm else (torch.randn(shape, generator=g) * 0.02).to(dtype)
        if j + 1 == len(shapes) or which[j + 1] != which[j]:
            save_file(shard, path / which[j], metadata={"format": "pt"})
            shard = {}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_heads, "vocab_size": args.vocab_size,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    index = {"metadata": {"total_size": starts[-1]}, "weight_map": dict(zip((n for n, _ in shapes), which))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))  # last: marks it complete
    return path


# -----------------------------------------------------------------------------------------------------
# one contender: train.py in this process, with marks between its phases

def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile... of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak():
    # Linux >= 4.0: VmHWM (the peak resident set) starts again from the current resident set
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Meter:
    """Phases of a run: the exact peak resident set of each (VmHWM, reset at every mark) and, from a thread that reads
    /proc/self/status every period seconds, the anonymous and file-backed parts of the highest sample."""

    def __init__(self, period: float):
        self.period, self.phases, self.lock = period, [], threading.Lock()
        self.top, self.max_file = None, 0  # this phase's highest sample; its most file-backed bytes at any sample
        reset_peak()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while True:
            s = proc_status()
            with self.lock:
                if self.top is None or s["VmRSS"] > self.top["VmRSS"]:
                    self.top = s
                self.max_file = max(self.max_file, s["RssFile"])
            time.sleep(self.period)

    def mark(self, phase: str):
        s = proc_status()
        with self.lock:
            top = self.top if self.top is not None and self.top["VmRSS"] >= s["VmRSS"] else s
            self.phases.append({"phase": phase, "peak": s["VmHWM"], "end": s["VmRSS"], "peak_anon": top["RssAnon"],
                                "peak_file": top["RssFile"], "sampled_peak": top["VmRSS"],
                                "max_file": max(self.max_file, s["RssFile"]), "end_anon": s["RssAnon"],
                                "end_file": s["RssFile"], "t": time.time()})
            self.top, self.max_file = None, 0
            reset_peak()


def run_child(spec: dict):
    """Run train.main(spec["argv"]) with a mark after each phase; print the phases as one JSON line."""
    import evaluate
    import runs
    import train
    meter, facts, seen = Meter(spec["sample_ms"] / 1000), {}, set()

    def once(phase):
        if phase not in seen:
            seen.add(phase)
            meter.mark(phase)

    def mark_after(owner, name, phase):
        original = getattr(owner, name)

        def marked(*a, **kw):
            out = original(*a, **kw)
            once(phase)
            return out
        setattr(owner, name, marked)

    from_pretrained = runs.from_pretrained

    def loading(*a, **kw):
        once("start")
        model = from_pretrained(*a, **kw)
        facts["base_bytes"] = sum(t.nbytes for t in model.state_dict().values())
        once("load")
        return model
    runs.from_pretrained = loading  # runs.load_base reads every base through it
    new_model = train.new_model

    def loading_base(*a, **kw):
        model, tok = new_model(*a, **kw)
        once("inject")
        model.register_forward_hook(lambda m, i, o: once("forward") if m.training else None)
        facts["trainable_bytes"] = sum(p.nbytes for p in model.parameters() if p.requires_grad)
        return model, tok
    train.new_model = loading_base  # the base with its fresh adapters
    backward = torch.autograd.backward

    def backward_marked(*a, **kw):
        backward(*a, **kw)
        once("backward")
    torch.autograd.backward = backward_marked  # Tensor.backward calls it
    forward_backward = train.forward_backward

    def tallied(run, args, model, raw_model, *a, **kw):
        # what autograd holds for backward: distinct storages, the parameters' excluded (bench_vs_hf.py's count)
        params, saved = {p.untyped_storage().data_ptr() for p in raw_model.parameters()}, {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward_backward(run, args, model, raw_model, *a, **kw)
        facts["saved_for_backward"] = facts.get("saved_for_backward", 0) + sum(saved.values())
        return out
    train.forward_backward = tallied
    mark_after(train, "optimizer_step", "step")
    mark_after(train, "save_checkpoint", "save")
    mark_after(evaluate, "answer_loss", "answer loss")
    mark_after(evaluate, "generate_responses", "generation")
    t0 = time.time()
    if spec.get("load_only"):
        runs.from_pretrained(spec["load_only"], dtype=DTYPES[spec["dtype"]])
    else:
        train.main(spec["argv"])
    once("end")
    print("RESULT " + json.dumps({"phases": meter.phases, "t0": t0, **facts}), flush=True)


# -----------------------------------------------------------------------------------------------------
# the contenders, each in a fresh subprocess, and the tables

def train_argv(args, ckpt: Path, dtype: str, checkpointing: bool) -> list:
    out_dir = Path(args.out_dir) / f"{dtype}{'_gc' * checkpointing}"
    return (["--model", str(ckpt), "--device", "cpu", "--dtype", dtype, "--max_seq_len", str(args.max_seq_len),
             "--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "2", "--batch_size", "1",
             "--micro_batch_size", "1", "--log_interval", "1", "--out_dir", str(out_dir), "--overwrite"]
            + ["--grad_checkpointing"] * checkpointing)


def run_contender(args, name: str, argv: list, load_only=None, dtype=None) -> dict:
    spec = json.dumps({"argv": argv, "sample_ms": args.sample_ms, "load_only": load_only, "dtype": dtype})
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{name}: train.py failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_s"] = time.time() - t0
    return result


def print_tables(results: dict, ckpt_bytes: int):
    names = list(results)
    print("\n## peak resident set per phase, GB: anonymous + file-backed (at the phase's highest sample)\n")
    print("| phase | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for phase in PHASES:
        cells = []
        for r in results.values():
            p = next((p for p in r["phases"] if p["phase"] == phase), None)
            cells.append("-" if p is None else f"{gb(p['peak'])} ({gb(p['peak_anon'])} + {gb(p['peak_file'])})")
        print(f"| {phase} | " + " | ".join(cells) + " |")
    print("\n## seconds per phase\n")
    print("| contender | " + " | ".join(p["phase"] for p in next(iter(results.values()))["phases"]) + " |")
    print("| --- |" + " ---: |" * len(next(iter(results.values()))["phases"]))
    for name, r in results.items():
        times = [r["t0"]] + [p["t"] for p in r["phases"]]
        print(f"| {name} | " + " | ".join(f"{b - a:.1f}" for a, b in zip(times, times[1:])) + " |")
    print("\n## the run's peak, and what it is made of, GB\n")
    print("| contender | base (parameters) | after loading | run's peak (= /usr/bin/time's) | in phase | "
          "file-backed at the peak | most file-backed in loading | training's rise over after-inject | "
          "saved for backward | wall s |")
    print("| --- |" + " ---: |" * 3 + " --- |" + " ---: |" * 5)
    for name, r in results.items():
        phases = {p["phase"]: p for p in r["phases"]}
        top = max(r["phases"], key=lambda p: p["peak"])
        training = max((phases[k]["peak"] for k in ("forward", "backward", "step") if k in phases), default=None)
        print(f"| {name} | {gb(r['base_bytes'])} | {gb(phases['load']['end'])} | {gb(top['peak'])} | {top['phase']} | "
              f"{gb(top['peak_file'])} | {gb(phases['load']['max_file'])} | "
              f"{gb(training - phases['inject']['end']) if training else '-'} | "
              f"{gb(r['saved_for_backward']) if 'saved_for_backward' in r else '-'} | {r['wall_s']:.0f} |")
    print(f"\nthe checkpoint's safetensors files: {gb(ckpt_bytes)} GB. A file-backed page is a page of a memory-mapped "
          "file: it counts in the resident set while mapped, and the kernel may drop it (it is clean) when memory runs "
          "short.\n\n## attribution: the peak above the resident set after loading\n")
    for name, r in results.items():
        phases = {p["phase"]: p for p in r["phases"]}
        top, loaded = max(r["phases"], key=lambda p: p["peak"]), phases["load"]
        files = max(0, top["peak_file"] - phases["start"]["end_file"])  # above the libraries' pages mapped at start
        anon = max(0, top["peak_anon"] - loaded["end_anon"])
        saved = f", {gb(r['saved_for_backward'])} of it saved for backward" if "saved_for_backward" in r else ""
        print(f"- {name}: {gb(top['peak'])} GB in {top['phase']} = {gb(loaded['end'])} resident after loading "
              f"+ {gb(files)} of file-backed pages above those mapped at start (the checkpoint's, read through its "
              f"mappings) + {gb(anon)} anonymous above that after loading{saved} (the split is of the highest "
              f"sample: {gb(top['sampled_peak'])} GB)")


def main(args):
    print(f"machine: {machine()}")
    t0 = time.time()
    ckpt = build_checkpoint(args)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {ckpt} ({gb(ckpt_bytes)} GB in {args.shards} files, {args.ckpt_dtype}; "
          f"{time.time() - t0:.0f} s to build or find)")
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    results = {}
    for dtype in args.dtypes.split(","):
        for gc in checkpointing[:1] if args.load_only else checkpointing:
            name = f"--dtype {dtype}" + " --grad_checkpointing" * gc
            if args.load_only:
                name = f"load in {dtype}"
                results[name] = run_contender(args, name, [], str(ckpt), dtype)
            else:
                results[name] = run_contender(args, name, train_argv(args, ckpt, dtype, gc))
            print(f"{name}: peak {gb(max(p['peak'] for p in results[name]['phases']))} GB, "
                  f"{results[name]['wall_s']:.0f} s", flush=True)
    print_tables(results, ckpt_bytes)


if __name__ == "__main__":
    args = parse_args()
    if args.child:
        run_child(json.loads(args.child))
    else:
        main(args)
