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
  moelora         MoELoRA 8 x rank 4, top-2, contrastive weight 0.1, balance 0.01 (the defaults when this experiment first ran)
  moelora_cl0     the same, contrastive weight 0
  moelora_cl001   the same, contrastive weight 0.01 (section 6: its gradient can outweigh the LM's early on)
  moelora_warm    the same, contrastive weight 0.1 reached linearly over the first half (--contrastive_warmup)
and two probes, run when named (`--contenders lora_lr1e-2,moelora_cl0_lr1e-2 --seeds 1`): LoRA and MoELoRA
without the contrastive loss at lr 1e-2 instead of 3e-3, to see whether the gap between them is one of step size.
Each trains 150 steps of 16 examples at lr 3e-3 (the tiny preset's), cutoff 512 pieces, and is graded on the
first 100 questions of each benchmark. Routing per task (I(task; top-1 expert), trained and with the routers as
drawn at step 0) is measured on those questions, offline, by tutorial/routing_per_task.py: routing_math_first100.json.
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project root: data/
from data.tasks import FAMILIES  # noqa: E402

SHARED = Path(os.environ.get("MOELORA_SHARED", ROOT.parent / "shared"))

CONTENDERS = {
    "lora": ["--method", "lora", "--r", "32"],
    "lora_r8": ["--method", "lora", "--r", "8"],  # a control: the rank a token gets from its top-2 of rank-4 experts
    "moelora": ["--contrastive_weight", "0.1"],  # the defaults before the contrastive-loss trial
    "moelora_cl0": ["--contrastive_weight", "0"],
    "moelora_cl001": ["--contrastive_weight", "0.01"],
    "moelora_warm": ["--contrastive_weight", "0.1", "--contrastive_warmup", "75"],  # half of the 150 steps
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
    trial = p.add_argument_group("the contrastive-loss trial, language-model tier (tutorial/experiments.md)")
    trial.add_argument("--trial", action="store_true", help="run the trial instead of the shift experiment")
    trial.add_argument("--synthetic_summary", default="out/trial_synthetic/summary.json",
                       help="the synthetic tier's summary: where w* and tau* come from")
    trial.add_argument("--cl_weight", type=float, default=None, help="the moe_cl arm's weight instead of w*")
    trial.add_argument("--cl_tau", type=float, default=None, help="the moe_cl arm's temperature instead of tau*")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_limit, args.seeds = 2, 3, "1"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.contenders = args.contenders.split(",")
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}: choose among {', '.join(CONTENDERS)}")
    return args


def common_flags(args, out_dir):
    """The train.py flags every run of this script shares."""
    common = ["--task", "math", "--model", args.model, "--data_dir", args.data_dir, "--preset", "tiny",
              "--max_seq_len", "512", "--eval_limit", str(args.eval_limit), "--log_interval", "5",
              "--out_dir", str(out_dir), "--overwrite"]
    if args.quick:
        common += ["--batch_size", "4", "--micro_batch_size", "4", "--max_new_tokens", "8", "--max_seq_len", "256",
                   "--contrastive_samples", "32"]
    return common


def train_command(args, name, seed):
    """The train.py argument list of one run; name "base" is the base alone."""
    common = common_flags(args, run_dir(args, name, seed))
    if name == "base":
        return common + ["--eval_only"]
    lr = [] if "--lr" in CONTENDERS[name] else ["--lr", "3e-3"]
    return common + lr + ["--max_steps", str(args.steps), "--seed", str(seed), *CONTENDERS[name]]


def run_dir(args, name, seed):
    return Path(args.out_dir) / (name if name == "base" else f"{name}_s{seed}")


def results_file(args, name, seed):
    return run_dir(args, name, seed) / f"results_math_first{args.eval_limit}.json"


def run_queue(runs, jobs: int):
    """runs: [(out_dir, phases)], a phase being a train.py argument list, or a function to call between two of
    them. Runs `jobs` runs at a time (each with OMP_NUM_THREADS=1 unless set); their output goes to out_dir/log.txt
    and their commands to out_dir/command.txt."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # two single-thread runs on two cores beat one run fighting for both

    def execute(run):
        d, phases = run
        d.mkdir(parents=True, exist_ok=True)
        (d / "command.txt").write_text("".join(" ".join(["train.py", *p]) + "\n" for p in phases if not callable(p)))
        t0 = time.time()
        with open(d / "log.txt", "a") as log:
            for phase in phases:
                if callable(phase):
                    phase()
                    continue
                print(f"start {d.name}: python train.py {' '.join(phase)}", flush=True)
                code = subprocess.run([sys.executable, "train.py", *phase], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
                if code != 0:
                    print(f"FAILED {d.name} (exit {code}, see {d / 'log.txt'})", flush=True)
                    raise SystemExit(f"error: {d.name} failed:\n" + (d / "log.txt").read_text()[-2000:])
        print(f"done {d.name} in {time.time() - t0:.0f} s", flush=True)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(execute, run) for run in runs]:
            future.result()


def run_all(args):
    """Run the section-12 runs that have no results file yet; then, for the MoELoRA runs, routing per task."""
    from routing_per_task import routing_of_run
    todo = [("base", 0)] + [(name, seed) for seed in args.seeds for name in args.contenders]
    run_queue([(run_dir(args, n, s), [train_command(args, n, s)]) for n, s in todo
               if not results_file(args, n, s).exists()], args.jobs)
    for n, s in todo:
        d = run_dir(args, n, s)
        if n != "base" and "lora" not in CONTENDERS[n] and not (d / f"routing_math_first{args.eval_limit}.json").exists():
            routing_of_run(d, args.data_dir, args.model)


def collect(args, name, seed):
    return collect_dir(args, run_dir(args, name, seed))


def collect_dir(args, d: Path):
    """One run's figures: accuracy per benchmark, GSM8K answer loss, I(task; expert) trained / at step 0, and the
    training loss (overall, per source, contrastive as added) averaged over the logged steps of the last fifth of
    training: one logged batch holds only a few MAWPS examples, so a single step's figure would be noise."""
    res = json.loads((d / f"results_math_first{args.eval_limit}.json").read_text())
    out = {b: 100 * res["benchmarks"][b]["accuracy"] for b in BENCHMARKS if b in res["benchmarks"]}
    out["average"] = statistics.mean(out[b] for b in BENCHMARKS if b in out)
    out["gsm8k_loss"] = res["benchmarks"]["gsm8k"]["answer_loss"]
    routing = d / f"routing_math_first{args.eval_limit}.json"
    if routing.exists():
        r = json.loads(routing.read_text())
        out["mi_trained"], out["mi_initial"], out["h_task"] = r["mean_mi_bits_trained"], r["mean_mi_bits_initial"], r["h_task_bits"]
    metrics = d / "metrics.jsonl"
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


# -----------------------------------------------------------------------------------------------------
# the contrastive-loss trial, language-model tier: `python tutorial/shift.py --trial`. tutorial/experiments.md
# holds its protocol (written before it ran); tutorial/trial.py --design c8 is the synthetic tier, whose best
# contrastive weight and temperature (w*, tau*) the moe_cl arm takes.

TRIAL_ARMS = {"lora": ["--method", "lora", "--r", "32"], "moe_cl0": ["--contrastive_weight", "0"],
              "moe_cl": None}  # moe_cl: --contrastive_weight w* --contrastive_temperature tau*, set in trial_main
TRIAL_LRS, TRIAL_EXTRA_LR = (3e-3, 1e-2, 3e-2), 1e-1  # the extra one only if 3e-2 wins
TRIAL_TUNING_SEED, TRIAL_SEEDS = 100, (4, 5, 6)
VALIDATION = (1000, 1319)  # GSM8K test questions 1001..1319: the tuning criterion, never reported


def validation_range(args):
    """[lo, hi) of the GSM8K test questions that tune the lr (--quick: a few after the graded ones)."""
    return (args.eval_limit, args.eval_limit + 8) if args.quick else VALIDATION


def trial_dir(args, arm, lr, seed):
    return Path(args.out_dir) / "trial" / f"{arm}_lr{lr:g}_s{seed}"


def trial_phases(args, arm, lr, seed):
    """A trial run as train.py commands: stop after step steps - 25, keep that adapter (the measures' checkpoint
    before the last), resume to the end. The resume restores the RNG states: the same run as one going through."""
    d, checkpoint = trial_dir(args, arm, lr, seed), args.steps - 25 if args.steps > 25 else 1
    run = common_flags(args, d) + ["--max_steps", str(args.steps), "--seed", str(seed), "--lr", f"{lr:g}", *TRIAL_ARMS[arm]]
    resume = [a for a in run if a != "--overwrite"] + ["--resume"]
    kept = d / f"adapter_step{checkpoint}.safetensors"
    if kept.exists():  # stopped after the first phase: resume
        return [resume]
    return [run + ["--stop_after", str(checkpoint)], lambda: shutil.copy(d / "adapter.safetensors", kept), resume]


def trial_results(args, arm, lr, seed):
    return trial_dir(args, arm, lr, seed) / f"results_math_first{args.eval_limit}.json"


@contextlib.contextmanager
def routers_as(model, weights: dict):
    """Every adapted layer's router set to weights[name] for the duration of the with."""
    from moelora import moelora_layers
    layers = dict(moelora_layers(model))
    saved = {name: layers[name].router.weight.detach().clone() for name in weights}
    with torch.no_grad():
        for name, w in weights.items():
            layers[name].router.weight.copy_(w)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                layers[name].router.weight.copy_(w)


@torch.no_grad()
def answer_loss_of(model, pairs, pad_id, batch_size=32):
    """Mean cross-entropy of the reference solutions given the prompts, over all their target tokens."""
    from data.batches import collate
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        x, y, _ = collate(pairs[i:i + batch_size], pad_id, "cpu")
        _, loss = model(x, y)
        n = int((y != -100).sum())
        total, count = total + loss.item() * n, count + n
    return total / count


@torch.no_grad()
def routing_on(model, sequences, pad_id, train_mode=False, seed=0, batch_size=16):
    """{layer: (logits [tokens, N], inputs [tokens, d_in])} over the real tokens of the sequences, in order."""
    from moelora import moelora_layers
    layers = moelora_layers(model)
    inputs, out = {}, {name: ([], []) for name, _ in layers}
    hooks = [layer.register_forward_pre_hook(lambda m, a, name=name: inputs.update({name: a[0]})) for name, layer in layers]
    model.train(train_mode)
    torch.manual_seed(seed)  # the dropout masks of train mode
    try:
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            T = max(map(len, chunk))
            tokens = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            for b, seq in enumerate(chunk):
                tokens[b, :len(seq)] = torch.tensor(seq)
            real = (torch.arange(T)[None, :] < torch.tensor([len(q) for q in chunk])[:, None]).flatten()
            model(tokens)
            for name, layer in layers:
                out[name][0].append(layer.last_logits[real])
                out[name][1].append(inputs[name].reshape(-1, layer.in_features)[real])
    finally:
        for h in hooks:
            h.remove()
        model.eval()
    return {name: (torch.cat(l), torch.cat(x)) for name, (l, x) in out.items()}


def trial_measures(args, d: Path, full: bool):
    """The run's measures, cached in d/trial_measures.json: the validation answer loss (the tuning criterion) and,
    with full, measures (a)-(e) of the protocol on the first eval_limit GSM8K test questions."""
    cache = d / "trial_measures.json"
    if cache.exists() and (not full or "nmi" in json.loads(cache.read_text())):
        return json.loads(cache.read_text())
    import controlled
    from data.prompts import example_ids, tokenize_dataset
    from data.tasks import load_split
    from moelora import load_moelora_state_dict, moelora_layers, moelora_state_dict, read_moelora_file
    from routing import KINDS, mutual_information_bits, run_and_its_start, token_kind
    from runs import Precision, load_run

    model, tok, _ = load_run(d, Precision("cpu", torch.float32), args.model)  # its adapter.safetensors
    cutoff = model.args.max_seq_len  # train.py grades the answer loss at the model's context, not the training cutoff
    tests = load_split("gsm8k", "test", Path(args.data_dir))
    lo, hi = validation_range(args)
    out = {"validation_loss": answer_loss_of(model, tokenize_dataset(tok, tests[lo:hi], cutoff)[0], tok.pad_id)}
    layers = moelora_layers(model)
    if full and layers[0][1].router is not None:
        examples = tests[:args.eval_limit]
        pairs = tokenize_dataset(tok, examples, cutoff)[0]
        sequences = [example_ids(tok, ex)[0][:cutoff] for ex in examples]
        kinds = torch.tensor([KINDS.index(k) if k else -1 for q in sequences
                              for k in (token_kind(tok.piece(i)) for i in q)])  # [tokens], -1: BOS, EOS
        k = layers[0][1].config.top_k
        trained = {name: layer.router.weight.detach().clone() for name, layer in layers}
        _, start, _, _ = run_and_its_start(d, args.model)  # the run as it started: its routers redrawn by seeding
        initial = {name: layer.router.weight.detach() for name, layer in moelora_layers(start)}
        for suffix, routers in (("", trained), ("_init", initial)):
            with routers_as(model, routers):
                loss = answer_loss_of(model, pairs, tok.pad_id)
                swapped = []
                for draw in range(3):  # (a): every router swapped for a fresh one of its own norm
                    fresh = {name: controlled.same_scale_random_routers(w, 1, 1000 * draw + i)[0]
                             for i, (name, w) in enumerate(routers.items())}
                    with routers_as(model, fresh):
                        swapped.append(answer_loss_of(model, pairs, tok.pad_id))
                evals = routing_on(model, sequences, tok.pad_id)
                masks = [routing_on(model, sequences, tok.pad_id, train_mode=True, seed=s) for s in (1, 2)]
            out["answer_loss" + suffix] = loss
            out["relevance" + suffix] = sum(swapped) / len(swapped) - loss
            counted = kinds >= 0
            nmis, mis, gaps, entropies = [], [], [], []
            for name, (logits, _) in evals.items():
                top1 = logits.argmax(-1)[counted]
                nmis.append(controlled.nmi(top1, kinds[counted]))
                mis.append(mutual_information_bits(controlled.contingency(kinds[counted], top1).numpy()))
                gap, entropy = controlled.decisiveness(logits, k)
                gaps.append(gap)
                entropies.append(entropy)
            out["nmi" + suffix], out["mi_bits" + suffix] = sum(nmis) / len(nmis), sum(mis) / len(mis)
            out["gap" + suffix], out["entropy" + suffix] = sum(gaps) / len(gaps), sum(entropies) / len(entropies)
            same = [float((a[0].topk(k, -1).indices.sort(-1).values == b[0].topk(k, -1).indices.sort(-1).values)
                          .all(-1).double().mean()) for (name, a), b in zip(masks[0].items(), masks[1].values())
                    if not name.startswith("layers.0.")]  # the first block's routers see no adapter upstream
            out["consistent_dropout" + suffix] = sum(same) / len(same)
            if suffix == "":
                out["cka"] = sum(controlled.mean_expert_cka(controlled.all_expert_outputs(layer, evals[name][1][:2048]))
                                 for name, layer in layers) / len(layers)
                final_sets = {name: logits.topk(k, -1).indices.sort(-1).values for name, (logits, _) in evals.items()}
        before = next(d.glob("adapter_step*.safetensors"))  # (c) between the last two checkpoints
        final_state = moelora_state_dict(model)
        load_moelora_state_dict(model, {**read_moelora_file(before)[1], "moelora_config": final_state["moelora_config"]})
        earlier = routing_on(model, sequences, tok.pad_id)
        out["consistent_ckpt"] = sum(float((final_sets[name] == logits.topk(k, -1).indices.sort(-1).values)
                                           .all(-1).double().mean()) for name, (logits, _) in earlier.items()) / len(earlier)
        load_moelora_state_dict(model, final_state)
    cache.write_text(json.dumps(out, indent=1))
    return out


def trial_main(args):
    """Tune each arm's lr on the tuning seed, run the reported seeds at it, measure, report, apply the decision rule."""
    w, tau = args.cl_weight, args.cl_tau
    if w is None or tau is None:
        summary = Path(args.synthetic_summary)
        if not summary.exists():
            raise SystemExit(f"error: {summary} does not exist: run the synthetic tier first (python tutorial/"
                             "trial.py --design c8), or give --cl_weight and --cl_tau")
        stars = json.loads(summary.read_text())["stars"]["moe_supcon"]
        w, tau = stars if w is None and tau is None else (w if w is not None else stars[0], tau if tau is not None else stars[1])
    TRIAL_ARMS["moe_cl"] = ["--contrastive_weight", f"{w:g}", "--contrastive_temperature", f"{tau:g}"]
    lrs = TRIAL_LRS[:1] if args.quick else TRIAL_LRS
    tuning_seed, seeds = (TRIAL_SEEDS[0], TRIAL_SEEDS[:1]) if args.quick else (TRIAL_TUNING_SEED, TRIAL_SEEDS)
    todo = lambda pairs: [(trial_dir(args, a, lr, s), trial_phases(args, a, lr, s)) for a, lr, s in pairs
                          if not trial_results(args, a, lr, s).exists()]
    run_queue(todo([(arm, lr, tuning_seed) for arm in TRIAL_ARMS for lr in lrs]), args.jobs)
    tuning = {arm: {lr: trial_measures(args, trial_dir(args, arm, lr, tuning_seed), False)["validation_loss"]
                    for lr in lrs} for arm in TRIAL_ARMS}
    extra = [arm for arm, row in tuning.items() if min(row, key=row.get) == TRIAL_LRS[-1]]  # best at the edge
    if extra and not args.quick:
        run_queue(todo([(arm, TRIAL_EXTRA_LR, tuning_seed) for arm in extra]), args.jobs)
        for arm in extra:
            tuning[arm][TRIAL_EXTRA_LR] = trial_measures(args, trial_dir(args, arm, TRIAL_EXTRA_LR, tuning_seed),
                                                         False)["validation_loss"]
    picked = {arm: min(row, key=row.get) for arm, row in tuning.items()}
    run_queue(todo([(arm, picked[arm], s) for s in seeds for arm in TRIAL_ARMS]), args.jobs)
    rows = {arm: [dict(collect_dir(args, trial_dir(args, arm, picked[arm], s)),
                       **trial_measures(args, trial_dir(args, arm, picked[arm], s), True)) for s in seeds]
            for arm in TRIAL_ARMS}
    text, verdicts = trial_report(args, tuning, picked, rows, seeds, w, tau)
    print(text)
    (Path(args.out_dir) / "trial").mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "trial" / "report.md").write_text(text + "\n")
    summary = {"tuning": {a: {f"{lr:g}": v for lr, v in row.items()} for a, row in tuning.items()},
               "picked": picked, "weight": w, "tau": tau, "rows": rows, "verdicts": verdicts}
    (Path(args.out_dir) / "trial" / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def trial_report(args, tuning, picked, rows, seeds, w, tau):
    from controlled import paired_difference
    lrs = sorted({lr for row in tuning.values() for lr in row})
    lines = [f"stories260K on --task math, {args.steps} steps; moe_cl = the project's reading at w* = {w:g}, "
             f"tau* = {tau:g}", "", f"### Tuning: GSM8K answer loss on test questions {validation_range(args)[0] + 1}-"
             f"{validation_range(args)[1]}, "
             f"seed {TRIAL_TUNING_SEED if not args.quick else seeds[0]}", "",
             "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | picked |", "| --- |" + " ---: |" * (len(lrs) + 1)]
    for arm, row in tuning.items():
        lines.append(f"| {arm} | " + " | ".join(f"{row[lr]:.4f}" if lr in row else "" for lr in lrs) + f" | {picked[arm]:g} |")
    get = lambda arm, key: [r[key] for r in rows[arm]]
    lines += ["", f"### Reported seeds {list(seeds)}: GSM8K answer loss on the first {args.eval_limit} test questions "
              "(primary), average accuracy over the six benchmarks", "",
              "| arm | lr | answer loss | per seed | average accuracy (%) |", "| --- | ---: | ---: | --- | ---: |"]
    for arm in rows:
        lines.append(f"| {arm} | {picked[arm]:g} | {mean_sd(get(arm, 'gsm8k_loss'), '{:.4f}')} | "
                     + " / ".join(f"{v:.4f}" for v in get(arm, "gsm8k_loss")) + f" | {mean_sd(get(arm, 'average'), '{:.2f}')} |")
    comparisons = [("moe_cl", "moe_cl0"), ("moe_cl", "lora"), ("moe_cl0", "lora")]
    diffs = {f"{a} - {b}": paired_difference(get(a, "gsm8k_loss"), get(b, "gsm8k_loss")) for a, b in comparisons}
    for key in ("nmi", "relevance"):
        diffs[f"moe_cl - moe_cl0: {key}"] = paired_difference(get("moe_cl", key), get("moe_cl0", key))
    lines += ["", "### Paired differences: mean [95% t-interval], verdict", "", "| difference | value |", "| --- | --- |"]
    for name, (mean, lo, hi, verdict) in diffs.items():
        if ":" in name:  # a routing measure: higher is less random
            verdict = verdict.replace("better", "lower").replace("worse", "higher")
        lines.append(f"| {name} | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] {verdict} |")
    lines += ["", "### Random routing: measures (a)-(e), trained / with the routers put back to step 0 (mean over seeds)", "",
              "(a) answer-loss rise when every router is swapped for a random one of the same norm; (b) NMI(top-1; token "
              "kind) and I in bits, mean over layers; (c) top-2 set unchanged between two dropout masks (layers after the "
              "first block) and between steps 125 and 150; (d) gap between the 2nd and 3rd logit, gate entropy (nats); "
              "(e) mean linear CKA between experts' outputs", "",
              "| arm | answer loss | (a) relevance | (b) NMI | (b) I bits | (c) dropout | (c) checkpoints | (d) gap | "
              "(d) entropy | (e) CKA |", "| --- |" + " ---: |" * 9]
    avg = lambda v: sum(v) / len(v)
    for arm in ("moe_cl0", "moe_cl"):
        pair = lambda key, f="{:.3f}": f"{f.format(avg(get(arm, key)))} / {f.format(avg(get(arm, key + '_init')))}"
        lines.append(f"| {arm} | {pair('answer_loss', '{:.4f}')} | {pair('relevance', '{:.4f}')} | {pair('nmi')} | "
                     f"{pair('mi_bits')} | {pair('consistent_dropout')} | {avg(get(arm, 'consistent_ckpt')):.3f} | "
                     f"{pair('gap')} | {pair('entropy')} | {avg(get(arm, 'cka')):.3f} |")
    verdicts = {
        "H1": {"better": "supported", "worse": "contradicted"}.get(diffs["moe_cl - moe_cl0"][3], "not supported"),
        "H3": {"better": "supported", "worse": "contradicted"}.get(diffs["moe_cl - lora"][3], "not supported"),
    }
    higher = [diffs[f"moe_cl - moe_cl0: {key}"][3] == "worse" for key in ("nmi", "relevance")]  # worse = higher here
    verdicts["H2"] = "supported" if all(higher) else "partly" if any(higher) else "not supported"
    lines += ["", "### Verdicts (the protocol's decision rules, 3 seeds: only a large effect can be called)", "",
              "- the project's reading: " + "; ".join(f"{h} {verdicts[h]}" for h in ("H1", "H2", "H3"))]
    return "\n".join(lines), verdicts


def main(argv=None):
    args = parse_args(argv)
    if args.trial:
        return trial_main(args)
    if not args.report_only:
        t0 = time.time()
        run_all(args)
        print(f"all runs finished in {(time.time() - t0) / 60:.1f} min")
    report(args)


if __name__ == "__main__":
    main()
