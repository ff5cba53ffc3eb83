"""tokenizer.BPETokenizer, the byte-level BPE written out in tokenizer.py, against Hugging Face tokenizers (the
reference): SmolLM2's real tokenizer on every text of the datasets and on hard strings, the same tokenizer read from
the GGUF file's metadata (with the gguf package, not our reader), tiny tokenizers trained here with Llama 3's,
Qwen2's and GPT-2's pre-tokenizers; and Tokenizer.from_dir's choice between SentencePiece and BPE."""
import glob
import json
import time
import unicodedata

import pytest
import torch
from conftest import shared_path

from tokenizer import (BPETokenizer, BYTE_TO_CHAR, GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, Tokenizer,
                       split_digits, split_gpt2, split_llama3, split_qwen2)

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

SMOLLM2 = "models/smollm2-135m-instruct"
GGUF = f"{SMOLLM2}/SmolLM2-135M-Instruct.Q4_1.gguf"

HARD = [
    "", " ", "    ", "\t", "\t\tx\t y", "\n", "\r\n", "a\r\nb\n\nc\r", "\n\n\n  \n", "x \n \n  ", "ab\n\n\t!",
    "  !\n\n\n",
    "  leading", "trailing  ", " both ", "tab\tand  two  spaces", "x\u00a0y\u3000z\u2009w",
    "café naïve Ångström façade", "e\u0301 (combining accent)", "ÀÉÎÕÜ ß ø",
    "👋🏽 hello 🤖👨‍👩‍👧", "日本語のテキストです。", "中文，标点！", "한국어", "Ελληνικά и кириллица", "مرحبا بالعالم",
    "12345678901234567890", "3.14159, 1,000,000 and -42", "  48 apples", "x  2/5", "٣٤٥ ²³ Ⅻ ½",
    "I'll", "DON'T", "we're they've she'd it's 'quoted' ''s", "'S 'Ll 'VE x'ſ", "'Sure WE'VEr 'LLama", "rock'n'roll",
    "<|im_start|>user\nhi<|im_end|>", "<repo_name>x<file_sep>y<filename>", "<|im_start|><|im_start|>", "<|im_star",
    "<tool>_call(<tool>)",
    "line\u2028separator\u2029paragraph", "ctrl\x00\x01\x07\x1b\x7f\x1c\x1f\x85end", "\u200b\ufeffzero width",
    "$100 + 20% = ?", "a=b; c->d //e", "```python\nprint('hi')\n```",
]
CHATML = ("<|im_start|>", "<|im_end|>")  # SmolLM2's bos and eos: decode drops them, as SentencePiece's drops <s> </s>


def dataset_texts() -> list:
    """Every GSM8K question and answer, every LLM-Adapters instruction, output and answer (test and train)."""
    data, texts = shared_path("data"), []
    for path in sorted(glob.glob(str(data / "gsm8k" / "*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
    for path in sorted(glob.glob(str(data / "llm-adapters" / "dataset" / "*" / "t*.json"))):
        if path.endswith(("test.json", "train.json")):
            for record in json.load(open(path, encoding="utf-8")):
                texts += [record[k] for k in ("instruction", "output", "answer") if isinstance(record.get(k), str)]
    return texts


@pytest.fixture(scope="module")
def texts():
    return dataset_texts()


@pytest.fixture(scope="module")
def smollm2():
    return BPETokenizer.from_tokenizer_json(shared_path(f"{SMOLLM2}/tokenizer.json"))


@pytest.fixture(scope="module")
def reference():
    return tokenizers.Tokenizer.from_file(str(shared_path(f"{SMOLLM2}/tokenizer.json")))


def gguf_metadata(path) -> dict:
    """The file's key/values with the gguf package (llama.cpp's reader), independent of checkpoints.py."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm2_gguf():
    path = shared_path(GGUF)
    return BPETokenizer.from_gguf_metadata(gguf_metadata(path), str(path))


@pytest.mark.slow
def test_every_dataset_text_as_the_reference(smollm2, reference, texts):
    assert len(texts) > 130_000
    start = time.perf_counter()
    ours = [smollm2.encode(t, bos=False) for t in texts]
    elapsed = time.perf_counter() - start
    print(f"{len(texts)} texts, {sum(map(len, texts)):,} characters: {elapsed:.1f} s")
    expected = [e.ids for e in reference.encode_batch(texts)]
    wrong = [t for t, a, b in zip(texts, ours, expected) if a != b]
    assert not wrong, f"{len(wrong)} texts differ, the first: {wrong[0][:200]!r}"
    assert elapsed < 60, f"{elapsed:.0f} s for {len(texts)} texts: the word cache is not working"  # 4 s measured
    assert all(smollm2.decode(ids) == t for ids, t in zip(ours, texts))


def test_hard_strings(smollm2, reference):
    for s in HARD:
        ids = smollm2.encode(s)
        assert ids == reference.encode(s).ids, repr(s)
        expected = s
        for marker in CHATML:
            expected = expected.replace(marker, "")
        assert smollm2.decode(ids) == expected, repr(s)
    assert smollm2.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smollm2.decode(smollm2.encode("<repo_name>x<file_sep>y")) == "<repo_name>x<file_sep>y"


def test_bytes_the_vocabulary_lacks_are_dropped_as_the_reference_does(smollm2, reference):
    s = "a\x04b\x06c\x1dd"  # SmolLM2 has no token for \x04, \x06, \x13, \x14, \x16, \x1d
    assert smollm2.encode(s) == reference.encode(s).ids
    assert smollm2.decode(smollm2.encode(s)) == "abcd"


def test_special_ids_bos_and_pieces(smollm2):
    tok = smollm2
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (1, 2, 2, False, 49152)
    ids = smollm2.encode("Natalia sold 48", bos=True, eos=True)
    assert ids[-1] == 2 and 1 not in ids  # SmolLM2 adds no BOS: bos=True is the model's beginning, if it has one
    assert [smollm2.piece(i) for i in ids[:-1]] == ["N", "atal", "ia", "Ġsold", "Ġ", "4", "8"]  # shared/README
    assert smollm2.piece(1) == "<|im_start|>"
    assert smollm2.decode([2] + ids) == "Natalia sold 48"


def test_sentencepiece_piece():
    tok = Tokenizer(shared_path("models/llama2-tokenizer/tokenizer.model"))
    assert [tok.piece(i) for i in tok.encode("Once upon a time")] == ["<s>", "▁Once", "▁upon", "▁a", "▁time"]


@pytest.mark.slow
def test_gguf_metadata_gives_the_same_tokenizer(smollm2_gguf, smollm2, reference, texts):
    tok = smollm2_gguf
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (1, 2, 2, False, 49152)
    assert tok.encode("hi", bos=True) == smollm2.encode("hi", bos=True) == [6004]
    # The file's pre-tokenizer is "smollm": digits one by one, then GPT-2's split, as SmolLM2's own tokenizer.json.
    # The shared tokenizer.json (written by transformers from this file) kept only the GPT-2 split, so the two differ
    # only where a space comes before a number: "x  2" is x, Ġ, Ġ2 -> Ġ, 2 there, x, ĠĠ, 2 here (180 texts of 132,512).
    original = tokenizers.Tokenizer.from_file(str(shared_path(f"{SMOLLM2}/tokenizer.json")))
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ours = [tok.encode(t) for t in texts + HARD]
    assert ours == [e.ids for e in original.encode_batch(texts + HARD)]
    differ = [t for t, ids in zip(texts + HARD, ours) if ids != smollm2.encode(t)]
    assert differ and all(before_digit(t) for t in differ), [t for t in differ if not before_digit(t)][:3]
    assert tok.encode("x  2") != reference.encode("x  2").ids
    assert [tok.piece(i) for i in tok.encode("x  2")] == ["x", "ĠĠ", "2"]


def before_digit(text: str) -> bool:
    """A space right before a number (" 2", " ¾")."""
    return any(text[i].isspace() and unicodedata.category(text[i + 1])[0] == "N" for i in range(len(text) - 1))


# tiny tokenizers trained here, one per pre-tokenizer we read

def byte_level(**kw):
    return pre_tokenizers.ByteLevel(**{"add_prefix_space": False, "use_regex": True, **kw})


PRE_TOKENIZERS = {
    "llama3": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                               byte_level(use_regex=False)]),
    "qwen2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                              byte_level(use_regex=False)]),
    "gpt2": lambda: byte_level(),
    "gpt2_as_split": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
                                                      byte_level(use_regex=False)]),
    "gpt2_prefix_space": lambda: byte_level(add_prefix_space=True),
    "digits_then_gpt2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), byte_level()]),
}


def train_tiny(folder, pre_tokenizer, texts, llama3_like: bool):
    """A 600-token byte-level BPE trained on texts, saved as folder/tokenizer.json + tokenizer_config.json. Llama 3's
    kind adds <|begin_of_text|> through its post_processor (its config does not say add_bos_token) and ignores
    merges for whole words; GPT-2's kind adds nothing."""
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=llama3_like))
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<tool>", "<tool>_call"]  # the longest added token wins
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = {"bos_token": specials[0], "eos_token": specials[1]}
    if llama3_like:
        hf.post_processor = processors.TemplateProcessing(single=f"{specials[0]} $A", special_tokens=[(specials[0], 0)])
    else:
        config["add_bos_token"] = False
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return hf


@pytest.mark.parametrize("kind", list(PRE_TOKENIZERS))
def test_tiny_tokenizer_as_the_reference(tmp_path, kind):
    questions = [json.loads(line)["question"] for line in open(shared_path("data/gsm8k/test.jsonl"), encoding="utf-8")]
    llama3_like = kind in ("llama3", "qwen2")
    hf = train_tiny(tmp_path, PRE_TOKENIZERS[kind](), questions[300:1300] + HARD, llama3_like)
    tok = Tokenizer.from_dir(tmp_path)
    assert isinstance(tok, BPETokenizer) and tok.add_bos == llama3_like and tok.bos_id == 0 and tok.eos_id == 1
    assert tok.pad_id == 1  # no pad token: eos pads
    for s in HARD + questions[:300]:
        ids = tok.encode(s, bos=True, eos=True)
        assert ids[:-1] == hf.encode(s).ids and ids[-1] == 1, repr(s)
        # decode drops BOS and EOS only, other added tokens are text. add_prefix_space puts a space before each
        # stretch of text between added tokens, and decode keeps it, as Hugging Face does
        body = [i for i in ids if i not in (tok.bos_id, tok.eos_id)]
        assert tok.decode(ids) == hf.decode(body, skip_special_tokens=False), repr(s)
        assert tok.decode(ids) == s or kind == "gpt2_prefix_space", repr(s)


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges(tmp_path, ignore_merges):
    """Llama 3's BPE keeps a word whole when it is a token, even where the merges cannot reach it."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({"ab": 256, "abc": 257, "<|end_of_text|>": 258})
    hf = tokenizers.Tokenizer(models.BPE(vocab, [("a", "b")], ignore_merges=ignore_merges))
    hf.pre_tokenizer = byte_level()
    hf.decoder = decoders.ByteLevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    tok = BPETokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert tok.encode("abc abcd") == hf.encode("abc abcd").ids == ([257] if ignore_merges else [256, vocab["c"]]) + [
        vocab["Ġ"], 256, vocab["c"], vocab["d"]]


def hf_pieces(pre_tokenizer, text: str) -> list:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2", "digits"])
def test_character_classes_as_oniguruma(name):
    r"""\p{L}, \p{N} and \s by unicodedata, as tokenizers' Oniguruma reads them: every space, control, format and
    number character Python knows, and every 29th other one, each in a few surroundings (all 282,230 agree too); the
    hard strings first."""
    categories = [unicodedata.category(chr(c)) for c in range(0x110000)]
    points = [c for c, cat in enumerate(categories) if cat not in ("Cn", "Cs")
              and (cat in ("Zs", "Zl", "Zp", "Cc", "Cf") or cat[0] == "N" or c % 29 == 0)]
    text = "".join(HARD) + "".join(f"x{c}1{c} {c}{c}'S\n {c}a\t{c}\r\n{c}{c}9 " for c in map(chr, points))
    ours, hf = {
        "gpt2": (byte_level_words, byte_level()),
        "llama3": (split_llama3, pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")),
        "qwen2": (split_qwen2, pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated")),
        "digits": (lambda t: split_digits(t, individual=True), pre_tokenizers.Digits(individual_digits=True)),
    }[name]
    assert ours(text) == hf_pieces(hf, text)


def byte_level_words(text: str) -> list:
    """ByteLevel's own split, each piece written as characters of BYTE_TO_CHAR, as pre_tokenize_str shows it."""
    return [w.encode("utf-8").decode("latin-1").translate(BYTE_TO_CHAR) for w in split_gpt2(text)]


# Tokenizer.from_dir: the kind from what the checkpoint carries; bad cases are one line

def test_from_dir_picks_the_kind(tmp_path, monkeypatch):
    assert type(Tokenizer.from_dir(shared_path("models/stories260K-hf"))) is Tokenizer  # tokenizer.model
    assert type(Tokenizer.from_dir(shared_path("models/stories260K-hf/config.json"))) is Tokenizer  # beside a file
    assert type(Tokenizer.from_dir(shared_path(SMOLLM2))) is BPETokenizer  # tokenizer.json (and a .gguf)
    assert type(Tokenizer.from_dir(shared_path(f"{SMOLLM2}/tokenizer_config.json"))) is BPETokenizer
    # a .gguf file: its metadata, read by checkpoints.read_gguf_metadata (here the gguf package's, to test the choice)
    import checkpoints
    read = []
    monkeypatch.setattr(checkpoints, "read_gguf_metadata", lambda p: read.append(p) or gguf_metadata(p), raising=False)
    tok = Tokenizer.from_dir(shared_path(GGUF))
    assert type(tok) is BPETokenizer and read == [shared_path(GGUF)] and tok.encode("x  2") == [104, 256, 34]
    # tokenizer.model wins over tokenizer.json (Hugging Face's LLaMA-2 folders carry both)
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.model").write_bytes(shared_path("models/stories260K-hf/tokenizer.model").read_bytes())
    (both / "tokenizer.json").write_bytes(shared_path(f"{SMOLLM2}/tokenizer.json").read_bytes())
    assert type(Tokenizer.from_dir(both)) is Tokenizer


def one_line_error(kind, call, *names):
    with pytest.raises(kind) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(str(n) in message for n in names), message
    return message


def test_from_dir_bad_cases(tmp_path):
    one_line_error(FileNotFoundError, lambda: Tokenizer.from_dir(tmp_path / "absent"), tmp_path / "absent")
    one_line_error(FileNotFoundError, lambda: Tokenizer.from_dir(tmp_path / "absent.gguf"), "absent.gguf")
    message = one_line_error(FileNotFoundError, lambda: Tokenizer.from_dir(tmp_path), tmp_path)
    assert "tokenizer.model" in message and "tokenizer.json" in message
    for name in ("a.model", "b.model"):
        (tmp_path / name).write_bytes(b"")
    one_line_error(ValueError, lambda: Tokenizer.from_dir(tmp_path), tmp_path, "a.model", "b.model")


def write_tokenizer_json(folder, **changes):
    spec = json.loads(shared_path(f"{SMOLLM2}/tokenizer.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        spec[key] = value
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder / "tokenizer.json"


def test_unsupported_tokenizer_json_is_one_line(tmp_path):
    path = write_tokenizer_json(tmp_path / "ws", pre_tokenizer={"type": "Whitespace"})
    message = one_line_error(ValueError, lambda: Tokenizer.from_dir(path.parent), path, "Whitespace")
    assert message.startswith(str(path))  # the file first, then what in it is not supported
    odd = {"type": "Split", "pattern": {"Regex": "\\s+\n"}, "behavior": "Isolated", "invert": False}
    path = write_tokenizer_json(tmp_path / "split", pre_tokenizer={"type": "Sequence", "pretokenizers": [odd]})
    one_line_error(ValueError, lambda: BPETokenizer.from_tokenizer_json(path), path, "Split")
    path = write_tokenizer_json(tmp_path / "wordpiece", model={"type": "WordPiece", "vocab": {}})
    one_line_error(ValueError, lambda: BPETokenizer.from_tokenizer_json(path), path, "WordPiece")
    garbled = tmp_path / "garbled" / "tokenizer.json"
    garbled.parent.mkdir()
    garbled.write_text('{"model": ')
    one_line_error(ValueError, lambda: Tokenizer.from_dir(garbled.parent), garbled)
    path = write_tokenizer_json(tmp_path / "no_eos")  # no tokenizer_config.json beside it: no eos to end or pad with
    message = one_line_error(ValueError, lambda: BPETokenizer.from_tokenizer_json(path), path, "eos")
    assert message.startswith(str(path))


def test_unsupported_gguf_metadata_is_one_line():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": []}
    message = one_line_error(ValueError, lambda: BPETokenizer.from_gguf_metadata(meta, "m.gguf"), "m.gguf", "default")
    assert all(pre in message for pre in ("gpt-2", "smollm", "llama-bpe", "qwen2"))  # the supported ones are named
    meta["tokenizer.ggml.model"] = "llama"  # SentencePiece inside a GGUF
    message = one_line_error(ValueError, lambda: BPETokenizer.from_gguf_metadata(meta, "m.gguf"), "m.gguf", "llama")
    assert "tokenizer.model" in message  # says what to give instead


def test_a_llama3_style_checkpoint_with_its_tokenizer_json_as_transformers(tmp_path):
    """A random Llama-3-style Hugging Face checkpoint, as a user has one: llama3 RoPE scaling, tied embeddings, GQA, a
    byte-level tokenizer.json whose post-processor adds <|begin_of_text|>. Our tokenizer and model against
    transformers' AutoTokenizer and LlamaForCausalLM, on text past the scaling's original context."""
    import transformers
    from checkpoints import from_pretrained
    questions = [json.loads(line)["question"] for line in open(shared_path("data/gsm8k/test.jsonl"), encoding="utf-8")]
    train_tiny(tmp_path, PRE_TOKENIZERS["llama3"](), questions[:1000], llama3_like=True)
    config = transformers.LlamaConfig(
        vocab_size=600, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16, "rope_theta": 10000.0})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours, tok = from_pretrained(tmp_path).eval(), Tokenizer.from_dir(tmp_path)
    assert isinstance(tok, BPETokenizer) and ours.args.rope_scaling["rope_type"] == "llama3"
    text = questions[1000] + " " + questions[1001]
    ids = tok.encode(text, bos=True)
    assert ids == hf_tok(text).input_ids and ids[0] == 0 and len(ids) > 100
    ids = ids[:100]  # the model reads 128; well past the scaling's original 16 positions
    with torch.no_grad():
        diff = (ours(torch.tensor([ids]))[0] - hf_model(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4
