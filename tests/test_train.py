"""train.py end to end on tiny configs: the real stories260K checkpoint, resume, DDP on CPU, bad input."""
import hashlib
import json
import math
import os
import shutil
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_in_group, shared_path

import evaluate
import moelora
import runs
import train
from data.prompts import eval_prompt_tokens, tokenize_dataset
from data import training
from data.tasks import FAMILIES, load_split
from checkpoints import from_pretrained
from moelora import MoELoRAConfig, inject_moelora
from tokenizer import Tokenizer

sys.path.insert(0, str(ROOT / "tutorial"))
import routing  # noqa: E402  (tutorial/routing.py)
import routing_per_task  # noqa: E402  (tutorial/routing_per_task.py: routing per task, offline)


def small_run(out_dir, *extra, model="stories260K-hf"):
    """Arguments for a run that takes seconds: a few steps of batch 4 on short sequences, 6 test questions."""
    model = model if os.path.isabs(model) else shared_path(f"models/{model}")  # a fixture, or a copy made by the test
    return ["--task", "gsm8k", "--model", str(model), "--data_dir", str(shared_path("data")),
            "--out_dir", str(out_dir), "--max_steps", "4", "--batch_size", "4", "--micro_batch_size", "2",
            "--max_seq_len", "320", "--eval_limit", "6", "--max_new_tokens", "12", "--eval_batch_size", "4",
            "--log_interval", "1", "--num_experts", "4", "--contrastive_weight", "0.1", "--contrastive_samples", "64", *extra]


def run_script(args, env_extra=None, module=None):
    cmd = [sys.executable] + (["-m", module] if module else []) + args
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return run_in_group(cmd, timeout=300, cwd=ROOT, env=env, text=True)  # torchrun's workers die with it


def test_end_to_end_on_stories260k(tmp_path):
    r = run_script(["train.py", *small_run(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gsm8k: accuracy" in r.stdout + r.stderr
    metrics = json.loads((tmp_path / "metrics_gsm8k_first6.json").read_text())  # a subset: files of its own
    assert metrics["n"] == 6 and 0 <= metrics["accuracy"] <= 1 and metrics["answer_loss"] > 0
    preds = [json.loads(l) for l in (tmp_path / "predictions_gsm8k_first6.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all({"prediction", "answer", "correct"} <= p.keys() for p in preds)
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["contrastive"] > 0 and r["balance"] > 0 and len(r["routing"]) == 10 for r in log)  # 5 layers x wq, wv
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    # adapter weights only: no base tensor in the checkpoint
    assert ckpt["step"] == 4 and all("lora_" in k or "router" in k or k == "moelora_config" for k in ckpt["weights"])
    # ... and the same adapters as a safetensors file, read without pickle
    config, tensors = moelora.read_moelora_file(tmp_path / "adapter.safetensors")
    assert config == MoELoRAConfig(**ckpt["weights"]["moelora_config"])
    assert tensors.keys() == ckpt["weights"].keys() - {"moelora_config"}
    assert all(torch.equal(tensors[k], ckpt["weights"][k]) for k in tensors)
    # the routing statistics count the real tokens of the step's last micro-batch, not its padding
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    pairs, _, _ = tokenize_dataset(tok, load_split("gsm8k", "train", shared_path("data")), 320)
    padding_seen = 0
    for record in log:
        last_micro_batch = [pairs[i][0] for i in train.batch_order(len(pairs), 4, 0, 1337)[record["step"] - 1][2:]]
        real = sum(map(len, last_micro_batch))
        assert all(s["tokens"] == real for s in record["routing"].values()), (record["step"], real)
        padding_seen += 2 * max(map(len, last_micro_batch)) - real
    assert padding_seen > 0


def test_built_in_tiny_base_is_built_then_reused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path / "cache"))
    argv = ["--task", "gsm8k", "--data_dir", str(shared_path("data")), "--pretrain_steps", "2", "--max_steps", "1",
            "--batch_size", "2", "--micro_batch_size", "2", "--max_seq_len", "256", "--eval_limit", "2",
            "--max_new_tokens", "4"]
    train.main(argv + ["--out_dir", str(tmp_path / "a")])
    out = capsys.readouterr()
    assert "built-in tiny LLaMA" in out.out + out.err
    base, = (tmp_path / "cache").glob("tiny_base_gsm8k_*")  # in the cache, not in the run's out_dir
    assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= {p.name for p in base.iterdir()}
    stamp = (base / "consolidated.00.pth").stat().st_mtime_ns
    train.main(argv + ["--out_dir", str(tmp_path / "a"), "--eval_only"])  # the base the run recorded
    train.main(argv + ["--out_dir", str(tmp_path / "b"), "--method", "lora"])  # another out_dir: the same base
    out = capsys.readouterr()
    assert "reusing" in out.out + out.err and "pretrain" not in out.out + out.err
    assert (base / "consolidated.00.pth").stat().st_mtime_ns == stamp
    # the built base, given back as --model, keeps the tiny preset
    assert train.parse_args(["--model", str(base)]).preset == "tiny"


def test_the_preset_follows_the_size_of_the_base(tmp_path):
    # read from the checkpoint's config before any weight: stories260K (0.3M) gets tiny's short run at its lr,
    # a LLaMA-7B-shaped checkpoint llama-7b's; --preset still chooses
    args = train.parse_args(["--model", str(shared_path("models/stories260K-hf"))])
    assert args.preset == "tiny" and args.preset_why == "the base has 0.3M parameters"
    seven_b = tmp_path / "7b"
    seven_b.mkdir()
    (seven_b / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                                                     "norm_eps": 1e-5, "vocab_size": -1}))
    torch.save({"tok_embeddings.weight": torch.zeros(32000, 1)}, seven_b / "consolidated.00.pth")  # the shape is read
    args = train.parse_args(["--model", str(seven_b)])
    assert args.preset == "llama-7b" and args.preset_why == "the base has 6,738.4M parameters" and args.lr == 3e-4
    assert train.parse_args(["--model", str(seven_b), "--preset", "tiny"]).lr == 3e-3


def test_warm_up_longer_than_the_run_is_warned(tmp_path, capsys):
    train.main(small_run(tmp_path, "--max_steps", "2", "--warmup_steps", "5", "--eval_limit", "1", "--max_new_tokens", "1"))
    assert "WARNING: --warmup_steps 5 reaches the run's 2 steps" in capsys.readouterr().out


def test_settings_have_one_source_and_help_states_them(capsys):
    # the adapter defaults are MoELoRAConfig's; LoRA's rank defaults to the experts' parameters
    assert train.moelora_config_from(train.parse_args([])) == MoELoRAConfig()
    lora = train.parse_args(["--method", "lora"])
    assert (lora.r, lora.lora_alpha) == (MoELoRAConfig().num_experts * MoELoRAConfig().r, 2.0 * lora.r)
    # a preset fills what the command line leaves out, and the command line wins
    for name, preset in train.PRESETS.items():
        args = train.parse_args(["--preset", name, "--lr", "0.5"])
        assert args.lr == 0.5 and all(getattr(args, k) == v for k, v in preset.items() if k != "lr")
    assert train.parse_args([]).preset == "tiny"
    # resolved once, then read-only: no function changes them behind the reader's back
    settings = train.parse_args(["--lr", "0.5"])
    with pytest.raises(AttributeError, match="read-only"):
        settings.lr = 0.1
    assert settings.lr == 0.5
    # --help states every default: each preset's value of each preset-dependent flag
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in train.PRESETS["tiny"]:
        assert train.preset_default(key) in text, key
    assert "(default 256)" in text and "(default 1337)" in text  # --contrastive_samples, --seed


def adapter_weights(path):
    w = torch.load(path, weights_only=True)["weights"]
    return {k: v for k, v in w.items() if k != "moelora_config"}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    # dropout and the contrastive loss's sampling both draw random numbers: the RNG state must be restored too
    common = ["--eval_limit", "1", "--max_new_tokens", "1", "--save_interval", "100"]
    train.main(small_run(tmp_path / "straight", *common))
    train.main(small_run(tmp_path / "split", *common, "--stop_after", "2"))
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 2
    train.main(small_run(tmp_path / "split", *common, "--resume"))
    a, b = adapter_weights(tmp_path / "straight" / "ckpt.pt"), adapter_weights(tmp_path / "split" / "ckpt.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nf4_base_trains_and_its_run_is_graded_and_asked_again(tmp_path, capsys):
    from quantize import NF4Linear
    train.main(small_run(tmp_path, "--quantize", "nf4", "--max_steps", "2", "--eval_limit", "1", "--max_new_tokens", "2"))
    assert "nf4 linear layers" in capsys.readouterr().out
    model, _, saved = runs.load_run(tmp_path)  # as --eval_only and sample.py open it: quantised again, adapter loaded
    assert saved.settings["quantize"] == "nf4" and isinstance(model.layers[0].attention.wq.base_layer, NF4Linear)
    with pytest.raises(SystemExit, match="--quantize nf4 freezes the base"):
        train.parse_args(small_run(tmp_path / "full", "--quantize", "nf4", "--method", "full"))


def test_int8_base_trains_and_resumes_exactly(tmp_path, capsys):
    # --quantize int8: every linear layer of the base int8 (but an output tied to the embeddings),
    # the adapters train on it, and a run stopped and resumed re-quantises the same bits and ends where one run ends
    from quantize import Int8Linear
    common = ["--quantize", "int8", "--eval_limit", "2", "--max_new_tokens", "2", "--save_interval", "100"]
    straight = train.main(small_run(tmp_path / "straight", *common))
    assert "int8 linear layers" in capsys.readouterr().out and straight["n"] == 2 and straight["answer_loss"] > 0
    train.main(small_run(tmp_path / "split", *common, "--stop_after", "2"))
    train.main(small_run(tmp_path / "split", *common, "--resume"))
    a, b = adapter_weights(tmp_path / "straight" / "ckpt.pt"), adapter_weights(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.endswith("lora_B") and a[k].abs().sum() > 0 for k in a)
    capsys.readouterr()
    train.main(small_run(tmp_path / "split", "--eval_only", "--eval_limit", "1", "--max_new_tokens", "1"))
    assert "int8 linear layers" in capsys.readouterr().out  # --eval_only takes --quantize from the run
    with pytest.raises(SystemExit) as error:
        train.main(small_run(tmp_path / "split", "--eval_only", "--quantize", "none"))
    assert str(error.value) == (f"error: --quantize none, but the run in {tmp_path / 'split'} has --quantize int8 ("
                                f"{tmp_path / 'split' / 'run.json'}): leave those flags out (they come from the run), or "
                                "choose another --out_dir")
    model, _ = runs.new_model(shared_path("models/stories260K-hf"), runs.Precision("cpu", torch.float32), "int8",
                              train.moelora_config_from(train.parse_args(small_run(tmp_path, *common))), seed=0)
    assert isinstance(model.layers[0].attention.wq.base_layer, Int8Linear) and isinstance(model.layers[0].feed_forward.w1, Int8Linear)
    floats = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and "router" not in name]
    assert floats == (["output"] if model.args.tie_word_embeddings else [])  # a tied one is kept, not stored twice


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    # no dropout and no contrastive sampling: then 2 processes x 1 micro-batch must equal 1 process x 2;
    # on a family's mixture, so that the per-source losses are gathered from both processes too
    common = ["--lora_dropout", "0", "--contrastive_weight", "0", "--eval_limit", "1", "--max_new_tokens", "1",
              "--task", "math", "--eval_tasks", "gsm8k"]
    single = run_script(["train.py", *small_run(tmp_path / "single", *common)])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script(["--standalone", "--nproc_per_node=2", "train.py", *small_run(tmp_path / "ddp", *common)],
                     module="torch.distributed.run")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) x 1 micro-batch(es)" in ddp.stdout + ddp.stderr
    a, b = adapter_weights(tmp_path / "single" / "ckpt.pt"), adapter_weights(tmp_path / "ddp" / "ckpt.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    logs = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("single", "ddp")]
    assert set().union(*(r["loss_per_source"] for r in logs[0])) == {"gsm8k", "mawps"}
    for one, two in zip(*logs):  # the sources that the steps since the last line drew
        assert one["loss_per_source"].keys() == two["loss_per_source"].keys()
        for source in one["loss_per_source"]:
            assert one["loss_per_source"][source] == pytest.approx(two["loss_per_source"][source], rel=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, dtype):
    with pytest.raises(SystemExit, match=r"at step \d.*last good checkpoint .*ckpt.pt \(step \d\)"):
        train.main(small_run(tmp_path, "--lr", "1e30", "--warmup_steps", "0", "--save_interval", "1",
                             "--method", "lora", "--r", "4", "--dtype", dtype))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for k, v in ckpt["weights"].items() if k != "moelora_config")


def test_checkpoint_from_another_config_or_base_is_refused(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(shared_path("models/stories260K-hf"), base)
    run = tmp_path / "run"
    train.main(small_run(run, "--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "1", model=str(base)))
    with pytest.raises(SystemExit, match=r"^error: --num_experts 2, but the run in .* has --num_experts 4 \(.*run.json\)"):
        train.main(small_run(run, "--num_experts", "2", "--eval_only", "--eval_limit", "1", model=str(base)))
    with pytest.raises(SystemExit, match=r"^error: --model .*stories260K.bin, but the run in .* has --model .*base \("):
        train.main(small_run(run, "--eval_only", "--eval_limit", "1", model="stories260K/stories260K.bin"))
    (run / "run.json").unlink()  # a run of an older version: ckpt.pt's config says the same
    with pytest.raises(SystemExit, match=r"^error: --num_experts 2, but the run in .* has --num_experts 4 \(.*ckpt.pt\)"):
        train.main(small_run(run, "--num_experts", "2", "--eval_only", "--eval_limit", "1", model=str(base)))
    # the base at the same path, changed since: its fingerprint differs, said in one short line
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-3)))
    with pytest.raises(SystemExit) as error:
        train.main(small_run(run, "--eval_only", "--eval_limit", "1", model=str(base)))
    message = str(error.value)
    assert message.startswith(f"error: {run / 'ckpt.pt'} was trained on another base than {base}") and "norm_eps" in message
    assert len(message) < 300 and "{" not in message


def test_contrastive_warmup_scales_the_contrastive_loss(tmp_path):
    # step 1 of a run with --contrastive_warmup 4 adds a quarter of what the same step adds without it (the
    # parameters, batch and samples of step 1 are the same); the ramp reaches the full weight at step 4
    common = ["--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "1"]
    train.main(small_run(tmp_path / "full", *common))
    train.main(small_run(tmp_path / "warm", *common, "--contrastive_warmup", "4"))
    full, warm = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("full", "warm"))
    assert full["contrastive"] > 0
    assert warm["contrastive"] == pytest.approx(full["contrastive"] / 4, rel=1e-5)
    assert warm["loss"] == pytest.approx(full["loss"], rel=1e-6)  # the language-model loss is untouched
    args = train.parse_args(["--contrastive_warmup", "4"])
    assert [train.contrastive_ramp(args, s) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert train.contrastive_ramp(train.parse_args([]), 0) == 1


def test_switch_gate_at_top_1_with_the_router_stabilisers(tmp_path, capsys):
    out = tmp_path / "switch"
    train.main(small_run(out, "--gate", "switch", "--top_k", "1", "--router_z_weight", "1e-3", "--router_jitter",
                         "0.01", "--max_steps", "2", "--eval_limit", "1", "--max_new_tokens", "1"))
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["router_z"] > 0 and r["balance"] > 0 for r in log) and " router z " in capsys.readouterr().out
    config = MoELoRAConfig(**torch.load(out / "ckpt.pt", weights_only=True)["weights"]["moelora_config"])
    assert (config.gate, config.top_k, config.router_z_weight, config.router_jitter) == ("switch", 1, 1e-3, 0.01)
    with pytest.raises(SystemExit, match="--gate mixtral, but the run in .* has --gate switch"):
        train.main(small_run(out, "--eval_only", "--gate", "mixtral", "--top_k", "2"))


def test_method_lora_and_full_train(tmp_path):
    train.main(small_run(tmp_path / "lora", "--method", "lora", "--r", "8", "--max_steps", "2", "--eval_limit", "1"))
    w = adapter_weights(tmp_path / "lora" / "ckpt.pt")
    assert w["layers.0.attention.wq.lora_A"].shape == (1, 8, 64)  # one expert of rank 8
    train.main(small_run(tmp_path / "full", "--method", "full", "--max_steps", "2", "--eval_limit", "1"))
    assert "tok_embeddings.weight" in torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["weights"]


def test_bad_input_gives_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": oops}]')
    with pytest.raises(SystemExit, match=r"bad.json.*line 2"):
        train.main(small_run(tmp_path, "--train_file", str(bad)))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(SystemExit, match="empty"):
        train.main(small_run(tmp_path, "--train_file", str(empty)))
    with pytest.raises(SystemExit):  # argparse lists the tasks it knows
        train.main(small_run(tmp_path) + ["--task", "hellaswag"])
    with pytest.raises(SystemExit, match="match no nn.Linear"):
        train.main(small_run(tmp_path, "--target_modules", "q_proj"))
    with pytest.raises(SystemExit, match="--resume given but"):
        train.main(small_run(tmp_path / "fresh", "--resume"))
    with pytest.raises(SystemExit, match="cannot load --model"):
        train.main(small_run(tmp_path) + ["--model", str(tmp_path)])


# --- the paper's protocol: a family's mixture, every benchmark graded, routing per task

def family_run(out_dir, task, *extra, model="stories260K-hf"):
    """A run of seconds on a family: 2 steps, 3 questions per benchmark, short answers."""
    argv = ["--task", task, "--data_dir", str(shared_path("data")), "--out_dir", str(out_dir), "--max_steps", "2",
            "--batch_size", "4", "--micro_batch_size", "4", "--max_seq_len", "256", "--eval_limit", "3",
            "--max_new_tokens", "4", "--eval_batch_size", "4", "--log_interval", "1", "--num_experts", "4",
            "--contrastive_weight", "0.1", "--contrastive_samples", "64", *extra]
    return argv + (["--model", str(shared_path(f"models/{model}"))] if model else ["--pretrain_steps", "2"])


def test_math_family_on_the_built_in_tiny_base(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path / "cache"))
    train.main(family_run(tmp_path, "math", model=None))
    out = capsys.readouterr()
    text = out.out + out.err
    # the stand-in mixture: GSM8K and MAWPS train splits, without the questions the benchmarks ask
    assert "mawps" in text and "321" in text  # MAWPS' train split repeats 321 AddSub questions
    results = json.loads((tmp_path / "results_math_first3.json").read_text())
    assert list(results["benchmarks"]) == list(FAMILIES["math"]) and results["missing"] == {}
    assert all(r["n"] == 3 for r in results["benchmarks"].values())
    mean = sum(r["accuracy"] for r in results["benchmarks"].values()) / 6
    assert results["average_accuracy"] == pytest.approx(mean)
    table = (tmp_path / "results_math_first3.md").read_text()
    assert table.startswith("| model | method | addsub | aqua | gsm8k | multiarith | singleeq | svamp | average |")
    for task in FAMILIES["math"]:
        assert (tmp_path / f"predictions_{task}_first3.jsonl").exists()
    # a training loss per source in metrics.jsonl
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*(r["loss_per_source"] for r in log)) == {"gsm8k", "mawps"}
    # routing per task, offline from the checkpoint, after training and with the routers as drawn, in [0, H(task)]
    assert f"python tutorial/routing_per_task.py {tmp_path}" in text
    routing = json.loads(routing_per_task.routing_of_run(tmp_path).read_text())
    assert routing_per_task.routing_of_run(tmp_path).name == "routing_math_first3.json"
    assert routing["tasks"] == list(FAMILIES["math"])
    for layer in routing["layers"].values():
        for which in ("trained", "initial"):
            assert 0 <= layer[which]["mi_bits"] <= routing["h_task_bits"] + 1e-9
            assert len(layer[which]["expert_share"]) == 6 and len(layer[which]["expert_share"][0]) == 4
    # the built base, given back as --model, keeps the tiny preset
    assert train.parse_args(["--model", str(next((tmp_path / "cache").glob("tiny_base_math_*")))]).preset == "tiny"


def test_commonsense_family_reports_the_missing_benchmark(tmp_path, capsys):
    train.main(family_run(tmp_path, "commonsense", "--max_steps", "1"))
    results = json.loads((tmp_path / "results_commonsense_first3.json").read_text())
    assert "hellaswag" in results["missing"] and "hellaswag" not in results["benchmarks"]
    assert list(results["benchmarks"]) == [t for t in FAMILIES["commonsense"] if t != "hellaswag"]
    table = (tmp_path / "results_commonsense_first3.md").read_text()
    assert "| missing |" in table and "average is over the 7 graded benchmarks" in table
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(log[0]["loss_per_source"]) <= {"boolq", "arc_e", "arc_c", "obqa"} and log[0]["loss_per_source"]


@pytest.mark.slow
def test_eval_tasks_grades_a_list_and_ddp_splits_evaluation_exactly(tmp_path):
    # 2 processes grade alternate batches; gathered, predictions and table equal one process's
    common = ["--eval_only", "--eval_tasks", "gsm8k,svamp,boolq", "--eval_limit", "6", "--eval_batch_size", "2",
              "--max_new_tokens", "6"]
    single = run_script(["train.py", *small_run(tmp_path / "single", *common)])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script(["--standalone", "--nproc_per_node=2", "train.py", *small_run(tmp_path / "ddp", *common)],
                     module="torch.distributed.run")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for name in ["results_gsm8k_first6.md"] + [f"predictions_{t}_first6.jsonl" for t in ("gsm8k", "svamp", "boolq")]:
        assert (tmp_path / "single" / name).read_text() == (tmp_path / "ddp" / name).read_text(), name
    a, b = (json.loads((tmp_path / d / "metrics_gsm8k_first6.json").read_text()) for d in ("single", "ddp"))
    assert a["answer_loss"] == b["answer_loss"] and a["n"] == 6


def test_routing_per_task_finds_a_router_that_separates_the_tasks():
    # layer 0's routers see the embeddings themselves: give the two tasks' question tokens opposite signs on
    # one dimension and point two experts along it. Their tokens then never share a top-1 expert, and
    # I(task; expert) must equal H(task); routers that ignore that dimension must give 0.
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    model = from_pretrained(shared_path("models/stories260K-hf"))
    inject_moelora(model, MoELoRAConfig(num_experts=4, top_k=2, r=2))
    tests = {"a": [{"instruction": "cat dog cat", "input": "", "output": "", "answer": "1"}] * 3,
             "b": [{"instruction": "sun moon sun moon", "input": "", "output": "", "answer": "2"}] * 2}
    spans = routing_per_task.question_spans([eval_prompt_tokens(tok, ex) for exs in tests.values() for ex in exs])
    prompts = [eval_prompt_tokens(tok, ex) for exs in tests.values() for ex in exs]
    ids = {t: {prompts[i][j] for i in rows for j in range(*spans[i])} for t, rows in (("a", range(3)), ("b", range(3, 5)))}
    assert ids["a"] and ids["b"] and not ids["a"] & ids["b"]
    with torch.no_grad():
        for task, sign in (("a", 1.0), ("b", -1.0)):
            model.tok_embeddings.weight[sorted(ids[task]), 0] = sign * 100.0
            model.tok_embeddings.weight[sorted(ids[task]), 1] = 100.0  # the same in both tasks
        for name in ("wq", "wv"):
            router = getattr(model.layers[0].attention, name).router.weight  # [4, dim]
            router.zero_()
            router[0, 0], router[1, 0] = 1.0, -1.0
    counts = routing_per_task.routing_counts(model, tok, tests, batch_size=2)
    top1 = counts["layers.0.attention.wq"][0]  # [tasks, experts]
    h_task = routing.entropy_bits(top1.sum(1))
    assert top1[0, 0] == top1[0].sum() and top1[1, 1] == top1[1].sum()
    assert routing.mutual_information_bits(top1) == pytest.approx(h_task) and h_task > 0.5
    with torch.no_grad():
        model.layers[0].attention.wq.router.weight.zero_()
        model.layers[0].attention.wq.router.weight[2, 1] = 1.0  # expert 2 wins whatever the task
    top1 = routing_per_task.routing_counts(model, tok, tests, batch_size=2)["layers.0.attention.wq"][0]
    assert top1[:, 2].sum() == top1.sum()
    assert routing.mutual_information_bits(top1) == pytest.approx(0.0, abs=1e-12)


# --- never lose a user's work

@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr -1.0 must be > 0"), (["--batch_size", "0"], "--batch_size 0 must be > 0"),
    (["--micro_batch_size", "0"], "--micro_batch_size 0 must be > 0"), (["--max_steps", "0"], "--max_steps 0 must be > 0"),
    (["--max_steps", "-5"], "--max_steps -5 must be > 0"), (["--log_interval", "0"], "--log_interval 0 must be > 0"),
    (["--save_interval", "0"], "--save_interval 0 must be > 0"), (["--eval_batch_size", "0"], "--eval_batch_size 0"),
    (["--eval_limit", "0"], "--eval_limit 0 must be > 0"), (["--top_k", "9"], "--top_k 9 must be between 1 and --num_experts 8"),
    (["--lora_dropout", "1"], "--lora_dropout 1.0 must be in"), (["--resume", "--overwrite"], "contradict"),
    (["--micro_batch_size", "32", "--batch_size", "16"], "--micro_batch_size 32 must be at most --batch_size 16"),
    (["--contrastive_warmup", "-1"], "--contrastive_warmup -1 must be >= 0"),
    (["--target_modules", "q_proj,v_proj"], "--target_modules ['q_proj', 'v_proj'] match no nn.Linear"),
    (["--target_modules", "q_proj"], "Hugging Face's are q_proj -> wq, k_proj -> wk, v_proj -> wv"),
    (["--eval_kind", "number"], "--eval_kind number grades an --eval_file"),
    (["--quantize", "int8", "--method", "full"], "--quantize int8 freezes the base: it trains adapters"),
    (["--top_k", "1"], "--top_k 1 with --gate 'mixtral' would train no router"),
    (["--router_jitter", "1"], "--router_jitter 1.0 must be in [0, 1)"),
    (["--router_z_weight", "-1"], "--router_z_weight -1.0 must be >= 0"),
])
def test_bad_flags_are_one_line_errors_before_any_work(flags, message):
    with pytest.raises(SystemExit, match=f"^error: .*{re.escape(message)}"):
        train.parse_args(flags)


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    # torchrun --nproc_per_node 2 on a one-GPU machine: rank 1 would fail deep in CUDA ("invalid device ordinal")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match="started 2 processes on this node, which has 1 GPU.*--nproc_per_node 1"):
        runs.setup_distributed(None)  # no --device: what a GPU machine's defaults would give


def test_cuda_asked_on_a_cpu_only_torch():  # conftest hides any GPU, so this runs on every machine
    with pytest.raises(SystemExit, match="--device cuda, but this torch has no usable CUDA"):
        train.parse_args(["--device", "cuda"])


def test_bad_inputs_are_one_line_errors(tmp_path):
    null_output = tmp_path / "null.json"
    null_output.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": null}]')
    with pytest.raises(SystemExit, match=r'null.json: record 1: "output" is null, not a string$'):
        train.main(small_run(tmp_path / "a", "--train_file", str(null_output)))
    few = tmp_path / "few.json"
    few.write_text(json.dumps([{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(10)]))
    with pytest.raises(SystemExit, match="the built-in tiny base needs more training text than 10 examples"):
        train.main(["--task", "gsm8k", "--data_dir", str(shared_path("data")), "--out_dir", str(tmp_path / "b"),
                    "--train_file", str(few), "--pretrain_steps", "1"])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 8, "vocab_size": 512}))
    (garbage / "consolidated.00.pth").write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(SystemExit, match="cannot load --model .*consolidated.00.pth is not a readable PyTorch checkpoint"):
        train.main(small_run(tmp_path / "c") + ["--model", str(garbage)])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out_dir"):
        train.main(small_run(a_file / "out"))
    with pytest.raises(SystemExit, match="--resume given but .* does not exist; leave out --resume"):
        train.main(["--task", "gsm8k", "--data_dir", str(shared_path("data")), "--out_dir", str(tmp_path / "d"),
                    "--resume"])  # said before the tiny base is built
    assert not list((tmp_path / "d").glob("tiny_base_*"))


def test_a_checkpoint_is_never_replaced_unasked(tmp_path, capsys):
    common = ["--max_steps", "2", "--eval_limit", "2", "--max_new_tokens", "2"]
    train.main(small_run(tmp_path, *common))
    with pytest.raises(SystemExit, match="holds a checkpoint.*--resume.*--overwrite"):
        train.main(small_run(tmp_path, *common))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    train.main(small_run(tmp_path, "--max_steps", "1", "--eval_limit", "2", "--max_new_tokens", "2", "--overwrite"))
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    # the earlier run's results moved aside, not mixed with the new run's; each result file says what it graded
    aside, = tmp_path.glob("earlier_*")
    assert {f.name for f in aside.iterdir()} == {"metrics_gsm8k_first2.json", "predictions_gsm8k_first2.jsonl", "ckpt.pt",
                                                 "adapter.safetensors", "metrics.jsonl", "run.json", "curves.png"}
    assert json.loads((aside / "metrics_gsm8k_first2.json").read_text())["step"] == 2
    metrics = json.loads((tmp_path / "metrics_gsm8k_first2.json").read_text())
    assert metrics["step"] == 1 and metrics["base"] == str(shared_path("models/stories260K-hf"))
    assert metrics["adapter"]["num_experts"] == 4 and metrics["adapter"]["target_modules"] == ["wq", "wv"]
    # grading a subset writes files of its own: the full grading's are not replaced
    (tmp_path / "metrics_gsm8k.json").write_text("full grading")
    train.main(small_run(tmp_path, "--eval_only", "--eval_limit", "1", "--max_new_tokens", "1"))
    assert (tmp_path / "metrics_gsm8k.json").read_text() == "full grading"
    assert json.loads((tmp_path / "metrics_gsm8k_first1.json").read_text())["n"] == 1


def test_resume_after_a_kill_logs_each_step_once(tmp_path):
    common = ["--max_steps", "4", "--save_interval", "2", "--eval_limit", "1", "--max_new_tokens", "1"]
    train.main(small_run(tmp_path, *common, "--stop_after", "2"))
    with open(tmp_path / "metrics.jsonl", "a") as f:  # what a run killed after logging step 3 leaves behind
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    train.main(small_run(tmp_path, *common, "--resume"))
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] != 9.0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    # SIGTERM (what SLURM and Kubernetes send) in the middle of training: the step finishes, a checkpoint is
    # saved, the exit status is 128 + 15, and --resume ends with the weights of an uninterrupted run
    common = ["--max_steps", "40", "--save_interval", "100", "--eval_limit", "1", "--max_new_tokens", "1"]
    train.main(small_run(tmp_path / "straight", *common))
    cmd = [sys.executable, "train.py", *small_run(tmp_path / "split", *common)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "split" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:]
    assert "SIGTERM: stopping after this step; a second signal stops at once without saving" in out
    assert "stopped by SIGTERM after step" in out and "--resume" in out
    stopped_at = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 40
    train.main(small_run(tmp_path / "split", *common, "--resume"))
    a, b = adapter_weights(tmp_path / "straight" / "ckpt.pt"), adapter_weights(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


STUCK_IN_NATIVE_CODE = """
import sys, time
from pathlib import Path
import torch
from runs import Precision, Run, catch_stop_signals
torch.set_num_threads(1)
a = torch.randn(10000, 10000)
with catch_stop_signals(Run(0, 1, Precision("cpu", torch.float32), None, Path("."))) as stop:
    print("ready", flush=True)
    start = time.time()
    a @ a  # one C++ call of 2 TFLOP: tens of seconds in which no Python signal handler can run
    print(f"the matmul ended after {time.time() - start:.0f} s", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_even_inside_a_long_native_call(sig):
    # a job scheduler's second SIGTERM, or Ctrl-C pressed twice, while the process is inside a backward at 7B or a
    # collective that a dead peer never joins: the process must end within seconds, not when the call returns
    proc = subprocess.Popen([sys.executable, "-c", STUCK_IN_NATIVE_CODE], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        proc.send_signal(sig)
        time.sleep(0.5)
        second = time.time()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(sig).name
    assert time.time() - second < 3, out
    assert proc.returncode == 128 + sig and "the matmul ended" not in out, out
    assert out.splitlines() == [f"{name}: stopping after this step; a second signal stops at once without saving",
                                f"{name} again: stopping now, without saving"]


@pytest.mark.slow
def test_same_command_same_result_with_or_without_a_cached_base(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path / "cache"))
    argv = ["--task", "gsm8k", "--data_dir", str(shared_path("data")), "--pretrain_steps", "2", "--max_steps", "1",
            "--batch_size", "2", "--micro_batch_size", "2", "--max_seq_len", "256", "--eval_limit", "1",
            "--max_new_tokens", "1"]
    train.main(argv + ["--out_dir", str(tmp_path)])  # builds the base, then trains
    fresh = adapter_weights(tmp_path / "ckpt.pt")
    train.main(argv + ["--out_dir", str(tmp_path), "--overwrite"])  # reuses it
    cached = adapter_weights(tmp_path / "ckpt.pt")
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    # other pretraining settings make another base, in a directory of its own
    train.main(argv + ["--out_dir", str(tmp_path), "--overwrite", "--pretrain_steps", "3"])
    assert len(list((tmp_path / "cache").glob("tiny_base_gsm8k_*"))) == 2


@pytest.mark.slow
def test_torchrun_with_the_preset_micro_batch(tmp_path):
    # the tiny preset's micro-batch is the whole batch of 16: with 2 processes each gets 8
    r = run_script(["--standalone", "--nproc_per_node=2", "train.py", "--task", "gsm8k", "--preset", "tiny",
                    "--model", str(shared_path("models/stories260K-hf")), "--data_dir", str(shared_path("data")),
                    "--out_dir", str(tmp_path), "--max_steps", "1", "--max_seq_len", "256", "--eval_limit", "2",
                    "--max_new_tokens", "2", "--num_experts", "4"], module="torch.distributed.run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--micro_batch_size 8: the preset's, made to fit 2 processes" in r.stdout + r.stderr


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_on_the_cpu(tmp_path, dtype, monkeypatch):
    # the CUDA branches of train.py, run on the CPU: autocast, a base stored in the low dtype, fp32 adapters
    train.main(small_run(tmp_path, "--device", "cpu", "--dtype", dtype, "--max_steps", "2", "--eval_limit", "2",
                         "--max_new_tokens", "2"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ckpt["weights"].items() if k != "moelora_config")
    assert ckpt["scaler"] == {} if dtype == "bf16" else ckpt["scaler"]["scale"] > 0
    # the run held its base in the low dtype: it opens in float32 all the same (the base's check allows for it)
    _, _, saved = runs.load_run(tmp_path, runs.Precision("cpu", torch.float32))
    assert saved.step == 2 and saved.weights.name == "adapter.safetensors"
    if dtype == "fp16":
        # fp16's first step overflows at the scaler's initial 2^16 and is skipped; the second step is taken.
        # An inf put into the second step's gradient must make the scaler skip that one too and halve again
        B = [v for k, v in ckpt["weights"].items() if k.endswith("lora_B")]
        assert ckpt["scaler"]["scale"] == 2.0 ** 15 and any(v.abs().max() > 0 for v in B)
        original, calls = train.forward_backward, []

        def with_an_inf(run, args, model, raw_model, *rest):
            out = original(run, args, model, raw_model, *rest)
            calls.append(1)
            if len(calls) == 2:
                next(p for p in raw_model.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
            return out
        monkeypatch.setattr(train, "forward_backward", with_an_inf)
        train.main(small_run(tmp_path / "inf", "--device", "cpu", "--dtype", "fp16", "--max_steps", "2",
                             "--eval_limit", "2", "--max_new_tokens", "2"))
        skipped = torch.load(tmp_path / "inf" / "ckpt.pt", weights_only=True)
        assert skipped["scaler"]["scale"] == 2.0 ** 14
        assert all(torch.equal(v, torch.zeros_like(v)) for k, v in skipped["weights"].items() if k.endswith("lora_B"))


def test_gpu_checklist_uses_flags_that_exist():
    # benchmarks/gpu_checklist.sh runs only where a GPU is: check here that it parses and that every flag it
    # gives a script is one the script knows, so that it cannot rot between GPU sessions
    script = ROOT / "benchmarks" / "gpu_checklist.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    arrays = dict(re.findall(r"^(\w+)=\(([^)]*)\)", text, flags=re.M))  # NAME=(--flag value ...), given as "${NAME[@]}"
    assert {"STORIES", "SEVEN_B"} <= arrays.keys()
    text = re.sub(r'"\$\{(\w+)\[@\][^}]*\}"', lambda m: " ".join(arrays[m.group(1)].split()), text)
    calls = re.findall(r"(train\.py|benchmarks/\w+\.py)\s+([^\n]*)", text)
    assert {name for name, _ in calls} == {"train.py", "benchmarks/bench_cross_entropy.py", "benchmarks/bench_vs_hf.py",
                                           "benchmarks/bench_quantize.py"}
    for name, rest in calls:
        known = set(re.findall(r"""["'](--\w+)["']""", (ROOT / name).read_text()))
        for flag in re.findall(r"(--\w+)", rest):
            assert flag in known, f"{name} has no {flag}"


def test_the_docs_use_flags_that_exist(capsys):
    # README.md and tutorial.md tell users what to type: every --flag they name must be one train.py or sample.py takes
    import sample
    known = {"nproc_per_node"}  # torchrun's
    for parse in (train.parse_args, sample.parse_args):
        with pytest.raises(SystemExit):
            parse(["--help"])
        known |= set(re.findall(r"--(\w+)", capsys.readouterr().out))
    for doc in ("README.md", "tutorial.md"):
        named = set(re.findall(r"(?<![\w-])--(\w+)", (ROOT / doc).read_text()))
        assert named and not named - known, f"{doc} names flags train.py does not take: {sorted(named - known)}"


def test_a_prompt_longer_than_the_context_is_cut_and_counted():
    # some commonsense prompts pass 800 tokens; stories260K reads 512: the prompt keeps its end and the answer room
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    model = from_pretrained(shared_path("models/stories260K-hf"))
    run = runs.Run(0, 1, runs.Precision("cpu", torch.float32), torch.amp.GradScaler("cuda", enabled=False), None)
    args = train.parse_args(["--max_new_tokens", "8", "--eval_batch_size", "2"])
    examples = [{"instruction": "Once upon a time " * 200 + "Answer format: true/false", "input": "", "output": "",
                 "answer": "true"}, {"instruction": "Is the sky blue?", "input": "", "output": "", "answer": "true"}]
    assert len(eval_prompt_tokens(tok, examples[0])) > 512
    responses, n_cut = evaluate.generate_responses(args, run, model, tok, "boolq", examples)
    assert n_cut == 1 and len(responses) == 2


def test_your_own_test_file_is_graded_by_its_kind(tmp_path, capsys):
    # --eval_file takes --train_file's records with an answer; the kind is inferred (and printed) or given
    numbers = tmp_path / "my_numbers.json"
    numbers.write_text(json.dumps([{"instruction": f"What is {i} + 1?", "output": f"The answer is {i + 1}.",
                                    "answer": str(i + 1)} for i in range(3)]))
    def grade(*flags):  # the base with its no-op adapters: the grading is what is tested
        return train.main([a for a in small_run(tmp_path / "out", "--eval_only", "--max_new_tokens", "3") if a != "--eval_limit"
                           and a != "6"] + list(flags))
    grade("--eval_file", str(numbers))
    assert "graded as --eval_kind number: every answer is a number" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics_my_numbers.json").read_text())
    assert metrics["n"] == 3 and metrics["graded_as"] == "number" and metrics["answer_loss"] > 0  # outputs: a loss
    assert not (tmp_path / "out" / "metrics_gsm8k.json").exists()  # instead of the task's benchmark
    predictions = [json.loads(l) for l in (tmp_path / "out" / "predictions_my_numbers.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in predictions] == ["1", "2", "3"]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"instruction": f"Is {i} even?", "answer": ["yes", "no"][i % 2]} for i in range(4)]))
    grade("--eval_file", str(labels), "--eval_tasks", "gsm8k", "--eval_limit", "2")
    assert "graded as --eval_kind choice: the answers are 2 one-word labels (no, yes)" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results_gsm8k_first2.json").read_text())
    assert set(results["benchmarks"]) == {"gsm8k", "labels"} and results["benchmarks"]["labels"]["answer_loss"] is None
    with pytest.raises(SystemExit, match="labels.json: record 0 lacks answer"):
        labels.write_text(json.dumps([{"instruction": "Is 1 even?", "output": "no"}]))
        grade("--eval_file", str(labels))


# --- what --help promises about the schedule and the clipping

def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_a_tenth():
    # --help: "linear warm-up, then cosine decay to lr/10"; the values written out, not recomputed from get_lr
    lr, warmup, total = 1.0, 10, 110
    assert [train.get_lr(s, lr, warmup, total) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert train.get_lr(10, lr, warmup, total) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert train.get_lr(60, lr, warmup, total) == pytest.approx(0.55)  # half way: lr/10 + (lr - lr/10) / 2
    assert train.get_lr(110, lr, warmup, total) == pytest.approx(0.1)  # the end: a tenth, not 0
    lrs = [train.get_lr(s, lr, warmup, total) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup])) and all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert min(lrs[warmup:]) > 0.1 and train.get_lr(0, 3e-4, 0, 5) == pytest.approx(3e-4)  # no warm-up: the peak at once


def test_a_run_logs_the_promised_schedule(tmp_path):
    # the learning rate the loop sets is the one logged: 4 steps of warm-up 2, then the cosine to lr/10 over 2 more
    train.main(small_run(tmp_path, "--max_steps", "4", "--warmup_steps", "2", "--lr", "1e-3", "--eval_limit", "1",
                         "--max_new_tokens", "1"))
    logged = [json.loads(l)["lr"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4])


@pytest.mark.parametrize("clip, expected_norm", [(1.0, 1.0), (0.25, 0.25), (0.0, 20.0)])
def test_gradient_clipping_caps_the_norm_of_the_step(clip, expected_norm):
    # --grad_clip c rescales a gradient of norm 20 to norm c before the step; 0 turns clipping off. Plain SGD at
    # lr 1 makes the step equal to the gradient it was given, so the step's norm shows what clipping did
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 10.0)  # norm 20
    optimizer = torch.optim.SGD([p], lr=1.0)
    run = runs.Run(0, 1, runs.Precision("cpu", torch.float32), torch.amp.GradScaler("cuda", enabled=False), None)
    args = train.parse_args(["--grad_clip", str(clip)])
    train.optimizer_step(args, run, optimizer, [p], {"lm": 1.0, "contrastive": 0.0, "balance": 0.0}, 0, None)
    assert p.detach().norm().item() == pytest.approx(expected_norm, rel=1e-5)
    assert p.grad is None  # zeroed for the next step


# --- a run never loses a trained adapter, says what it is, and checks itself while it trains

def snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished small run (2 steps, graded on one question): its folder and its files' bytes."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    train.main(small_run(folder, "--max_steps", "2", "--eval_limit", "1", "--max_new_tokens", "2"))
    return folder, snapshot(folder)


def test_a_failed_overwrite_keeps_the_earlier_run_byte_for_byte(trained_run, tmp_path):
    folder, files = trained_run
    assert {"ckpt.pt", "adapter.safetensors", "metrics.jsonl", "run.json", "metrics_gsm8k_first1.json",
            "predictions_gsm8k_first1.jsonl"} <= set(files)
    malformed = tmp_path / "malformed.json"
    malformed.write_text('[{"instruction": "a", "output": "b"},')
    cases = [(["--train_file", str(tmp_path / "missing.json")], "missing.json not found"),
             (["--train_file", str(malformed)], "invalid JSON"),
             (["--train_file", str(tmp_path)], "is a directory"),
             (["--eval_tasks", "foo"], "unknown benchmark"),
             (["--batch_size", "16", "--micro_batch_size", "5"], "must be a multiple of --micro_batch_size"),
             (["--max_seq_len", "8"], "no training example is left"),
             (["--batch_size", "8", "--micro_batch_size", "4", "--train_file", str(write_records(tmp_path, 3))],
              "fewer than one batch")]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            train.main(small_run(folder, "--max_steps", "2", "--overwrite", *flags))
        assert snapshot(folder) == files, flags  # nothing moved, nothing deleted, nothing added
        with pytest.raises(SystemExit, match=message):  # a new run that fails leaves no folder behind
            train.main(small_run(tmp_path / "new" / "run", "--max_steps", "2", *flags))
        assert not (tmp_path / "new").exists(), flags


def write_records(folder: Path, n: int) -> Path:
    path = folder / f"records_{n}.json"
    path.write_text(json.dumps([{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(n)]))
    return path


def test_overwrite_moves_everything_the_earlier_run_wrote(trained_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(trained_run[0], folder)
    files = snapshot(folder)
    train.main(small_run(folder, "--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "2", "--overwrite"))
    aside, = folder.glob("earlier_*")
    assert snapshot(aside) == files  # every file, byte for byte
    assert torch.load(folder / "ckpt.pt", weights_only=True)["step"] == 1
    new_id = json.loads((folder / "run.json").read_text())["run_id"]
    assert new_id != json.loads(files["run.json"])["run_id"]


def test_run_json_says_what_the_run_was_and_every_result_points_to_it(trained_run, tmp_path):
    folder, files = trained_run
    info = json.loads(files["run.json"])
    settings = info["settings"]
    assert settings["lr"] == 3e-3 and settings["max_steps"] == 2 and settings["seed"] == 1337
    assert settings["quantize"] == "none" and settings["method"] == "moelora" and settings["num_experts"] == 4
    assert info["base"]["path"] == str(shared_path("models/stories260K-hf")) and info["base"]["args"]["dim"] == 64
    assert info["data"]["train_examples"]["n"] == 7473 and len(info["data"]["train_examples"]["sha256"]) == 64
    assert info["data"]["test_sets"]["gsm8k"]["n"] == 1
    assert info["torch"] == torch.__version__ and info["device"] == "cpu" and info["autocast"] == "float32"
    assert info["code"] is None or len(info["code"]["commit"]) == 40
    metrics = json.loads(files["metrics_gsm8k_first1.json"])
    assert metrics["run_id"] == info["run_id"] and metrics["quantize"] == "none" and metrics["step"] == 2
    assert all(json.loads(line)["run_id"] == info["run_id"]
               for line in files["predictions_gsm8k_first1.jsonl"].decode().splitlines())
    # a user's own files are recorded with their hash; --resume refuses data that changed since
    run = tmp_path / "own"
    own = write_records(tmp_path, 40)
    common = ["--train_file", str(own), "--max_steps", "4", "--eval_limit", "1", "--max_new_tokens", "1"]
    train.main(small_run(run, *common, "--stop_after", "2"))
    recorded = json.loads((run / "run.json").read_text())["data"]["files"]["train_file"]
    assert recorded["sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    own.write_text(json.dumps([{"instruction": f"other {i}", "output": f"answer {i}"} for i in range(40)]))
    with pytest.raises(SystemExit, match="the training examples changed since the run started"):
        train.main(small_run(run, *common, "--resume"))
    with pytest.raises(SystemExit, match=r"--seed 7, but the run in .* has --seed 1337"):
        train.main(small_run(run, *common, "--resume", "--seed", "7"))


def test_resume_takes_every_setting_not_given_from_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(small_run(run, "--max_steps", "4", "--eval_limit", "1", "--max_new_tokens", "1", "--stop_after", "2",
                         "--lr", "0.01"))
    capsys.readouterr()
    # only the out_dir and --resume: the base, the adapter, the data and the schedule are the run's
    result = train.main(["--out_dir", str(run), "--resume", "--data_dir", str(shared_path("data")), "--lr", "0.02"])
    out = capsys.readouterr().out
    assert "--resume: --lr 0.02 (the run had 0.01)" in out and "resumed from" in out and result["n"] == 1
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[2])["lr"] == pytest.approx(
        train.get_lr(2, 0.02, 10, 4))


def test_validation_loss_best_checkpoint_and_the_last_k(tmp_path):
    run = tmp_path / "run"
    train.main(small_run(run, "--max_steps", "6", "--eval_interval", "2", "--val_examples", "8", "--keep_last", "2",
                         "--save_interval", "1", "--eval_limit", "1", "--max_new_tokens", "1", "--lr", "0.03",
                         "--warmup_steps", "0"))
    log = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert list(val) == [2, 4, 6] and all(math.isfinite(v) for v in val.values())
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == {"step": min(val, key=val.get), "val_loss": min(val.values())}
    assert torch.load(run / "best" / "ckpt.pt", weights_only=True)["step"] == best["step"]
    assert sorted(f.name for f in (run / "checkpoints").iterdir()) == ["step_0000005.pt", "step_0000006.pt"]
    assert (run / "checkpoints" / "step_0000006.pt").read_bytes() == (run / "ckpt.pt").read_bytes()
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    # resumed, the run keeps best/ unless it does better than best/ did
    (run / "best" / "best.json").write_text(json.dumps({"step": 6, "val_loss": 1.0}))
    train.main(["--out_dir", str(run), "--resume", "--max_steps", "8", "--data_dir", str(shared_path("data"))])
    assert json.loads((run / "best" / "best.json").read_text()) == {"step": 6, "val_loss": 1.0}
    assert sorted(f.name for f in (run / "checkpoints").iterdir()) == ["step_0000007.pt", "step_0000008.pt"]
    # the validation loss is the answer loss of the held-out examples under the saved weights (best/: step 6)
    args = train.parse_args(small_run(tmp_path / "x", "--val_examples", "8", "--eval_interval", "2"))
    r = runs.Run(0, 1, runs.Precision("cpu", torch.float32), torch.amp.GradScaler("cpu", enabled=False), tmp_path / "x")
    model, tok, _ = runs.load_run(run / "best", r.precision)
    examples = training.load_training_examples(args, r.log, shared_path("data"), {})
    kept, held = training.hold_out(args, r.log, examples)
    assert len(held) == 8 and len(kept) == len(examples) - 8
    assert {e["instruction"] for e in kept}.isdisjoint({e["instruction"] for e in held})
    other_seed = train.parse_args(small_run(tmp_path / "x", "--val_examples", "8", "--eval_interval", "2", "--seed", "5"))
    assert training.hold_out(other_seed, r.log, examples)[1] == held  # the same slice for every seed
    pairs = tokenize_dataset(tok, held, args.max_seq_len)[0]
    assert evaluate.mean_target_loss(r, model.eval(), pairs, tok.pad_id, args.eval_batch_size) == pytest.approx(val[6], rel=1e-5)


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, capsys):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what oneDNN may use: caps this CPU below its bf16 units
    if runs.cpu_has_native_bf16() is None:
        pytest.skip("not an x86 CPU under Linux: no claim is made")
    runs.setup_precision("bf16", "cpu")
    assert "WARNING: --dtype bf16 on a CPU without native bf16" in capsys.readouterr().out
    runs.setup_precision("fp32", "cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    if runs.cpu_has_native_bf16():
        runs.setup_precision("bf16", "cpu")
    assert "WARNING" not in capsys.readouterr().out


def test_a_mistyped_task_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "gsm9k"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --task: invalid choice: 'gsm9k'") and "gsm8k" in err


def test_the_prompt_format_is_the_runs(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(small_run(run, "--prompt_format", "chatml", "--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "1"))
    assert json.loads((run / "run.json").read_text())["settings"]["prompt_format"] == "chatml"
    capsys.readouterr()
    # graded again in the run's format: the answer loss is the same as at the end of training
    first = json.loads((run / "metrics_gsm8k_first1.json").read_text())["answer_loss"]
    again = train.main(small_run(run, "--eval_only", "--eval_limit", "1", "--max_new_tokens", "1"))
    assert again["answer_loss"] == pytest.approx(first, rel=1e-6)
    with pytest.raises(SystemExit, match="--prompt_format alpaca, but the run in .* has --prompt_format chatml"):
        train.main(small_run(run, "--eval_only", "--prompt_format", "alpaca"))
