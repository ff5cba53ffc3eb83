"""export_peft.py: a --method lora run of stories260K, loaded by transformers + peft, gives our model's logits;
what cannot be exported (a mixture, --method full, no run) and bad destinations are one error line."""
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import ROOT, shared_path

import export_peft
import train
from checkpoints import from_pretrained
from moelora import load_moelora

TOLERANCE = 1e-4  # float32 logits; our base alone and transformers' differ by ~2e-5 on these sequences


def tiny_run(out_dir, *extra):
    """Seconds on stories260K: steps at a high learning rate without warm-up, so that every B is well away from 0."""
    train.main(["--task", "gsm8k", "--model", str(shared_path("models/stories260K-hf")), "--preset", "tiny",
                "--data_dir", str(shared_path("data")), "--out_dir", str(out_dir), "--max_steps", "2",
                "--warmup_steps", "0", "--lr", "1e-2", "--batch_size", "2", "--micro_batch_size", "2",
                "--max_seq_len", "256", "--eval_limit", "1", "--eval_batch_size", "1", "--max_new_tokens", "1",
                "--seed", "0", *extra])
    return out_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    # every linear layer, so that the q and k row orders (8 query heads, 4 KV heads) both matter
    return tiny_run(tmp_path_factory.mktemp("lora"), "--method", "lora", "--r", "4",
                    "--target_modules", "wq,wk,wv,wo,w1,w2,w3,output")


def export(out_dir, *extra):
    return export_peft.main(["--out_dir", str(out_dir), *extra])


def refusal(out_dir, *extra) -> str:
    with pytest.raises(SystemExit) as e:
        export(out_dir, *extra)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_peft_loads_the_export_and_gives_our_logits(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    peft = pytest.importorskip("peft", reason="peft not installed")
    base = shared_path("models/stories260K-hf")
    dest = export(lora_run, "--dest", str(tmp_path / "peft"))
    ours = load_moelora(from_pretrained(base, dtype=torch.float32), lora_run / "adapter.safetensors")
    plain = from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(hf, dest)
    # e.g. "Found missing adapter keys": PEFT warns instead of failing when the names are wrong
    assert not [str(w.message) for w in caught if "/peft/" in w.filename]
    assert theirs.peft_config["default"].base_model_name_or_path == str(base.resolve())
    tokens = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, plain_logits = ours.eval()(tokens)[0], plain.eval()(tokens)[0]
        theirs_logits = theirs.eval()(tokens).logits
    assert (ours_logits - theirs_logits).abs().max() < TOLERANCE
    assert (ours_logits - plain_logits).abs().max() > 1000 * TOLERANCE  # the adapter changes the logits: not vacuous


def test_without_adapter_safetensors_ckpt_pt_gives_the_same_files(lora_run, tmp_path):
    expected = export(lora_run, "--dest", str(tmp_path / "from_adapter"))
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("adapter.safetensors", "peft"))
    got = export(run)
    assert got == run / "peft"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (got / name).read_bytes() == (expected / name).read_bytes()


def test_an_earlier_export_is_replaced_whole(lora_run, tmp_path, monkeypatch):
    expected = export(lora_run, "--dest", str(tmp_path / "fresh"))
    dest = tmp_path / "again"
    dest.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (dest / name).write_text("an earlier export " * 1000)  # longer than the new one: no stale tail may remain

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:  # interrupted: the earlier files stay whole, no temporary is left
        m.setattr(export_peft.os, "replace", disk_full)
        assert "cannot write" in refusal(lora_run, "--dest", str(dest))
    assert all((dest / name).read_text() == "an earlier export " * 1000
               for name in ("adapter_config.json", "adapter_model.safetensors"))
    export(lora_run, "--dest", str(dest))
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]  # no .tmp
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (dest / name).read_bytes() == (expected / name).read_bytes()


def test_bad_destinations_no_run_and_a_damaged_one(lora_run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert "is a file" in refusal(lora_run, "--dest", str(a_file))
    assert "cannot create" in refusal(lora_run, "--dest", str(a_file / "sub"))
    assert a_file.read_text() == "keep me"
    assert "no run in" in refusal(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "ckpt.pt").write_bytes(b"")  # a copy that failed
    assert "ckpt.pt is empty: the run did not save it, or a copy of it failed" in refusal(tmp_path / "damaged")


def test_a_mixture_is_refused_in_one_line_naming_why(tmp_path):
    run = tiny_run(tmp_path / "moe", "--method", "moelora", "--num_experts", "4", "--top_k", "2", "--max_steps", "1")
    message = refusal(run)
    assert "4 experts" in message and "router picks 2" in message and "--method lora" in message
    assert not (run / "peft").exists()
    # from the command line: that line on stderr, no traceback
    done = subprocess.run([sys.executable, "export_peft.py", "--out_dir", str(run)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stderr == message + "\n" and not (run / "peft").exists()
    (run / "adapter.safetensors").unlink()  # the fallback to ckpt.pt refuses it too
    assert refusal(run) == message


def test_full_fine_tuning_is_refused(tmp_path):
    run = tiny_run(tmp_path / "full", "--method", "full", "--max_steps", "1")
    message = refusal(run)
    assert "--method full" in message and "not an adapter" in message and "--method lora" in message
    assert not (run / "peft").exists()
