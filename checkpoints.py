"""
Reading real LLaMA checkpoints into model.py's Transformer: from_pretrained(path) returns one, filled.

Four formats, detected from the files (open_checkpoint):
  - Meta: params.json + consolidated.NN.pth, one file per model-parallel shard; the shards are concatenated
    along the dimension each tensor was split on (META_CONCAT_DIM).
  - Hugging Face: config.json + model.safetensors, sharded safetensors with an index, or pytorch_model*.bin.
    Names are mapped onto Meta's (HF_NAMES), and q_proj / k_proj rows are put back from HF's rotate-half order
    into Meta's interleaved one (unpermute_rotate_half: k_proj with the KV heads under grouped-query attention).
    A checkpoint without lm_head.weight ties the classifier to the embeddings. Plain, linear and llama3 (Llama
    3.1/3.2) RoPE; no biases.
  - llama2.c: one .bin, export version 0: a 7-int32 header, then float32 weights in a fixed order; a negative
    vocab size in the header means an untied classifier.
  - GGUF (llama.cpp): one .gguf file, versions 2 and 3: typed key/values (the config as llama.*, the tokenizer as
    tokenizer.ggml.*: read_gguf_metadata), tensor infos, then the data. Names are llama.cpp's (GGUF_NAMES); its
    converter already stores q/k rows in Meta's order. Block-quantised tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)
    are dequantised to float32 one at a time; F32, F16 and BF16 ones are mapped as stored. The header is read by
    hand, so the `gguf` package is needed only by the tests, as the reference.
Every file is memory-mapped and each tensor is copied once into a model allocated in the target dtype. A page read
through a mapping counts in the resident set until the mapping goes, so each safetensors tensor gets a mapping of its
own, dropped once copied: the peak is the model plus about one tensor (benchmarks/README.md, "CPU bf16 training:
where the memory goes"). A .pth or .bin file (torch.load with mmap=True) and a llama2.c file are mapped whole: the
pages read from one stay resident until its last tensor is copied (clean pages, which the kernel drops first when
memory runs short). A safetensors file is read here by hand (the format is an 8-byte header length, a JSON header
and the raw data), which keeps the package list short; moelora.py keeps its own writer and reader so that it stays
a standalone file. Bad files give errors that name the file and the problem.
"""
import itertools
import json
import math
import mmap
import struct
from dataclasses import fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from model import ModelArgs, Transformer


def from_pretrained(path, dtype: Optional[torch.dtype] = None, device=None) -> Transformer:
    """A model.Transformer filled from the checkpoint at path, in any of the four formats.

    The model is built on the "meta" device (no memory), allocated once in `dtype` (default: the checkpoint's own
    floating dtype) on `device` (default CPU), then filled tensor by tensor, so a 7B model never exists twice in
    memory. Unknown or missing tensors are an error, never a partial load.
    """
    args, tensors = open_checkpoint(Path(path))
    first = next(tensors, None)  # tensors is a generator: each one is read (memory-mapped) when reached
    if first is None:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype=dtype or _default_dtype(first[1])).to_empty(device=device or "cpu")
    if args.tie_word_embeddings:  # to_empty gives each module its own storage: share it again
        model.output.weight = model.tok_embeddings.weight
    expected = dict(model.state_dict(keep_vars=True))
    if args.tie_word_embeddings:
        expected.pop("output.weight")  # the same tensor as tok_embeddings.weight: loaded once
    tensors = itertools.chain((first,), tensors)
    del first  # held, a tensor would keep the file pages it maps resident to the end: each goes once copied
    load_weights(expected, tensors, path)
    return model.eval()


def load_weights(expected: dict, tensors, path, copy=torch.Tensor.copy_):
    """Fill every tensor of expected ({Meta-style name: parameter}) from tensors ((name, tensor) pairs, each read
    when reached), strictly: an unknown, missing or misshapen tensor is an error that names it. copy(parameter,
    tensor) puts a checkpoint's tensor into its parameter: fsdp.py's copies only this process's shard."""
    loaded = set()
    for name, tensor in tensors:
        if name not in expected:
            raise KeyError(f"{path}: unexpected tensor '{name}' for this architecture")
        param = expected[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, but the config "
                             f"implies {tuple(param.shape)}: weights and params/config do not match")
        with torch.no_grad():
            copy(param, tensor)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise KeyError(f"{path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                       + (" ..." if len(missing) > 8 else ""))


def read_model_args(path) -> ModelArgs:
    """The checkpoint's architecture, from its config: no weight is read (the loaders below are lazy)."""
    return open_checkpoint(Path(path))[0]


def _default_dtype(tensor):
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def open_checkpoint(path: Path):
    """-> (ModelArgs, generator of (Meta-style name, tensor)), for any of the four formats."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "params.json").exists():
        return load_meta_checkpoint(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_checkpoint(path)
    for suffix, load in ((".bin", load_llama2c_checkpoint), (".gguf", load_gguf_checkpoint)):
        if path.is_file() and path.suffix == suffix:
            return load(path)
        found = sorted(path.glob("*" + suffix)) if path.is_dir() else []
        if len(found) == 1:  # a directory holding one such file
            return load(found[0])
    raise ValueError(f"{path}: not a checkpoint this loader knows. Expected a directory with params.json + "
                     "consolidated.NN.pth (Meta), a directory with config.json + model.safetensors or "
                     "pytorch_model.bin (Hugging Face), a llama2.c .bin file, or a llama.cpp .gguf file")


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
        # Llama 3.1 (and 3.2): Meta's reference code (llama-models, apply_scaling) fixes these values and reads no
        # other key. (Hugging Face's Llama 3.2 configs say factor 32 instead; Meta's own code uses 8 for every model.)
        args.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}
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
    # Beyond the sizes, a LLaMA config.json (Llama 3.2, SmolLM2, ...) names its activation, biases, head_dim and RoPE:
    # what model.py cannot compute is refused in one line below. The rest (attention_dropout, pretraining_tp, bos/eos
    # ids, dtype, use_cache, SmolLM2's rope_interleaved, which transformers ignores too) leaves the logits unchanged.
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type '{config['model_type']}' is not LLaMA")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise NotImplementedError(f"{where}: biases in attention/MLP are not part of LLaMA's architecture")
    if config.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{where}: hidden_act '{config['hidden_act']}' is not supported (LLaMA's is silu)")
    n_heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // n_heads):
        raise NotImplementedError(f"{where}: head_dim {config['head_dim']} is not hidden_size / num_attention_heads "
                                  f"({config['hidden_size']} / {n_heads}): not supported")
    max_seq_len = config.get("max_position_embeddings", 2048)  # Llama 3.2's 131072: RoPE tables of 2 x 16 MiB
    # rope: older configs have top-level rope_theta + rope_scaling (null: plain), transformers 5 a rope_parameters dict
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise NotImplementedError(f"{where}: partial_rotary_factor {partial} is not supported (RoPE on every pair)")
    try:  # to model.ModelArgs.rope_scaling's form: only the keys model.rope_inv_freq reads, as floats
        if rope_type == "default":
            rope_scaling = None
        elif rope_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(rope["factor"])}
        elif rope_type == "llama3":
            original = rope.get("original_max_position_embeddings", max_seq_len)  # transformers' default when absent
            rope_scaling = {"rope_type": "llama3", "factor": float(rope["factor"]),
                            "low_freq_factor": float(rope["low_freq_factor"]),
                            "high_freq_factor": float(rope["high_freq_factor"]),
                            "original_max_position_embeddings": int(original)}
        else:
            raise NotImplementedError(f"{where}: RoPE scaling '{rope_type}' is not supported (default, linear, llama3 are)")
    except KeyError as e:
        raise ValueError(f"{where}: RoPE scaling '{rope_type}' without its {e} parameter") from None
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        max_seq_len=max_seq_len,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
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


# --- GGUF (llama.cpp): one file with the config, the tokenizer and the tensors, most of them block-quantised.
# Little-endian, versions 2 and 3 (3 only allowed big-endian files, refused here):
#   "GGUF" | u32 version | u64 n_tensors | u64 n_kv
#   n_kv x (string key, u32 value type, value)       string: u64 length + UTF-8; array: u32 item type, u64 n, n items
#   n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset)
#   zero padding up to a multiple of general.alignment (default 32), then the data: offsets count from there
# ne[0] varies fastest, so it is torch's last dim: a weight listed as ne [in, out] is a tensor [out, in].

GGUF_VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                      12: "<d"}  # the scalar value types (struct and numpy formats); 8 is a string, 9 an array
GGUF_STRING, GGUF_ARRAY = 8, 9

GGUF_NAMES = {  # llama.cpp suffix -> Meta suffix, inside "blk.{i}." / "layers.{i}."
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}


class GGUFHeaderReader:
    """Reads a GGUF header's values in order from the mapped file; reading past its end is the truncation error."""

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF file: its header goes on past the end of the file "
                             f"({len(self.buf)} bytes)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        # surrogateescape: a token that is not valid UTF-8 (a few vocabularies have some) keeps its bytes
        return self.take(self.scalar("<Q")).decode("utf-8", errors="surrogateescape")

    def value(self, value_type: int, key: str):
        if value_type == GGUF_STRING:
            return self.string()
        if value_type == GGUF_ARRAY:
            item_type, n = self.scalar("<I"), self.scalar("<Q")
            if item_type in GGUF_VALUE_FORMATS:  # numbers: the whole array in one read
                dtype = np.dtype(GGUF_VALUE_FORMATS[item_type])
                return np.frombuffer(self.take(n * dtype.itemsize), dtype).tolist()
            return [self.value(item_type, key) for _ in range(n)]  # strings (or arrays of arrays)
        if value_type not in GGUF_VALUE_FORMATS:
            raise ValueError(f"{self.path}: corrupt GGUF metadata: '{key}' has value type {value_type} (known: 0-12)")
        return self.scalar(GGUF_VALUE_FORMATS[value_type])


def read_gguf_metadata(path) -> dict:
    """A GGUF file's key/values (general.*, llama.*, tokenizer.ggml.*, ...) as Python values, arrays as lists.
    Only the header is read, not the tensor infos nor any tensor data."""
    return read_gguf_header(Path(path), with_tensors=False)[0]


def read_gguf_header(path: Path, with_tensors: bool = True):
    """-> (metadata {key: value}, tensor infos {name: (ggml type, torch shape, offset)}, data start in the file)."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        # mapped only while parsing: the pages read (the vocabulary can be megabytes) go with the mapping
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse_gguf_header(GGUFHeaderReader(path, buf), with_tensors)


def parse_gguf_header(r: GGUFHeaderReader, with_tensors: bool):
    r.take(4)  # the magic
    version = r.scalar("<I")
    if version in (2 << 24, 3 << 24):  # 2 or 3 written big-endian
        raise ValueError(f"{r.path}: a big-endian GGUF file: only little-endian ones can be read")
    if version not in (2, 3):
        raise ValueError(f"{r.path}: GGUF version {version} is not supported (only versions 2 and 3)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"), key)
    if not with_tensors:
        return metadata, {}, 0
    infos = {}
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.scalar("<I")
        if n_dims > 4:  # ggml's GGML_MAX_DIMS
            raise ValueError(f"{r.path}: corrupt GGUF tensor info: '{name}' has {n_dims} dimensions")
        ne = [r.scalar("<Q") for _ in range(n_dims)]
        infos[name] = (r.scalar("<I"), tuple(reversed(ne)), r.scalar("<Q"))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"{r.path}: corrupt GGUF metadata: general.alignment is {alignment!r}")
    return metadata, infos, -(-r.pos // alignment) * alignment


def gguf_metadata_to_args(metadata: dict, infos: dict, where) -> ModelArgs:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}: GGUF architecture '{arch}' is not LLaMA (general.architecture must be 'llama')")
    if metadata.get("split.count", 1) > 1:
        raise NotImplementedError(f"{where}: one part of a split GGUF model: merge the parts first "
                                  "(llama-gguf-split --merge)")
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if "rope_freqs.weight" in infos:  # how llama.cpp stores Llama 3.1's scaling: a factor per frequency
        scaling = "llama3 (rope_freqs.weight)"
    if scaling != "none":
        raise NotImplementedError(f"{where}: RoPE scaling '{scaling}' is not supported in GGUF files (only plain RoPE)")
    if metadata.get("llama.expert_count"):
        raise NotImplementedError(f"{where}: a mixture of experts (llama.expert_count = "
                                  f"{metadata['llama.expert_count']}) is not supported: LLaMA has one FFN per layer")

    def need(key):
        if f"llama.{key}" not in metadata:
            raise ValueError(f"{where}: the GGUF metadata lacks 'llama.{key}'")
        return metadata[f"llama.{key}"]
    dim, n_heads = need("embedding_length"), need("attention.head_count")
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if metadata.get(f"llama.{key}", dim // n_heads) != dim // n_heads:
            raise NotImplementedError(f"{where}: llama.{key} = {metadata[f'llama.{key}']} is not embedding_length / "
                                      f"head_count ({dim} / {n_heads}): not supported")
    embedding = infos.get("token_embd.weight")  # (type, [vocab, dim], offset)
    vocab_size = embedding[1][0] if embedding else (metadata.get("llama.vocab_size")
                                                    or len(metadata.get("tokenizer.ggml.tokens", [])))
    return ModelArgs(
        dim=dim,
        n_layers=need("block_count"),
        n_heads=n_heads,
        n_kv_heads=metadata.get("llama.attention.head_count_kv") or n_heads,
        vocab_size=vocab_size,
        hidden_dim=need("feed_forward_length"),  # the FFN width as stored, not Meta's formula
        norm_eps=need("attention.layer_norm_rms_epsilon"),
        rope_theta=metadata.get("llama.rope.freq_base", 10000.0),
        max_seq_len=need("context_length"),
        tie_word_embeddings="output.weight" not in infos,  # llama.cpp drops output.weight when it is the embedding
    )


def gguf_to_meta_name(name: str) -> str:
    if name.startswith("blk."):
        _, i, suffix = name.split(".", 2)
        return f"layers.{i}.{GGUF_NAMES.get(suffix, suffix)}"
    return GGUF_TOP_NAMES.get(name, name)  # an unknown name goes through: from_pretrained names it


def load_gguf_checkpoint(path: Path):
    metadata, infos, data_start = read_gguf_header(path)
    args = gguf_metadata_to_args(metadata, infos, path)
    size = path.stat().st_size
    extents = {}  # name -> (first byte, bytes), every tensor checked before any is read
    for name, (ggml_type, shape, offset) in infos.items():
        nbytes = gguf_tensor_nbytes(path, name, ggml_type, shape)
        if data_start + offset + nbytes > size:
            raise ValueError(f"{path}: truncated GGUF file: tensor '{name}' ends at byte {data_start + offset + nbytes}"
                             f", but the file has {size}")
        extents[name] = (data_start + offset, nbytes)

    def tensors():
        # q/k rows as stored: llama.cpp's converter already undid HF's rotate-half permutation (Meta's order)
        for name, (ggml_type, shape, _) in infos.items():
            yield gguf_to_meta_name(name), gguf_tensor(path, *extents[name], ggml_type, shape)
    return args, tensors()


def gguf_tensor_nbytes(path: Path, name: str, ggml_type: int, shape) -> int:
    if ggml_type not in GGUF_TYPES:
        type_name = GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
        raise TypeError(f"{path}: tensor '{name}' is {type_name}, which this loader cannot dequantise; supported: "
                        f"{', '.join(t[0] for t in GGUF_TYPES.values())} (requantise with llama-quantize)")
    type_name, block_values, block_bytes, _ = GGUF_TYPES[ggml_type]
    if shape and shape[-1] % block_values:
        raise ValueError(f"{path}: corrupt GGUF tensor '{name}': rows of {shape[-1]} values are not whole "
                         f"{type_name} blocks of {block_values}")
    return math.prod(shape) // block_values * block_bytes


def gguf_tensor(path: Path, offset: int, nbytes: int, ggml_type: int, shape):
    """One tensor of a GGUF file: float ones mapped as stored, quantised ones dequantised to float32."""
    if ggml_type in GGUF_FLOAT_DTYPES:
        return map_tensor(path, offset, nbytes, GGUF_FLOAT_DTYPES[ggml_type], shape)
    raw = map_tensor(path, offset, nbytes, torch.uint8, (nbytes,)).numpy()
    return torch.from_numpy(dequantize_gguf(raw, ggml_type)).view(shape)


def dequantize_gguf(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """A GGUF tensor's bytes (uint8, whole blocks) -> its values, float32, flat. A chunk of about 1M values at a
    time, so that the temporaries stay small next to the result."""
    _, block_values, block_bytes, dequantize = GGUF_TYPES[ggml_type]
    blocks = raw.reshape(-1, block_bytes)
    out = np.empty((len(blocks), block_values), dtype=np.float32)
    step = max(1, 2**20 // block_values)
    for i in range(0, len(blocks), step):
        out[i:i + step] = dequantize(blocks[i:i + step])
    return out.reshape(-1)


# Each dequantiser: blocks [n, bytes per block] uint8 -> values [n, values per block] float32, in ggml's order and
# with ggml's float32 operations (d * scale first, then * q), so that the result is ggml's to the bit.

def _f16(blocks, start: int):
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)  # [n, 1]


def _nibbles(qs):
    # [..., k] bytes -> [..., 2k] values: all the low nibbles, then all the high ones (ggml's order)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(s):
    # 12 bytes -> 8 scales and 8 mins of 6 bits: those of sub-blocks 0-3 are the low 6 bits of bytes 0-3 (scales) and
    # 4-7 (mins); sub-blocks 4-7 take their low 4 bits from bytes 8-11 (scale: low nibble, min: high nibble) and
    # their top 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins). -> two [n, 8] float32
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def dequantize_f32(blocks):
    # 4 bytes -> 1 value: a float32
    return np.ascontiguousarray(blocks).view(np.float32)


def dequantize_f16(blocks):
    # 2 bytes -> 1 value: a float16
    return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


def dequantize_bf16(blocks):
    # 2 bytes -> 1 value: a bfloat16, the top half of a float32
    return (np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize_q8_0(blocks):
    # 34 bytes -> 32 values: d (f16), 32 int8 q; x = d * q
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def dequantize_q4_0(blocks):
    # 18 bytes -> 32 values: d (f16), 16 bytes: low nibbles the q of values 0-15, high nibbles 16-31; x = d * (q - 8)
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.float32) - 8)


def dequantize_q4_1(blocks):
    # 20 bytes -> 32 values: d (f16), m (f16), 16 bytes of nibbles as in Q4_0; x = d * q + m
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks, 2)


def dequantize_q4_k(blocks):
    # 144 bytes -> 256 values in 8 sub-blocks of 32: d (f16), dmin (f16), 12 bytes of 6-bit scales and mins
    # (_k_scales), 128 bytes of q: each 32 bytes hold 2 sub-blocks (low nibbles, then high); x = d*scale*q - dmin*min
    n = len(blocks)
    scales, mins = _k_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).astype(np.float32)
    return ((_f16(blocks, 0) * scales)[:, :, None] * q - (_f16(blocks, 2) * mins)[:, :, None]).reshape(n, 256)


def dequantize_q5_k(blocks):
    # 176 bytes -> 256 values in 8 sub-blocks of 32: d, dmin, 12 bytes of scales and mins as Q4_K, 32 bytes qh (bit j
    # of qh[l]: the 5th bit of value l of sub-block j), 128 bytes of low nibbles as Q4_K; x = d*scale*q - dmin*min
    n = len(blocks)
    scales, mins = _k_scales(blocks[:, 4:16])
    high = (blocks[:, 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [n, 32 values, 8 sub-blocks]
    low = _nibbles(blocks[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    q = (low | (high.transpose(0, 2, 1) << 4)).astype(np.float32)
    return ((_f16(blocks, 0) * scales)[:, :, None] * q - (_f16(blocks, 2) * mins)[:, :, None]).reshape(n, 256)


def dequantize_q6_k(blocks):
    # 210 bytes -> 256 values: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales (one per 16
    # values), d (f16). Per half of 128 values (64 bytes of ql, 32 of qh), value 32k + l (k < 4, l < 32) is the low
    # (k < 2) or high nibble of ql[32 * (k % 2) + l] and bits 2k, 2k+1 of qh[l]; x = d * scale * (q - 32)
    n = len(blocks)
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = (low | (high << 4)).astype(np.float32).reshape(n, 16, 16) - 32
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return ((_f16(blocks, 208) * scales)[:, :, None] * q).reshape(n, 256)


GGUF_TYPES = {  # ggml type id -> (name, values per block, bytes per block, dequantiser)
    0: ("F32", 1, 4, dequantize_f32),
    1: ("F16", 1, 2, dequantize_f16),
    30: ("BF16", 1, 2, dequantize_bf16),
    8: ("Q8_0", 32, 34, dequantize_q8_0),
    2: ("Q4_0", 32, 18, dequantize_q4_0),
    3: ("Q4_1", 32, 20, dequantize_q4_1),
    12: ("Q4_K", 256, 144, dequantize_q4_k),
    13: ("Q5_K", 256, 176, dequantize_q5_k),
    14: ("Q6_K", 256, 210, dequantize_q6_k),
}
GGUF_FLOAT_DTYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # mapped as stored, not dequantised
# ggml's other types, to name them in the error (4, 5, 31-33, 36-38 are retired)
GGML_TYPE_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                   18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
                   25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
