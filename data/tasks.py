"""
The 15 tasks of the LLM-Adapters protocol and the paper's two benchmark families: where their files live,
how a missing file is fetched, and how each file becomes a list of examples.

An example is a plain dict with four strings:
    instruction  the question (for multiple choice: with the choices and the answer format)
    input        extra context; "" in every file here, kept because the Alpaca prompt has a slot for it
    output       the response the model is trained to write
    answer       the gold label grading.py compares with: a number for math ("72", "1.5"), an option
                 letter for AQuA ("A".."E"), an answer word for commonsense ("true", "solution2",
                 "answer3", "ending4", "option1")

A data directory holds (the layout of ../shared/data):
    gsm8k/train.jsonl, gsm8k/test.jsonl                  the official GSM8K (openai/grade-school-math)
    llm-adapters/dataset/<Folder>/test.json              LLM-Adapters' test sets, one folder per task
    llm-adapters/dataset/<Folder>/train.json             train splits of boolq, ARC-Easy, ARC-Challenge, openbookqa
    llm-adapters/dataset/mawps/trainset.json             MAWPS' train split (its own keys, converted here)
A file that is missing is downloaded once from GitHub into the data directory; MOELORA_OFFLINE=1 in the
environment skips the download and fails at once (a machine whose firewall drops packets would otherwise
wait for the 60 s timeout on every missing file).
"""
import json
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

MATH_TASKS = ("gsm8k", "addsub", "aqua", "multiarith", "singleeq", "svamp", "mawps")
COMMONSENSE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
ALL_TASKS = MATH_TASKS + COMMONSENSE_TASKS

# The paper's two tables, in its column order: one adapter is trained on the family's pooled set (Math10K,
# Commonsense170K) and graded on each benchmark. mawps is no column of the math table, but stays a task of its own.
FAMILIES = {
    "math": ("addsub", "aqua", "gsm8k", "multiarith", "singleeq", "svamp"),
    "commonsense": ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"),
}

# the folder of each task in LLM-Adapters' dataset/ directory
TASK_FOLDERS = {
    "gsm8k": "gsm8k", "addsub": "AddSub", "aqua": "AQuA", "multiarith": "MultiArith", "singleeq": "SingleEq",
    "svamp": "SVAMP", "mawps": "mawps", "boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa",
    "winogrande": "winogrande", "arc_e": "ARC-Easy", "arc_c": "ARC-Challenge", "obqa": "openbookqa",
    "hellaswag": "hellaswag",
}

# the tasks that ship a train split in LLM-Adapters' dataset/ (gsm8k's comes from the official release);
# the others are trained on the pooled Math10K or Commonsense170K set, which the user passes as --train_file
TRAIN_FILES = {"boolq": "train.json", "arc_e": "train.json", "arc_c": "train.json", "obqa": "train.json",
               "mawps": "trainset.json"}

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
LLM_ADAPTERS_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DataError(Exception):
    """A data file that is missing, unreadable or malformed; the message names it and says what to do."""


def find_data_dir(data_dir=None) -> Path:
    """The --data_dir flag, else $MOELORA_DATA_DIR, else the project's git-ignored cache data/cache."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("MOELORA_DATA_DIR"):
        return Path(os.environ["MOELORA_DATA_DIR"])
    return PROJECT_ROOT / "data" / "cache"


# -----------------------------------------------------------------------------
# fetching a missing file

def source_url(relative: str) -> str:
    """Where a file of the data directory comes from: GSM8K's official release or LLM-Adapters' repository."""
    if relative.startswith("gsm8k/"):
        return GSM8K_URL + relative.removeprefix("gsm8k/")
    return LLM_ADAPTERS_URL + relative.removeprefix("llm-adapters/")


def download(url: str, dest: Path):
    """Fetch url into dest through a temporary file, so an interrupted download never looks finished. The
    folder is made once the server answers, so that a failed attempt (offline) leaves no empty folder."""
    with urllib.request.urlopen(url, timeout=60) as response:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(response, f)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def missing_file(path: Path, relative: str, why: str) -> DataError:
    return DataError(
        f"{path.resolve()} is missing and {why}.\n"
        f"Download that file on a machine with network access and put it at {path.resolve()}, or point "
        f"--data_dir (or the MOELORA_DATA_DIR environment variable) at a directory that holds {relative}.")


def fetch(data_dir: Path, relative: str) -> Path:
    """The path of data_dir/relative, downloading the file first when it is not there."""
    path = data_dir / relative
    if path.is_file():
        return path
    url = source_url(relative)
    if os.environ.get("MOELORA_OFFLINE") == "1":
        raise missing_file(path, relative, f"MOELORA_OFFLINE=1 forbids downloading it from {url}")
    print(f"downloading {url} -> {path}")
    try:
        download(url, path)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors too
        raise missing_file(path, relative, f"could not be downloaded from {url} ({e})") from None
    return path


# -----------------------------------------------------------------------------
# reading records, with errors that name the file and the place

def read_text(path, what: str = "") -> str:
    """A text file's contents, decoded as UTF-8 (a leading byte-order mark is dropped). A file that is not there, is
    a directory, cannot be read or is not UTF-8 is one DataError line naming it (and the first bad byte's offset).
    what: the flag that named the file ("--train_file"), for the message."""
    path, name = Path(path), f"{what} {path}".strip()
    if path.is_dir():
        raise DataError(f"{name} is a directory, not a file: give the file inside it")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name} not found") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason}); "
                        "save the file as UTF-8") from None


def read_json(path: Path, what: str = "") -> list:
    try:
        records = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    return records


def read_jsonl(path: Path, what: str = "") -> list:
    records = []
    # split at newlines only, not splitlines(): a JSON string may hold U+2028 as it is
    for line_number, line in enumerate(read_text(path, what).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON on line {line_number}: {e.msg}") from None
    return records


def read_records(path: Path, required: tuple, what: str = "") -> list:
    """The records of a .json list or a .jsonl file; each must be an object holding the required keys.
    what: the flag that named the file, if a user did."""
    records = read_jsonl(path, what) if path.suffix == ".jsonl" else read_json(path, what)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no records)")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
        missing = [key for key in required if key not in record]
        if missing:
            raise DataError(f"{path}: record {i} lacks {', '.join(missing)} (every record needs "
                            f"{', '.join(required)})")
    return records


# -----------------------------------------------------------------------------
# converting each source's records into examples

def make_example(instruction, output, answer, context="") -> dict:
    return {"instruction": instruction, "input": context, "output": output, "answer": answer}


def format_number(value) -> str:
    """2.0 -> "2", "14.02" -> "14.02": MAWPS stores its answers as floats or as strings."""
    x = float(value)
    return str(int(x)) if x.is_integer() else repr(x)


def gsm8k_example(record: dict) -> dict:
    """The official answer is reasoning with calculator annotations ("48/2 = <<48/2=24>>24") and a last
    line "#### 72". Strip the annotations, which the model should not learn to write, and end the way
    LLM-Adapters' math responses end ("The answer is 72."), which is what the grader reads."""
    reasoning, final = record["answer"].rsplit("####", 1)
    number = final.strip().replace(",", "")
    reasoning = re.sub(r"<<.*?>>", "", reasoning).strip()
    return make_example(record["question"], f"{reasoning}\nThe answer is {number}.", number)


def mawps_example(record: dict) -> dict:
    """MAWPS gives an equation ("X=((22.0-14.0)/4.0)") rather than worded reasoning: write its right-hand
    side as the working when it has the form x = expression, then the final answer."""
    number = format_number(record["ans"])
    lhs, _, rhs = record["equation"].partition("=")
    working = f"{rhs.strip()} = {number}. " if lhs.strip().lower() == "x" and rhs.strip() else ""
    return make_example(record["original_text"], f"{working}The answer is {number}.", number)


def adapters_example(record: dict) -> dict:
    """LLM-Adapters' files, Math10K and Commonsense170K already are examples; answers may be numbers."""
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str) and not (key == "input" and record[key] is None):
            raise ValueError(f'"{key}" is {json.dumps(record[key])[:60]}, not a string')
    answer = record.get("answer", "")
    # a number or a string; anything else (null, a list, an object, true) would be graded as its Python repr
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f'"answer" is {json.dumps(answer)[:60]}: give a string or a number')
    return make_example(record["instruction"], record.get("output") or "", str(answer), record.get("input") or "")


def convert(records: list, path: Path, to_example) -> list:
    examples = []
    for i, record in enumerate(records):
        try:
            examples.append(to_example(record))
        except (ValueError, AttributeError, TypeError) as e:
            raise DataError(f"{path}: record {i}: {e}") from None
    return examples


# -----------------------------------------------------------------------------
# the entry point

def check_task(task: str):
    if task not in ALL_TASKS:
        raise DataError(f"unknown task {task!r}; the tasks are: {', '.join(ALL_TASKS)}")


def split_file(task: str, split: str) -> str:
    """The file of a task's split, relative to the data directory."""
    if task == "gsm8k":
        return f"gsm8k/{split}.jsonl"
    folder = f"llm-adapters/dataset/{TASK_FOLDERS[task]}"
    if split == "test":
        return f"{folder}/test.json"
    if task in TRAIN_FILES:
        return f"{folder}/{TRAIN_FILES[task]}"
    pooled = "Math10K (math_10k.json)" if task in MATH_TASKS else "Commonsense170K (commonsense_170k.json)"
    raise DataError(f"task {task!r} has no train split of its own: pass --train_file with the pooled training "
                    f"set, {pooled} from LLM-Adapters' ft-training_set/ folder")


def load_train_file(train_file) -> list:
    """A Math10K / Commonsense170K style file: a JSON list (or JSONL) of {instruction, input, output, answer};
    input may be absent (empty) and so may answer (training uses only the output)."""
    path = Path(train_file)
    return convert(read_records(path, ("instruction", "output"), "--train_file"), path, adapters_example)


def load_eval_file(eval_file) -> list:
    """Your own test set: the --train_file format with an "answer" on every record (what grading compares with);
    an "output" (a reference response) is optional and gives the answer loss."""
    path = Path(eval_file)
    examples = convert(read_records(path, ("instruction", "answer"), "--eval_file"), path, adapters_example)
    empty = [i for i, ex in enumerate(examples) if not ex["answer"].strip()]
    if empty:
        raise DataError(f"{path}: record {empty[0]} has an empty answer ({len(empty)} records do): grading needs one")
    return examples


def load_split(task: str, split: str, data_dir=None, train_file=None) -> list:
    """The examples of a task's "train" or "test" split; train_file, when given, replaces the train split."""
    check_task(task)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; the splits are: train, test")
    if split == "train" and train_file:
        return load_train_file(train_file)
    relative = split_file(task, split)
    path = fetch(find_data_dir(data_dir), relative)
    if task == "gsm8k":
        records = read_records(path, ("question", "answer"))
        for i, record in enumerate(records):
            if "####" not in str(record["answer"]):
                raise DataError(f"{path}: record {i}: the answer has no final '#### <number>' line")
        return convert(records, path, gsm8k_example)
    if task == "mawps" and split == "train":
        return convert(read_records(path, ("original_text", "equation", "ans")), path, mawps_example)
    required = ("instruction", "output") if split == "train" else ("instruction", "answer")
    return convert(read_records(path, required), path, adapters_example)
