"""
Each process's memory when train.py runs on 2 CPU processes: data parallel (DDP: every process holds the whole base)
against `--fsdp` (FSDP2: each process holds its shard of the base). benchmarks/README.md, "Sharding the base over
processes".

    python benchmarks/bench_fsdp_memory.py                 # TinyLlama-1.1B's shape, --modes ddp,fsdp: a few minutes
    python benchmarks/bench_fsdp_memory.py --modes ddp --nproc 2 --work_dir /scratch/bench

The checkpoint is written once by bench_cpu_memory.py's writer (Hugging Face's layout, random weights, the LLaMA-2
tokenizer from $MOELORA_SHARED), here with n_kv_heads key and value heads, and reused. Each mode is one
`torchrun --standalone --nproc_per_node N` of this script as a worker, each process running

    train.main(["--model", DIR, "--device", "cpu", "--dtype", "fp32", "--max_steps", "1", "--batch_size", "2",
                "--micro_batch_size", "1", ..., "--fsdp" in the fsdp mode])

with OMP_NUM_THREADS=1, over gloo. Each process reports, after train.load_model (the base loaded, its adapters
injected) and at the end of train.main: the peak resident set so far (the kernel's VmHWM, exact) and, from a thread
that reads /proc/self/status every --sample_ms, the most anonymous memory (tensors, the allocator's heap) and the most
file-backed pages (the checkpoint's memory-mapped pages, the libraries) seen. File-backed pages of the same file are
one copy in the page cache, counted in the resident set of every process that maps them.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_cpu_memory
from bench_cpu_memory import DTYPES, build_checkpoint, gb, proc_status
from bench_moelora import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project root: train.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--dim", type=int, default=2048)
    a("--n_layers", type=int, default=22)
    a("--n_heads", type=int, default=32)
    a("--n_kv_heads", type=int, default=4)
    a("--hidden_dim", type=int, default=5632)
    a("--vocab_size", type=int, default=32000, help="the LLaMA-2 tokenizer's 32000 (no less)")
    a("--shards", type=int, default=2, help="safetensors files of the checkpoint (default %(default)s)")
    a("--ckpt_dtype", default="bf16", choices=list(DTYPES), help="the checkpoint's stored dtype (default %(default)s)")
    a("--dtype", default="fp32", choices=list(DTYPES), help="train.py --dtype (default %(default)s)")
    a("--modes", default="ddp,fsdp", help="ddp and/or fsdp, comma-separated (default %(default)s)")
    a("--nproc", type=int, default=2, help="processes per mode (default %(default)s)")
    a("--max_seq_len", type=int, default=64)
    a("--work_dir", default=os.path.join(tempfile.gettempdir(), "moelora_bench_fsdp_memory"),
      help="the checkpoint and the runs' out_dirs (default %(default)s)")
    a("--sample_ms", type=float, default=5.0, help="how often the thread reads /proc/self/status")
    return p.parse_args(argv)


HF_SHAPES = bench_cpu_memory.hf_shapes  # the writer's tensors, key and value projections n_heads heads wide


def hf_shapes_gqa(args) -> list:
    """bench_cpu_memory.hf_shapes with k_proj and v_proj n_kv_heads heads wide."""
    kv_rows = args.n_kv_heads * (args.dim // args.n_heads)
    return [(name, (kv_rows, args.dim) if name.endswith(("k_proj.weight", "v_proj.weight")) else shape)
            for name, shape in HF_SHAPES(args)]


def write_checkpoint(args) -> Path:
    """The checkpoint's folder under --work_dir, written by bench_cpu_memory.build_checkpoint unless it is there."""
    args.ckpt_dir = str(Path(args.work_dir) / (f"llama_d{args.dim}_l{args.n_layers}_h{args.hidden_dim}_"
                                               f"kv{args.n_kv_heads}of{args.n_heads}_v{args.vocab_size}_"
                                               f"{args.ckpt_dtype}_{args.shards}shards"))
    bench_cpu_memory.hf_shapes = hf_shapes_gqa  # build_checkpoint takes its list of tensors from there
    try:
        path = build_checkpoint(args)
    finally:
        bench_cpu_memory.hf_shapes = HF_SHAPES
    config_file = path / "config.json"  # the writer's config gives n_heads key and value heads: set them
    config = json.loads(config_file.read_text())
    if config["num_key_value_heads"] != args.n_kv_heads:
        config["num_key_value_heads"] = args.n_kv_heads
        config_file.write_text(json.dumps(config, indent=2))
    return path


# -----------------------------------------------------------------------------------------------------
# a worker: one process of torchrun, train.main in it

class Peaks:
    """The most anonymous and file-backed bytes seen by a thread that reads /proc/self/status every period seconds."""

    def __init__(self, period: float):
        self.period, self.anon, self.file, self.lock = period, 0, 0, threading.Lock()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while True:
            self.read()
            time.sleep(self.period)

    def read(self) -> dict:
        s = proc_status()
        with self.lock:
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            return {"peak": s["VmHWM"], "rss": s["VmRSS"], "anon": s["RssAnon"], "peak_anon": self.anon,
                    "peak_file": self.file, "t": time.time()}


def run_worker(train_argv: list):
    """train.main(train_argv), read after train.load_model and at the end; written to $BENCH_FSDP_RESULTS/rankR.json."""
    import train
    peaks, t0, marks = Peaks(float(os.environ["BENCH_FSDP_SAMPLE_MS"]) / 1000), time.time(), {}
    load_model = train.load_model

    def load_model_marked(*a, **kw):
        out = load_model(*a, **kw)
        marks["loaded"] = peaks.read()
        return out
    train.load_model = load_model_marked  # main looks it up when it calls it
    train.main(train_argv)
    marks["end"] = peaks.read()
    out = Path(os.environ["BENCH_FSDP_RESULTS"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"t0": t0, **marks}))


# -----------------------------------------------------------------------------------------------------
# the modes, each one torchrun, and the table

def run_mode(args, ckpt: Path, mode: str) -> dict:
    """{rank: its marks} of one torchrun of this script as --worker; wall_s: torchrun's."""
    run_dir = Path(args.work_dir) / f"run_{mode}"
    results = run_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    for f in results.glob("rank*.json"):
        f.unlink()
    train_argv = ["--model", str(ckpt), "--device", "cpu", "--dtype", args.dtype, "--max_steps", "1",
                  "--batch_size", str(args.nproc), "--micro_batch_size", "1", "--max_seq_len", str(args.max_seq_len),
                  "--eval_limit", "2", "--max_new_tokens", "2", "--out_dir", str(run_dir / "out"), "--overwrite"]
    train_argv += ["--fsdp"] * (mode == "fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_FSDP_RESULTS": str(results),
           "BENCH_FSDP_SAMPLE_MS": str(args.sample_ms)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker", "--", *train_argv]
    log = run_dir / "torchrun.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    found = {int(f.stem.removeprefix("rank")): json.loads(f.read_text()) for f in results.glob("rank*.json")}
    if proc.returncode or len(found) != args.nproc:
        sys.exit(f"{mode}: torchrun failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    return {"ranks": dict(sorted(found.items())), "wall_s": wall}


def print_table(args, results: dict, ckpt_bytes: int):
    base = sum(math.prod(shape) for _, shape in hf_shapes_gqa(args)) * DTYPES[args.dtype].itemsize
    print(f"\nthe base in {args.dtype}: {gb(base)} GB; the checkpoint's files ({args.ckpt_dtype}): "
          f"{gb(ckpt_bytes)} GB\n")
    print("| mode | rank | peak RSS to loaded | RSS after loading | peak RSS | peak anon | peak file-backed | "
          "train.main s | torchrun s |")
    print("| --- | ---: |" + " ---: |" * 7)
    for mode, r in results.items():
        for rank, m in r["ranks"].items():
            loaded, end = m["loaded"], m["end"]
            print(f"| {mode} | {rank} | {gb(loaded['peak'])} | {gb(loaded['rss'])} | {gb(end['peak'])} | "
                  f"{gb(end['peak_anon'])} | {gb(end['peak_file'])} | {end['t'] - m['t0']:.0f} | {r['wall_s']:.0f} |")
    print("\n(GB = 1e9 bytes. Peak RSS: VmHWM. Peak anon, peak file-backed: the largest RssAnon and RssFile sampled, "
          "not necessarily at the same moment.)")
    if {"ddp", "fsdp"} <= results.keys():
        for rank in results["fsdp"]["ranks"]:
            d, f = results["ddp"]["ranks"].get(rank), results["fsdp"]["ranks"][rank]
            if d:
                print(f"rank {rank}, fsdp / ddp: peak RSS {f['end']['peak'] / d['end']['peak']:.2f}, peak anon "
                      f"{f['end']['peak_anon'] / d['end']['peak_anon']:.2f}, RSS after loading "
                      f"{f['loaded']['rss'] / d['loaded']['rss']:.2f}")


def main(args):
    print(f"machine: {machine()}")
    t0 = time.time()
    ckpt = write_checkpoint(args)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {ckpt} ({gb(ckpt_bytes)} GB, {args.ckpt_dtype}; {time.time() - t0:.0f} s to build or find)",
          flush=True)
    results = {}
    for mode in args.modes.split(","):
        if mode not in ("ddp", "fsdp"):
            sys.exit(f"error: --modes: {mode!r} is neither ddp nor fsdp")
        results[mode] = run_mode(args, ckpt, mode)
        peak = max(m["end"]["peak"] for m in results[mode]["ranks"].values())
        print(f"{mode}: {args.nproc} processes, highest peak RSS {gb(peak)} GB, {results[mode]['wall_s']:.0f} s",
              flush=True)
    print_table(args, results, ckpt_bytes)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        run_worker(sys.argv[sys.argv.index("--") + 1:])
    else:
        main(parse_args())
