"""
How many operations one training step dispatches: the device-independent cost of MoELoRA's small kernels.

    python benchmarks/bench_ops.py                     # model.py's LLaMA, dim 256, 4 and 16 layers, batch 4 x 128
    python benchmarks/bench_ops.py --by_op moelora     # which aten operations a contender adds over LoRA

On a GPU a step of small adapters costs about one kernel launch per operation, whatever its arithmetic: the
H200 profile in benchmarks/README.md ("On a GPU") counted 1,471 launches for MoELoRA against 487 for LoRA. This
script counts the aten operations that one training step (forward, auxiliary losses, backward; not the
optimizer) dispatches on the CPU, with a TorchDispatchMode that counts every call. No GPU is needed, and the
count does not depend on the machine's load.

Contenders, all on wq and wv, one step under moelora_token_mask as train.py runs it (a quarter of each row is
padding):
  lora            MoELoRA's one-expert case, rank 32: plain LoRA
  moelora-noaux   8 experts of rank 4, top-2, no auxiliary loss: the router and the gates
  moelora-cl0     the same with the balance loss (the default since the contrastive-loss trial)
  moelora         the same with the contrastive loss too (weight 0.1)
  moelora-switch  moelora-cl0 with Switch's gate (softmax over all N, the k kept not renormalised)
  moelora-stab    moelora-cl0 with the router stabilisers: z-loss 1e-3 and jitter 0.01
Differences between them, divided by the number of adapted layers, split the cost per layer into router and
gates, balance and contrastive. Two depths tell what grows with the layers from what is paid once a step:
per layer = (ops at the deep model - ops at the shallow one) / (adapted layers added).
"""
import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
from model import ModelArgs, Transformer  # noqa: E402
from moelora import (MoELoRAConfig, inject_moelora, mark_only_moelora_as_trainable, moelora_aux_losses,  # noqa: E402
                     moelora_token_mask)

CONTENDERS = {
    "lora": dict(num_experts=1, top_k=1, r=32, lora_alpha=64, contrastive_weight=0.0, balance_weight=0.0),
    "moelora-noaux": dict(contrastive_weight=0.0, balance_weight=0.0),
    "moelora-cl0": dict(contrastive_weight=0.0, balance_weight=0.01),
    "moelora": dict(contrastive_weight=0.1, balance_weight=0.01),
    "moelora-switch": dict(contrastive_weight=0.0, balance_weight=0.01, gate="switch"),
    "moelora-stab": dict(contrastive_weight=0.0, balance_weight=0.01, router_z_weight=1e-3, router_jitter=0.01),
}


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched inside the with, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def build(n_layers: int, dim: int, contender: str, seed: int = 0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                     max_seq_len=256)
    model = Transformer(args)
    inject_moelora(model, MoELoRAConfig(**CONTENDERS[contender]))
    mark_only_moelora_as_trainable(model)
    return model.train()


def count_step(model, batch: int, seq: int):
    """Aten operations of one training step: forward under the token mask, auxiliary losses, backward."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (batch, seq), generator=g)
    real = torch.arange(seq)[None, :] < torch.tensor([seq - (i * seq) // (2 * batch) for i in range(batch)])[:, None]
    targets = tokens.masked_fill(~real, -100)
    for warm_up in (True, False):  # the first step may dispatch one-off work (lazy initialisation)
        with CountOps() as counter:
            with moelora_token_mask(model, real):
                _, loss = model(tokens, targets)
                loss = loss + sum(moelora_aux_losses(model).values())
            loss.backward()
        model.zero_grad(set_to_none=True)
    return counter.counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depths", default="4,16", help="two layer counts (default %(default)s)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--by_op", default=None, metavar="CONTENDER",
                   help="also list the operations this contender adds over lora at the first depth")
    args = p.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    counts = {(c, d): count_step(build(d, args.dim, c), args.batch, args.seq) for c in CONTENDERS for d in depths}
    total = {key: sum(c.values()) for key, c in counts.items()}
    adapted = {d: 2 * d for d in depths}  # wq and wv of every block
    print(f"model.py's LLaMA, dim {args.dim}, batch {args.batch} x {args.seq} tokens, wq and wv adapted; aten "
          f"operations in one training step (forward, auxiliary losses, backward), torch {torch.__version__}\n")
    print("| contender | " + " | ".join(f"{d} layers" for d in depths) + " | per adapted layer | per step |")
    print("| --- |" + " ---: |" * (len(depths) + 2))
    slope = {}
    lo, hi = depths[0], depths[-1]
    for c in CONTENDERS:
        slope[c] = (total[(c, hi)] - total[(c, lo)]) / (adapted[hi] - adapted[lo])
        fixed = total[(c, lo)] - slope[c] * adapted[lo]
        print(f"| {c} | " + " | ".join(f"{total[(c, d)]:,}" for d in depths) + f" | {slope[c]:.1f} | {fixed:.0f} |")
    print(f"\neach part: the difference between two contenders at {hi} layers over its {adapted[hi]} adapted layers "
          "(what the targets count), and that difference split into what grows with the layers and what a step pays "
          "once:\n")
    parts = [("router and gates", "moelora-noaux", "lora"), ("balance loss", "moelora-cl0", "moelora-noaux"),
             ("contrastive loss", "moelora", "moelora-cl0"), ("Switch's gate", "moelora-switch", "moelora-cl0"),
             ("z-loss and jitter", "moelora-stab", "moelora-cl0")]
    print(f"| part | ops per adapted layer at {hi} layers | of which per layer | and per step | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    targets = {"router and gates": "<= 40", "contrastive loss": "<= 20", "balance loss": "", "Switch's gate": "0", "z-loss and jitter": "<= 5"}
    for name, a, b in parts:
        per_layer = slope[a] - slope[b]
        per_step = total[(a, hi)] - total[(b, hi)] - per_layer * adapted[hi]
        print(f"| {name} | {(total[(a, hi)] - total[(b, hi)]) / adapted[hi]:.1f} | {per_layer:.1f} | {per_step:.0f} | "
              f"{targets[name]} |")
    if args.by_op:
        added = counts[(args.by_op, lo)] - counts[("lora", lo)]
        print(f"\noperations {args.by_op} adds over lora at {lo} layers, per adapted layer:\n")
        for op, n in added.most_common():
            print(f"  {op:40s} {n / adapted[lo]:6.1f}")
    return total


if __name__ == "__main__":
    main()
