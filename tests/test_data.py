"""
Tests of data/: the task loaders on the real files in ../shared/data, the prompt and its loss mask with the
real LLaMA-2 tokenizer, LLM-Adapters' grading on every gold answer, the error messages for bad input, and the
family mixtures with the questions they share with the test sets (counted on the real files).
Nothing here touches the network: every test runs with the download function replaced by one that fails.
"""
import json
import urllib.error
from functools import lru_cache

import pytest
from conftest import shared_path

from data import grading, tasks
from data.grading import extract_answer, is_correct
from data.mixtures import (MIXTURE_SOURCES, format_mixture_report, load_benchmarks, load_family_tests,
                           load_mixture, normalize_question, overlaps, shared_questions)
from data.prompts import IGNORE_INDEX, eval_prompt_tokens, format_prompt, tokenize_dataset, tokenize_example
from data.tasks import (ALL_TASKS, COMMONSENSE_TASKS, FAMILIES, MATH_TASKS, DataError, find_data_dir,
                        load_eval_file, load_split, load_train_file)

REAL_DOWNLOAD = tasks.download  # kept for the one test that downloads from a local file:// URL


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test may reach the network: a download attempt fails as it would on an offline machine."""
    def no_network(url, dest):
        raise urllib.error.URLError("tests run offline")
    monkeypatch.setattr(tasks, "download", no_network)
    # these tests stand in for the download themselves; .ci/run's MOELORA_OFFLINE=1 would skip it
    monkeypatch.delenv("MOELORA_OFFLINE", raising=False)


@lru_cache(maxsize=None)
def real_split(task, split):
    """A split of the real data, loaded once per test session (the files are read-only fixtures)."""
    return load_split(task, split, shared_path("data"))


def llama_tokenizer():
    from tokenizer import Tokenizer
    return Tokenizer(shared_path("models/llama2-tokenizer/tokenizer.model"))


# -----------------------------------------------------------------------------
# task tables and the data directory

def test_task_tables():
    assert len(ALL_TASKS) == 15 and set(tasks.TASK_FOLDERS) == set(ALL_TASKS)
    assert tasks.TASK_FOLDERS["siqa"] == "social_i_qa" and tasks.TASK_FOLDERS["arc_c"] == "ARC-Challenge"
    assert tasks.TASK_FOLDERS["hellaswag"] == "hellaswag" and "hellaswag" in COMMONSENSE_TASKS
    assert set(grading.NUMBER_TASKS) | {"aqua"} == set(MATH_TASKS)
    assert set(grading.ANSWER_PATTERNS) == set(COMMONSENSE_TASKS) | {"aqua"}
    # the paper's tables; a family name is not a task (train.py offers both)
    assert FAMILIES["math"] == ("addsub", "aqua", "gsm8k", "multiarith", "singleeq", "svamp")
    assert FAMILIES["commonsense"] == ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
    assert set(FAMILIES["math"]) == set(MATH_TASKS) - {"mawps"}
    assert set(FAMILIES["commonsense"]) == set(COMMONSENSE_TASKS)
    assert not set(FAMILIES) & set(ALL_TASKS)
    for family, sources in MIXTURE_SOURCES.items():
        assert all(source in tasks.TRAIN_FILES or source == "gsm8k" for source in sources)
        assert set(sources) <= set(MATH_TASKS if family == "math" else COMMONSENSE_TASKS)


def test_find_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELORA_DATA_DIR", str(tmp_path / "env"))
    assert find_data_dir(tmp_path / "flag") == tmp_path / "flag"  # the flag wins
    assert find_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MOELORA_DATA_DIR")
    assert find_data_dir() == tasks.PROJECT_ROOT / "data" / "cache"


def test_source_urls_are_the_official_ones():
    assert tasks.source_url("gsm8k/test.jsonl") == \
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"
    assert tasks.source_url("llm-adapters/dataset/ARC-Easy/test.json") == \
        "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/ARC-Easy/test.json"


# -----------------------------------------------------------------------------
# loaders on the real files

COUNTS = [
    ("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("addsub", "test", 395), ("aqua", "test", 254),
    ("multiarith", "test", 600), ("singleeq", "test", 508), ("svamp", "test", 1000), ("mawps", "test", 238),
    ("mawps", "train", 1898), ("boolq", "test", 3270), ("boolq", "train", 9427), ("piqa", "test", 1838),
    ("siqa", "test", 1954), ("winogrande", "test", 1267), ("arc_e", "test", 2376), ("arc_e", "train", 2251),
    ("arc_c", "test", 1172), ("arc_c", "train", 1119), ("obqa", "test", 500), ("obqa", "train", 4957),
]


@pytest.mark.parametrize("task,split,count", COUNTS)
def test_split_counts(task, split, count):
    examples = real_split(task, split)
    assert len(examples) == count
    for e in examples:
        assert set(e) == {"instruction", "input", "output", "answer"}
        assert all(isinstance(v, str) for v in e.values()) and e["instruction"] and e["answer"]


def test_gsm8k_train_conversion():
    examples = real_split("gsm8k", "train")
    assert examples[0]["output"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                     "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                                     "The answer is 72.")
    for e in examples:
        assert "<<" not in e["output"] and ">>" not in e["output"] and "####" not in e["output"]
        assert e["output"].endswith(f"The answer is {e['answer']}.")
        assert "," not in e["answer"] and float(e["answer"]) == float(e["answer"])


def test_gsm8k_test_answers_are_the_number_after_hashes():
    raw = [json.loads(line) for line in open(shared_path("data/gsm8k/test.jsonl"))]
    examples = real_split("gsm8k", "test")
    for r, e in zip(raw, examples):
        assert e["instruction"] == r["question"]
        assert e["answer"] == r["answer"].split("####")[-1].strip().replace(",", "")


def test_mawps_train_conversion():
    examples = real_split("mawps", "train")
    assert examples[0]["output"] == "((22.0-14.0)/4.0) = 2. The answer is 2." and examples[0]["answer"] == "2"
    assert all(is_correct("mawps", e["output"], e["answer"]) for e in examples)


def test_tasks_without_train_split_ask_for_train_file():
    with pytest.raises(DataError, match="--train_file.*Math10K"):
        load_split("svamp", "train", shared_path("data"))
    with pytest.raises(DataError, match="--train_file.*Commonsense170K"):
        load_split("piqa", "train", shared_path("data"))


def test_train_file_replaces_the_train_split(tmp_path):
    path = tmp_path / "math_10k.json"
    path.write_text(json.dumps([
        {"instruction": "1+1?", "input": "", "output": "1 + 1 = 2. The answer is 2.", "answer": "2.0"},
        {"instruction": "Add.", "input": "3 and 4", "output": "The answer is 7."},  # no answer: allowed
    ]))
    examples = load_split("svamp", "train", tmp_path / "no-data-here", train_file=path)
    assert examples[1] == {"instruction": "Add.", "input": "3 and 4", "output": "The answer is 7.", "answer": ""}
    assert examples[0]["answer"] == "2.0"


# -----------------------------------------------------------------------------
# grading: every gold answer right, every wrong one wrong

def grade(task, texts, golds):
    return sum(is_correct(task, t, g) for t, g in zip(texts, golds)) / len(golds)


def test_gsm8k_gold_grades_100_percent():
    raw = [json.loads(line) for line in open(shared_path("data/gsm8k/test.jsonl"))]
    examples = real_split("gsm8k", "test")
    golds = [e["answer"] for e in examples]
    assert grade("gsm8k", [r["answer"] for r in raw], golds) == 1.0  # official "... #### 1,080" strings
    assert grade("gsm8k", [e["output"] for e in examples], golds) == 1.0  # converted "The answer is N."
    wrong = [f"The answer is {float(g) + 1}." for g in golds]
    assert grade("gsm8k", wrong, golds) == 0.0


@pytest.mark.parametrize("task", [t for t in MATH_TASKS if t not in ("gsm8k", "aqua")])
def test_math_gold_grades_100_percent(task):
    golds = [e["answer"] for e in real_split(task, "test")]
    assert grade(task, golds, golds) == 1.0
    assert grade(task, [f"\nA: 3 + 4 = 7. The answer is {g}." for g in golds], golds) == 1.0
    assert grade(task, [f"The answer is {float(g) + 1}." for g in golds], golds) == 0.0


# The outputs in LLM-Adapters' math test files were written by a model and are NOT gold: graded against
# the answer field they score these counts (a regression pin for the grader on real, messy text).
@pytest.mark.parametrize("folder,task,n_right", [("AddSub", "addsub", 370), ("MultiArith", "multiarith", 560),
                                                 ("SingleEq", "singleeq", 484), ("SVAMP", "svamp", 803)])
def test_llm_adapters_outputs_are_not_gold(folder, task, n_right):
    records = json.load(open(shared_path(f"data/llm-adapters/dataset/{folder}/test.json")))
    assert sum(is_correct(task, r["output"], r["answer"]) for r in records) == n_right


def test_aqua_gold_grades_100_percent():
    golds = [e["answer"] for e in real_split("aqua", "test")]
    assert set(golds) == set("ABCDE")
    assert grade("aqua", golds, golds) == 1.0
    assert grade("aqua", [f"The answer is ({g})." for g in golds], golds) == 1.0
    other = {"A": "B", "B": "C", "C": "D", "D": "E", "E": "A"}
    assert grade("aqua", [f"The answer is ({other[g]})." for g in golds], golds) == 0.0


COMMONSENSE_WORDS = {"boolq": ["true", "false"], "piqa": ["solution1", "solution2"],
                     "winogrande": ["option1", "option2"]}


@pytest.mark.parametrize("task", [t for t in COMMONSENSE_TASKS if t != "hellaswag"])  # no hellaswag file here
def test_commonsense_gold_grades_100_percent(task):
    examples = real_split(task, "test")
    golds = [e["answer"] for e in examples]
    words = COMMONSENSE_WORDS.get(task, [f"answer{i}" for i in range(1, 6)])
    assert set(golds) <= set(words)
    assert grade(task, golds, golds) == 1.0
    assert grade(task, [e["output"] for e in examples], golds) == 1.0  # "the correct answer is answer3"
    others = [next(w for w in words if w != g) for g in golds]
    assert grade(task, [f"the correct answer is {o}" for o in others], golds) == 0.0


def test_grading_rules():
    assert extract_answer("gsm8k", "3 + 4 = 7, so 1,000 - 7 = 993.") == "993"  # last number, commas gone
    assert extract_answer("svamp", "it falls to -2.5 degrees") == "-2.5"
    assert extract_answer("addsub", "no idea") is None and not is_correct("addsub", "no idea", "0")
    assert is_correct("mawps", "The answer is 1.8333", "1.8333333333333335")  # within 0.001
    assert not is_correct("mawps", "The answer is 1.83", "1.8333333333333335")
    assert is_correct("gsm8k", "The answer is 1080.", "1,080")
    assert is_correct("multiarith", "The answer is 15.", "15.0")
    # first match, as LLM-Adapters: the first word given is the answer, capital letters inside words count
    assert extract_answer("boolq", "false, not true") == "false"
    assert extract_answer("boolq", "True") is None  # case-sensitive
    assert extract_answer("arc_c", "answer2 (not answer4)") == "answer2"
    assert extract_answer("aqua", "The answer is (D).") == "D"
    assert extract_answer("aqua", "Each train ... The answer is (D).") == "E"  # the faithful quirk
    assert extract_answer("winogrande", "I pick option2") == "option2"
    with pytest.raises(ValueError, match="arc_e"):
        extract_answer("squad", "ending1")


def test_own_file_kinds():
    # inferred from the gold answers; each kind reads the response its own way
    assert grading.infer_kind(["72", "-1.5", "1,080"])[0] == "number"
    assert grading.infer_kind(["yes", "no", "yes"])[0] == "choice"
    assert grading.infer_kind(["B", "A", "C", "A"])[0] == "choice"
    assert grading.infer_kind(["Paris", "Rome"])[0] == "text"  # every answer distinct: no labels to choose from
    assert grading.infer_kind(["the Seine", "the Seine"])[0] == "text"  # more than one word
    extract, correct = grading.answer_reader("number", ["72"])
    assert extract("so 1,000 - 7 = 993.") == "993" and correct("The answer is 72.", "72")
    extract, correct = grading.answer_reader("choice", ["A", "B", "C"])
    assert extract("I think B, not A") == "B" and extract("Because") is None  # whole words only: no AQuA quirk
    assert correct("(C)", "C") and not correct("C or A", "A")  # the first label named is the answer
    extract, _ = grading.answer_reader("choice", ["answer1", "answer10"])
    assert extract("answer10") == "answer10"
    _, correct = grading.answer_reader("text", ["Paris"])
    assert correct("  paris. ", "Paris") and not correct("Paris, France", "Paris")
    _, correct = grading.answer_reader("gsm8k")  # a task's own rule
    assert correct("The answer is 1080.", "1,080")


def test_hellaswag_grading(tmp_path, monkeypatch):
    # no hellaswag file here: one record in LLM-Adapters' format, "downloaded" from nowhere
    def fake_download(url, dest):
        write(dest, json.dumps([{
            "instruction": "Please choose the correct ending to complete the given sentence: Playing drums: People "
                           "are standing behind large drums. A man\n\nEnding1: is playing a bag pipe. Ending2: starts "
                           "to play around the drums. Ending3: begins playing a drum set. Ending4: begins playing the "
                           "drums.\n\nAnswer format: ending1/ending2/ending3/ending4",
            "input": "", "output": "the correct answer is ending4", "answer": "ending4"}]))
    monkeypatch.setattr(tasks, "download", fake_download)
    example = load_split("hellaswag", "test", tmp_path)[0]
    assert example["answer"] == "ending4" and is_correct("hellaswag", example["output"], "ending4")
    assert (tmp_path / "llm-adapters/dataset/hellaswag/test.json").is_file()
    assert extract_answer("hellaswag", "ending2, not ending4") == "ending2"  # the first one given
    assert extract_answer("hellaswag", "Ending4") is None  # case-sensitive: the prompt's "Ending4:" never counts
    assert extract_answer("hellaswag", "ending5") is None  # four endings only
    assert not is_correct("hellaswag", "the correct answer is ending1", "ending4")
    assert not is_correct("hellaswag", "no idea", "ending4")
    with pytest.raises(DataError, match="--train_file.*Commonsense170K"):
        load_split("hellaswag", "train", tmp_path)


# -----------------------------------------------------------------------------
# prompt and tokenisation, with the real LLaMA-2 tokenizer

def test_prompt_templates():
    assert format_prompt({"instruction": "Add 2 and 3.", "input": "", "output": "5"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert format_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n")


def check_pair(tok, example, tokens, labels):
    """labels are -100 exactly on the prompt and the next token everywhere else."""
    n_prompt = len(eval_prompt_tokens(tok, example))
    assert len(tokens) == len(labels)
    assert tokens[:n_prompt] == eval_prompt_tokens(tok, example)  # generation starts from the same ids
    assert tokens[0] == tok.bos_id
    assert labels[:n_prompt - 1] == [IGNORE_INDEX] * (n_prompt - 1)
    assert IGNORE_INDEX not in labels[n_prompt - 1:]
    assert labels[:-1][n_prompt - 1:] == tokens[n_prompt:]  # labels[i] == tokens[i + 1]
    return n_prompt


def test_chatml_prompt_format():
    example = {"instruction": "What is 2 + 3?", "input": "", "output": "5"}
    assert format_prompt(example, "chatml") == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(dict(example, input="ctx"), "chatml") == ("<|im_start|>user\nWhat is 2 + 3?\n\nctx<|im_end|>\n"
                                                                 "<|im_start|>assistant\n")
    assert format_prompt(example) == format_prompt(example, "alpaca") != format_prompt(example, "chatml")


def test_tokenize_masks_exactly_the_prompt():
    tok = llama_tokenizer()
    examples = (real_split("gsm8k", "train")[:40] + real_split("addsub", "test")[:40]
                + real_split("boolq", "train")[:40] + real_split("aqua", "test")[:40])
    examples.append({"instruction": "Add.", "input": "2 and 3", "output": "The answer is 5.", "answer": "5"})
    for example in examples:
        tokens, labels = tokenize_example(tok, example, max_seq_len=1024)
        n_prompt = check_pair(tok, example, tokens, labels)
        assert labels[-1] == tok.eos_id  # not truncated: the model learns to stop
        assert tok.decode(labels[n_prompt - 1:-1]).strip() == example["output"].strip()


def test_truncation_and_dropping():
    tok = llama_tokenizer()
    example = real_split("gsm8k", "train")[0]
    n_prompt = len(eval_prompt_tokens(tok, example))
    n_ids = len(tokenize_example(tok, example, 1024)[0]) + 1  # BOS + prompt + response + EOS

    tokens, labels = tokenize_example(tok, example, n_ids - 1)  # fits exactly
    assert len(tokens) == n_ids - 1 and labels[-1] == tok.eos_id

    tokens, labels = tokenize_example(tok, example, n_prompt + 3)  # cut: 4 targets left, no EOS
    check_pair(tok, example, tokens, labels)
    assert len(tokens) == n_prompt + 3 and tok.eos_id not in labels
    assert sum(label != IGNORE_INDEX for label in labels) == 4

    tokens, labels = tokenize_example(tok, example, n_prompt)  # the first response token still fits
    assert sum(label != IGNORE_INDEX for label in labels) == 1
    assert tokenize_example(tok, example, n_prompt - 1) is None  # the prompt alone fills the window

    short = {"instruction": "Hi", "input": "", "output": "Hello.", "answer": ""}
    pairs, n_truncated, n_dropped = tokenize_dataset(tok, [example, short, example], n_prompt + 3)
    assert (len(pairs), n_truncated, n_dropped) == (3, 2, 0)
    pairs, n_truncated, n_dropped = tokenize_dataset(tok, [example, short, example], n_prompt - 1)
    assert (len(pairs), n_truncated, n_dropped) == (1, 0, 2)
    assert pairs[0][1][-1] == tok.eos_id


# -----------------------------------------------------------------------------
# bad input: every error names the file and the place

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write(tmp_path / "gsm8k/test.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl: invalid JSON on line 2"):
        load_split("gsm8k", "test", tmp_path)
    assert path.exists()


def test_malformed_json_names_file_and_line(tmp_path):
    write(tmp_path / "llm-adapters/dataset/AddSub/test.json", '[\n {"instruction": "q",\n  "answer": 4,,}\n]')
    with pytest.raises(DataError, match=r"AddSub/test\.json: invalid JSON at line 3, column"):
        load_split("addsub", "test", tmp_path)


def test_missing_keys_name_file_and_record(tmp_path):
    write(tmp_path / "llm-adapters/dataset/piqa/test.json",
          json.dumps([{"instruction": "q", "answer": "solution1"}, {"instruction": "q"}]))
    with pytest.raises(DataError, match=r"piqa/test\.json: record 1 lacks answer"):
        load_split("piqa", "test", tmp_path)
    write(tmp_path / "gsm8k/train.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: record 1: the answer has no final '####"):
        load_split("gsm8k", "train", tmp_path)
    train_file = write(tmp_path / "math_10k.json", json.dumps([{"instruction": "q", "input": ""}]))
    with pytest.raises(DataError, match=r"math_10k\.json: record 0 lacks output"):
        load_split("svamp", "train", tmp_path, train_file=train_file)


def test_empty_and_wrongly_shaped_datasets(tmp_path):
    write(tmp_path / "llm-adapters/dataset/boolq/test.json", "[]")
    with pytest.raises(DataError, match=r"boolq/test\.json: the dataset is empty"):
        load_split("boolq", "test", tmp_path)
    write(tmp_path / "gsm8k/test.jsonl", "\n\n")
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl: the dataset is empty"):
        load_split("gsm8k", "test", tmp_path)
    write(tmp_path / "llm-adapters/dataset/openbookqa/test.json", '{"instruction": "q"}')
    with pytest.raises(DataError, match="expected a JSON list of records, found a dict"):
        load_split("obqa", "test", tmp_path)


def test_user_files_are_utf8_and_bad_ones_are_one_line(tmp_path):
    record = {"instruction": "Combien coûte le café ?", "output": "2 euros", "answer": "2"}
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([record], ensure_ascii=False).encode())
    assert load_eval_file(bom)[0]["instruction"] == record["instruction"]  # a byte-order mark is dropped
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(record, ensure_ascii=False).encode("latin-1"))
    offset = json.dumps(record, ensure_ascii=False).index("û")
    for load, flag in ((load_eval_file, "--eval_file"), (load_train_file, "--train_file")):
        with pytest.raises(DataError) as error:
            load(latin1)
        assert str(error.value) == (f"{flag} {latin1}: not UTF-8 text: byte 0xfb at offset {offset} (invalid start "
                                    "byte); save the file as UTF-8")
        with pytest.raises(DataError, match=f"^{flag} {tmp_path} is a directory, not a file"):
            load(tmp_path)
        with pytest.raises(DataError, match=f"^{flag} {tmp_path / 'no.json'} not found$"):
            load(tmp_path / "no.json")


@pytest.mark.parametrize("answer", [None, {"a": 1}, [3], True])
def test_an_answer_must_be_a_string_or_a_number(tmp_path, answer):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"instruction": "q", "answer": "1"}, {"instruction": "q2", "answer": answer}]))
    with pytest.raises(DataError) as error:  # before: graded as the strings "None", "{'a': 1}"...
        load_eval_file(path)
    assert str(error.value) == f'{path}: record 1: "answer" is {json.dumps(answer)}: give a string or a number'
    path.write_text(json.dumps([{"instruction": "q", "answer": 12}, {"instruction": "q2", "answer": 0.5}]))
    assert [ex["answer"] for ex in load_eval_file(path)] == ["12", "0.5"]


def test_unknown_task_and_split():
    with pytest.raises(DataError) as error:
        load_split("squad", "test")
    assert all(task in str(error.value) for task in ALL_TASKS)
    with pytest.raises(DataError, match="train, test"):
        load_split("gsm8k", "validation")
    with pytest.raises(DataError, match="not found"):
        load_split("gsm8k", "train", train_file="/nonexistent/math_10k.json")


def test_offline_without_a_copy_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as error:
        load_split("gsm8k", "test", tmp_path)
    message = str(error.value)
    assert str((tmp_path / "gsm8k" / "test.jsonl").resolve()) in message
    assert tasks.GSM8K_URL + "test.jsonl" in message
    assert "--data_dir" in message and "MOELORA_DATA_DIR" in message
    with pytest.raises(DataError) as error:
        load_split("arc_c", "test", tmp_path)
    assert str((tmp_path / "llm-adapters/dataset/ARC-Challenge/test.json").resolve()) in str(error.value)


def test_offline_switch_skips_the_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tasks, "download", lambda url, dest: calls.append(url))
    monkeypatch.setenv("MOELORA_OFFLINE", "1")
    with pytest.raises(DataError, match="MOELORA_OFFLINE=1 forbids downloading") as error:
        load_split("gsm8k", "test", tmp_path)
    assert "--data_dir" in str(error.value) and calls == [] and not (tmp_path / "gsm8k").exists()


def test_missing_file_is_downloaded_once(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        write(dest, json.dumps([{"instruction": "q", "input": "", "output": "", "answer": "answer2"}]))
    monkeypatch.setattr(tasks, "download", fake_download)
    assert load_split("siqa", "test", tmp_path)[0]["answer"] == "answer2"
    assert load_split("siqa", "test", tmp_path)[0]["answer"] == "answer2"
    assert calls == [tasks.LLM_ADAPTERS_URL + "dataset/social_i_qa/test.json"]


def test_download_is_atomic(tmp_path):
    # a file:// URL exercises the real download function without any network
    source = write(tmp_path / "src/test.jsonl", '{"question": "q", "answer": "#### 3"}\n')
    dest = tmp_path / "cache/gsm8k/test.jsonl"
    REAL_DOWNLOAD(source.as_uri(), dest)
    assert dest.read_text() == source.read_text()
    with pytest.raises(OSError):
        REAL_DOWNLOAD((tmp_path / "src/absent.jsonl").as_uri(), tmp_path / "cache/gsm8k/train.jsonl")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["test.jsonl"]  # no partial file left behind
    with pytest.raises(OSError):
        REAL_DOWNLOAD((tmp_path / "src/absent.jsonl").as_uri(), tmp_path / "cache/hellaswag/test.json")
    assert not (tmp_path / "cache/hellaswag").exists()  # nor an empty folder


# -----------------------------------------------------------------------------
# family mixtures and the questions they share with the test sets

def question(example):
    """The rule written out again: whole instruction, lower case, whitespace collapsed (input is empty here)."""
    return " ".join(example["instruction"].lower().split())


def asked(examples):
    return {question(e) for e in examples}


def fake(*questions):
    return [{"instruction": q, "input": "", "output": "The answer is 1.", "answer": "1"} for q in questions]


def test_question_matching_rule():
    assert normalize_question("  How many\n\nApples ?\t") == "how many apples ?"
    train = fake("Tom has 3 apples .", "tom  has 3\napples .", "Tom has 4 apples.", "Tom has 3 apples")
    found = overlaps(train, {"a": fake("TOM HAS 3 APPLES ."), "b": fake("no such question"), "c": []})
    assert found == {"a": {0, 1}, "b": set(), "c": set()}  # punctuation still counts: "apples" != "apples ."
    assert shared_questions(train, fake("tom has 3 apples .", "Tom has 4 apples.")) == \
        {"tom has 3 apples .", "tom has 4 apples."}


# measured by hand before this code existed (../shared/README.md): distinct questions shared
MATH_DATA_SHARES = {"addsub": 316, "aqua": 203, "gsm8k": 1055, "multiarith": 471, "singleeq": 406, "svamp": 800}


def test_math_data_shares_most_of_the_math_benchmarks():
    path = shared_path("data/llm-adapters/ft-training_set/math_data.json")
    math_data = load_train_file(path)
    assert len(math_data) == 3260
    for task, n in MATH_DATA_SHARES.items():
        assert len(shared_questions(math_data, real_split(task, "test"))) == n, task
    # LLM-Adapters' own copy of GSM8K test asks the same questions as the official file we grade on
    adapters_gsm8k = load_train_file(shared_path("data/llm-adapters/dataset/gsm8k/test.json"))
    assert asked(adapters_gsm8k) == asked(real_split("gsm8k", "test"))

    # as --train_file it is kept whole, and the report says what it shares with each benchmark
    examples, report = load_mixture("math", shared_path("data"), train_file=path)
    assert len(examples) == 3260 and {e["source"] for e in examples} == {"math_data"}
    assert report["sources"] == {"math_data": {"loaded": 3260, "kept": 3260, "dropped": {}, "questions": {}}}
    shares = report["train_file_overlap"]["benchmarks"]
    assert list(shares) == list(FAMILIES["math"])
    assert {task: c["questions"] for task, c in shares.items()} == MATH_DATA_SHARES
    seen = asked(math_data)
    assert shares["multiarith"]["test_examples"] == sum(question(e) in seen for e in real_split("multiarith", "test"))
    warning = format_mixture_report(report)[1]
    assert warning.startswith("WARNING: --train_file math_data.json shares questions with addsub 316 (asked by 316 "
                              "of its 395 test examples)")
    assert "svamp 800 (asked by 800 of its 1,000" in warning and "questions it has seen" in warning


def test_mawps_train_shares_addsub_and_gsm8k_train_shares_nothing():
    assert len(shared_questions(real_split("mawps", "train"), real_split("addsub", "test"))) == 321
    assert len(shared_questions(real_split("gsm8k", "train"), real_split("gsm8k", "test"))) == 0


def test_family_tests_in_table_order_with_limit():
    tests, missing = load_family_tests("math", shared_path("data"), limit=3)
    assert list(tests) == list(FAMILIES["math"]) and missing == {}
    for task, examples in tests.items():
        assert examples == real_split(task, "test")[:3]
    with pytest.raises(DataError, match="the families are: math, commonsense"):
        load_family_tests("code", shared_path("data"))
    tests, missing = load_benchmarks(["svamp", "hellaswag", "addsub"], shared_path("data"), limit=2)  # --eval_tasks
    assert list(tests) == ["svamp", "addsub"] and list(missing) == ["hellaswag"]
    assert tests["addsub"] == real_split("addsub", "test")[:2]


def test_missing_benchmark_is_reported_and_the_others_load(tmp_path):
    tests, missing = load_family_tests("commonsense", shared_path("data"))  # download fails (autouse _offline)
    assert list(tests) == [t for t in FAMILIES["commonsense"] if t != "hellaswag"]
    assert list(missing) == ["hellaswag"] and "\n" not in missing["hellaswag"]
    assert "hellaswag/test.json is missing and could not be downloaded" in missing["hellaswag"]
    # an empty data directory: every benchmark missing, each with its own reason, nothing raised
    tests, missing = load_family_tests("math", tmp_path)
    assert tests == {} and list(missing) == list(FAMILIES["math"]) and "AQuA/test.json" in missing["aqua"]


def test_stand_in_math_mixture_drops_exactly_the_shared_questions():
    examples, report = load_mixture("math", shared_path("data"))
    tests = {task: asked(real_split(task, "test")) for task in FAMILIES["math"]}
    test_questions = set().union(*tests.values())
    expected = []
    for source in ("gsm8k", "mawps"):
        train = real_split(source, "train")
        kept = [e for e in train if question(e) not in test_questions]
        expected += [dict(e, source=source) for e in kept]
        counts = report["sources"][source]
        assert (counts["loaded"], counts["kept"]) == (len(train), len(kept))
        for task, test in tests.items():
            assert counts["dropped"][task] == sum(question(e) in test for e in train)
            assert counts["questions"][task] == len(asked(train) & test)
    assert examples == expected  # file order, sources in order, tagged
    assert list(report["sources"]) == ["gsm8k", "mawps"] and report["unchecked"] == []
    mawps = report["sources"]["mawps"]
    assert mawps["questions"]["addsub"] == 321 and mawps["dropped"]["addsub"] >= 321  # MAWPS repeats some
    assert mawps["loaded"] - mawps["kept"] == mawps["dropped"]["addsub"]  # addsub is the only one it shares
    assert format_mixture_report(report) == [
        f"mixture: gsm8k 7,473 kept of 7,473; mawps {mawps['kept']:,} kept of 1,898 "
        f"(dropped: {mawps['dropped']['addsub']:,} asking 321 addsub questions)"]
    json.dumps(report)  # plain data: train.py logs it


def test_commonsense_mixture_loads_and_says_what_it_could_not_check():
    tests, missing = load_family_tests("commonsense", shared_path("data"))
    examples, report = load_mixture("commonsense", shared_path("data"), test_sets=tests)
    assert list(report["sources"]) == list(MIXTURE_SOURCES["commonsense"])
    assert report["unchecked"] == ["hellaswag"] and report["train_file_overlap"] is None
    test_questions = set().union(*(asked(t) for t in tests.values()))
    tests = {task: asked(t) for task, t in tests.items()}
    n = 0
    for source in MIXTURE_SOURCES["commonsense"]:
        train = real_split(source, "train")
        n_shared = sum(question(e) in test_questions for e in train)
        counts = report["sources"][source]
        assert (counts["loaded"], counts["kept"]) == (len(train), len(train) - n_shared)
        for task, test in tests.items():
            assert counts["dropped"][task] == sum(question(e) in test for e in train)
            assert counts["questions"][task] == len(asked(train) & test)
        assert [e for e in examples if e["source"] == source] == \
            [dict(e, source=source) for e in train if question(e) not in test_questions]
        n += len(train) - n_shared
    assert len(examples) == n
    lines = format_mixture_report(report)
    assert lines[0].startswith("mixture: boolq 9,427 kept of 9,427; arc_e ")
    assert lines[-1] == "not checked for shared questions (no test set here): hellaswag"


def test_train_file_overlap_is_reported_not_dropped(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(fake("What is 1 + 1 ?", "what is 1 +  1 ?", "Something new.")))
    test_sets = {"addsub": fake("WHAT IS 1 + 1 ?", "What is 2 + 2 ?"), "svamp": fake("What is 3 + 3 ?")}
    examples, report = load_mixture("math", tmp_path / "no-data", train_file=path, test_sets=test_sets)
    assert [e["instruction"] for e in examples] == ["What is 1 + 1 ?", "what is 1 +  1 ?", "Something new."]
    assert {e["source"] for e in examples} == {"mine"}
    assert report["sources"] == {"mine": {"loaded": 3, "kept": 3, "dropped": {}, "questions": {}}}
    assert report["train_file_overlap"] == {"file": "mine.json", "benchmarks": {
        "addsub": {"questions": 1, "train_examples": 2, "test_examples": 1, "test_size": 2},
        "svamp": {"questions": 0, "train_examples": 0, "test_examples": 0, "test_size": 1}}}
    assert report["unchecked"] == ["aqua", "gsm8k", "multiarith", "singleeq"]
    assert format_mixture_report(report) == [
        "mixture: mine 3 kept of 3",
        "WARNING: --train_file mine.json shares questions with addsub 1 (asked by 1 of its 2 test examples): a model "
        "trained on it and graded on those benchmarks is graded on questions it has seen",
        "not checked for shared questions (no test set here): aqua, gsm8k, multiarith, singleeq"]
