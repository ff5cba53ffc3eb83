"""
What a run trains on: its task's training examples (a benchmark's train split, a family's mixture, or --train_file),
the slice that --eval_interval holds out for the validation loss, and the examples tokenised, source by source.
train.py calls these with its settings (args) and its log; a problem is one line naming the flag and the fix.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from .mixtures import format_mixture_report, load_mixture, overlaps
from .prompts import tokenize_dataset
from .tasks import FAMILIES, DataError, load_split


@dataclass
class TrainSet:
    pairs: list  # (tokens, labels) per example
    sources: list  # the index in names of each example's source
    names: list  # the sources: one task, a training file, or the tasks of a family's mixture


def load_training_examples(args, log, data_dir, tests: dict) -> list:
    """The training examples, each with a "source". A family trains on --train_file or on the mixture of the
    train splits it has, without the questions that any of its benchmarks asks (tests: those benchmarks' whole test
    sets); a task's examples are kept whole, with a WARNING when they share questions with the graded benchmarks."""
    try:
        if args.task in FAMILIES:
            examples, report = load_mixture(args.task, data_dir, args.train_file, test_sets=tests)
            for line in format_mixture_report(report):
                log(line)
            return examples
        examples = load_split(args.task, "train", data_dir, args.train_file)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    source = Path(args.train_file).stem if args.train_file else args.task
    shared = {task: len(idx) for task, idx in overlaps(examples, tests).items() if idx}
    if shared:
        log("WARNING: the training examples share questions with the graded benchmarks: " + ", ".join(
            f"{n} with {task} (of its {len(tests[task])})" for task, n in shared.items())
            + ". A model trained on them is graded on questions it has seen.")
    return [dict(ex, source=source) for ex in examples]


def hold_out(args, log, examples: list) -> tuple:
    """(training examples, validation examples): with --eval_interval, --val_examples of them are held out of training.
    The same ones for every --seed (a fixed draw), so that runs of different seeds are checked on the same slice."""
    if not args.eval_interval:
        return examples, []
    if args.val_examples >= len(examples):
        raise SystemExit(f"error: --val_examples {args.val_examples} leaves no training example of {len(examples)}: "
                         "give fewer")
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:args.val_examples].tolist())
    log(f"--eval_interval {args.eval_interval}: {len(held)} of the {len(examples)} training examples held out of "
        "training, for the validation loss")
    return [ex for i, ex in enumerate(examples) if i not in held], [ex for i, ex in enumerate(examples) if i in held]


def tokenize_train_set(args, log, tok, examples, max_seq_len: int) -> TrainSet:
    """The examples as (tokens, labels) pairs of at most max_seq_len, source by source; at least one batch of them."""
    names = list(dict.fromkeys(ex["source"] for ex in examples))  # in order of appearance
    pairs, sources, n_trunc, n_drop = [], [], 0, 0
    for s, name in enumerate(names):
        p, t, d = tokenize_dataset(tok, [ex for ex in examples if ex["source"] == name], max_seq_len, args.prompt_format)
        pairs += p
        sources += [s] * len(p)
        n_trunc, n_drop = n_trunc + t, n_drop + d
    limit = f" (the model's limit; --max_seq_len is {args.max_seq_len})" if max_seq_len < args.max_seq_len else ""
    log(f"{len(examples)} training examples: {n_trunc} truncated to {max_seq_len} tokens{limit}, "
        f"{n_drop} dropped (prompt alone over the cutoff)")
    if len(names) > 1:
        log("sources, shuffled together (each epoch visits every example once): " + ", ".join(
            f"{name} {sources.count(s):,} ({sources.count(s) / len(pairs):.1%})" for s, name in enumerate(names)))
    if not pairs:
        raise SystemExit("error: no training example is left after tokenization")
    if len(pairs) < args.batch_size:
        raise SystemExit(f"error: {len(pairs)} training examples is fewer than one batch of {args.batch_size}")
    return TrainSet(pairs, sources, names)
