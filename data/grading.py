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
