"""
Each process's memory when train.py runs on 2 CPU processes: data parallel (DDP: every process holds the whole base)
against `--fsdp` (FSDP2, fsdp.py: each process holds its shard of the base). benchmarks/README.md, "Sharding the base
over processes".

    python benchmarks/bench_fsdp_memory.py        # TinyLlama-1.1B's shape, --modes ddp,fsdp: ~2 min (+15 s to write it)
    python benchmarks/bench_fsdp_memory.py --modes ddp --nproc 2 --work_dir /scratch/bench

The checkpoint is written once into --work_dir by bench_cpu_memory.py's writer (Hugging Face's layout, random
weights, the LLaMA-2 tokenizer from $MOELORA_SHARED), here with n_kv_heads key and value heads, and reused. Each mode
is one `torchrun --standalone --nproc_per_node N` of this script as a worker, each process running

    train.main(["--model", DIR, "--device", "cpu", "--dtype", "fp32", "--max_steps", "1", "--batch_size", "2",
                "--micro_batch_size", "1", ..., "--fsdp" in the fsdp mode])

with OMP_NUM_THREADS=1, over gloo. Each process is marked after each phase (train.load_model: start-up, the base
loaded and its adapters injected; the first forward and backward; the optimizer step; the save; grading's answer loss
and generation; the end) as bench_cpu_memory.py marks them: the exact peak resident set of each phase (VmHWM, reset
at each mark). A thread that reads /proc/self/status every --sample_ms keeps the most anonymous memory (tensors, the
allocator's heap) and the most file-backed pages (mapped checkpoint files, the libraries) of any sample. File-backed
pages of one file are one copy in the page cache, counted in the resident set of every process that maps them.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_cpu_memory
from bench_cpu_memory import DTYPES, Meter, build_checkpoint, gb, proc_status
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
    """The most anonymous and file-backed bytes of any sample, from a thread that reads /proc/self/status every period
    seconds (Meter's thread keeps those of each phase's highest sample only)."""

    def __init__(self, period: float):
        self.period, self.anon, self.file = period, 0, 0
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while True:
            s = proc_status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(self.period)


def run_worker(train_argv: list):
    """train.main(train_argv) with a mark after each phase (bench_cpu_memory.Meter: the exact peak resident set of
    each); this process's phases and peaks written to $BENCH_FSDP_RESULTS/rank<RANK>.json."""
    import evaluate
    import train
    period = float(os.environ["BENCH_FSDP_SAMPLE_MS"]) / 1000
    meter, peaks, t0, seen = Meter(period), Peaks(period), time.time(), set()

    def mark_after(owner, name, phase):
        original = getattr(owner, name)

        def marked(*a, **kw):
            out = original(*a, **kw)
            if phase not in seen:
                seen.add(phase)
                meter.mark(phase)
            return out
        setattr(owner, name, marked)  # the callers look it up there when they call it
    mark_after(train, "load_model", "load")  # start-up, then the base loaded (sharded under --fsdp), adapters injected
    mark_after(train, "forward_backward", "forward, backward")
    mark_after(train, "optimizer_step", "step")
    mark_after(train, "save_checkpoint", "save")
    mark_after(evaluate, "answer_loss", "answer loss")
    mark_after(evaluate, "generate_responses", "generation")
    train.main(train_argv)
    meter.mark("end")
    out = Path(os.environ["BENCH_FSDP_RESULTS"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps({"phases": meter.phases, "peak_anon": peaks.anon, "peak_file": peaks.file,
                               "t0": t0, "t1": time.time()}))


# -----------------------------------------------------------------------------------------------------
# the modes, each one torchrun, and the table

def run_mode(args, ckpt: Path, mode: str) -> dict:
    """One torchrun of this script as --worker: {"ranks": {rank: its phases and peaks}, "wall_s": torchrun's}."""
    run_dir = Path(args.work_dir) / f"run_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the last run of this mode: ours, in --work_dir
    results = run_dir / "results"
    results.mkdir(parents=True)
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
    print("| mode | rank | peak RSS to loaded | RSS after loading | peak RSS | in phase | peak anon | "
          "peak file-backed | train.main s | torchrun s |")
    print("| --- | ---: |" + " ---: |" * 3 + " --- |" + " ---: |" * 4)
    for mode, r in results.items():
        for rank, m in r["ranks"].items():
            load, top = m["phases"][0], max(m["phases"], key=lambda p: p["peak"])
            print(f"| {mode} | {rank} | {gb(load['peak'])} | {gb(load['end'])} | {gb(top['peak'])} | {top['phase']} | "
                  f"{gb(m['peak_anon'])} | {gb(m['peak_file'])} | {m['t1'] - m['t0']:.0f} | {r['wall_s']:.0f} |")
    print("\n(GB = 1e9 bytes. Peak RSS: VmHWM. Peak anon, peak file-backed: the largest RssAnon and RssFile sampled, "
          "not necessarily at the same moment.)")
    columns = [(mode, rank, m) for mode, r in results.items() for rank, m in r["ranks"].items()]
    print("\n## peak RSS in each phase, GB (since the previous mark)\n")
    print("| phase | " + " | ".join(f"{mode} rank {rank}" for mode, rank, _ in columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for phase in [p["phase"] for p in columns[0][2]["phases"]]:
        cells = [next((gb(p["peak"]) for p in m["phases"] if p["phase"] == phase), "-") for _, _, m in columns]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    if {"ddp", "fsdp"} <= results.keys():
        print()
        for rank, f in results["fsdp"]["ranks"].items():
            d = results["ddp"]["ranks"].get(rank)
            if d:
                peak = max(p["peak"] for p in f["phases"]) / max(p["peak"] for p in d["phases"])
                print(f"rank {rank}, fsdp / ddp: peak RSS {peak:.2f}, peak anon {f['peak_anon'] / d['peak_anon']:.2f}, "
                      f"RSS after loading {f['phases'][0]['end'] / d['phases'][0]['end']:.2f}")


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
        peak = max(p["peak"] for m in results[mode]["ranks"].values() for p in m["phases"])
        print(f"{mode}: {args.nproc} processes, highest peak RSS {gb(peak)} GB, {results[mode]['wall_s']:.0f} s",
              flush=True)
    print_table(args, results, ckpt_bytes)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        run_worker(sys.argv[sys.argv.index("--") + 1:])
    else:
        main(parse_args())
