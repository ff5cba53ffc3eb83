"""
The built-in tiny base: what `python train.py` trains on when no --model is given, so that the whole pipeline runs
anywhere in minutes. A SentencePiece tokenizer and a small LLaMA (TINY_MODEL) pretrained on the task's own
training text, stored as an ordinary Meta checkpoint (params.json, consolidated.00.pth, tokenizer.model) in
tiny_base_cache()/tiny_base_<task>_<key> ($MOELORA_CACHE, else ~/.cache/moelora) and reused by any run, in any
out_dir, that would build the same one (delete it to build it again). Its accuracy says nothing
about the method at scale: it is a stand-in.
"""
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from model import ModelArgs, Transformer
from runs import atomic_save
from tokenizer import train_tokenizer

TINY_MODEL = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=2048, multiple_of=32, max_seq_len=512)
TINY_BASE_FILE = "tiny_base.json"  # written into a tiny base's directory by build_tiny_base: how it was built


def tiny_base_cache() -> Path:
    """Where built tiny bases are kept, for every run and out_dir: $MOELORA_CACHE, else ~/.cache/moelora."""
    return Path(os.environ.get("MOELORA_CACHE") or Path.home() / ".cache" / "moelora")


def tiny_base_dir(cache: Path, task: str, texts, steps: int, seed: int) -> Path:
    """cache/tiny_base_<task>_<key>: the key covers everything that shapes the base (architecture, pretraining
    steps, seed, the training text), so a cached base is reused only by a run that would build the same one."""
    key = hashlib.sha256(json.dumps({"model": asdict(TINY_MODEL), "steps": steps, "seed": seed}).encode())
    for t in texts:
        key.update(t.encode())
    return cache / f"tiny_base_{task}_{key.hexdigest()[:8]}"


def build_tiny_base(base_dir: Path, task: str, texts, steps: int, seed: int, log, lr_at):
    """A tokenizer and a tiny LLaMA pretrained on texts, in base_dir; nothing to do when it is there already.
    lr_at(step, peak lr, warm-up steps, total steps): the learning-rate schedule (train.py's get_lr)."""
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
            g["lr"] = lr_at(step, 3e-3, 20, steps)
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
    # how the base was built, for whoever finds the folder (the preset follows the base's size, not this file)
    (base_dir / TINY_BASE_FILE).write_text(json.dumps({"task": task, "pretrain_steps": steps, "seed": seed,
                                                       "examples": len(texts)}, indent=2))
    atomic_save(model.state_dict(), base_dir / "consolidated.00.pth")  # last: its presence means the base is complete
