"""
The training mixture of a benchmark family, and the questions it shares with the family's test sets.

The paper trains one adapter per family and grades it on every benchmark of the family (tasks.FAMILIES):
    math         trained on Math10K          graded on AddSub AQuA GSM8K MultiArith SingleEq SVAMP
    commonsense  trained on Commonsense170K  graded on BoolQ PIQA SIQA HellaSwag WinoGrande ARC-e ARC-c OBQA
A user with Math10K or Commonsense170K passes it as --train_file. Without one, the family trains on a
stand-in: the train splits that exist here (MIXTURE_SOURCES).

Why look for shared questions: these sets are not disjoint. AddSub, MultiArith and SingleEq are drawn from
MAWPS, whose train split repeats AddSub questions, and LLM-Adapters' math_data.json is mostly test questions.
A model graded on a question it was trained on is graded on its memory. So:
    the stand-in mixture drops every example that asks a test question of the family, and reports it;
    a --train_file is kept whole (it is the user's experiment), and the report counts what it shares with
    each benchmark, so that train.py can warn loudly.

Order: sources in MIXTURE_SOURCES order, examples in file order. Shuffling is train.py's job (per epoch, seeded).
"""
from pathlib import Path

from .tasks import ALL_TASKS, FAMILIES, DataError, load_eval_file, load_split, load_train_file

# Math10K and Commonsense170K are not available offline; these train splits stand in for them. They are
# smaller and narrower (no AQuA- or SVAMP-like problems, no PIQA/SIQA/HellaSwag/WinoGrande-like ones), so
# a stand-in run tests the protocol, not the paper's numbers.
MIXTURE_SOURCES = {"math": ("gsm8k", "mawps"), "commonsense": ("boolq", "arc_e", "arc_c", "obqa")}


def check_family(family: str):
    if family not in FAMILIES:
        raise DataError(f"unknown family {family!r}; the families are: {', '.join(FAMILIES)}")


# -----------------------------------------------------------------------------
# when two examples ask the same question

def normalize_question(text: str) -> str:
    """Lower case, every run of whitespace (newlines too) one space, no space at the ends."""
    return " ".join(text.lower().split())


def question_of(example: dict) -> str:
    """What is compared: the whole instruction (and the input, empty in every file here), normalised.

    For multiple choice the instruction holds the choices too ("... Answer Choices: (A) ..." in AQuA,
    "Answer1: ... Answer format: ..." in commonsense), and that is on purpose: OBQA and ARC reuse a stem
    with other choices ("Thermometers", "A desert environment is"), which is another question, not a leak.
    Comparing stems alone would flag those; comparing whole instructions reproduces the measured math
    overlaps (AQuA's included) and misses only a repeat whose choices come in another order."""
    return normalize_question(f"{example['instruction']} {example.get('input') or ''}")


def shared_questions(train_examples: list, test_examples: list) -> set:
    """The normalised questions that both lists ask (each counted once, however often it repeats)."""
    return {question_of(e) for e in train_examples} & {question_of(e) for e in test_examples}


def overlaps(train_examples: list, test_sets: dict) -> dict:
    """{test task: set of indices of the train examples that ask one of that task's test questions}."""
    questions = [question_of(e) for e in train_examples]
    found = {}
    for task, test_examples in test_sets.items():
        asked = {question_of(e) for e in test_examples}
        found[task] = {i for i, q in enumerate(questions) if q in asked}
    return found


# -----------------------------------------------------------------------------
# loading a family

def load_benchmarks(benchmarks, data_dir, limit=None) -> tuple:
    """(tests, missing): tests {task: its first `limit` test examples (all when None)} in the order given,
    missing {task: one-line reason} for each benchmark whose test file is absent and cannot be fetched.
    One missing benchmark does not stop the others: the table is graded on what is there."""
    tests, missing = {}, {}
    for task in benchmarks:
        try:
            tests[task] = load_split(task, "test", data_dir)[:limit]
        except DataError as e:
            missing[task] = str(e).splitlines()[0]
    return tests, missing


def load_test_sets(task: str, eval_tasks, eval_file, data_dir) -> tuple:
    """(tests, missing) as load_benchmarks, for what train.py grades: --eval_tasks, else the task (a benchmark that
    must be there, or a family), or --eval_file instead, named after the file (eval_tasks: "a,b,c" or None)."""
    family = FAMILIES.get(task)
    benchmarks = eval_tasks.split(",") if eval_tasks else [] if eval_file else list(family or [task])
    unknown = [b for b in benchmarks if b not in ALL_TASKS]
    if unknown:
        raise DataError(f"--eval_tasks: unknown benchmark(s) {', '.join(unknown)}; the benchmarks are: {', '.join(ALL_TASKS)}")
    if len(benchmarks) == 1 and not family:
        tests, missing = {benchmarks[0]: load_split(benchmarks[0], "test", data_dir)}, {}
    else:
        tests, missing = load_benchmarks(benchmarks, data_dir)
    if eval_file:
        if Path(eval_file).stem in tests:
            raise DataError(f"--eval_file {eval_file} has the name of a benchmark also graded: rename the file")
        tests[Path(eval_file).stem] = load_eval_file(eval_file)
    return tests, missing


def load_family_tests(family: str, data_dir, limit=None) -> tuple:
    """load_benchmarks() of the family's benchmarks, in the paper's table order."""
    check_family(family)
    return load_benchmarks(FAMILIES[family], data_dir, limit)


def overlap_counts(train_examples: list, test_examples: list) -> dict:
    """How much a training set shares with one test set, counted three ways (they differ where a question
    repeats: MultiArith asks some of its questions twice)."""
    shared = shared_questions(train_examples, test_examples)
    return {"questions": len(shared),
            "train_examples": sum(question_of(e) in shared for e in train_examples),
            "test_examples": sum(question_of(e) in shared for e in test_examples),
            "test_size": len(test_examples)}


def load_mixture(family: str, data_dir, train_file=None, test_sets=None) -> tuple:
    """(examples, report): the family's training examples, each with a "source" key, and a plain dict that
    says what was loaded, dropped and kept per source (format_mixture_report() writes it as lines).

    test_sets: {task: test examples} to compare with, as load_family_tests returns them; None loads the
    family's test sets. Pass them whole, before any --eval_limit cut: the training set must not change with
    the number of questions graded. Benchmarks absent from it are listed as "unchecked".
    Without train_file: the stand-in sources, minus every example that asks one of those test questions.
    With train_file: all of its examples, tagged with the file's stem, and their overlap in the report."""
    check_family(family)
    if test_sets is None:
        test_sets, _ = load_family_tests(family, data_dir)
    report = {"family": family, "sources": {}, "train_file_overlap": None,
              "unchecked": [task for task in FAMILIES[family] if task not in test_sets]}
    if train_file:
        name = Path(train_file).stem
        examples = [dict(e, source=name) for e in load_train_file(train_file)]
        report["sources"][name] = {"loaded": len(examples), "kept": len(examples), "dropped": {}, "questions": {}}
        report["train_file_overlap"] = {"file": Path(train_file).name, "benchmarks": {
            task: overlap_counts(examples, test_examples) for task, test_examples in test_sets.items()}}
        return examples, report
    pooled = []
    for source in MIXTURE_SOURCES[family]:
        examples = load_split(source, "train", data_dir)
        found = overlaps(examples, test_sets)
        dropped = set().union(*found.values())
        kept = [dict(e, source=source) for i, e in enumerate(examples) if i not in dropped]
        report["sources"][source] = {
            "loaded": len(examples), "kept": len(kept),
            "dropped": {task: len(indices) for task, indices in found.items()},  # examples (a question may repeat)
            "questions": {task: len(shared_questions(examples, test_sets[task])) for task in found}}
        pooled += kept
    return pooled, report


def format_mixture_report(report: dict) -> list:
    """The lines train.py prints (and logs) about the mixture: what each source kept, what it dropped and
    why, a WARNING when a --train_file asks test questions, and the benchmarks nothing was compared with."""
    parts = []
    for source, counts in report["sources"].items():
        part = f"{source} {counts['kept']:,} kept of {counts['loaded']:,}"
        dropped = [f"{n:,} asking {counts['questions'][task]:,} {task} questions"
                   for task, n in counts["dropped"].items() if n]
        parts.append(part + (f" (dropped: {', '.join(dropped)})" if dropped else ""))
    lines = [f"mixture: {'; '.join(parts)}"]
    overlap = report["train_file_overlap"]
    shared = {task: c for task, c in (overlap or {}).get("benchmarks", {}).items() if c["questions"]}
    if shared:
        per_task = [f"{task} {c['questions']:,} (asked by {c['test_examples']:,} of its {c['test_size']:,} "
                    f"test examples)" for task, c in shared.items()]
        lines.append(f"WARNING: --train_file {overlap['file']} shares questions with {', '.join(per_task)}: a "
                     f"model trained on it and graded on those benchmarks is graded on questions it has seen")
    if report["unchecked"]:
        lines.append(f"not checked for shared questions (no test set here): {', '.join(report['unchecked'])}")
    return lines
