"""
Reading real LLaMA checkpoints into model.py's Transformer: Transformer.from_pretrained calls load_pretrained.

Three formats, detected from the files (open_checkpoint):
  - Meta: params.json + consolidated.NN.pth, one file per model-parallel shard; the shards are concatenated
    along the dimension each tensor was split on (META_CONCAT_DIM).
  - Hugging Face: config.json + model.safetensors, sharded safetensors with an index, or pytorch_model*.bin.
    Names are mapped onto Meta's (HF_NAMES), and q_proj / k_proj rows are put back from HF's rotate-half order
    into Meta's interleaved one (unpermute_rotate_half: k_proj with the KV heads under grouped-query attention).
    A checkpoint without lm_head.weight ties the classifier to the embeddings. Only plain RoPE and no biases.
  - llama2.c: one .bin, export version 0: a 7-int32 header, then float32 weights in a fixed order; a negative
    vocab size in the header means an untied classifier.
Every file is memory-mapped and each tensor is copied once into a model allocated in the target dtype. A page read
through a mapping counts in the resident set until the mapping goes, so each safetensors tensor gets a mapping of its
own, dropped once copied: the peak is the model plus about one tensor (benchmarks/README.md, "CPU bf16 training:
where the memory goes"). A .pth or .bin file (torch.load with mmap=True) and a llama2.c file are mapped whole: the
pages read from one stay resident until its last tensor is copied (clean pages, which the kernel drops first when
memory runs short). A safetensors file is read here by hand (the format is an 8-byte header length, a JSON header
and the raw data), which keeps the package list short; moelora.py keeps its own writer and reader so that it stays
a standalone file. Bad files give errors that name the file and the problem.
"""
import json
import math
import mmap
import struct
from dataclasses import fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from model import ModelArgs


def load_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None):
    """A `cls` (model.Transformer) filled from the checkpoint at path, in any of the three formats.

    The model is built on the "meta" device (no memory), allocated once in `dtype` (default: the checkpoint's own
    floating dtype) on `device` (default CPU), then filled tensor by tensor, so a 7B model never exists twice in
    memory. Unknown or missing tensors are an error, never a partial load.
    """
    args, tensors = open_checkpoint(Path(path))
    first = next(tensors, None)  # tensors is a generator: each one is read (memory-mapped) when reached
    if first is None:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    with torch.device("meta"):
        model = cls(args)
    model.to(dtype=dtype or _default_dtype(first[1])).to_empty(device=device or "cpu")
    if args.tie_word_embeddings:  # to_empty gives each module its own storage: share it again
        model.output.weight = model.tok_embeddings.weight
    expected = dict(model.state_dict(keep_vars=True))
    if args.tie_word_embeddings:
        expected.pop("output.weight")  # the same tensor as tok_embeddings.weight: loaded once
    loaded = set()

    def load(name, tensor):
        if name not in expected:
            raise KeyError(f"{path}: unexpected tensor '{name}' for this architecture")
        param = expected[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, but the config "
                             f"implies {tuple(param.shape)}: weights and params/config do not match")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    load(*first)
    del first  # held, a tensor would keep the file pages it maps resident to the end: each goes once copied
    for name, tensor in tensors:
        load(name, tensor)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise KeyError(f"{path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                       + (" ..." if len(missing) > 8 else ""))
    return model.eval()


def read_model_args(path) -> ModelArgs:
    """The checkpoint's architecture, from its config: no weight is read (the loaders below are lazy)."""
    return open_checkpoint(Path(path))[0]


def _default_dtype(tensor):
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def open_checkpoint(path: Path):
    """-> (ModelArgs, generator of (Meta-style name, tensor)), for any of the three formats."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "params.json").exists():
        return load_meta_checkpoint(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_checkpoint(path)
    if path.is_file() and path.suffix == ".bin":
        return load_llama2c_checkpoint(path)
    if path.is_dir():
        bins = sorted(path.glob("*.bin"))
        if len(bins) == 1:
            return load_llama2c_checkpoint(bins[0])
    raise ValueError(f"{path}: not a checkpoint this loader knows. Expected a directory with params.json + "
                     "consolidated.NN.pth (Meta), a directory with config.json + model.safetensors or "
                     "pytorch_model.bin (Hugging Face), or a llama2.c .bin file")


# --- Meta: params.json + consolidated.00.pth, consolidated.01.pth, ... (one file per model-parallel shard)

# how the model-parallel shards split each tensor (the others, the norms, are copied whole into every shard)
META_CONCAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def load_meta_checkpoint(path: Path):
    params = json.loads((path / "params.json").read_text())
    shard_files = sorted(path.glob("consolidated.*.pth"))
    if not shard_files:
        raise FileNotFoundError(f"{path}: params.json found but no consolidated.NN.pth shard")
    for i, f in enumerate(shard_files):
        if f.name != f"consolidated.{i:02d}.pth":
            raise FileNotFoundError(f"{path}: shard consolidated.{i:02d}.pth is missing (found {f.name})")
    shards = [_torch_load(f) for f in shard_files]
    for f, shard in zip(shard_files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            diff = sorted(shard.keys() ^ shards[0].keys())
            raise KeyError(f"{f}: holds other tensors than {shard_files[0].name}: {', '.join(diff[:8])}")
    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known})
    if params.get("use_scaled_rope"):
        raise NotImplementedError(f"{path}: Llama 3.1 scaled RoPE (use_scaled_rope) is not supported")
    args.vocab_size = shards[0]["tok_embeddings.weight"].shape[0]  # params.json often says -1
    args.tie_word_embeddings = False

    def tensors():
        for name in shards[0]:
            if name == "rope.freqs":  # Meta's precomputed RoPE table: our model computes its own
                continue
            kind = name.split(".")[-2]  # "layers.0.attention.wq.weight" -> "wq"
            if len(shards) == 1 or kind not in META_CONCAT_DIM:
                yield name, shards[0][name]
            else:
                yield name, torch.cat([s[name] for s in shards], dim=META_CONCAT_DIM[kind])
    return args, tensors()


# --- Hugging Face: config.json + model.safetensors | model-0000N-of-0000M.safetensors + index | pytorch_model*.bin

HF_NAMES = {  # HF suffix -> Meta suffix, inside "model.layers.{i}." / "layers.{i}."
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_config_to_args(config: dict, where) -> ModelArgs:
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type '{config['model_type']}' is not LLaMA")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise NotImplementedError(f"{where}: biases in attention/MLP are not part of LLaMA's architecture")
    # rope: older configs have top-level rope_theta (+ rope_scaling), newer ones a rope_parameters dict
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"{where}: RoPE scaling '{rope_type}' is not supported (only plain RoPE)")
    n_heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // n_heads):
        raise NotImplementedError(f"{where}: head_dim != hidden_size / num_attention_heads is not supported")
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def unpermute_rotate_half(w, n_heads: int):
    # HF orders each head's q/k rows as [all first halves, all second halves] for its rotate-half RoPE;
    # Meta interleaves them (pairs). [n_heads * hd, dim] -> same shape, rows back in Meta's order.
    d_out, d_in = w.shape
    return w.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def load_hf_checkpoint(path: Path):
    config = json.loads((path / "config.json").read_text())
    args = hf_config_to_args(config, path / "config.json")
    weight_files = hf_weight_files(path)
    if "lm_head.weight" not in hf_tensor_names(path, weight_files):
        args.tie_word_embeddings = True  # some exports drop lm_head when tied and forget to say so

    def tensors():
        for f in weight_files:
            for hf_name, t in (iter_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f).items()):
                name = hf_name.removeprefix("model.")
                if name.endswith("rotary_emb.inv_freq"):  # older exports saved their RoPE table: ours is computed
                    continue
                if name == "embed_tokens.weight":
                    name = "tok_embeddings.weight"
                elif name == "lm_head.weight":
                    if args.tie_word_embeddings:  # tied: the embedding matrix is the classifier
                        continue
                    name = "output.weight"
                elif name.startswith("layers."):
                    _, i, suffix = name.split(".", 2)
                    name = f"layers.{i}.{HF_NAMES.get(suffix, suffix)}"
                    if suffix == "self_attn.q_proj.weight":
                        t = unpermute_rotate_half(t, args.n_heads)
                    elif suffix == "self_attn.k_proj.weight":
                        t = unpermute_rotate_half(t, args.n_kv_heads)  # n_kv_heads, not n_heads, under GQA
                yield name, t
    return args, tensors()


def hf_weight_files(path: Path):
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise FileNotFoundError(f"{path}: shard(s) listed in {index_name} are missing: {', '.join(missing)}")
            return [path / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    raise FileNotFoundError(f"{path}: config.json found but no weights (model.safetensors, "
                            "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)")


def hf_tensor_names(path: Path, weight_files) -> set:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).exists():
            return set(json.loads((path / index_name).read_text())["weight_map"])
    f = weight_files[0]
    return set(read_safetensors_header(f)[0] if f.suffix == ".safetensors" else _torch_load(f))


def _torch_load(f: Path):
    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        pass
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, or another file under the checkpoint's name
        raise ValueError(f"{f} is not a readable PyTorch checkpoint (truncated, or not a checkpoint): "
                         f"{str(e).splitlines()[0]}") from None


# --- safetensors, read by hand (the format is simple, and the package list has no `safetensors`):
# [8 bytes: little-endian u64 N][N bytes: JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...}][data]
# offsets are relative to the first byte after the header

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors_header(path: Path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header (says {n} bytes, the file has {size - 8} left)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def read_safetensors(path: Path) -> dict:
    """name -> tensor, memory-mapped (copy-on-write): data is read from disk only when a tensor is used."""
    return dict(iter_safetensors(path))


def iter_safetensors(path: Path):
    """(name, tensor) in the file's order, every header entry checked first; each tensor is memory-mapped on its own
    when reached. One mapping of the whole file would keep every page read through it in the resident set until its
    last tensor is dropped: filling a model from it would peak at the model plus the file."""
    header, data_start, size = read_safetensors_header(path)
    entries = []
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for '{name}': {info}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise TypeError(f"{path}: tensor '{name}' has dtype {dtype_name}; supported: "
                            f"{', '.join(SAFETENSORS_DTYPES)} (convert the checkpoint to one of them)")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if not (0 <= begin <= end <= size - data_start) or end - begin != nbytes:
            raise ValueError(f"{path}: corrupt safetensors header: '{name}' has offsets [{begin}, {end}] "
                             f"for {nbytes} bytes of data, in a buffer of {size - data_start} bytes")
        entries.append((name, data_start + begin, nbytes, dtype, shape))
    return ((name, map_tensor(path, *entry)) for name, *entry in entries)


def map_tensor(path: Path, offset: int, nbytes: int, dtype, shape):
    """The tensor stored at byte `offset` of the file, in a copy-on-write mapping of its own pages."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=offset - start))
    if offset % dtype.itemsize:  # unaligned for its dtype: copy this one tensor
        raw = raw.clone()
    return raw.view(dtype).view(shape)


# --- llama2.c: one .bin file, version 0 ("legacy"): 7 int32 header, then float32 weights in a fixed order

def load_llama2c_checkpoint(path: Path):
    with open(path, "rb") as f:
        header = f.read(28)
    if len(header) < 28:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint")
    if header[:4] == b"42ka":  # magic 0x616b3432 of llama2.c's versioned exports
        raise NotImplementedError(f"{path}: llama2.c export version >= 1; export with --version 0 or to HF format")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack("7i", header)
    shared = vocab_size > 0  # a negative vocab_size means the classifier has its own weights
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab_size),
                     hidden_dim=hidden_dim, max_seq_len=seq_len, tie_word_embeddings=shared)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads) <= 0 or dim % n_heads:
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len})")
    V, L, hd, kv_dim = abs(vocab_size), n_layers, dim // n_heads, n_kv_heads * (dim // n_heads)
    # (name, shape, stacked over layers?) in file order
    layout = [("tok_embeddings.weight", (V, dim), False), ("attention_norm.weight", (dim,), True),
              ("attention.wq.weight", (dim, dim), True), ("attention.wk.weight", (kv_dim, dim), True),
              ("attention.wv.weight", (kv_dim, dim), True), ("attention.wo.weight", (dim, dim), True),
              ("ffn_norm.weight", (dim,), True), ("feed_forward.w1.weight", (hidden_dim, dim), True),
              ("feed_forward.w2.weight", (dim, hidden_dim), True), ("feed_forward.w3.weight", (hidden_dim, dim), True),
              ("norm.weight", (dim,), False), ("freq_cis_real", (seq_len, hd // 2), False),
              ("freq_cis_imag", (seq_len, hd // 2), False)]
    if not shared:
        layout.append(("output.weight", (V, dim), False))
    n_floats = sum(math.prod(shape) * (L if stacked else 1) for _, shape, stacked in layout)
    if path.stat().st_size != 28 + 4 * n_floats:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, but its header implies {28 + 4 * n_floats}")
    data = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", offset=28))

    def tensors():
        offset = 0
        for name, shape, stacked in layout:
            for i in range(L if stacked else 1):
                t = data[offset:offset + math.prod(shape)].view(shape)
                offset += math.prod(shape)
                if name.startswith("freq_cis"):  # RoPE tables: ours are computed
                    continue
                yield (f"layers.{i}.{name}" if stacked else name), t
    return args, tensors()
