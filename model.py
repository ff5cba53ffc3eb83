"""
A self-contained LLaMA in one file: the network and KV-cache generation.

Read top to bottom:
  1. ModelArgs, RMSNorm, RoPE, Attention (grouped-query), FeedForward (SwiGLU), TransformerBlock, Transformer
  2. KVCache and Transformer.generate (batched, left-padded prompts, greedy or temperature/top-p)

Parameter names follow Meta's release (tok_embeddings, layers.{i}.attention.wq, ...). The file imports nothing of
the project: checkpoints.from_pretrained, beside it, reads Meta, Hugging Face, llama2.c and GGUF checkpoints and
maps their names onto these.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


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
    # RoPE scaling in Hugging Face's form, a plain dict (it goes into JSON as is): None (plain RoPE),
    # {"rope_type": "linear", "factor": 2.0}, or Llama 3.1's {"rope_type": "llama3", "factor": 8.0,
    # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}. See rope_inv_freq
    rope_scaling: Optional[dict] = None


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


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: Optional[dict] = None, device=None):
    # inv_freq[i] = theta^(-2i / head_dim) for i < head_dim / 2, [head_dim // 2]: pair i turns by inv_freq[i] per token.
    # Scaling slows the turns down so that a longer context maps onto angles seen in pretraining (the operations are
    # transformers', in its order, so that its tables are matched exactly):
    #   linear: inv_freq / factor, the same as dividing the positions by factor
    #   llama3 (Llama 3.1, 3.2): wavelen = 2 pi / inv_freq (tokens per turn), L = original_max_position_embeddings;
    #     wavelen < L / high_freq_factor: kept (fast pairs, word order: they turned many times within L in pretraining)
    #     wavelen > L / low_freq_factor:  inv_freq / factor (slow pairs, which never finished a turn within L)
    #     in between: (1 - s) * inv_freq / factor + s * inv_freq, s = (L / wavelen - low) / (high - low) going from
    #     0 to 1 across the band, so that the two ends join without a step
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq
    factor = rope_scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        L = rope_scaling["original_max_position_embeddings"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        slowed = torch.where(wavelen > L / low, inv_freq / factor, inv_freq)
        s = (L / wavelen - low) / (high - low)
        smoothed = (1 - s) * slowed / factor + s * slowed
        in_band = (wavelen >= L / high) & (wavelen <= L / low)
        return torch.where(in_band, smoothed, slowed)
    raise ValueError(f"RoPE scaling {rope_scaling}: model.py knows only linear and llama3")


def precompute_rope(head_dim: int, max_seq_len: int, theta: float, device=None, rope_scaling: Optional[dict] = None):
    # angle[t, i] = t * inv_freq[i] (rope_inv_freq); returns cos and sin, each [max_seq_len, head_dim // 2], float32.
    # Llama 3's max_seq_len of 131072 with head_dim 64 makes them 2 x 16 MiB (head_dim 128: 2 x 32 MiB): small beside
    # the weights, so the whole context is precomputed, as for any other model
    inv_freq = rope_inv_freq(head_dim, theta, rope_scaling, device)
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
        cos, sin = precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta,
                                   rope_scaling=args.rope_scaling)
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
        self.freqs_cos, self.freqs_sin = precompute_rope(a.dim // a.n_heads, a.max_seq_len, a.rope_theta,
                                                         self.freqs_cos.device, a.rope_scaling)
        return self

    def forward(self, tokens, targets=None, positions=None, mask=None, cache=None):
        """tokens, targets: [B, T] int64. Returns (logits [B, T, vocab] float32, loss or None).

        loss is the mean cross-entropy over the positions whose target is not -100 (F.cross_entropy's
        ignore_index; data/prompts.py masks prompt tokens and padding with it), nan if there are none (the
        gradient is then zero).
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
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    # generation

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: Optional[int] = None, pad_id: int = 0, generator: Optional[torch.Generator] = None,
                 on_token=None):
        """Continue a batch of prompts (lists of token ids, lengths may differ) with a KV cache.

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature) restricted to the
        smallest set of tokens whose probability reaches top_p. A sequence stops at eos_id (kept in its
        output). Returns one list of new token ids per prompt. on_token, if given, is called after every step
        with the B new token ids (a list), to stream them (sample.py); it costs one host sync per step.
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
            if on_token is not None:
                on_token(next_token.tolist())
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


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for all layers: [n_layers, B, n_kv_heads, max_len, hd]."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int):
        a = model.args
        n_kv, hd = a.n_kv_heads or a.n_heads, a.dim // a.n_heads
        w = model.tok_embeddings.weight  # not a projection's: that may be int8 (quantize.py)
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
