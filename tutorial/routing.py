"""
Which kinds of tokens go to which expert: the routing of a trained MoELoRA run, measured on GSM8K test text.

    python tutorial/routing.py out/tutorial/moelora_s1 out/tutorial/moelora_cl0_s1 [...] [--n 100]

For each run: open it with its base (runs.load_run: adapters and routers), run the model (eval mode, no
dropout) over the prompt + reference solution of the first --n GSM8K test examples, and take each token's
top-1 expert (the largest router logit) in every adapted layer. Each token gets a kind from its SentencePiece
piece: digit, operator (+ - * / = $ % ...), word, space/punct, newline (BOS is left out). Printed per run:
    - per layer: H(expert) (how evenly the experts are used), I(kind; expert) (how much the expert tells
      about the token kind, in bits; 0 = the router ignores the kind), and the same normalised by H(kind)
    - the same for the routers as the run drew them at step 0 (B = 0): a control. Hidden states already
      differ by token kind, so even a random router carries information about the kind; what training
      adds is the difference from this control. Also: the share of tokens whose top-1 expert is still the
      one the initial router picked, and how far the router weights moved, |W - W0| / |W0|
    - the contrastive loss itself (unweighted) on these tokens: how distinct the experts' outputs are, by the
      measure that loss optimises; it acts on the outputs z = B_i A_i x, before the gates, so it sends no
      gradient to its own layer's router, and any effect on the routing is indirect (through hidden states)
    - for the layer with the largest I: the share of each kind's tokens that goes to each expert
and a JSON summary is written to <run>/routing_gsm8k.json, which tutorial/plots.py reads.

Padding: the texts run in right-padded batches, and the padded positions are cut off here by hand, because these
numbers need each real token's own expert. train.py's logged routing (metrics.jsonl) pools a micro-batch's
tokens instead; it runs under moelora_token_mask, so it too counts real tokens only. (Before the mask existed,
the logged routing and the balance and contrastive losses in training included the padding, a third of the
positions in the tutorial's runs; this script never did.)
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project is flat files at the repo root

from data.prompts import example_ids  # noqa: E402
from data.tasks import DataError, find_data_dir, load_split  # noqa: E402
from moelora import inject_moelora, moelora_config, moelora_layers  # noqa: E402
from runs import Precision, load_run, open_run  # noqa: E402

KINDS = ("digit", "operator", "word", "space/punct", "newline")


def entropy_bits(p) -> float:
    """Entropy in bits of a distribution given as probabilities or as counts."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))  # max: no "-0.00" for a certain outcome


def mutual_information_bits(counts) -> float:
    """I(row; column) in bits from a [rows, columns] table of counts, e.g. [kinds, experts] or [tasks, experts]."""
    joint = np.asarray(counts, dtype=np.float64)
    joint = joint / joint.sum()
    return entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.flatten())
OPERATORS = set("+-*/=$%<>^×÷")


def token_kind(piece: str):
    """The kind of a SentencePiece piece ("▁" marks a leading space), or None for control pieces (<s>, </s>)."""
    if piece in ("<s>", "</s>", "<unk>"):
        return None
    if piece == "<0x0A>" or "\n" in piece:
        return "newline"
    text = piece.replace("\u2581", " ").strip()
    if piece.startswith("<0x") and piece.endswith(">"):  # another byte-fallback piece: an unusual character
        return "space/punct"
    if not text:
        return "space/punct"
    if text.isdigit():
        return "digit"
    if all(c in OPERATORS for c in text):
        return "operator"
    if any(c.isalpha() for c in text):
        return "word"
    return "space/punct"


def forward_padded(model, sequences, pad_id: int, batch_size: int):
    """Run the model (eval mode, no gradients) over the sequences in right-padded batches; after each forward,
    yield the batch's sequence lengths and padded length T. With causal attention, padding after a sequence
    changes nothing of it: the caller cuts the padded positions off again."""
    model.eval()
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        T = max(len(s) for s in chunk)
        tokens = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for b, s in enumerate(chunk):
            tokens[b, :len(s)] = torch.tensor(s)
        with torch.no_grad():
            model(tokens)
        yield [len(s) for s in chunk], T


def top1_experts(model, sequences, pad_id: int, batch_size: int = 16):
    """{layer name: [one int64 array per sequence: each token's top-1 expert]} for a model with MoELoRA layers."""
    layers = moelora_layers(model)
    out = {name: [] for name, _ in layers}
    for lengths, T in forward_padded(model, sequences, pad_id, batch_size):
        for name, layer in layers:
            top = layer.last_logits.argmax(-1).view(len(lengths), T)  # [B, T]: the highest gate is the largest logit
            out[name] += [top[b, :n].numpy() for b, n in enumerate(lengths)]
    return out


@torch.no_grad()
def contrastive_on_text(model, sequences, pad_id: int, draws: int = 5, batch_size: int = 16):
    """{layer: the (unweighted) contrastive loss of the layer's experts on these tokens}: how distinct the
    experts' outputs z = B_i A_i x are, by the measure the contrastive loss optimises (lower = more distinct;
    log(255) = 5.54 when all outputs are parallel or zero, as at B = 0). Mean over `draws` samplings of 256 pairs."""
    layers = moelora_layers(model)
    inputs = {name: [] for name, _ in layers}  # each layer's input x, real tokens only: [tokens, d_in] per batch
    current = {}  # the last forward's input of each layer, [B, T, d_in]
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: current.update({name: args[0]}))
             for name, layer in layers]
    try:
        for lengths, T in forward_padded(model, sequences, pad_id, batch_size):
            for name, layer in layers:
                x = current[name].reshape(len(lengths), T, -1)
                inputs[name].append(torch.cat([x[b, :n] for b, n in enumerate(lengths)]))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, layer in layers:
        x = torch.cat(inputs[name]).float()  # [M, d_in]
        N, r = layer.config.num_experts, layer.config.r
        h = x @ layer.lora_A.reshape(N * r, -1).T  # [M, N*r] every expert's code (no dropout: eval)
        _, top_idx, _ = layer.route(x)
        rng = torch.get_rng_state()
        torch.manual_seed(0)  # the same sampled pairs for every run
        out[name] = float(np.mean([layer.sampled_contrastive_loss(h, top_idx).item() for _ in range(draws)]))
        torch.set_rng_state(rng)
    return out


def kind_expert_counts(experts_per_seq, kinds_per_seq, num_experts: int):
    """[len(KINDS), num_experts] counts of (kind, top-1 expert) over all tokens that have a kind."""
    counts = np.zeros((len(KINDS), num_experts), dtype=np.int64)
    for experts, kinds in zip(experts_per_seq, kinds_per_seq):
        for e, k in zip(experts, kinds):
            if k is not None:
                counts[KINDS.index(k), e] += 1
    return counts


def summarize(counts_by_layer):
    """Per-layer specialisation numbers from {layer: [kinds, experts] counts}."""
    layers = {}
    for name, counts in counts_by_layer.items():
        h_kind = entropy_bits(counts.sum(1) / counts.sum())
        mi = mutual_information_bits(counts)
        per_kind = {k: entropy_bits(row / row.sum()) if row.sum() else None for k, row in zip(KINDS, counts)}
        layers[name] = {"counts": counts.tolist(), "expert_entropy_bits": entropy_bits(counts.sum(0) / counts.sum()),
                        "mi_bits": mi, "mi_over_h_kind": mi / h_kind if h_kind > 0 else 0.0,
                        "expert_entropy_given_kind_bits": per_kind}
    mean = {key: float(np.mean([l[key] for l in layers.values()]))
            for key in ("expert_entropy_bits", "mi_bits", "mi_over_h_kind")}
    return {"layers": layers, "mean": mean}


def run_and_its_start(run_dir: Path, base=None):
    """(model with the run's trained adapters, the same model as the run started, tokenizer, the run's settings),
    both opened by runs.load_run on the CPU in float32.

    The run's start is redrawn, not stored: train.py seeds torch with --seed (+ rank) right before inject_moelora
    and draws nothing in between, so seeding the same way here draws the run's initial routers and A exactly
    (B = 0). The check below (A's cosine with the redrawn one) shows it held."""
    settings = open_run(run_dir, need_checkpoint=True).settings
    if settings["method"] != "moelora":
        raise SystemExit(f"{run_dir}: --method {settings['method']} has no router to analyse")
    cpu = Precision("cpu", torch.float32)
    model, tok, _ = load_run(run_dir, cpu, base)
    start, _, _ = load_run(run_dir, cpu, base, adapter=False)  # the base, quantised as the run's was
    torch.manual_seed(settings["seed"])
    inject_moelora(start, moelora_config(model))
    return model, start, tok, settings


def format_table(counts):
    """Rows: token kinds; columns: experts; cells: the share (%) of that kind's tokens sent to each expert."""
    n_exp = counts.shape[1]
    lines = ["| kind (tokens) | " + " | ".join(f"e{i}" for i in range(n_exp)) + " | H(expert) bits |",
             "| --- |" + " ---: |" * (n_exp + 1)]
    for kind, row in zip(KINDS, counts):
        if row.sum() == 0:
            continue
        share = row / row.sum()
        lines.append(f"| {kind} ({row.sum()}) | " + " | ".join(f"{100 * s:.0f}" for s in share)
                     + f" | {entropy_bits(share):.2f} |")
    total = counts.sum(0) / counts.sum()
    lines.append(f"| all ({counts.sum()}) | " + " | ".join(f"{100 * s:.0f}" for s in total)
                 + f" | {entropy_bits(total):.2f} |")
    return "\n".join(lines)


def analyse(run_dir: Path, n: int, data_dir, base=None, response_only: bool = False, max_len: int = 512):
    """Routing numbers of the trained run and of its routers as they were drawn at step 0."""
    model, model0, tok, config = run_and_its_start(run_dir, base)
    try:
        examples = load_split("gsm8k", "test", find_data_dir(data_dir))[:n]
    except DataError as e:
        raise SystemExit(f"error: {e}")
    encoded = [example_ids(tok, ex) for ex in examples]  # (BOS + prompt + solution + EOS ids, n_prompt)
    sequences = [ids[:min(max_len, model.args.max_seq_len)] for ids, _ in encoded]
    # a token without a kind is not counted: BOS, EOS, and with response_only the prompt's tokens
    kinds = [[token_kind(tok.piece(i)) if t >= n_prompt or not response_only else None
              for t, i in enumerate(s)] for s, (_, n_prompt) in zip(sequences, encoded)]
    N = moelora_layers(model)[0][1].config.num_experts
    experts, experts0 = top1_experts(model, sequences, tok.pad_id), top1_experts(model0, sequences, tok.pad_id)
    summary = summarize({name: kind_expert_counts(e, kinds, N) for name, e in experts.items()})
    summary["init"] = summarize({name: kind_expert_counts(e, kinds, N) for name, e in experts0.items()})
    # how much of the routing training changed: the share of counted tokens whose top-1 expert is the one the
    # initial router picked, and how far the router weights moved
    counted = np.concatenate([[k is not None for k in ks] for ks in kinds])
    routers = dict(moelora_layers(model0))
    contrastive = contrastive_on_text(model, sequences, tok.pad_id)
    for name, layer in moelora_layers(model):
        same = np.concatenate(experts[name]) == np.concatenate(experts0[name])
        w, w0 = layer.router.weight.detach(), routers[name].router.weight.detach()
        summary["layers"][name]["same_top1_as_init"] = float(same[counted].mean())
        summary["layers"][name]["router_change"] = float((w - w0).norm() / w0.norm())
        # a check that the initial draw is the run's: A moves little in 80 steps, an unrelated draw gives ~0
        a, a0 = layer.lora_A.detach().flatten(), routers[name].lora_A.detach().flatten()
        summary["layers"][name]["A_cosine_to_init"] = float(a @ a0 / (a.norm() * a0.norm()))
        summary["layers"][name]["contrastive_loss"] = contrastive[name]
    for key in ("same_top1_as_init", "router_change", "A_cosine_to_init", "contrastive_loss"):
        summary["mean"][key] = float(np.mean([v[key] for v in summary["layers"].values()]))
    summary.update(run=str(run_dir), response_only=response_only, n_examples=len(sequences), kinds=list(KINDS),
                   contrastive_weight=config["contrastive_weight"], seed=config["seed"])
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories of train.py --method moelora (each with ckpt.pt)")
    p.add_argument("--n", type=int, default=100, help="GSM8K test examples (prompt + reference solution), default 100")
    p.add_argument("--data_dir", default=None, help="datasets root (default $MOELORA_DATA_DIR or data/cache)")
    p.add_argument("--base", default=None, help="base checkpoint, if not where the run's config says")
    p.add_argument("--response_only", action="store_true", help="count only the reference solution's tokens, not the prompt's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    what = "reference solutions only" if args.response_only else "prompt + reference solution"
    for run in args.runs:
        run_dir = Path(run)
        s = analyse(run_dir, args.n, args.data_dir, args.base, args.response_only)
        out = run_dir / f"routing_gsm8k{'_response' if args.response_only else ''}.json"
        out.write_text(json.dumps(s, indent=1))
        print(f"\n## {run_dir.name}: {s['n_examples']} GSM8K test examples ({what}), top-1 expert per token\n")
        print("| layer | H(expert) bits | I(kind; expert) bits | I / H(kind) | same top-1 as at init | "
              "router change | contrastive loss |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for layer, v in list(s["layers"].items()) + [("mean", s["mean"])]:
            print(f"| {layer} | {v['expert_entropy_bits']:.2f} | {v['mi_bits']:.3f} | {v['mi_over_h_kind']:.3f} | "
                  f"{100 * v['same_top1_as_init']:.0f}% | {v['router_change']:.2f} | {v['contrastive_loss']:.3f} |")
        best = max(s["layers"], key=lambda k: s["layers"][k]["mi_bits"])
        for label, part in (("trained", s), ("at initialisation", s["init"])):
            print(f"\nshare (%) of each kind's tokens per expert in {best}, routers {label}:\n")
            print(format_table(np.array(part["layers"][best]["counts"])))
        print(f"\ncheck: lora_A's cosine with the redrawn initial A, mean over layers, "
              f"{s['mean']['A_cosine_to_init']:.2f} (an unrelated draw: ~0)\n(saved {out})")
        rows.append((run_dir.name, s))
    print("\n## summary (means over the adapted layers; log2(8) = 3 bits is perfectly even use)\n")
    print("| run | contrastive weight | routers | H(expert) bits | I(kind; expert) bits | I / H(kind) | "
          "same top-1 as at init | contrastive loss |\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, s in rows:
        for label, m in (("trained", s["mean"]), ("at init", s["init"]["mean"])):
            same = f"{100 * m['same_top1_as_init']:.0f}%" if "same_top1_as_init" in m else ""
            cl = f"{m['contrastive_loss']:.3f}" if "contrastive_loss" in m else "5.54 (B = 0)"
            print(f"| {name} | {s['contrastive_weight']:g} | {label} | {m['expert_entropy_bits']:.2f} | "
                  f"{m['mi_bits']:.3f} | {m['mi_over_h_kind']:.3f} | {same} | {cl} |")


if __name__ == "__main__":
    main()
