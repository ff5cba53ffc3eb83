"""Tests of quantize.py: the int8 and NF4 bases, on tiny models and the real stories260K checkpoint, float32 on CPU,
seconds."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantize
from conftest import shared_path
from checkpoints import from_pretrained
from model import ModelArgs, Transformer
from moelora import (MoELoRAConfig, MoELoRALinear, inject_moelora, load_moelora, mark_only_moelora_as_trainable,
                     merge_moelora, moelora_aux_losses, moelora_layers, moelora_state_dict, save_moelora)
from quantize import (NF4_LEVELS, Int8Linear, NF4Linear, dequantize_nf4_weight, dequantize_weight, quantize_int8,
                      quantize_nf4, quantize_nf4_weight, quantize_weight, stored_bytes)
from tiny_base import TINY_MODEL
from tokenizer import Tokenizer

# hidden_dim 100: w2's input is no multiple of 64, so its last group is padded (as stories260K's 172)
SMALL = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=100, max_seq_len=64)
# each format: (quantise a model, its layer, bytes stored per 64 weights: the codes and one bf16 scale)
FORMATS = {"int8": (quantize_int8, Int8Linear, 64 + 2), "nf4": (quantize_nf4, NF4Linear, 32 + 2)}


def varied_weight(out_features, in_features, seed=0):
    """Weights whose groups differ in size by 1000x, and one all-zero group: what a single scale per row would fail."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w *= torch.logspace(-3, 0, out_features)[:, None]
    w[0, :64] = 0.0
    return w


def test_round_trip_within_half_a_scale_per_group_padded_last_group_included():
    w = varied_weight(12, 172)  # groups of 64, 64 and 44 (+ 20 zeros of padding)
    q, scales = quantize_weight(w, group_size=64)
    assert q.dtype == torch.int8 and q.shape == (12, 192) and scales.shape == (12, 3)
    assert scales.dtype == torch.bfloat16
    assert (q[:, 172:] == 0).all()  # the padding
    assert q.abs().max() <= 127
    err = (dequantize_weight(q, scales, torch.float32, 172) - w).abs().view(12, -1)  # [12, 172]
    s = scales.float().repeat_interleave(64, dim=1)[:, :172]  # each weight's scale
    assert (err <= s / 2 * (1 + 1e-6)).all()  # the group-quantisation bound
    # the scale is max|w| / 127 of its group (up to bf16's rounding): not merely some scale the bound holds for
    amax = F.pad(w, (0, 20)).view(12, 3, 64).abs().amax(dim=-1)
    nonzero = amax > 0
    torch.testing.assert_close(scales.float()[nonzero], amax[nonzero] / 127, rtol=2 ** -8, atol=0)
    assert (q.view(12, 3, 64).abs().amax(dim=-1)[nonzero] >= 126).all()  # each group uses the whole int8 range
    assert (err[0, :64] == 0).all() and (q[0, :64] == 0).all()  # an all-zero group: no division by zero
    # deterministic, as train.py's --resume needs: the same base quantises to the same bits
    q2, scales2 = quantize_weight(w.clone(), group_size=64)
    assert torch.equal(q, q2) and torch.equal(scales, scales2)


def assert_acts_as_its_dequantised_weight(layer, linear):
    """layer's output and input gradient are those of F.linear with its dequantised weight (and linear's bias); the
    packed weight and scales get no gradient."""
    w = layer.dequantized()  # [out, in]
    x = torch.randn(3, 5, linear.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x_ref, w, linear.bias.detach()))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    F.linear(x_ref, w, linear.bias.detach()).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.weight.grad is None and layer.scales.grad is None


def test_int8_linear_forward_and_input_gradient_are_those_of_the_dequantised_weight():
    torch.manual_seed(0)
    linear = nn.Linear(172, 24, bias=True)
    layer = Int8Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features, layer.weight.shape, layer.scales.shape) == (172, 24, (24, 192), (24, 3))
    assert not any(p.requires_grad for p in layer.parameters()) and layer.weight.dtype == torch.int8
    w = layer.dequantized()  # [24, 172]
    assert (w - linear.weight).abs().max() < linear.weight.abs().max() / 127  # close to the original weight
    assert_acts_as_its_dequantised_weight(layer, linear)


def saved_for_backward(fn):
    """The tensors autograd keeps for the backward while fn() runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


def test_backward_keeps_the_int8_weight_and_scales_not_a_float_copy():
    layer = Int8Linear.from_linear(nn.Linear(128, 96, bias=False))
    x = torch.randn(4, 128, requires_grad=True)
    saved, y = saved_for_backward(lambda: layer(x))
    assert len(saved) == 2
    assert all(t.untyped_storage().data_ptr() in (layer.weight.data_ptr(), layer.scales.data_ptr()) for t in saved)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 128]
    y.sum().backward()  # and the backward still works from those alone
    assert x.grad is not None
    # the check would catch the plain way, which keeps the dequantised float weight for every layer
    saved, _ = saved_for_backward(lambda: F.linear(x, layer.dequantized()))
    assert [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 128]


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_autocast_bf16_dequantises_in_bf16(monkeypatch, fmt):
    # in bf16, not in float32 and then cast by F.linear: that would make a float32 copy of the weight (twice bf16's)
    cls, name = {"int8": (Int8Linear, "dequantize_weight"), "nf4": (NF4Linear, "dequantize_nf4_weight")}[fmt]
    layer = cls.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, requires_grad=True)
    expected = F.linear(x.bfloat16(), layer.dequantized(torch.bfloat16), layer.bias.bfloat16())
    dtypes, dequantize = [], getattr(quantize, name)
    monkeypatch.setattr(quantize, name, lambda *a: dtypes.append(a[2]) or dequantize(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and dtypes == [torch.bfloat16]
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and dtypes == [torch.bfloat16] * 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_replaces_the_projections_and_skips_a_tied_output(fmt):
    quantize, layer_type, _ = FORMATS[fmt]
    model = quantize(Transformer(SMALL))
    names = {n for n, m in model.named_modules() if isinstance(m, layer_type)}
    projections = {f"layers.{i}.{w}" for i in range(2) for w in ("attention.wq", "attention.wk", "attention.wv",
                   "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    if fmt == "int8":  # int8 quantises the output layer too
        assert names == projections | {"output"} and not [m for m in model.modules() if type(m) is nn.Linear]
    else:  # NF4 keeps it float, as QLoRA keeps the LM head; keep=() quantises it too
        assert names == projections and [m for m in model.modules() if type(m) is nn.Linear] == [model.output]
        assert model.output.weight.dtype == torch.float32
        everything = quantize_nf4(Transformer(SMALL), keep=())
        assert {n for n, m in everything.named_modules() if isinstance(m, NF4Linear)} == projections | {"output"}
    assert model.tok_embeddings.weight.dtype == model.norm.weight.dtype == torch.float32  # left as they were
    tied = Transformer(ModelArgs(**{**vars(SMALL), "tie_word_embeddings": True}))
    quantize(tied)
    assert type(tied.output) is nn.Linear and tied.output.weight is tied.tok_embeddings.weight


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_bytes_counts_codes_scales_and_the_rest_on_meta_as_on_real_tensors(fmt):
    quantize, layer_type, per_block = FORMATS[fmt]
    for args in (SMALL, ModelArgs(**{**vars(SMALL), "tie_word_embeddings": True})):
        real = quantize(Transformer(args))
        with torch.device("meta"):
            meta = quantize(Transformer(args))
        assert stored_bytes(real) == stored_bytes(meta)
        assert {t.device.type for t in meta.state_dict().values()} == {"meta"}
        # by hand: int8 or NF4 codes (inputs padded to 64) + 2 bytes per scale, float32 embeddings (shared with a
        # tied output: counted once) and norms, and NF4's float32 output layer when it is untied
        linears = [m for m in real.modules() if isinstance(m, layer_type)]
        expected = sum(m.out_features * -(-m.in_features // 64) * per_block for m in linears)
        expected += 4 * (args.vocab_size * args.dim + args.dim * (2 * args.n_layers + 1))
        expected += 4 * args.vocab_size * args.dim if fmt == "nf4" and not args.tie_word_embeddings else 0
        assert stored_bytes(real) == expected


def stories260k_before_and_after(quantize_fn):
    """stories260K, its tokenizer, the prompt, and (logits, loss) on a story it wrote, before and after quantize_fn."""
    path = shared_path("models/stories260K-hf")
    model, tok = from_pretrained(path), Tokenizer.from_dir(path)
    prompt = tok.encode("Once upon a time")
    text = prompt + model.generate([prompt], 150)[0]
    x, y = torch.tensor([text[:-1]]), torch.tensor([text[1:]])
    before = model(x, y)
    quantize_fn(model)
    return model, tok, prompt, before, model(x, y)


def test_stories260k_quantised_logits_stay_close():
    model, tok, prompt, (logits, loss), (q_logits, q_loss) = stories260k_before_and_after(quantize_int8)
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    diff = (q_logits - logits).abs()
    # measured (torch 2.13, CPU): max 0.37, mean 0.057, logits' std 7.4; loss 0.474 -> 0.476; every argmax the same
    assert diff.max() < 1.0 and diff.mean() < 0.15
    assert (q_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.98
    assert abs(q_loss.item() - loss.item()) < 0.01
    # the KV cache takes the embeddings' dtype, not the int8 projections': generation still tells the story
    assert tok.decode(prompt + model.generate([prompt], 30)[0]).startswith(story[:80])


def test_tiny_base_config_quantised_logits_stay_close():
    model = Transformer(TINY_MODEL)  # random weights of std 0.02, as tiny_base.py starts from
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 64))
    logits, _ = model(x)
    quantize_int8(model)
    diff = (model(x)[0] - logits).abs()
    # measured: mean 0.8%, max 5% of the logits' std
    assert diff.mean() < 0.02 * logits.std() and diff.max() < 0.15 * logits.std()


def adapted_int8_model(base, seed=0, quantize=quantize_int8):
    model = quantize(copy.deepcopy(base))
    torch.manual_seed(seed)
    inject_moelora(model, MoELoRAConfig(num_experts=4, top_k=2, r=2, lora_alpha=4, lora_dropout=0.0,
                                        target_modules=("wq", "wv", "w2"), contrastive_weight=0.1, contrastive_samples=32))
    return mark_only_moelora_as_trainable(model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_moelora_trains_on_a_quantised_base_which_stays_unchanged(tmp_path, fmt):
    quantize, layer_type, _ = FORMATS[fmt]
    torch.manual_seed(0)
    base = Transformer(SMALL)
    model = adapted_int8_model(base, quantize=quantize)
    w2 = model.layers[0].feed_forward.w2
    assert isinstance(w2, MoELoRALinear) and isinstance(w2.base_layer, layer_type) and w2.weight is None
    assert "layers.0.feed_forward.w2.base_layer.weight" in model.state_dict()
    x = torch.randint(0, SMALL.vocab_size, (4, 32))
    with torch.no_grad():  # B = 0: the injected model is the quantised base, computed through each wrapped layer
        assert torch.equal(model(x)[0], quantize(copy.deepcopy(base))(x)[0])
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n and "router" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n, _ in moelora_layers(model) for k in ("lora_A", "lora_B", "router.weight")}
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        (loss + sum(moelora_aux_losses(model).values())).backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in frozen.items())  # int8 or NF4 codes, scales, norms, embeddings
    # the adapter, saved and loaded onto a freshly quantised copy of the same base, gives the same logits
    save_moelora(model, tmp_path / "adapter.safetensors")
    fresh = load_moelora(quantize(copy.deepcopy(base)), tmp_path / "adapter.safetensors")
    model.eval(), fresh.eval()
    assert torch.equal(model(x)[0], fresh(x)[0])
    assert not any(".base_layer." in k for k in moelora_state_dict(model))  # adapters only, never the base
    # quantising the same base again gives the same bits: a resumed run meets the base it trained on
    first, second = (quantize(copy.deepcopy(base)).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], v) for k, v in second.items())


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpointing_on_a_quantised_base_gives_the_same_gradients(fmt):
    torch.manual_seed(0)
    model = adapted_int8_model(Transformer(SMALL), quantize=FORMATS[fmt][0])
    x = torch.randint(0, SMALL.vocab_size, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        _, loss = model(x, x)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_orders_and_merging_a_quantised_base_are_errors(fmt):
    quantize = FORMATS[fmt][0]
    model = adapted_int8_model(Transformer(SMALL), quantize=quantize)
    with pytest.raises(ValueError, match=f"quantize_{fmt}: .*quantise the base first"):
        quantize(model)
    with pytest.raises(ValueError, match="base is quantised"):
        merge_moelora(model)
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no nn.Linear.*'w2', 'w3', 'wk', 'wo', 'wq', 'wv'"):
        inject_moelora(quantize(Transformer(SMALL)), MoELoRAConfig(target_modules=("wq", "q_proj")))
    with pytest.raises(RuntimeError, match="floating point"):  # full fine-tuning cannot train an int8 or NF4 base
        quantize(Transformer(SMALL)).requires_grad_(True)
    # a base quantised in one format, quantised again in the other: an error, not a silent no-op
    other = quantize_nf4 if fmt == "int8" else quantize_int8
    with pytest.raises(ValueError, match="quantised already"):
        other(quantize(Transformer(SMALL)))
    again = quantize(Transformer(SMALL))  # the same format twice: nothing left to quantise, nothing changes
    state = {k: v.clone() for k, v in again.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in quantize(again).state_dict().items())


def test_every_checkpoint_format_quantises_to_the_same_bits():
    # quantize_int8 runs on the loaded model, after checkpoints.py has read any format: stories260K exported by
    # llama2.c (.bin) and by Hugging Face (safetensors) become the same int8 blocks. (The .bin ties its classifier to
    # the embeddings, which stays float; the HF export stores lm_head, which is quantised.)
    hf = quantize_int8(from_pretrained(shared_path("models/stories260K-hf"))).state_dict()
    bin_ = quantize_int8(from_pretrained(shared_path("models/stories260K/stories260K.bin"))).state_dict()
    blocks = [k for k in hf if k.startswith("layers.")]
    assert sum(hf[k].dtype == torch.int8 for k in blocks) == 7 * 5  # wq wk wv wo w1 w2 w3 in each of 5 layers
    assert all(torch.equal(hf[k], bin_[k]) for k in blocks)
    assert hf["output.weight"].dtype == torch.int8 and bin_["output.weight"].dtype == torch.float32


# -----------------------------------------------------------------------------------------------------
# NF4

def normal_float_levels():
    """QLoRA's construction of the NF4 levels, in float64: the quantiles of N(0, 1) at 8 probabilities evenly spaced
    from 0.5 to 0.9677083 (0.5 left out) and the negatives of 7, an exact 0, divided by the largest."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return levels / levels.max()


def unpack(codes):
    """[out, in_padded // 2] uint8 -> [out, in_padded] codes 0 .. 15, each byte's high 4 bits first (written here from
    the format, not taken from quantize.py)."""
    return torch.stack((codes // 16, codes % 16), dim=-1).flatten(1).long()


def test_nf4_levels_are_qloras_normal_quantiles():
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    assert len(NF4_LEVELS) == 16 and (levels.diff() > 0).all()
    assert (NF4_LEVELS[0], NF4_LEVELS[7], NF4_LEVELS[15]) == (-1.0, 0.0, 1.0)  # exact
    assert int((levels > 0).sum()) == 8 and int((levels < 0).sum()) == 7
    # the published float32 values: 1.1e-7 from the float64 construction (float32's rounding) measured
    torch.testing.assert_close(levels, normal_float_levels(), rtol=0, atol=2e-7)
    # what the quantiles are for: normal weights, each over its block's absmax, use the 16 codes about equally often.
    # Measured: 3.88 bits of 4 (evenly spaced levels in [-1, 1] would give 3.60)
    codes, _ = quantize_nf4_weight(torch.randn(256, 1024))
    p = torch.bincount(unpack(codes).flatten(), minlength=16) / codes.numel() / 2
    assert -(p * p.log2()).sum() > 3.85


def test_nf4_round_trip_gives_each_weight_its_nearest_level_padded_last_block_included():
    w = varied_weight(12, 172)  # blocks of 64, 64 and 44 (+ 20 zeros of padding)
    codes, scales = quantize_nf4_weight(w, block_size=64)
    assert codes.dtype == torch.uint8 and codes.shape == (12, 96) and scales.shape == (12, 3)
    assert scales.dtype == torch.bfloat16
    c = unpack(codes)  # [12, 192]
    assert (c[:, 172:] == 7).all()  # the padding: the code of the level 0
    levels = torch.tensor(NF4_LEVELS)
    s = scales.float().repeat_interleave(64, dim=1)  # [12, 192]: each weight's scale
    dist = (F.pad(w, (0, 20)).div(s).unsqueeze(-1) - levels).abs()  # [12, 192, 16]: |w / s - each level|
    assert (dist.gather(-1, c.unsqueeze(-1)).squeeze(-1) <= dist.min(dim=-1).values + 1e-6).all()  # the nearest
    decoded = dequantize_nf4_weight(codes, scales, torch.float32, 172)
    assert decoded.shape == (12, 172)
    assert torch.equal(decoded, (levels[c] * s)[:, :172])  # level times scale, nothing else
    # the bound that follows: half the widest gap between levels (-1 and -0.696) times the scale
    half_gap = levels.diff().max().item() / 2
    assert abs(half_gap - 0.1519) < 1e-4
    err = (decoded - w).abs()
    assert (err <= half_gap * s[:, :172] * (1 + 1e-6)).all()
    # the scale is the block's absmax (up to bf16's rounding), so each block's largest weight gets the level -1 or 1
    amax = F.pad(w, (0, 20)).view(12, 3, 64).abs().amax(dim=-1)
    nonzero = amax > 0
    torch.testing.assert_close(scales.float()[nonzero], amax[nonzero], rtol=2 ** -8, atol=0)
    assert ((c.view(12, 3, 64) == 0) | (c.view(12, 3, 64) == 15)).any(dim=-1)[nonzero].all()
    assert (err[0, :64] == 0).all() and (c[0, :64] == 7).all()  # an all-zero block: no division by zero
    q2, scales2 = quantize_nf4_weight(w.clone())  # deterministic
    assert torch.equal(codes, q2) and torch.equal(scales, scales2)
    with pytest.raises(ValueError, match="even"):
        quantize_nf4_weight(w, block_size=33)


def test_nf4_quantises_a_few_rows_at_a_time_to_the_same_bits(monkeypatch):
    w = varied_weight(37, 200).bfloat16()  # in padded to 256
    whole = quantize_nf4_weight(w, chunk_rows=37)
    searched = []  # the number of values each nearest-level search sees
    bucketize = torch.bucketize
    monkeypatch.setattr(torch, "bucketize", lambda x, *a, **k: searched.append(x.numel()) or bucketize(x, *a, **k))
    for rows in (1, 5, 16, 256):
        searched.clear()
        codes, scales = quantize_nf4_weight(w, chunk_rows=rows)
        assert torch.equal(codes, whole[0]) and torch.equal(scales, whole[1])
        assert max(searched) == min(rows, 37) * 256
    searched.clear()
    quantize_nf4_weight(torch.randn(600, 64))  # the default: 256 rows at a time
    assert searched == [256 * 64, 256 * 64, 88 * 64]


def test_nf4_linear_forward_and_input_gradient_are_those_of_the_dequantised_weight():
    torch.manual_seed(0)
    linear = nn.Linear(172, 24, bias=True)
    layer = NF4Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features, layer.weight.shape, layer.scales.shape) == (172, 24, (24, 96), (24, 3))
    assert not any(p.requires_grad for p in layer.parameters()) and layer.weight.dtype == torch.uint8
    assert "block_size=64, nf4" in repr(layer)
    w = layer.dequantized()  # [24, 172]
    # close to the original weight: within 0.152 of each block's absmax, so of the whole weight's
    assert (w - linear.weight).abs().max() < 0.152 * linear.weight.abs().max()
    assert_acts_as_its_dequantised_weight(layer, linear)
    # an NF4Linear not yet filled computes 0, as an Int8Linear's zeros do
    assert (NF4Linear(172, 24).dequantized() == 0).all()


def test_nf4_backward_keeps_the_packed_codes_and_scales_not_a_float_copy():
    layer = NF4Linear.from_linear(nn.Linear(128, 96, bias=False))
    x = torch.randn(4, 128, requires_grad=True)
    saved, y = saved_for_backward(lambda: layer(x))
    assert len(saved) == 2 and {t.dtype for t in saved} == {torch.uint8, torch.bfloat16}
    assert all(t.untyped_storage().data_ptr() in (layer.weight.data_ptr(), layer.scales.data_ptr()) for t in saved)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 128]
    y.sum().backward()  # and the backward still works from those alone
    torch.testing.assert_close(x.grad, torch.ones(4, 96) @ layer.dequantized())
    # the check would catch the plain way, which keeps the dequantised float weight for every layer
    saved, _ = saved_for_backward(lambda: F.linear(x, layer.dequantized()))
    assert [t for t in saved if t.is_floating_point() and t.numel() >= 96 * 128]


def test_stories260k_nf4_logits_stay_close():
    model, tok, prompt, (logits, loss), (q_logits, q_loss) = stories260k_before_and_after(quantize_nf4)
    assert type(model.output) is nn.Linear  # the output layer stays float32
    diff = (q_logits - logits).abs()
    # measured (torch 2.13, CPU): max 6.7, mean 0.80 (10.9% of the logits' std 7.4; int8: 0.8%); loss 0.474 -> 0.578;
    # 91% of the argmax the same. 4 bits are coarse for a model of width 64: see benchmarks/README.md's NF4 section
    assert diff.max() < 10 and diff.mean() < 1.2
    assert (q_logits.argmax(-1) == logits.argmax(-1)).float().mean() > 0.82
    assert abs(q_loss.item() - loss.item()) < 0.2
    # the output layer in NF4 too (keep=()) moves the loss further: measured 0.474 -> 0.614, 84% of the argmax the same
    _, _, _, _, (_, all_loss) = stories260k_before_and_after(lambda m: quantize_nf4(m, keep=()))
    assert all_loss.item() > q_loss.item() + 0.02
    # greedy generation keeps the story's first sentence and a half (it parts at "She loved to play ...")
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    assert tok.decode(prompt + model.generate([prompt], 30)[0]).startswith(story[:60])
