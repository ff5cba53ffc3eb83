"""
Export a plain LoRA run (train.py --method lora) as a Hugging Face PEFT adapter, for transformers + peft.

    python export_peft.py --out_dir out/lora          # out/lora/peft/: adapter_config.json, adapter_model.safetensors
    python export_peft.py --out_dir out/lora --dest some/dir

then, in Python: PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), "out/lora/peft").

The adapter applies to the Hugging Face form of the run's base. A llama2.c or Meta base must first be converted to
it with the q/k row permutation that transformers' convert_llama_weights_to_hf.py applies; adapter_config.json names
the base only when the run's base is such a directory already. Only one expert exports: a MoELoRA run routes each
token to k of its N experts, which no single low-rank update per layer (PEFT's LoRA) can express.

What changes on the way (moelora.py's layout -> PEFT's):
  - names: Meta's (layers.0.attention.wq) -> HF's (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight);
  - shapes: lora_A [1, r, in] -> [r, in] and lora_B [1, out, r] -> [out, r], one expert dropped from the front;
  - rows: wq and wk's B are in Meta's interleaved RoPE order, HF's q_proj / k_proj in rotate-half order: permuted
    (with the KV heads for wk under grouped-query attention). A acts on the input, whose order both share.
The scaling is lora_alpha / r in both. A run on a --quantize int8 base learnt its adapter against the rounded weights:
on the float base it is close, not the same.
"""
import argparse
import json
import os
from pathlib import Path

import torch

from checkpoints import HF_NAMES
import runs
from moelora import SAFETENSORS_DTYPES, MoELoRAConfig, read_moelora_file

# our layer's path below the block -> HF's: "attention.wq" -> "self_attn.q_proj", ...
HF_MODULES = {ours.removesuffix(".weight"): hf.removesuffix(".weight") for hf, ours in HF_NAMES.items() if "proj" in hf}
# a target_modules entry -> PEFT's: "wq" -> "q_proj", ...; the classifier too
HF_TARGETS = {ours.split(".")[-1]: hf.split(".")[-1] for ours, hf in HF_MODULES.items()} | {"output": "lm_head"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="the run: ckpt.pt and adapter.safetensors, as train.py wrote "
                   "them (default %(default)s)")
    p.add_argument("--dest", default=None, help="the directory to write the PEFT adapter into (default: out_dir/peft)")
    return p.parse_args(argv)


def read_checkpoint(out_dir: Path) -> dict:
    """The run's ckpt.pt, read as every run is (runs.read_checkpoint), or one line naming what to do."""
    path = out_dir / "ckpt.pt"
    if not path.is_file():
        raise SystemExit(f"error: no run in {out_dir} (no ckpt.pt): train one with python train.py --method lora "
                         f"--out_dir {out_dir}, or point --out_dir at one")
    return runs.read_checkpoint(path)


def read_adapter(ckpt: dict, out_dir: Path):
    """(MoELoRAConfig, {our name: tensor}, the file they came from): adapter.safetensors when it is there, else the
    weights in ckpt.pt (the same tensors: runs.save_checkpoint writes both)."""
    if ckpt["config"]["method"] == "full":
        raise SystemExit(f"error: {out_dir} is a --method full run: ckpt.pt holds every weight of the model, not an "
                         "adapter, so there is no LoRA to export; load its 'weights' (a model.Transformer state dict) "
                         "as a whole model, or train with --method lora for an adapter PEFT can load")
    path = out_dir / "adapter.safetensors"
    if path.exists():
        try:
            config, tensors = read_moelora_file(path)
        except (OSError, ValueError, TypeError) as e:
            raise SystemExit(f"error: {e}")
    else:
        path, tensors = out_dir / "ckpt.pt", dict(ckpt["weights"])
        config = MoELoRAConfig(**tensors.pop("moelora_config"))
    if config.num_experts > 1:
        raise SystemExit(f"error: {out_dir} is a MoELoRA run with {config.num_experts} experts: a router picks "
                         f"{config.top_k} of them for each token, which PEFT's LoRA (one fixed low-rank update per "
                         "layer) cannot express; only a --method lora run (one expert) exports")
    return config, tensors, path


def permute_rotate_half(w, n_heads: int):
    # the inverse of checkpoints.unpermute_rotate_half: rows of each head from Meta's interleaved pairs to HF's
    # [all first halves, all second halves]. w [n_heads * hd, cols] -> same shape
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def hf_module_name(name: str) -> str:
    """Our module path -> HF's LlamaForCausalLM's: "layers.0.attention.wq" -> "model.layers.0.self_attn.q_proj"."""
    if name == "output":
        return "lm_head"
    _, i, block_part = name.split(".", 2)
    return f"model.layers.{i}.{HF_MODULES[block_part]}"


def peft_state_dict(tensors: dict, n_heads: int, n_kv_heads: int) -> dict:
    """{our name: tensor} of a one-expert adapter -> PEFT's keys and shapes (the adapter name "default", which PEFT
    drops on save, is not in them)."""
    peft = {}
    for name, t in tensors.items():
        module, kind = name.rsplit(".", 1)  # "layers.0.attention.wq", "lora_A" | "lora_B"
        t = t[0]  # lora_A [1, r, in] -> [r, in]; lora_B [1, out, r] -> [out, r]
        if kind == "lora_B" and module.endswith(".wq"):
            t = permute_rotate_half(t, n_heads)
        elif kind == "lora_B" and module.endswith(".wk"):
            t = permute_rotate_half(t, n_kv_heads)  # n_kv_heads, not n_heads, under GQA
        peft[f"base_model.model.{hf_module_name(module)}.{kind}.weight"] = t.contiguous()
    return peft


def peft_config(config: MoELoRAConfig, base) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": sorted(HF_TARGETS[t] for t in config.target_modules),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "base_model_name_or_path": base, "inference_mode": True,
    }


def hf_base(ckpt: dict):
    """The run's base as an absolute path when it is a Hugging Face directory (what PEFT's loaders can open), else
    None: a llama2.c or Meta base must be converted first (see the docstring)."""
    base = Path(ckpt["config"].get("base") or ckpt["config"]["model"] or "")
    return str(base.resolve()) if (base / "config.json").is_file() else None


def safetensors_bytes(tensors: dict) -> bytes:
    # moelora.save_moelora writes a model's adapters under its own names; PEFT's file needs other names and shapes,
    # so the same layout (an 8-byte header length, the JSON header padded to 8 bytes, the raw data) is written here
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # PEFT's own files say "pt"
    for name, t in tensors.items():
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(t.view(-1).view(torch.uint8).numpy().tobytes()
                                                            for t in tensors.values())


def write_atomically(path: Path, data: bytes):
    # write beside and rename: an interrupted export never leaves a truncated file, and an earlier one is replaced whole
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: cannot write {path} ({e.strerror})")


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    dest = Path(args.dest) if args.dest else out_dir / "peft"
    ckpt = read_checkpoint(out_dir)
    config, tensors, source = read_adapter(ckpt, out_dir)
    shape = ckpt["base"]["args"]  # the base's ModelArgs as a dict, recorded by the run: no need to read the base
    weights = peft_state_dict(tensors, shape["n_heads"], shape["n_kv_heads"] or shape["n_heads"])
    settings = peft_config(config, hf_base(ckpt))
    if dest.exists() and not dest.is_dir():
        raise SystemExit(f"error: --dest {dest} is a file: give a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --dest {dest} ({e.strerror})")
    # the weights first: a config always describes weights that are there
    write_atomically(dest / "adapter_model.safetensors", safetensors_bytes(weights))
    write_atomically(dest / "adapter_config.json", (json.dumps(settings, indent=2) + "\n").encode())
    print(f"{source} (step {ckpt['step']}) -> {dest}: LoRA r {config.r}, alpha {config.lora_alpha:g} on "
          f"{', '.join(settings['target_modules'])}, {len(weights)} tensors")
    print(f"for the Hugging Face form of {settings['base_model_name_or_path'] or ckpt['config'].get('base')}: "
          f"PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), {str(dest)!r})")
    return dest


if __name__ == "__main__":
    main()
