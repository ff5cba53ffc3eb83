"""Tests of moelora.py: tiny layers on CPU, seconds in all."""

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_py
import moelora
from moelora import (MoELoRAConfig, MoELoRALinear, balance_loss, contrastive_loss, inject_moelora,
                     load_moelora_state_dict, mark_only_moelora_as_trainable, merge_moelora,
                     moelora_aux_losses, moelora_routing_stats, moelora_state_dict)


class TinyAttention(nn.Module):
    """Just enough of an attention block to carry LLaMA's projection names."""

    def __init__(self, dim=16):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):  # x [B, T, dim]
        att = (self.wq(x) @ self.wk(x).transpose(1, 2) / math.sqrt(x.shape[-1])).softmax(-1)  # [B, T, T]
        return self.wo(att @ self.wv(x))


class TinyNet(nn.Module):
    def __init__(self, dim=16, n_layers=2):
        super().__init__()
        self.layers = nn.ModuleList(TinyAttention(dim) for _ in range(n_layers))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def small_config(**kw):
    kw = {"num_experts": 4, "top_k": 2, "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "contrastive_samples": 32,
          "contrastive_weight": 0.1, **kw}  # the contrastive loss on, whatever the default: these tests exercise it
    return MoELoRAConfig(**kw)


def randomize_B(model, std=0.1):
    """B starts at zero, which hides most bugs: give the experts something to say."""
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0, std)


def test_config_defaults_and_validation():
    c = MoELoRAConfig()
    assert (c.num_experts, c.top_k, c.target_modules) == (8, 2, ("wq", "wv"))
    for bad, word in [({"top_k": 9}, "top_k"), ({"num_experts": 0}, "num_experts"), ({"r": 0}, "r 0 must"),
                      ({"lora_dropout": 1.0}, "lora_dropout"), ({"contrastive_temperature": 0}, "temperature"),
                      ({"contrastive_samples": 1}, "contrastive_samples"), ({"target_modules": ()}, "empty"),
                      ({"balance_weight": -1}, "balance_weight"), ({"gate": "softmax"}, "gate 'softmax' must be one of"),
                      ({"router_z_weight": -1e-3}, "router_z_weight"), ({"router_jitter": 1.0}, "router_jitter"),
                      ({"top_k": 1}, "top_k 1 with gate 'mixtral' would train no router.*use gate 'switch'")]:
        with pytest.raises(ValueError, match=word):
            MoELoRAConfig(**bad)
    with pytest.raises(TypeError, match="list of names"):
        MoELoRAConfig(target_modules="wq")
    MoELoRAConfig(top_k=1, gate="switch")  # a top-1 router that learns
    MoELoRAConfig(num_experts=1, top_k=1)  # plain LoRA: no router, either gate


def test_fresh_injection_is_identity_and_only_adapters_train():
    model = TinyNet()
    x = torch.randn(2, 5, 16)
    before = model(x)
    base_state = copy.deepcopy(model.state_dict())
    inject_moelora(model, small_config())
    mark_only_moelora_as_trainable(model)
    assert torch.equal(model(x), before)  # B = 0: bit for bit the base model
    assert set(model.state_dict()) >= set(base_state)  # base keys unchanged by the wrapping
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-1] in ("lora_A", "lora_B") or n.endswith("router.weight") for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # 2 layers x (wq, wv) x (A, B, router)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # decay must not touch frozen weights
    for _ in range(3):
        loss = model(x).pow(2).mean() + sum(moelora_aux_losses(model).values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert not torch.equal(model(x), before)  # ... while the adapters did learn


def test_one_expert_top1_is_lora_by_hand():
    base = nn.Linear(12, 10)
    layer = MoELoRALinear(copy.deepcopy(base), small_config(num_experts=1, top_k=1, r=3, lora_alpha=6))
    randomize_B(layer)
    x = torch.randn(4, 7, 12)
    A, B = layer.lora_A[0], layer.lora_B[0]  # [r, in], [out, r]
    expected = base(x) + (6 / 3) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


def test_one_expert_top1_matches_peft_lora():
    peft = pytest.importorskip("peft", reason="peft not installed (pip install -r requirements-dev.txt)")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(12, 10)

        def forward(self, x):
            return self.proj(x)

    ours, theirs = Net(), Net()
    theirs.load_state_dict(ours.state_dict())
    inject_moelora(ours, small_config(num_experts=1, top_k=1, r=4, lora_alpha=8, target_modules=("proj",)))
    randomize_B(ours)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"]), theirs)
    with torch.no_grad():
        theirs.proj.lora_A["default"].weight.copy_(ours.proj.lora_A[0])
        theirs.proj.lora_B["default"].weight.copy_(ours.proj.lora_B[0])
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), theirs(x))


def test_gates_top_k_sum_to_one_and_router_learns():
    layer = MoELoRALinear(nn.Linear(16, 8), small_config(num_experts=6, top_k=3))
    randomize_B(layer)
    x = torch.randn(50, 16)
    gates, top_idx, logits = layer.route(x)
    assert gates.shape == (50, 6) and top_idx.shape == (50, 3)
    assert ((gates > 0).sum(-1) == 3).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    assert torch.equal(gates.gather(-1, top_idx) > 0, torch.ones(50, 3, dtype=torch.bool))
    assert torch.equal(top_idx.sort(-1).values, logits.topk(3, -1).indices.sort(-1).values)
    layer.eval()  # no auxiliary losses: the router's gradient must come through the gates alone
    layer(x).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_gate_trains_the_router_from_the_task_at_any_k(top_k):
    layer = MoELoRALinear(nn.Linear(16, 8), small_config(num_experts=6, top_k=top_k, gate="switch", balance_weight=0.0))
    randomize_B(layer)
    x = torch.randn(50, 16)
    gates, top_idx, logits = layer.route(x)
    probs = logits.softmax(-1)
    torch.testing.assert_close(gates.gather(-1, top_idx), probs.topk(top_k, -1).values)  # kept as they are
    assert (gates.sum(-1) < 1).all() and ((gates > 0).sum(-1) == top_k).all()
    layer.eval()  # no auxiliary loss: the task alone
    layer(x).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 1e-3


def test_mixtral_gate_at_top_1_sends_the_router_nothing_which_is_why_it_is_refused():
    # what the config's error prevents, shown by going around it: a softmax over one kept logit is the constant 1
    layer = MoELoRALinear(nn.Linear(16, 8), small_config(num_experts=6, top_k=2, balance_weight=0.0)).eval()
    layer.config.top_k = 1  # past __post_init__'s check
    randomize_B(layer)
    layer(torch.randn(50, 16)).pow(2).sum().backward()
    assert torch.equal(layer.router.weight.grad, torch.zeros_like(layer.router.weight))


def test_the_two_gates_agree_once_switch_s_is_renormalised():
    torch.manual_seed(0)
    mixtral = MoELoRALinear(nn.Linear(16, 8), small_config(num_experts=6, top_k=3))
    switch = copy.deepcopy(mixtral)
    switch.config = small_config(num_experts=6, top_k=3, gate="switch")
    x = torch.randn(40, 16)
    g_mix, idx_mix, _ = mixtral.route(x)
    g_sw, idx_sw, _ = switch.route(x)
    assert torch.equal(idx_mix, idx_sw)  # the same experts: softmax keeps the order of the logits
    torch.testing.assert_close(g_sw / g_sw.sum(-1, keepdim=True), g_mix)


@pytest.mark.parametrize("gate,top_k", [("mixtral", 2), ("switch", 1), ("switch", 2)])
def test_layer_output_equals_a_loop_over_tokens_and_experts(gate, top_k):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = MoELoRALinear(copy.deepcopy(base), small_config(num_experts=5, top_k=top_k, r=3, gate=gate)).eval()
    randomize_B(layer)
    x = torch.randn(2, 6, 12)
    expected = []
    for token in x.reshape(-1, 12):
        logits = layer.router.weight @ token  # [N]
        if gate == "switch":
            gates, chosen = logits.softmax(0).topk(top_k)
        else:
            top, chosen = logits.topk(top_k)
            gates = top.softmax(0)
        y = base(token)
        for g, e in zip(gates, chosen):
            y = y + g * layer.scaling * layer.lora_B[e] @ (layer.lora_A[e] @ token)
        expected.append(y)
    torch.testing.assert_close(layer(x), torch.stack(expected).view(2, 6, 10))


def test_router_jitter_scales_the_router_input_in_training_only():
    eps = 0.2
    layer = MoELoRALinear(nn.Linear(16, 8), small_config(num_experts=4, router_jitter=eps, contrastive_weight=0.0))
    randomize_B(layer)
    x = torch.randn(30, 16)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(1 - eps, 1 + eps)  # the draw the layer made
    assert noise.min() >= 1 - eps and noise.max() <= 1 + eps and noise.std() > eps / 4
    torch.testing.assert_close(layer.last_logits, layer.router(x * noise))
    assert not torch.allclose(layer.last_logits, layer.router(x))
    # the experts see x itself, gated by the jittered routing
    logits = layer.router(x * noise)
    top, idx = logits.topk(2, -1)
    gates = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))  # [M, N]
    codes = torch.einsum("nri,mi->mnr", layer.lora_A, x) * gates[..., None]  # [M, N, r] each expert's gated A_i x
    expected = F.linear(x, layer.weight, layer.bias) + layer.scaling * torch.einsum("nor,mnr->mo", layer.lora_B, codes)
    torch.testing.assert_close(y, expected)
    layer.eval()(x)
    torch.testing.assert_close(layer.last_logits, layer.router(x))  # eval: no noise


def test_router_z_loss_by_hand_with_padding():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 5.0, 5.0]])
    real = torch.tensor([True, True, False])
    by_hand = [math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()]
    torch.testing.assert_close(moelora.router_z_loss(logits), torch.tensor(sum(by_hand) / 3))
    torch.testing.assert_close(moelora.router_z_loss(logits, real), torch.tensor(sum(by_hand[:2]) / 2))
    # batched over layers with one mask per layer
    stacked = torch.stack([logits, 2 * logits])
    want = torch.stack([moelora.router_z_loss(logits, real), moelora.router_z_loss(2 * logits, real)])
    torch.testing.assert_close(moelora.router_z_loss(stacked, real), want)


def test_contrastive_loss_finite_with_gradients_into_A_and_B():
    layer = MoELoRALinear(nn.Linear(16, 16), small_config(contrastive_weight=0.5))
    randomize_B(layer)
    layer(torch.randn(2, 20, 16))
    loss = moelora_aux_losses(layer)["contrastive"]
    assert torch.isfinite(loss) and loss > 0
    A_grad, B_grad = torch.autograd.grad(loss, [layer.lora_A, layer.lora_B])
    assert A_grad.abs().sum() > 0 and B_grad.abs().sum() > 0


def test_contrastive_loss_matches_the_formula_written_out():
    z, labels, tau = torch.randn(7, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3]), 0.2
    cos = F.cosine_similarity(z[:, None], z[None, :], dim=-1) / tau  # [S, S]
    per_anchor = []
    for a in range(7):
        positives = [p for p in range(7) if p != a and labels[p] == labels[a]]
        if positives:  # anchors 3 and 6 have none: skipped
            denominator = torch.stack([cos[a, n] for n in range(7) if n != a]).logsumexp(0)
            per_anchor.append(-torch.stack([cos[a, p] - denominator for p in positives]).mean())
    torch.testing.assert_close(contrastive_loss(z @ z.T, labels, tau, 1e-6), torch.stack(per_anchor).mean())


def test_contrastive_loss_prefers_separated_experts():
    # two hand-built layers over the same tokens and routing: experts that write into disjoint output
    # coordinates (separated) against experts that all share one A and one B (coinciding outputs)
    cfg = small_config(num_experts=4, top_k=2, r=2, contrastive_samples=64, contrastive_weight=1.0)
    separated = MoELoRALinear(nn.Linear(16, 16), cfg)
    coincide = copy.deepcopy(separated)
    with torch.no_grad():
        A = separated.lora_A[0].abs()  # one code for all experts: only B tells them apart
        separated.lora_A[:] = A
        separated.lora_B.zero_()
        for i in range(4):
            separated.lora_B[i, 4 * i:4 * i + 2] = torch.eye(2)  # expert i writes coordinates 4i, 4i+1
        coincide.lora_A[:] = A
        coincide.lora_B[:] = separated.lora_B[0]  # every expert writes coordinates 0, 1
    x = torch.randn(40, 16).abs()  # positive inputs and A: each expert's outputs point the same way
    torch.manual_seed(1)
    separated(x)
    torch.manual_seed(1)  # the same sampled pairs
    coincide(x)
    assert moelora_aux_losses(separated)["contrastive"] < moelora_aux_losses(coincide)["contrastive"] - 0.5
    # the same on features built directly
    labels = torch.arange(4).repeat_interleave(8)
    z_sep = F.one_hot(labels, 4).float() + 0.05 * torch.randn(32, 4)
    z_same = torch.ones(32, 4) + 0.05 * torch.randn(32, 4)
    assert contrastive_loss(z_sep @ z_sep.T, labels, 0.1, 1e-2) < contrastive_loss(z_same @ z_same.T, labels, 0.1, 1e-2)
    # no anchor has a positive: zero, and still part of the graph
    z = torch.randn(4, 3, requires_grad=True)
    loss = contrastive_loss(z @ z.T, torch.arange(4), 0.1, 1e-2)
    assert loss == 0 and loss.requires_grad


def contrastive_grad_norm_into_B(B_std, norm_floor):
    torch.manual_seed(0)
    cfg = MoELoRAConfig(num_experts=8, top_k=2, r=4, lora_dropout=0.0, contrastive_weight=0.1)
    layer = MoELoRALinear(nn.Linear(64, 64), cfg)
    with torch.no_grad():
        layer.lora_B.normal_(0, B_std)
    x = torch.randn(4, 64, 64)
    h = F.linear(x.reshape(-1, 64), layer.lora_A.reshape(32, -1))
    _, top_idx, _ = layer.route(x.reshape(-1, 64))
    old_floor, moelora.COSINE_NORM_FLOOR = moelora.COSINE_NORM_FLOOR, norm_floor
    try:
        loss = cfg.contrastive_weight * layer.sampled_contrastive_loss(h, top_idx)
    finally:
        moelora.COSINE_NORM_FLOOR = old_floor
    return torch.autograd.grad(loss, layer.lora_B)[0].norm().item()


def test_contrastive_gradient_bounded_at_tiny_B():
    # the pitfall: B starts at 0, so expert outputs are tiny early on and a plain cosine's gradient ~ 1/|z|
    assert contrastive_grad_norm_into_B(1e-6, norm_floor=1e-12) > 1e3  # without the floor: explodes
    floor = moelora.COSINE_NORM_FLOOR
    assert contrastive_grad_norm_into_B(1e-6, floor) < 1e-3
    assert contrastive_grad_norm_into_B(1e-4, floor) < 1e-2
    peak = max(contrastive_grad_norm_into_B(s, floor) for s in (3e-3, 1e-2, 2e-2))
    assert peak < 3  # the worst case, where |z| ~ floor; unfloored it is 5e3
    # at ordinary scales the floor changes nothing
    assert contrastive_grad_norm_into_B(1.0, floor) == pytest.approx(contrastive_grad_norm_into_B(1.0, 1e-12), rel=1e-5)


def test_balance_loss_by_hand_and_one_when_balanced():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    top_idx = torch.tensor([[0], [1], [2], [0]])
    f = torch.tensor([2, 1, 1]) / 4
    P = logits.softmax(-1).mean(0)
    torch.testing.assert_close(balance_loss(logits, top_idx, 3), 3 * (f * P).sum())
    # perfectly balanced: uniform probabilities and every expert chosen equally often (top-2 of 4)
    balanced = balance_loss(torch.zeros(8, 4), torch.tensor([[0, 1], [2, 3]] * 4), 4)
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    # all tokens to one confident expert: the loss grows towards N
    assert balance_loss(torch.tensor([[10.0, 0, 0, 0]] * 8), torch.zeros(8, 1, dtype=torch.long), 4) > 3.9


def test_aux_losses_weighted_averaged_and_skipped_when_off():
    model = inject_moelora(TinyNet(), small_config(contrastive_weight=0.5, balance_weight=0.25))
    randomize_B(model)
    x = torch.randn(2, 8, 16)
    model(x)
    layers = [layer for _, layer in moelora.moelora_layers(model)]
    aux = moelora_aux_losses(model)  # every layer's losses in one batched computation
    per_layer = [moelora_aux_losses(layer) for layer in layers]  # one layer at a time: the same losses
    assert set(aux) == {"balance", "contrastive", "router_z"} and aux["router_z"] == 0  # off by default
    for key in ("balance", "contrastive"):
        torch.testing.assert_close(aux[key], torch.stack([a[key] for a in per_layer]).mean())
    model.eval()
    model(x)
    assert all(l._loss_inputs is None for l in layers)  # nothing kept
    assert all(v == 0 for v in moelora_aux_losses(model).values())
    model = inject_moelora(TinyNet(), small_config(contrastive_weight=0.0))
    model(x)
    assert moelora_aux_losses(model)["contrastive"] == 0 and moelora_aux_losses(model)["balance"] > 0


def test_contrastive_scale_scales_the_contrastive_term_alone():
    # a warm-up ramp acts where contrastive_weight does: the contrastive term and its gradients times the scale,
    # the other losses as they were
    model = inject_moelora(TinyNet(), small_config(contrastive_weight=0.5, balance_weight=0.25, router_z_weight=0.1))
    randomize_B(model)
    model(torch.randn(2, 8, 16))
    full = moelora_aux_losses(model)
    scaled = moelora_aux_losses(model, contrastive_scale=0.3)  # the same forward, so the same sampled pairs
    torch.testing.assert_close(scaled["contrastive"], 0.3 * full["contrastive"])
    for key in ("balance", "router_z"):
        torch.testing.assert_close(scaled[key], full[key])
    adapters = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    full_grads = torch.autograd.grad(full["contrastive"], adapters, retain_graph=True)
    for g, want in zip(torch.autograd.grad(scaled["contrastive"], adapters, retain_graph=True), full_grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(g, 0.3 * want)
    assert moelora_aux_losses(model, contrastive_scale=0.0)["contrastive"] == 0
    torch.testing.assert_close(moelora_aux_losses(model, contrastive_scale=1.0)["contrastive"], full["contrastive"])
    with pytest.raises(ValueError, match="contrastive_scale -0.1 must be >= 0"):
        moelora_aux_losses(model, contrastive_scale=-0.1)


def per_layer_losses_written_out(layer, tau, floor=moelora.COSINE_NORM_FLOOR):
    """One layer's balance, contrastive and router z-losses (unweighted) from what its forward kept, written out the
    long way: z = B_e A_e x for each sampled pair, cosines by hand, sums over experts and anchors as loops."""
    inputs, N, r = layer._loss_inputs, layer.config.num_experts, layer.config.r
    M = inputs.logits.shape[0]
    real = torch.ones(M, dtype=torch.bool) if inputs.real is None else inputs.real
    probs = inputs.logits.float().softmax(-1)[real]  # [m, N]
    chosen = inputs.top_idx[real]  # [m, k]
    balance = N * sum((chosen == i).float().sum() / chosen.numel() * probs[:, i].mean() for i in range(N))
    router_z = torch.stack([row.exp().sum().log() ** 2 for row in inputs.logits[real]]).mean()
    z = torch.stack([layer.lora_B[e] @ codes.view(N, r)[e] for codes, e in zip(inputs.codes, inputs.labels)])  # [S, out]
    keep = torch.ones(len(z), dtype=torch.bool) if inputs.codes_real is None else inputs.codes_real
    norm = z.norm(dim=1).clamp(min=floor)
    sim = (z @ z.T) / (norm[:, None] * norm[None, :]) / tau
    per_anchor = []
    for a in range(len(z)):
        positives = [p for p in range(len(z)) if p != a and keep[p] and inputs.labels[p] == inputs.labels[a]]
        if not keep[a] or not positives:
            continue
        lse = torch.logsumexp(torch.stack([sim[a, n] for n in range(len(z)) if n != a and keep[n]]), 0)
        per_anchor.append(torch.stack([lse - sim[a, p] for p in positives]).mean())
    return balance, torch.stack(per_anchor).mean(), router_z


def test_batched_aux_losses_equal_the_per_layer_losses_with_their_gradients():
    # moelora_aux_losses forms every layer's losses in one batched computation (grouped by what stacks: wq and wv
    # differ in width under grouped-query attention); it must equal each layer's losses written out the long way,
    # on sampled pairs under a token mask, and so must the gradients into A, B and the routers
    args = model_py.ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    model = model_py.Transformer(args)
    cfg = small_config(contrastive_samples=24, contrastive_weight=0.3, balance_weight=0.2, contrastive_temperature=0.5,
                       router_z_weight=0.05)
    mark_only_moelora_as_trainable(inject_moelora(model, cfg))
    randomize_B(model)
    layers = [layer for _, layer in moelora.moelora_layers(model)]
    assert {layer.out_features for layer in layers} == {32, 16}  # two widths: two Gram stacks, one loss computation
    tokens = torch.randint(1, 64, (3, 10))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6, 3])[:, None]
    with moelora.moelora_token_mask(model, mask):
        model(tokens)
    aux = moelora_aux_losses(model)
    by_hand = [per_layer_losses_written_out(layer, tau=0.5) for layer in layers]
    expected = {"balance": 0.2 * torch.stack([b for b, _, _ in by_hand]).mean(),
                "contrastive": 0.3 * torch.stack([c for _, c, _ in by_hand]).mean(),
                "router_z": 0.05 * torch.stack([z for _, _, z in by_hand]).mean()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for key in ("balance", "contrastive", "router_z"):
        torch.testing.assert_close(aux[key], expected[key])
        got = torch.autograd.grad(aux[key], trainable, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(expected[key], trainable, retain_graph=True, allow_unused=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_aux_losses_read_no_adapter_weight_after_the_forward():
    # FSDP (train.py --fsdp) keeps only a shard of each weight between forwards: moelora_aux_losses must form every
    # loss from what the forwards kept, not from the layers' parameters. Here the parameters are swapped for meta
    # tensors after the forward: the losses and their gradients must not change
    args = model_py.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    torch.manual_seed(0)
    model = model_py.Transformer(args)
    mark_only_moelora_as_trainable(inject_moelora(model, small_config(contrastive_samples=24, balance_weight=0.2,
                                                                      router_z_weight=0.05)))
    randomize_B(model)
    model(torch.randint(1, 64, (2, 8)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = moelora_aux_losses(model)
    want = torch.autograd.grad(sum(expected.values()), trainable, retain_graph=True)
    for _, layer in moelora.moelora_layers(model):
        for name in ("lora_A", "lora_B"):
            layer._parameters[name] = nn.Parameter(torch.empty_like(layer._parameters[name], device="meta"))
        layer.router.weight = nn.Parameter(torch.empty_like(layer.router.weight, device="meta"))
    got = moelora_aux_losses(model)
    for key in expected:
        assert got[key].device.type == "cpu"
        torch.testing.assert_close(got[key], expected[key])
    for g, w in zip(torch.autograd.grad(sum(got.values()), trainable), want):
        torch.testing.assert_close(g, w)


def test_contrastive_pairs_drawn_once_per_forward_for_all_layers():
    model = mark_only_moelora_as_trainable(inject_moelora(TinyNet(n_layers=3), small_config(contrastive_samples=8)))
    layers = [layer for _, layer in moelora.moelora_layers(model)]
    x = torch.randn(2, 8, 16)
    draws = []
    real_draw = moelora._draw_pairs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moelora, "_draw_pairs", lambda *a: draws.append(1) or real_draw(*a))
        model(x)
        assert len(draws) == 1  # one draw for the forward, not one per layer
        assert all(layer._last_pairs is layers[0]._last_pairs for layer in layers)
        assert [layer._drew_pairs for layer in layers] == [True] + [False] * (len(layers) - 1)
        first = layers[0]._last_pairs[0]
        moelora_aux_losses(model)  # the losses are taken: the next forward draws anew
        model(x)
        assert len(draws) == 2 and not torch.equal(layers[0]._last_pairs[0], first)


def test_routing_stats():
    model = inject_moelora(TinyNet(), small_config())
    assert moelora_routing_stats(model) == {}
    model(torch.randn(2, 8, 16))
    stats = moelora_routing_stats(model)
    assert set(stats) == {f"layers.{i}.{n}" for i in range(2) for n in ("wq", "wv")}
    for s in stats.values():
        assert len(s["expert_share"]) == 4 and sum(s["expert_share"]) == pytest.approx(1.0)
        assert 0 < s["router_entropy"] <= math.log(4) + 1e-6


def test_inject_names_and_errors():
    model = inject_moelora(TinyNet(), small_config(target_modules=("wq", "head")))
    assert isinstance(model.layers[1].wq, MoELoRALinear) and isinstance(model.head, MoELoRALinear)
    assert isinstance(model.layers[0].wk, nn.Linear)
    assert model.head.bias is not None and model.head.weight.shape == (16, 16)
    assert (model.head.in_features, model.head.out_features) == (16, 16)
    with pytest.raises(ValueError, match="already has MoELoRA"):
        inject_moelora(model, small_config())
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no nn.Linear.*'head', 'wk', 'wo', 'wq', 'wv'"):
        inject_moelora(TinyNet(), small_config(target_modules=("wq", "q_proj")))


def test_trains_a_model_that_is_not_ours():
    torch.manual_seed(0)
    net = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    inject_moelora(net, small_config(target_modules=("linear1", "linear2")))
    mark_only_moelora_as_trainable(net)
    x, y = torch.randn(4, 6, 16), torch.randn(4, 6, 16)  # toy regression: fit fixed targets
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):  # (eval mode and PyTorch's fast path: tests/test_other_models.py)
        mse = F.mse_loss(net(x), y)
        (mse + sum(moelora_aux_losses(net).values())).backward()
        opt.step()
        opt.zero_grad()
        losses.append(mse.item())
    assert losses[-1] < 0.8 * losses[0]


def test_save_load_roundtrip_and_strict_errors():
    base = TinyNet()
    cfg = small_config()
    model = inject_moelora(copy.deepcopy(base), cfg)
    randomize_B(model)
    buf = io.BytesIO()
    torch.save(moelora_state_dict(model), buf)
    assert all(k.endswith(("lora_A", "lora_B", "router.weight")) for k in moelora_state_dict(model) if k != "moelora_config")
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = inject_moelora(copy.deepcopy(base), MoELoRAConfig(**sd["moelora_config"]))
    load_moelora_state_dict(fresh, sd)
    x = torch.randn(2, 5, 16)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))

    def fails(sd, exc, pattern):
        with pytest.raises(exc, match=pattern):
            load_moelora_state_dict(inject_moelora(copy.deepcopy(base), cfg), sd)

    fails({k: v for k, v in sd.items() if k != "layers.1.wv.lora_B"}, ValueError, r"missing keys \['layers.1.wv.lora_B'\]")
    fails({**sd, "layers.0.wk.lora_A": sd["layers.0.wq.lora_A"]}, ValueError, r"unexpected keys \['layers.0.wk.lora_A'\]")
    fails({**sd, "layers.0.wq.lora_A": sd["layers.0.wq.lora_A"][:, :1]}, ValueError, r"layers.0.wq.lora_A: saved \(4, 1, 16\)")
    fails({**sd, "moelora_config": {**sd["moelora_config"], "r": 8}}, ValueError, r"config mismatch.*'r': \(8, 2\)")
    fails({k: v for k, v in sd.items() if k != "moelora_config"}, ValueError, "no 'moelora_config'")
    fails({**sd, "moelora_config": {**sd["moelora_config"], "gate": "switch"}}, ValueError, r"'gate': \('switch', 'mixtral'\)")
    # a file from before the gate and the router stabilisers existed: those fields had their defaults' behaviour
    older = {k: v for k, v in sd["moelora_config"].items() if k not in ("gate", "router_z_weight", "router_jitter")}
    load_moelora_state_dict(inject_moelora(copy.deepcopy(base), cfg), {**sd, "moelora_config": older})


def test_autocast_bf16_and_bf16_base_keep_fp32_adapters():
    model = inject_moelora(TinyNet(), small_config())
    mark_only_moelora_as_trainable(model)
    randomize_B(model)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.float().pow(2).mean() + sum(moelora_aux_losses(model).values())
    assert out.dtype == torch.bfloat16  # what the base linear gives under autocast
    loss.backward()
    layer = model.layers[0].wq
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router.weight.dtype == torch.float32
    assert layer.lora_B.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()
    # a bf16 base: adapters stay float32, the output keeps the base's dtype
    layer = MoELoRALinear(nn.Linear(16, 8).to(torch.bfloat16), small_config())
    randomize_B(layer)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    ref = F.linear(x.to(torch.bfloat16), layer.weight, layer.bias)
    assert not torch.equal(out, ref)  # the adapter contributed


def test_merge_folds_plain_lora_into_ordinary_linear_layers():
    # for a user who trained --method lora (one expert) and wants a checkpoint any LLaMA runtime reads
    base = TinyNet()
    model = inject_moelora(copy.deepcopy(base), small_config(num_experts=1, top_k=1, r=3))
    randomize_B(model)
    model.eval()
    x = torch.randn(2, 5, 16)
    adapted = model(x)
    merge_moelora(model)
    assert not moelora.moelora_layers(model) and type(model.layers[0].wq) is nn.Linear
    assert model.state_dict().keys() == base.state_dict().keys()  # an ordinary checkpoint again
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gates depend on the input"):
        merge_moelora(inject_moelora(TinyNet(), small_config()))


@pytest.mark.parametrize("experts", [1, 4])
def test_adapter_dropout_applied_in_training_only(experts):
    # dropout acts on the adapter's input, in training only: two training forwards differ, eval is deterministic
    # and equals the adapter without dropout
    cfg = small_config(num_experts=experts, top_k=min(2, experts), lora_dropout=0.5, balance_weight=0.0,
                       contrastive_weight=0.0)
    layer = MoELoRALinear(nn.Linear(16, 16), cfg)
    randomize_B(layer)
    x = torch.randn(3, 16)
    no_dropout = MoELoRALinear(nn.Linear(16, 16), MoELoRAConfig(**{**vars(cfg), "lora_dropout": 0.0}))
    no_dropout.load_state_dict(layer.state_dict())
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout.eval()(x))


def test_llama_from_model_py():
    model_py = pytest.importorskip("model", reason="model.py (our LLaMA) not importable")
    args = model_py.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)
    model = model_py.Transformer(args)
    tokens = torch.randint(0, 64, (2, 12))
    logits_before, _ = model(tokens)
    inject_moelora(model, MoELoRAConfig(contrastive_samples=32, contrastive_weight=0.1))
    mark_only_moelora_as_trainable(model)
    assert {n for n, _ in moelora.moelora_layers(model)} == {f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv")}
    logits, loss = model(tokens, tokens)
    assert torch.equal(logits, logits_before)
    aux = moelora_aux_losses(model)
    assert aux["contrastive"] > 0 and aux["balance"] > 0
    (loss + sum(aux.values())).backward()
    assert model.layers[0].attention.wq.lora_B.grad.abs().sum() > 0
    assert model.tok_embeddings.weight.grad is None


@pytest.mark.slow
def test_torch_compile_one_graph_and_same_loss_and_gradients():
    # A graph break in every adapted layer would undo much of what torch.compile buys on a GPU; ops whose
    # output shape depends on the data (bincount, boolean indexing) and branches on tensor values cause them.
    # 16 tokens x top-2 = 32 pairs <= 64 samples: the contrastive loss takes every pair, so eager and compiled
    # draw no random numbers and must agree. (This case once crashed torch 2.13's inductor: a whole randperm
    # used as an index; moelora.py takes arange there.)
    torch.manual_seed(0)
    # one block (wq and wv adapted) keeps inductor's compile time down to ~30 s on a cold cache
    model = mark_only_moelora_as_trainable(inject_moelora(TinyNet(n_layers=1), small_config(contrastive_samples=64)))
    randomize_B(model)
    model.train()
    x = torch.randn(2, 8, 16)

    def loss_fn(x):
        return model(x).square().mean() + sum(moelora_aux_losses(model).values())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_fn)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    trainable = [p for p in model.parameters() if p.requires_grad]
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, trainable)
    compiled = torch.compile(loss_fn)(x)
    compiled_grads = torch.autograd.grad(compiled, trainable)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_compiled, g_eager, atol=1e-5, rtol=1e-4)


def test_hugging_face_llama_names():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, 32, (2, 6))
    before = model(tokens).logits
    inject_moelora(model, small_config(target_modules=("q_proj", "v_proj")))
    mark_only_moelora_as_trainable(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MoELoRALinear)
    out = model(tokens, labels=tokens)
    assert torch.equal(out.logits, before)
    (out.loss + sum(moelora_aux_losses(model).values())).backward()
    assert model.model.layers[0].self_attn.v_proj.lora_B.grad.abs().sum() > 0


# --- the token mask: padding out of the losses and the statistics ---------------------------------------------

def padded_batch(lengths, dim=16, seed=0):
    """x [B, T, dim] right-padded with junk that is not zero (so that it would count if it leaked in),
    mask [B, T] True for real tokens, and the real tokens alone, x_real [sum(lengths), dim]."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    x = torch.randn(B, T, dim, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
    x = torch.where(mask[..., None], x, 3.0 + torch.randn(B, T, dim, generator=g))  # padding: shifted junk
    return x, mask, x[mask]


def losses_stats_and_grads(layer):
    aux = [moelora_aux_losses(layer)[key] for key in ("balance", "contrastive")]
    grads = torch.autograd.grad(sum(aux), [layer.lora_A, layer.lora_B, layer.router.weight])
    stats = moelora_routing_stats(layer)[""]
    return aux, stats, grads


def test_token_mask_padded_batch_equals_the_real_tokens_alone():
    # 3 sequences of 5, 2 and 7 tokens padded to 7: 21 positions, 14 real. 21 x top-2 = 42 pairs <= 64 samples,
    # so the contrastive loss takes every pair and draws no random numbers: both sides see the same pairs
    layer = MoELoRALinear(nn.Linear(16, 16), small_config(contrastive_samples=64, contrastive_weight=0.5, balance_weight=0.3))
    randomize_B(layer)
    x, mask, x_real = padded_batch([5, 2, 7])
    with moelora.moelora_token_mask(layer, mask):
        y_masked = layer(x)
    masked = losses_stats_and_grads(layer)
    y = layer(x)  # the same padded batch without the mask: padding counts, and it changes the numbers
    unmasked = losses_stats_and_grads(layer)
    layer(x_real)  # the 14 real tokens alone, no padding anywhere
    alone = losses_stats_and_grads(layer)
    assert torch.equal(y_masked, y)  # outputs never depend on the mask
    for a, b in zip(masked[0], alone[0]):
        torch.testing.assert_close(a, b)
    assert masked[1]["expert_share"] == pytest.approx(alone[1]["expert_share"], abs=1e-6)
    assert masked[1]["router_entropy"] == pytest.approx(alone[1]["router_entropy"], abs=1e-6)
    assert masked[1]["tokens"] == alone[1]["tokens"] == 14 and unmasked[1]["tokens"] == 21
    for a, b in zip(masked[2], alone[2]):  # and the losses' gradients into A, B and the router
        torch.testing.assert_close(a, b)
    assert not torch.allclose(unmasked[0][0], alone[0][0]) and not torch.allclose(unmasked[0][1], alone[0][1])


def test_token_mask_all_real_equals_no_mask_and_sampling_draws_real_tokens_only(monkeypatch):
    layer = MoELoRALinear(nn.Linear(16, 16), small_config(contrastive_samples=8))  # 8 of 2 x 7 x 2 = 28 pairs: sampled
    randomize_B(layer)
    x, mask, _ = padded_batch([7, 3])
    torch.manual_seed(5)
    layer(x)
    plain = moelora_aux_losses(layer)
    torch.manual_seed(5)  # the same draws
    with moelora.moelora_token_mask(layer, torch.ones(2, 7, dtype=torch.bool)):
        layer(x)
    torch.testing.assert_close(moelora_aux_losses(layer), plain)
    # under the real mask, the 8 sampled pairs are all real (10 real tokens = 20 real pairs)
    seen = []
    real_contrastive = moelora.contrastive_loss
    monkeypatch.setattr(moelora, "contrastive_loss", lambda *a, **kw: seen.append(a[4]) or real_contrastive(*a, **kw))
    for seed in range(20):
        torch.manual_seed(seed)
        with moelora.moelora_token_mask(layer, mask):
            layer(x)
        moelora_aux_losses(layer)
    assert len(seen) == 20 and all(r.shape == (8,) and r.all() for r in seen)
    # fewer real pairs than samples: every real pair is drawn, padding fills up, and is left out of the loss
    seen.clear()
    with moelora.moelora_token_mask(layer, torch.tensor([[True] * 2 + [False] * 5, [True] + [False] * 6])):
        layer(x)
    assert torch.isfinite(moelora_aux_losses(layer)["contrastive"]) and seen[0].sum() == 6


def test_token_mask_errors_and_scope():
    model = inject_moelora(TinyNet(), small_config())
    x, mask, _ = padded_batch([4, 6])
    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\).*input of shape \(2, 6, 16\).*leading dims \(2, 6\)"):
        with moelora.moelora_token_mask(model, mask[:, :5]):
            model(x)
    with pytest.raises(TypeError, match="bool tensor.*attention_mask.bool()"):
        with moelora.moelora_token_mask(model, mask.long()):
            pass
    with pytest.raises(ValueError, match="no MoELoRA layers"):
        with moelora.moelora_token_mask(TinyNet(), mask):
            pass
    layers = [layer for _, layer in moelora.moelora_layers(model)]
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the with still restores the layers
        with moelora.moelora_token_mask(model, mask):
            assert all(layer._token_mask is mask for layer in layers)
            raise RuntimeError("boom")
    assert all(layer._token_mask is None for layer in layers)
    model(x)
    assert all(s["tokens"] == 12 for s in moelora_routing_stats(model).values())  # outside: all tokens, as before


def test_token_mask_in_our_llama_padding_gets_no_gradient_and_outputs_do_not_change():
    # model.py's attention is causal and padding comes last, so real tokens never see it: under the mask, the
    # auxiliary losses must send no gradient at all into the padded positions; without it they do
    model = model_py.Transformer(model_py.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32))
    mark_only_moelora_as_trainable(inject_moelora(model, small_config(contrastive_samples=256)))
    randomize_B(model)
    tokens = torch.randint(1, 64, (3, 10))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 4, 7])[:, None]
    tokens[~mask] = 0

    def aux_grad_at_inputs(use_mask):
        embedded = []
        hook = model.tok_embeddings.register_forward_hook(lambda m, i, out: embedded.append(out) or out.requires_grad_())
        with moelora.moelora_token_mask(model, mask) if use_mask else contextlib.nullcontext():
            logits, _ = model(tokens, tokens)
        hook.remove()
        (grad,) = torch.autograd.grad(sum(moelora_aux_losses(model).values()), embedded)
        return logits, grad

    logits_masked, grad_masked = aux_grad_at_inputs(True)
    logits_plain, grad_plain = aux_grad_at_inputs(False)
    assert torch.equal(logits_masked, logits_plain)
    assert grad_masked[~mask].abs().max() == 0 and grad_masked[mask].abs().max() > 0
    assert grad_plain[~mask].abs().max() > 0


@pytest.mark.parametrize("dropout,jitter", [(0.0, 0.0), (0.1, 0.0), (0.1, 0.1)])
def test_token_mask_survives_activation_checkpointing_with_backward_after_the_with(dropout, jitter):
    # checkpointing reruns each block's forward during backward, after the with has ended; the rerun must see the
    # same mask, or autograd would get other saved tensors (an error at best, wrong gradients at worst). With
    # dropout, the rerun must also use up the same random numbers: the layer that drew the contrastive pairs in
    # the forward draws them again, so that its block's dropout masks come out as they did
    args = model_py.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)
    tokens = torch.randint(1, 64, (3, 10))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 4, 7])[:, None]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = model_py.Transformer(args)
        # sampled pairs; with jitter the rerun must also draw the routers' noise as the forward did
        config = small_config(contrastive_samples=16, lora_dropout=dropout, router_jitter=jitter)
        mark_only_moelora_as_trainable(inject_moelora(model, config))
        randomize_B(model)
        model.grad_checkpointing = checkpointing
        torch.manual_seed(1)
        with moelora.moelora_token_mask(model, mask):
            _, loss = model(tokens, tokens)
            loss = loss + sum(moelora_aux_losses(model).values())
        loss.backward()  # outside the with
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_checkpointing_rerun_keeps_no_loss_graph():
    # checkpointing reruns each block's forward in backward; the rerun recomputes the losses' saved tensors but
    # must not keep its losses: held as the layer's aux_* they pinned each rerun layer's loss graph until the next
    # step (on an H200 at LLaMA-7B's shape, 2.5 GB more than without them at the peak)
    args = model_py.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)
    model = model_py.Transformer(args)
    mark_only_moelora_as_trainable(inject_moelora(model, small_config(contrastive_samples=16)))
    randomize_B(model)
    model.grad_checkpointing = True
    tokens = torch.randint(1, 64, (3, 10))
    _, loss = model(tokens, tokens)
    layers = [layer for _, layer in moelora.moelora_layers(model)]
    before = [layer._loss_inputs for layer in layers]
    assert all(inputs is not None and inputs.codes is not None for inputs in before)
    (loss + sum(moelora_aux_losses(model).values())).backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0 for layer in layers)
    for layer, inputs in zip(layers, before):
        assert layer._loss_inputs is inputs


def test_torch_compile_with_a_token_mask_one_graph():
    model = mark_only_moelora_as_trainable(inject_moelora(TinyNet(n_layers=1), small_config(contrastive_samples=8)))
    randomize_B(model)
    x, mask, _ = padded_batch([8, 5])

    def loss_fn(x):
        with moelora.moelora_token_mask(model, mask):
            out = model(x)
        return out.square().mean() + sum(moelora_aux_losses(model).values())

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_fn)(x)  # the sampled path (8 of 32 pairs) under the mask
    assert explained.graph_break_count == 0, explained.break_reasons
    # every pair taken: no random draw, so a compiled run must give the eager loss and gradients
    for _, layer in moelora.moelora_layers(model):
        layer.config = MoELoRAConfig(**{**vars(layer.config), "contrastive_samples": 64})
    trainable = [p for p in model.parameters() if p.requires_grad]
    eager = loss_fn(x)
    eager_grads = torch.autograd.grad(eager, trainable)
    compiled = torch.compile(loss_fn, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, trainable), eager_grads):
        torch.testing.assert_close(a, b)


# --- adapter files: safetensors, no pickle ---------------------------------------------------------------------

def test_save_load_safetensors_roundtrip_and_strict_errors(tmp_path):
    base = TinyNet()
    model = inject_moelora(copy.deepcopy(base), small_config(num_experts=3, r=5))
    randomize_B(model)
    path = tmp_path / "adapter.safetensors"
    moelora.save_moelora(model, path)
    assert not (tmp_path / "adapter.safetensors.tmp").exists()
    fresh = moelora.load_moelora(copy.deepcopy(base), path)  # no MoELoRA layers yet: injected with the file's config
    assert moelora.moelora_config(fresh) == moelora.moelora_config(model)
    x = torch.randn(2, 5, 16)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    with pytest.raises(ValueError, match=r"config mismatch.*'r': \(5, 2\)"):
        moelora.load_moelora(inject_moelora(copy.deepcopy(base), small_config()), path)
    blob = path.read_bytes()
    for damaged in (blob[:-4], blob[:6], b"\x08" + b"\x00" * 7 + b"not json"):
        (tmp_path / "bad.safetensors").write_bytes(damaged)
        with pytest.raises(ValueError, match="bad.safetensors is not a MoELoRA adapter file.*or it is damaged"):
            moelora.load_moelora(copy.deepcopy(base), tmp_path / "bad.safetensors")


def test_safetensors_file_is_the_standard_format():
    # the reference reader and writer (the safetensors package, test-only) agree with ours both ways
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed (comes with transformers)")
    import json
    import tempfile
    from safetensors import safe_open

    model = inject_moelora(TinyNet(), small_config())
    randomize_B(model)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = f"{tmp}/ours.safetensors", f"{tmp}/theirs.safetensors"
        moelora.save_moelora(model, ours)
        expected = {k: v for k, v in moelora_state_dict(model).items() if k != "moelora_config"}
        loaded = st.load_file(ours)
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
        with safe_open(ours, "pt") as f:
            assert json.loads(f.metadata()["moelora_config"])["num_experts"] == 4
        st.save_file(expected, theirs, metadata={"moelora_config": json.dumps(vars(small_config()))})
        config, tensors = moelora.read_moelora_file(theirs)
        assert config == small_config() and all(torch.equal(tensors[k], v) for k, v in expected.items())


# --- the balance loss next to Hugging Face Mixtral's ------------------------------------------------------------

def test_balance_loss_converts_to_mixtral_s_as_the_docstring_says():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    N, k = 8, 2
    attention_mask = torch.ones(3, 5, dtype=torch.long)
    attention_mask[0, 3:] = 0
    attention_mask[2, 1:] = 0
    real = attention_mask.bool().flatten()
    per_layer = [torch.randn(15, N) * 2 for _ in range(2)]  # router logits of 2 layers, [tokens, N]
    top = [logits.topk(k, dim=-1).indices for logits in per_layer]
    theirs = load_balancing_loss_func(tuple(per_layer), N, k, attention_mask)
    pooled = balance_loss(torch.cat(per_layer), torch.cat(top), N, real.repeat(2))  # all layers' tokens in one pool
    torch.testing.assert_close(theirs, k * pooled)
    mean_of_layers = torch.stack([balance_loss(l, t, N, real) for l, t in zip(per_layer, top)]).mean()
    assert not torch.allclose(theirs, k * mean_of_layers)  # what this project reports differs: layers are averaged
    # pooling hides imbalance: 4 layers, each sending every token to its own pair of experts
    collapsed = [torch.full((15, N), -5.0).index_fill(1, torch.tensor([2 * i, 2 * i + 1]), 5.0) for i in range(4)]
    top = [logits.topk(k, dim=-1).indices for logits in collapsed]
    assert load_balancing_loss_func(tuple(collapsed), N, k) == pytest.approx(k)  # reads as balanced
    assert all(balance_loss(l, t, N) > 3.99 for l, t in zip(collapsed, top))  # here: 4 per layer (N / top_k)
