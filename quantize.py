"""
A frozen int8 base for MoELoRA: every nn.Linear of the base stored as int8 with one scale per group of 64 weights
along the input dimension (as llama2.c's runq.c quantises), so that LLaMA-7B's base takes 7.1 GB instead of 13.5 GB
in bf16 and LLaMA-7B + MoELoRA trains on a 16 GB GPU. The adapters and routers stay float32 and train as before.
Needs only torch.

    model = from_pretrained(path, dtype=torch.bfloat16)   # checkpoints.py
    quantize_int8(model)                                  # wq wk wv wo w1 w2 w3 and output become Int8Linear
    inject_moelora(model, MoELoRAConfig())                # MoELoRALinear wraps an Int8Linear as it wraps an nn.Linear
    mark_only_moelora_as_trainable(model)
    print(stored_bytes(model) / 1e9, "GB")

Per group of G = 64 weights w_1 .. w_G of one output row:

    s = max_j |w_j| / 127          stored in bf16 (see SCALE_DTYPE)
    q_j = round(w_j / s)           int8 in [-127, 127]
    w_j ~ q_j * s                  |q_j s - w_j| <= s / 2

The forward dequantises one layer's weight at a time, in the input's dtype (bf16 under a GPU's autocast, float32 on
the CPU), and the backward dequantises it again instead of keeping it: see Int8Matmul. No weight gradient exists.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


__all__ = ["Int8Linear", "quantize_int8", "stored_bytes", "quantize_weight", "dequantize_weight"]

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


class Int8Matmul(torch.autograd.Function):
    """y = x W^T with W = dequantize(q, scales), keeping only q and scales for the backward.

    With F.linear(x, dequantize(...)) autograd would keep every layer's dequantised weight until the backward (2 bytes
    per weight in bf16: more than the int8 base itself) and the saving would be gone in training. Here the backward
    dequantises again, one layer at a time. The base is frozen: only the input gets a gradient, so x is not kept."""

    @staticmethod
    def forward(ctx, x, q, scales, in_features: int):
        ctx.save_for_backward(q, scales)  # the layer's own int8 weight and scales: no new memory
        ctx.in_features = in_features
        return F.linear(x, dequantize_weight(q, scales, x.dtype, in_features))

    @staticmethod
    def backward(ctx, grad_y):
        q, scales = ctx.saved_tensors
        grad_x = grad_y @ dequantize_weight(q, scales, grad_y.dtype, ctx.in_features)  # [.., out] @ [out, in]
        return grad_x, None, None, None


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
        # the matmul runs in autocast's dtype where autocast is on (bf16 or fp16 on a GPU), else in the input's
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        y = Int8Matmul.apply(x, self.weight, self.scales, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized(self, dtype=torch.float32):
        """The weight this layer computes with, [out, in]: for checks and for merging by hand."""
        return dequantize_weight(self.weight, self.scales, dtype, self.in_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, int8")


def quantize_int8(model, group_size: int = 64):
    """Replace, in place, every nn.Linear of the base with an Int8Linear; embeddings and norms stay as they are.
    Call it before inject_moelora (which then wraps the Int8Linear layers). Returns model.

    A Linear whose weight is tied to another module's (model.py's output with tie_word_embeddings, sharing
    tok_embeddings.weight) is left as it is: quantising it would untie it and store the matrix twice. Only plain
    nn.Linear is replaced, not its subclasses: nn.MultiheadAttention's out_proj is one, and its parent reads its
    weight instead of calling it. Quantises one layer at a time, on the device the weights are on: the peak memory
    is the model plus one layer's temporaries."""
    if any(hasattr(m, "lora_A") for m in model.modules()):  # MoELoRA's layers, or another LoRA library's
        raise ValueError("quantize_int8: the model already has LoRA adapters; quantise the base first: "
                         "quantize_int8(model), then inject_moelora(model, config) or load_moelora(model, path)")
    uses = {}  # id(weight) -> how many modules hold it: 2 or more means tied
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and uses[id(child.weight)] == 1:
                setattr(parent, name, Int8Linear.from_linear(child, group_size))
    return model


def stored_bytes(model) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers), each tensor once: a tied weight is one
    tensor under two names. Works on the meta device: a LLaMA-7B built there is counted without allocating it."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())
