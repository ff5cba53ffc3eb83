"""
Answer grading as LLM-Adapters grades (its evaluate.py for math, commonsense_evaluate.py for commonsense),
so that accuracies are comparable with the tables of LLM-Adapters and MoELoRA.

    math (gsm8k addsub multiarith singleeq svamp mawps)
        remove commas, take the LAST number in the response (regex -?\\d+\\.?\\d*), correct when it is
        within 0.001 of the gold number; no number in the response is wrong.
    aqua
        the FIRST capital A, B, C, D or E anywhere in the response, compared with the gold letter.
    commonsense
        the FIRST occurrence of the task's answer words, compared with the gold word (case-sensitive):
        boolq true|false, piqa solution1|solution2, siqa arc_e arc_c obqa answer1..answer5,
        hellaswag ending1..ending4, winogrande option1|option2.

Pass only the generated response, never the prompt: the prompt holds numbers, the choices' letters and
"Answer format: answer1/answer2/...", and LLM-Adapters grades the text after "### Response:". (HellaSwag's
prompt writes its choices "Ending1: ..."; only the lower-case "ending1" of a response counts.)

Your own test file (train.py --eval_file) is graded by one of three kinds, given (--eval_kind) or inferred from its
answers (infer_kind):
    number  as math: the last number, within 0.001
    choice  the FIRST of the file's answer labels that the response names as a whole word ("B", "yes", "positive")
    text    exact match after lower-casing, collapsing spaces and dropping a final full stop (the fallback)

Faithful quirks, kept on purpose because the published numbers were computed with them:
- the AQuA rule takes any capital A-E, also inside a word: "Each ..." reads as E, "A: ..." as A;
- the number regex reads ".5" as 5 and "1/2" as the two numbers 1 and 2 (the last, 2, is taken);
- the regex swallows the full stop of "The answer is 5." ("5."); extract_answer drops it, the value is the same.
"""
import re

from .tasks import ALL_TASKS

NUMBER_TASKS = ("gsm8k", "addsub", "multiarith", "singleeq", "svamp", "mawps")
TOLERANCE = 0.001  # LLM-Adapters' "miss": answers such as 1.8333333333333335 need some slack

NUMBER = re.compile(r"-?\d+\.?\d*")
ANSWER_PATTERNS = {
    "aqua": re.compile(r"A|B|C|D|E"),
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "siqa": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "arc_e": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "arc_c": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "obqa": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
}


def extract_answer(task: str, text: str):
    """The answer the response gives, as a string ("72", "-1.5", "D", "solution2"), or None if it gives none."""
    if task in NUMBER_TASKS:
        numbers = NUMBER.findall(text.replace(",", ""))
        return numbers[-1].rstrip(".") if numbers else None  # "5." (the full stop of "is 5.") reads as "5"
    if task not in ANSWER_PATTERNS:
        raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(ALL_TASKS)}")
    match = ANSWER_PATTERNS[task].search(text)
    return match.group(0) if match else None


def is_correct(task: str, text: str, gold: str) -> bool:
    """Whether the response text answers gold (a number as a string, an option letter, an answer word)."""
    predicted = extract_answer(task, text)
    if predicted is None:
        return False
    if task in NUMBER_TASKS:
        return abs(float(predicted) - float(str(gold).replace(",", ""))) <= TOLERANCE
    return predicted == gold


# -----------------------------------------------------------------------------
# your own test file: graded by kind

EVAL_KINDS = ("number", "choice", "text")
MAX_CHOICES = 10  # more distinct answers than this are no multiple choice


def is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d+\.?\d*", str(text).strip().replace(",", "")) is not None


def infer_kind(answers: list) -> tuple:
    """(kind, why) for a test file whose answers are these strings."""
    if all(is_number(a) for a in answers):
        return "number", "every answer is a number"
    labels = set(answers)
    if len(labels) <= MAX_CHOICES and len(labels) < len(answers) and all(len(a.split()) == 1 for a in labels):
        return "choice", f"the answers are {len(labels)} one-word labels ({', '.join(sorted(labels))})"
    return "text", f"{len(labels)} distinct answers, not all numbers nor a few labels: exact match"


def normalize_text(text: str) -> str:
    return " ".join(str(text).lower().split()).rstrip(".")


def extract_own(kind: str, text: str, choices=()):
    """The answer a response gives under a kind of EVAL_KINDS; choices: the labels of a choice file."""
    if kind == "number":
        return extract_answer("gsm8k", text)
    if kind == "choice":
        # longest labels first, so that "answer10" is not read as "answer1"
        labels = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
        match = re.search(rf"(?<!\w)({labels})(?!\w)", text) if labels else None
        return match.group(0) if match else None
    if kind == "text":
        return normalize_text(text)
    raise ValueError(f"unknown kind {kind!r}; the kinds are: {', '.join(EVAL_KINDS)}")


def is_correct_own(kind: str, text: str, gold: str, choices=()) -> bool:
    predicted = extract_own(kind, text, choices)
    if predicted is None:
        return False
    if kind == "number":
        return abs(float(predicted) - float(str(gold).replace(",", ""))) <= TOLERANCE
    return predicted == (normalize_text(gold) if kind == "text" else gold)


def answer_reader(rule: str, answers=()):
    """(extract(text), correct(text, gold)) for a task of ALL_TASKS or a kind of EVAL_KINDS, whose choice labels
    are the distinct gold answers."""
    if rule not in EVAL_KINDS:
        return (lambda text: extract_answer(rule, text)), (lambda text, gold: is_correct(rule, text, gold))
    choices = sorted(set(answers))
    return (lambda text: extract_own(rule, text, choices)), (lambda text, gold: is_correct_own(rule, text, gold, choices))
