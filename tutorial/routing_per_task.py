"""
Routing per task: which experts each benchmark's questions go to, from the routing_<family>.json that
`python train.py --task math` (or commonsense, or any run grading several benchmarks) writes.

    python tutorial/routing_per_task.py out/routing_math.json                 # table; figure beside the JSON
    python tutorial/routing_per_task.py out/routing_math.json --no_figure     # the table only (no matplotlib)

The table gives, per adapted layer, I(task; top-1 expert) in bits after training and with the routers as drawn
at step 0 (the control: an untrained router already routes by content, because hidden states differ by task).
I = 0 means the router ignores the task; I = H(task) means the expert tells the task. The figure shows each
layer's tasks x experts share of the (token, slot) assignments, trained above and at step 0 below.
matplotlib is optional, needed for the figure only.
"""
import argparse
import json
from pathlib import Path


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
    p.add_argument("routing_json", help="routing_<task>.json written by train.py")
    p.add_argument("--figure", default=None, help="where the PNG goes (default: beside the JSON, same name)")
    p.add_argument("--no_figure", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    path = Path(args.routing_json)
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: train.py writes it when it grades several benchmarks with --method moelora")
    routing = json.loads(path.read_text())
    print(mi_table(routing))
    if args.no_figure:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("\nmatplotlib is not installed: it is optional, needed only for the figure "
                         "(pip install matplotlib), or pass --no_figure") from None
    figure = Path(args.figure) if args.figure else path.with_suffix(".png")
    plot(routing, figure)
    print(f"\nfigure: {figure}")


if __name__ == "__main__":
    main()
