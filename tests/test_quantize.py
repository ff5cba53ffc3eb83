"""Tests of quantize.py: the int8 base, on tiny models and the real stories260K checkpoint, float32 on CPU, seconds."""

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
from quantize import Int8Linear, dequantize_weight, quantize_int8, quantize_weight, stored_bytes
from tiny_base import TINY_MODEL
from tokenizer import Tokenizer

# hidden_dim 100: w2's input is no multiple of 64, so its last group is padded (as stories260K's 172)
SMALL = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=100, max_seq_len=64)


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


def test_int8_linear_forward_and_input_gradient_are_those_of_the_dequantised_weight():
    torch.manual_seed(0)
    linear = nn.Linear(172, 24, bias=True)
    layer = Int8Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features, layer.weight.shape, layer.scales.shape) == (172, 24, (24, 192), (24, 3))
    assert not any(p.requires_grad for p in layer.parameters()) and layer.weight.dtype == torch.int8
    w = layer.dequantized()  # [24, 172]
    assert (w - linear.weight).abs().max() < linear.weight.abs().max() / 127  # close to the original weight
    x = torch.randn(3, 5, 172, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x_ref, w, linear.bias.detach()))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    F.linear(x_ref, w, linear.bias.detach()).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.weight.grad is None and layer.scales.grad is None


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


def test_autocast_bf16_dequantises_in_bf16(monkeypatch):
    # in bf16, not in float32 and then cast by F.linear: that would make a float32 copy of the weight (twice bf16's)
    layer = Int8Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(2, 64, requires_grad=True)
    expected = F.linear(x.bfloat16(), layer.dequantized(torch.bfloat16), layer.bias.bfloat16())
    dtypes = []
    monkeypatch.setattr(quantize, "dequantize_weight", lambda *a: dtypes.append(a[2]) or dequantize_weight(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and dtypes == [torch.bfloat16]
    torch.testing.assert_close(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and dtypes == [torch.bfloat16] * 2


def test_quantize_int8_replaces_the_projections_and_skips_a_tied_output():
    model = quantize_int8(Transformer(SMALL))
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert names == {f"layers.{i}.{w}" for i in range(2) for w in ("attention.wq", "attention.wk", "attention.wv",
                     "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")} | {"output"}
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert model.tok_embeddings.weight.dtype == model.norm.weight.dtype == torch.float32  # left as they were
    tied = Transformer(ModelArgs(**{**vars(SMALL), "tie_word_embeddings": True}))
    quantize_int8(tied)
    assert type(tied.output) is nn.Linear and tied.output.weight is tied.tok_embeddings.weight


def test_stored_bytes_counts_int8_scales_and_the_rest_on_meta_as_on_real_tensors():
    for args in (SMALL, ModelArgs(**{**vars(SMALL), "tie_word_embeddings": True})):
        real = quantize_int8(Transformer(args))
        with torch.device("meta"):
            meta = quantize_int8(Transformer(args))
        assert stored_bytes(real) == stored_bytes(meta)
        # by hand: int8 linears (inputs padded to 64) + 2 bytes per scale, float32 embeddings (shared with a tied
        # output: counted once) and norms
        linears = [m for m in real.modules() if isinstance(m, Int8Linear)]
        expected = sum(m.out_features * -(-m.in_features // 64) * (64 + 2) for m in linears)
        expected += 4 * (args.vocab_size * args.dim + args.dim * (2 * args.n_layers + 1))
        assert stored_bytes(real) == expected


def test_stories260k_quantised_logits_stay_close():
    path = shared_path("models/stories260K-hf")
    model = from_pretrained(path)
    tok = Tokenizer.from_dir(path)
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    prompt = tok.encode("Once upon a time")
    text = prompt + model.generate([prompt], 150)[0]
    x, y = torch.tensor([text[:-1]]), torch.tensor([text[1:]])
    logits, loss = model(x, y)
    quantize_int8(model)
    q_logits, q_loss = model(x, y)
    diff = (q_logits - logits).abs()
    # measured (torch 2.13, CPU): max 0.37, mean 0.056, logits' std 7.4; loss 0.620 -> 0.622; every argmax the same
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


def adapted_int8_model(base, seed=0):
    model = quantize_int8(copy.deepcopy(base))
    torch.manual_seed(seed)
    inject_moelora(model, MoELoRAConfig(num_experts=4, top_k=2, r=2, lora_alpha=4, lora_dropout=0.0,
                                        target_modules=("wq", "wv", "w2"), contrastive_weight=0.1, contrastive_samples=32))
    return mark_only_moelora_as_trainable(model)


def test_moelora_trains_on_an_int8_base_which_stays_unchanged(tmp_path):
    torch.manual_seed(0)
    base = Transformer(SMALL)
    model = adapted_int8_model(base)
    w2 = model.layers[0].feed_forward.w2
    assert isinstance(w2, MoELoRALinear) and isinstance(w2.base_layer, Int8Linear) and w2.weight is None
    assert "layers.0.feed_forward.w2.base_layer.weight" in model.state_dict()
    x = torch.randint(0, SMALL.vocab_size, (4, 32))
    with torch.no_grad():  # B = 0: the injected model is the int8 base, computed through each wrapped Int8Linear
        assert torch.equal(model(x)[0], quantize_int8(copy.deepcopy(base))(x)[0])
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
    assert all(torch.equal(state[n], t) for n, t in frozen.items())  # int8 weights, scales, norms, embeddings
    # the adapter, saved and loaded onto a freshly quantised copy of the same base, gives the same logits
    save_moelora(model, tmp_path / "adapter.safetensors")
    fresh = load_moelora(quantize_int8(copy.deepcopy(base)), tmp_path / "adapter.safetensors")
    model.eval(), fresh.eval()
    assert torch.equal(model(x)[0], fresh(x)[0])
    assert not any(".base_layer." in k for k in moelora_state_dict(model))  # adapters only, never the base
    # quantising the same base again gives the same bits: a resumed run meets the base it trained on
    first, second = (quantize_int8(copy.deepcopy(base)).state_dict() for _ in range(2))
    assert all(torch.equal(first[k], v) for k, v in second.items())


def test_checkpointing_on_an_int8_base_gives_the_same_gradients():
    torch.manual_seed(0)
    model = adapted_int8_model(Transformer(SMALL))
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


def test_wrong_orders_and_merging_an_int8_base_are_errors():
    model = adapted_int8_model(Transformer(SMALL))
    with pytest.raises(ValueError, match="quantise the base first"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="base is quantised"):
        merge_moelora(model)
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no nn.Linear.*'w2', 'w3', 'wk', 'wo', 'wq', 'wv'"):
        inject_moelora(quantize_int8(Transformer(SMALL)), MoELoRAConfig(target_modules=("wq", "q_proj")))
    with pytest.raises(RuntimeError, match="floating point"):  # full fine-tuning cannot train an int8 base
        quantize_int8(Transformer(SMALL)).requires_grad_(True)


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
