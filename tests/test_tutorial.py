"""tutorial.md's code runs as shown; the helpers of tutorial/routing.py and tutorial/plots.py on tiny inputs."""
import json
import re
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tutorial"))

import plots  # noqa: E402  (tutorial/plots.py: matplotlib is imported only to draw)
import routing  # noqa: E402  (tutorial/routing.py)
import routing_per_task  # noqa: E402  (tutorial/routing_per_task.py)

TUTORIAL = ROOT / "tutorial.md"


def python_blocks(text):
    """The ```python blocks of a Markdown text, in order (```bash blocks are commands to read, not run)."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_extractor_takes_python_blocks_only():
    text = "a\n```python\nx = 1\n```\n```bash\nrm -rf /\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


def test_tutorial_code_runs_as_shown(monkeypatch, capsys):
    blocks = python_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 8, "tutorial.md should show its code in ```python blocks"
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": "__tutorial__"}
    start = time.time()
    for i, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"tutorial.md python block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"python block {i} of tutorial.md failed: {e!r}\n---\n{block}")
    assert time.time() - start < 15, "the tutorial's snippets must stay fast (tiny models only)"


def test_benchmarks_page_code_runs_as_shown(monkeypatch, capsys):
    # benchmarks/README.md's memory estimate for a 7B run counts parameters and saved activations with code
    blocks = python_blocks((ROOT / "benchmarks" / "README.md").read_text())
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": "__benchmarks_page__"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"benchmarks/README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    # the figures the page quotes in its comments
    assert "base 6,738,415,616: 13.5 GB in bf16" in out and "adapters 18,874,368: 302 MB" in out
    assert "dim 128: 8,008 bytes per token per block" in out


DOCS = ("tutorial.md", "README.md", "tutorial/experiments.md", "benchmarks/README.md", "tests/README.md")


def test_every_pointer_to_code_exists():
    # pointers written `file.py` → `Class.method` must name things that exist in that file
    pointers = [(doc, *p) for doc in DOCS
                for p in re.findall(r"`([\w/]+\.py)` *(?:→|->) *`([\w.]+)`", (ROOT / doc).read_text())]
    assert len(pointers) >= 15
    for doc, path, name in pointers:
        source = (ROOT / path).read_text()
        for part in name.split("."):
            assert re.search(rf"(def|class) {part}\b|^{part} *=", source, flags=re.M), f"{doc}: {path} has no {name}"


def test_every_relative_link_exists():
    # [text](path) and ![figure](path) in the docs, relative to the page: a moved section must not leave one dangling
    for doc in DOCS:
        page = ROOT / doc
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{doc} links to {target}, which does not exist"


def test_token_kinds():
    kind = routing.token_kind
    assert [kind(p) for p in ("\u25811", "7", "\u2581+", "=", "\u2581$", "%", "*")] == ["digit", "digit"] + ["operator"] * 5
    assert [kind(p) for p in ("\u2581eggs", "She", "'s", "\u2581", ",", ".", "?")] == ["word"] * 3 + ["space/punct"] * 4
    assert [kind(p) for p in (".\n", "\n", "<0x0A>")] == ["newline"] * 3
    assert [kind(p) for p in ("<s>", "</s>")] == [None, None]


def test_mutual_information_and_entropy():
    assert routing.entropy_bits([0.5, 0.5]) == pytest.approx(1.0)
    assert routing.entropy_bits([1.0, 0.0]) == 0.0
    # the expert is the kind: I = H(kind); the expert ignores the kind: I = 0
    assert routing.mutual_information_bits(np.diag([10, 10, 10, 10])) == pytest.approx(2.0)
    assert routing.mutual_information_bits(np.full((5, 8), 7)) == pytest.approx(0.0, abs=1e-12)
    s = routing.summarize({"l0": np.diag([3, 1]), "l1": np.ones((2, 2), dtype=int)})
    assert s["mean"]["mi_over_h_kind"] == pytest.approx(0.5)


def test_top1_experts_on_a_tiny_llama():
    from model import ModelArgs, Transformer
    from moelora import MoELoRAConfig, inject_moelora

    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=32))
    inject_moelora(model, MoELoRAConfig(num_experts=4, r=2))
    seqs = [[1, 5, 7, 9], [1, 3], [1, 4, 4, 4, 8, 2]]
    out = routing.top1_experts(model, seqs, pad_id=0, batch_size=2)
    assert set(out) == {f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wv")}
    for experts in out.values():
        assert [len(e) for e in experts] == [4, 2, 6] and all(((0 <= e) & (e < 4)).all() for e in experts)
    # right padding changes nothing: the second sequence alone routes the same
    alone = routing.top1_experts(model, [seqs[1]], pad_id=0)
    assert all(np.array_equal(alone[k][0], out[k][1]) for k in out)
    # B = 0: every expert's output is 0, all cosines are 0 and the loss is log(S - 1), S = 2 x 12 tokens
    cl = routing.contrastive_on_text(model, seqs, pad_id=0, draws=2, batch_size=2)
    assert set(cl) == set(out) and all(v == pytest.approx(np.log(23), rel=1e-5) for v in cl.values())
    counts = routing.kind_expert_counts(out["layers.0.attention.wq"], [["word"] * 4, [None, "digit"], ["newline"] * 6], 4)
    assert counts.shape == (5, 4) and counts.sum() == 11


def fake_run(root, name, losses, accuracy, moe=True):
    d = root / name
    d.mkdir()
    records = []
    for step, loss in zip((5, 10), losses):
        r = {"step": step, "loss": loss, "lr": 1e-3, "contrastive": 0.0, "balance": 0.0, "tokens_per_s": 1.0}
        if moe:
            r["routing"] = {f"layers.{i}.attention.wq": {"expert_share": [0.5, 0.25, 0.25, 0.0], "router_entropy": 1.0}
                            for i in range(2)}
        records.append(r)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "metrics_gsm8k.json").write_text(json.dumps({"accuracy": accuracy, "correct": int(accuracy * 100), "n": 100,
                                                      "answer_loss": losses[-1], "answer_perplexity": np.exp(losses[-1])}))
    torch.save({"weights": {"a.lora_A": torch.zeros(3, 4), "moelora_config": {}}}, d / "ckpt.pt")


def test_plots_tables_from_run_files(tmp_path):
    for seed, acc in ((1, 0.02), (2, 0.04)):
        fake_run(tmp_path, f"lora_s{seed}", [3.0, 2.5], acc, moe=False)
        fake_run(tmp_path, f"moelora_s{seed}", [3.0, 2.4], acc)
    (tmp_path / "moelora_s3").mkdir()  # unfinished: no metrics_gsm8k.json, left out
    runs = plots.find_runs(tmp_path)
    assert {m: sorted(s) for m, s in runs.items()} == {"lora": [1, 2], "moelora": [1, 2]}
    res = plots.results(runs)
    assert res["lora"]["params"] == 12 and res["moelora"]["accuracy"] == [0.02, 0.04]
    table = plots.results_table(res)
    assert "3.00 ± 1.41" in table  # accuracy in %, sample standard deviation (ddof=1)
    assert "| MoELoRA 8x4 top-2 | 1 | 10 | 1.000 | 0.500 | 0.000 |" in plots.routing_table(runs)
    assert plots.routing_kinds_table(runs) is None  # routing.py not run
    plots.main([str(tmp_path), "--no_figures"])


def test_hugging_face_trainer_snippet(tmp_path):
    # tutorial.md section 14's MoELoRATrainer, run by transformers' Trainer for one optimizer step of two
    # accumulated micro-batches; the adapters' gradients must be those of the loss written out by hand:
    # the language-model loss weighted by target tokens over the whole step, plus the mean over micro-batches of
    # the auxiliary losses, each over the real tokens of its micro-batch
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install -r requirements-dev.txt)")
    import moelora

    block = re.search(r"^```python hf-trainer\n(.*?)^```", TUTORIAL.read_text(), flags=re.M | re.S)
    assert block, "tutorial.md should show the Trainer in a ```python hf-trainer block"
    namespace = {}
    exec(compile(block.group(1), "tutorial.md hf-trainer block", "exec"), namespace)

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    moelora.inject_moelora(model, moelora.MoELoRAConfig(num_experts=4, r=2, lora_dropout=0.0, target_modules=("q_proj", "v_proj"),
                                                        contrastive_samples=64, contrastive_weight=0.5, balance_weight=0.5))
    moelora.mark_only_moelora_as_trainable(model)
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0, 0.1)
    # 4 examples of 10 positions, right-padded to 10, 2 per micro-batch (16 x 2 pairs <= 64 samples: no random draw)
    lengths = [10, 6, 8, 3]
    examples = []
    for n in lengths:
        ids = torch.randint(3, 64, (10,))
        real = torch.arange(10) < n
        examples.append({"input_ids": ids.masked_fill(~real, 0), "attention_mask": real.long(),
                         "labels": ids.masked_fill(~real, -100)})

    captured = {}

    class Capture(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-3,
                                          max_grad_norm=0.0, train_sampling_strategy="sequential", report_to=[],
                                          save_strategy="no", use_cpu=True, logging_strategy="no")
    trainer = namespace["MoELoRATrainer"](model=model, args=args, train_dataset=examples, callbacks=[Capture()],
                                          data_collator=transformers.default_data_collator)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert captured and all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    # the same step by hand, from the weights before it
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])
    model.zero_grad()
    model.train()
    targets = sum(int((e["labels"][1:] != -100).sum()) for e in examples)  # the shift of a causal LM
    total = 0
    for micro in (examples[:2], examples[2:]):
        batch = transformers.default_data_collator(micro)
        with moelora.moelora_token_mask(model, batch["attention_mask"].bool()):
            out = model(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total = total + out.loss * n / targets + sum(moelora.moelora_aux_losses(model).values()) / 2
    total.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(captured[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_routing_per_task_table_and_figure(tmp_path, capsys):
    layer = {"trained": {"expert_share": [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]], "top1_counts": [[4, 0, 0], [0, 0, 2]],
                         "mi_bits": 0.918},
             "initial": {"expert_share": [[0.3, 0.3, 0.4]] * 2, "top1_counts": [[1, 1, 2], [1, 0, 1]], "mi_bits": 0.1}}
    data = {"tasks": ["addsub", "svamp"], "h_task_bits": 0.918, "tokens_per_task": [4, 2],
            "layers": {"layers.0.attention.wq": layer}, "mean_mi_bits_trained": 0.918, "mean_mi_bits_initial": 0.1}
    path = tmp_path / "routing_math.json"
    path.write_text(json.dumps(data))
    routing_per_task.main([str(path), "--no_figure"])
    out = capsys.readouterr().out
    assert "| layers.0.attention.wq | 0.918 | 0.100 |" in out and "| mean | 0.918 | 0.100 |" in out
    routing_per_task.main([str(path)])
    assert (tmp_path / "routing_math.png").stat().st_size > 1000
