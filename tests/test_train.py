"""train.py end to end on tiny configs: the real stories260K checkpoint, resume, DDP on CPU, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, shared_path

import moelora
import train
from data.prompts import tokenize_dataset
from data.tasks import load_split
from moelora import MoELoRAConfig
from tokenizer import Tokenizer


def small_run(out_dir, *extra, model="stories260K-hf"):
    """Arguments for a run that takes seconds: a few steps of batch 4 on short sequences, 6 test questions."""
    return ["--task", "gsm8k", "--model", str(shared_path(f"models/{model}")), "--data_dir", str(shared_path("data")),
            "--out_dir", str(out_dir), "--max_steps", "4", "--batch_size", "4", "--micro_batch_size", "2",
            "--max_seq_len", "320", "--eval_limit", "6", "--max_new_tokens", "12", "--eval_batch_size", "4",
            "--log_interval", "1", "--num_experts", "4", "--contrastive_samples", "64", *extra]


def run_script(args, env_extra=None, module=None):
    cmd = [sys.executable] + (["-m", module] if module else []) + args
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_end_to_end_on_stories260k(tmp_path):
    r = run_script(["train.py", *small_run(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gsm8k: accuracy" in r.stdout + r.stderr
    metrics = json.loads((tmp_path / "metrics_gsm8k.json").read_text())
    assert metrics["n"] == 6 and 0 <= metrics["accuracy"] <= 1 and metrics["answer_loss"] > 0
    preds = [json.loads(l) for l in (tmp_path / "predictions_gsm8k.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all({"prediction", "answer", "correct"} <= p.keys() for p in preds)
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["contrastive"] > 0 and r["balance"] > 0 and len(r["routing"]) == 10 for r in log)  # 5 layers x wq, wv
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
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


def test_built_in_tiny_base_is_built_then_reused(tmp_path, capsys):
    argv = ["--task", "gsm8k", "--data_dir", str(shared_path("data")), "--out_dir", str(tmp_path),
            "--pretrain_steps", "2", "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "2",
            "--max_seq_len", "256", "--eval_limit", "2", "--max_new_tokens", "4"]
    train.main(argv)
    out = capsys.readouterr()
    assert "built-in tiny LLaMA" in out.out + out.err
    base = tmp_path / "tiny_base_gsm8k"
    assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= {p.name for p in base.iterdir()}
    stamp = (base / "consolidated.00.pth").stat().st_mtime_ns
    train.main(argv + ["--eval_only"])
    out = capsys.readouterr()
    assert "reusing" in out.out + out.err and (base / "consolidated.00.pth").stat().st_mtime_ns == stamp
    # the built base, given back as --model, keeps the tiny preset; any other checkpoint gets llama-7b's
    assert train.parse_args(["--model", str(base)]).preset == "tiny"
    assert train.parse_args(["--model", str(shared_path("models/stories260K-hf"))]).preset == "llama-7b"


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
    # --help states every default: each preset's value of each preset-dependent flag
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key in train.PRESETS["tiny"]:
        assert train.preset_default(key) in text, key
    assert "(default 256)" in text and "(default 1337)" in text  # --contrastive_samples, --seed


def adapter_weights(path):
    w = torch.load(path, weights_only=False)["weights"]
    return {k: v for k, v in w.items() if k != "moelora_config"}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    # dropout and the contrastive loss's sampling both draw random numbers: the RNG state must be restored too
    common = ["--eval_limit", "1", "--max_new_tokens", "1", "--save_interval", "100"]
    train.main(small_run(tmp_path / "straight", *common))
    train.main(small_run(tmp_path / "split", *common, "--stop_after", "2"))
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["step"] == 2
    train.main(small_run(tmp_path / "split", *common, "--resume"))
    a, b = adapter_weights(tmp_path / "straight" / "ckpt.pt"), adapter_weights(tmp_path / "split" / "ckpt.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_processes_match_one_process(tmp_path):
    # no dropout and no contrastive sampling: then 2 processes x 1 micro-batch must equal 1 process x 2
    common = ["--lora_dropout", "0", "--contrastive_weight", "0", "--eval_limit", "1", "--max_new_tokens", "1"]
    single = run_script(["train.py", *small_run(tmp_path / "single", *common)])
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script(["--standalone", "--nproc_per_node=2", "train.py", *small_run(tmp_path / "ddp", *common)],
                     module="torch.distributed.run")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) x 1 micro-batch(es)" in ddp.stdout + ddp.stderr
    a, b = adapter_weights(tmp_path / "single" / "ckpt.pt"), adapter_weights(tmp_path / "ddp" / "ckpt.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"at step \d.*last good checkpoint .*ckpt.pt \(step \d\)"):
        train.main(small_run(tmp_path, "--lr", "1e30", "--warmup_steps", "0", "--save_interval", "1",
                             "--method", "lora", "--r", "4"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for k, v in ckpt["weights"].items() if k != "moelora_config")


def test_checkpoint_from_another_config_or_base_is_refused(tmp_path):
    train.main(small_run(tmp_path, "--max_steps", "1", "--eval_limit", "1", "--max_new_tokens", "1"))
    with pytest.raises(SystemExit, match="does not fit this adapter configuration.*num_experts"):
        train.main(small_run(tmp_path, "--num_experts", "2", "--eval_only", "--eval_limit", "1"))
    with pytest.raises(SystemExit, match="different base model"):
        train.main(small_run(tmp_path, "--eval_only", "--eval_limit", "1", model="stories260K/stories260K.bin")
                   + ["--target_modules", "wq,wv"])


def test_method_lora_and_full_train(tmp_path):
    train.main(small_run(tmp_path / "lora", "--method", "lora", "--r", "8", "--max_steps", "2", "--eval_limit", "1"))
    w = adapter_weights(tmp_path / "lora" / "ckpt.pt")
    assert w["layers.0.attention.wq.lora_A"].shape == (1, 8, 64)  # one expert of rank 8
    train.main(small_run(tmp_path / "full", "--method", "full", "--max_steps", "2", "--eval_limit", "1"))
    assert "tok_embeddings.weight" in torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["weights"]


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
