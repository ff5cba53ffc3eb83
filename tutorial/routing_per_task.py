"""
Routing per task: which experts each benchmark's questions go to, for a run that grades several benchmarks
(`python train.py --task math`, or commonsense, or --eval_tasks a,b,c) with --method moelora.

    python tutorial/routing_per_task.py out                              # the run's out_dir: computes the numbers
    python tutorial/routing_per_task.py out/routing_math.json            # or a JSON written before: table and figure
    python tutorial/routing_per_task.py out --no_figure                  # the table only (no matplotlib)

From a run's out_dir it opens the run with its base (runs.load_run), and runs the model over the graded benchmarks'
prompts (the first --eval_limit of the run, at most 200 per benchmark). For every token of each question (the
Alpaca template around it is left out: the same in every task, it would dilute what the routing says about the
tasks) it counts the top-1 expert and the k chosen ones in every adapted layer, after training and with the
routers as drawn at step 0 (redrawn by seeding as train.py did: tutorial/routing.py -> run_and_its_start). The control
matters: an untrained router already routes by content, because hidden states differ by task. It writes
routing_<task>.json beside the checkpoint.

The table gives, per adapted layer, I(task; top-1 expert) in bits, trained and at step 0. I = 0 means the router
ignores the task; I = H(task) means the expert tells the task. The figure shows each layer's tasks x experts
share of the (token, slot) assignments, trained above and at step 0 below. matplotlib is optional, needed for
the figure only.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tutorial/: routing.py

from data.mixtures import load_benchmarks  # noqa: E402
from data.prompts import eval_prompt_tokens  # noqa: E402
from data.tasks import FAMILIES, find_data_dir  # noqa: E402
from moelora import moelora_layers, moelora_token_mask  # noqa: E402
from routing import entropy_bits, mutual_information_bits, run_and_its_start  # noqa: E402
from data.batches import collate  # noqa: E402

ROUTING_EXAMPLES = 200  # prompts per benchmark at most


def common_prefix_length(sequences) -> int:
    n = min(map(len, sequences))
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


def question_spans(prompts) -> list:
    """(start, end) of each prompt's question: the prompts minus the template's opening and closing, which
    every prompt shares (the longest common prefix and suffix, the suffix not reaching into the prefix)."""
    prefix = common_prefix_length(prompts)
    suffix = min(common_prefix_length([p[::-1] for p in prompts]), min(len(p) for p in prompts) - prefix)
    return [(prefix, len(p) - suffix) for p in prompts]


@torch.no_grad()
def routing_counts(model, tok, tests: dict, batch_size: int = 16) -> dict:
    """{layer: (top1 [tasks, experts], slots [tasks, experts])}: how often the tokens of each benchmark's questions
    have an expert as their first choice, and among their k choices."""
    prompts = {task: [p for p in (eval_prompt_tokens(tok, ex) for ex in examples[:ROUTING_EXAMPLES])
                      if len(p) <= model.args.max_seq_len]  # a longer one is left out
               for task, examples in tests.items()}
    spans = iter(question_spans([p for ps in prompts.values() for p in ps]))
    layers = moelora_layers(model)
    counts = {name: (np.zeros((len(tests), layer.config.num_experts), dtype=np.int64),
                     np.zeros((len(tests), layer.config.num_experts), dtype=np.int64)) for name, layer in layers}
    model.eval()
    for t, ps in enumerate(prompts.values()):
        for i in range(0, len(ps), batch_size):
            batch = ps[i:i + batch_size]
            x, _, _ = collate([(p, p) for p in batch], tok.pad_id, "cpu")
            counted = torch.zeros(x.shape, dtype=torch.bool)  # [B, T]: the questions' tokens
            for row, (start, end) in enumerate(next(spans) for _ in batch):
                counted[row, start:end] = True
            with moelora_token_mask(model, counted):
                model(x)
            for name, layer in layers:
                top_idx = layer.last_top_idx[layer.last_real]  # [m, k], best first
                N = layer.config.num_experts
                counts[name][0][t] += np.bincount(top_idx[:, 0].numpy(), minlength=N)
                counts[name][1][t] += np.bincount(top_idx.flatten().numpy(), minlength=N)
    return counts


def routing_report(models: dict, tok, tests: dict) -> dict:
    """Each benchmark's expert share and I(task; top-1 expert) per adapted layer, for each of the models
    ({"trained": ..., "initial": ...}): the JSON that mi_table and plot read."""
    runs = {which: routing_counts(model, tok, tests) for which, model in models.items()}
    h_task = entropy_bits(next(iter(runs["trained"].values()))[0].sum(1))
    report = {"tasks": list(tests), "h_task_bits": h_task, "tokens_per_task": None, "layers": {}}
    for name in runs["trained"]:
        report["layers"][name] = {}
        for which, counts in runs.items():
            top1, slots = counts[name]
            report["tokens_per_task"] = top1.sum(1).tolist()
            report["layers"][name][which] = {
                "expert_share": (slots / slots.sum(1, keepdims=True).clip(min=1)).round(4).tolist(),  # [tasks, experts]
                "top1_counts": top1.tolist(), "mi_bits": mutual_information_bits(top1)}
    for which in runs:
        report[f"mean_mi_bits_{which}"] = float(np.mean([v[which]["mi_bits"] for v in report["layers"].values()]))
    return report


def routing_of_run(run_dir: Path, data_dir=None, base=None) -> Path:
    """Compute a run's routing per task and write it to run_dir/routing_<task>[_firstN].json; returns the path."""
    model, model0, tok, config = run_and_its_start(run_dir, base)
    benchmarks = config["eval_tasks"].split(",") if config.get("eval_tasks") else list(FAMILIES.get(config["task"],
                                                                                                     [config["task"]]))
    tests, _ = load_benchmarks(benchmarks, find_data_dir(data_dir or config.get("data_dir")))
    limit = config.get("eval_limit")
    if limit:
        tests = {task: examples[:limit] for task, examples in tests.items()}
    if len(tests) < 2:
        raise SystemExit(f"error: {run_dir} graded {len(tests)} benchmark(s): routing per task needs several")
    report = routing_report({"trained": model, "initial": model0}, tok, tests)
    path = run_dir / f"routing_{config['task']}{f'_first{limit}' if limit else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def mi_table(routing: dict) -> str:
    """Markdown: one row per adapted layer, I(task; expert) trained and at step 0, and their mean."""
    kinds = [k for k in ("trained", "initial") if k in next(iter(routing["layers"].values()))]
    lines = [f"H(task) = {routing['h_task_bits']:.3f} bits over {len(routing['tasks'])} tasks "
             f"({', '.join(routing['tasks'])}); question tokens per task: {routing['tokens_per_task']}", "",
             "| layer | " + " | ".join(f"I(task; expert) bits, {k}" for k in kinds) + " |",
             "| --- |" + " ---: |" * len(kinds)]
    for name, layer in routing["layers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{layer[k]['mi_bits']:.3f}" for k in kinds) + " |")
    lines.append("| mean | " + " | ".join(f"{routing[f'mean_mi_bits_{k}']:.3f}" for k in kinds) + " |")
    return "\n".join(lines)


def plot(routing: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = list(routing["layers"])
    kinds = [k for k in ("trained", "initial") if k in routing["layers"][layers[0]]]
    fig, axes = plt.subplots(len(kinds), len(layers), figsize=(2.2 * len(layers) + 1, 2.4 * len(kinds)),
                             squeeze=False)
    for row, kind in enumerate(kinds):
        for col, name in enumerate(layers):
            ax, layer = axes[row][col], routing["layers"][name][kind]
            im = ax.imshow([[100 * v for v in task] for task in layer["expert_share"]], vmin=0, vmax=60, cmap="viridis")
            ax.set_title(f"{name.replace('layers.', '').replace('.attention.', ' ')}, {kind}\nI = {layer['mi_bits']:.2f} bits",
                         fontsize=7)
            ax.set_xticks(range(len(layer["expert_share"][0])))
            ax.set_yticks(range(len(routing["tasks"])))
            ax.set_yticklabels(routing["tasks"] if col == 0 else [], fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of the task's (token, slot) assignments, %")
    fig.suptitle("experts per task and layer (x: expert), trained and with the routers as drawn at step 0", fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run's out_dir (with ckpt.pt), or a routing_<task>.json written before")
    p.add_argument("--data_dir", default=None, help="datasets root, if not where the run found them")
    p.add_argument("--base", default=None, help="base checkpoint, if not where the run's config says")
    p.add_argument("--figure", default=None, help="where the PNG goes (default: beside the JSON, same name)")
    p.add_argument("--no_figure", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    path = Path(args.run)
    if path.is_dir():
        if not (path / "ckpt.pt").is_file():
            raise SystemExit(f"error: {path} holds no ckpt.pt: give the out_dir of a train.py --method moelora run")
        path = routing_of_run(path, args.data_dir, args.base)
        print(f"written {path}\n")
    elif not path.is_file():
        raise SystemExit(f"error: {path} not found: give a run's out_dir, or a routing_<task>.json")
    routing = json.loads(path.read_text())
    print(mi_table(routing))
    if args.no_figure:
        return routing
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("\nmatplotlib is not installed: it is optional, needed only for the figure "
                         "(pip install matplotlib), or pass --no_figure") from None
    figure = Path(args.figure) if args.figure else path.with_suffix(".png")
    plot(routing, figure)
    print(f"\nfigure: {figure}")
    return routing


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
