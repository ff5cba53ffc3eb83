"""
A controlled experiment with a known answer: a task where the ideal update depends on the input by construction.

    OMP_NUM_THREADS=1 python tutorial/controlled.py                  # full: ~3 minutes on one core
    OMP_NUM_THREADS=1 python tutorial/controlled.py --quick          # reduced (what tests/test_controlled.py runs)
    python tutorial/controlled.py --seeds 5 --out_dir tutorial --no_figures

The task. A frozen layer y = W0 x (d x d). Inputs come from C clusters: x = mu_c + eps, eps ~ N(0, I), with
|mu_c| = sep (the separation knob, in units of the within-cluster standard deviation). The teacher adds a
different rank-r_t update per cluster: y* = W0 x + D_c x, D_c = U_c V_c, scaled so that E |D_c x|^2 = d for
every cluster. So the base alone has an MSE of 1, and every loss below is relative to it (1 = nothing learned).
The within-cluster noise spans all d input directions, so one shared update M fits cluster c only where
M = D_c: no single linear map of any rank fits all clusters, while N >= C experts of rank r >= r_t routed by
cluster fit them exactly. Both limits are computed in closed form (floor_single, floor_oracle).

Contenders, on the same batches and the same initialisation seed (one seed = one teacher, one data stream,
one init): the base alone; LoRA of rank N*r (MoELoRALinear with one expert, as train.py --method lora);
MoELoRA N x r top-k with the defaults when this experiment first ran (contrastive 0.1, balance 0.01); the same without the
contrastive loss; that one again with its routers frozen as drawn (the untrained-router control); and the
default MoELoRA for three times the steps (is it only slower?).
Trainable parameters: LoRA N*r*(2d); MoELoRA the same plus its router, N*d (counted and printed separately).

Printed as Markdown: the floors, the learning-rate grid, the main comparison, routing (NMI and purity of the
top-1 expert against the true cluster, trained and at init), "random routing" (top-1 flips between the last
two checkpoints and under small input noise; how alike one expert's outputs are, which is what the contrastive
loss rewards), and sweeps of C vs N, rank per expert, top-k, contrastive
weight and separation. Figures (matplotlib, optional): controlled_fit.png, controlled_nmi.png.

tutorial/trial.py runs the pre-registered contrastive-loss trials on this task; it takes the task, `train` and
the routing measures (a)-(e) from here.
"""
import argparse
import contextlib
import copy
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project is flat files at the repo root

import moelora  # noqa: E402
from moelora import MoELoRAConfig, inject_moelora, mark_only_moelora_as_trainable, moelora_aux_losses  # noqa: E402


@dataclass
class Setup:
    d: int = 64  # d_in = d_out
    clusters: int = 4  # C
    teacher_rank: int = 4  # r_t, rank of each cluster's update D_c
    teacher_aligned: bool = False  # True: D_c reads x along its cluster's centre (its first input direction is mu_c)
    sep: float = 4.0  # |mu_c| in within-cluster standard deviations (4: Bayes error ~0.2% between two clusters)
    experts: int = 4  # N
    r: int = 4  # rank per expert; LoRA gets N * r
    top_k: int = 2  # the project's default
    gate: str = "mixtral"  # "switch": softmax over all N logits, the k kept unrenormalised (what top-1 needs)
    contrastive_weight: float = 0.1  # the first runs' value: the project's default then (it is 0 since the trial)
    temperature: float = 0.1  # of the contrastive loss, either reading
    balance_weight: float = 0.01  # the project's default
    router_z_weight: float = 0.0  # ST-MoE's router z-loss
    router_jitter: float = 0.0  # Switch's multiplicative noise on the router input, in training
    steps: int = 300
    batch: int = 128  # x top-2 = 256 (input, expert) pairs: the contrastive loss takes them all, no sampling
    eval_every: int = 25
    n_eval: int = 2048
    noise: float = 0.01  # input noise for the routing-stability probe, in within-cluster standard deviations


# name -> what differs from a MoELoRA built from the Setup. "lora": one expert of rank N*r, top-1.
VARIANTS = {
    "base": {},
    "lora": {},
    "moelora": {},
    "moelora_cl0": {"contrastive_weight": 0.0},
    "moelora_cl0_frozen_router": {"contrastive_weight": 0.0, "freeze_router": True},  # routing stays as drawn
    # CoMoE's reading of the contrastive loss instead of the project's (same_token_contrastive): the trial's arm
    "moelora_sametoken": {"contrastive_weight": 0.0, "same_token": True},
}
EXTRA_KEYS = ("freeze_router", "same_token")  # VARIANTS keys that are not MoELoRAConfig fields


# -----------------------------------------------------------------------------------------------------
# the task

def make_task(s: Setup, seed: int):
    """Teacher of one seed: W0 [d, d], centres mu [C, d] (norm sep), per-cluster updates D [C, d, d] (rank r_t)."""
    g = torch.Generator().manual_seed(seed)
    d, C = s.d, s.clusters
    W0 = torch.randn(d, d, generator=g) / math.sqrt(d)
    mu = torch.randn(C, d, generator=g)
    mu = s.sep * mu / mu.norm(dim=1, keepdim=True)  # [C, d]
    U = torch.randn(C, d, s.teacher_rank, generator=g)
    V = torch.randn(C, s.teacher_rank, d, generator=g)
    if s.teacher_aligned:  # v_c . x = sep + noise keeps its sign: one cluster's outputs D_c x then point one way
        V[:, 0] = mu / mu.norm(dim=1, keepdim=True)
    D = U @ V  # [C, d, d]
    # E |D_c x|^2 = |D_c mu_c|^2 + |D_c|_F^2 (eps ~ N(0, I)); scale it to d: the base's MSE per element is then 1
    energy = (D @ mu.unsqueeze(-1)).squeeze(-1).pow(2).sum(-1) + D.pow(2).sum((1, 2))  # [C]
    D = D * (d / energy).sqrt().view(C, 1, 1)
    return {"W0": W0, "mu": mu, "D": D, "setup": s}


def sample(task, n: int, g: torch.Generator):
    """n inputs x [n, d], their clusters c [n] (uniform), the teacher's outputs y [n, d]."""
    mu, D = task["mu"], task["D"]
    c = torch.randint(0, mu.shape[0], (n,), generator=g)
    x = mu[c] + torch.randn(n, mu.shape[1], generator=g)
    every = torch.einsum("cij,nj->nci", D, x)  # [n, C, d] each cluster's update on every input (no [n, d, d])
    y = x @ task["W0"].T + every[torch.arange(n), c]
    return x, c, y


def batches(task, steps: int, batch: int, seed: int):
    """The training stream of a seed, drawn once and fed identically to every contender: x, c, y [steps, batch, .]."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x, c, y = sample(task, steps * batch, g)
    return x.view(steps, batch, -1), c.view(steps, batch), y.view(steps, batch, -1)


# -----------------------------------------------------------------------------------------------------
# closed-form floors: the best any single linear update, or any hard routing, can reach (population values)

def floor_rank(task, clusters, rank):
    """Lowest relative MSE of ONE update M of rank <= rank applied to the given clusters (weighted equally),
    relative to the base's MSE on them. Reduced-rank regression: with S = sum_c E[x x^T | c] = L L^T and
    G = sum_c D_c E[x x^T | c], the loss is T - |G L^-T|_F^2 + |M L - G L^-T|_F^2, so the best rank-R M keeps
    the R largest singular values of G L^-T: floor = (T - sum_{i<=R} s_i^2) / T."""
    mu, D, d = task["mu"], task["D"], task["setup"].d
    S_c = mu[clusters, :, None] * mu[clusters, None, :] + torch.eye(d)  # [m, d, d] second moments
    S, G = S_c.sum(0).double(), (D[clusters] @ S_c).sum(0).double()
    T = torch.einsum("cij,cjk,cik->", D[clusters].double(), S_c.double(), D[clusters].double())  # sum_c tr(D S D^T)
    L = torch.linalg.cholesky(S)
    K = torch.linalg.solve_triangular(L, G.T, upper=False).T  # G L^-T
    sv = torch.linalg.svdvals(K)
    return max(0.0, float((T - sv[:rank].pow(2).sum()) / T))  # (rounding can dip below an exact 0)


def floor_single(task, rank=None):
    """One shared update for all clusters (what any LoRA is): rank None = any rank (ordinary least squares)."""
    C = task["setup"].clusters
    return floor_rank(task, list(range(C)), rank if rank is not None else task["setup"].d)


def floor_oracle(task, experts: int, r: int):
    """Hard top-1 routing by a perfect router: the clusters split into <= `experts` groups, each group fit by one
    rank-r update; the best split (dynamic programming over subsets). 0 when experts >= C and r >= r_t."""
    C = task["setup"].clusters
    group = {m: floor_rank(task, [c for c in range(C) if m >> c & 1], r) * bin(m).count("1") / C
             for m in range(1, 1 << C)}  # a group's share of the total loss (clusters weigh equally)
    best = {0: 0.0}  # subset of clusters already placed -> lowest loss, growing by one group at a time
    for _ in range(experts):
        nxt = dict(best)
        for placed, loss in best.items():
            rest = ((1 << C) - 1) & ~placed
            sub = rest
            while sub:
                key = placed | sub
                nxt[key] = min(nxt.get(key, math.inf), loss + group[sub])
                sub = (sub - 1) & rest
        best = nxt
    return best[(1 << C) - 1]


# -----------------------------------------------------------------------------------------------------
# routing metrics

def contingency(a, b):
    """a [n], b [n] integer labels -> counts [max a + 1, max b + 1]."""
    n_b = int(b.max()) + 1
    return torch.bincount(a * n_b + b, minlength=(int(a.max()) + 1) * n_b).view(-1, n_b).double()


def entropy(p):
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def nmi(a, b):
    """Normalised mutual information I(a; b) / mean(H(a), H(b)) (the arithmetic normalisation of scikit-learn):
    1 when each label set determines the other, ~0 when they are independent, 0 when one is constant."""
    joint = contingency(a, b)
    joint = joint / joint.sum()
    ha, hb = entropy(joint.sum(1)), entropy(joint.sum(0))
    if ha + hb == 0:
        return 1.0  # both constant: identical partitions
    mi = ha + hb - entropy(joint.flatten())
    return max(0.0, mi / (0.5 * (ha + hb)))


def purity(expert, cluster):
    """Share of inputs whose expert's majority cluster is their own cluster (1 = no expert mixes clusters;
    splitting one cluster over several experts is not penalised: read it with NMI)."""
    return float(contingency(expert, cluster).max(dim=1).values.sum() / len(expert))


# -----------------------------------------------------------------------------------------------------
# models and training

class Frozen(nn.Module):
    """The frozen base: one Linear, a named child so that inject_moelora can adapt it."""

    def __init__(self, W0):
        super().__init__()
        self.proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W0)

    def forward(self, x):
        return self.proj(x)


def build(task, s: Setup, variant: str, seed: int):
    """The model of a contender; its adapter and router draw their init from `seed`."""
    model = Frozen(task["W0"])
    if variant == "base":
        return model.requires_grad_(False)
    lora = variant == "lora"
    N, r = (1, s.experts * s.r) if lora else (s.experts, s.r)
    # one expert has no router: LoRA keeps the config's router settings, whatever the Setup says
    router = {} if lora else {"gate": s.gate, "router_z_weight": s.router_z_weight, "router_jitter": s.router_jitter}
    cfg = MoELoRAConfig(num_experts=N, top_k=1 if lora else s.top_k, r=r, lora_alpha=2.0 * r, lora_dropout=0.0,
                        target_modules=("proj",), contrastive_weight=s.contrastive_weight,
                        contrastive_temperature=s.temperature, balance_weight=s.balance_weight,
                        **router)  # alpha = 2r as train.py: scaling 2 for every contender
    cfg = replace(cfg, **{k: v for k, v in VARIANTS[variant].items() if k not in EXTRA_KEYS})
    torch.manual_seed(seed)
    inject_moelora(model, cfg)
    mark_only_moelora_as_trainable(model)
    if VARIANTS[variant].get("freeze_router"):
        model.proj.router.weight.requires_grad_(False)
    return model


def param_counts(model):
    """(adapter A and B, router) trainable parameters."""
    layer = model.proj
    router = sum(p.numel() for p in layer.router.parameters() if p.requires_grad) if layer.router is not None else 0
    return layer.lora_A.numel() + layer.lora_B.numel(), router


def top1(model, x):
    """x [n, d] -> the expert with the largest router logit [n], or None for a model without router."""
    router = getattr(model.proj, "router", None)
    return None if router is None else router(x).argmax(dim=-1)


def unweighted_contrastive(model, x, seed=0):
    """The contrastive loss itself (weight 1) on inputs x, whatever weight the model trained with: how
    distinct the experts' outputs are, by the measure that loss optimises."""
    layer = model.proj
    torch.manual_seed(seed)  # the loss samples (input, expert) pairs
    h = F.linear(x, layer.lora_A.reshape(-1, layer.in_features))  # [n, N*r] every expert's code
    _, top_idx, _ = layer.route(x)
    return float(layer.sampled_contrastive_loss(h, top_idx))


def within_cosine(z, labels):
    """Mean cosine between the vectors z [n, d] that share a label (pairs of distinct rows), pooled over labels:
    1 when each label's vectors point one way, which is what the contrastive loss rewards."""
    zn = F.normalize(z, dim=1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    return float((zn @ zn.T)[same].mean())


def expert_outputs(model, x):
    """z [n, d]: each input's update from its top-1 expert alone, scaling * B_e A_e x (before the gate)."""
    layer, e = model.proj, top1(model, x)
    h = F.linear(x, layer.lora_A.reshape(-1, layer.in_features)).view(len(x), -1, layer.config.r)  # [n, N, r]
    return layer.scaling * torch.einsum("nor,nr->no", layer.lora_B[e], h[torch.arange(len(x)), e]), e


def all_expert_outputs(layer, x):
    """z [n, N, d_out]: every expert's own output on every input, scaling * B_e A_e x (before any gate)."""
    N, r = layer.config.num_experts, layer.config.r
    h = F.linear(x, layer.lora_A.reshape(N * r, -1)).view(len(x), N, r)  # [n, N, r] every expert's code
    return layer.scaling * torch.einsum("eor,ner->neo", layer.lora_B, h)


def same_token_contrastive(layer, x, temperature: float):
    """CoMoE's reading of the contrastive loss (Feng et al., arXiv 2505.17553), a comparison arm of the trial. For
    each token of x [M, d] and each of its k selected experts (the anchors), the positives are the other selected
    experts' outputs on the same token and the negatives the unselected experts' outputs on that token:
        L = - mean over (token, anchor) of mean_p log( exp(cos(z_a, z_p)/tau) / sum_{e != a} exp(cos(z_a, z_e)/tau) )
    with the cosine floored as in moelora.py. Like the project's reading it sends no gradient to the router.
    Reads the top-k experts of the layer's last forward, which must have been on x."""
    N = layer.config.num_experts
    z = all_expert_outputs(layer, x) / layer.scaling  # [M, N, d] B_e A_e x, as moelora.py's features
    dots = z @ z.transpose(1, 2)  # [M, N, N]
    norms = dots.diagonal(dim1=1, dim2=2).clamp(min=moelora.COSINE_NORM_FLOOR ** 2).sqrt()  # [M, N] max(|z|, f)
    sim = dots / (norms[:, :, None] * norms[:, None, :] * temperature)  # [M, N, N]
    selected = torch.zeros(len(x), N, dtype=torch.bool).scatter(1, layer.last_top_idx, True)  # [M, N]
    eye = torch.eye(N, dtype=torch.bool)
    pos = selected[:, :, None] & selected[:, None, :] & ~eye  # [M, anchor, N]: the other selected experts
    lse = sim.masked_fill(eye, float("-inf")).logsumexp(dim=-1)  # [M, N] over every other expert of the token
    mean_pos = (sim * pos).sum(-1) / pos.sum(-1).clamp(min=1)  # [M, N]
    anchors = selected & pos.any(-1)  # selected experts that have a positive (all of them when k >= 2)
    return ((lse - mean_pos) * anchors).sum() / anchors.sum().clamp(min=1)


def gradient_norm_ratio(contrastive, task_loss, params):
    """|grad of the contrastive term (as weighted)| / |grad of the task loss|, over the trainable parameters."""
    norm = lambda loss: torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(
        loss, params, retain_graph=True, allow_unused=True) if g is not None))
    return float(norm(contrastive) / norm(task_loss).clamp(min=1e-30))


@contextlib.contextmanager
def router_weight(model, weight):
    """The layer with another router weight [N, d] for the duration of the with."""
    router = model.proj.router.weight
    saved = router.detach().clone()
    with torch.no_grad():
        router.copy_(weight)
    try:
        yield model
    finally:
        with torch.no_grad():
            router.copy_(saved)


def same_scale_random_routers(weight, draws: int, seed: int):
    """`draws` fresh routers drawn as nn.Linear draws them, each rescaled to the Frobenius norm of weight [N, d]."""
    g = torch.Generator().manual_seed(40_000 + seed)
    bound = 1.0 / math.sqrt(weight.shape[1])
    fresh = [torch.empty(weight.shape).uniform_(-bound, bound, generator=g) for _ in range(draws)]
    return [w * (weight.norm() / w.norm()) for w in fresh]


@torch.no_grad()
def linear_cka(a, b):
    """Linear CKA of features a [n, p], b [n, q] on the same n inputs: 1 = the same up to rotation and scale."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float((b.T @ a).pow(2).sum() / ((a.T @ a).norm() * (b.T @ b).norm()).clamp(min=1e-30))


def mean_expert_cka(z):
    """Mean linear CKA over pairs of different experts, z [n, N, d]; experts whose output is still 0 are left out."""
    live = [e for e in range(z.shape[1]) if z[:, e].abs().max() > 1e-8]
    pairs = [linear_cka(z[:, i], z[:, j]) for i in live for j in live if i < j]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def decisiveness(logits, k: int):
    """(mean gap between the k-th and (k+1)-th largest logit, mean entropy of the softmax over all N logits, nats)."""
    top = logits.topk(k + 1, dim=-1).values  # [n, k+1]
    logp = logits.log_softmax(dim=-1)
    return float((top[:, k - 1] - top[:, k]).mean()), float(-(logp.exp() * logp).sum(-1).mean())


def topk_sets(model, x):
    """[n, k] each input's selected experts, sorted: equal rows = the same top-k set."""
    return model.proj.router(x).topk(model.proj.config.top_k, dim=-1).indices.sort(dim=-1).values


def routing_measures(model, init, x_ev, c_ev, y_ev, base_mse: float, seed: int, hist):
    """Measures (a)-(e) of tutorial/experiments.md for a trained MoE, each with its control: the trained experts
    with the router put back to its weights at step 0 (init: the model as built)."""
    def relative_mse(router):
        with router_weight(model, router):
            return F.mse_loss(model(x_ev), y_ev).item() / base_mse

    out = {}
    for name, router in (("", model.proj.router.weight.detach().clone()), ("_init", init.proj.router.weight.detach())):
        out["mse" + name] = relative_mse(router)
        swapped = [relative_mse(w) for w in same_scale_random_routers(router, 3, seed)]
        out["relevance" + name] = sum(swapped) / len(swapped) - out["mse" + name]  # (a)
        logits = F.linear(x_ev, router)  # [n, N]
        out["nmi" + name] = nmi(logits.argmax(-1), c_ev)  # (b)
        out["gap" + name], out["entropy" + name] = decisiveness(logits, model.proj.config.top_k)  # (d)
    last, before = hist["topk"][-1], hist["topk"][-2]
    out["consistent_ckpt"] = float((last == before).all(dim=-1).double().mean())  # (c)
    out["cka"] = mean_expert_cka(all_expert_outputs(model.proj, x_ev[:1024]))  # (e)
    out["clusters_per_expert"] = clusters_per_expert(last, c_ev, model.proj.config.num_experts)  # (added after the runs)
    return out


def clusters_per_expert(topk, clusters, num_experts: int, share: float = 0.1):
    """Mean over experts of how many clusters make up at least `share` of the inputs that select the expert (in
    any of its k slots): 1 when every expert serves one cluster. topk [n, k], clusters [n]."""
    counts = [torch.bincount(clusters[(topk == e).any(-1)], minlength=int(clusters.max()) + 1).double()
              for e in range(num_experts)]
    used = [int((c / c.sum() >= share).sum()) for c in counts if c.sum() > 0]
    return sum(used) / len(used)


def train(task, s: Setup, variant: str, seed: int, lr: float, data=None, eval_data=None, measures=False):
    """Train one contender; returns its history (relative MSE and top-1 experts at every checkpoint) and
    the final routing measurements; with measures, also the trial's (a)-(e) and the gradient-norm ratio."""
    x_tr, _, y_tr = data if data is not None else batches(task, s.steps, s.batch, seed)
    x_ev, c_ev, y_ev = eval_data if eval_data is not None else sample(task, s.n_eval, torch.Generator().manual_seed(20_000 + seed))
    base_mse = F.mse_loss(x_ev @ task["W0"].T, y_ev).item()
    model = build(task, s, variant, seed)
    same_token = VARIANTS[variant].get("same_token", False)
    contrastive_on = same_token or (variant not in ("base", "lora") and model.proj.config.contrastive_weight > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
    init = copy.deepcopy(model)  # the routers (and adapters) as drawn: the untrained-router control
    hist = {"step": [], "mse": [], "top1": [], "nmi": [], "topk": [], "grad_ratio": []}
    for step in range(s.steps + 1):
        if step % s.eval_every == 0 or step == s.steps:
            with torch.no_grad():
                model.eval()
                hist["step"].append(step)
                hist["mse"].append(F.mse_loss(model(x_ev), y_ev).item() / base_mse)
                e = top1(model, x_ev)
                hist["top1"].append(e)
                hist["nmi"].append(nmi(e, c_ev) if e is not None else None)
                if measures and e is not None:
                    hist["topk"].append(topk_sets(model, x_ev))
        if step == s.steps or opt is None:
            if opt is None:
                hist["step"], hist["mse"] = [0, s.steps], hist["mse"] * 2  # the base does not move
            break
        model.train()
        task_loss = F.mse_loss(model(x_tr[step]), y_tr[step])
        aux = moelora_aux_losses(model) if model.proj.config.num_experts > 1 else {}
        if same_token:
            aux["contrastive"] = s.contrastive_weight * same_token_contrastive(model.proj, x_tr[step], s.temperature)
        if measures and contrastive_on and step % s.eval_every == 0 and step > 0:  # (at step 0, B = 0: no gradient)
            hist["grad_ratio"].append(gradient_norm_ratio(aux["contrastive"], task_loss, params))
        loss = task_loss + sum(aux.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # train.py's default
        opt.step()
    out = {"variant": variant, "seed": seed, "hist": hist, "final": hist["mse"][-1]}
    if variant != "base":
        out["params"] = param_counts(model)
    if getattr(model.proj, "router", None) is None:
        return out
    with torch.no_grad():
        e, e0 = hist["top1"][-1], top1(init, x_ev)
        noisy = x_ev + s.noise * torch.randn(x_ev.shape, generator=torch.Generator().manual_seed(30_000 + seed))
        share = torch.bincount(e, minlength=model.proj.config.num_experts).double() / len(e)
        out.update({
            "nmi": hist["nmi"][-1], "nmi_init": nmi(e0, c_ev), "purity": purity(e, c_ev), "purity_init": purity(e0, c_ev),
            "flip_ckpt": float((hist["top1"][-1] != hist["top1"][-2]).double().mean()),  # last two checkpoints
            "flip_noise": float((top1(model, noisy) != e).double().mean()),
            # what ST-MoE's z-loss penalises: how far the router's logits have drifted from 0
            "router_z": float(model.proj.router(x_ev).logsumexp(dim=-1).square().mean()),
            "flip_noise_init": float((top1(init, noisy) != e0).double().mean()),
            "same_as_init": float((e == e0).double().mean()),
            "max_share": float(share.max()), "experts_used": int((share >= 0.05).sum()),
            "cl": unweighted_contrastive(model, x_ev[:256], seed),
            "cos": within_cosine(*expert_outputs(model, x_ev[:512])),
        })
        if measures:
            out["measures"] = routing_measures(model, init, x_ev, c_ev, y_ev, base_mse, seed, hist)
    return out


def steps_to(hist, key, level):
    """First checkpoint at which hist[key] reaches `level` (<= for mse, >= for nmi), or None."""
    for step, v in zip(hist["step"], hist[key]):
        if v is not None and (v <= level if key == "mse" else v >= level):
            return step
    return None


# -----------------------------------------------------------------------------------------------------
# experiments and tables

def mean_std(values, fmt="{:.3f}"):
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if len(v) == 1:
        return fmt.format(v.item())
    return f"{fmt.format(v.mean().item())} ± {fmt.format(v.std().item())}"


# paired statistics of the trials (tutorial/trial.py and tutorial/shift.py --trial import them from here)
# two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96 is within 2%)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def paired_difference(a, b):
    """a, b: one value per seed, paired. (mean of a - b, low, high of its 95% t-interval, verdict): "better" when
    the interval lies below 0 (a lower, i.e. better for a loss), "worse" above 0, else "no difference"."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    n = len(d)
    if n < 2:
        return float(d.mean()), float("nan"), float("nan"), "n/a (one seed)"
    t = T975[min((k for k in T975 if k >= n - 1), default=30)]
    half = t * float(d.std()) / math.sqrt(n)
    mean = float(d.mean())
    verdict = "better" if mean + half < 0 else "worse" if mean - half > 0 else "no difference"
    return mean, mean - half, mean + half, verdict


def run_setting(s: Setup, variants, seeds, lrs):
    """{variant: [result per seed]}, every variant on the same teacher, batches and eval set per seed."""
    results = {v: [] for v in variants}
    for seed in seeds:
        task = make_task(s, seed)
        data = batches(task, s.steps, s.batch, seed)
        eval_data = sample(task, s.n_eval, torch.Generator().manual_seed(20_000 + seed))
        for v in variants:
            results[v].append(train(task, s, v, seed, lrs.get(v, 0.0), data, eval_data))
    return results


def floors(s: Setup, seeds):
    """Closed-form floors averaged over the seeds' teachers: single update of rank N*r, of any rank, oracle routing."""
    tasks = [make_task(s, seed) for seed in seeds]
    return {"lora": [floor_single(t, s.experts * s.r) for t in tasks], "linear": [floor_single(t) for t in tasks],
            "oracle": [floor_oracle(t, s.experts, s.r) for t in tasks]}


def lr_grid(s: Setup, grid, variants, seed=1000):
    """{variant: {lr: final relative MSE}} on a tuning seed that the reported numbers do not use."""
    task = make_task(s, seed)
    data = batches(task, s.steps, s.batch, seed)
    eval_data = sample(task, s.n_eval, torch.Generator().manual_seed(20_000 + seed))
    return {v: {lr: train(task, s, v, seed, lr, data, eval_data)["final"] for lr in grid} for v in variants}


def table_lr(grid_res, grid):
    lines = ["| contender | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | picked |",
             "| --- |" + " ---: |" * (len(grid) + 1)]
    for v, row in grid_res.items():
        best = min(row, key=row.get)
        lines.append(f"| {v} | " + " | ".join(f"{row[lr]:.3f}" for lr in grid) + f" | {best:g} |")
    return "\n".join(lines)


def table_main(res, fl, s: Setup):
    marks = res["lora"][0]["hist"]["step"]
    marks = [marks[len(marks) // 4], marks[len(marks) // 2]]  # two checkpoints on the way: how fast
    lines = [f"| contender | trainable params (adapter + router) | relative MSE, final | at step {marks[0]} | "
             f"at step {marks[1]} | final, per seed | closed-form floor |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    floor_of = {"base": "1 (by construction)", "lora": f"{mean_std(fl['lora'])} (rank {s.experts * s.r}); any rank "
                f"{mean_std(fl['linear'])}", "moelora": f"{mean_std(fl['oracle'])} (oracle routing)"}
    for v, runs in res.items():
        p = runs[0].get("params")
        params = "0" if p is None else f"{p[0]:,} + {p[1]:,}"
        at = lambda step: mean_std([r["hist"]["mse"][r["hist"]["step"].index(step)] for r in runs]) if v != "base" else "1"
        per_seed = ", ".join(f"{r['final']:.3f}" for r in runs)
        fl_text = floor_of.get(v, floor_of["moelora"] if v.startswith("moelora") else "")
        lines.append(f"| {v} | {params} | {mean_std([r['final'] for r in runs])} | {at(marks[0])} | "
                     f"{at(marks[1])} | {per_seed} | {fl_text} |")
    return "\n".join(lines)


def table_routing(res, s: Setup):
    lines = ["| contender | NMI trained | NMI at init | purity trained | purity at init | first step NMI >= 0.5 | "
             "same top-1 as at init | max expert share | experts used (>= 5%) |",
             "| --- |" + " ---: |" * 8]
    for v, runs in res.items():
        if "nmi" not in runs[0]:
            continue
        reach = [steps_to(r["hist"], "nmi", 0.5) for r in runs]
        reach_txt = ", ".join("never" if t is None else str(t) for t in reach)
        lines.append(f"| {v} | {mean_std([r['nmi'] for r in runs])} | {mean_std([r['nmi_init'] for r in runs])} | "
                     f"{mean_std([r['purity'] for r in runs])} | {mean_std([r['purity_init'] for r in runs])} | "
                     f"{reach_txt} | {mean_std([r['same_as_init'] for r in runs])} | "
                     f"{mean_std([r['max_share'] for r in runs])} | {mean_std([r['experts_used'] for r in runs], '{:.1f}')} |")
    return "\n".join(lines)


def table_random(res, s: Setup):
    lines = [f"| contender | top-1 flips, last two checkpoints ({s.eval_every} steps apart) | flips under noise "
             f"{s.noise:g} sigma, trained | same, routers at init | contrastive loss (unweighted), trained | "
             "mean cosine between one expert's outputs |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for v, runs in res.items():
        if "nmi" not in runs[0]:
            continue
        lines.append(f"| {v} | {mean_std([r['flip_ckpt'] for r in runs], '{:.4f}')} | "
                     f"{mean_std([r['flip_noise'] for r in runs], '{:.4f}')} | "
                     f"{mean_std([r['flip_noise_init'] for r in runs], '{:.4f}')} | {mean_std([r['cl'] for r in runs])} | "
                     f"{mean_std([r['cos'] for r in runs])} |")
    return "\n".join(lines)


GATE_NAMES = {"mixtral": "Mixtral's gate", "switch": "Switch's gate"}


def sweep(s: Setup, field, values, variants, seeds, lrs, main_res=None, extra=None):
    """One knob varied, every other setting as in s; a value that gives s itself reuses the main comparison's runs.
    extra: {value: other Setup fields that go with it}. Returns rows for table_sweep."""
    rows = []
    for value in values:
        with_value = (extra or {}).get(value, {})
        t = replace(s, **{field: value}, **with_value)
        if main_res is not None and t == s:
            res = {v: main_res[v] for v in variants}
        else:
            res = run_setting(t, variants, seeds, lrs)
        notes = [f"LoRA rank {t.experts * value}"] if field == "r" else []
        notes += [GATE_NAMES.get(v, v) if k == "gate" else f"{k} = {v:g}" for k, v in with_value.items()]
        label = f"{field} = {value:g}" + (f" ({', '.join(notes)})" if notes else "")
        rows.append({"value": label, "res": res, "floors": floors(t, seeds)})
    return rows


def table_sweep(rows, variants):
    head = ("| setting | floor: one update of rank N*r | floor: oracle routing | " +
            " | ".join(f"{v} MSE" for v in variants) + " | " + " | ".join(f"{v} NMI (init)" for v in variants if v != "lora") + " |")
    n = 2 + len(variants) + len([v for v in variants if v != "lora"])
    lines = [head, "| --- |" + " ---: |" * n]
    for row in rows:
        res, fl = row["res"], row["floors"]
        cells = [mean_std(fl["lora"]), mean_std(fl["oracle"])]
        cells += [mean_std([r["final"] for r in res[v]]) for v in variants]
        cells += [f"{mean_std([r['nmi'] for r in res[v]], '{:.2f}')} ({mean_std([r['nmi_init'] for r in res[v]], '{:.2f}')})"
                  for v in variants if v != "lora"]
        lines.append(f"| {row['value']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------
# figures (matplotlib only here)

def plot(res, out_dir: Path, lora_floor=None):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {"base": "black", "lora": "tab:blue", "moelora": "tab:red", "moelora_cl0": "tab:orange",
              "moelora_cl0_frozen_router": "tab:gray"}  # anything else (the long run): purple
    for key, ylabel, name in (("mse", "MSE relative to the base (log)", "controlled_fit.png"),
                              ("nmi", "NMI(top-1 expert; cluster)", "controlled_nmi.png")):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for v, runs in res.items():
            if runs[0]["hist"][key][0] is None:
                continue
            for i, r in enumerate(runs):
                ax.plot(r["hist"]["step"], r["hist"][key], color=colors.get(v, "tab:purple"), alpha=0.8, lw=1.2,
                        label=v if i == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if key == "mse":
            ax.set_yscale("log")
            if lora_floor is not None:  # no LoRA, of any rank, can go below it
                ax.axhline(lora_floor, color="tab:blue", ls="--", lw=0.8, label="floor of one update (mean)")
        ax.legend(fontsize=7)
        ax.set_title(f"controlled task, one line per seed ({name.split('_')[1][:-4]})", fontsize=9)
        fig.savefig(out_dir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)


def cpu_name():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# each contender's learning rate as the full run's grid picked it (tuning seed 1000): --quick uses these
# instead of running the grid, to stay within seconds
PICKED_LRS = {"lora": 3e-3, "moelora": 1e-2, "moelora_cl0": 1e-2, "moelora_cl0_frozen_router": 3e-3}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced version: fewer steps and seeds, one value per sweep")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3, quick 2)")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where the figures go")
    p.add_argument("--no_figures", action="store_true", help="tables only (no matplotlib needed)")
    args = p.parse_args(argv)
    start = time.time()
    s = Setup(steps=60, n_eval=512, eval_every=20) if args.quick else Setup()
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 3)))
    trained = ["lora", "moelora", "moelora_cl0"]
    contenders = trained + ["moelora_cl0_frozen_router"]
    command = " ".join(["python tutorial/controlled.py"] + list(sys.argv[1:] if argv is None else argv))
    out = [f"`{command}`", "",
           f"machine: {cpu_name()}, {torch.get_num_threads()} thread, "
           f"python {platform.python_version()}, torch {torch.__version__}", "",
           f"Setup: d = {s.d}, C = {s.clusters} clusters, teacher rank r_t = {s.teacher_rank} per cluster, separation "
           f"|mu_c| = {s.sep:g} sigma; MoELoRA N = {s.experts} experts of rank r = {s.r}, top-{s.top_k}, contrastive "
           f"{s.contrastive_weight:g}, balance {s.balance_weight:g}; LoRA rank N*r = {s.experts * s.r}; alpha = 2r "
           f"(scaling 2); {s.steps} steps of {s.batch} inputs, AdamW (no weight decay), constant lr, clip 1.0, no "
           f"dropout; seeds {seeds} (a seed draws the teacher, the batches and the init). MSE relative to the base "
           f"alone, on {s.n_eval} held-out inputs per seed."]
    if args.quick:
        lrs = dict(PICKED_LRS)
        out += ["", f"learning rates (picked by the full run's grid): {lrs}"]
    else:
        grid = [3e-3, 1e-2, 3e-2, 1e-1]
        lr_res = lr_grid(s, grid, contenders)
        lrs = {v: min(row, key=row.get) for v, row in lr_res.items()}
        out += ["", "### Learning rate: final relative MSE on tuning seed 1000; each contender takes its best", "",
                table_lr(lr_res, grid)]
    res = run_setting(s, ["base"] + contenders, seeds, lrs)
    if not args.quick:  # is MoELoRA with its contrastive loss just slower? three times the steps
        long = replace(s, steps=3 * s.steps)
        res[f"moelora, {long.steps} steps"] = run_setting(long, ["moelora"], seeds, lrs)["moelora"]
    fl = floors(s, seeds)
    tasks = [make_task(s, seed) for seed in seeds]
    teacher_cos = []  # the same cosine for the teacher's updates D_c x, grouped by the true cluster
    for seed, task in zip(seeds, tasks):
        x, c, y = sample(task, 512, torch.Generator().manual_seed(20_000 + seed))
        teacher_cos.append(within_cosine(y - x @ task["W0"].T, c))
    out += ["", "### Main comparison (mean ± std over seeds)", "", table_main(res, fl, s), "",
            "Floors, in closed form from the teacher: one update of rank N*r (any LoRA of that rank), of any rank "
            "(any single linear update), and hard top-1 routing by an oracle that knows each input's true cluster "
            "(no router that reads x can know it where clusters overlap).",
            "", "### Routing: top-1 expert against the true cluster", "", table_routing(res, s),
            "", "### Random routing, and what the contrastive loss does to the experts' outputs", "", table_random(res, s),
            "", f"For reference, the teacher's updates D_c x within a cluster have a mean cosine of {mean_std(teacher_cos)}."]
    sw_seeds = seeds[:1] if args.quick else seeds
    # (title, Setup field, values, variants, {value: other fields that go with it})
    sweeps = [("C vs N (N = 4)", "clusters", [2, 4, 8], trained, {}),
              ("rank per expert (r_t = 4)", "r", [2, 4, 8], trained, {}),
              # top-1 with Mixtral's gate (a softmax over one logit, always 1) would send the router no gradient
              ("top-k", "top_k", [1, 2, 4], trained, {1: {"gate": "switch"}}),
              ("separation |mu_c| / sigma", "sep", [1.0, 2.0, 4.0, 8.0], trained, {}),
              ("contrastive weight", "contrastive_weight", [0.0, 0.01, 0.1, 1.0], ["moelora"], {})]
    for title, field, values, variants, extra in sweeps:
        if args.quick:  # one value off the default per knob
            values = [v for v in values if v != getattr(s, field)][:1]
        rows = sweep(s, field, values, variants, sw_seeds, lrs, res, extra)
        out += ["", f"### Sweep: {title}; seeds {sw_seeds}; final relative MSE and NMI (at init)", "",
                table_sweep(rows, variants)]
    out += ["", f"wall time {time.time() - start:.0f} s"]
    text = "\n".join(out)
    print(text)
    if not args.no_figures:
        try:
            plot(res, Path(args.out_dir), sum(fl["linear"]) / len(fl["linear"]))
        except ImportError:
            print("(matplotlib not installed: no figures)")
    return {"text": text, "main": res, "floors": fl, "lrs": lrs}


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    main()
