"""MoELoRA: a mixture of LoRA experts behind a router, for any model built from nn.Linear layers.

After Luo et al., "MoELoRA: Contrastive Learning Guided Mixture of Experts on Parameter-Efficient Fine-Tuning
for Large Language Models" (arXiv 2402.12851). No official code is public: where the paper is silent, the
choices are this project's (tutorial.md, sections 1 and 4-7). Needs only torch: copy this file anywhere.

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
    save_moelora(model, "adapter.safetensors")         # later: load_moelora(base, "adapter.safetensors")
"""
import contextlib
import json
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MoELoRAConfig", "GATES", "MoELoRALinear", "inject_moelora", "mark_only_moelora_as_trainable",
           "moelora_layers", "moelora_config", "moelora_aux_losses", "balance_loss", "router_z_loss",
           "contrastive_loss", "COSINE_NORM_FLOOR", "moelora_token_mask", "moelora_routing_stats",
           "moelora_state_dict", "load_moelora_state_dict", "SAFETENSORS_DTYPES", "save_moelora",
           "save_moelora_state_dict",
           "read_moelora_file", "load_moelora", "merge_moelora"]

GATES = ("mixtral", "switch")  # MoELoRAConfig.gate
# Floor f on |z| in the contrastive loss's cosine z_a.z_b / (max(|z_a|, f) max(|z_b|, f)): at B ~ 0 a plain
# cosine's gradient (~1/|z|) swamps the task's; below f it is a dot product / f^2 (tutorial.md, section 6).
COSINE_NORM_FLOOR = 0.1


@dataclass
class MoELoRAConfig:
    num_experts: int = 8  # paper (as reported): 8 experts
    top_k: int = 2  # paper (as reported): top-2 routing
    # "mixtral": a softmax over the k kept logits (the paper's), so a token's gates sum to 1. "switch": the
    # softmax over all N, the k kept probabilities as they are (Switch Transformer): it trains a top-1 router
    gate: str = "mixtral"
    r: int = 4  # rank of each expert: 8 experts x rank 4 = the parameters of one rank-32 LoRA
    lora_alpha: float = 8.0  # scaling = alpha / r = 2, the LLM-Adapters convention (alpha = 2r)
    lora_dropout: float = 0.05  # LLM-Adapters default
    target_modules: tuple = ("wq", "wv")  # attention query and value (HF names: "q_proj", "v_proj")
    # off: no weight lowered the loss in the pre-registered trials (tutorial/experiments.md). For the paper's
    # method try 0.01 with contrastive_temperature 0.5, the first trial's best pair
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1  # the best temperature in the SupCon paper
    contrastive_samples: int = 256  # (token, expert) pairs per layer feeding the loss: cost ~ samples^2
    balance_weight: float = 0.01  # Switch Transformer's value
    router_z_weight: float = 0.0  # ST-MoE's z-loss keeps the logits small (ST-MoE: 1e-3; tutorial.md, sec. 7)
    router_jitter: float = 0.0  # Switch's router input x * U(1 - eps, 1 + eps) in training (Switch: 0.01)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            raise TypeError("target_modules must be a list of names such as ('wq', 'wv'), "
                            f"got the string {self.target_modules!r}")
        self.target_modules, N = tuple(self.target_modules), self.num_experts
        checks = [  # each message starts with the field's name, which train.py turns into its flag
            (N >= 1, f"num_experts {N} must be >= 1"),
            (1 <= self.top_k <= N, f"top_k {self.top_k} must be between 1 and num_experts {N}"),
            (self.gate in GATES, f"gate {self.gate!r} must be one of {', '.join(map(repr, GATES))}"),
            (not (self.top_k == 1 and self.num_experts > 1 and self.gate == "mixtral"),
             "top_k 1 with gate 'mixtral' would train no router: a softmax over one kept logit is always "
             "1, so the task sends the router no gradient; use gate 'switch' or top_k 2"),
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
    """y = W0 x + b + scaling * sum_{i in top-k} g_i(x) B_i A_i dropout(x), W0 and b frozen under their own
    names (the state-dict keys stay). A base that is no nn.Linear but a frozen W0 x (quantize.py's Int8Linear)
    is called as the child `base_layer`, `.weight` and `.bias` None. Adapters and router are float32."""

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
        # all experts stacked: no loop over experts in forward. A is Kaiming-uniform as in nn.Linear and PEFT
        # (kaiming_uniform_ on [N, r, in] would take r * in as the fan-in)
        self.lora_A = nn.Parameter(torch.empty(N, r, self.in_features, device=device))  # [N, r, in]
        nn.init.uniform_(self.lora_A, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(N, self.out_features, r, device=device))  # [N, out, r]
        # random, not zeros: with all logits tied, top-k would send every token to experts 0..k-1. One expert
        # needs no router (its gate is always 1): that is plain LoRA, with LoRA's parameter count
        self.router = nn.Linear(self.in_features, N, bias=False, device=device) if N > 1 else None
        self.dropout = nn.Dropout(config.lora_dropout)
        self._token_mask = None  # [leading dims of x] bool, True for real tokens: set by moelora_token_mask
        self._loss_inputs = None  # what the last training forward keeps for moelora_aux_losses
        # the contrastive pairs, one draw per forward for all layers: {"key": (M, k, S), "drawn": ...} shared
        # by inject_moelora, emptied by moelora_aux_losses and moelora_token_mask; this layer's, and who drew
        self._pairs, self._last_pairs, self._drew_pairs = {}, None, False
        self.last_logits = self.last_top_idx = self.last_real = None  # the last routing, its real tokens [M]
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
        gates = torch.zeros(logits.shape, dtype=top_gates.dtype, device=x.device)
        return gates.scatter(-1, top_idx, top_gates), top_idx, logits

    def forward(self, x):
        result = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        # activation checkpointing reruns this forward in backward (not under torch.compile: a compiled graph
        # reruns in its own backward). A rerun saves for backward what the first run saved, and keeps nothing
        rerun = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
        self._loss_inputs, self._has_run = self._loss_inputs if rerun else None, True
        cfg, N, r = self.config, self.config.num_experts, self.config.r
        real = self.last_real if rerun else None  # [M]; a rerun after the with takes the mask it had
        if self._token_mask is not None:  # only the losses and statistics read it, never the output
            if self._token_mask.shape != x.shape[:-1]:
                raise ValueError(f"moelora_token_mask: the mask has shape {tuple(self._token_mask.shape)}, "
                                 f"but an adapted layer got an input of shape {tuple(x.shape)}: the mask "
                                 f"must have the input's leading dims {tuple(x.shape[:-1])} (one per token)")
            real = self._token_mask.reshape(-1)
        x2 = x.to(self.lora_A.dtype).reshape(-1, self.in_features)  # [M, in], M = number of tokens
        if self.router is None:  # one expert: plain LoRA, B A dropout(x)
            delta = F.linear(F.linear(self.dropout(x2), self.lora_A[0]), self.lora_B[0])  # [M, out]
            return result + (self.scaling * delta).view(*x.shape[:-1], self.out_features).to(result.dtype)
        gates, top_idx, logits = self.route(x2)
        # All N experts are one LoRA of rank N*r whose rank blocks the gates scale per token: two matmuls, the
        # cost of the LoRA of equal size. Gathering each token's k experts ([M, k, out, r]) was far slower
        h = F.linear(self.dropout(x2), self.lora_A.reshape(N * r, -1))  # [M, N*r] every expert's code A_i x
        h_gated = (h.view(-1, N, r) * gates.unsqueeze(-1)).view(-1, N * r)  # [M, N*r]
        B_all = _side_by_side(self.lora_B)  # [out, N*r] the experts' B side by side
        delta = F.linear(h_gated, B_all)  # [M, out]
        self.last_logits, self.last_top_idx, self.last_real = logits.detach(), top_idx, real
        if self.training and (cfg.balance_weight or cfg.router_z_weight or cfg.contrastive_weight):
            # their inputs only, a few small kernels: moelora_aux_losses forms all layers' losses at once
            codes = labels = codes_real = B = None
            if cfg.contrastive_weight > 0:
                pick, token, codes_real = self._contrastive_pairs(h.shape[0], cfg.top_k, real, rerun)  # [S]
                codes, labels = h[token], top_idx.reshape(-1)[pick]  # [S, N*r] all experts' codes; [S]
                # a copy made here, where lora_B is whole even when FSDP keeps only a shard of it between forwards
                B = B_all.contiguous()  # (already one, unless r == 1)
            if not rerun:
                self._loss_inputs = _LossInputs(logits, top_idx, real, codes, labels, codes_real, B)
        delta = (self.scaling * delta).view(*x.shape[:-1], self.out_features)
        return result + delta.to(result.dtype)

    def _contrastive_pairs(self, M: int, k: int, real, rerun: bool):
        """The forward's pairs (_draw_pairs): drawn by its first layer, taken by the others (same tokens)."""
        S = min(self.config.contrastive_samples, M * k)
        if rerun:
            # the pairs of the forward it repeats; the layer that drew them draws again, from the RNG state
            # that checkpointing restored, so that the dropout after it gets the masks it had
            if self._drew_pairs:
                _draw_pairs(M, k, S, real, self.lora_A.device)
            return self._last_pairs
        self._drew_pairs = self._pairs.get("key") != (M, k, S)
        if self._drew_pairs:
            self._pairs.update(key=(M, k, S), drawn=_draw_pairs(M, k, S, real, self.lora_A.device))
        self._last_pairs = self._pairs["drawn"]
        return self._last_pairs

    def sampled_contrastive_loss(self, h, top_idx, real=None):
        """This layer's contrastive loss (unweighted) on codes h [M, N*r] (A_i x, before gating), top_idx
        [M, k] and real [M] (optional), on pairs drawn here: what moelora_aux_losses forms, for analysis."""
        cfg, (M, k) = self.config, top_idx.shape
        pick, token, token_real = _draw_pairs(M, k, min(cfg.contrastive_samples, M * k), real, h.device)
        labels = top_idx.reshape(-1)[pick]
        dots = _contrastive_dots(h[token], labels, _gram(_side_by_side(self.lora_B)), cfg.num_experts)
        return contrastive_loss(dots, labels, cfg.contrastive_temperature, COSINE_NORM_FLOOR, token_real)

    def extra_repr(self):
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={c.num_experts}, top_k={c.top_k}, r={c.r}, scaling={self.scaling:g}")


# --- putting the layers into a model ------------------------------------------------------------------------
def inject_moelora(model, config: MoELoRAConfig):
    """Wrap in place each nn.Linear (or frozen stand-in: quantize.py's Int8Linear) named in target_modules
    ("wq": "layers.0.attention.wq"). Returns model. A child that its parent bypasses is refused."""
    if moelora_layers(model):
        raise ValueError("the model already has MoELoRA layers: inject once, into the base model")
    found, linear_names, refused = [], set(), []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            frozen = hasattr(child, "in_features") and not any(p.requires_grad for p in child.parameters())
            if isinstance(child, nn.Linear) or (frozen and hasattr(child, "out_features")):
                linear_names.add(name)
                if name in config.target_modules:
                    found.append((parent, name, child))
                    path = f"{parent_name}.{name}" if parent_name else name
                    refused += [f"'{path}' ({why})" for (kind, child_name), why in _BYPASSED_CHILDREN.items()
                                if isinstance(parent, kind) and name == child_name]
    missing = [t for t in config.target_modules if t not in linear_names]
    if missing:
        mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        hint = "; nn.MultiheadAttention keeps q, k and v in one in_proj_weight Parameter" if mha else ""
        raise ValueError(f"target_modules {missing} match no nn.Linear (nor frozen quantised linear) in the "
                         f"model; its linear layers' names are {sorted(linear_names)}{hint}")
    if refused:
        raise ValueError("cannot adapt " + "; ".join(refused) + ". An adapter there would never run and its "
                         "parameters would never train. Leave these names out of target_modules (in "
                         "nn.TransformerEncoderLayer / nn.TransformerDecoderLayer adapt linear1 and "
                         "linear2), or use attention that calls its projections (model.py's Attention)")
    pairs = {}  # one draw of contrastive pairs per forward, for all the layers
    for parent, name, child in found:  # replaced after the walk: never change a module tree while walking it
        setattr(parent, name, layer := MoELoRALinear(child, config))
        layer._pairs = pairs
        if isinstance(parent, nn.TransformerEncoderLayer):  # its fast path reads linear1/2.weight in eval;
            layer.register_forward_pre_hook(lambda module, args: None)  # PyTorch skips it for hooks
    for module in model.modules():  # nor nested tensors (eval with a padding mask) into the adapters
        if isinstance(module, nn.TransformerEncoder) and moelora_layers(module):
            module.use_nested_tensor = False
    return model


# PyTorch modules that use a child nn.Linear's weight without calling the child: (parent type, name) -> why
_BYPASSED_CHILDREN = {(nn.MultiheadAttention, "out_proj"): "nn.MultiheadAttention reads out_proj.weight in "
                      "F.multi_head_attention_forward and never calls out_proj, in training and in eval"}
if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
    _BYPASSED_CHILDREN[(nn.LinearCrossEntropyLoss, "linear")] = (
        "nn.LinearCrossEntropyLoss reads linear.weight inside F.linear_cross_entropy and never calls linear")


def mark_only_moelora_as_trainable(model):
    adapters = {id(p) for p in _adapter_parameters(model).values()}
    for p in model.parameters():
        p.requires_grad = id(p) in adapters
    return model


def _adapter_parameters(model):  # {name: parameter} of what trains: lora_A, lora_B, routers, never a base
    return {f"{name}.{key}": p for name, layer in moelora_layers(model) for key, p in layer.named_parameters()
            if key.split(".")[0] in ("lora_A", "lora_B", "router")}


def moelora_layers(model):  # (name, MoELoRALinear) pairs, in module order
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELoRALinear)]


def moelora_config(model) -> MoELoRAConfig:
    layers = moelora_layers(model)
    if not layers:
        raise ValueError("the model has no MoELoRA layers: call inject_moelora first")
    return layers[0][1].config


# --- the auxiliary losses, each over a leading batch of layers [...] ----------------------------------------
def moelora_aux_losses(model, contrastive_scale: float = 1.0):
    """{"contrastive", "balance", "router_z"}: the last forward's auxiliary losses times their weights, the
    mean over adapted layers (zeros in eval mode or at weight 0). contrastive_scale: the share of
    contrastive_weight to use now, e.g. a warm-up ramp. Call it after every forward: the next one replaces its
    inputs. Layers that stack get theirs together: a few kernels a step, not dozens a layer."""
    if not contrastive_scale >= 0:
        raise ValueError(f"contrastive_scale {contrastive_scale} must be >= 0")
    named = moelora_layers(model)
    zero = torch.zeros((), device=named[0][1].lora_A.device if named else None)  # (lora_A may be sharded: FSDP)
    if torch.is_grad_enabled():  # refuse losses that would silently train nothing, warn about bypassed layers
        no_grad = [name for name, layer in named if layer.router is not None and layer._loss_inputs is not
                   None and layer.router.weight.requires_grad and not layer._loss_inputs.logits.requires_grad]
        if no_grad:
            raise RuntimeError(f"the auxiliary losses of {len(no_grad)} adapted layer(s) (first: "
                               f"{no_grad[0]}) were computed without gradient: their forward ran under "
                               "torch.no_grad(), as reentrant activation checkpointing does (Hugging Face: "
                               "use_reentrant=True), so they would train nothing. Use use_reentrant=False "
                               "(transformers' default), or run the forward with gradients enabled")
        skipped = [name for name, layer in named if layer.training and not layer._has_run]
        if skipped and len(skipped) < sum(layer.training for _, layer in named):  # (warned once per place)
            warnings.warn(f"{len(skipped)} adapted layer(s) never ran a forward (first: {skipped[0]}), while "
                          "others did: their parent may use their weight without calling them (a fused fast "
                          "path), or the model may not use them. Their adapters do not train; leave them out "
                          "of target_modules")
    groups = {}  # what must match to stack -> [layers]
    for _, layer in named:
        layer._pairs.clear()  # the next forward draws new contrastive pairs
        i, c = layer._loss_inputs, layer.config
        if i is not None:
            key = (c.balance_weight, c.router_z_weight, c.contrastive_weight, c.contrastive_temperature,
                   c.num_experts, i.logits.shape, i.top_idx.shape, i.codes is None or i.codes.shape)
            groups.setdefault(key, []).append(layer)
    terms = {"contrastive": [], "balance": [], "router_z": []}  # [L] per group
    for group in groups.values():
        group = sorted(group, key=lambda layer: layer.out_features)  # in the order of the Gram matrices below
        cfg, inputs = group[0].config, [layer._loss_inputs for layer in group]
        if cfg.balance_weight > 0 or cfg.router_z_weight > 0:  # the routers' logits, stacked once for both
            logits, real = torch.stack([i.logits for i in inputs]), _stacked_masks([i.real for i in inputs])
            if cfg.balance_weight > 0:
                top = torch.stack([i.top_idx for i in inputs])  # [L, M, k]
                terms["balance"].append(cfg.balance_weight * balance_loss(logits, top, cfg.num_experts, real))
            if cfg.router_z_weight > 0:
                terms["router_z"].append(cfg.router_z_weight * router_z_loss(logits, real))
        if inputs[0].codes is not None:
            # the Gram matrices [N*r, N*r] have one size whatever the width: formed width by width, stacked
            grams = [_gram(torch.stack([i.B_all for i in inputs if i.B_all.shape[0] == width]))
                     for width in sorted({i.B_all.shape[0] for i in inputs})]
            gram = grams[0] if len(grams) == 1 else torch.cat(grams)  # [L, N*r, N*r]
            labels = torch.stack([i.labels for i in inputs])  # [L, S]
            dots = _contrastive_dots(torch.stack([i.codes for i in inputs]), labels, gram, cfg.num_experts)
            loss = contrastive_loss(dots, labels, cfg.contrastive_temperature, COSINE_NORM_FLOOR,
                                    _stacked_masks([i.codes_real for i in inputs]))  # [L]
            terms["contrastive"].append(cfg.contrastive_weight * contrastive_scale * loss)
    return {kind: torch.cat(values).mean() if values else zero for kind, values in terms.items()}


def balance_loss(logits, top_idx, num_experts: int, real=None):
    """Switch Transformer's load balancing N sum_i f_i P_i: f_i the share of assignments expert i got (no
    gradient), P_i its mean router probability. logits [..., M, N], top_idx [..., M, k], real [M] or [..., M]
    (optional) True for the tokens that count. Returns [...], 1 when balanced (tutorial.md, section 7)."""
    probs = logits.float().softmax(dim=-1)  # [..., M, N]
    f = _expert_share(top_idx, num_experts, real)  # [..., N]
    P = _token_mean(probs, real)  # [..., N]
    return num_experts * (f * P).sum(dim=-1)


def router_z_loss(logits, real=None):
    """ST-MoE's router z-loss, the mean over tokens of logsumexp(logits)^2: logits [..., M, N], real as in
    balance_loss; returns [...]. Softmax ignores a shift of all logits, so without it they can drift to large
    values, where float rounding in the softmax and the gates gets coarse."""
    lse = logits.float().logsumexp(dim=-1, keepdim=True)  # [..., M, 1]
    return _token_mean(lse.square(), real).squeeze(-1)


def contrastive_loss(dots, labels, temperature: float, norm_floor: float, real=None):
    """Supervised contrastive loss from dot products: dots [..., S, S] = z @ z.T of features z [..., S, d],
    labels [..., S] each feature's expert, real [..., S] (optional) False for padding's features, which are
    then neither anchors, positives nor negatives. Returns [...]."""
    S = dots.shape[-1]
    if S < 2:  # a lone feature has neither positives nor negatives (a test on the shape: no graph break)
        return dots.sum(dim=(-2, -1)) * 0.0
    self_mask = torch.eye(S, dtype=torch.bool, device=dots.device)
    pos = (labels.unsqueeze(-1) == labels.unsqueeze(-2)) & ~self_mask  # [..., S, S] same expert, other token
    if real is not None:
        pos = pos & real.unsqueeze(-1) & real.unsqueeze(-2)
    has_pos = pos.any(dim=-1)  # [..., S] anchors with a positive; the loss is 0 when there are none
    # the floored cosine (COSINE_NORM_FLOOR); clamping |z|^2 before the root keeps the gradient finite at 0
    dots = dots.float()
    norms = dots.diagonal(dim1=-2, dim2=-1).clamp(min=norm_floor ** 2).sqrt()  # [..., S] max(|z|, f)
    sim = dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2) * temperature)  # [..., S, S] cos / tau
    if real is not None:  # padding is no negative; the lowest finite value, not -inf, keeps finite a row with
        sim = sim.masked_fill(~real.unsqueeze(-2), torch.finfo(sim.dtype).min)  # no real column (unused)
    # -log(exp(sim_ap) / sum_{n != a} exp(sim_an)) = lse_a - sim_ap, averaged over the positives p of a
    lse = sim.masked_fill(self_mask, float("-inf")).logsumexp(dim=-1)  # [..., S], an anchor is no negative
    mean_pos_sim = (sim * pos).sum(dim=-1) / pos.sum(dim=-1).clamp(min=1)  # [..., S]
    return ((lse - mean_pos_sim) * has_pos).sum(dim=-1) / has_pos.sum(dim=-1).clamp(min=1)  # anchors' mean


# --- what the layer and the losses share --------------------------------------------------------------------
# Masks multiply, sizes are fixed: boolean indexing or data-dependent sizes would split a torch.compile graph.
class _LossInputs(NamedTuple):  # what a layer's training forward keeps for moelora_aux_losses
    logits: torch.Tensor  # [M, N] router scores, with gradient: the balance loss and the z-loss
    top_idx: torch.Tensor  # [M, k] selected experts
    real: Optional[torch.Tensor]  # [M] bool, True for real tokens; None = all
    codes: Optional[torch.Tensor]  # [S, N*r] every expert's code of the sampled pairs' tokens, with gradient
    labels: Optional[torch.Tensor]  # [S] each sampled pair's expert
    codes_real: Optional[torch.Tensor]  # [S] bool, whether each sampled pair's token is real; None = all
    B_all: Optional[torch.Tensor]  # [out, N*r] the experts' B side by side, with gradient


def _draw_pairs(M: int, k: int, S: int, real, device):
    """S distinct (token, slot) pairs of the M*k, uniformly, padding (real [M] False) only when there are
    fewer than S real ones. Returns pick [S] (into the M*k), their tokens [S], whether they are real [S]."""
    if S == M * k:  # all pairs (a whole random permutation used as an index crashed torch 2.13's inductor)
        pick = torch.arange(M * k, device=device)
    else:  # a random key per pair and the S smallest, padding's keys raised above every real one
        keys = torch.rand(M, k, device=device)  # [M, k]
        if real is not None:
            keys = keys + 2.0 * ~real[:, None]  # real in [0, 1), padding in [2, 3)
        pick = keys.flatten().topk(S, largest=False).indices
    token = pick // k
    return pick, token, None if real is None else real[token]


def _side_by_side(lora_B):
    """lora_B [..., N, out, r] -> B_all [..., out, N*r], the experts' B side by side (a copy)."""
    return lora_B.transpose(-3, -2).flatten(-2)


def _gram(B_all):
    """B_all [..., out, N*r] -> B_all^T B_all [..., N*r, N*r]."""
    return B_all.transpose(-2, -1) @ B_all


def _contrastive_dots(codes, labels, gram, N: int):
    """z_a . z_b of pairs without forming z = B_e A_e x: codes [..., S, N*r] every expert's code of a pair's
    token, kept in its expert's block only (labels [..., S]); codes_a (B_all^T B_all) codes_b^T costs S*S*N*r
    multiply-adds, not S*S*out."""
    own = (labels.unsqueeze(-1) == torch.arange(N, device=labels.device)).to(codes.dtype)  # [..., S, N]
    codes = (codes.unflatten(-1, (N, -1)) * own.unsqueeze(-1)).flatten(-2)  # [..., S, N*r] the chosen block
    return codes @ gram @ codes.transpose(-2, -1)  # [..., S, S] = z @ z.T


def _token_mean(values, real=None):
    """values [..., M, C] -> [..., C], their mean over the M tokens (the real ones: real [M] or [..., M])."""
    if real is None:
        return values.mean(dim=-2)
    weight = real.to(values.dtype).unsqueeze(-1)  # [..., M, 1]
    return (values * weight).sum(dim=-2) / weight.sum(dim=-2).clamp(min=1)


def _expert_share(top_idx, num_experts: int, real=None):
    """top_idx [..., M, k] -> [..., N] each expert's share of the (token, slot) assignments. (A comparison
    with arange: one_hot checks its input's range on the host, and bincount's size depends on the data.)"""
    experts = torch.arange(num_experts, device=top_idx.device)
    chosen = (top_idx.unsqueeze(-1) == experts).sum(dim=-2)  # [..., M, N] 1 where a token chose the expert
    return _token_mean(chosen.float(), real) / top_idx.shape[-1]


def _stacked_masks(masks):
    """The layers' masks as one: the one they share (None: no mask), else [L, ...], None counting all real."""
    if all(m is masks[0] for m in masks):
        return masks[0]
    like = next(m for m in masks if m is not None)
    return torch.stack([torch.ones_like(like) if m is None else m for m in masks])


# --- padding out of the losses, and what the routers did ----------------------------------------------------
@contextlib.contextmanager
def moelora_token_mask(model, mask):
    """with moelora_token_mask(model, mask): forward. mask: bool, True for real tokens, the adapted layers'
    inputs' leading dims (e.g. [batch, seq]; Hugging Face: attention_mask.bool()). Inside, the losses and
    statistics count real tokens only; outputs never change. A rerun by checkpointing keeps its mask."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"moelora_token_mask needs a bool tensor (True = real token), got {got}; "
                        "e.g. attention_mask.bool()")
    moelora_config(model)  # raises when the model has no MoELoRA layers
    layers = [layer for _, layer in moelora_layers(model)]
    mask = mask.to(layers[0].lora_A.device)
    previous = [layer._token_mask for layer in layers]
    for layer in layers:
        layer._token_mask = mask
        layer._pairs.clear()  # a new batch: new contrastive pairs
    try:
        yield model
    finally:
        for layer, before in zip(layers, previous):
            layer._token_mask = before


def moelora_routing_stats(model):
    """{layer name: {"expert_share": [N] summing to 1, "router_entropy": the mean per-token entropy of the
    router's softmax in nats (log N: uniform), "tokens": how many}} of the last forward's (real) tokens."""
    stats = {}
    for name, layer in moelora_layers(model):
        if layer.last_logits is None:
            continue
        real, logp = layer.last_real, layer.last_logits.float().log_softmax(dim=-1)  # [M], [M, N]
        share = _expert_share(layer.last_top_idx, layer.config.num_experts, real)
        entropy = _token_mean(-(logp.exp() * logp).sum(dim=-1, keepdim=True), real)[0]
        tokens = layer.last_logits.shape[0] if real is None else int(real.sum())
        stats[name] = {"expert_share": share.tolist(), "router_entropy": entropy.item(), "tokens": tokens}
    return stats


# --- saving and loading the adapters ------------------------------------------------------------------------
def moelora_state_dict(model):
    """The adapters and routers only (detached), plus "moelora_config": the config as a plain dict."""
    sd = {k: p.detach().clone() for k, p in _adapter_parameters(model).items()}
    return {**sd, "moelora_config": asdict(moelora_config(model))}


def load_moelora_state_dict(model, state_dict):
    """Load what moelora_state_dict saved into a model injected with the same config, strictly."""
    state_dict = dict(state_dict)
    saved = state_dict.pop("moelora_config", None)
    if saved is None:
        raise ValueError("state dict has no 'moelora_config' entry: it was not written by moelora_state_dict")
    # a field that the saving version did not have yet (gate, router_z_weight...) had its default's behaviour
    saved = {**asdict(MoELoRAConfig()), **saved, "target_modules": tuple(saved.get("target_modules", ()))}
    diff = {k: (saved.get(k), v) for k, v in asdict(moelora_config(model)).items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"MoELoRA config mismatch (field: (saved, model)): {diff}; inject with "
                         "MoELoRAConfig(**state_dict['moelora_config']) to match the checkpoint")
    params = _adapter_parameters(model)
    missing, unexpected = sorted(params.keys() - state_dict.keys()), sorted(state_dict.keys() - params.keys())
    wrong = [f"{k}: saved {tuple(v.shape)}, model {tuple(params[k].shape)}"
             for k, v in state_dict.items() if k in params and v.shape != params[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"MoELoRA state dict does not match the model: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatch {wrong}")
    with torch.no_grad():
        for k, v in state_dict.items():
            params[k].copy_(v)
    return model


# Adapter files are safetensors, read and written here without pickle: an 8-byte little-endian header length
# n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
# then the tensors' raw little-endian bytes (offsets count from the end of the header).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_moelora(model, path):
    """Write moelora_state_dict to a .safetensors file, the MoELoRAConfig as JSON in its metadata. Written
    beside the target and renamed: an interrupted save never leaves a truncated file."""
    save_moelora_state_dict(moelora_state_dict(model), path)


def save_moelora_state_dict(state_dict, path):
    """save_moelora of a state dict as moelora_state_dict returns it (e.g. gathered whole from shards)."""
    state = dict(state_dict)
    config = json.dumps(state.pop("moelora_config"))
    header, end = {"__metadata__": {"format": "moelora", "moelora_config": config}}, 0
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    for name, t in state.items():
        begin, end = end, end + t.nbytes
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [begin, end]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # padded with spaces so that the data starts 8-byte aligned
    with open(f"{path}.tmp", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in state.values():  # tensor -> bytes through a tensor over the buffer: no numpy needed
            data = bytearray(t.nbytes)
            torch.frombuffer(data, dtype=torch.uint8).copy_(t.contiguous().view(-1).view(torch.uint8).cpu())
            f.write(data)
    os.replace(f"{path}.tmp", path)


def read_moelora_file(path):
    """(MoELoRAConfig, {name: tensor}) from a file of save_moelora's. No code runs on load (no pickle)."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header, data, tensors = json.loads(blob[8:8 + n]), blob[8 + n:], {}
        config = json.loads(header.pop("__metadata__")["moelora_config"])
        for name, t in header.items():
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[t["dtype"]], t["shape"], t["data_offsets"]
            if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"'{name}': offsets [{begin}, {end}] for shape {shape} in {len(data)} bytes")
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).view(shape)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a MoELoRA adapter file written by save_moelora, or it is damaged "
                         f"({type(e).__name__}: {e})") from None
    return MoELoRAConfig(**config), tensors


def load_moelora(model, path):
    """Load a file of save_moelora's, strictly, into a model with its config (injected if it has none)."""
    config, tensors = read_moelora_file(path)
    if not moelora_layers(model):
        inject_moelora(model, config)
    return load_moelora_state_dict(model, {**tensors, "moelora_config": asdict(config)})


# --- plain LoRA back into ordinary weights ------------------------------------------------------------------
def merge_moelora(model):
    """Fold each adapter into its base weight and put nn.Linear layers back, so that plain LoRA (one expert)
    becomes an ordinary checkpoint. A mixture cannot be folded: its gates depend on the input."""
    for name, layer in moelora_layers(model):
        what = name or "the layer"
        if layer.base_layer is not None:
            raise ValueError(f"cannot merge {what}: its base is quantised ({type(layer.base_layer).__name__})"
                             " and rounding the sum back to it would lose the adapter; load the unquantised "
                             "base, load_moelora the adapter onto it, then merge_moelora")
        if layer.config.num_experts != 1:
            raise ValueError(f"cannot merge {what}: with {layer.config.num_experts} experts the gates "
                             "depend on the input: no fixed matrix; only one expert (plain LoRA) merges")
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
