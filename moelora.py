"""
MoELoRA: a mixture of LoRA experts behind a router, for any model built from nn.Linear layers.

After Luo et al., "MoELoRA: Contrastive Learning Guided Mixture of Experts on Parameter-Efficient Fine-Tuning
for Large Language Models" (arXiv 2402.12851). No official code is public: where the paper is silent, the
choices are this project's (tutorial.md, sections 1 and 4-7). Needs only torch: copy this file into any project.

                          x [.., d_in]
           +----------------+----------------------------+
           |                |                            |
           |        router Wg [N, d_in]             dropout(x)
           |      top-k of the N logits,                 |
           |      softmax over those k            A_1 .. A_N   [r, d_in] each, Kaiming-uniform
           |                |                            |     codes [.., N*r]
           |       gates g [.., N]  ---------------->  x g_i    rank block i times its gate
           |       (k non-zero, sum 1)                   |     (0 for the N-k experts not chosen)
      W0 (frozen)                                 B_1 .. B_N   [d_out, r] each, zeros at start
           |                                             |
           |                                      x scaling = lora_alpha / r
           +------------------- + -----------------------+
                                |
        y = W0 x + scaling * sum_{i in top-k} g_i(x) B_i A_i dropout(x)

    inject_moelora(model, MoELoRAConfig())             # every nn.Linear named in target_modules ("wq", "wv")
    mark_only_moelora_as_trainable(model)              # the base's state-dict keys do not change
    with moelora_token_mask(model, tokens != pad_id):  # [batch, seq]: padding stays out of the losses
        logits, lm_loss = model(tokens, targets)
    loss = lm_loss + sum(moelora_aux_losses(model).values())  # after every forward: weighted, layer-averaged
    save_moelora(model, "adapter.safetensors")         # later: load_moelora(base_model, "adapter.safetensors")

The gate drawn is Mixtral's; MoELoRAConfig(gate="switch") takes Switch Transformer's, the only one that trains a
top-1 router. The auxiliary losses, formed once per step for all layers: Switch Transformer's load balancing (on),
a supervised contrastive loss between the experts' outputs and ST-MoE's router z-loss (both off by default:
tutorial/experiments.md). Also: moelora_routing_stats (expert load, router entropy), moelora_state_dict /
load_moelora_state_dict, merge_moelora (one expert only).

The file reads top-down: the config, the layer, putting layers into a model, the losses, the token mask, the
statistics, saving and loading, merging. The machinery the layer and the losses share comes after the losses.
"""
import contextlib
import json
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MoELoRAConfig", "GATES", "MoELoRALinear", "inject_moelora", "mark_only_moelora_as_trainable",
           "moelora_layers", "moelora_config", "moelora_aux_losses", "balance_loss", "router_z_loss",
           "contrastive_loss", "COSINE_NORM_FLOOR", "moelora_token_mask", "moelora_routing_stats",
           "moelora_state_dict", "load_moelora_state_dict", "SAFETENSORS_DTYPES", "save_moelora",
           "read_moelora_file", "load_moelora", "merge_moelora"]

GATES = ("mixtral", "switch")  # MoELoRAConfig.gate
# The floor f on |z| in the contrastive loss's cosine, z_a.z_b / (max(|z_a|, f) max(|z_b|, f)). B starts at zero
# and a plain cosine's gradient grows like 1/|z|: at B ~ 1e-6 it swamps the language-model gradient. Below the
# floor the cosine becomes a dot product / f^2, whose gradient shrinks with |z| (tutorial.md, section 6).
COSINE_NORM_FLOOR = 0.1


@dataclass
class MoELoRAConfig:
    num_experts: int = 8  # paper (as reported): 8 experts
    top_k: int = 2  # paper (as reported): top-2 routing
    # how the k kept experts are weighted. "mixtral": a softmax over the k kept logits (the paper's setting), so a
    # token's gates sum to 1. "switch": the softmax over all N logits, the k kept probabilities left as they are
    # (Switch Transformer). Only "switch" trains a top-1 router: a softmax over one kept logit is always 1
    gate: str = "mixtral"
    r: int = 4  # rank of each expert: 8 experts x rank 4 = the parameters of one rank-32 LoRA
    lora_alpha: float = 8.0  # scaling = alpha / r = 2, the LLM-Adapters convention (alpha = 2r)
    lora_dropout: float = 0.05  # LLM-Adapters default
    target_modules: tuple = ("wq", "wv")  # attention query and value (HF names: "q_proj", "v_proj")
    # off: in the pre-registered trials (tutorial/experiments.md) no weight lowered the loss, and 0.1 hurt with as
    # many experts as clusters; with twice as many, 0.1 (tau 0.5) made experts less alike and routers matter
    # more. For the paper's method try 0.01 with contrastive_temperature 0.5, the first trial's best pair
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1  # the best temperature in the SupCon paper
    contrastive_samples: int = 256  # (token, expert) pairs per layer feeding the loss: cost ~ samples^2
    balance_weight: float = 0.01  # Switch Transformer's value
    # the router stabilisers of large MoE models, off by default (tutorial.md, section 7): ST-MoE's z-loss, the
    # mean logsumexp(logits)^2, keeps the logits small (ST-MoE: 1e-3); Switch's jitter multiplies the router's
    # input by U(1 - eps, 1 + eps) in training (Switch: 0.01)
    router_z_weight: float = 0.0
    router_jitter: float = 0.0

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be a list of names such as ('wq', 'wv'), "
                            f"got the string {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        checks = [  # each message starts with the field's name, which train.py turns into its flag
            (self.num_experts >= 1, f"num_experts {self.num_experts} must be >= 1"),
            (1 <= self.top_k <= self.num_experts,
             f"top_k {self.top_k} must be between 1 and num_experts {self.num_experts}"),
            (self.gate in GATES, f"gate {self.gate!r} must be one of {', '.join(map(repr, GATES))}"),
            (not (self.top_k == 1 and self.num_experts > 1 and self.gate == "mixtral"),
             "top_k 1 with gate 'mixtral' would train no router: a softmax over the one kept logit is always 1, "
             "so the task sends the router no gradient; use gate 'switch' (the chosen expert's probability among "
             "all N, as Switch Transformer), or top_k 2"),
            (self.r >= 1, f"r {self.r} must be >= 1"),
            (self.lora_alpha > 0, f"lora_alpha {self.lora_alpha} must be > 0"),
            (0 <= self.lora_dropout < 1, f"lora_dropout {self.lora_dropout} must be in [0, 1)"),
            (len(self.target_modules) > 0, "target_modules is empty"),
            (self.contrastive_weight >= 0, f"contrastive_weight {self.contrastive_weight} must be >= 0"),
            (self.contrastive_temperature > 0,
             f"contrastive_temperature {self.contrastive_temperature} must be > 0"),
            (self.contrastive_samples >= 2, f"contrastive_samples {self.contrastive_samples} must be >= 2"),
            (self.balance_weight >= 0, f"balance_weight {self.balance_weight} must be >= 0"),
            (self.router_z_weight >= 0, f"router_z_weight {self.router_z_weight} must be >= 0"),
            (0 <= self.router_jitter < 1, f"router_jitter {self.router_jitter} must be in [0, 1)"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("MoELoRAConfig: " + "; ".join(problems))


class MoELoRALinear(nn.Module):
    """y = W0 x + b + scaling * sum_{i in top-k} g_i(x) B_i A_i dropout(x), with W0 and b frozen.

    The wrapped nn.Linear's weight and bias are registered here under their names, so `.weight`, `.bias`,
    `in_features`, `out_features` read as before and the model's state-dict keys do not change. A frozen base
    that is no nn.Linear but computes W0 x (a quantised linear: quantize.py's Int8Linear) is kept whole as the
    child `base_layer`; `.weight` and `.bias` are then None, and its keys gain ".base_layer".
    Adapters and router are float32 whatever the base dtype; the input is cast to them and the output back.
    """

    def __init__(self, base: nn.Module, config: MoELoRAConfig):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        plain = isinstance(base, nn.Linear)
        self.base_layer = None if plain else base
        self.weight, self.bias = (base.weight, base.bias) if plain else (None, None)
        base.requires_grad_(False)
        N, r, device = config.num_experts, config.r, base.weight.device
        self.scaling = config.lora_alpha / r
        # all experts stacked: no Python loop over experts in forward. A is Kaiming-uniform with a=sqrt(5) as in
        # nn.Linear and PEFT, bound 1/sqrt(in_features), written out: kaiming_uniform_ would take r * in as fan-in
        self.lora_A = nn.Parameter(torch.empty(N, r, self.in_features, device=device))  # [N, r, in]
        nn.init.uniform_(self.lora_A, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(N, self.out_features, r, device=device))  # [N, out, r]
        # nn.Linear's random init, not zeros: with all logits tied, top-k would send every token to experts 0..k-1.
        # One expert needs no router (its gate is always 1): that is plain LoRA, with LoRA's parameter count
        self.router = nn.Linear(self.in_features, N, bias=False, device=device) if N > 1 else None
        self.dropout = nn.Dropout(config.lora_dropout)
        self._token_mask = None  # [leading dims of x] bool, True for real tokens: set by moelora_token_mask
        self._loss_inputs = None  # what the last training forward keeps for moelora_aux_losses
        # the contrastive loss's (token, slot) pairs, drawn once per forward for all the adapted layers of a model
        # (inject_moelora gives them one _SampledPairs): this layer's pairs, and whether it drew them
        self._pairs, self._last_pairs, self._drew_pairs = _SampledPairs(), None, False
        # the last forward's routing (detached) and which of its M tokens were real: the statistics read them
        self.last_logits = self.last_top_idx = self.last_real = None
        self._has_run = False  # moelora_aux_losses warns about the adapted layers that a model bypasses

    def route(self, x):
        """x [M, in] -> gates [M, N] (k non-zero per row), top_idx [M, k], logits [M, N]."""
        cfg = self.config
        if self.training and cfg.router_jitter > 0:  # the router's input only: the experts see x as it is
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
        logits = self.router(x)  # [M, N]
        if cfg.gate == "switch":  # softmax over all N, then the k largest: the router learns even at k = 1
            top_gates, top_idx = logits.float().softmax(dim=-1).topk(cfg.top_k, dim=-1)  # [M, k]
        else:  # "mixtral": the k largest logits, then a softmax over those k
            top_logits, top_idx = logits.topk(cfg.top_k, dim=-1)  # [M, k]
            top_gates = top_logits.float().softmax(dim=-1)
        gates = torch.zeros(logits.shape, dtype=top_gates.dtype, device=x.device).scatter(-1, top_idx, top_gates)
        return gates, top_idx, logits

    def forward(self, x):
        result = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        # Activation checkpointing runs this forward again inside backward. The rerun must redo what the losses
        # use (it saves for backward what the first run saved) but not keep it: held here, each rerun layer's
        # graph would stay alive until the next step
        rerun = _in_backward_pass()
        if not rerun:
            self._loss_inputs = None
        self._has_run = True
        cfg, N, r = self.config, self.config.num_experts, self.config.r
        real = self._real_tokens(x, rerun)  # [M] or None; only the losses and statistics read it
        x2 = x.to(self.lora_A.dtype).reshape(-1, self.in_features)  # [M, in], M = number of tokens
        if self.router is None:  # one expert: plain LoRA, B A dropout(x)
            delta = F.linear(F.linear(self.dropout(x2), self.lora_A[0]), self.lora_B[0])  # [M, out]
            return result + (self.scaling * delta).view(*x.shape[:-1], self.out_features).to(result.dtype)
        gates, top_idx, logits = self.route(x2)
        # All N experts at once are one LoRA of rank N*r whose rank blocks the gates scale per token (0 for the
        # experts not chosen): two matmuls, the cost of the equal-parameter LoRA. Gathering each token's k experts'
        # A and B instead materialises [M, k, out, r] and measured far slower
        h = F.linear(self.dropout(x2), self.lora_A.reshape(N * r, -1))  # [M, N*r] every expert's code A_i x
        h_gated = (h.view(-1, N, r) * gates.unsqueeze(-1)).view(-1, N * r)  # [M, N*r]
        B_all = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)  # [out, N*r] the B side by side
        delta = F.linear(h_gated, B_all)  # [M, out]
        self.last_logits, self.last_top_idx, self.last_real = logits.detach(), top_idx, real
        if self.training and (cfg.balance_weight > 0 or cfg.router_z_weight > 0 or cfg.contrastive_weight > 0):
            # moelora_aux_losses forms the losses of all layers at once; a layer keeps only their inputs: a few
            # small kernels here instead of a hundred (benchmarks/bench_ops.py counts them)
            codes = labels = codes_real = None
            if cfg.contrastive_weight > 0:
                pick, token, codes_real = self._contrastive_pairs(h.shape[0], cfg.top_k, real, rerun)  # [S] each
                codes, labels = h[token], top_idx.reshape(-1)[pick]  # [S, N*r] all experts' codes, [S] the expert
            if not rerun:
                self._loss_inputs = _LossInputs(logits, top_idx, real, codes, labels, codes_real)
        delta = (self.scaling * delta).view(*x.shape[:-1], self.out_features)
        return result + delta.to(result.dtype)

    def _real_tokens(self, x, rerun: bool):
        """[M] bool, True for the tokens of x [.., in] that the losses and statistics count; None = all."""
        if self._token_mask is None:
            # a checkpointing rerun comes after the `with moelora_token_mask` has ended: it takes the mask of the
            # forward it repeats
            return self.last_real if rerun else None
        if self._token_mask.shape != x.shape[:-1]:
            raise ValueError(
                f"moelora_token_mask: the mask has shape {tuple(self._token_mask.shape)}, but an adapted layer got "
                f"an input of shape {tuple(x.shape)}: the mask must have the input's leading dims "
                f"{tuple(x.shape[:-1])} (one entry per token, True for real tokens)")
        return self._token_mask.reshape(-1)

    def _contrastive_pairs(self, M: int, k: int, real, rerun: bool):
        """This forward's sampled (token, slot) pairs, as _draw_pairs returns them. Every adapted layer of a model
        sees the same tokens: the first one of a forward draws, the others take its draw (self._pairs is shared;
        moelora_aux_losses and moelora_token_mask start a new one)."""
        S = min(self.config.contrastive_samples, M * k)
        if rerun:
            # a checkpointing rerun takes the pairs of the forward it repeats; the layer that drew them draws
            # again, from the RNG state that checkpointing restored, so that the dropout after it gets its masks
            if self._drew_pairs:
                _draw_pairs(M, k, S, real, self.lora_A.device)
            return self._last_pairs
        shared = self._pairs
        self._drew_pairs = shared.drawn is None or shared.key != (M, k, S)
        if self._drew_pairs:
            shared.drawn, shared.key = _draw_pairs(M, k, S, real, self.lora_A.device), (M, k, S)
        self._last_pairs = shared.drawn
        return shared.drawn

    def sampled_contrastive_loss(self, h, top_idx, real=None):
        """This layer's contrastive loss (unweighted) on codes h [M, N*r] (every expert's A_i x, before gating),
        top_idx [M, k] and real [M] (optional), on pairs drawn here: what moelora_aux_losses forms, for analysis."""
        M, k = top_idx.shape
        pick, token, token_real = _draw_pairs(M, k, min(self.config.contrastive_samples, M * k), real, h.device)
        labels = top_idx.reshape(-1)[pick]
        dots = _contrastive_dots(h[token], labels, _experts_gram(self.lora_B), self.config.num_experts)
        return contrastive_loss(dots, labels, self.config.contrastive_temperature, COSINE_NORM_FLOOR, token_real)

    def extra_repr(self):
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={c.num_experts}, "
                f"top_k={c.top_k}, r={c.r}, scaling={self.scaling:g}")


# --- putting the layers into a model ----------------------------------------------------------------------------

def inject_moelora(model, config: MoELoRAConfig):
    """Replace, in place, every nn.Linear (or frozen quantised linear, see _is_linear) whose attribute name is in
    config.target_modules: "wq" matches "layers.0.attention.wq". Returns model.

    Only layers that their parent calls as modules can be adapted. nn.MultiheadAttention reads out_proj.weight
    directly (and keeps q, k, v in one in_proj_weight Parameter, no nn.Linear): out_proj is refused, as every
    entry of _BYPASSED_CHILDREN. nn.TransformerEncoderLayer's fast path would skip linear1/linear2 in eval mode:
    it is switched off for adapted layers (_keep_off_fast_path), and so is nn.TransformerEncoder's nested-tensor
    path above them. Elsewhere, moelora_aux_losses warns about adapted layers that never ran in training.
    """
    if moelora_layers(model):
        raise ValueError("the model already has MoELoRA layers: inject once, into the base model")
    found, linear_names, refused = [], set(), []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if _is_linear(child):
                linear_names.add(name)
                if name in config.target_modules:
                    found.append((parent, name, child))
                    path = f"{parent_name}.{name}" if parent_name else name
                    refused += [f"'{path}' ({why})" for (kind, child_name), why in _BYPASSED_CHILDREN.items()
                                if isinstance(parent, kind) and name == child_name]
    missing = [t for t in config.target_modules if t not in linear_names]
    if missing:
        hint = ""
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            hint = ("; nn.MultiheadAttention keeps its q, k, v projections in one in_proj_weight Parameter, not "
                    "in nn.Linear layers, so they cannot be adapted")
        raise ValueError(f"target_modules {missing} match no nn.Linear (nor frozen quantised linear) in the model; "
                         f"its linear layers' names are {sorted(linear_names)}{hint}")
    if refused:
        raise ValueError("cannot adapt " + "; ".join(refused) + ". An adapter there would never run and its "
                         "parameters would never train. Leave these names out of target_modules (in "
                         "nn.TransformerEncoderLayer / nn.TransformerDecoderLayer adapt linear1 and linear2), or "
                         "use attention written with nn.Linear projections that it calls, as model.py's Attention")
    pairs = _SampledPairs()  # one draw of contrastive pairs per forward, for all the layers
    for parent, name, child in found:  # replaced after the walk: never modify a module tree while iterating it
        layer = MoELoRALinear(child, config)
        layer._pairs = pairs
        setattr(parent, name, layer)
        if isinstance(parent, nn.TransformerEncoderLayer):
            layer.register_forward_pre_hook(_keep_off_fast_path)
    for module in model.modules():  # the nested-tensor path (eval, with a padding mask) hands on nested tensors
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, MoELoRALinear) for m in module.modules()):
            module.use_nested_tensor = False
    return model


def mark_only_moelora_as_trainable(model):
    for p in model.parameters():
        p.requires_grad = False
    for _, layer in moelora_layers(model):
        for _, p in _adapter_parameters(layer):
            p.requires_grad = True
    return model


def moelora_layers(model):
    """(name, MoELoRALinear) pairs of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELoRALinear)]


def moelora_config(model) -> MoELoRAConfig:
    layers = moelora_layers(model)
    if not layers:
        raise ValueError("the model has no MoELoRA layers: call inject_moelora first")
    return layers[0][1].config


def _adapter_parameters(layer: MoELoRALinear):
    """(name, parameter) of what trains in a layer: lora_A, lora_B and the router, never the frozen base."""
    return [(name, p) for name, p in layer.named_parameters() if name.split(".")[0] in ("lora_A", "lora_B", "router")]


def _is_linear(module) -> bool:
    """What inject_moelora can wrap: an nn.Linear, or a frozen stand-in for one (a quantised linear such as
    quantize.py's Int8Linear): a module with in_features and out_features and no parameter that trains."""
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                             and not any(p.requires_grad for p in module.parameters()))


# PyTorch modules that use a child nn.Linear's weight without calling the child: an adapter there would never run.
# (parent type, child name) -> why. nn.TransformerEncoderLayer's linear1/linear2 are not here: its inference fast
# path skips them too, but inject_moelora switches that path off.
_BYPASSED_CHILDREN = {
    (nn.MultiheadAttention, "out_proj"): "nn.MultiheadAttention reads out_proj.weight inside "
    "F.multi_head_attention_forward and never calls out_proj, in training and in eval",
}
if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
    _BYPASSED_CHILDREN[(nn.LinearCrossEntropyLoss, "linear")] = ("nn.LinearCrossEntropyLoss reads linear.weight "
                                                                 "inside F.linear_cross_entropy and never calls linear")


def _keep_off_fast_path(module, args):
    """A forward pre-hook that does nothing. nn.TransformerEncoderLayer's inference fast path (eval mode, or no
    gradient needed) reads linear1.weight and linear2.weight directly and would skip their adapters; PyTorch does
    not take that path when a submodule has hooks."""
    return None


# --- the auxiliary losses ---------------------------------------------------------------------------------------
# Each takes a leading batch of layers [...]: moelora_aux_losses stacks every adapted layer's inputs and forms all
# their losses in one go, a handful of kernels per step instead of dozens per layer.

def moelora_aux_losses(model):
    """{"contrastive", "balance", "router_z"}: the last forward's auxiliary losses, multiplied by their weights and
    averaged over the adapted layers; zero tensors in eval mode or at weight 0 (nothing computed). Call it after
    every forward (e.g. inside a gradient-accumulation loop): the next forward replaces its inputs.

    Each layer's forward kept only its inputs (_LossInputs); here the layers that stack (the same shapes and
    settings: in practice all of a model's layers of one width) get their losses in one batched computation."""
    named = moelora_layers(model)
    zero = named[0][1].lora_A.new_zeros(()) if named else torch.zeros(())
    _check_aux_losses_can_train(named)
    groups = {}  # (kind, what must match to stack) -> [layers]; kind "router": the balance and z-losses
    for _, layer in named:
        inputs, cfg = layer._loss_inputs, layer.config
        layer._pairs.drawn = None  # the next forward draws new contrastive pairs
        if inputs is None:
            continue
        if cfg.balance_weight > 0 or cfg.router_z_weight > 0:
            key = ("router", cfg.balance_weight, cfg.router_z_weight, cfg.num_experts, inputs.logits.shape,
                   inputs.top_idx.shape)
            groups.setdefault(key, []).append(layer)
        if inputs.codes is not None:
            key = ("contrastive", cfg.contrastive_weight, cfg.contrastive_temperature, cfg.num_experts,
                   inputs.codes.shape)
            groups.setdefault(key, []).append(layer)
    losses = {"contrastive": [], "balance": [], "router_z": []}
    for (kind, *_), group in groups.items():
        cfg = group[0].config
        if kind == "router":  # the routers' logits stacked once for both losses: [L, M, N]
            inputs = [layer._loss_inputs for layer in group]
            logits, real = torch.stack([i.logits for i in inputs]), _stacked_masks([i.real for i in inputs])
            if cfg.balance_weight > 0:
                top_idx = torch.stack([i.top_idx for i in inputs])  # [L, M, k]
                losses["balance"].append(cfg.balance_weight * balance_loss(logits, top_idx, cfg.num_experts, real))
            if cfg.router_z_weight > 0:
                losses["router_z"].append(cfg.router_z_weight * router_z_loss(logits, real))
        else:
            # the Gram matrices [N*r, N*r] have one size whatever the width: stack the B of each width, then every
            # layer's codes in the same order (sorted by width)
            group = sorted(group, key=lambda layer: layer.out_features)
            inputs = [layer._loss_inputs for layer in group]
            widths = sorted({layer.out_features for layer in group})
            grams = [_experts_gram(torch.stack([layer.lora_B for layer in group if layer.out_features == w]))
                     for w in widths]
            gram = grams[0] if len(grams) == 1 else torch.cat(grams)  # [L, N*r, N*r]
            labels = torch.stack([i.labels for i in inputs])  # [L, S]
            dots = _contrastive_dots(torch.stack([i.codes for i in inputs]), labels, gram, cfg.num_experts)
            loss = contrastive_loss(dots, labels, cfg.contrastive_temperature, COSINE_NORM_FLOOR,
                                    _stacked_masks([i.codes_real for i in inputs]))  # [L]
            losses["contrastive"].append(cfg.contrastive_weight * loss)
    return {kind: torch.cat(values).mean() if values else zero for kind, values in losses.items()}


def balance_loss(logits, top_idx, num_experts: int, real=None):
    """Switch Transformer's load balancing: N sum_i f_i P_i, f_i the share of assignments expert i got (no
    gradient), P_i its mean router probability. logits [..., M, N], top_idx [..., M, k], real [M] or [..., M]
    (optional) True for the tokens that count. Returns [...]; 1 when balanced. tutorial.md, section 7, compares
    it with Mixtral's, MixLoRA's and MoLA's."""
    probs = logits.float().softmax(dim=-1)  # [..., M, N]
    f = _expert_share(top_idx, num_experts, real)  # [..., N]
    P = _token_mean(probs, real)  # [..., N]
    return num_experts * (f * P).sum(dim=-1)


def router_z_loss(logits, real=None):
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2. logits [..., M, N], real as in
    balance_loss. Returns [...]. Softmax ignores a shift of all logits, so without it they can drift to large
    values, where float rounding in the softmax and the gates gets coarse."""
    lse = logits.float().logsumexp(dim=-1, keepdim=True)  # [..., M, 1]
    return _token_mean(lse.square(), real).squeeze(-1)


def contrastive_loss(dots, labels, temperature: float, norm_floor: float, real=None):
    """Supervised contrastive loss from dot products: dots [..., S, S] = z @ z.T of features z [..., S, d],
    labels [..., S] the expert of each feature, real [..., S] (optional) False for features of padding, which are
    then neither anchors, positives nor negatives. Returns [...]. Taking dots, not z, lets the caller form them
    cheaply (_contrastive_dots)."""
    S = dots.shape[-1]
    if S < 2:  # a lone feature has neither positives nor negatives (a test on the shape: no graph break)
        return dots.sum(dim=(-2, -1)) * 0.0
    self_mask = torch.eye(S, dtype=torch.bool, device=dots.device)
    pos = (labels.unsqueeze(-1) == labels.unsqueeze(-2)) & ~self_mask  # [..., S, S] same expert, another token
    if real is not None:
        pos = pos & real.unsqueeze(-1) & real.unsqueeze(-2)
    has_pos = pos.any(dim=-1)  # [..., S] anchors with a positive; the loss is 0 when there are none
    # the floored cosine (COSINE_NORM_FLOOR); clamping |z|^2 before the square root also keeps the gradient finite
    # at z = 0 (B at its initial zeros)
    dots = dots.float()
    norms = dots.diagonal(dim1=-2, dim2=-1).clamp(min=norm_floor ** 2).sqrt()  # [..., S] max(|z|, f)
    sim = dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2) * temperature)  # [..., S, S] cos / tau
    # -log(exp(sim_ap) / sum_{n != a} exp(sim_an)) = lse_a - sim_ap, averaged over the positives p of a
    if real is not None:  # padding is no negative: the lowest finite value rather than -inf, so that a row with
        # no real column stays finite (its anchor has no positive and is multiplied by 0 below)
        sim = sim.masked_fill(~real.unsqueeze(-2), torch.finfo(sim.dtype).min)
    lse = sim.masked_fill(self_mask, float("-inf")).logsumexp(dim=-1)  # [..., S], no anchor is its own negative
    mean_pos_sim = (sim * pos).sum(dim=-1) / pos.sum(dim=-1).clamp(min=1)  # [..., S]
    return ((lse - mean_pos_sim) * has_pos).sum(dim=-1) / has_pos.sum(dim=-1).clamp(min=1)  # mean over anchors


# --- what the layer and the losses share -------------------------------------------------------------------------
# Masks multiply rather than index, and sizes are fixed: a boolean index, a data-dependent size or a branch on a
# tensor's value would split a torch.compile graph.

class _LossInputs(NamedTuple):
    """What one adapted layer's training forward keeps for moelora_aux_losses."""
    logits: torch.Tensor  # [M, N] router scores, with gradient: the balance loss and the z-loss
    top_idx: torch.Tensor  # [M, k] selected experts
    real: Optional[torch.Tensor]  # [M] bool, True for real tokens; None = all
    codes: Optional[torch.Tensor]  # [S, N*r] every expert's code of the sampled pairs' tokens, with gradient
    labels: Optional[torch.Tensor]  # [S] each sampled pair's expert
    codes_real: Optional[torch.Tensor]  # [S] bool, whether each sampled pair's token is real; None = all


class _SampledPairs:
    """The contrastive pairs of the current forward, shared by a model's adapted layers: what _draw_pairs returned
    and the (M, k, S) it was drawn for. None until the first layer of a forward draws."""
    drawn = key = None


def _draw_pairs(M: int, k: int, S: int, real, device):
    """S distinct (token, slot) pairs out of M*k, uniformly; under a token mask (real [M]) padding only when there
    are fewer than S real pairs. Returns pick [S] (indices into the M*k pairs), their tokens [S] and whether those
    are real ([S], or None without a mask)."""
    if S == M * k:  # all pairs (a whole random permutation used as an index crashed torch 2.13's inductor)
        pick = torch.arange(M * k, device=device)
    else:  # a random key per pair and the S smallest, padding's keys raised above every real one
        keys = torch.rand(M, k, device=device)  # [M, k]
        if real is not None:
            keys = keys + 2.0 * ~real[:, None]  # real in [0, 1), padding in [2, 3)
        pick = keys.flatten().topk(S, largest=False).indices
    token = pick // k
    return pick, token, None if real is None else real[token]


def _experts_gram(lora_B):
    """lora_B [..., N, out, r] -> [..., N*r, N*r] = B_all^T B_all, B_all [out, N*r] the experts' B side by side."""
    B_all = lora_B.transpose(-3, -2).flatten(-2)  # [..., out, N*r]
    return B_all.transpose(-2, -1) @ B_all


def _contrastive_dots(codes, labels, gram, num_experts: int):
    """z_a . z_b of the sampled pairs without forming z = B_e A_e x. codes [..., S, N*r] every expert's code of each
    pair's token, labels [..., S] its expert, gram [..., N*r, N*r] from _experts_gram. With only the chosen expert's
    rank block of the codes kept, z_a . z_b = codes_a (B_all^T B_all) codes_b^T: S*S*N*r multiply-adds instead of
    S*S*out (found by profiling), whatever the layer's width."""
    N = num_experts
    own = (labels.unsqueeze(-1) == torch.arange(N, device=labels.device)).to(codes.dtype)  # [..., S, N] one-hot
    codes = (codes.unflatten(-1, (N, -1)) * own.unsqueeze(-1)).flatten(-2)  # [..., S, N*r] the chosen block only
    return codes @ gram @ codes.transpose(-2, -1)  # [..., S, S] = z @ z.T


def _token_mean(values, real=None):
    """values [..., M, C] -> [..., C], their mean over the M tokens: the real ones when real ([M] or [..., M],
    bool) is given."""
    if real is None:
        return values.mean(dim=-2)
    weight = real.to(values.dtype).unsqueeze(-1)  # [..., M, 1]
    return (values * weight).sum(dim=-2) / weight.sum(dim=-2).clamp(min=1)


def _expert_share(top_idx, num_experts: int, real=None):
    """top_idx [..., M, k] -> [..., N] the share of the (token, slot) assignments each expert got (real tokens only
    when real is given). A comparison with arange rather than one_hot, which checks its input's range on the host
    (a sync), or bincount, whose output size depends on the data."""
    experts = torch.arange(num_experts, device=top_idx.device)
    chosen = (top_idx.unsqueeze(-1) == experts).sum(dim=-2)  # [..., M, N] 1 where a token chose the expert
    return _token_mean(chosen.float(), real) / top_idx.shape[-1]


def _stacked_masks(masks):
    """The layers' token masks as one: None when none has one, the mask itself when they share one (the usual
    case: one moelora_token_mask for the model), else stacked [L, ...] (a missing mask counts every token)."""
    if all(m is None for m in masks):
        return None
    if all(m is masks[0] for m in masks):
        return masks[0]
    like = next(m for m in masks if m is not None)
    return torch.stack([torch.ones_like(like) if m is None else m for m in masks])


def _in_backward_pass() -> bool:
    """True while autograd runs a backward pass: a module's forward runs then only when activation checkpointing
    recomputes it (the test of PyTorch's own FSDP and module tracker). False under torch.compile: a compiled graph
    recomputes checkpointed regions inside its own backward, never by calling forward, and the test would split
    the graph."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _check_aux_losses_can_train(named_layers):
    """Refuse losses that would silently train nothing, and warn about adapters that a model bypasses."""
    if not torch.is_grad_enabled():
        return  # logging, evaluation: nothing will be trained from these values
    no_grad = [name for name, layer in named_layers if layer.router is not None and layer.router.weight.requires_grad
               and layer._loss_inputs is not None and not layer._loss_inputs.logits.requires_grad]
    if no_grad:
        raise RuntimeError(
            f"the auxiliary losses of {len(no_grad)} adapted layer(s) (first: {no_grad[0]}) were computed without "
            "gradient, though gradients are on now: their forward ran under torch.no_grad(). Reentrant activation "
            "checkpointing does that (Hugging Face: gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': True})); the contrastive and balance losses would then train nothing. Use "
            "use_reentrant=False (transformers' default), or run the forward with gradients enabled")
    training = [layer for _, layer in named_layers if layer.training]
    skipped = [name for name, layer in named_layers if layer.training and not layer._has_run]
    if skipped and len(skipped) < len(training):  # (Python shows a warning once per place by default)
        warnings.warn(f"{len(skipped)} adapted layer(s) never ran a forward (first: {skipped[0]}), while others "
                      "did: their parent module may use their weight without calling them (a fused fast path), or "
                      "may not be used by this model's forward. Their adapters do not train; leave them out of "
                      "target_modules")


# --- padding out of the losses, and what the routers did ----------------------------------------------------------

@contextlib.contextmanager
def moelora_token_mask(model, mask):
    """with moelora_token_mask(model, mask): forward. mask: bool, True for real tokens, False for padding, with the
    leading dims of the adapted layers' inputs (e.g. [batch, seq] for inputs [batch, seq, dim]); Hugging Face
    models: moelora_token_mask(model, batch["attention_mask"].bool()).

    Inside the with, the losses and the routing statistics count real tokens only (as Mixtral's and MixLoRA's
    balance losses read the attention mask); outputs never depend on the mask. With activation checkpointing the
    backward may come after the with: a forward recomputed in backward reuses the mask of the forward it repeats."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"moelora_token_mask needs a bool tensor (True = real token), got {got}; "
                        "e.g. attention_mask.bool()")
    layers = [layer for _, layer in moelora_layers(model)]
    if not layers:
        raise ValueError("the model has no MoELoRA layers: call inject_moelora first")
    mask = mask.to(layers[0].lora_A.device)
    previous = [layer._token_mask for layer in layers]
    for layer in layers:
        layer._token_mask = mask
        layer._pairs.drawn = None  # a new batch: new contrastive pairs
    try:
        yield model
    finally:
        for layer, before in zip(layers, previous):
            layer._token_mask = before


def moelora_routing_stats(model):
    """{layer name: {"expert_share": share of (token, slot) assignments per expert (N floats, summing to 1),
    "router_entropy": mean per-token entropy of the router softmax, in nats (log N = uniform), "tokens": how many
    tokens were counted}}, last forward; real tokens only when it ran under moelora_token_mask."""
    stats = {}
    for name, layer in moelora_layers(model):
        if layer.last_logits is None:
            continue
        N, real = layer.config.num_experts, layer.last_real
        share = _expert_share(layer.last_top_idx, N, real)
        logp = layer.last_logits.float().log_softmax(dim=-1)  # [M, N]
        entropy = _token_mean(-(logp.exp() * logp).sum(dim=-1, keepdim=True), real)[0]
        tokens = layer.last_logits.shape[0] if real is None else int(real.sum())
        stats[name] = {"expert_share": share.tolist(), "router_entropy": entropy.item(), "tokens": tokens}
    return stats


# --- saving and loading the adapters -----------------------------------------------------------------------------

def moelora_state_dict(model):
    """Adapter and router weights only (detached), plus "moelora_config": the config as a plain dict."""
    sd = {f"{name}.{key}": p.detach().clone() for name, layer in moelora_layers(model)
          for key, p in _adapter_parameters(layer)}  # lora_A, lora_B, router.weight (N > 1)
    sd["moelora_config"] = asdict(moelora_config(model))
    return sd


def load_moelora_state_dict(model, state_dict):
    """Load what moelora_state_dict saved into a model injected with the same config. Strict. Returns model."""
    state_dict = dict(state_dict)
    saved = state_dict.pop("moelora_config", None)
    if saved is None:
        raise ValueError("state dict has no 'moelora_config' entry: it was not written by moelora_state_dict")
    ours = asdict(moelora_config(model))
    # a field the saving version did not have yet (gate, router_z_weight...) had its default's behaviour then
    defaults = {f.name: f.default for f in fields(MoELoRAConfig)}
    saved = {**defaults, **saved, "target_modules": tuple(saved.get("target_modules", ()))}
    diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"MoELoRA config mismatch (field: (saved, model)): {diff}; inject with "
                         "MoELoRAConfig(**state_dict['moelora_config']) to match the checkpoint")
    expected = {k: v for k, v in moelora_state_dict(model).items() if k != "moelora_config"}
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"MoELoRA state dict does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError("MoELoRA state dict shape mismatch: " + "; ".join(wrong))
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for k, v in state_dict.items():
            params[k].copy_(v)
    return model


# Adapter files are safetensors (https://github.com/huggingface/safetensors), read and written here without pickle:
# an 8-byte little-endian header length n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
# "__metadata__": {str: str}}, then the raw little-endian tensor bytes (offsets count from the header's end).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_moelora(model, path):
    """Write the adapters and routers (moelora_state_dict) to a .safetensors file, with the MoELoRAConfig as JSON
    in its metadata. Written beside the target and renamed: an interrupted save never leaves a truncated file."""
    state = moelora_state_dict(model)
    config = state.pop("moelora_config")
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "moelora", "moelora_config": json.dumps(config)}}, 0
    for name, t in state.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces so that the data starts 8-byte aligned
    with open(f"{path}.tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in state.values():
            data = bytearray(t.nbytes)  # tensor -> bytes through a tensor over the buffer (no numpy needed)
            torch.frombuffer(data, dtype=torch.uint8).copy_(t.contiguous().view(-1).view(torch.uint8).cpu())
            f.write(data)
    os.replace(f"{path}.tmp", path)


def read_moelora_file(path):
    """(MoELoRAConfig, {name: tensor}) from a file written by save_moelora. No code runs on load (no pickle)."""
    with open(path, "rb") as f:
        blob = f.read()
    tensors = {}
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        config = json.loads(header.pop("__metadata__")["moelora_config"])
        data = blob[8 + n:]
        for name, info in header.items():
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"'{name}' has offsets [{begin}, {end}] for shape {shape}, "
                                 f"in {len(data)} bytes of data")
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(shape)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a MoELoRA adapter file written by save_moelora, or it is damaged "
                         f"({type(e).__name__}: {e})") from None
    return MoELoRAConfig(**config), tensors


def load_moelora(model, path):
    """Load a file written by save_moelora. A model without MoELoRA layers is first injected with the file's
    config; one that has them must match it. Strict, as load_moelora_state_dict. Returns model."""
    config, tensors = read_moelora_file(path)
    if not moelora_layers(model):
        inject_moelora(model, config)
    return load_moelora_state_dict(model, {**tensors, "moelora_config": asdict(config)})


# --- plain LoRA back into ordinary weights ---------------------------------------------------------------------

def merge_moelora(model):
    """Fold every adapter into its base weight and put plain nn.Linear layers back: for a user who trained plain
    LoRA (--method lora: one expert) and wants an ordinary checkpoint that any LLaMA runtime reads. A mixture
    cannot be folded: its update sum_i g_i(x) B_i A_i depends on the input through the gates. Returns model."""
    for name, layer in moelora_layers(model):
        what = name or "the layer"
        if layer.base_layer is not None:
            raise ValueError(f"cannot merge {what}: its base is quantised ({type(layer.base_layer).__name__}), "
                             "and rounding the sum to int8 would lose the adapter; load the unquantised base, "
                             "load_moelora the adapter onto it, then merge_moelora")
        if layer.config.num_experts != 1:
            raise ValueError(f"cannot merge {what}: with {layer.config.num_experts} experts the gates depend on "
                             "the input, so the adapter is no fixed matrix; only one expert (plain LoRA) merges")
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype).requires_grad_(False)
        with torch.no_grad():
            delta = layer.scaling * layer.lora_B[0] @ layer.lora_A[0]  # [out, in]
            plain.weight.copy_(layer.weight + delta.to(layer.weight.dtype))
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        if not name:  # the model is the adapted layer itself
            return plain
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
