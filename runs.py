"""
A training run's plumbing, apart from its loops (train.py): which process this is and how it computes, the
out_dir and its files, checkpoints that resume exactly, stopping on a signal without losing work, and a run on disk
opened again.

    Run, Precision, setup_precision, setup_distributed        the run's context: rank, device, precision (also
                                                              sample.py's), all_reduce_sum
    check_out_dir, prepare_out_dir, move_run_aside            never replace earlier work unasked
    run_info, settings_from_run, check_against_the_run        run.json: what a run is; --eval_only and --resume
                                                              take its base, adapter and prompt again
    open_run, load_run, new_model, load_base, check_base      a run on disk: what it recorded (SavedRun), and its
                                                              base with its trained weights, for train.py --eval_only,
                                                              sample.py and the tutorial's scripts; a new run's base
                                                              with fresh adapters; every base is read by load_base
    keep_checkpoint, keep_best, plot_curves                   --keep_last, best/ and curves.png
    save_checkpoint, resume_from_checkpoint                   ckpt.pt: the trainable weights (adapters only,
                                                              or all for --method full), optimizer, scaler,
                                                              every process's RNG state, step, settings, and a
                                                              fingerprint of the base; adapter.safetensors beside it
    catch_stop_signals, stop_requested                        stop after the step, saved
    one_line_if_a_collective_fails                            a process that died or hangs, said in one line
"""
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoints import from_pretrained
from fsdp import first_rows, new_sharded_model, optimizer_state_to_shards, to_shards, whole, whole_optimizer_state
from data.prompts import PROMPT_FORMATS
from moelora import (MoELoRAConfig, inject_moelora, load_moelora_state_dict, mark_only_moelora_as_trainable,
                     moelora_layers, moelora_state_dict, read_moelora_file, save_moelora_state_dict)
from quantize import quantize_int8, quantize_nf4
from tokenizer import Tokenizer


RUN_JSON = "run.json"  # what a run was: every setting, the base, the data, the code; written before its first step


@dataclass(frozen=True)
class Precision:
    """Where a model computes and in which dtype: chosen by setup_precision, for training, grading and sample.py."""
    device: str
    amp_dtype: torch.dtype  # autocast dtype; float32 means no autocast

    def autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype)

    def weights_dtype(self, full: bool = False) -> torch.dtype:
        """A frozen base is stored in the compute dtype (half the memory); full fine-tuning keeps fp32 master weights."""
        return torch.float32 if full else self.amp_dtype

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16, whose narrow exponent range would let small gradients underflow; off otherwise."""
        return torch.amp.GradScaler(self.device.split(":")[0], enabled=self.amp_dtype == torch.float16)


@dataclass
class Run:
    rank: int  # this process (torchrun's RANK); rank 0 logs, saves and grades
    world_size: int  # processes under torchrun, else 1
    precision: Precision
    scaler: torch.amp.GradScaler  # loss scaling, enabled for fp16 only
    out_dir: Path
    sharded: bool = False  # --fsdp: each process holds a shard of the model (fsdp.py), and calls it with the others

    @property
    def device(self) -> str:
        return self.precision.device

    @property
    def amp_dtype(self) -> torch.dtype:
        return self.precision.amp_dtype

    def autocast(self):
        return self.precision.autocast()

    def log(self, msg: str):
        if self.rank == 0:
            tqdm.write(msg)

    def log_jsonl(self, record: dict):
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def default_device(device=None) -> str:
    """--device as given, else cuda where torch has a GPU, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed(device=None, sharded: bool = False, timeout_minutes: float = 30.0):
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one process otherwise (nanoGPT's way),
    on --device (default_device). Each process of torchrun takes the GPU of its local rank. sharded (--fsdp): a process
    group even for one process, which FSDP needs. A collective that waits longer than timeout_minutes for another
    process fails (one_line_if_a_collective_fails says so), rather than wait for ever on one that died or hangs."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and not sharded:
        return 0, 1, default_device(device)
    cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count() if cuda else 0
    if cuda and per_node > gpus:  # each process takes the GPU of its local rank: some would find none
        raise SystemExit(f"error: torchrun started {per_node} processes on this node, which has {gpus} GPU(s): use "
                         f"--nproc_per_node {gpus} or fewer, or --device cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def setup_precision(dtype: str = "auto", device=None) -> Precision:
    """The device (default_device) and the autocast dtype, for training, grading and sample.py alike. auto: on CUDA,
    bf16 autocast where the GPU supports it, else fp16, whose narrow exponent range needs the loss scaled
    (Precision.grad_scaler); on CPU, float32. bf16 and fp16 given explicitly also work on the CPU (slowly): that is
    how CI exercises these branches."""
    device = default_device(device)
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
    if amp_dtype == torch.bfloat16 and not cuda and cpu_has_native_bf16() is False:
        tqdm.write("WARNING: --dtype bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16): torch falls back to "
                   "a slow path, 150x float32's time for a 2048-wide matmul on an AVX2 CPU (measured). Use --dtype fp32")
    return Precision(device, amp_dtype)


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (True), by emulation (False), or it cannot be told (None: not
    Linux on x86). oneDNN uses AVX512-BF16 or AMX when the CPU has them, unless ONEDNN_MAX_CPU_ISA caps it below."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(info.split())
    if "avx2" not in flags and "avx" not in flags:
        return None  # not an x86 CPU (ARM's "bf16" feature goes another way): no claim
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and (capped == "ALL" or any(isa in capped for isa in ("BF16", "FP16", "AMX", "AVX10")))


def all_reduce_sum(x: float, run: Run) -> float:
    if run.world_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return t.item()


def check_out_dir(args, run: Run):
    """Before any work, and without writing anything: out_dir can be written, and a run never replaces earlier
    work unasked. Nothing in out_dir changes until prepare_out_dir, once every other check has passed too."""
    ckpt = run.out_dir / "ckpt.pt"
    existing = next(p for p in (run.out_dir, *run.out_dir.absolute().parents) if p.exists())  # the folder to write in
    if not existing.is_dir():
        raise SystemExit(f"error: cannot write to --out_dir {run.out_dir} ({existing} is a file); choose another --out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: cannot write to --out_dir {run.out_dir} ({existing}: permission denied); choose "
                         "another --out_dir")
    if args.eval_only:
        return
    if args.resume and not ckpt.exists():
        raise SystemExit(f"error: --resume given but {ckpt} does not exist; leave out --resume to start a new run")
    if ckpt.exists() and not args.resume and not args.overwrite:
        raise SystemExit(f"error: {run.out_dir} holds a checkpoint (ckpt.pt) of an earlier run: continue it with --resume, "
                         "start over with --overwrite (moves the earlier run into out_dir/earlier_<time>/), or choose "
                         "another --out_dir")


# what a run writes into out_dir: --overwrite moves all of it aside, together
RUN_FILES = ("ckpt.pt", "adapter.safetensors", "metrics.jsonl", "metrics.jsonl.old", RUN_JSON, "curves.png", "best",
             "checkpoints", "metrics_*.json", "predictions_*.jsonl", "results_*.json", "results_*.md", "routing_*")


def prepare_out_dir(args, run: Run, run_info: dict):
    """Once every check has passed: make out_dir, move an earlier run aside (--overwrite), and write run.json (rank 0).
    A resumed run keeps its run.json: it was checked against this one's settings already."""
    if run.rank != 0:
        return
    run.out_dir.mkdir(parents=True, exist_ok=True)
    if args.eval_only:  # grading writes its own files; the run (if any) is left as it is
        return
    if args.overwrite:
        move_run_aside(run)
    elif not args.resume and (run.out_dir / "metrics.jsonl").exists():  # a run that stopped before its first checkpoint
        log = run.out_dir / "metrics.jsonl"
        os.replace(log, log.with_name("metrics.jsonl.old"))
        run.log(f"moved the metrics.jsonl of an earlier run that saved no checkpoint to {log.with_name('metrics.jsonl.old')}")
    if not args.resume or not (run.out_dir / RUN_JSON).exists():
        atomic_write_text(run.out_dir / RUN_JSON, json.dumps(run_info, indent=2) + "\n")


def move_run_aside(run: Run):
    """--overwrite: everything the earlier run wrote (checkpoints, adapter, logs, gradings) moves, never deleted, to
    out_dir/earlier_<time>/, so that no file in out_dir can be mistaken for the new run's."""
    earlier = sorted({f for pattern in RUN_FILES for f in run.out_dir.glob(pattern)})
    if earlier:
        aside = run.out_dir / time.strftime("earlier_%Y%m%d-%H%M%S")
        while aside.exists():  # two overwrites within a second
            aside = aside.with_name(aside.name + "_")
        aside.mkdir()
        for f in earlier:
            os.replace(f, aside / f.name)
        run.log(f"--overwrite: moved the earlier run's {len(earlier)} files to {aside}")


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def git_commit() -> dict:
    """The commit of the code that runs, and whether files differ from it; None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return {"commit": sha.stdout.strip(), "modified": bool(changed.stdout.strip())}


def sha256_of(obj) -> str:
    """Of a file's bytes (a Path), or of anything JSON writes (the examples a run reads, after conversion)."""
    h = hashlib.sha256()
    if isinstance(obj, Path):
        with open(obj, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(json.dumps(obj, sort_keys=True).encode())
    return h.hexdigest()


def read_run_json(out_dir: Path):
    """The run.json of the run in out_dir, or None when there is none."""
    path = out_dir / RUN_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} ({e}): repair it, or delete it to fall back on ckpt.pt's settings")


# --- run.json: what a run is, and opening it again (--eval_only, --resume)

# what a trained run is: grading it (--eval_only) or continuing it (--resume) with other values would not be that run
RUN_IDENTITY = ("model", "quantize", "method", "num_experts", "top_k", "gate", "r", "lora_alpha", "target_modules", "prompt_format")
RESUME_IDENTITY = RUN_IDENTITY + ("task", "train_file", "seed", "batch_size", "max_seq_len", "val_examples")
PER_SESSION = ("resume", "overwrite", "eval_only", "stop_after", "device", "out_dir", "data_dir", "compile", "fsdp",
               "dist_timeout")


def settings_from_run(values: dict, given: set, saved: "SavedRun") -> tuple:
    """--eval_only and --resume open the run in out_dir: its base, --quantize and adapter come from it, and with --resume
    every setting not given again. values: the command line's; returns (values with the run's in them, the notes main
    logs). A flag given with a value other than the run's is one line naming both, where the run is defined by it;
    elsewhere (--lr, --max_steps...) the new value wins, and a note says so."""
    resume = values["resume"]
    fixed = RESUME_IDENTITY if resume else RUN_IDENTITY
    taken = [k for k in saved.settings if k in values and k not in PER_SESSION] if resume else fixed
    values, notes, problems = dict(values), [], []
    for key in (k for k in taken if k in saved.settings):
        mine, theirs = values[key], saved.settings[key]
        if key in given and not same_setting(key, mine, theirs):
            if key in fixed:
                problems.append(f"{show_flag(key, mine)}, but the run in {values['out_dir']} has {show_flag(key, theirs)}")
            else:
                notes.append(f"--resume: {show_flag(key, mine)} (the run had {theirs})")
            continue
        values[key] = theirs
    if problems:
        raise SystemExit(f"error: {'; '.join(problems)} ({saved.source}): leave those flags out (they come from the run), "
                         "or choose another --out_dir")
    return values, notes


def same_setting(key: str, a, b) -> bool:
    if key in ("model", "train_file") and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def show_flag(key: str, value) -> str:
    return "the built-in tiny base" if key == "model" and value is None else f"--{key} {value}"


def run_info(args, run: Run, base: dict, train_examples: list, tests: dict) -> dict:
    """What run.json records: every resolved setting, the base, the data (files and the examples read, hashed), the
    prompt, the code, and where it ran. A run id ties every result file to it."""
    files = {flag: getattr(args, flag) for flag in ("train_file", "eval_file") if getattr(args, flag)}
    return {"run_id": time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": dict(vars(args)), "base": base,
            "data": {"files": {flag: {"path": str(Path(f).resolve()), "sha256": sha256_of(Path(f))} for flag, f in files.items()},
                     "train_examples": {"n": len(train_examples), "sha256": sha256_of(train_examples)},
                     "test_sets": {task: {"n": len(ex), "sha256": sha256_of(ex)} for task, ex in tests.items()}},
            "prompt_sha256": sha256_of(PROMPT_FORMATS[args.prompt_format]),
            "code": git_commit(), "torch": torch.__version__, "device": run.device, "world_size": run.world_size,
            "autocast": str(run.amp_dtype).removeprefix("torch.")}


def check_against_the_run(args, run: Run, info: dict):
    """--resume and --eval_only: the prompt (and, for --resume, the training examples) must be the run's, as its
    run.json recorded them; the run id of the results is the run's."""
    if args.eval_only:  # of the run graded; none for a bare base
        info["run_id"] = None
    recorded = read_run_json(run.out_dir) if args.resume or args.eval_only else None
    if recorded is None or (args.eval_only and not (run.out_dir / "ckpt.pt").exists()):
        return
    info["run_id"] = recorded["run_id"]
    problems = []
    if recorded.get("prompt_sha256") != info["prompt_sha256"]:
        problems.append("the prompt template of data/prompts.py is not the one the run was trained with (code "
                        f"{(recorded.get('code') or {}).get('commit', 'unknown')})")
    then, now = recorded["data"]["train_examples"], info["data"]["train_examples"]
    if args.resume and then["sha256"] != now["sha256"]:
        problems.append(f"the training examples changed since the run started ({then['n']} then, {now['n']} now; "
                        "sha256 differs): give the same data")
    if problems:
        raise SystemExit(f"error: {'; '.join(problems)} ({run.out_dir / RUN_JSON})")


# --- a run's model: a new run's (new_model), or a run on disk opened again (load_run: train.py --eval_only, sample.py
# and the tutorial's scripts); --resume continues from the same checkpoint (resume_from_checkpoint), its base checked
# the same way

@dataclass(frozen=True)
class SavedRun:
    """A run in out_dir as it recorded itself (open_run reads no weight)."""
    out_dir: Path
    settings: dict  # every setting of the run: run.json's, or (a run of an older version) ckpt.pt's config
    source: Path  # the file the settings come from
    base: str  # where the run found its base; in what load_run returns, where it was loaded from
    step: int | None = None  # of ckpt.pt; None when the run saved no checkpoint yet
    fingerprint: dict | None = None  # of the base the checkpoint was trained on (base_fingerprint)
    weights: Path | None = None  # in what load_run returns: the file the trained weights came from (None: the base alone)

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "ckpt.pt"


def open_run(out_dir: Path, need_checkpoint: bool = False):
    """The run in out_dir (SavedRun), or None when it holds none: its settings from run.json (a run of an older
    version: from ckpt.pt's config), ckpt.pt's step and base fingerprint. ckpt.pt is mapped, not read: even a full run's
    opens in an instant. A damaged file, or no ckpt.pt where one is needed, is one line."""
    if out_dir.is_file():
        raise SystemExit(f"error: --out_dir {out_dir} is a file: give the run's folder, where train.py wrote ckpt.pt"
                         + (f" (--out_dir {out_dir.parent})" if out_dir.name == "ckpt.pt" else ""))
    recorded = read_run_json(out_dir)
    ckpt = read_checkpoint(out_dir / "ckpt.pt", mmap=True) if (out_dir / "ckpt.pt").is_file() else None
    if ckpt is None and (need_checkpoint or recorded is None):
        if need_checkpoint:
            raise SystemExit(f"error: no {out_dir / 'ckpt.pt'}: train a run first (python train.py --out_dir {out_dir}), "
                             "or point --out_dir at one")
        return None
    settings = recorded["settings"] if recorded else ckpt["config"]
    base = recorded["base"]["path"] if recorded else settings.get("base") or settings["model"]
    if ckpt is None:
        return SavedRun(out_dir, settings, out_dir / RUN_JSON, base)
    return SavedRun(out_dir, settings, out_dir / (RUN_JSON if recorded else "ckpt.pt"), base, ckpt["step"], ckpt["base"])


def read_checkpoint(path: Path, mmap: bool = False) -> dict:
    """ckpt.pt as train.py wrote it (tensors and plain data only: no code runs), or one line saying what is wrong.
    mmap: the tensors are read from the file when used, not now."""
    if path.stat().st_size == 0:
        raise SystemExit(f"error: {path} is empty: the run did not save it, or a copy of it failed")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        # torch's first sentence says what failed; the rest of a damaged zip's message is advice on several lines
        why = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot read {path} ({why}): it is damaged, or not a checkpoint train.py wrote")
    if not isinstance(ckpt, dict) or not {"config", "step", "weights", "base"} <= ckpt.keys():
        raise SystemExit(f"error: {path} is not a checkpoint train.py wrote (it has no run config, step and weights)")
    return ckpt


def load_base(path, device: str, dtype: torch.dtype, quantize: str = "none"):
    """(the base model, its tokenizer) from a checkpoint (checkpoints.py reads Meta, HF, llama2.c and GGUF), its weights in
    dtype on device; --quantize int8 or nf4: quantised on the CPU first (7B in bf16 would not fit a 16 GB GPU first). Every
    base is read here."""
    try:
        model = from_pretrained(path, dtype=dtype, device="cpu" if quantize != "none" else device)
        tok = Tokenizer.from_dir(path)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        raise SystemExit(f"error: cannot load --model {path}: {e}")
    if tok.vocab_size > model.args.vocab_size:
        raise SystemExit(f"error: {path}: the tokenizer has {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    if quantize != "none":
        {"int8": quantize_int8, "nf4": quantize_nf4}[quantize](model)
        model.to(device)
    return model, tok


def new_model(path, precision: Precision, quantize: str, adapter: MoELoRAConfig, seed: int, sharded: bool = False):
    """(model, tokenizer) of a new run: the base with fresh adapters (adapter: their config) drawn after seeding torch
    with seed, and only they train; adapter None (--method full): every weight of the base trains. sharded (--fsdp):
    built by fsdp.new_sharded_model, each process reading only its shard of the base."""
    if sharded:
        try:
            return new_sharded_model(path, precision, adapter, seed)
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
            raise SystemExit(f"error: cannot load --model {path}: {e}")
    model, tok = load_base(path, precision.device, precision.weights_dtype(adapter is None), quantize)
    if adapter is None:
        return model.requires_grad_(True), tok
    # the adapters' random start depends on the seed alone, not on whether a tiny base was built in this process:
    # tutorial/routing.py redraws the routers as they were at step 0 from it
    torch.manual_seed(seed)
    try:
        inject_moelora(model, adapter)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    return mark_only_moelora_as_trainable(model), tok


def load_run(out_dir: Path, precision: Precision = None, base=None, adapter: bool = True, sharded: bool = False):
    """(model, tokenizer, SavedRun): the trained run in out_dir, in eval mode: its base, quantised as the run's was,
    with the trained weights (adapter=False: without them), on precision's device and in its dtype (default:
    setup_precision's choice). base: the base's path, when it is no longer where the run found it. With the weights,
    the base is checked against the fingerprint the run recorded; what does not fit is one line. sharded
    (--eval_only --fsdp): the base read shard by shard (fsdp.new_sharded_model), the adapters sharded too."""
    saved = open_run(Path(out_dir), need_checkpoint=True)
    precision = precision or setup_precision()
    path = Path(base or saved.base)
    if not base and not path.exists() and (saved.out_dir / path.name).exists():
        path = saved.out_dir / path.name  # a tiny base built inside out_dir (older versions): the run moved with it
    if not path.exists():
        raise SystemExit(f"error: the base model {path} does not exist" + ("" if base else f" (it is where "
                         f"{saved.source.name} says the run found it); give --model the path of that base"))
    full, quantize = saved.settings["method"] == "full", saved.settings.get("quantize", "none")
    source, weights = read_trained(saved, path) if adapter else (None, None)
    if sharded:  # the adapters go in before sharding, to be filled with the trained ones below
        model, tok = new_model(path, precision, quantize, MoELoRAConfig(**weights["moelora_config"]), 0, sharded=True)
    else:
        model, tok = load_base(path, precision.device, precision.weights_dtype(full), quantize)
    fingerprint = base_fingerprint(model, path)  # of the base: a full run's weights replace it
    if adapter:  # the base alone (sample.py --no_adapter) is the base asked for: nothing to check it against
        try:
            if full:
                model.load_state_dict(weights)
            else:  # (plain LoRA is a one-expert MoELoRA: the same file and loader)
                if not moelora_layers(model):
                    inject_moelora(model, MoELoRAConfig(**weights["moelora_config"]))
                load_moelora_state_dict(model, to_shards(model, weights))
        except (ValueError, KeyError, RuntimeError) as e:
            raise SystemExit(weights_do_not_fit(e, source, path, saved))
        check_base(saved.fingerprint, fingerprint, saved.checkpoint, path, saved.base)
    return model.eval(), tok, replace(saved, base=str(path), weights=source)


def read_trained(saved: SavedRun, path: Path) -> tuple:
    """(where the run's trained weights are, a state dict of them): adapter.safetensors when it is there, else
    ckpt.pt's (--method full: all the weights)."""
    adapter = saved.out_dir / "adapter.safetensors"
    try:
        if saved.settings["method"] != "full" and adapter.exists():
            config, tensors = read_moelora_file(adapter)
            return adapter, {**tensors, "moelora_config": asdict(config)}
        return saved.checkpoint, read_checkpoint(saved.checkpoint, mmap=True)["weights"]
    except (ValueError, KeyError) as e:
        raise SystemExit(weights_do_not_fit(e, adapter, path, saved))


def weights_do_not_fit(e: Exception, source: Path, path, saved: SavedRun) -> str:
    why = str(e).splitlines()[0]
    why = why if len(why) < 300 else why[:300] + "..."  # a list of every missing key says no more than its start
    return f"error: the weights in {source} do not fit the base {path} ({why}); " + base_hint(path, saved.base)


def check_base(then: dict, now: dict, checkpoint: Path, path, trained_on):
    """The base is the one the checkpoint was trained on: the same shape, and weight sums within 1% (the run may have
    held it in another dtype). then, now: base_fingerprint's."""
    differ = [f"{k} {v} then, {now['args'].get(k)} now" for k, v in then["args"].items() if now["args"].get(k) != v]
    if not differ and not torch.allclose(torch.tensor(now["sums"]), torch.tensor(then["sums"]), rtol=1e-2, atol=1e-2):
        differ = [f"weight sums {then['sums']} then, {now['sums']} now"]
    if differ:
        raise SystemExit(f"error: {checkpoint} was trained on another base than {path} ({'; '.join(differ[:3])}): "
                         + base_hint(path, trained_on))


def base_hint(path, trained_on) -> str:
    """What to do about a base that does not fit the run trained on trained_on."""
    if Path(path).resolve() == Path(trained_on).resolve():
        return "has it changed since? Give the run's base as --model, or use another --out_dir"
    return f"the run was trained on {trained_on}: give that as --model"


def link_or_copy(src: Path, dst: Path):
    """dst becomes src's contents, atomically. A hard link costs nothing: ckpt.pt is later replaced by a new file (a
    rename), which leaves the linked one as it was."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def keep_checkpoint(run: Run, step: int, keep_last: int):
    """--keep_last K: the checkpoint just saved is also out_dir/checkpoints/step_<n>.pt; older ones beyond K go."""
    if run.rank != 0 or keep_last == 0:
        return
    folder = run.out_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    link_or_copy(run.out_dir / "ckpt.pt", folder / f"step_{step:07d}.pt")
    for old in sorted(folder.glob("step_*.pt"))[:-keep_last]:
        old.unlink()


def keep_best(run: Run, step: int, val_loss: float):
    """The checkpoint just saved, the best so far by validation loss: out_dir/best/ (ckpt.pt, its adapter, best.json)."""
    if run.rank != 0:
        return
    best = run.out_dir / "best"
    best.mkdir(exist_ok=True)
    for name in ("ckpt.pt", "adapter.safetensors"):
        if (run.out_dir / name).exists():
            link_or_copy(run.out_dir / name, best / name)
    atomic_write_text(best / "best.json", json.dumps({"step": step, "val_loss": val_loss}) + "\n")


def best_val_loss(run: Run) -> float:
    """The validation loss of out_dir/best/ (a resumed run keeps it only if it beats it), or infinity."""
    try:
        return json.loads((run.out_dir / "best" / "best.json").read_text())["val_loss"]
    except (OSError, ValueError, KeyError):
        return math.inf


def plot_curves(run: Run):
    """out_dir/curves.png: the training loss and the validation loss by step, from metrics.jsonl (matplotlib is
    optional: without it, one line says so, once)."""
    if run.rank != 0:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        if not getattr(plot_curves, "said", False):
            run.log("curves.png not drawn: matplotlib is not installed (pip install matplotlib); metrics.jsonl has "
                    "the numbers")
            plot_curves.said = True
        return
    records = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "training loss (the logged step's batch)"), ("val_loss", "validation loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("answer loss (nats per token)")
    ax.legend()
    ax.set_title(run.out_dir.name)
    tmp = run.out_dir / "curves.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, run.out_dir / "curves.png")


def atomic_save(obj, path: Path):
    # write beside the target and rename: an interrupted save never leaves a truncated checkpoint
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(model, method: str):
    return {k: v.detach().clone() for k, v in model.state_dict().items()} if method == "full" else moelora_state_dict(model)


@torch.no_grad()
def base_fingerprint(model, path) -> dict:
    """Where the base is read from, and enough to tell one base from another without hashing gigabytes: its shape
    and two weight sums. Of a sharded model, every process calls it (fsdp.py gathers the two tensors)."""
    norm, w = whole({"w": model.norm.weight})["w"], model.tok_embeddings.weight
    return {"path": str(path), "args": asdict(model.args),
            "sums": [round(float(norm.float().sum()), 3), round(float(first_rows(w, min(8, w.shape[0])).float().sum()), 3)]}


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


def save_checkpoint(run: Run, args, raw_model, optimizer, step: int, base: dict):
    # every process's RNG state: a resumed run draws the same dropout masks and contrastive samples
    rngs = [None] * run.world_size
    if run.world_size > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if run.rank == 0 or run.sharded:  # sharded (--fsdp): every process takes part in gathering each whole tensor
        weights, optimizer_state = whole(trainable_state(raw_model, args.method)), whole_optimizer_state(optimizer)
    if run.rank == 0:  # config: the settings, and where the base was read (export_peft.py and older readers look there)
        atomic_save({"weights": weights, "optimizer": optimizer_state,
                     "scaler": run.scaler.state_dict(), "rng": rngs, "step": step,
                     "config": dict(vars(args), base=base["path"]), "base": base}, run.out_dir / "ckpt.pt")
        if args.method != "full":  # the adapters alone, to share or load elsewhere: no pickle (moelora.load_moelora)
            save_moelora_state_dict(weights, run.out_dir / "adapter.safetensors")


ADAPTER_FLAGS = ("num_experts", "top_k", "gate", "r", "lora_alpha", "target_modules")  # what the adapter is


def resume_from_checkpoint(run: Run, args, raw_model, optimizer, base: dict) -> int:
    """Load weights, optimizer, scaler and this process's RNG state from out_dir/ckpt.pt, after checking that it was
    trained on this base (base_fingerprint) with these adapters; return its step."""
    ckpt_path = run.out_dir / "ckpt.pt"
    ckpt = read_checkpoint(ckpt_path)
    check_base(ckpt["base"], base, ckpt_path, base["path"], base["path"])
    try:
        if args.method == "full":
            raw_model.load_state_dict(ckpt["weights"])
        else:  # whole tensors, sharded first for a sharded model (a one-process run's checkpoint too)
            load_moelora_state_dict(raw_model, to_shards(raw_model, ckpt["weights"]))
    except (KeyError, ValueError, RuntimeError) as e:
        differ = [f"--{k} {ckpt['config'][k]}" for k in ADAPTER_FLAGS if ckpt["config"].get(k) != getattr(args, k)]
        raise SystemExit(f"error: {ckpt_path} does not fit this adapter configuration ({str(e).splitlines()[0]}); it was "
                         f"trained with {' '.join(differ) or 'other adapter settings'}: give those flags, or use another --out_dir")
    optimizer.load_state_dict(optimizer_state_to_shards(optimizer, ckpt["optimizer"]))
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


@contextlib.contextmanager
def one_line_if_a_collective_fails(run: Run, timeout_minutes: float):
    """Under torchrun, a collective that fails (a process died, or has not answered for timeout_minutes: the process
    group's timeout) ends this process with one line that says so and where the last checkpoint is."""
    try:
        yield
    except RuntimeError as e:
        if run.world_size == 1 or not (isinstance(e, dist.DistBackendError) or "gloo" in str(e)):
            raise
        why = re.sub(r"^\[[^]]*\] *", "", str(e).splitlines()[0])  # gloo's begins with its source file: [.../pair.cc:553]
        raise SystemExit(f"error: process {run.rank} of {run.world_size}: a collective failed ({why}): another process "
                         f"died, or has not answered for --dist_timeout {timeout_minutes} minutes; its log says why. The "
                         f"last checkpoint is {run.out_dir / 'ckpt.pt'}: continue with --resume")


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
