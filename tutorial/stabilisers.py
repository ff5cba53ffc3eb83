"""
The router's gate and stabilisers on the synthetic task of tutorial/controlled.py: what Switch's gate, ST-MoE's
router z-loss and Switch's router jitter do (tutorial.md, sections 4 and 7).

    OMP_NUM_THREADS=1 python tutorial/stabilisers.py            # ~1 minute on one core
    OMP_NUM_THREADS=1 python tutorial/stabilisers.py --quick    # seconds (tests/test_controlled.py)

Section 11's setting (4 clusters, 4 experts of rank 4, top-2, separation 4 sigma, no contrastive loss), 300 steps,
at the learning rate section 11 tuned (1e-2) and at ten times it, where a router's logits have room to grow.
Measured on each seed's held-out inputs:
  - relative MSE (base alone = 1);
  - router z: the mean of logsumexp(router logits)^2, what the z-loss penalises;
  - NMI of the top-1 expert with the true cluster (does the router learn the clusters?);
  - flips: the share of inputs whose top-1 expert changes when 0.01 sigma of noise is added.
"""
import argparse
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # controlled.py sits beside this file

from controlled import Setup, cpu_name, mean_std, train, make_task  # noqa: E402

# name -> (Setup fields, variant of controlled.VARIANTS)
ARMS = {
    "top-2, Mixtral's gate": ({}, "moelora_cl0"),
    "top-2, router z-loss 1e-3": ({"router_z_weight": 1e-3}, "moelora_cl0"),
    "top-2, router jitter 0.01": ({"router_jitter": 0.01}, "moelora_cl0"),
    "top-2, router jitter 0.1": ({"router_jitter": 0.1}, "moelora_cl0"),
    "top-1, Switch's gate": ({"top_k": 1, "gate": "switch"}, "moelora_cl0"),
    "top-1, Switch's gate, router frozen": ({"top_k": 1, "gate": "switch"}, "moelora_cl0_frozen_router"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 steps, one seed, one learning rate")
    args = p.parse_args(argv)
    s = Setup(contrastive_weight=0.0)
    s, seeds, lrs = (replace(s, steps=40, n_eval=512, eval_every=20), [0], [1e-2]) if args.quick else (s, [0, 1, 2], [1e-2, 1e-1])
    lines = [f"`python tutorial/stabilisers.py{' --quick' if args.quick else ''}`: {cpu_name()}, python "
             f"{platform.python_version()}, torch {torch.__version__}; seeds {seeds}; mean ± sd", "",
             "| lr | arm | relative MSE | router z | NMI(top-1; cluster) | top-1 flips under noise |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    results = {}
    for lr in lrs:
        for arm, (fields, variant) in ARMS.items():
            runs = [train(make_task(s, seed), replace(s, **fields), variant, seed, lr) for seed in seeds]
            results[(lr, arm)] = runs
            lines.append(f"| {lr:g} | {arm} | {mean_std([r['final'] for r in runs])} | "
                         f"{mean_std([r['router_z'] for r in runs], '{:.1f}')} | {mean_std([r['nmi'] for r in runs])} | "
                         f"{mean_std([100 * r['flip_noise'] for r in runs], '{:.2f}')}% |")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
