"""
Speed of MoELoRA against plain LoRA with the same trainable parameters, on this machine's CPU.

    python benchmarks/bench_moelora.py                 # LLaMA of model.py: 8 layers, dim 512, vocab 32000, batch 4 x 256
    python benchmarks/bench_moelora.py --vocab 4096 --rounds 7
    python benchmarks/bench_moelora.py --threads 1     # on a machine shared with other work: see below

A training step = forward + backward + AdamW step on the adapter parameters, float32. Contenders run
one step each in turn, round after round in one process, so that a slow moment of the machine hits them
all alike; the table shows medians. Contenders, all on wq and wv:
  lora-r32        a minimal plain LoRA of rank 32 written below (no router): the reference
  moelora         8 experts of rank 4, top-2, contrastive and balance losses on (same expert parameters)
  moelora-cl0     the same with contrastive_weight=0 (the contrastive term's cost is the difference)
  moelora-masked  moelora under moelora_token_mask, a third of each row padding as in train.py's batches
                  (the mask's cost is the difference)
Then one adapted layer alone, the same contenders, plus the dense rank-(N*r) forward that moelora.py
uses against gathering the top-k experts' A and B per token: short calls, many rounds, a steadier
estimate of what the adapters add to a step than whole steps on a busy machine.
Targets: moelora <= 1.10 x lora-r32; the contrastive term adds <= 5%.

Wall time and process CPU time are both shown. When another program holds a core, torch's threads wait
for each other and wall times jump by 10x at random; with --threads 1 the CPU time stays meaningful.
"""

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: model.py, moelora.py
from model import ModelArgs, Transformer
from moelora import (MoELoRAConfig, MoELoRALinear, inject_moelora, mark_only_moelora_as_trainable, moelora_aux_losses,
                     moelora_token_mask)


class LoRALinear(nn.Module):
    """Plain LoRA, the baseline: y = W0 x + (alpha / r) B A dropout(x)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features).uniform_(-1, 1) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


def with_lora(model, targets, r, alpha, dropout):
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return model


def machine():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


def make_step(model, loss_fn, with_aux, real=None):
    """One training step: loss_fn() -> loss, plus MoELoRA's auxiliary losses if with_aux, backward, AdamW;
    under moelora_token_mask(model, real) if a mask is given."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        if real is None:
            loss = loss_fn()
            if with_aux:
                loss = loss + sum(moelora_aux_losses(model).values())
        else:
            with moelora_token_mask(model, real):
                loss = loss_fn() + sum(moelora_aux_losses(model).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(fn):
    """(wall seconds, CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def gather_topk_forward(layer: MoELoRALinear, x):
    """The alternative to moelora.py's dense forward: pick the k selected experts' A and B for each token."""
    gates, top_idx, _ = layer.route(x)  # x [M, in]
    top_gates = gates.gather(-1, top_idx)  # [M, k]
    A, B = layer.lora_A[top_idx], layer.lora_B[top_idx]  # [M, k, r, in], [M, k, out, r]
    h = torch.einsum("mkri,mi->mkr", A, layer.dropout(x)) * top_gates.unsqueeze(-1)  # [M, k, r]
    return F.linear(x, layer.weight) + layer.scaling * torch.einsum("mkor,mkr->mo", B, h)


def bench_layers(dim, tokens, rounds):
    """One adapted 512 -> 512 layer alone, forward + backward (input gradient included, as inside a model),
    aux losses added to the loss: short calls, many rounds, so much less noisy than whole steps."""
    base = nn.Linear(dim, dim, bias=False)
    moe = MoELoRAConfig(contrastive_weight=0.1)  # the contrastive loss on (its cost does not depend on the weight)
    no_aux = MoELoRAConfig(contrastive_weight=0.0, balance_weight=0.0)
    layers = {"lora-r32": LoRALinear(copy.deepcopy(base), r=32, alpha=64, dropout=moe.lora_dropout),
              "moelora": MoELoRALinear(copy.deepcopy(base), moe),
              "moelora-cl0": MoELoRALinear(copy.deepcopy(base), MoELoRAConfig(contrastive_weight=0.0)),
              "moelora, no aux losses": MoELoRALinear(copy.deepcopy(base), no_aux)}
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
    x = torch.randn(tokens, dim, requires_grad=True)
    gather = layers["moelora, no aux losses"]
    gather.eval()  # no dropout: the dense forward and the gather compute the same thing
    torch.testing.assert_close(gather_topk_forward(gather, x), gather(x), rtol=1e-4, atol=1e-5)
    gather.train()

    def fwd_bwd(layer, forward=None):
        loss = (forward or layer)(x).sum()
        if isinstance(layer, MoELoRALinear):
            loss = loss + sum(moelora_aux_losses(layer).values())
        loss.backward()

    contenders = {name: (lambda layer=layer: fwd_bwd(layer)) for name, layer in layers.items()}
    contenders["moelora, gather top-k A, B"] = lambda: fwd_bwd(gather, lambda x: gather_topk_forward(gather, x))
    names, times = list(contenders), {name: [] for name in contenders}
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            if round_ > 0:
                times[name].append(timed(contenders[name])[1])
            else:
                contenders[name]()
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("command:", " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv))
    print("machine:", machine())
    margs = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=args.vocab, max_seq_len=args.seq)
    print(f"model: LLaMA (model.py) dim {margs.dim}, {margs.n_layers} layers, {margs.n_heads} heads, vocab {margs.vocab_size}; "
          f"batch {args.batch} x {args.seq} tokens, float32; step = forward + backward + AdamW")
    torch.manual_seed(0)
    base = Transformer(margs)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    targets = torch.roll(tokens, -1, dims=1)
    moe = MoELoRAConfig(num_experts=8, top_k=2, r=4, lora_alpha=8, target_modules=("wq", "wv"), contrastive_weight=0.1)
    models = {
        "lora-r32": with_lora(copy.deepcopy(base), ("wq", "wv"), r=32, alpha=64, dropout=moe.lora_dropout),
        "moelora": mark_only_moelora_as_trainable(inject_moelora(copy.deepcopy(base), moe)),
        "moelora-cl0": mark_only_moelora_as_trainable(inject_moelora(copy.deepcopy(base), MoELoRAConfig(**{**vars(moe), "contrastive_weight": 0.0}))),
    }
    models["moelora-masked"] = copy.deepcopy(models["moelora"])
    del base
    # right padding as train.py makes it: row b keeps its first seq * (2/3 +- 1/6) positions  [batch, seq]
    lengths = torch.linspace(args.seq / 2, args.seq * 5 / 6, args.batch).long()
    real = torch.arange(args.seq) < lengths[:, None]
    steps = {name: make_step(m, lambda m=m: m(tokens, targets)[1], with_aux=name != "lora-r32",
                             real=real if name == "moelora-masked" else None) for name, m in models.items()}
    for name, m in models.items():
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        router = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "router" in n)
        print(f"  {name:14s} trainable parameters {trainable:,} (router {router:,})")

    times = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(args.warmup + args.rounds):
        first = round_ % len(names)
        for name in names[first:] + names[:first]:  # rotate who goes first
            t = timed(steps[name])
            if round_ >= args.warmup:
                times[name].append(t)
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    cpu_min = {name: min(c for _, c in t) for name, t in times.items()}
    print(f"\n{'contender':14s} {'wall s/step':>11s} {'vs lora':>8s}   {'CPU s/step':>10s} {'vs lora':>8s}   {'min CPU s':>9s} {'vs lora':>8s}")
    for name in times:
        print(f"{name:14s} {wall[name]:11.3f} {wall[name] / wall['lora-r32']:7.3f}x   {cpu[name]:10.3f} "
              f"{cpu[name] / cpu['lora-r32']:7.3f}x   {cpu_min[name]:9.3f} {cpu_min[name] / cpu_min['lora-r32']:7.3f}x")
    print("(medians over the rounds, except the last column: the fastest round, least disturbed by other programs)")
    for label, t in (("median wall", wall), ("median CPU", cpu), ("min CPU", cpu_min)):
        ratio, cl_cost = t["moelora"] / t["lora-r32"], t["moelora"] / t["moelora-cl0"] - 1
        print(f"{label:11s}: moelora / lora-r32 = {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'}); "
              f"contrastive term adds {100 * cl_cost:+.1f}% (target <= 5%: {'met' if cl_cost <= 0.05 else 'MISSED'}); "
              f"the token mask adds {100 * (t['moelora-masked'] / t['moelora'] - 1):+.1f}%")

    n_adapted = sum(isinstance(m, MoELoRALinear) for m in models["moelora"].modules())
    layer_cpu = bench_layers(dim=margs.dim, tokens=args.batch * args.seq, rounds=30)
    print(f"\none adapted {margs.dim} -> {margs.dim} layer alone, {args.batch * args.seq} tokens, forward + backward, "
          f"median CPU of 30 rounds; the last column: {n_adapted} such layers added to lora-r32's min CPU step")
    for name, t in layer_cpu.items():
        extra = n_adapted * (t - layer_cpu["lora-r32"]) / cpu_min["lora-r32"]
        print(f"  {name:28s} {1e3 * t:8.2f} ms {t / layer_cpu['lora-r32']:7.3f}x   step {100 * extra:+6.1f}%")


if __name__ == "__main__":
    main()
