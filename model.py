"""
A self-contained LLaMA in one file: the network, KV-cache generation, and loading of real checkpoints.

Read top to bottom:
  1. ModelArgs, RMSNorm, RoPE, Attention (grouped-query), FeedForward (SwiGLU), TransformerBlock, Transformer
  2. KVCache and Transformer.generate (batched, left-padded prompts, greedy or temperature/top-p)
  3. Checkpoint loading: Meta (params.json + consolidated.NN.pth), Hugging Face (config.json +
     safetensors or pytorch_model*.bin) and llama2.c (.bin, version 0), all behind Transformer.from_pretrained

Parameter names follow Meta's release (tok_embeddings, layers.{i}.attention.wq, ...), so Meta checkpoints
load without renaming; Hugging Face names are mapped onto them in load_hf_checkpoint.
"""
import itertools
import json
import math
import mmap
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100  # targets equal to this add nothing to the loss (prompt tokens, padding)


@dataclass
class ModelArgs:
    # field names are Meta's (params.json), so a params.json loads with ModelArgs(**params)
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # not in Meta's params.json: an explicit FFN width (HF's intermediate_size, llama2.c's hidden_dim)
    # overrides the formula; tied embeddings share tok_embeddings.weight with output.weight
    hidden_dim: Optional[int] = None
    tie_word_embeddings: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even under bf16/fp16: the mean of squares loses too much precision otherwise
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float, device=None):
    # angle[t, i] = t * theta^(-2i / head_dim) for i < head_dim / 2; returns cos and sin, each [max_seq_len, head_dim // 2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: [B, T, H, head_dim]; cos, sin: [T, head_dim//2] or [B, T, head_dim//2] (per-sequence positions)
    # Meta's interleaved layout: each pair (x[2i], x[2i+1]) is one complex number rotated by angle[t, i].
    # (Hugging Face stores q/k rows permuted for a "rotate half" layout instead; the loader undoes that.)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, T, H, head_dim//2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def repeat_kv(x, n_rep: int):
    # [B, n_kv_heads, T, hd] -> [B, n_kv_heads * n_rep, T, hd]: each kv head serves n_rep query heads
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        assert args.dim % args.n_heads == 0, "dim must be divisible by n_heads"
        assert args.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None):
        # x: [B, T, dim]; mask: None (plain causal) or bool [B, 1, T, S], True where a query may attend
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, n_kv_heads, S, hd], S = tokens cached so far
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # lets torch pick flash attention
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def ffn_hidden_dim(args: ModelArgs) -> int:
    # Meta's formula: 2/3 of 4*dim (SwiGLU has three matrices instead of two), scaled, rounded up to multiple_of
    if args.hidden_dim is not None:
        return args.hidden_dim
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = ffn_hidden_dim(args)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(layer_id, args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables are derived, not learned: non-persistent buffers stay out of the state dict
        cos, sin = precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.grad_checkpointing = False  # trade compute for memory in training: see forward
        self.apply(self._init_weights)
        # GPT-2 style: scale the projections that write into the residual stream by depth
        for name, p in self.named_parameters():
            if name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _apply(self, fn, *a, **kw):
        # model.to(torch.bfloat16) would also cast the RoPE tables and lose precision at large positions;
        # rebuild them in float32 on whatever device the weights went to (to_empty from "meta" included)
        super()._apply(fn, *a, **kw)
        a = self.args
        self.freqs_cos, self.freqs_sin = precompute_rope(a.dim // a.n_heads, a.max_seq_len, a.rope_theta, self.freqs_cos.device)
        return self

    def forward(self, tokens, targets=None, positions=None, mask=None, cache=None):
        """tokens, targets: [B, T] int64. Returns (logits [B, T, vocab] float32, loss or None).

        loss is the mean cross-entropy over the positions whose target is not IGNORE_INDEX (nan if there are
        none; the gradient is then zero).
        positions [B, T], mask [B, 1, T, S] and cache are for generation (see generate); with a cache,
        only the last position's logits are computed ([B, 1, vocab]): that is all sampling needs.
        """
        B, T = tokens.shape
        if positions is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.args.max_seq_len}")
            cos, sin = self.freqs_cos[:T], self.freqs_sin[:T]  # [T, hd/2]
        else:
            cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]  # [B, T, hd/2]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in the backward pass
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
            h = h[:, -1:]
        h = self.norm(h)
        logits = self.output(h).float()  # float32 even under autocast: bf16 is too coarse for the softmax
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    # generation

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: Optional[int] = None, pad_id: int = 0, generator: Optional[torch.Generator] = None):
        """Continue a batch of prompts (lists of token ids, lengths may differ) with a KV cache.

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature) restricted to the
        smallest set of tokens whose probability reaches top_p. A sequence stops at eos_id (kept in its
        output). Returns one list of new token ids per prompt.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each with at least one token (e.g. BOS)")
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        device = self.freqs_cos.device
        B, P = len(prompts), max(len(p) for p in prompts)
        total = P + max_new_tokens
        if total > self.args.max_seq_len:
            raise ValueError(f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.args.max_seq_len}")
        # left-pad so that every sequence's next token lands in the same column
        tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
        valid = torch.zeros((B, total), dtype=torch.bool, device=device)  # False on padding
        for b, p in enumerate(prompts):
            tokens[b, P - len(p):P] = torch.tensor(p, dtype=torch.long, device=device)
            valid[b, P - len(p):] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # each sequence's own positions start at 0
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        # query i sees key j if j <= i and j is not padding; a padding query sees itself, so that no row of
        # the softmax is empty (an empty row gives NaN, and NaN in a cached value poisons every later step)
        mask = (causal[None] & valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)[None]
        mask = mask[:, None]  # [B, 1, total, total]
        cache = KVCache(self, B, total)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        start = 0
        for cur in range(P, total):
            logits, _ = self(tokens[:, start:cur], positions=positions[:, start:cur],
                             mask=mask[:, :, start:cur, :cur], cache=cache)
            next_token = sample(logits[:, -1], temperature, top_p, generator)
            next_token = torch.where(done, pad_id, next_token)
            tokens[:, cur] = next_token
            if eos_id is not None:
                done |= next_token == eos_id
                if done.all():
                    break
            start = cur
        out = []
        for row in tokens[:, P:cur + 1].tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(row)
        return out

    # ------------------------------------------------------------------------------------------------
    # loading real checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype: Optional[torch.dtype] = None, device=None) -> "Transformer":
        """Load a Meta, Hugging Face or llama2.c checkpoint (the format is detected from the files).

        The model is built on the "meta" device (no memory), allocated once in `dtype` (default: the
        checkpoint's own floating dtype) on `device` (default CPU), then filled tensor by tensor, so a 7B
        model never exists twice in memory. Unknown or missing tensors are an error, never a partial load.
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
        for name, tensor in itertools.chain([first], tensors):
            if name not in expected:
                raise KeyError(f"{path}: unexpected tensor '{name}' for this architecture")
            param = expected[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, but the config "
                                 f"implies {tuple(param.shape)}: weights and params/config do not match")
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise KeyError(f"{path}: missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                           + (" ..." if len(missing) > 8 else ""))
        return model.eval()


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for all layers: [n_layers, B, n_kv_heads, max_len, hd]."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int):
        a = model.args
        n_kv, hd = a.n_kv_heads or a.n_heads, a.dim // a.n_heads
        w = model.layers[0].attention.wk.weight
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        shape = (a.n_layers, batch_size, n_kv, max_len, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=dtype, device=w.device)
        self.length = 0  # tokens stored; Transformer.forward advances it after all layers have written

    def update(self, layer_id: int, k, v):
        # k, v: [B, n_kv_heads, T, hd] for the new tokens -> all keys and values so far, [B, n_kv_heads, S, hd]
        s, e = self.length, self.length + k.shape[2]
        self.k[layer_id, :, :, s:e] = k
        self.v[layer_id, :, :, s:e] = v
        return self.k[layer_id, :, :, :e], self.v[layer_id, :, :, :e]


def sample(logits, temperature: float, top_p: float, generator=None):
    # logits: [B, vocab] -> next token ids [B]
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
            for hf_name, t in (read_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f)).items():
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
    header, data_start, size = read_safetensors_header(path)
    if not header:
        return {}
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(buf, dtype=np.uint8, offset=data_start)
    out = {}
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
        raw = torch.from_numpy(data[begin:end])  # uint8 view into the mapping
        if begin % dtype.itemsize:  # unaligned for its dtype: copy this one tensor
            raw = raw.clone()
        out[name] = raw.view(dtype).view(shape)
    return out


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
