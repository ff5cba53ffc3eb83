"""
Memory and time of the training loss alone: F.cross_entropy, as model.py computes it, against the hand-written
cross-entropy autograd function that model.py carried until this script measured it (copied below).

    python benchmarks/bench_cross_entropy.py                    # CPU: peak RSS growth, a fresh process per contender
    python benchmarks/bench_cross_entropy.py --compile          # also both under torch.compile (train.py --compile)
    python benchmarks/bench_cross_entropy.py --device cuda      # torch.cuda.max_memory_allocated, fp32 and bf16 logits

A call is the end of a training step as train.py runs it: logits = linear(h, W).float() with W frozen (as under
LoRA), the loss over targets a quarter of which are IGNORE_INDEX, backward. The caller keeps no reference to the
logits (train.py writes `_, loss = model(x, y)`), so what the loss saves for backward is all that stays; h is 16
wide, not 4096, the multiply only makes the logits inside the measured region. Shapes: LLaMA-7B's micro-batch
(4 x 512 tokens, vocab 32000) and train.py's built-in tiny model (16 x 384 tokens, vocab 2048).

In L = tokens x vocab x 4 bytes, one float32 array the size of the logits, the expected peaks are
  F.cross_entropy  saves log_softmax(logits) (L); backward writes a zero-filled one-hot gradient (L) and the gradient (L)
  hand-written     saves the logits (L) and a log-sum-exp per token; backward writes the gradient (L)
On CPU the peak is VmHWM - VmRSS with glibc's defaults (arrays over 32 MiB go back to the kernel when freed).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root: model.py
from data.prompts import IGNORE_INDEX

SHAPES = {"7b": (4 * 512, 32000), "tiny": (16 * 384, 2048)}  # (tokens, vocab)


class HandWritten(torch.autograd.Function):
    """model.py's CrossEntropy before this benchmark: keeps a log-sum-exp per token, writes the gradient once."""

    @staticmethod
    def forward(ctx, logits, targets):  # logits [M, V] float32, targets [M]
        block = max(1, 2**22 // logits.shape[1])  # logsumexp a block of rows at a time: its temporary stays small
        lse = torch.cat([torch.logsumexp(rows, dim=-1) for rows in logits.split(block)])  # [M]
        counted = targets != IGNORE_INDEX
        picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse, counted)
        return torch.where(counted, lse - picked, 0.0).sum() / counted.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse, counted = ctx.saved_tensors
        grad = torch.sub(logits, lse[:, None]).exp_()  # softmax, then minus one-hot and scaled, in place
        grad[torch.arange(len(targets), device=grad.device), targets.clamp(min=0)] -= 1
        grad.mul_((counted * (grad_loss / counted.sum()))[:, None])
        return grad, None


LOSSES = {
    "F.cross_entropy": lambda logits, targets: F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX),
    "hand-written": HandWritten.apply,
}


def inputs(shape, dtype, device):
    torch.manual_seed(0)
    n, vocab = SHAPES[shape]
    h = torch.randn(n, 16, dtype=dtype, device=device, requires_grad=True)
    W = torch.randn(vocab, 16, dtype=dtype, device=device) / 4
    targets = torch.randint(0, vocab, (n,), device=device)
    targets[: n // 4] = IGNORE_INDEX  # prompt tokens and padding
    return h, W, targets


def proc_kib(field):  # VmRSS (now) or VmHWM (peak since the last reset) of this process, KiB
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def measure(name, compiled, shape, dtype, device, rounds):
    """Peak memory above the inputs during one call (MiB), then the median time of `rounds` calls (ms)."""
    loss_fn = LOSSES[name]
    fn = lambda h, W, targets: loss_fn(F.linear(h, W).float(), targets)  # model.py: self.output(h).float()
    fn = torch.compile(fn) if compiled else fn
    h, W, targets = inputs(shape, dtype, device)

    def call():
        fn(h, W, targets).backward()
        h.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    call()  # warm up (and compile); then forget the peak so far
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux)
        base = proc_kib("VmRSS")
        call()
        peak = (proc_kib("VmHWM") - base) / 2**10
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t0))
    return peak, statistics.median(times)


def check(shape, device):
    """The loss, and the largest differences between the two in the loss and in d loss / d logits (float32)."""
    n, vocab = SHAPES[shape]
    _, _, targets = inputs(shape, torch.float32, device)
    logits = torch.randn(n, vocab, device=device, requires_grad=True)
    (l0, g0), (l1, g1) = [(loss.detach(), torch.autograd.grad(loss, logits)[0])
                          for loss in (fn(logits, targets) for fn in LOSSES.values())]
    return l0.item(), (l0 - l1).abs().item(), (g0 - g1).abs().max().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default="7b,tiny")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per contender (default 5)")
    p.add_argument("--compile", action="store_true", help="also both losses under torch.compile")
    p.add_argument("--child", nargs=4, metavar=("NAME", "COMPILED", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one measurement in this fresh process, for the parent to read
        name, compiled, shape, dtype = args.child
        print(json.dumps(measure(name, compiled == "1", shape, getattr(torch, dtype), "cpu", args.rounds)))
        return
    dtypes = ["float32", "bfloat16"] if args.device == "cuda" else ["float32"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device}, {where}; ms/call includes the small multiply")
    for shape in args.shapes.split(","):
        n, vocab = SHAPES[shape]
        L = n * vocab * 4 / 2**20
        print(f"\n{shape}: {n} tokens x {vocab} words: L = {L:.1f} MiB, 2 L = {2 * L:.0f} MiB, 3 L = {3 * L:.0f} MiB;"
              f" L is {100 * L * 2**20 / 13.5e9:.2f}% of LLaMA-7B's 13.5 GB of bf16 weights")
        loss, dl, dg = check(shape, args.device)
        print(f"  loss {loss:.6f}; hand-written - F.cross_entropy: |loss| {dl:.1e}, max |grad| {dg:.1e}")
        print(f"  {'contender':<26} {'logits':<9} {'peak MiB':>9} {'peak / L':>9} {'ms/call':>8}")
        for dtype in dtypes:
            for compiled in [False, True] if args.compile else [False]:
                for name in LOSSES:
                    if args.device == "cuda":
                        peak, ms = measure(name, compiled, shape, getattr(torch, dtype), "cuda", args.rounds)
                    else:  # a fresh process each: nothing one contender freed is kept for the next
                        cmd = [sys.executable, os.path.abspath(__file__), "--rounds", str(args.rounds),
                               "--child", name, str(int(compiled)), shape, dtype]
                        peak, ms = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                    label = name + (", compiled" if compiled else "")
                    print(f"  {label:<26} {dtype:<9} {peak:9.1f} {peak / L:9.2f} {ms:8.1f}")


if __name__ == "__main__":
    main()
