"""
A training run's plumbing, apart from its loops (train.py): which process this is and how it computes, the
out_dir and its files, checkpoints that resume exactly, and stopping on a signal without losing work.

    Run, setup_distributed, setup_precision, all_reduce_sum     the run's context: rank, device, precision
    prepare_out_dir, move_results_aside                       never replace earlier work unasked
    save_checkpoint, resume_from_checkpoint, load_checkpoint  ckpt.pt: the trainable weights (adapters only,
                                                              or all for --method full), optimizer, scaler,
                                                              every process's RNG state, step, settings, and a
                                                              fingerprint of the base; adapter.safetensors beside it
    catch_stop_signals, stop_requested, stop_non_finite       stop after the step, saved; or stop before harm
"""
import contextlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from moelora import load_moelora_state_dict, moelora_state_dict, save_moelora


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
        move_results_aside(run)
    elif log.exists():  # a run that stopped before its first checkpoint: keep its log aside, start a new one
        os.replace(log, log.with_name("metrics.jsonl.old"))
        run.log(f"moved the metrics.jsonl of an earlier run that saved no checkpoint to {log.with_name('metrics.jsonl.old')}")


RESULT_FILES = ("metrics_*.json", "predictions_*.jsonl", "results_*.json", "results_*.md", "routing_*")


def move_results_aside(run: Run):
    """--overwrite: the earlier run's gradings move to out_dir/earlier_<time>/, so that no result file in out_dir
    can be mistaken for the new run's, and none is lost."""
    earlier = [f for pattern in RESULT_FILES for f in sorted(run.out_dir.glob(pattern)) if f.is_file()]
    if earlier:
        aside = run.out_dir / time.strftime("earlier_%Y%m%d-%H%M%S")
        aside.mkdir(exist_ok=True)
        for f in earlier:
            os.replace(f, aside / f.name)
        run.log(f"--overwrite: moved the earlier run's {len(earlier)} result files to {aside}")


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


ADAPTER_FLAGS = ("num_experts", "top_k", "r", "lora_alpha", "target_modules")  # what the checkpoint's shapes depend on


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
    quantize = ckpt["config"].get("quantize", "none"), getattr(args, "quantize", "none")  # (the run's, this one's)
    if quantize[0] != quantize[1]:  # the same base, rounded otherwise
        raise SystemExit(f"error: {path} was trained on a --quantize {quantize[0]} base, not {quantize[1]}: give the "
                         "same --quantize")
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


def save_checkpoint(run: Run, args, raw_model, optimizer, step: int, fingerprint: dict):
    # every process's RNG state: a resumed run draws the same dropout masks and contrastive samples
    rngs = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.rank == 0:
        atomic_save({"weights": trainable_state(raw_model, args.method), "optimizer": optimizer.state_dict(),
                     "scaler": run.scaler.state_dict(), "rng": rngs, "step": step, "config": vars(args),
                     "base": fingerprint}, run.out_dir / "ckpt.pt")
        if args.method != "full":  # the adapters alone, to share or load elsewhere: no pickle (moelora.load_moelora)
            save_moelora(raw_model, run.out_dir / "adapter.safetensors")


def resume_from_checkpoint(run: Run, args, raw_model, optimizer, fingerprint: dict) -> int:
    """Load weights, optimizer, scaler and this process's RNG state from out_dir/ckpt.pt; return its step."""
    ckpt_path = run.out_dir / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, raw_model, args, fingerprint)
    optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][min(run.rank, len(ckpt["rng"]) - 1)])
    log = run.out_dir / "metrics.jsonl"
    if run.rank == 0 and log.exists():  # steps logged after the checkpoint are redone: keep each step once
        kept = [line for line in log.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= ckpt["step"]]
        tmp = log.with_name("metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)
    run.log(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # what SLURM and Kubernetes send before a kill; Ctrl-C


@contextlib.contextmanager
def catch_stop_signals(run: Run):
    """Inside the `with`, a first SIGTERM or SIGINT sets stop["signal"]: the loop finishes its step, saves and exits.
    A second one ends the process at once, without saving, even while a long C++ call runs (a backward at 7B, a
    collective on which a dead peer's partner hangs).

    Why a thread: Python runs a signal handler only when the main thread is back in the interpreter, which a
    minutes-long backward may not be. But Python's C-level handler writes each signal's number to the wakeup fd at
    once, and torch releases the GIL inside its operations, so a thread reading that fd acts at once. The Python
    handler, when it runs, also restores the default action, so that the operating system ends the process on the
    next signal without anybody's help."""
    stop = {"signal": None}
    if threading.current_thread() is not threading.main_thread():  # train.main called from a thread: signals untouched
        yield stop
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block

    def restore_default(signum, frame):  # in the main thread, between two Python operations
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def watch():  # in its own thread, at once
        while got := os.read(read_fd, 1):
            if stop["signal"] is None:
                stop["signal"] = got[0]
                run.log(f"{signal.Signals(got[0]).name}: stopping after this step; a second signal stops at once "
                        "without saving")
            else:
                run.log(f"{signal.Signals(got[0]).name} again: stopping now, without saving")
                os._exit(128 + got[0])

    previous = {sig: signal.signal(sig, restore_default) for sig in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd)
    watcher = threading.Thread(target=watch, name="stop-signals", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns
        watcher.join()
        os.close(read_fd)


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
