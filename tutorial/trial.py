"""
The pre-registered contrastive-loss trials on the synthetic task of tutorial/controlled.py. Their protocols, written
and committed before the runs, are in tutorial/experiments.md: "The contrastive loss on trial" (design c8) and "The
contrastive loss, second trial: twice as many experts as clusters" (design n16).

    OMP_NUM_THREADS=1 python tutorial/trial.py --design c8 --figure tutorial/trial_synthetic.png   # the first trial
    OMP_NUM_THREADS=1 python tutorial/trial.py --design n16                                         # the second
    OMP_NUM_THREADS=1 python tutorial/trial.py --design n16 --quick --trial_dir /tmp/n16q          # ~10 s
    python tutorial/trial.py --design c8 --cell rank1_sep3_bal0 --arm moe_supcon --lr 0.01 --weight 0.1 --tau 0.1 --seed 3

Two designs, on the same teachers, batches and seeds:
- c8: 8 experts of rank 4, top-2, in a 2 x 2 x 2 factorial of cells (teacher rank 1 or 4, separation 2 or 3,
  balance weight 0 or 0.01). Hypotheses H1 (lower MSE than without the loss), H2 (less random routing), H3 (lower
  MSE than LoRA), counted over the four rank-1 cells.
- n16: 16 experts of rank 2, top-2 (the same 4,096 adapter weights), in c8's four rank-1 cells, plus two arms: the
  project's reading at a fixed weight (moe_fixed) and Switch's top-1 (moe_switch1, descriptive). Hypotheses H1, H3
  and the mechanism (causal relevance up and CKA between experts down, in the same cell).

The arms are tuned on seeds 1001-1003 (never reported), then run at their tuned settings on seeds 1-12, paired
by seed (n16's moe_fixed is not tuned: it takes moe_cl0's tuned lr). One JSON file per run: a stopped trial starts
again where it was, and a finished one reruns nothing. Every run prints the command that repeats it alone.
"""
import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # controlled.py sits beside this file

from controlled import (Setup, batches, cpu_name, floor_single, make_task, mean_std, paired_difference,  # noqa: E402
                        sample, train)

# trial arm -> (controlled.VARIANTS entry, Setup fields that differ from the cell's)
ARMS = {"lora": ("lora", {}), "moe_cl0": ("moelora_cl0", {}), "moe_frozen": ("moelora_cl0_frozen_router", {}),
        "moe_supcon": ("moelora", {}), "moe_sametoken": ("moelora_sametoken", {}),
        "moe_fixed": ("moelora", {}),  # the project's reading, not tuned: Design.fixed sets its weight and tau
        # Switch Transformer's top-1: its gate is the chosen expert's share of the softmax over all N, so the task
        # trains the router (Mixtral's gate at k = 1 is always 1, and moelora.py refuses it)
        "moe_switch1": ("moelora_cl0", {"top_k": 1, "gate": "switch"})}
READINGS = {"moe_supcon": "SupCon across tokens (the project's)", "moe_sametoken": "same token (CoMoE's)"}  # tuned
LABELS = dict(READINGS, moe_fixed="SupCon across tokens at w 0.1, tau 0.5 (the project's, fixed)")
TUNING_SEEDS, REPORTED_SEEDS = (1001, 1002, 1003), tuple(range(1, 13))


@dataclass(frozen=True)
class Design:
    name: str
    trial_dir: str  # default results folder
    experts: int  # N; LoRA gets rank N * r
    r: int  # rank per expert
    cells: tuple  # (teacher rank, separation, balance weight) of each cell
    quick_cells: tuple
    arms: tuple  # in the report's order
    grid: dict  # {"lr", "weight", "tau"}: what the tuned arms try
    quick_grid: dict
    fixed: dict  # arm -> (weight, tau): not tuned, run on the reported seeds at moe_cl0's tuned lr
    figure_title: str  # of --figure's forest plot
    extra: tuple = ()  # (arm, weight, tau): more runs on the reported seeds at moe_cl0's tuned lr (exploratory)


DESIGNS = {
    "c8": Design("c8", "out/trial_synthetic", experts=8, r=4,
                 cells=tuple((rank, sep, bal) for rank in (1, 4) for sep in (2.0, 3.0) for bal in (0.0, 0.01)),
                 quick_cells=((1, 3.0, 0.0), (4, 3.0, 0.0)),
                 arms=("lora", "moe_cl0", "moe_frozen", "moe_supcon", "moe_sametoken"),
                 grid={"lr": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "weight": (0.001, 0.01, 0.1, 1.0), "tau": (0.1, 0.5)},
                 quick_grid={"lr": (1e-2, 3e-2), "weight": (0.01, 0.1), "tau": (0.1,)},
                 fixed={}, figure_title="the contrastive loss at its tuned weight, per cell of the synthetic trial",
                 # added after the protocol's runs: the default weight before the trial (0.1, tau 0.1)
                 extra=(("moe_supcon", 0.1, 0.1),)),
    "n16": Design("n16", "out/trial_n16", experts=16, r=2,
                  cells=tuple((1, sep, bal) for sep in (2.0, 3.0) for bal in (0.0, 0.01)),
                  quick_cells=((1, 3.0, 0.0), (1, 2.0, 0.01)),
                  arms=("lora", "moe_cl0", "moe_frozen", "moe_supcon", "moe_sametoken", "moe_fixed", "moe_switch1"),
                  grid={"lr": (3e-3, 1e-2, 3e-2), "weight": (0.01, 0.1, 1.0), "tau": (0.5,)},
                  quick_grid={"lr": (1e-2, 3e-2), "weight": (0.1,), "tau": (0.5,)},
                  fixed={"moe_fixed": (0.1, 0.5)},
                  figure_title="the contrastive loss against none, per cell: 16 experts of rank 2, top-2"),
}


# -----------------------------------------------------------------------------------------------------
# cells, arms and runs

def cell_name(rank: int, sep: float, bal: float) -> str:
    return f"rank{rank}_sep{sep:g}_bal{bal:g}"


def trial_cells(design: Design, quick: bool):
    """{cell name: (teacher rank, separation, balance weight)}."""
    return {cell_name(*levels): levels for levels in (design.quick_cells if quick else design.cells)}


def cell_setup(design: Design, cell: str, quick: bool) -> Setup:
    rank, sep, bal = trial_cells(design, False)[cell]
    s = Setup(clusters=8, experts=design.experts, r=design.r, top_k=2, teacher_rank=rank, teacher_aligned=rank == 1,
              sep=sep, balance_weight=bal)  # rank 1 reads x along its centre: one cluster's outputs point one way
    return replace(s, steps=40, n_eval=512, eval_every=20) if quick else s


def arm_setup(design: Design, cell: str, arm: str, setting, quick: bool):
    """(Setup, controlled.VARIANTS entry) of one arm at one (lr, weight, tau)."""
    _, w, tau = setting
    variant, fields = ARMS[arm]
    return replace(cell_setup(design, cell, quick), contrastive_weight=w, temperature=tau, **fields), variant


def arm_settings(arm: str, grid: dict):
    """Every (lr, weight, tau) the grid tries for an arm; arms without the contrastive loss tune the lr only."""
    if arm in READINGS:
        return [(lr, w, tau) for lr in grid["lr"] for w in grid["weight"] for tau in grid["tau"]]
    return [(lr, 0.0, 0.1) for lr in grid["lr"]]


def at_cl0_lr(picked_cell, weight: float, tau: float):
    """A setting that is not tuned: moe_cl0's tuned lr in the cell, with this weight and temperature."""
    return (picked_cell["moe_cl0"]["setting"][0], weight, tau)


def reported_settings(design: Design, picked_cell):
    """{arm: (lr, weight, tau)} of every arm on the reported seeds in one cell."""
    return {arm: at_cl0_lr(picked_cell, *design.fixed[arm]) if arm in design.fixed else picked_cell[arm]["setting"]
            for arm in design.arms}


def run_file(out_dir: Path, cell: str, arm: str, setting, seed: int) -> Path:
    lr, w, tau = setting
    return out_dir / cell / f"{arm}_lr{lr:g}_w{w:g}_tau{tau:g}_s{seed}.json"


def run_command(design: Design, cell: str, arm: str, setting, seed: int, quick: bool) -> str:
    lr, w, tau = setting
    return (f"python tutorial/trial.py --design {design.name} --cell {cell} --arm {arm} --lr {lr:g} --weight {w:g} "
            f"--tau {tau:g} --seed {seed}" + (" --quick" if quick else ""))


_TASKS = {}  # (design, cell, seed, quick) -> (task, training batches, held-out set), kept for the runs of one job


def trial_run(design: Design, cell: str, arm: str, setting, seed: int, quick: bool, measures: bool) -> dict:
    """One run of the trial; a dict that JSON can hold."""
    s, variant = arm_setup(design, cell, arm, setting, quick)
    key = (design.name, cell, seed, quick)
    if key not in _TASKS:
        _TASKS.clear()
        task = make_task(s, seed)
        _TASKS[key] = (task, batches(task, s.steps, s.batch, seed),
                       sample(task, s.n_eval, torch.Generator().manual_seed(20_000 + seed)))
    task, data, eval_data = _TASKS[key]
    r = train(task, s, variant, seed, setting[0], data, eval_data, measures=measures)
    out = {"cell": cell, "arm": arm, "lr": setting[0], "weight": setting[1], "tau": setting[2], "seed": seed,
           "final": r["final"], "steps": r["hist"]["step"], "mse": r["hist"]["mse"], "grad_ratio": r["hist"]["grad_ratio"]}
    if "measures" in r:
        out["measures"] = r["measures"]
    return out


def trial_job(job):
    """Run the runs of one (cell, seed) that have no result file yet; returns (command, final MSE) per run.
    job: (design name, results folder, cell, seed, [(arm, setting)], quick, measures)."""
    name, out_dir, cell, seed, runs, quick, measures = job
    design = DESIGNS[name]
    torch.set_num_threads(1)
    done = []
    for arm, setting in runs:
        path = run_file(out_dir, cell, arm, setting, seed)
        if path.exists():  # done before, or earlier in this job (an extra run can repeat a tuned one)
            continue
        result = trial_run(design, cell, arm, setting, seed, quick, measures)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)  # a stopped trial never leaves half a result: start it again to go on
        done.append((run_command(design, cell, arm, setting, seed, quick), result["final"]))
    return done


def run_jobs(jobs, n_workers: int):
    todo = [j for j in jobs if any(not run_file(j[1], j[2], arm, st, j[3]).exists() for arm, st in j[4])]
    if not todo:
        return
    with multiprocessing.get_context("fork").Pool(n_workers) as pool:
        for done in pool.imap_unordered(trial_job, todo):
            for command, final in done:
                print(f"{command}  # final relative MSE {final:.4f}", flush=True)


def load_runs(out_dir: Path, cell: str, arm: str, setting, seeds):
    return [json.loads(run_file(out_dir, cell, arm, setting, seed).read_text()) for seed in seeds]


def tune(out_dir: Path, cells, arms, grid, seeds):
    """{cell: {arm: {"setting": the best (lr, weight, tau), "tuning": {setting: mean final MSE over seeds}}}}."""
    picked = {}
    for cell in cells:
        picked[cell] = {}
        for arm in arms:
            scores = {st: sum(r["final"] for r in load_runs(out_dir, cell, arm, st, seeds)) / len(seeds)
                      for st in arm_settings(arm, grid)}
            picked[cell][arm] = {"setting": min(scores, key=scores.get), "tuning": scores}
    return picked


# -----------------------------------------------------------------------------------------------------
# the decision rules, as pre-registered

def verdicts_c8(diffs, cells):
    """c8's rules. diffs[(cell, name)] = paired_difference(...); names as in report_c8.
    Returns {reading: {"H1": ..., "H2": ..., "H3": ...}}, counting the rank-1 cells (where the loss can help)."""
    rank1 = [c for c in cells if c.startswith("rank1_")]
    count = lambda name, verdict: sum(diffs[(c, name)][3] == verdict for c in rank1)
    out = {}
    for arm in READINGS:
        verdict = {}
        for h, name in (("H1", f"{arm} - moe_cl0"), ("H3", f"{arm} - lora")):
            verdict[h] = ("supported" if count(name, "better") >= 2 else "contradicted" if count(name, "worse") >= 2
                          else "not supported") + f" (better in {count(name, 'better')}, worse in {count(name, 'worse')}"\
                                                  f" of {len(rank1)} rank-1 cells)"
        # H2: a higher NMI and a higher causal relevance are less random routing; "worse" there means higher
        up_nmi, up_rel = count(f"{arm} - moe_cl0: nmi", "worse"), count(f"{arm} - moe_cl0: relevance", "worse")
        need = min(2, len(rank1))
        verdict["H2"] = ("supported" if up_nmi >= need and up_rel >= need else "partly" if up_nmi >= need or
                         up_rel >= need else "not supported") + \
            f" (NMI higher in {up_nmi}, causal relevance higher in {up_rel} of {len(rank1)} rank-1 cells)"
        out[arm] = verdict
    return out


MECHANISM_ARMS = ("moe_fixed", "moe_supcon", "moe_sametoken")  # moe_fixed first: the mechanism's primary arm


def verdicts_n16(diffs, cells):
    """n16's rules, over its (rank-1) cells. diffs[(cell, name)] = paired_difference(...); names as in report_n16.
    Returns {arm: {"H1": ..., "mechanism": ..., "H3": ...}} (no H3 for moe_fixed)."""
    def h1_h3(name):  # on the final MSE, lower is better
        better = sum(diffs[(c, name)][3] == "better" for c in cells)
        worse = sum(diffs[(c, name)][3] == "worse" for c in cells)
        return ("supported" if better >= 2 else "contradicted" if worse >= 2 else "not supported") + \
            f" (better in {better}, worse in {worse} of {len(cells)} cells)"

    out = {}
    for arm in MECHANISM_ARMS:
        # the mechanism: routers that matter more (interval of the relevance difference above 0, "worse" for a
        # loss) AND experts less alike (CKA interval below 0), both in the same cell
        higher = [diffs[(c, f"{arm} - moe_cl0: relevance")][3] == "worse" for c in cells]
        lower = [diffs[(c, f"{arm} - moe_cl0: cka")][3] == "better" for c in cells]
        both = sum(a and b for a, b in zip(higher, lower))
        out[arm] = {"H1": h1_h3(f"{arm} - moe_cl0"),
                    "mechanism": ("supported" if both >= 2 else "not supported") + f" (both in {both} of {len(cells)} "
                                 f"cells; causal relevance higher in {sum(higher)}, CKA lower in {sum(lower)})"}
        if arm in READINGS:
            out[arm]["H3"] = h1_h3(f"{arm} - lora")
    return out


def consequence_n16(verdicts):
    """What n16's verdicts mean for the default contrastive weight, as its protocol decided before the runs. Only
    the project's reading, tuned (moe_supcon) or fixed (moe_fixed), can move the default."""
    project = lambda h, verdict: any(verdicts[arm][h].startswith(verdict) for arm in ("moe_supcon", "moe_fixed"))
    if project("H1", "supported"):
        return "rerun the language-model tier with 16 x rank 2 before any default changes"
    if project("mechanism", "supported"):
        text = ("the default weight stays 0; the docs say what the loss does (less redundant experts, more relevant "
                "routers) and that it buys no loss")
    else:
        text = "the readings are closed here: the default stays 0"
    if project("H1", "contradicted"):
        text += "; the docs say that the loss costs loss at 16 experts too"
    return text


# -----------------------------------------------------------------------------------------------------
# reports

def fmt_diff(d, digits=3):
    mean, lo, hi, verdict = d
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {verdict}"


def higher_lower(d):
    """fmt_diff for a measure where higher is not worse: the interval's side, said as higher or lower."""
    return fmt_diff(d).replace("better", "lower").replace("worse", "higher")


def table_tuned(picked, cells, arms):
    lines = ["### Tuned settings (mean final relative MSE on the tuning seeds)", "",
             "| cell | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
    for c in cells:
        cells_txt = []
        for arm in arms:
            (lr, w, tau), score = picked[c][arm]["setting"], min(picked[c][arm]["tuning"].values())
            cells_txt.append(f"lr {lr:g}" + (f", w {w:g}, tau {tau:g}" if arm in READINGS else "") + f": {score:.3f}")
        lines.append(f"| {c} | " + " | ".join(cells_txt) + " |")
    return lines


def table_final(design: Design, final, cells, seeds, quick: bool):
    rank = design.experts * design.r
    lines = [f"### Final relative MSE on the reported seeds {list(seeds)} (mean ± sd; base = 1)", "",
             f"| cell | floor: one rank-{rank} update | " + " | ".join(design.arms) + " |",
             "| --- | ---: |" + " ---: |" * len(design.arms)]
    for c in cells:
        floor = mean_std([floor_single(make_task(cell_setup(design, c, quick), seed), rank) for seed in seeds])
        lines.append(f"| {c} | {floor} | " + " | ".join(mean_std(final(c, arm)) for arm in design.arms) + " |")
    return lines


def table_diffs(diffs, cells, comparisons):
    lines = ["### Paired differences of the final relative MSE: mean [95% t-interval], verdict (better = lower)", "",
             "| cell | " + " | ".join(f"{a} - {b}" for a, b in comparisons) + " |", "| --- |" + " --- |" * len(comparisons)]
    for c in cells:
        lines.append(f"| {c} | " + " | ".join(fmt_diff(diffs[(c, f'{a} - {b}')]) for a, b in comparisons) + " |")
    return lines


def rows_measures(runs, cells, arms):
    """The measures table's rows: (a)-(e) trained / with the router put back to step 0, mean over seeds."""
    avg = lambda v: sum(v) / len(v)
    lines = []
    for c in cells:
        for arm in arms:
            measure = lambda key: [r["measures"][key] for r in runs[(c, arm)]]
            pair = lambda key: f"{avg(measure(key)):.3f} / {avg(measure(key + '_init')):.3f}"
            ratios = [sum(r["grad_ratio"]) / len(r["grad_ratio"]) for r in runs[(c, arm)] if r["grad_ratio"]]
            lines.append(f"| {c} | {arm} | {pair('relevance')} | {pair('nmi')} | "
                         f"{avg(measure('consistent_ckpt')):.3f} | {pair('gap')} | {pair('entropy')} | "
                         f"{avg(measure('cka')):.3f} | " + (f"{avg(ratios):.3g}" if ratios else "") + " |")
    return lines


def best_weight_and_tau(picked, reading: str, grid):
    """w* and tau* of a reading, as c8's protocol defines them: for each weight, its best tuning MSE (over lr and
    tau) divided by moe_cl0's tuned MSE in the same cell, averaged over the cells; tau* the same way at w*."""
    def mean_ratio(keep):
        ratios = [min(v for st, v in p[reading]["tuning"].items() if keep(st)) / min(p["moe_cl0"]["tuning"].values())
                  for p in picked.values()]
        return sum(ratios) / len(ratios)
    by_weight = {w: mean_ratio(lambda st, w=w: st[1] == w) for w in grid["weight"]}
    w_star = min(by_weight, key=by_weight.get)
    by_tau = {t: mean_ratio(lambda st, t=t: st[1] == w_star and st[2] == t) for t in grid["tau"]}
    return w_star, min(by_tau, key=by_tau.get), by_weight, by_tau


def report_c8(design: Design, out_dir: Path, cells, picked, settings, seeds, grid, quick: bool):
    """c8's tables as Markdown, and the summary with its verdicts."""
    runs = {(c, arm): load_runs(out_dir, c, arm, settings[c][arm], seeds) for c in cells for arm in design.arms}
    final = lambda c, arm: [r["final"] for r in runs[(c, arm)]]
    measure = lambda c, arm, key: [r["measures"][key] for r in runs[(c, arm)]]
    lines = table_tuned(picked, cells, design.arms)
    stars = {}
    for reading in READINGS:
        w_star, tau_star, by_w, by_tau = best_weight_and_tau(picked, reading, grid)
        stars[reading] = (w_star, tau_star)
        lines += ["", f"{reading}: best tuning MSE per weight over moe_cl0's, mean over cells: " +
                  ", ".join(f"w {w:g}: {v:.3f}" for w, v in by_w.items()) + f"; w* = {w_star:g}; at w*, per tau: " +
                  ", ".join(f"tau {t:g}: {v:.3f}" for t, v in by_tau.items()) + f"; tau* = {tau_star:g}"]
    lines += ["", "Each weight at its best lr and tau, as a share of moe_cl0's tuned MSE (tuning seeds; < 1: the loss "
              "helped there)", "", "| cell | " + " | ".join(f"{READINGS[a].split(' (')[0]}, w {w:g}" for a in READINGS
                                                          for w in grid["weight"]) + " |",
              "| --- |" + " ---: |" * (len(READINGS) * len(grid["weight"]))]
    for c in cells:
        cl0 = min(picked[c]["moe_cl0"]["tuning"].values())
        lines.append(f"| {c} | " + " | ".join(
            f"{min(v for st, v in picked[c][a]['tuning'].items() if st[1] == w) / cl0:.3f}"
            for a in READINGS for w in grid["weight"]) + " |")
    lines += [""] + table_final(design, final, cells, seeds, quick)
    comparisons = [("moe_supcon", "moe_cl0"), ("moe_sametoken", "moe_cl0"), ("moe_supcon", "lora"),
                   ("moe_sametoken", "lora"), ("moe_cl0", "lora")]
    diffs = {}
    for c in cells:
        for a, b in comparisons:
            diffs[(c, f"{a} - {b}")] = paired_difference(final(c, a), final(c, b))
        for arm in READINGS:
            for key in ("nmi", "relevance"):
                diffs[(c, f"{arm} - moe_cl0: {key}")] = paired_difference(measure(c, arm, key), measure(c, "moe_cl0", key))
    lines += [""] + table_diffs(diffs, cells, comparisons)
    lines += ["", "### Random routing: measures (a)-(e), trained / with the router put back to step 0 (mean over seeds)", "",
              "(a) held-out MSE rise when the router is swapped for a random one of the same norm; (b) NMI(top-1; "
              "cluster); (c) top-2 set unchanged between the last two checkpoints; (d) gap between the 2nd and 3rd "
              "logit, and gate entropy (nats, uniform 2.08); (e) mean linear CKA between experts' outputs; "
              "|grad contrastive| / |grad task|, mean over checkpoints.", "",
              "| cell | arm | (a) relevance | (b) NMI | (c) same top-2 | (d) gap | (d) entropy | (e) CKA | grad ratio |",
              "| --- | --- |" + " ---: |" * 7]
    lines += rows_measures(runs, cells, ("moe_cl0", "moe_supcon", "moe_sametoken", "moe_frozen"))
    lines += ["", "### H2: paired differences from moe_cl0 of (b) NMI and (a) causal relevance (higher = less random)", "",
              "| cell | " + " | ".join(f"{arm}: {key}" for arm in READINGS for key in ("nmi", "relevance")) + " |",
              "| --- |" + " --- |" * 4]
    for c in cells:
        lines.append(f"| {c} | " + " | ".join(higher_lower(diffs[(c, f'{arm} - moe_cl0: {key}')])
                                             for arm in READINGS for key in ("nmi", "relevance")) + " |")
    verdicts = verdicts_c8(diffs, cells)
    lines += ["", "### Exploratory (not in the protocol): the defaults before the trial, weight 0.1 and tau 0.1, "
              "at moe_cl0's tuned lr", "",
              "Clusters per expert: how many clusters make up at least 10% of the inputs that select an expert "
              "(mean over experts; 1 = one cluster each).", "",
              "| cell | MSE: w 0.1 - moe_cl0 | NMI: w 0.1 - moe_cl0 | clusters per expert, moe_cl0 / w 0.1 | "
              "(e) CKA, moe_cl0 / w 0.1 |", "| --- | --- | --- | ---: | ---: |"]
    avg = lambda v: sum(v) / len(v)
    (arm, w, tau), = design.extra
    for c in cells:
        old = load_runs(out_dir, c, arm, at_cl0_lr(picked[c], w, tau), seeds)
        per = lambda rs, key: avg([r["measures"][key] for r in rs])
        nmi_diff = higher_lower(paired_difference([r["measures"]["nmi"] for r in old], measure(c, "moe_cl0", "nmi")))
        lines.append(f"| {c} | {fmt_diff(paired_difference([r['final'] for r in old], final(c, 'moe_cl0')))} | "
                     + nmi_diff + " | "
                     f"{per(runs[(c, 'moe_cl0')], 'clusters_per_expert'):.2f} / {per(old, 'clusters_per_expert'):.2f} | "
                     f"{per(runs[(c, 'moe_cl0')], 'cka'):.3f} / {per(old, 'cka'):.3f} |")
    lines += ["", "### Verdicts (the protocol's decision rules)", ""]
    for arm, v in verdicts.items():
        lines += [f"- {READINGS[arm]}: " + "; ".join(f"{h} {v[h]}" for h in ("H1", "H2", "H3"))]
    return "\n".join(lines), {"picked": {c: {a: p["setting"] for a, p in v.items()} for c, v in picked.items()},
                              "stars": stars, "verdicts": verdicts,
                              "diffs": {f"{c} | {n}": d for (c, n), d in diffs.items()}}


N16_COMPARISONS = [("moe_supcon", "moe_cl0"), ("moe_sametoken", "moe_cl0"), ("moe_fixed", "moe_cl0"),
                   ("moe_supcon", "lora"), ("moe_sametoken", "lora"), ("moe_cl0", "lora"), ("moe_switch1", "moe_cl0")]


def report_n16(design: Design, out_dir: Path, cells, picked, settings, seeds, grid, quick: bool):
    """n16's tables as Markdown, and the summary with its verdicts and what they mean for the defaults."""
    runs = {(c, arm): load_runs(out_dir, c, arm, settings[c][arm], seeds) for c in cells for arm in design.arms}
    final = lambda c, arm: [r["final"] for r in runs[(c, arm)]]
    measure = lambda c, arm, key: [r["measures"][key] for r in runs[(c, arm)]]
    lines = table_tuned(picked, cells, [a for a in design.arms if a not in design.fixed])
    lines += ["", "Not tuned: " + "; ".join(f"{arm} at weight {w:g}, tau {tau:g} and moe_cl0's tuned lr"
                                          for arm, (w, tau) in design.fixed.items()) + ". moe_switch1: top-1 with "
              "Switch's gate, no contrastive loss; descriptive, no verdict."]
    lines += [""] + table_final(design, final, cells, seeds, quick)
    diffs = {}
    for c in cells:
        for a, b in N16_COMPARISONS:
            diffs[(c, f"{a} - {b}")] = paired_difference(final(c, a), final(c, b))
        for arm in MECHANISM_ARMS:
            for key in ("relevance", "cka"):
                diffs[(c, f"{arm} - moe_cl0: {key}")] = paired_difference(measure(c, arm, key), measure(c, "moe_cl0", key))
    lines += [""] + table_diffs(diffs, cells, N16_COMPARISONS)
    lines += ["", "### Mechanism: paired differences from moe_cl0 of (a) causal relevance (higher = the router "
              "matters more) and (e) CKA between experts (lower = less redundant)", "",
              "| cell | " + " | ".join(f"{arm}: {key}" for arm in MECHANISM_ARMS for key in ("relevance", "cka")) + " |",
              "| --- |" + " --- |" * (2 * len(MECHANISM_ARMS))]
    for c in cells:
        lines.append(f"| {c} | " + " | ".join(higher_lower(diffs[(c, f'{arm} - moe_cl0: {key}')])
                                             for arm in MECHANISM_ARMS for key in ("relevance", "cka")) + " |")
    lines += ["", "### Measures (a)-(e), trained / with the router put back to step 0 (mean over seeds)", "",
              "(a) held-out MSE rise when the router is swapped for a random one of the same norm; (b) NMI(top-1; "
              "cluster); (c) top-k set unchanged between the last two checkpoints; (d) gap between the k-th and "
              "(k+1)-th logit, and gate entropy (nats, uniform ln 16 = 2.77); (e) mean linear CKA between experts' "
              "outputs; |grad contrastive| / |grad task|, mean over checkpoints. k = 2, but 1 for moe_switch1.", "",
              "| cell | arm | (a) relevance | (b) NMI | (c) same top-k | (d) gap | (d) entropy | (e) CKA | grad ratio |",
              "| --- | --- |" + " ---: |" * 7]
    lines += rows_measures(runs, cells, ("moe_cl0", "moe_supcon", "moe_sametoken", "moe_fixed", "moe_frozen",
                                         "moe_switch1"))
    verdicts = verdicts_n16(diffs, cells)
    consequence = consequence_n16(verdicts)
    lines += ["", "### Verdicts (the protocol's decision rules)", ""]
    for arm in READINGS:
        v = verdicts[arm]
        lines += [f"- {READINGS[arm]}: H1 {v['H1']}; mechanism {v['mechanism']}; H3 {v['H3']}"]
    v = verdicts["moe_fixed"]
    lines += [f"- {LABELS['moe_fixed']}: mechanism (primary) {v['mechanism']}; H1 (secondary) {v['H1']}",
              "", f"For the defaults: {consequence}."]
    summary = {"picked": {c: dict(settings[c]) for c in cells},
               "tuning": {c: {a: {f"lr {st[0]:g}, w {st[1]:g}, tau {st[2]:g}": v for st, v in p["tuning"].items()}
                              for a, p in picked[c].items()} for c in cells},
               "verdicts": verdicts, "consequence": consequence,
               "diffs": {f"{c} | {n}": d for (c, n), d in diffs.items()}}
    return "\n".join(lines), summary


REPORTS = {"c8": report_c8, "n16": report_n16}


def plot_trial(summary, cells, path, arms, title):
    """A forest plot: the paired difference from moe_cl0 of each arm, per cell, with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"moe_supcon": "tab:red", "moe_sametoken": "tab:purple", "moe_fixed": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(cells) * max(1, len(arms) / 2) + 1.2))
    for k, arm in enumerate(arms):
        for i, c in enumerate(cells):
            mean, lo, hi, _ = summary["diffs"][f"{c} | {arm} - moe_cl0"]
            y = i + 0.3 * (k / max(1, len(arms) - 1) - 0.5)  # the arms side by side around the cell's line
            ax.plot([lo, hi], [y, y], color=colors[arm], lw=2)
            ax.plot([mean], [y], "o", color=colors[arm], label=LABELS[arm] if i == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(cells)), cells, fontsize=8)
    ax.set_xlabel("final relative MSE: with the loss minus without\n(paired over seeds, 95% interval; < 0: the loss helps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------

def trial_main(args):
    """Tune on the tuning seeds, run the reported seeds at each arm's tuned setting, print the report."""
    design, quick = DESIGNS[args.design], args.quick
    out_dir = Path(args.trial_dir or design.trial_dir)
    cells = list(trial_cells(design, quick))
    grid = design.quick_grid if quick else design.grid
    tuning_seeds = TUNING_SEEDS[:1] if quick else TUNING_SEEDS
    seeds = REPORTED_SEEDS[:2] if quick else REPORTED_SEEDS
    if args.cell:  # one run, as its printed command asked
        if args.cell not in trial_cells(design, False) or args.arm not in design.arms:
            raise SystemExit(f"error: design {design.name} has the cells {', '.join(trial_cells(design, False))} "
                             f"and the arms {', '.join(design.arms)}")
        setting = (args.lr, args.weight, args.tau)
        print(json.dumps(trial_run(design, args.cell, args.arm, setting, args.seed, quick, args.seed in REPORTED_SEEDS)))
        return None
    start = time.time()
    tuned = [arm for arm in design.arms if arm not in design.fixed]
    run_jobs([(design.name, out_dir, c, seed, [(arm, st) for arm in tuned for st in arm_settings(arm, grid)], quick,
               False) for c in cells for seed in tuning_seeds], args.jobs)
    picked = tune(out_dir, cells, tuned, grid, tuning_seeds)
    settings = {c: reported_settings(design, picked[c]) for c in cells}
    extra = {c: [(arm, at_cl0_lr(picked[c], w, tau)) for arm, w, tau in design.extra] for c in cells}
    run_jobs([(design.name, out_dir, c, seed, list(settings[c].items()) + extra[c], quick, True)
              for c in cells for seed in seeds], args.jobs)
    text, summary = REPORTS[design.name](design, out_dir, cells, picked, settings, seeds, grid, quick)
    command = f"python tutorial/trial.py --design {design.name}" + (" --quick" if quick else "")
    header = (f"`{command}` (results in {out_dir}; wall time of this call {time.time() - start:.0f} s)\n\nmachine: "
              f"{cpu_name()}, {args.jobs} job(s) of 1 thread, python {platform.python_version()}, torch {torch.__version__}\n")
    text = header + "\n" + text
    print(text)
    (out_dir / "report.md").write_text(text + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.figure:
        arms = [a for a in ("moe_supcon", "moe_sametoken", "moe_fixed") if a in design.arms]
        plot_trial(summary, cells, args.figure, arms, design.figure_title)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", required=True, choices=list(DESIGNS), help="c8: the first trial; n16: the second")
    p.add_argument("--quick", action="store_true", help="reduced: 2 cells, 1 tuning seed, 2 reported seeds, 40 steps")
    p.add_argument("--trial_dir", default=None, help="one JSON file per run: a rerun skips those (default "
                   + ", ".join(f"{d.name}: {d.trial_dir}" for d in DESIGNS.values()) + ")")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--figure", default=None, help="a forest plot of the differences from moe_cl0 into this PNG")
    p.add_argument("--cell", default=None, help="with --arm, --lr, --weight, --tau, --seed: one run of the trial")
    p.add_argument("--arm", choices=list(ARMS), default="moe_supcon")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight", type=float, default=0.0)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    return trial_main(p.parse_args(argv))


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation
    main()
