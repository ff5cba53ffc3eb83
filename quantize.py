"""
A frozen quantised base for MoELoRA: every nn.Linear of the base stored as int8 with one scale per group of 64 weights
along the input dimension (as llama2.c's runq.c quantises), so that LLaMA-7B's base takes 7.1 GB instead of 13.5 GB
in bf16 and LLaMA-7B + MoELoRA trains on a 16 GB GPU; or as QLoRA's 4-bit NormalFloat (NF4), 4.0 GB. The adapters and
routers stay float32 and train as before. Needs only torch.

    model = from_pretrained(path, dtype=torch.bfloat16)   # checkpoints.py
    quantize_int8(model)                                  # wq wk wv wo w1 w2 w3 and output become Int8Linear
                                                          # (or quantize_nf4(model): all but output become NF4Linear)
    inject_moelora(model, MoELoRAConfig())                # MoELoRALinear wraps an Int8Linear as it wraps an nn.Linear
    mark_only_moelora_as_trainable(model)
    print(stored_bytes(model) / 1e9, "GB")

Per group of G = 64 weights w_1 .. w_G of one output row:

    s = max_j |w_j| / 127          stored in bf16 (see SCALE_DTYPE)
    q_j = round(w_j / s)           int8 in [-127, 127]
    w_j ~ q_j * s                  |q_j s - w_j| <= s / 2

NF4 (QLoRA, Dettmers et al. 2023), per block of B = 64 weights w_1 .. w_B of one output row:

    s = max_j |w_j|                stored in bf16 (SCALE_DTYPE)
    c_j = argmin_k |w_j / s - L_k|     a 4-bit code, 0 .. 15, with L = NF4_LEVELS: 16 levels in [-1, 1], L_7 = 0
    w_j ~ L[c_j] * s               |L[c_j] s - w_j| <= s (L_1 - L_0) / 2 = 0.152 s, half the widest gap

Two codes per byte, the even column's in the high 4 bits: weight [out, in_padded / 2] uint8. 64 weights take 32 + 2
bytes (4.25 bits a weight), against bf16's 128. The levels are not evenly spaced: each is a quantile of the normal
distribution, so that normally distributed weights use the 16 codes about equally often (see NF4_LEVELS).

quantize_nf4 leaves the output layer (the LM head) in its float dtype, as QLoRA does (transformers' bitsandbytes
integration skips lm_head): its error lands on the logits with no layer after it. With it float, stories260K's answer
loss is 2.25% above the float base's; with it in NF4 too (keep=()), 3.63%. At 7B the float head costs 0.19 GB (0.294x
bf16, not 0.280x). quantize_int8 quantises it: int8 moves the loss by 0.03%.

The forward dequantises one layer's weight at a time, in the input's dtype (bf16 under a GPU's autocast, float32 on
the CPU), and the backward dequantises it again instead of keeping it: see DequantizedMatmul. No weight
gradient exists.
"""
import functools
import torch
import torch.nn as nn
import torch.nn.functional as F


__all__ = ["Int8Linear", "quantize_int8", "stored_bytes", "quantize_weight", "dequantize_weight",
           "NF4Linear", "quantize_nf4", "quantize_nf4_weight", "dequantize_nf4_weight", "NF4_LEVELS"]

# The scales' dtype, measured by benchmarks/bench_quantize.py (mean |w - q s| on stories260K and 7B-sized random
# weights): fp16 scales are 1% more accurate where q s is made in float32 or fp16, but 2-3% less accurate in bf16, the
# compute dtype train.py picks on a GPU, where each fp16 scale is rounded again. A bf16 scale is exact in bf16, fp16
# (inside its normal range) and float32. The scale's own rounding adds no error: q is rounded from the stored scale.
SCALE_DTYPE = torch.bfloat16


def quantize_weight(w, group_size: int = 64):
    """w [out, in] float -> (q [out, in_padded] int8, scales [out, n_groups] SCALE_DTYPE), in_padded = n_groups *
    group_size. A width that is not a multiple of group_size (stories260K's FFN: 172) gets its last group padded with
    zeros: they quantise to 0 and do not change that group's scale. Deterministic: the same w gives the same bits."""
    out_features, in_features = w.shape
    w = F.pad(w.float(), (0, -in_features % group_size))  # [out, in_padded]
    groups = w.view(out_features, -1, group_size)  # [out, n_groups, G]
    amax = groups.abs().amax(dim=-1)  # [out, n_groups]
    # an all-zero group gets scale 1 (its q are 0 whatever the scale): no division by zero
    scales = torch.where(amax > 0, amax / 127, 1.0).to(SCALE_DTYPE)
    # divide by the scale as stored: then |q s - w| <= s / 2 holds for the s that dequantises. A scale rounded down by
    # bf16 (at most 2^-9 relative) can put max|w| / s at 127.25: clamped to 127, still within s / 2
    q = (groups / scales.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q.view(out_features, -1), scales


def dequantize_weight(q, scales, dtype, in_features: int):
    """q [out, in_padded] int8, scales [out, n_groups] -> w [out, in_features] in dtype (the padding cut off)."""
    out_features, n_groups = scales.shape
    w = q.view(out_features, n_groups, -1).to(dtype) * scales.to(dtype).unsqueeze(-1)  # [out, n_groups, G]
    return w.view(out_features, -1)[:, :in_features]


class DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W = dequantize(q, scales, dtype, in_features), keeping only q and scales for the backward;
    dequantize is dequantize_weight (int8) or dequantize_nf4_weight.

    With F.linear(x, dequantize(...)) autograd would keep every layer's dequantised weight until the backward (2 bytes
    per weight in bf16: more than the int8 base itself) and the saving would be gone in training. Here the backward
    dequantises again, one layer at a time. The base is frozen: only the input gets a gradient, so x is not kept."""

    @staticmethod
    def forward(ctx, x, q, scales, in_features: int, dequantize):
        ctx.save_for_backward(q, scales)  # the layer's own stored weight and scales: no new memory
        ctx.in_features, ctx.dequantize = in_features, dequantize
        return F.linear(x, dequantize(q, scales, x.dtype, in_features))

    @staticmethod
    def backward(ctx, grad_y):
        q, scales = ctx.saved_tensors
        grad_x = grad_y @ ctx.dequantize(q, scales, grad_y.dtype, ctx.in_features)  # [.., out] @ [out, in]
        return grad_x, None, None, None, None


def quantized_linear(x, layer, dequantize):
    """y = x W^T + b for an Int8Linear or NF4Linear `layer`, W dequantised by `dequantize` (DequantizedMatmul). The
    matmul runs in autocast's dtype where autocast is on (bf16 or fp16 on a GPU), else in the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    y = DequantizedMatmul.apply(x, layer.weight, layer.scales, layer.in_features, dequantize)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


class Int8Linear(nn.Module):
    """A frozen nn.Linear stored as int8 with group-wise scales; y = x dequantize(weight, scales)^T + bias.

    weight [out, in_padded] int8 and scales [out, n_groups] bf16 are Parameters that never require grad (autograd
    refuses integer tensors anyway): .to(device) moves them, state_dict saves them, and model.parameters() lists them,
    so they count as the model's weights and DistributedDataParallel syncs them once at start, not before every forward
    as it does buffers. model.requires_grad_(True) (full fine-tuning) then fails loudly instead of skipping them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 64, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = -(-in_features // group_size)  # ceil
        self.weight = nn.Parameter(torch.zeros(out_features, n_groups * group_size, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.ones(out_features, n_groups, dtype=SCALE_DTYPE, device=device), requires_grad=False)
        # the bias, when there is one, stays in its float dtype (it is small): frozen with the rest of the base
        bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> "Int8Linear":
        b = linear.bias
        # built on the meta device (nothing allocated), then given the quantised tensors
        layer = cls(linear.in_features, linear.out_features, b is not None, group_size, "meta")
        q, scales = quantize_weight(linear.weight.detach(), group_size)
        layer.weight, layer.scales = nn.Parameter(q, requires_grad=False), nn.Parameter(scales, requires_grad=False)
        if b is not None:
            layer.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x):
        return quantized_linear(x, self, dequantize_weight)

    def dequantized(self, dtype=torch.float32):
        """The weight this layer computes with, [out, in]: for checks and for merging by hand."""
        return dequantize_weight(self.weight, self.scales, dtype, self.in_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, int8")


# QLoRA's NormalFloat levels, written out as published (bitsandbytes' NF4 table, float32) rather than computed at
# import: tests/test_quantize.py rebuilds them from torch.distributions.Normal's quantile function and finds the same
# values to float32's precision. The construction: the quantiles of N(0, 1) at 8 probabilities evenly spaced from 0.5
# to 0.9677083 (0.5 itself left out) for the positive levels and at 7 for the negative ones, an exact 0, all divided
# by the largest so that they span [-1, 1]. Asymmetric, 8 positive and 7 negative, so that 0 is a level (a zero weight
# and the padding stay exact) and 16 codes are used. The offset 0.9677083 is the mean of 1 - 1/(2 * 15) and
# 1 - 1/(2 * 16): a quantile at 1 itself would be infinite. Weights of a block are about normal, so that each level
# gets about as many of them: a 4-bit code carries nearly 4 bits of information, which evenly spaced levels do not.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)

# Double quantisation (QLoRA: the absmax scales themselves quantised to 8 bits, in blocks of 256 with one float32
# scale each, after subtracting their mean) is left out: it does not pay here. Its error is no concern (the mean
# round-trip error moves by 0.03% or less), its bytes are: the scales are bf16 here, not QLoRA's float32, which already
# saves 2 of QLoRA's 4 bytes per 64 weights; double quantisation would save 1 - 4/256 more. LLaMA-7B's stored base:
# 4.17 GB with float32 scales, 3.97 GB with bf16 ones (0.294x bf16), 3.87 GB double-quantised (0.287x): 2.5% less, for
# a third kind of stored tensor and a second dequantisation in every forward and backward. Measured by
# benchmarks/bench_quantize.py --parts bytes,scales (benchmarks/README.md, "A 4-bit NF4 base").


@functools.lru_cache(maxsize=None)
def nf4_levels(device, dtype):
    """NF4_LEVELS as a tensor [16] on device in dtype, made once: a tensor made from a Python list on a GPU is a copy
    from the host, which waits for the GPU, and dequantize_nf4_weight runs twice per layer per step."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device).to(dtype)


def quantize_nf4_weight(w, block_size: int = 64, chunk_rows: int = 256):
    """w [out, in] float -> (codes [out, in_padded // 2] uint8, two 4-bit codes a byte, the even column's in the high
    4 bits; scales [out, n_blocks] SCALE_DTYPE). A width that is not a multiple of block_size is padded with zeros, as
    quantize_weight pads: they get the code of the level 0 and do not change their block's scale.

    Quantises chunk_rows rows at a time. The nearest level is found by counting the midpoints between levels that lie
    below w / s (torch.bucketize: no [out, in, 16] table of distances), but the float32 copy, w / s and the int32 codes
    still take 12 bytes a weight: 1.6 GB for LLaMA-7B's output layer (32000 x 4096, 0.26 GB in bf16), 12 MB for a
    chunk of 256 of its rows. Deterministic, and the same bits whatever chunk_rows."""
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes a byte), got {block_size}")
    out_features, in_features = w.shape
    n_blocks = -(-in_features // block_size)  # ceil
    codes = torch.empty(out_features, n_blocks * block_size // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_features, n_blocks, dtype=SCALE_DTYPE, device=w.device)
    levels = nf4_levels(w.device, torch.float32)
    midpoints = (levels[1:] + levels[:-1]) / 2  # [15]: the nearest level's index = how many midpoints lie below
    for i in range(0, out_features, chunk_rows):
        rows = w[i:i + chunk_rows].float()
        rows = F.pad(rows, (0, -in_features % block_size)) if in_features % block_size else rows  # [rows, in_padded]
        blocks = rows.view(len(rows), n_blocks, block_size)  # [rows, n_blocks, B]
        amax = blocks.abs().amax(dim=-1)  # [rows, n_blocks]
        s = torch.where(amax > 0, amax, 1.0).to(SCALE_DTYPE)  # an all-zero block: scale 1, every code that of 0
        scales[i:i + chunk_rows] = s
        # divide by the scale as stored, as quantize_weight does: the bound holds for the s that dequantises. A scale
        # rounded down by bf16 puts max|w| / s just above 1: it gets the level 1, within the bound
        c = torch.bucketize(blocks / s.float().unsqueeze(-1), midpoints, out_int32=True).to(torch.uint8)
        c = c.view(len(rows), -1)  # [rows, in_padded], 0 .. 15
        codes[i:i + chunk_rows] = c[:, 0::2] << 4 | c[:, 1::2]
    return codes, scales


def dequantize_nf4_weight(codes, scales, dtype, in_features: int):
    """codes [out, in_padded // 2] uint8, scales [out, n_blocks] -> w [out, in_features] in dtype (the padding cut
    off). In bf16 the levels and their products with the scales are rounded to bf16 (under 0.7% of each weight), which
    adds 0.02% to NF4's mean error on normal weights."""
    out_features, n_blocks = scales.shape
    c = torch.stack((codes >> 4, codes & 15), dim=-1).view(-1)  # [out * in_padded]: each byte's two codes, in order
    # index_select, not levels[c]: about 9x faster on the CPU (torch 2.13), and it takes int32 indices
    w = nf4_levels(codes.device, dtype).index_select(0, c.int()).view(out_features, n_blocks, -1)  # [out, n_blocks, B]
    return (w * scales.to(dtype).unsqueeze(-1)).view(out_features, -1)[:, :in_features]


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored as NF4 codes with blockwise absmax scales; y = x dequantize(weight, scales)^T + bias.

    weight [out, in_padded // 2] uint8 (two codes a byte) and scales [out, n_blocks] bf16 are Parameters that never
    require grad, for the reasons Int8Linear gives: .to(), state_dict and DistributedDataParallel treat them as the
    model's weights. Until from_linear fills it, the weight is 0 (every code that of the level 0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64, device=None):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        n_blocks = -(-in_features // block_size)  # ceil
        zeros = 7 << 4 | 7  # a byte of two codes of the level 0
        self.weight = nn.Parameter(torch.full((out_features, n_blocks * block_size // 2), zeros, dtype=torch.uint8,
                                              device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(out_features, n_blocks, dtype=SCALE_DTYPE, device=device), requires_grad=False)
        bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> "NF4Linear":
        b = linear.bias
        layer = cls(linear.in_features, linear.out_features, b is not None, block_size, "meta")  # nothing allocated
        codes, scales = quantize_nf4_weight(linear.weight.detach(), block_size)
        layer.weight, layer.scales = nn.Parameter(codes, requires_grad=False), nn.Parameter(scales, requires_grad=False)
        if b is not None:
            layer.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x):
        return quantized_linear(x, self, dequantize_nf4_weight)

    def dequantized(self, dtype=torch.float32):
        """The weight this layer computes with, [out, in]: for checks and for merging by hand."""
        return dequantize_nf4_weight(self.weight, self.scales, dtype, self.in_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, nf4")


def quantize_int8(model, group_size: int = 64):
    """Replace, in place, every nn.Linear of the base with an Int8Linear; embeddings and norms stay as they are.
    Call it before inject_moelora (which then wraps the Int8Linear layers). Returns model.

    A Linear whose weight is tied to another module's (model.py's output with tie_word_embeddings, sharing
    tok_embeddings.weight) is left as it is: quantising it would untie it and store the matrix twice. Only plain
    nn.Linear is replaced, not its subclasses: nn.MultiheadAttention's out_proj is one, and its parent reads its
    weight instead of calling it. Quantises one layer at a time, on the device the weights are on: the peak memory
    is the model plus one layer's temporaries."""
    return replace_linears(model, "quantize_int8", lambda linear: Int8Linear.from_linear(linear, group_size))


def quantize_nf4(model, block_size: int = 64, keep=("output",)):
    """As quantize_int8, with NF4Linear layers: every plain, untied nn.Linear of the base becomes 4-bit NF4 with one
    scale per block of block_size inputs, except the modules named in keep. Returns model.

    keep: model.py's output layer by default, left in its float dtype as QLoRA leaves the LM head (see the top of this
    file; benchmarks/README.md, "A 4-bit NF4 base", has the figures); keep=() quantises it too."""
    return replace_linears(model, "quantize_nf4", lambda linear: NF4Linear.from_linear(linear, block_size), skip=keep)


def replace_linears(model, caller: str, quantized, skip=()):
    """quantize_int8 and quantize_nf4: each plain, untied nn.Linear of model replaced by quantized(linear), except
    those whose name in model.named_modules() is in skip."""
    if any(hasattr(m, "lora_A") for m in model.modules()):  # MoELoRA's layers, or another LoRA library's
        raise ValueError(f"{caller}: the model already has LoRA adapters; quantise the base first: "
                         f"{caller}(model), then inject_moelora(model, config) or load_moelora(model, path)")
    other = Int8Linear if caller == "quantize_nf4" else NF4Linear
    if any(isinstance(m, other) for m in model.modules()):  # else it would find no nn.Linear and say nothing
        raise ValueError(f"{caller}: the model's base is quantised already, with {other.__name__} layers; "
                         "quantise the float base once, in one format")
    uses = {}  # id(weight) -> how many modules hold it: 2 or more means tied
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and uses[id(child.weight)] == 1 and f"{prefix}.{name}".lstrip(".") not in skip:
                setattr(parent, name, quantized(child))
    return model


def stored_bytes(model) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers), each tensor once: a tied weight is one
    tensor under two names. Works on the meta device: a LLaMA-7B built there is counted without allocating it. An
    NF4Linear's packed codes count 1 byte per 2 weights, its padding included, as they are stored."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())
