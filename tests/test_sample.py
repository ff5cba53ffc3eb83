"""sample.py on tiny runs of train.py: the streamed answer, its speed and cut mark, the adapter it loads, the routing
table, bad input."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from dataclasses import asdict

import pytest
import torch

from conftest import ROOT, shared_path

import sample
import train
from data.prompts import eval_prompt_tokens, format_prompt
from data.tasks import load_split
from checkpoints import from_pretrained
from model import ModelArgs, Transformer
from moelora import MoELoRAConfig, inject_moelora, load_moelora_state_dict, moelora_layers
from runs import Precision
from tokenizer import Tokenizer

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
CPU = Precision("cpu", torch.float32)


def tiny_run(out_dir, *extra):
    """A run of seconds on stories260K: 4 steps at the tiny preset's learning rate (so that B moves well away from
    0), 2 test questions graded one at a time (batch 1: the same computation as sample.py's, no padding)."""
    train.main(["--task", "gsm8k", "--model", str(shared_path("models/stories260K-hf")), "--preset", "tiny",
                "--data_dir", str(shared_path("data")), "--out_dir", str(out_dir), "--max_steps", "4",
                "--batch_size", "4", "--micro_batch_size", "4", "--max_seq_len", "256", "--eval_limit", "2",
                "--eval_batch_size", "1", "--max_new_tokens", "12", "--num_experts", "4", *extra])
    return out_dir


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("moe"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("lora"), "--method", "lora", "--r", "4", "--max_steps", "1",
                    "--eval_limit", "1", "--max_new_tokens", "1")


def run_model(run_dir):
    """The training run's own model, rebuilt by hand from ckpt.pt: the base it names, the adapters as saved."""
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    model = from_pretrained(ckpt["config"]["base"], dtype=torch.float32)
    inject_moelora(model, MoELoRAConfig(**ckpt["weights"]["moelora_config"]))
    load_moelora_state_dict(model, ckpt["weights"])
    return model.eval(), Tokenizer.from_dir(ckpt["config"]["base"])


def loaded_model(run_dir, *flags):
    """The model sample.py answers with."""
    return sample.load_model(sample.parse_args(["--out_dir", str(run_dir), *flags, "q"]), CPU)


def test_streamed_answer_is_greedy_generate_on_the_training_prompt(moe_run, capsys):
    result, = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "20", QUESTION])
    out = capsys.readouterr().out
    model, tok = run_model(moe_run)
    # the prompt is BOS + the Alpaca template of training and grading
    assert result["prompt"] == eval_prompt_tokens(tok, {"instruction": QUESTION})
    assert result["prompt"][0] == tok.bos_id and tok.decode(result["prompt"]) == format_prompt({"instruction": QUESTION})
    expected = model.generate([result["prompt"]], 20, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
    assert result["answer"] == expected
    assert out == tok.decode(expected) + "\n"
    # ... and it was written piece by piece, not at the end
    writes = []
    out_file = Namespace(write=writes.append, flush=lambda: None)
    again, _, _ = sample.stream_answer(model, tok, result["prompt"], 20, 0.0, 1.0, None, CPU, out_file)
    assert again == expected and len(writes) > 5 and "".join(writes) == tok.decode(expected) + "\n"


def test_answers_are_the_training_runs_own_predictions_questions_from_a_file(moe_run, tmp_path, capsys):
    questions = [ex["instruction"] for ex in load_split("gsm8k", "test", shared_path("data"))[:2]]
    (tmp_path / "questions.txt").write_text(questions[0] + "\n\n" + questions[1] + "\n")  # a blank line is skipped
    results = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "12", "--file", str(tmp_path / "questions.txt")])
    predictions = [json.loads(l) for l in (moe_run / "predictions_gsm8k_first2.jsonl").read_text().splitlines()]
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    assert [r["question"] for r in results] == questions
    assert [tok.decode(r["answer"]) for r in results] == [p["prediction"] for p in predictions]
    out = capsys.readouterr().out
    assert out.count("> ") == 2 and predictions[1]["prediction"] in out  # each question, then its answer


def test_questions_from_stdin(moe_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 2?\n\n  What is 3 plus 3?  \n"))
    results = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "3"])  # piped, no question given
    assert [r["question"] for r in results] == ["What is 2 plus 2?", "What is 3 plus 3?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 4 plus 4?\n"))
    results = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "3", "First?", "-"])
    assert [r["question"] for r in results] == ["First?", "What is 4 plus 4?"]
    assert "> First?" in capsys.readouterr().out
    # --input fills the template's input field, as a training example with one would
    result, = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "1", "--input", "3 and 5", "Add them."])
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    assert result["prompt"] == eval_prompt_tokens(tok, {"instruction": "Add them.", "input": "3 and 5"})
    assert "### Input:\n3 and 5" in tok.decode(result["prompt"])


def test_the_trained_adapter_is_loaded(moe_run, tmp_path):
    weights = torch.load(moe_run / "ckpt.pt", weights_only=True)["weights"]
    assert all(weights[k].abs().max() > 0 for k in weights if k.endswith("lora_B"))  # B has moved from 0
    tokens = torch.tensor([eval_prompt_tokens(Tokenizer.from_dir(shared_path("models/stories260K-hf")),
                                              {"instruction": QUESTION})])
    with torch.no_grad():
        trained, _ = run_model(moe_run)[0](tokens)
        from_file, _ = loaded_model(moe_run)[0](tokens)  # adapter.safetensors
        base, _ = loaded_model(moe_run, "--no_adapter")[0](tokens)
        shutil.copy(moe_run / "ckpt.pt", tmp_path / "ckpt.pt")  # a run without adapter.safetensors: from ckpt.pt
        from_ckpt, _ = loaded_model(tmp_path)[0](tokens)
    assert torch.equal(from_file, trained) and torch.equal(from_ckpt, trained)
    assert (base - trained).abs().max() > 1e-3
    assert not moelora_layers(loaded_model(moe_run, "--no_adapter")[0])


def test_full_run_loads_all_its_weights(tmp_path):
    run = tiny_run(tmp_path, "--method", "full", "--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "1")
    weights = torch.load(run / "ckpt.pt", weights_only=True)["weights"]
    model, _ = loaded_model(run)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    base, _ = loaded_model(run, "--no_adapter")
    assert not torch.equal(base.layers[0].attention.wq.weight, weights["layers.0.attention.wq.weight"])


def routing_rows(out: str):
    """(the table's rows as [piece, expert ids], the expert shares in %) from sample.py --routing's output."""
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith("token ")) + 1
    end = next(i for i, l in enumerate(lines) if l.startswith("expert share"))
    rows = [l.split() for l in lines[start:end] if not l.startswith("---")]
    shares = [float(s.rstrip("%")) for s in lines[end].split(":", 1)[1].split()[1::2]]
    return [(r[0], [int(e) for e in r[1:]]) for r in rows], shares


def test_routing_table_is_the_top1_of_a_full_forward(moe_run, capsys):
    result, = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "8", "--routing", QUESTION])
    rows, shares = routing_rows(capsys.readouterr().out)
    ids = result["prompt"] + result["answer"]
    assert len(rows) == len(ids) and all(len(experts) == 10 for _, experts in rows)  # 5 layers x wq, wv
    assert all(0 <= e < 4 for _, experts in rows for e in experts)
    assert len(shares) == 4 and sum(shares) == pytest.approx(100, abs=0.3)
    model, tok = run_model(moe_run)
    assert [piece for piece, _ in rows][:2] == ["<s>", tok.piece(ids[1])]
    with torch.no_grad():
        model(torch.tensor([ids]))
    expected = torch.stack([layer.last_top_idx[:, 0] for _, layer in moelora_layers(model)], 1)  # [T, layers]
    assert torch.equal(result["routing"], expected) and [e for _, e in rows] == expected.tolist()
    # in a terminal each cell is coloured by its expert
    sample.print_routing(["<s>", "a"], 1, ["layers.0.attention.wq"], torch.tensor([[0], [3]]), 4, colour=True)
    out = capsys.readouterr().out
    assert "\033[30;41m" in out and "\033[30;44m" in out and "0wq" in out


def test_routing_png(moe_run, tmp_path, capsys):
    sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "4", "--routing_png", str(tmp_path / "r.png"), QUESTION])
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expert share" in capsys.readouterr().out


def test_a_run_moved_with_its_built_in_base(moe_run, tmp_path):
    # a built-in tiny base lives inside out_dir: a moved run finds it there (stories260K plays the tiny base)
    ckpt = torch.load(moe_run / "ckpt.pt", weights_only=True)
    ckpt["config"].update(model=None, base="/gone/tiny_base_gsm8k_0")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    shutil.copytree(shared_path("models/stories260K-hf"), tmp_path / "tiny_base_gsm8k_0")
    result, = sample.main(["--out_dir", str(tmp_path), "--max_new_tokens", "5", QUESTION])
    assert result["answer"] == sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "5", QUESTION])[0]["answer"]


def test_int8_run_samples_as_it_was_graded(tmp_path, capsys):
    run = tiny_run(tmp_path, "--quantize", "int8", "--eval_limit", "1")
    question = load_split("gsm8k", "test", shared_path("data"))[0]["instruction"]
    prediction = json.loads((run / "predictions_gsm8k_first1.jsonl").read_text().splitlines()[0])["prediction"]
    capsys.readouterr()  # training's output
    result, = sample.main(["--out_dir", str(run), "--max_new_tokens", "12", question])
    assert Tokenizer.from_dir(shared_path("models/stories260K-hf")).decode(result["answer"]) == prediction
    # what was loaded names the base's storage, not the float dtype it computes in
    loaded = capsys.readouterr().err.splitlines()[0]
    assert loaded.endswith("(moelora, step 4), cpu, int8 base (a scale per 64 weights), computing in float32"), loaded


def other_base(path):
    """A Meta-format base of another width, with stories260K's tokenizer: no adapter of the runs here fits it."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=512)
    path.mkdir()
    (path / "params.json").write_text(json.dumps({k: v for k, v in asdict(args).items() if v is not None}))
    torch.save(Transformer(args).state_dict(), path / "consolidated.00.pth")
    shutil.copy(shared_path("models/stories260K-hf/tokenizer.model"), path / "tokenizer.model")
    return path


def test_bad_input_is_one_line_error(moe_run, lora_run, tmp_path):
    cases = [
        (["--out_dir", str(tmp_path / "nothing"), QUESTION], r"no .*ckpt.pt: train a run first \(python train.py"),
        (["--out_dir", str(moe_run), "--model", str(tmp_path / "nowhere"), QUESTION], "the base model .* does not exist"),
        (["--out_dir", str(moe_run), "--model", str(other_base(tmp_path / "other")), QUESTION],
         r"the weights in .*adapter.safetensors do not fit the base .*other .*give that as --model"),
        (["--out_dir", str(lora_run), "--routing", QUESTION], "--routing .* this is a --method lora run"),
        (["--out_dir", str(moe_run), "--routing", "--no_adapter", QUESTION], "--routing .* --no_adapter has none"),
        (["--out_dir", str(moe_run), "  "], "empty question"),
        (["--out_dir", str(moe_run), "--top_p", "0", QUESTION], "--top_p"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match="^error: " + message) as e:
            sample.main(argv)
        assert "\n" not in str(e.value), argv
    # from the command line: the one line on stderr, no traceback
    r = subprocess.run([sys.executable, "sample.py", "--out_dir", str(tmp_path / "nothing"), QUESTION], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: no ") and len(r.stderr.strip().splitlines()) == 1


def test_lora_run_answers(lora_run, capsys):
    result, = sample.main(["--out_dir", str(lora_run), "--max_new_tokens", "6", QUESTION])
    model, tok = run_model(lora_run)
    assert moelora_layers(model)[0][1].config == MoELoRAConfig(**torch.load(
        lora_run / "ckpt.pt", weights_only=True)["weights"]["moelora_config"])  # one expert: plain LoRA
    assert result["answer"] == model.generate([result["prompt"]], 6, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]


def test_the_gpus_bf16_path_on_the_cpu(moe_run, capsys):
    # what a GPU runs: bf16 base weights under autocast (the adapters stay float32); the same steps as generate's
    bf16 = Precision("cpu", torch.bfloat16)
    model, tok = sample.load_model(sample.parse_args(["--out_dir", str(moe_run), "q"]), bf16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    prompt = eval_prompt_tokens(tok, {"instruction": QUESTION})
    answer, _, _ = sample.stream_answer(model, tok, prompt, 8, 0.0, 1.0, None, bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert answer == model.generate([prompt], 8, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
    names, top1 = sample.top1_experts(model, prompt + answer, bf16)
    assert top1.shape == (len(prompt) + len(answer), 10) and 0 <= top1.min() and top1.max() < 4


STATS = re.compile(r"^\((\d+) tokens?, first after (\d+\.\d\d) s(?:, ([\d.]+) tok/s)?(?:; (cut at .*))?\)$")


def answer_stats(err: str):
    """(tokens, seconds to the first, tokens/s, the cut mark or None) from each answer's line on stderr."""
    found = [STATS.match(line) for line in err.splitlines()]
    return [(int(m[1]), float(m[2]), m[3] and float(m[3]), m[4]) for m in found if m]


def test_each_answer_is_followed_by_its_speed_on_stderr(moe_run, monkeypatch, capsys):
    start = time.perf_counter()
    results = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "20", QUESTION, "What is 2 plus 2?"])
    wall = time.perf_counter() - start
    out, err = capsys.readouterr()
    stats = answer_stats(err)
    assert [n for n, *_ in stats] == [len(r["answer"]) for r in results] == [20, 20]
    assert not STATS.search(out)  # stdout holds the answers alone
    for n, first_s, rate, _ in stats:
        assert 0 <= first_s < wall and rate > 0 and first_s + (n - 1) / rate < wall  # (0.00 s: a prefill under 5 ms)
    # the arithmetic, on a clock that moves only when read: the call at 0, the first token at 0.25 s, then one
    # token each 0.02 s: 4 tokens after the first in 0.08 s are 50 tokens/s
    ticks = iter([0.0, 0.25, 0.27, 0.29, 0.31, 0.33])
    monkeypatch.setattr(sample, "time", Namespace(perf_counter=lambda: next(ticks)))
    sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "5", QUESTION])
    assert answer_stats(capsys.readouterr().err) == [(5, 0.25, 50.0, "cut at --max_new_tokens 5: raise it for a "
                                                                    "longer answer")]
    assert sample.answer_stats(1, 2.0, 0.0) == "(1 token, first after 2.00 s)"  # no speed from one token
    assert sample.answer_stats(3, 0.5, 4.0) == "(3 tokens, first after 0.50 s, 0.5 tok/s)"  # a large base on a CPU


def test_a_cut_answer_is_marked_and_one_the_model_ended_is_not(moe_run, monkeypatch, capsys):
    cut, = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "5", QUESTION])
    assert cut["cut"] and len(cut["answer"]) == 5
    assert answer_stats(capsys.readouterr().err)[0][3] == "cut at --max_new_tokens 5: raise it for a longer answer"
    # stories260K runs on for hundreds of tokens without EOS: make the 5th token of that answer play EOS, so that the
    # model ends the answer at the 5th token, exactly at --max_new_tokens
    eos = cut["answer"][4]
    assert eos not in cut["answer"][:4]
    load_model = sample.load_model

    def with_that_eos(*args):
        model, tok = load_model(*args)
        tok.eos_id = eos
        return model, tok
    monkeypatch.setattr(sample, "load_model", with_that_eos)
    ended, = sample.main(["--out_dir", str(moe_run), "--max_new_tokens", "5", QUESTION])
    assert ended["answer"] == cut["answer"] and not ended["cut"]
    n, _, _, cut_mark = answer_stats(capsys.readouterr().err)[0]
    assert n == 5 and cut_mark is None


def test_an_answer_cut_by_the_context_says_so(moe_run, capsys):
    # stories260K reads 512 tokens: a question that leaves a few of them for the answer, under --max_new_tokens 256
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    question = "apples " * 80
    while len(eval_prompt_tokens(tok, {"instruction": question})) < 500:
        question += "apples "
    result, = sample.main(["--out_dir", str(moe_run), question])
    n_prompt = len(result["prompt"])
    assert 490 < n_prompt < 512
    assert result["cut"] and len(result["answer"]) == 512 - n_prompt
    context = f"cut at the model's context: 512 tokens, {n_prompt} of them the prompt; a shorter question leaves more room"
    assert answer_stats(capsys.readouterr().err)[0][3] == context
    # --max_new_tokens just fills the context: raising it would not help, a shorter question would
    sample.main(["--out_dir", str(moe_run), "--max_new_tokens", str(512 - n_prompt), question])
    assert answer_stats(capsys.readouterr().err)[0][3] == context
    # a prompt that fills the context is refused before the first question is answered
    with pytest.raises(SystemExit, match=r"^error: question 2's prompt has \d+ tokens; the model reads at most 512"):
        sample.main(["--out_dir", str(moe_run), QUESTION, "apples " * 600])
    assert capsys.readouterr().out == ""


def test_bad_input_is_one_line_before_the_model_is_loaded(moe_run, tmp_path, monkeypatch):
    def load_model(*args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(sample, "load_model", load_model)
    (tmp_path / "latin1.txt").write_bytes("Combien coûte 1 café ?\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "a_file").write_text("x")
    for name, data in (("truncated", (moe_run / "ckpt.pt").read_bytes()[:1000]), ("empty", b"")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(data)
    (tmp_path / "not_a_run").mkdir()
    torch.save({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, tmp_path / "not_a_run" / "ckpt.pt")
    run = ["--out_dir", str(moe_run)]
    png = run + ["--routing_png"]
    cases = [
        (run + ["--file", str(tmp_path / "latin1.txt")], r"--file .*latin1.txt: not UTF-8 text: byte 0xfb at offset 10"),
        (run + ["--file", str(tmp_path / "missing.txt")], "--file .*missing.txt not found"),
        (run + ["--file", str(tmp_path)], "--file .* is a directory"),
        (run + ["--file", str(tmp_path / "blank.txt")], "--file .*blank.txt holds no question"),
        (png + [str(tmp_path / "no" / "such" / "r.png"), QUESTION], "--routing_png .*: there is no folder .*such$"),
        (png + [str(tmp_path / "a_file" / "r.png"), QUESTION], "--routing_png .*: .*a_file is a file, not a folder"),
        (png + [str(tmp_path), QUESTION], "--routing_png .* is a folder: give a file name, e.g. .*routing.png"),
        (png + [str(tmp_path / "r.jpg"), QUESTION], "--routing_png .*r.jpg must be a file name ending in .png"),
        (["--out_dir", str(tmp_path / "a_file"), QUESTION], "--out_dir .*a_file is a file: give the run's folder"),
        (["--out_dir", str(moe_run / "ckpt.pt"), QUESTION], f"--out_dir .* is a file: .* \\(--out_dir {moe_run}\\)"),
        (["--out_dir", str(tmp_path / "truncated"), QUESTION], r"cannot read .*ckpt.pt \(PytorchStreamReader failed"),
        (["--out_dir", str(tmp_path / "empty"), QUESTION], ".*ckpt.pt is empty"),
        (["--out_dir", str(tmp_path / "not_a_run"), QUESTION], ".*ckpt.pt is not a checkpoint train.py wrote"),
        (run + ["--max_new_tokens", "0", QUESTION], "--max_new_tokens 0 must be > 0"),
        # a command line's bytes that are not UTF-8 reach Python as surrogates: "café?" typed in a latin-1 terminal
        (run + ["caf\udce9?"], r"the question is not UTF-8 text: byte 0xe9 at offset 3"),
        (run + ["--input", "caf\udce9", QUESTION], r"--input is not UTF-8 text: byte 0xe9 at offset 3"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match="^error: " + message) as e:
            sample.main(argv)
        assert "\n" not in str(e.value), argv
    # stdin that is not UTF-8, as a pipe gives it (bytes under the text layer)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("un café\n".encode("latin-1"))))
    with pytest.raises(SystemExit, match="^error: stdin is not UTF-8 text: byte 0xe9 at offset 6"):
        sample.main(run)
    # a folder that cannot be written in, and no matplotlib (an optional package)
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda path, mode: False)  # as a read-only folder answers, even to root
        with pytest.raises(SystemExit, match="^error: --routing_png .*: cannot write in the folder"):
            sample.main(png + [str(tmp_path / "r.png"), QUESTION])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
        with pytest.raises(SystemExit, match=r"^error: --routing_png needs matplotlib \(pip install matplotlib\)"):
            sample.main(png + [str(tmp_path / "r.png"), QUESTION])
    # from the command line, with a real pipe: the one line, no traceback
    r = subprocess.run([sys.executable, "sample.py", "--out_dir", str(moe_run)], input=b"caf\xe9?\n", cwd=ROOT,
                       capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stderr.decode() == "error: stdin is not UTF-8 text: byte 0xe9 at offset 3 " \
        "(invalid continuation byte); convert it to UTF-8 (iconv -t UTF-8)\n"
