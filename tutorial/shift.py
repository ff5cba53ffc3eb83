"""
A language-model experiment where the adapters face a real shift: stories260K, a real LLaMA pretrained on
children's stories only, adapted to the math mixture that `python train.py --task math` builds (GSM8K train +
MAWPS train, AddSub's questions taken out) and graded on the whole math family (AddSub, AQuA, GSM8K, MultiArith,
SingleEq, SVAMP).

    OMP_NUM_THREADS=1 python tutorial/shift.py                   # full: 3 seeds x 5 contenders + the base, 2 at a time
    OMP_NUM_THREADS=1 python tutorial/shift.py --quick           # reduced (what tests/test_shift.py runs)
    python tutorial/shift.py --report_only                       # the tables again, from the finished runs
    python tutorial/shift.py --report_only --figure tutorial/shift.png   # and the figure (needs matplotlib)

Every run is a plain train.py command (printed, and kept in its out_dir as command.txt), so any row can be
rerun alone. A run whose results file exists is not run again: stop the script and start it again to go on.

Contenders, at equal trainable parameters (LoRA rank 32 = 8 experts x rank 4; the routers, 8 x 64 weights per
adapted layer, come on top) and, within a seed, on the same batches (the seed sets the batch order, the
adapters' initialisation, dropout and the contrastive samples):
  base            stories260K alone (`--eval_only` with no checkpoint: fresh adapters have B = 0)
  lora            --method lora --r 32
  lora_r8         --method lora --r 8: a control with a quarter of the parameters, the rank each token gets
                  from MoELoRA (2 experts of rank 4); MoELoRA between the two LoRAs says how much its routing buys
  moelora         MoELoRA 8 x rank 4, top-2, contrastive weight 0.1, balance 0.01 (the project's defaults)
  moelora_cl0     the same, contrastive weight 0
  moelora_cl001   the same, contrastive weight 0.01 (section 6: its gradient can outweigh the LM's early on)
  moelora_warm    the same, contrastive weight 0.1 reached linearly over the first half (--contrastive_warmup)
and two probes, run when named (`--contenders lora_lr1e-2,moelora_cl0_lr1e-2 --seeds 1`): LoRA and MoELoRA
without the contrastive loss at lr 1e-2 instead of 3e-3, to see whether the gap between them is one of step size.
Each trains 150 steps of 16 examples at lr 3e-3 (the tiny preset's), cutoff 512 pieces, and is graded on the
first 100 questions of each benchmark. Routing per task (I(task; top-1 expert), trained and with the routers as
drawn at step 0) is measured on those questions: train.py writes it to routing_math_first100.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project root: data/
from data.tasks import FAMILIES  # noqa: E402

SHARED = Path(os.environ.get("MOELORA_SHARED", ROOT.parent / "shared"))

CONTENDERS = {
    "lora": ["--method", "lora", "--r", "32"],
    "lora_r8": ["--method", "lora", "--r", "8"],  # a control: the rank a token gets from its top-2 of rank-4 experts
    "moelora": [],
    "moelora_cl0": ["--contrastive_weight", "0"],
    "moelora_cl001": ["--contrastive_weight", "0.01"],
    "moelora_warm": ["--contrastive_warmup", "75"],  # half of the 150 steps
    # probes, run only when named in --contenders: is the gap between LoRA and MoELoRA a matter of learning rate?
    "lora_lr1e-2": ["--method", "lora", "--r", "32", "--lr", "1e-2"],
    "moelora_cl0_lr1e-2": ["--contrastive_weight", "0", "--lr", "1e-2"],
}
PROBES = ("lora_lr1e-2", "moelora_cl0_lr1e-2")
BENCHMARKS = FAMILIES["math"]  # what --task math grades


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="out/shift")
    p.add_argument("--model", default=str(SHARED / "models" / "stories260K-hf"))
    p.add_argument("--data_dir", default=os.environ.get("MOELORA_DATA_DIR", str(SHARED / "data")))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--contenders", default=",".join(n for n in CONTENDERS if n not in PROBES),
                   help=f"among {', '.join(CONTENDERS)} (default: all but the probes)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval_limit", type=int, default=100)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1 unless set)")
    p.add_argument("--quick", action="store_true", help="2 steps of batch 4, 3 questions per benchmark, 1 seed")
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--figure", default=None, help="also draw the figure into this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_limit, args.seeds = 2, 3, "1"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.contenders = args.contenders.split(",")
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}: choose among {', '.join(CONTENDERS)}")
    return args


def train_command(args, name, seed):
    """The train.py argument list of one run; name "base" is the base alone."""
    common = ["--task", "math", "--model", args.model, "--data_dir", args.data_dir, "--preset", "tiny",
              "--lr", "3e-3", "--max_seq_len", "512", "--eval_limit", str(args.eval_limit), "--log_interval", "5",
              "--out_dir", str(run_dir(args, name, seed)), "--overwrite"]
    if args.quick:
        common += ["--batch_size", "4", "--micro_batch_size", "4", "--max_new_tokens", "8", "--max_seq_len", "256",
                   "--contrastive_samples", "32"]
    if name == "base":
        return common + ["--eval_only"]
    return common + ["--max_steps", str(args.steps), "--seed", str(seed), *CONTENDERS[name]]


def run_dir(args, name, seed):
    return Path(args.out_dir) / (name if name == "base" else f"{name}_s{seed}")


def results_file(args, name, seed):
    return run_dir(args, name, seed) / f"results_math_first{args.eval_limit}.json"


def run_all(args):
    """Run what is missing, `--jobs` at a time; each run's output goes to its out_dir/log.txt."""
    todo = [("base", 0)] + [(name, seed) for seed in args.seeds for name in args.contenders]
    todo = [(n, s) for n, s in todo if not results_file(args, n, s).exists()]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # two single-thread runs on two cores beat one run fighting for both
    running = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name, seed = todo.pop(0)
            d = run_dir(args, name, seed)
            d.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "train.py", *train_command(args, name, seed)]
            (d / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
            print(f"start {d.name}: python {' '.join(cmd[1:])}", flush=True)
            log = open(d / "log.txt", "w")
            running.append((d, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
        time.sleep(0.5)
        for item in list(running):
            d, proc, log, t0 = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {d / 'log.txt'})"
                print(f"{status} {d.name} in {time.time() - t0:.0f} s", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"error: {d.name} failed:\n" + (d / "log.txt").read_text()[-2000:])


def collect(args, name, seed):
    """One run's figures: accuracy per benchmark, GSM8K answer loss, I(task; expert) trained / at step 0, and the
    training loss (overall, per source, contrastive as added) averaged over the logged steps of the last fifth of
    training: one logged batch holds only a few MAWPS examples, so a single step's figure would be noise."""
    res = json.loads(results_file(args, name, seed).read_text())
    out = {b: 100 * res["benchmarks"][b]["accuracy"] for b in BENCHMARKS if b in res["benchmarks"]}
    out["average"] = statistics.mean(out[b] for b in BENCHMARKS if b in out)
    out["gsm8k_loss"] = res["benchmarks"]["gsm8k"]["answer_loss"]
    routing = run_dir(args, name, seed) / f"routing_math_first{args.eval_limit}.json"
    if routing.exists():
        r = json.loads(routing.read_text())
        out["mi_trained"], out["mi_initial"], out["h_task"] = r["mean_mi_bits_trained"], r["mean_mi_bits_initial"], r["h_task_bits"]
    metrics = run_dir(args, name, seed) / "metrics.jsonl"
    if metrics.exists():
        log = [json.loads(line) for line in metrics.read_text().splitlines()]
        tail = [r for r in log if r["step"] > 0.8 * log[-1]["step"]]
        out["train_loss"] = statistics.mean(r["loss"] for r in tail)
        out["contrastive_last"] = statistics.mean(r["contrastive"] for r in tail)
        if log[0].get("routing"):  # the first logged step, for comparison
            out["router_entropy_start"] = statistics.mean(l["router_entropy"] for l in log[0]["routing"].values())
        routing = [r["routing"] for r in tail if r.get("routing")]
        if routing:  # per layer: router entropy (nats; uniform over 8 experts = 2.08) and the busiest expert's share
            out["router_entropy"] = statistics.mean(l["router_entropy"] for r in routing for l in r.values())
            out["max_share"] = statistics.mean(max(l["expert_share"]) for r in routing for l in r.values())
        for source in ("gsm8k", "mawps"):
            values = [r["loss_per_source"][source] for r in tail if source in r.get("loss_per_source", {})]
            out[f"train_{source}"] = statistics.mean(values) if values else None
    return out


def mean_sd(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def report(args):
    rows = {"base": [collect(args, "base", 0)]}
    for n in args.contenders:  # the runs that have finished: a report while others still run says so per row
        done = [s for s in args.seeds if results_file(args, n, s).exists()]
        if len(done) < len(args.seeds):
            print(f"{n}: {len(done)} of {len(args.seeds)} seeds finished")
        if done:
            rows[n] = [collect(args, n, s) for s in done]
    n_seeds = len(args.seeds)
    print(f"\nstories260K on --task math, {args.steps} steps, first {args.eval_limit} questions per benchmark; "
          f"mean ± sd over seeds {args.seeds} (sd = sample standard deviation; the base has no seed)\n")
    print("| contender | GSM8K answer loss | " + " | ".join(BENCHMARKS) + " | average accuracy |")
    print("| --- | ---: |" + " ---: |" * (len(BENCHMARKS) + 1))
    for name, runs in rows.items():
        cells = [mean_sd([r["gsm8k_loss"] for r in runs], "{:.3f}")]
        cells += [mean_sd([r.get(b) for r in runs], "{:.1f}") for b in BENCHMARKS]
        cells += [mean_sd([r["average"] for r in runs], "{:.2f}")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nper seed, GSM8K answer loss: " + "; ".join(
        f"{n} " + " / ".join(f"{r['gsm8k_loss']:.3f}" for r in runs) for n, runs in rows.items() if n != "base"))
    print("\ntraining loss, mean over the logged steps of the last fifth of training (each on its own batch), and "
          f"routing per task on the graded questions; H(task) = {rows['base'][0].get('h_task', float('nan')):.3f} bits\n")
    print("| contender | train loss | gsm8k source | mawps source | contrastive (as added) | router entropy, first "
          "logged step | at the end | busiest expert's share | I(task; expert) trained, bits | same, routers at step 0 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in rows.items():
        if name == "base":
            continue
        cells = [mean_sd([r.get(k) for r in runs], f) for k, f in
                 (("train_loss", "{:.3f}"), ("train_gsm8k", "{:.3f}"), ("train_mawps", "{:.3f}"),
                  ("contrastive_last", "{:.4f}"), ("router_entropy_start", "{:.3f}"), ("router_entropy", "{:.3f}"),
                  ("max_share", "{:.3f}"),
                  ("mi_trained", "{:.4f}"), ("mi_initial", "{:.4f}"))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    json.dump(rows, open(Path(args.out_dir) / "summary.json", "w"), indent=1)
    print(f"\n{n_seeds} seed(s); per-run figures in {Path(args.out_dir) / 'summary.json'}")
    if args.figure:
        figure(args, rows, args.figure)


def figure(args, rows, path):
    """Training loss against step (mean over seeds) and each seed's GSM8K answer loss, per contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in rows if n != "base"]
    for name in names:
        logs = [[json.loads(l) for l in (run_dir(args, name, s) / "metrics.jsonl").read_text().splitlines()]
                for s in args.seeds if results_file(args, name, s).exists()]
        steps = [r["step"] for r in logs[0]]
        left.plot(steps, [statistics.mean(log[i]["loss"] for log in logs) for i in range(len(steps))], label=name)
    left.set(xlabel="step", ylabel="training loss (logged batch, mean over seeds)", title="training")
    left.legend(fontsize=8)
    for x, name in enumerate(names):
        values = [r["gsm8k_loss"] for r in rows[name]]
        right.scatter([x] * len(values), values, s=16)
        right.plot([x - 0.25, x + 0.25], [statistics.mean(values)] * 2, color="black")
    right.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    right.set(ylabel=f"GSM8K answer loss, first {args.eval_limit} questions",
              title=f"graded: each seed and the mean (the base: {rows['base'][0]['gsm8k_loss']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None):
    args = parse_args(argv)
    if not args.report_only:
        t0 = time.time()
        run_all(args)
        print(f"all runs finished in {(time.time() - t0) / 60:.1f} min")
    report(args)


if __name__ == "__main__":
    main()
