"""
The tables and figures of tutorial/experiments.md, from the files the runs of tutorial/runs.sh wrote.

    python tutorial/plots.py [out/tutorial]            # print the tables; draw the figures into tutorial/
    python tutorial/plots.py out/tutorial --no_figures # the tables only (no matplotlib needed)

Reads <root>/<method>_s<seed>/{metrics.jsonl, metrics_gsm8k.json, ckpt.pt} for method in lora, moelora,
moelora_cl0, and, when tutorial/routing.py has been run on them, routing_gsm8k.json.
Prints, as Markdown: the results over seeds (trainable parameters, GSM8K answer loss, perplexity, accuracy:
mean +- sample standard deviation, and every seed), and the routing at the last logged training step.
Figures (matplotlib is optional, needed for these only):
    tutorial/loss_curves.png       training loss, its difference from LoRA's on the same batches, router
                                   entropy and the largest expert's load, against the step
    tutorial/routing_load.png      expert load, layer x expert, at the last step: MoELoRA vs no contrastive loss
    tutorial/routing_kinds.png     I(token kind; expert) per layer, from routing.py's files
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np

METHODS = {"lora": "LoRA r32", "moelora": "MoELoRA 8x4 top-2", "moelora_cl0": "MoELoRA, contrastive 0"}
HERE = Path(__file__).resolve().parent


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_runs(root: Path):
    """{method: {seed: run directory}} for the runs that finished (they have metrics_gsm8k.json)."""
    runs = {}
    for method in METHODS:
        for d in sorted(root.glob(f"{method}_s*")):
            seed = d.name.removeprefix(f"{method}_s")
            if seed.isdigit() and (d / "metrics_gsm8k.json").exists():
                runs.setdefault(method, {})[int(seed)] = d
    return runs


def trainable_parameters(run_dir: Path):
    """The number of trained weights: the tensors of the adapter checkpoint (what train.py logs as 'training N')."""
    import torch

    weights = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)["weights"]
    return sum(v.numel() for k, v in weights.items() if k != "moelora_config")


def mean_std(values):
    """(mean, sample standard deviation) -- ddof=1: three seeds are a sample, not the population."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def results(runs, params=True):
    """{method: {"seeds": [...], "answer_loss": [...], "perplexity": [...], "accuracy": [...], "params": int}}."""
    out = {}
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        m = [json.loads((by_seed[s] / "metrics_gsm8k.json").read_text()) for s in seeds]
        out[method] = {"seeds": seeds, "answer_loss": [x["answer_loss"] for x in m],
                       "perplexity": [x["answer_perplexity"] for x in m], "accuracy": [x["accuracy"] for x in m],
                       "correct": [x["correct"] for x in m], "n": m[0]["n"],
                       "params": trainable_parameters(by_seed[seeds[0]]) if params else None}
    return out


def results_table(res):
    lines = ["| method | trainable params | answer loss | perplexity | accuracy (%) | per seed: loss / accuracy (correct of n) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for method, r in res.items():
        loss, ppl, acc = mean_std(r["answer_loss"]), mean_std(r["perplexity"]), mean_std(100 * np.array(r["accuracy"]))
        per_seed = "; ".join(f"s{s}: {l:.4f} / {100 * a:.2f} ({c}/{r['n']})"
                             for s, l, a, c in zip(r["seeds"], r["answer_loss"], r["accuracy"], r["correct"]))
        params = f"{r['params']:,}" if r["params"] is not None else "?"
        lines.append(f"| {METHODS[method]} | {params} | {loss[0]:.4f} ± {loss[1]:.4f} | {ppl[0]:.3f} ± {ppl[1]:.3f} "
                     f"| {acc[0]:.2f} ± {acc[1]:.2f} | {per_seed} |")
    return "\n".join(lines)


def final_routing(run_dir: Path):
    """The routing record of the last logged step: {layer: {"expert_share": [...], "router_entropy": x}}, step."""
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "routing" in r]
    return records[-1]["routing"], records[-1]["step"]


def routing_table(runs):
    """Per MoELoRA method and seed: router entropy, max and min expert load, averaged over the adapted layers."""
    lines = ["| method | seed | step | router entropy (nats; ln 8 = 2.08) | max expert load | min expert load | "
             "router entropy per layer |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for method in ("moelora", "moelora_cl0"):
        for seed, d in sorted(runs.get(method, {}).items()):
            routing, step = final_routing(d)
            load = np.array([v["expert_share"] for v in routing.values()])  # [layers, experts]
            ent = [v["router_entropy"] for v in routing.values()]
            lines.append(f"| {METHODS[method]} | {seed} | {step} | {np.mean(ent):.3f} | {load.max(1).mean():.3f} | "
                         f"{load.min(1).mean():.3f} | {' '.join(f'{e:.2f}' for e in ent)} |")
    return "\n".join(lines)


def routing_files(runs, method):
    return [json.loads((d / "routing_gsm8k.json").read_text()) for _, d in sorted(runs.get(method, {}).items())
            if (d / "routing_gsm8k.json").exists()]


def routing_kinds_table(runs):
    """Means over layers, then mean +- std over seeds, of routing.py's numbers; the routers as drawn at step 0
    are the control (a seed draws the same initial routers with or without the contrastive loss)."""
    rows = []
    for method in ("moelora", "moelora_cl0"):
        data = routing_files(runs, method)
        if not data:
            continue
        parts = [(f"{METHODS[method]}, trained", [x["mean"] for x in data])]
        if method == "moelora":
            parts.insert(0, ("routers at initialisation (same for both)", [x["init"]["mean"] for x in data]))
        for label, means in parts:
            cells = [mean_std([m[k] for m in means]) for k in ("expert_entropy_bits", "mi_bits", "mi_over_h_kind")]
            trained = "same_top1_as_init" in means[0]
            same = mean_std([100 * m["same_top1_as_init"] for m in means]) if trained else None
            cl = mean_std([m["contrastive_loss"] for m in means]) if trained else None
            rows.append(f"| {label} | {len(means)} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells)
                        + (f" | {same[0]:.0f} ± {same[1]:.0f} | {cl[0]:.2f} ± {cl[1]:.2f} |" if trained
                           else " | | 5.54 (B = 0: log 255) |"))
    if not rows:
        return None
    head = ["| routers | seeds | H(expert) bits (3 = even) | I(kind; expert) bits | I / H(kind) | same top-1 as at init (%) "
            "| contrastive loss on the text |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    return "\n".join(head + rows)


# ------------------------------------------------------------------------------------------------
# figures

COLORS = {"lora": "tab:gray", "moelora": "tab:blue", "moelora_cl0": "tab:orange"}


def plot_loss_curves(plt, runs, path: Path):
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes = axes.flatten()
    loss = {}  # method -> {seed: [steps] losses}
    for method, by_seed in runs.items():
        curves = {s: read_jsonl(d / "metrics.jsonl") for s, d in sorted(by_seed.items())}
        steps = [r["step"] for r in next(iter(curves.values()))]
        loss[method] = {s: np.array([r["loss"] for r in c]) for s, c in curves.items()}
        panels = [(axes[0], lambda r: r["loss"])]
        if method != "lora":
            panels += [(axes[2], lambda r: np.mean([v["router_entropy"] for v in r["routing"].values()])),
                       (axes[3], lambda r: np.mean([max(v["expert_share"]) for v in r["routing"].values()]))]
        for ax, fn in panels:
            values = np.array([[fn(r) for r in c] for c in curves.values()])  # [seeds, steps]
            for v in values:
                ax.plot(steps, v, color=COLORS[method], alpha=0.25, lw=0.8)
            ax.plot(steps, values.mean(0), color=COLORS[method], lw=2, label=f"{METHODS[method]} (mean of {len(values)})")
    # a seed fixes the batches (train.batch_order), so each method saw the same batches: the paired difference
    # from LoRA removes the batch-to-batch noise that dominates the raw curves
    for method in ("moelora", "moelora_cl0"):
        seeds = sorted(set(loss.get(method, {})) & set(loss.get("lora", {})))
        if seeds:
            diff = np.array([loss[method][s] - loss["lora"][s] for s in seeds])
            for v in diff:
                axes[1].plot(steps, v, color=COLORS[method], alpha=0.25, lw=0.8)
            axes[1].plot(steps, diff.mean(0), color=COLORS[method], lw=2, label=f"{METHODS[method]} - LoRA")
    axes[0].set(title="training loss (answer tokens of the step's batch)", xlabel="step", ylabel="cross-entropy")
    axes[1].axhline(0, color="k", ls=":", lw=1)
    axes[1].set(title="loss minus LoRA's on the same batch (same seed)", xlabel="step", ylabel="difference")
    axes[2].axhline(math.log(8), color="k", ls=":", lw=1)
    axes[2].set(title="router entropy, mean over layers", xlabel="step", ylabel="nats (dotted: ln 8, uniform)")
    axes[3].axhline(1 / 8, color="k", ls=":", lw=1)
    axes[3].set(title="largest expert load, mean over layers", xlabel="step", ylabel="share (dotted: 1/8, even)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def plot_routing_load(plt, runs, path: Path):
    methods = [m for m in ("moelora", "moelora_cl0") if m in runs]
    if not methods:
        return False
    seeds = sorted(set.intersection(*(set(runs[m]) for m in methods)))
    vmax = max(0.4, max(max(max(v["expert_share"]) for v in final_routing(runs[m][s])[0].values())
                        for m in methods for s in seeds))
    fig, axes = plt.subplots(len(methods), len(seeds), figsize=(3.3 * len(seeds), 3.2 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        for j, seed in enumerate(seeds):
            routing, step = final_routing(runs[method][seed])
            load = 100 * np.array([v["expert_share"] for v in routing.values()])  # [layers, experts], %
            ax = axes[i, j]
            im = ax.imshow(load, vmin=0, vmax=100 * vmax, cmap="viridis")
            for (a, b), v in np.ndenumerate(load):
                ax.text(b, a, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < 60 * vmax else "k")
            ax.set_xticks(range(load.shape[1]))
            ax.set_yticks(range(len(routing)))
            ax.set_yticklabels([n.replace("layers.", "").replace(".attention.", " ") for n in routing], fontsize=7)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_title(f"{METHODS[method]}, seed {seed}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of the (token, slot) assignments, %")
    fig.suptitle(f"expert load at the last logged step ({step}): the step's last micro-batch, real tokens "
                 "only (even: 12.5%)", fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_routing_kinds(plt, runs, path: Path):
    series = []  # (label, color, hatch, [seeds, layers] of I(kind; expert))
    for method in ("moelora", "moelora_cl0"):
        data = routing_files(runs, method)
        if not data:
            continue
        layers = list(data[0]["layers"])
        if not series:
            mi0 = np.array([[x["init"]["layers"][l]["mi_bits"] for l in layers] for x in data])
            series.append(("routers at initialisation", "tab:gray", "//", mi0))
        mi = np.array([[x["layers"][l]["mi_bits"] for l in layers] for x in data])
        series.append((f"{METHODS[method]}, trained", COLORS[method], None, mi))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 3.4))
    width = 0.8 / len(series)
    for k, (label, color, hatch, mi) in enumerate(series):
        x = np.arange(mi.shape[1]) + (k - (len(series) - 1) / 2) * width
        ax.bar(x, mi.mean(0), width, color=color, alpha=0.5 if hatch else 0.9, hatch=hatch, label=label)
        for row in mi:
            ax.plot(x, row, "k.", ms=3)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([l.replace("layers.", "").replace(".attention.", " ") for l in layers])
    ax.set(ylabel="I(token kind; top-1 expert), bits",
           title="how much the chosen expert says about the token kind (bars: mean over seeds, dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="out/tutorial", help="where tutorial/runs.sh wrote its runs")
    p.add_argument("--figures_dir", default=str(HERE), help="where the PNGs go (default tutorial/)")
    p.add_argument("--no_figures", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    root = Path(args.root)
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"error: no finished run under {root} (expected lora_s1/, moelora_s1/, ... from tutorial/runs.sh)")
    if (root / "default_time.txt").exists():
        print((root / "default_time.txt").read_text().strip())
    default = root / "default" / "metrics_gsm8k.json"
    if default.exists():
        d = json.loads(default.read_text())
        print(f"default run (python train.py --task gsm8k): accuracy {100 * d['accuracy']:.2f}% ({d['correct']}/{d['n']}), "
              f"answer loss {d['answer_loss']:.4f} (perplexity {d['answer_perplexity']:.3f})")
    print("\n## GSM8K test (1,319 questions): mean ± sample std over seeds\n")
    print(results_table(results(runs)))
    print("\n## routing at the last logged training step (metrics.jsonl)\n")
    print(routing_table(runs))
    kinds = routing_kinds_table(runs)
    if kinds:
        print("\n## token kinds and experts (tutorial/routing.py; means over the adapted layers, then over seeds)\n")
        print(kinds)
    if args.no_figures:
        return
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("\nmatplotlib is not installed: it is optional, needed only for the figures "
                         "(pip install matplotlib), or pass --no_figures") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out = Path(args.figures_dir)
    made = [out / "loss_curves.png", out / "routing_load.png"]
    plot_loss_curves(plt, runs, made[0])
    if not plot_routing_load(plt, runs, made[1]):
        made.pop()
    if plot_routing_kinds(plt, runs, out / "routing_kinds.png"):
        made.append(out / "routing_kinds.png")
    print("\nfigures: " + ", ".join(f"{f} ({f.stat().st_size // 1024} KB)" for f in made))


if __name__ == "__main__":
    main()
