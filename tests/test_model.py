"""model.py against transformers' LLaMA, real checkpoints in ../shared, and bad input."""
import dataclasses
import json
import struct
import weakref

import pytest
import torch

import checkpoints
from conftest import shared_path
from checkpoints import from_pretrained, read_safetensors
from data.prompts import IGNORE_INDEX
from model import ModelArgs, Transformer, rope_inv_freq
from tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency (requirements-dev.txt)")

# (name, HF config overrides): MHA, GQA with a large rope_theta, tied embeddings
CONFIGS = [
    ("mha", dict(num_attention_heads=4, num_key_value_heads=4)),
    ("gqa_theta", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0)),
    ("tied", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
]


def make_hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    rope_theta = overrides.pop("rope_theta", 10000.0)
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    cfg.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # LLaMA's init leaves the norms at 1: randomise them so that a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


def assert_same_logits(ours, hf, seed=1):
    tokens = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _ = ours(tokens)
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=1e-4, rtol=0)


# ---- Hugging Face format

@pytest.mark.parametrize("name,overrides", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hf_safetensors_matches_transformers(tmp_path, name, overrides):
    hf = make_hf_model(**overrides)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = from_pretrained(tmp_path)
    assert ours.args.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert_same_logits(ours, hf)


def test_hf_sharded_safetensors(tmp_path):
    hf = make_hf_model(num_attention_heads=8, num_key_value_heads=2)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_same_logits(from_pretrained(tmp_path), hf)


def test_loader_drops_each_tensor_once_copied(tmp_path, monkeypatch):
    # a tensor read maps pages of its file, and they count in the resident set while it lives: kept to the end of the
    # load, a 7B checkpoint's 13.5 GB would add to the model's (benchmarks/README.md, "CPU bf16 training")
    make_hf_model().save_pretrained(tmp_path, max_shard_size="40KB")
    read, map_tensor = [], checkpoints.map_tensor

    def mapping(*a):
        held = [i for i, ref in enumerate(read[:-1]) if ref() is not None]  # the last one read may still be bound
        assert not held, f"tensors {held} of the {len(read)} read so far are still held"
        t = map_tensor(*a)
        read.append(weakref.ref(t))
        return t
    monkeypatch.setattr(checkpoints, "map_tensor", mapping)
    model = from_pretrained(tmp_path)
    assert len(read) == len(model.state_dict())


def test_hf_pytorch_bin_and_old_config_layout(tmp_path):
    hf = make_hf_model(num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    # the layout of configs written before rope_parameters existed: top-level rope_theta
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 1e6
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = from_pretrained(tmp_path)
    assert ours.args.rope_theta == 1e6
    assert_same_logits(ours, hf)


def test_hf_lm_head_absent_means_tied(tmp_path):
    hf = make_hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False  # an export that dropped lm_head but does not say it is tied
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = from_pretrained(tmp_path)
    assert ours.output.weight is ours.tok_embeddings.weight
    assert_same_logits(ours, hf)


def test_load_in_requested_dtype(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.freqs_cos.dtype == torch.float32  # RoPE tables stay float32 whatever the weights are
    torch.testing.assert_close(ours.tok_embeddings.weight.float(), hf.model.embed_tokens.weight, atol=1e-2, rtol=1e-2)
    ours.to(torch.float16)
    assert ours.freqs_sin.dtype == torch.float32


# ---- Meta format, written by the test from the same weights: HF rotate-half rows permuted back to pairs

def permute_to_rotate_half(w, n_heads):  # Meta -> HF, the direction transformers' converter goes
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def hf_to_meta_state_dict(hf):
    c, sd = hf.config, hf.state_dict()
    hd = c.hidden_size // c.num_attention_heads
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"], "rope.freqs": torch.rand(hd // 2)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        # inverse of permute_to_rotate_half, written independently of checkpoints.unpermute_rotate_half
        out[f"layers.{i}.attention.wq.weight"] = torch.stack([q.view(c.num_attention_heads, 2, hd // 2, -1)[:, j] for j in (0, 1)], 2).reshape(q.shape)
        out[f"layers.{i}.attention.wk.weight"] = torch.stack([k.view(c.num_key_value_heads, 2, hd // 2, -1)[:, j] for j in (0, 1)], 2).reshape(k.shape)
        assert torch.equal(permute_to_rotate_half(out[f"layers.{i}.attention.wq.weight"], c.num_attention_heads), q)
        for meta, hf_name in [("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                              ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                              ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                              ("ffn_norm", "post_attention_layernorm")]:
            out[f"layers.{i}.{meta}.weight"] = sd[p + hf_name + ".weight"]
    return out


def write_meta(path, hf, n_shards, params):
    sd = hf_to_meta_state_dict(hf)
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    for s in range(n_shards):
        shard = {}
        for name, t in sd.items():
            d = dims.get(name.split(".")[-2])
            shard[name] = t.clone() if d is None else t.chunk(n_shards, dim=d)[s].clone()
        torch.save(shard, path / f"consolidated.{s:02d}.pth")
    (path / "params.json").write_text(json.dumps(params))


# HF intermediate sizes chosen to equal Meta's formula: dim 64 -> int(2*4*64/3) = 170, x1.3 = 221, rounded up to 32
META_CASES = [
    (1, dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=192), {"multiple_of": 32}),
    (2, dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=224, rope_theta=500000.0),
     {"multiple_of": 32, "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0}),
]


@pytest.mark.parametrize("n_shards,overrides,extra", META_CASES, ids=["1shard_mha", "2shard_gqa"])
def test_meta_checkpoint_matches_transformers(tmp_path, n_shards, overrides, extra):
    hf = make_hf_model(**overrides)
    c = hf.config
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "norm_eps": c.rms_norm_eps, "vocab_size": -1, **extra}
    write_meta(tmp_path, hf, n_shards, params)
    ours = from_pretrained(tmp_path)
    assert ours.args.vocab_size == c.vocab_size
    assert_same_logits(ours, hf)


# ---- RoPE scaling: Llama 3.1 / 3.2 (llama3) and linear, from HF configs and Meta's use_scaled_rope

# a small original context (32) makes the 16-wide heads' pairs fall in all three llama3 bands (kept, smoothed,
# divided by factor), and 64-token sequences run past it
ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def sharpen_attention(hf, gain=8.0):
    # LLaMA's init (std 0.02) leaves attention nearly uniform, so the rotation angles barely reach the logits:
    # larger q/k weights make them matter (ignoring the scaling then moves the logits by 0.44 instead of 0.006)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(gain)
            layer.self_attn.k_proj.weight.mul_(gain)
    return hf


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_hf_rope_scaling_matches_transformers(tmp_path, kind):
    scaling = ROPE_SCALINGS[kind]
    hf = sharpen_attention(make_hf_model(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         max_position_embeddings=128,
                                         rope_scaling={**scaling, "rope_theta": 10000.0}))
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.args.rope_scaling == scaling and ours.args.max_seq_len == 128
    # the rotary table itself: transformers' inv_freq exactly, and its cos/sin at every position
    inv_freq = rope_inv_freq(16, 10000.0, ours.args.rope_scaling)
    assert torch.equal(inv_freq, hf.model.rotary_emb.inv_freq)
    slowdown = rope_inv_freq(16, 10000.0) / inv_freq
    if kind == "llama3":  # one pair kept, one smoothed, the rest divided by 8: every branch of the formula is used
        assert slowdown[0] == 1 and 1 < slowdown[1] < 8 and torch.all(slowdown[2:] == 8)
    cos, sin = hf.model.rotary_emb(torch.zeros(1, 64, 16), torch.arange(64)[None])  # [1, 64, 16], halves repeated
    assert torch.equal(ours.freqs_cos[:64], cos[0, :, :8]) and torch.equal(ours.freqs_sin[:64], sin[0, :, :8])
    tokens = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(logits_of(ours, tokens), expected, atol=1e-4, rtol=0)
    # the same weights with plain RoPE are far off: the comparison above sees the scaling
    plain = Transformer(dataclasses.replace(ours.args, rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    assert (logits_of(plain, tokens) - expected).abs().max() > 0.05
    # the layout of configs written before transformers 5 (Llama 3.2's own): rope_scaling + top-level rope_theta
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {k: v for k, v in config.pop("rope_parameters").items() if k != "rope_theta"}
    config["rope_theta"] = 10000.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoints.read_model_args(tmp_path) == ours.args


LLAMA_32_1B_CONFIG = {  # meta-llama/Llama-3.2-1B's config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
SMOLLM2_135M_CONFIG = {  # HuggingFaceTB/SmolLM2-135M's config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152}


def test_todays_hf_configs():
    args = checkpoints.hf_config_to_args(LLAMA_32_1B_CONFIG, "config.json")
    assert args == ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                             norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert json.loads(json.dumps(dataclasses.asdict(args))) == dataclasses.asdict(args)  # fingerprints are JSON
    with torch.device("meta"):  # the whole 131072-token context is precomputed: 2 x 16 MiB of float32
        assert Transformer(args).freqs_cos.shape == (131072, 32)
    args = checkpoints.hf_config_to_args(SMOLLM2_135M_CONFIG, "config.json")
    assert args == ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                             norm_eps=1e-5, rope_theta=100000, max_seq_len=8192, tie_word_embeddings=True)


# config.json edits that model.py cannot follow: (edit, error, what the one line says)
UNSUPPORTED_CONFIGS = [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                          "original_max_position_embeddings": 32}},
     NotImplementedError, "RoPE scaling 'yarn' is not supported"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     NotImplementedError, "RoPE scaling 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "rope_theta": 1e4}},
     ValueError, "RoPE scaling 'llama3' without its 'low_freq_factor' parameter"),
    ({"head_dim": 32}, NotImplementedError, r"head_dim 32 is not hidden_size / num_attention_heads \(64 / 4\)"),
    ({"hidden_act": "gelu"}, NotImplementedError, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, NotImplementedError, "biases"),
]


@pytest.mark.parametrize("edit,error,message", UNSUPPORTED_CONFIGS,
                         ids=["yarn", "dynamic", "llama3_incomplete", "head_dim", "gelu", "bias"])
def test_error_unsupported_hf_config(tmp_path, edit, error, message):
    make_hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(error, match=message) as e:
        from_pretrained(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(e.value)


def test_meta_use_scaled_rope(tmp_path):
    # Llama 3.1's params.json: use_scaled_rope means Meta's fixed llama3 values; a rope_theta of 500000 with 16-wide
    # heads puts pairs in all three bands of an 8192-token original context
    meta_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
    hf = sharpen_attention(make_hf_model(num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
                                         max_position_embeddings=16384,
                                         rope_scaling={**meta_scaling, "rope_theta": 500000.0}))
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
              "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    write_meta(tmp_path, hf, 1, params)
    ours = from_pretrained(tmp_path)
    assert ours.args.rope_scaling == meta_scaling
    inv_freq = rope_inv_freq(16, 500000.0, ours.args.rope_scaling)
    assert torch.equal(inv_freq, hf.model.rotary_emb.inv_freq)
    slowdown = rope_inv_freq(16, 500000.0) / inv_freq
    assert torch.all(slowdown[:4] == 1) and 1 < slowdown[4] < 8 and torch.all(slowdown[5:] == 8)
    tokens = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(logits_of(ours, tokens), expected, atol=1e-4, rtol=0)
    plain = Transformer(dataclasses.replace(ours.args, rope_scaling=None)).eval()
    plain.load_state_dict(ours.state_dict())
    assert (logits_of(plain, tokens) - expected).abs().max() > 1e-3


# ---- the model itself

def tiny_model(**kw):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=64, **kw)
    return Transformer(args).eval()


def test_loss_ignores_masked_targets():
    model = tiny_model()
    tokens = torch.randint(0, 50, (2, 10))
    targets = torch.randint(0, 50, (2, 10))
    masked = targets.clone()
    masked[:, :6] = IGNORE_INDEX
    logits, loss = model(tokens, masked)
    # by hand: log-sum-exp minus the target's logit, averaged over the 2 x 4 counted positions
    per_token = logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)  # [2, 10]
    torch.testing.assert_close(loss, per_token[:, 6:].mean())


def test_loss_matches_transformers(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[0, :5] = labels[1, :9] = IGNORE_INDEX  # prompts of different lengths
    with torch.no_grad():
        expected = hf(tokens, labels=labels).loss  # transformers shifts the labels itself
        _, loss = ours(tokens, torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_loss_when_no_target_counts():
    # a micro-batch of prompts only: the mean over no targets is nan, but nothing is learnt from it
    model = tiny_model().train()
    _, loss = model(torch.randint(0, 50, (2, 10)), torch.full((2, 10), IGNORE_INDEX))
    assert loss.isnan()
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), n


def greedy_without_cache(model, prompt, n, eos_id=None):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


def test_cached_batched_generation_equals_recompute():
    model = tiny_model()
    prompts = [[1, 5, 9, 3, 7, 2, 8], [1, 4], [1, 30, 31, 32, 11]]  # different lengths: left padding
    out = model.generate(prompts, max_new_tokens=12)
    for p, o in zip(prompts, out):
        assert o == greedy_without_cache(model, p, 12)


def test_generation_stops_each_sequence_at_eos():
    model = tiny_model()
    prompts = [[1, 5, 9, 3], [1, 4], [1, 30, 31]]
    free = model.generate(prompts, max_new_tokens=10)
    eos = free[1][2]  # a token that sequence 1 emits at its third step
    out = model.generate(prompts, max_new_tokens=10, eos_id=eos)
    for p, o in zip(prompts, out):
        assert o == greedy_without_cache(model, p, 10, eos_id=eos)
    assert out[1][-1] == eos and len(out[1]) <= 3


def test_sampling_reproducible_and_top_p():
    model = tiny_model()
    prompts = [[1, 5, 9], [1, 4]]
    a = model.generate(prompts, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompts, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b
    # a top_p this small keeps only the most likely token: sampling becomes greedy
    assert model.generate(prompts, 8, temperature=1.0, top_p=1e-6) == model.generate(prompts, 8)


def test_generation_longer_than_max_seq_len_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model().generate([[1] * 60], max_new_tokens=10)


# ---- real checkpoints and tokenizers from ../shared

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball.")


@pytest.mark.parametrize("checkpoint", ["stories260K-hf", "stories260K/stories260K.bin"])
def test_stories260k_generates_known_text(checkpoint):
    path = shared_path(f"models/{checkpoint}")
    model = from_pretrained(path)
    tok = Tokenizer.from_dir(path)
    prompt = tok.encode("Once upon a time")
    out = model.generate([prompt], max_new_tokens=40)[0]
    assert tok.decode(prompt + out) == STORY


def test_stories260k_formats_agree_and_batch_with_padding():
    hf = from_pretrained(shared_path("models/stories260K-hf"))
    l2c = from_pretrained(shared_path("models/stories260K/stories260K.bin"))
    tokens = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(hf(tokens)[0], l2c(tokens)[0], atol=1e-5, rtol=0)
    tok = Tokenizer.from_dir(shared_path("models/stories260K-hf"))
    prompts = [tok.encode("Once upon a time"), tok.encode("The cat sat"), tok.encode("Tom")]
    batched = hf.generate(prompts, max_new_tokens=20)
    assert tok.decode(prompts[0] + batched[0]) == STORY[:len(tok.decode(prompts[0] + batched[0]))]
    for p, o in zip(prompts, batched):
        assert o == hf.generate([p], max_new_tokens=20)[0]


def test_llama2_tokenizer_known_ids():
    tok = Tokenizer(shared_path("models/llama2-tokenizer/tokenizer.model"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Once upon a time", bos=False) == [9038, 2501, 263, 931]
    assert tok.encode("Once upon a time", eos=True) == [1, 9038, 2501, 263, 931, 2]
    assert tok.decode([1, 9038, 2501, 263, 931, 2]) == "Once upon a time"


def test_train_tokenizer(tmp_path):
    texts = [f"Natalia sold {n} clips in April and {n // 2} in May. How many clips did she sell?" for n in range(2, 300)]
    tok = train_tokenizer(texts, tmp_path / "tok.model", vocab_size=300)
    assert tok.vocab_size == 300 and (tok.bos_id, tok.eos_id) == (1, 2)
    text = "Natalia sold 48 clips in April. ä"  # ä never seen: byte fallback, nothing unknown
    assert tok.decode(tok.encode(text)) == text
    assert tok.piece(tok.encode("48", bos=False)[-1]) == "8"  # digits are split
    assert Tokenizer.from_dir(tmp_path).vocab_size == 300


# ---- bad input: one clear error each

def test_error_directory_of_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a checkpoint this loader knows"):
        from_pretrained(tmp_path)


def test_error_missing_meta_shard(tmp_path):
    hf = make_hf_model(intermediate_size=192)
    write_meta(tmp_path, hf, 2, {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32})
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.00\.pth is missing"):
        from_pretrained(tmp_path)


def test_error_missing_last_meta_shard_is_a_shape_error(tmp_path):
    hf = make_hf_model(intermediate_size=192)
    write_meta(tmp_path, hf, 2, {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32})
    (tmp_path / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match="has shape"):
        from_pretrained(tmp_path)


def test_error_missing_hf_shard(tmp_path):
    make_hf_model().save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        from_pretrained(tmp_path)


def test_error_shape_mismatch(tmp_path):
    make_hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp|feed_forward.*has shape"):
        from_pretrained(tmp_path)


def test_error_unknown_and_missing_tensors(tmp_path):
    hf = make_hf_model(intermediate_size=192)
    write_meta(tmp_path, hf, 1, {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32})
    sd = torch.load(tmp_path / "consolidated.00.pth")
    sd["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(KeyError, match="unexpected tensor 'layers.0.attention.bias'"):
        from_pretrained(tmp_path)
    del sd["layers.0.attention.bias"], sd["layers.1.ffn_norm.weight"]
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(KeyError, match=r"missing tensors \(1\): layers.1.ffn_norm.weight"):
        from_pretrained(tmp_path)


def write_safetensors(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_error_corrupt_safetensors_header(tmp_path):
    make_hf_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + good[8:])  # header length past the end of the file
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        from_pretrained(tmp_path)
    (n,) = struct.unpack("<Q", good[:8])
    f.write_bytes(good[:8] + b"{not json" + good[17:])  # same length, broken JSON
    with pytest.raises(ValueError, match="not valid JSON"):
        from_pretrained(tmp_path)
    write_safetensors(f, {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 400]}}, bytes(256))
    with pytest.raises(ValueError, match="offsets"):
        read_safetensors(f)


def test_error_unsupported_dtype(tmp_path):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(TypeError, match="dtype I8.*supported: F32, F16, BF16"):
        read_safetensors(f)


def test_safetensors_reader_dtypes(tmp_path):
    f = tmp_path / "x.safetensors"
    a, b = torch.randn(3, 4), torch.randn(5).to(torch.bfloat16)
    c = torch.randn(2, 2).half()
    data = a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes() + c.numpy().tobytes()
    write_safetensors(f, {"__metadata__": {"format": "pt"},
                          "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                          "b": {"dtype": "BF16", "shape": [5], "data_offsets": [48, 58]},
                          "c": {"dtype": "F16", "shape": [2, 2], "data_offsets": [58, 66]}}, data)
    t = read_safetensors(f)
    assert torch.equal(t["a"], a) and torch.equal(t["b"], b) and torch.equal(t["c"], c)
    # a writer may leave a tensor unaligned for its dtype: still read right
    write_safetensors(f, {"b": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
                          "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [2, 50]}},
                      b[:1].view(torch.int16).numpy().tobytes() + a.numpy().tobytes())
    assert torch.equal(read_safetensors(f)["a"], a)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    tokens, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    _, loss = model(tokens, targets)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.grad_checkpointing = True
    _, loss2 = model(tokens, targets)
    loss2.backward()
    assert loss2.item() == loss.item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)
