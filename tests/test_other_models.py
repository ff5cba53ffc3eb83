"""moelora.py in models that are not ours: PyTorch's transformer modules (whose fast paths and fused attention
bypass child layers) and Hugging Face's LLaMA with activation checkpointing. Tiny sizes, CPU, seconds."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import moelora
from moelora import MoELoRAConfig, inject_moelora, mark_only_moelora_as_trainable, moelora_aux_losses

MODES = ["train", "eval", "eval+no_grad", "train+no_grad"]


def config(targets, **kw):
    return MoELoRAConfig(**{"num_experts": 4, "top_k": 2, "r": 2, "lora_dropout": 0.0, "contrastive_samples": 32,
                            "contrastive_weight": 0.1, "target_modules": targets, **kw})


def adapted(module, targets):
    """(the module, a copy with adapters whose B is not zero): a fresh adapter is the identity, which hides a bypass."""
    torch.manual_seed(0)
    model = mark_only_moelora_as_trainable(inject_moelora(copy.deepcopy(module), config(targets)))  # base frozen
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0, 0.5)
    return module, model


def run(module, mode, *inputs, **kw):
    module.train("train" in mode)
    with torch.no_grad() if "no_grad" in mode else contextlib.nullcontext():
        return module(*inputs, **kw)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_transformer_encoder_layer_adapters_act_in_every_mode(mode, batch_first):
    # eval mode used to take PyTorch's fused fast path, which reads linear1.weight directly: the output was the
    # base model's, exactly. Every mode must now give the same (adapted) output as training mode.
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    base, model = adapted(layer, ("linear1", "linear2"))
    x = torch.randn(3, 5, 16)
    reference = run(model, "train", x)
    out = run(model, mode, x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)  # the fused kernels round differently
    assert not torch.allclose(out, run(base, mode, x), atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_encoder_stack_with_padding_mask_adapters_act(mode):
    # in eval mode with a key padding mask, nn.TransformerEncoder turns the batch into a nested tensor and each
    # layer takes its fast path; both are switched off for adapted layers
    stack = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), num_layers=2,
                                  enable_nested_tensor=True)
    base, model = adapted(stack, ("linear1", "linear2"))
    x = torch.randn(3, 6, 16)
    pad = torch.arange(6)[None, :] >= torch.tensor([6, 3, 4])[:, None]  # True = padding (PyTorch's convention)
    real = ~pad
    reference = run(model, "train", x, src_key_padding_mask=pad)
    out = run(model, mode, x, src_key_padding_mask=pad)
    torch.testing.assert_close(out[real], reference[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[real], run(base, mode, x, src_key_padding_mask=pad)[real], atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_transformer_decoder_layer_adapters_act(mode):
    layer = nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    base, model = adapted(layer, ("linear1", "linear2"))
    tgt, memory = torch.randn(2, 4, 16), torch.randn(2, 5, 16)
    reference = run(model, "train", tgt, memory)
    torch.testing.assert_close(run(model, mode, tgt, memory), reference)
    assert not torch.allclose(run(model, mode, tgt, memory), run(base, mode, tgt, memory), atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_full_transformer_and_adaptive_softmax_adapters_act(mode):
    # the other PyTorch modules with nn.Linear children: nn.Transformer (encoder fast path inside) and
    # nn.AdaptiveLogSoftmaxWithLoss, which calls its head and its tail projections as modules
    transformer = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)
    base, model = adapted(transformer, ("linear1", "linear2"))
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    torch.testing.assert_close(run(model, mode, src, tgt), run(model, "train", src, tgt), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(model, mode, src, tgt), run(base, mode, src, tgt), atol=1e-3)
    softmax = nn.AdaptiveLogSoftmaxWithLoss(16, 20, cutoffs=[5, 10], div_value=2.0)
    base, model = adapted(softmax, ("head",))
    x = torch.randn(6, 16)
    model.train("train" in mode), base.train("train" in mode)
    with torch.no_grad() if "no_grad" in mode else contextlib.nullcontext():
        assert not torch.allclose(model.log_prob(x), base.log_prob(x), atol=1e-3)


@pytest.mark.parametrize("module, path", [
    (lambda: nn.MultiheadAttention(16, 2, batch_first=True), "out_proj"),
    (lambda: nn.TransformerEncoderLayer(16, 2, 32), "self_attn.out_proj"),
    (lambda: nn.TransformerDecoderLayer(16, 2, 32), "self_attn.out_proj"),  # and multihead_attn.out_proj
    (lambda: nn.Transformer(16, 2, 1, 1, 32), "encoder.layers.0.self_attn.out_proj"),
])
def test_multihead_attention_out_proj_is_refused(module, path):
    # nn.MultiheadAttention never calls out_proj: an adapter there would train nothing, silently
    with pytest.raises(ValueError, match=rf"cannot adapt '{path}' \(nn.MultiheadAttention reads out_proj.weight.*"
                                         r"Leave these names out of target_modules"):
        inject_moelora(module(), config(("out_proj",)))
    with pytest.raises(ValueError, match=r"\['in_proj'\] match no nn.Linear.*in_proj_weight Parameter"):
        inject_moelora(module(), config(("in_proj",)))


def test_linear_cross_entropy_loss_is_refused():
    if not hasattr(nn, "LinearCrossEntropyLoss"):
        pytest.skip("nn.LinearCrossEntropyLoss is new in torch 2.13")

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = nn.LinearCrossEntropyLoss(16, 10)

    with pytest.raises(ValueError, match=r"'loss.linear' \(nn.LinearCrossEntropyLoss reads linear.weight"):
        inject_moelora(Head(), config(("linear",)))


def test_a_layer_that_its_parent_bypasses_is_reported():
    class Fused(nn.Module):  # a module of somebody else's that uses a child's weight without calling it
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.relu(x @ self.up.weight.T + self.up.bias))

    model = inject_moelora(Fused(), config(("up", "down")))
    model(torch.randn(2, 3, 16))
    assert not model.up._has_run and model.down._has_run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = moelora_aux_losses(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "1 adapted layer(s) never ran a forward (first: up)" in messages[0], messages
    assert set(losses) == {"contrastive", "balance", "router_z"} and losses["balance"] > 0  # down's still come back


def tiny_hf_llama():
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install -r requirements-dev.txt)")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    mark_only_moelora_as_trainable(inject_moelora(model, config(("q_proj", "v_proj"))))
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    return model


def hf_batch():
    tokens = torch.randint(3, 64, (2, 8))
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return tokens, attention_mask


def test_hugging_face_checkpointing_default_trains_the_routers_with_the_mask():
    model = tiny_hf_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notice
        model.gradient_checkpointing_enable()  # transformers' default: use_reentrant=False
    model.train()
    tokens, attention_mask = hf_batch()
    with moelora.moelora_token_mask(model, attention_mask.bool()):
        model(tokens, attention_mask=attention_mask, labels=tokens)
    aux = moelora_aux_losses(model)
    assert aux["balance"].requires_grad and aux["contrastive"].requires_grad
    # the auxiliary losses alone, backward after the with: each layer's forward is recomputed, with the mask
    sum(aux.values()).backward()
    assert model.model.layers[0].self_attn.q_proj.router.weight.grad.abs().sum() > 0


def test_hugging_face_reentrant_checkpointing_is_refused_at_the_first_step():
    # the reentrant variant runs each layer's forward under torch.no_grad(): the losses would come back without
    # gradient and the routers would learn nothing from them; say so instead
    model = tiny_hf_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    tokens, attention_mask = hf_batch()
    model(tokens, attention_mask=attention_mask, labels=tokens)
    with pytest.raises(RuntimeError, match=r"computed without gradient.*use_reentrant=False"):
        moelora_aux_losses(model)
    with torch.no_grad():  # reading them for a log is fine
        moelora_aux_losses(model)
