"""train.py --fsdp (fsdp.py): two CPU processes under torchrun with gloo against one process, resume, SIGTERM, a
process that hangs, and what --fsdp refuses."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import runs
import train
from conftest import ROOT, shared_path
from moelora import read_moelora_file
from test_train import adapter_weights, run_script, small_run

# no dropout, and the contrastive loss (small_run's weight 0.1) over all of a micro-batch's pairs, none drawn: then
# 2 processes x 2 micro-batches of 1 must equal 1 process x 4. Clipping at 0.05 bites from the first step, so the
# norm over the shards is what clips. The llama2.c stories260K ties its output layer to the embeddings: the tie must
# survive sharding
COMMON = ("--lora_dropout", "0", "--contrastive_samples", "100000", "--micro_batch_size", "1", "--grad_clip", "0.05",
          "--eval_limit", "4", "--max_new_tokens", "6", "--eval_batch_size", "1")
TIED = "stories260K/stories260K.bin"


def torchrun(*args):
    return run_script(["--standalone", "--nproc_per_node=2", "train.py", *args], module="torch.distributed.run")


def start_torchrun(out_dir, *args, steps: int):
    """torchrun of train.py in the background (in a session of its own), once out_dir's log has `steps` records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *small_run(out_dir, *args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log, deadline = out_dir / "metrics.jsonl", time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < steps) and time.time() < deadline:
        time.sleep(0.05)
    return proc


def logged(out_dir, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if key in r}


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_resume_exactly(tmp_path):
    single = run_script(["train.py", *small_run(tmp_path / "single", *COMMON, "--max_steps", "5", model=TIED)])
    assert single.returncode == 0, single.stderr[-3000:]
    # 3 steps, stopped; then resumed under --fsdp to 5: the checkpoint gathered whole, sharded again
    first = torchrun(*small_run(tmp_path / "fsdp", *COMMON, "--max_steps", "5", "--stop_after", "3", "--fsdp", model=TIED))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es) x 2 micro-batch(es) x 1" in first.stdout + first.stderr
    # its checkpoint holds whole tensors: one process can continue it too (the base checked against the fingerprint
    # that the sharded run recorded)
    shutil.copytree(tmp_path / "fsdp", tmp_path / "one")
    one = run_script(["train.py", *small_run(tmp_path / "one", *COMMON, "--max_steps", "5", "--resume", model=TIED)])
    assert one.returncode == 0, one.stderr[-3000:]
    again = torchrun(*small_run(tmp_path / "fsdp", *COMMON, "--max_steps", "5", "--fsdp", "--resume", model=TIED))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    one, two = logged(tmp_path / "single"), logged(tmp_path / "fsdp")
    assert list(one) == list(two) == [1, 2, 3, 4, 5]
    for step in one:  # the whole batch's loss, gathered from both processes
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    a, b = adapter_weights(tmp_path / "single" / "ckpt.pt"), adapter_weights(tmp_path / "fsdp" / "ckpt.pt")
    c = adapter_weights(tmp_path / "one" / "ckpt.pt")
    assert a.keys() == b.keys() == c.keys()
    for k in a:  # whole tensors, as one process saves them
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=0)
    assert any(v.abs().max() > 0 for k, v in b.items() if k.endswith("lora_B"))  # it trained
    # adapter.safetensors: the same whole tensors, opened by one process without torchrun (sample.py's way)
    _, tensors = read_moelora_file(tmp_path / "fsdp" / "adapter.safetensors")
    assert all(torch.equal(tensors[k], b[k]) for k in b)
    model, _, saved = runs.load_run(tmp_path / "fsdp", runs.Precision("cpu", torch.float32))
    assert saved.step == 5 and torch.equal(dict(model.named_parameters())["layers.0.attention.wq.lora_B"],
                                           b["layers.0.attention.wq.lora_B"])
    # grading in lockstep, each process a share of the questions: the same answers and answer loss
    name = "predictions_gsm8k_first4.jsonl"
    answers = [[json.loads(l)["prediction"] for l in (tmp_path / d / name).read_text().splitlines()]
               for d in ("single", "fsdp")]
    assert answers[0] == answers[1] and len(answers[0]) == 4
    losses = [json.loads((tmp_path / d / "metrics_gsm8k_first4.json").read_text())["answer_loss"] for d in ("single", "fsdp")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    # graded again, sharded: the base read shard by shard, the trained adapters from adapter.safetensors
    (tmp_path / "fsdp" / name).unlink()
    graded = torchrun("--eval_only", "--fsdp", "--out_dir", str(tmp_path / "fsdp"), "--eval_limit", "4",
                      "--eval_batch_size", "1", "--max_new_tokens", "6", "--data_dir", str(shared_path("data")))
    assert graded.returncode == 0, graded.stderr[-3000:]
    assert [json.loads(l)["prediction"] for l in (tmp_path / "fsdp" / name).read_text().splitlines()] == answers[0]


@pytest.mark.slow
def test_sigterm_stops_every_process_saved_and_resume_is_exact(tmp_path):
    # 40 steps: enough for two processes' sums to part from one process's by 1e-4 (DDP's too), so the run stopped
    # and resumed under --fsdp is compared with one that was not, both on two processes: bit for bit
    common = (*COMMON, "--max_steps", "40", "--save_interval", "100", "--eval_limit", "1", "--max_new_tokens", "1",
              "--fsdp")
    straight = torchrun(*small_run(tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = start_torchrun(tmp_path / "split", *common, steps=3)
    try:  # what Kubernetes does: SIGTERM to the job's first process, torchrun, which passes it on to its workers
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode != 0
    assert out.count("stopped by SIGTERM after step") == 1, out[-3000:]  # rank 0 says it, for both
    stopped_at = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 40
    resumed = torchrun(*small_run(tmp_path / "split", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = adapter_weights(tmp_path / "straight" / "ckpt.pt"), adapter_weights(tmp_path / "split" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def worker_pids(parent: int) -> dict:
    """{rank: pid} of torchrun's workers (its children with RANK in their environment)."""
    pids = {}
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{child}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            pids[int(env["RANK"])] = int(child)
    return pids


@pytest.mark.slow
def test_a_process_that_hangs_stops_the_others_with_one_line(tmp_path):
    # rank 1 stopped (SIGSTOP: alive but silent, as a process stuck in a driver is): rank 0 must not wait for ever
    proc = start_torchrun(tmp_path, *COMMON, "--max_steps", "1000", "--fsdp", "--dist_timeout", "0.1", steps=2)
    try:
        workers = worker_pids(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)
        start = time.time()
        lines = []
        for line in proc.stdout:  # rank 0's error comes after --dist_timeout (6 s), not never
            lines.append(line)
            if "a collective failed" in line:
                break
        waited = time.time() - start
    finally:  # torchrun's workers have sessions of their own: each is killed, the stopped one too
        for pid in (workers if "workers" in locals() else {}).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    error = next((l for l in lines if "a collective failed" in l), "".join(lines[-30:]))
    assert "error: process 0 of 2: a collective failed (" in error
    assert "has not answered for --dist_timeout 0.1 minutes" in error and "--resume" in error
    assert 4 < waited < 60


def test_what_fsdp_refuses(tmp_path, monkeypatch):
    args = ["--task", "gsm8k", "--model", str(shared_path("models/stories260K-hf")), "--out_dir", str(tmp_path), "--fsdp"]
    with pytest.raises(SystemExit, match=r"--fsdp shards the base over torchrun's processes: start it with torchrun "
                                         r"--nproc_per_node=N train.py --fsdp"):
        train.parse_args(args)
    for k, v in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    train.parse_args(args + ["--batch_size", "4", "--micro_batch_size", "2"])  # under torchrun: accepted
    refused = {("--quantize", "nf4"): "--fsdp with --quantize nf4: FSDP would cast the packed 8- or 4-bit codes",
               ("--quantize", "int8"): "--fsdp with --quantize int8",
               ("--method", "full"): "--fsdp trains adapters: --method full would save every weight whole",
               ("--compile",): "--fsdp with --compile is not built here",
               ("--dtype", "fp16"): "--fsdp with fp16: its gradient scaler",
               ("--dist_timeout", "0"): "--dist_timeout 0.0 must be > 0"}
    for flags, message in refused.items():
        with pytest.raises(SystemExit, match="^error: .*" + message.replace("(", r"\(").replace("+", r"\+")):
            train.parse_args(args + ["--batch_size", "4", "--micro_batch_size", "2", *flags])


def test_gradients_are_reduced_on_a_step_s_last_micro_batch_only(tmp_path):
    # FSDP2 reduces and scatters the gradients after every backward unless told not to: accumulation must tell it so
    # on every micro-batch but the last (here one process: a process group of its own, in this process)
    from types import SimpleNamespace

    import torch.distributed as dist
    from data.training import TrainSet
    from fsdp import shard_model
    from model import ModelArgs, Transformer
    from moelora import MoELoRAConfig, inject_moelora, mark_only_moelora_as_trainable

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = Transformer(ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32, multiple_of=8, max_seq_len=16))
        mark_only_moelora_as_trainable(inject_moelora(model, MoELoRAConfig(num_experts=2, r=2)))
        shard_model(model, torch.float32)
        flags = []
        set_sync = model.set_requires_gradient_sync
        model.set_requires_gradient_sync = lambda sync: (flags.append(sync), set_sync(sync))
        pairs = [([1, 2, 3, 4], [-100, 2, 3, 4])] * 3
        run = runs.Run(0, 1, runs.Precision("cpu", torch.float32), torch.amp.GradScaler("cpu", enabled=False), tmp_path,
                       sharded=True)
        args = SimpleNamespace(method="moelora", contrastive_warmup=0)
        train.forward_backward(run, args, model, model, TrainSet(pairs, [0, 0, 0], ["x"]), [[0], [1], [2]], 0, 0)
        assert flags == [False, False, True]
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
