"""
The two tokenizers LLaMA-family checkpoints ship, read without any tokenizer library but SentencePiece.

- Tokenizer: SentencePiece (tokenizer.model), LLaMA 1 and 2. bos=1, eos=2, unk=0 and no padding token; we pad
  with unk (0), as LLM-Adapters and Alpaca-LoRA do. train_tokenizer trains a small one.
- BPETokenizer: GPT-2-style byte-level BPE (Llama 3.x, SmolLM2, GPT-2), from a Hugging Face tokenizer.json or
  from a GGUF file's metadata, written out here: the byte-to-character table, the pre-tokenizer's split (hand-written
  scanners for the regexes, since the `regex` module is not a run-time package), the merge loop and added tokens.
  The checkpoint decides whether a BOS is added (Llama 3: yes; SmolLM2, GPT-2: no) and pads with its pad token, or
  with eos when it has none.

Both: encode(text, bos, eos) -> ids, decode(ids) -> text without BOS and EOS, piece(id), bos_id, eos_id, pad_id,
vocab_size; Tokenizer.from_dir picks the kind from what the checkpoint carries. Padded positions are masked by the
sequences' lengths everywhere they could matter, so the pad id may be a real token's (unk, or eos).
"""
import io
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {model_path} not found")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    @classmethod
    def from_dir(cls, path):
        """The tokenizer that ships with a checkpoint, SentencePiece or byte-level BPE, from what it carries:
        a .gguf file: its metadata; a directory (or a file's directory): tokenizer.model (LLaMA 1/2; HF's LLaMA-2
        folders carry a tokenizer.json too), else tokenizer.json, else its only *.model or its only *.gguf file."""
        path = Path(path)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such GGUF file")
            from checkpoints import read_gguf_metadata  # here, not at the top: checkpoints imports model (torch)
            return BPETokenizer.from_gguf_metadata(read_gguf_metadata(path), str(path))
        if path.is_file():  # a llama2.c .bin, a consolidated.pth or a tokenizer file: look beside it
            path = path.parent
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory (looking for its tokenizer)")
        if (path / "tokenizer.model").is_file():
            return cls(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_tokenizer_json(path / "tokenizer.json")
        models, ggufs = sorted(path.glob("*.model")), sorted(path.glob("*.gguf"))
        if len(models) + len(ggufs) > 1:
            raise ValueError(f"{path}: no tokenizer.model or tokenizer.json, and several candidates "
                             f"({', '.join(p.name for p in models + ggufs)}): give the one to use")
        if models:
            return cls(models[0])
        if ggufs:
            return cls.from_dir(ggufs[0])
        raise FileNotFoundError(f"{path}: no tokenizer found (looked for tokenizer.model, tokenizer.json, *.model, "
                                "*.gguf); copy the checkpoint's tokenizer into this directory")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def piece(self, id: int) -> str:
        """The token as the vocabulary writes it ("▁" marks a space)."""
        return self.sp.id_to_piece(id)


def train_tokenizer(texts, out_path, vocab_size: int = 1024) -> Tokenizer:
    """Train a BPE SentencePiece model on an iterable of strings with LLaMA's settings, save it at out_path.

    Same special ids as LLaMA (unk 0, bos 1, eos 2, no pad), digits split one by one (numbers are then
    spelt digit by digit, which helps arithmetic), and byte fallback so that no character is unknown.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        max_sentence_length=16384, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # write to a temporary file in the same directory, then rename: a crash never leaves half a model
    with tempfile.NamedTemporaryFile(dir=out_path.parent, delete=False, suffix=".tmp") as f:
        f.write(model.getvalue())
    os.replace(f.name, out_path)
    return Tokenizer(out_path)


# ----------------------------------------------------------------------------------------------------------------
# byte-level BPE

def bytes_to_unicode() -> list:
    """GPT-2's table: byte b -> a printable character. Printable Latin-1 bytes stand for themselves; the other 68
    (controls, space, soft hyphen...) take 256, 257, ... in order, so a token is always a visible string ("Ġ" is
    the space, "Ċ" the newline) and the vocabulary file never holds a raw control byte or whitespace."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = [], 0
    for b in range(256):
        if b in kept:
            table.append(chr(b))
        else:
            table.append(chr(256 + moved))
            moved += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


class _CharKinds(dict):
    """str.translate table: code point -> "L" (\\p{L}, a letter), "N" (\\p{N}, a number), "S" (\\s) or "P" (any
    other), filled on first sight. \\s is Oniguruma's (what Hugging Face tokenizers runs): \\t \\n \\v \\f \\r, U+0085
    and the Z categories; not Python's str.isspace, which also counts U+001C..U+001F. Categories are Python's
    unicodedata (Unicode 14 on Python 3.11): a character assigned later may split as tokenizers would not."""

    def __missing__(self, code):
        c = chr(code)
        category = unicodedata.category(c)
        if category[0] in "LN":
            kind = category[0]
        elif c in "\t\n\v\f\r\x85" or category in ("Zs", "Zl", "Zp"):
            kind = "S"
        else:
            kind = "P"
        self[code] = kind
        return kind


CHAR_KINDS = _CharKinds()


def char_kinds(text: str) -> str:
    """One letter per character of text: L, N, S or P (translate runs in C, the dict fills once per character)."""
    return text.translate(CHAR_KINDS)


def _contraction_end(text: str, i: int, ignore_case: bool) -> int:
    """End of 's 't 're 've 'm 'll 'd at i, or i when there is none."""
    if text[i] != "'":
        return i
    two, one = text[i + 1:i + 3], text[i + 1:i + 2]
    if ignore_case:
        two, one = two.lower(), one.lower()
    if two in ("re", "ve", "ll"):
        return i + 3
    return i + 2 if one in ("s", "t", "m", "d") else i


def _run_end(kinds: str, j: int, kind: str) -> int:
    while j < len(kinds) and kinds[j] == kind:
        j += 1
    return j


def _spaces_end(kinds: str, i: int) -> int:
    r"""\s+(?!\S)|\s+ at i: a run of spaces that ends the text, else the run less its last space, which then leads
    the next word (" world"); one space before a word stays alone."""
    j = _run_end(kinds, i, "S")
    return j - 1 if j < len(kinds) and j - i > 1 else j


def split_gpt2(text: str) -> list:
    r"""GPT-2's pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    kinds, words, i = char_kinds(text), [], 0
    while i < len(text):
        j = _contraction_end(text, i, ignore_case=False)
        if j == i:
            # " ?" then a run of one kind: letters, numbers, or anything else that is not a space
            start = i + 1 if text[i] == " " and i + 1 < len(text) and kinds[i + 1] != "S" else i
            j = _run_end(kinds, start + 1, kinds[start]) if kinds[start] != "S" else _spaces_end(kinds, i)
        words.append(text[i:j])
        i = j
    return words


def split_llama3(text: str, max_digits: int = 3) -> list:
    r"""Llama 3's pattern (LLAMA3_PATTERN), with max_digits 3; Qwen2's with 1, where \p{N}{1,3} reads \p{N}."""
    kinds, words, i = char_kinds(text), [], 0
    while i < len(text):
        c, kind = text[i], kinds[i]
        next_kind = kinds[i + 1] if i + 1 < len(text) else ""
        j = _contraction_end(text, i, ignore_case=True)
        if j > i:
            pass
        elif kind == "L" or (next_kind == "L" and kind != "N" and c not in "\r\n"):  # letters, after one other non-newline
            j = _run_end(kinds, i + 1, "L")
        elif kind == "N":
            j = i + 1
            while j < len(text) and j - i < max_digits and kinds[j] == "N":
                j += 1
        elif kind == "P" or (c == " " and next_kind == "P"):  # symbols with any newlines that follow them
            j = _run_end(kinds, i + 1, "P")
            while j < len(text) and text[j] in "\r\n":
                j += 1
        else:  # spaces: up to the run's last newline if it has one
            end = _run_end(kinds, i, "S")
            last_newline = max(text.rfind("\n", i, end), text.rfind("\r", i, end))
            j = last_newline + 1 if last_newline >= 0 else _spaces_end(kinds, i)
        words.append(text[i:j])
        i = j
    return words


def split_qwen2(text: str) -> list:
    return split_llama3(text, max_digits=1)


def split_digits(text: str, individual: bool) -> list:
    """Hugging Face's Digits pre-tokenizer: numbers (\\p{N}) apart from the rest, one by one when individual."""
    kinds, words, i = char_kinds(text), [], 0
    if "N" not in kinds:
        return [text]
    while i < len(text):
        if kinds[i] == "N":
            j = i + 1 if individual else _run_end(kinds, i, "N")
        else:
            j = i + 1
            while j < len(text) and kinds[j] != "N":
                j += 1
        words.append(text[i:j])
        i = j
    return words


def split_individual_digits(text: str) -> list:
    return split_digits(text, individual=True)


def add_prefix_space(text: str) -> list:
    """ByteLevel(add_prefix_space=true): a first word reads like any other (" Hello", not "Hello")."""
    return [text if text.startswith(" ") else " " + text]


# the Split patterns we have scanners for, as tokenizer.json writes them
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_SCANNERS = {LLAMA3_PATTERN: split_llama3, QWEN2_PATTERN: split_qwen2, GPT2_PATTERN: split_gpt2}

# llama.cpp's names for the pre-tokenizer (tokenizer.ggml.pre) -> our steps; Llama 3 adds a BOS and ignores merges
GGUF_PRE = {
    "gpt-2": [split_gpt2],
    "smollm": [split_individual_digits, split_gpt2],
    "llama-bpe": [split_llama3], "llama3": [split_llama3], "llama-v3": [split_llama3],
    "qwen2": [split_qwen2],
}


def pre_tokenizer_steps(spec: dict, where: str) -> list:
    """A tokenizer.json pre_tokenizer as steps, each splitting every piece of the step before: Digits, Split with a
    pattern of SPLIT_SCANNERS, then a ByteLevel last (its own GPT-2 split when use_regex)."""
    if spec is None:
        raise ValueError(f"{where}: no pre_tokenizer: not a byte-level BPE tokenizer (a ByteLevel one is needed)")
    specs = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    steps = []
    for n, s in enumerate(specs):
        kind, last = s.get("type"), n == len(specs) - 1
        pattern = s.get("pattern", {})
        pattern = pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else None
        if kind == "Digits":
            steps.append(split_individual_digits if s.get("individual_digits") else
                         lambda text: split_digits(text, individual=False))
        elif kind == "Split" and pattern in SPLIT_SCANNERS and s.get("behavior") == "Isolated" and not s.get("invert"):
            steps.append(SPLIT_SCANNERS[pattern])
        elif kind == "ByteLevel" and last:
            steps += [add_prefix_space] * bool(s.get("add_prefix_space")) + [split_gpt2] * s.get("use_regex", True)
        else:
            raise ValueError(f"{where}: pre-tokenizer {json.dumps(s)} is not supported (Digits, Split with Llama 3's, "
                             "Qwen2's or GPT-2's pattern, then ByteLevel last)")
    if not specs or specs[-1].get("type") != "ByteLevel":
        raise ValueError(f"{where}: pre-tokenizer {json.dumps(spec)} does not end with ByteLevel: not a byte-level BPE")
    return steps


class BPETokenizer:
    """GPT-2-style byte-level BPE. Text -> added tokens matched whole (as Hugging Face does for its added tokens, and
    llama.cpp for control and user-defined ones) -> the pre-tokenizer's words -> each word's UTF-8 bytes as
    characters of BYTE_TO_CHAR -> merges, the lowest rank first, the leftmost among equals -> ids.

    bos=True in encode means "the model's beginning, if it has one": a BOS only where the checkpoint adds one
    (Llama 3 does; SmolLM2 and GPT-2 do not, their <|im_start|> / <|endoftext|> open a chat turn or a document)."""

    def __init__(self, tokens: list, merges: list, added: dict, steps: list, bos_id, eos_id, pad_id, add_bos: bool,
                 ignore_merges: bool = False, where: str = ""):
        self.tokens = tokens  # id -> token, as the vocabulary writes it
        self.vocab = {t: i for i, t in enumerate(tokens) if t is not None}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # (left, right) -> rank
        self.added = added  # text -> id, matched whole in the text
        self.steps = steps
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.ignore_merges = ignore_merges  # Llama 3: a word that is a token stays whole, whatever the merges say
        self.vocab_size = len(tokens)
        self.where = where
        self.cache = {}  # word -> ids: most words of a text have been seen before
        self.token_bytes = {}  # id -> bytes, for decode
        # longest first: at one place, "<|im_start|>" wins over a shorter token it begins with
        self.added_re = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None

    @classmethod
    def from_tokenizer_json(cls, path) -> "BPETokenizer":
        """A Hugging Face tokenizer.json; bos, eos, pad and add_bos from tokenizer_config.json beside it, else from
        the post_processor (a template that starts with a special token adds it as BOS)."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read it as a tokenizer.json ({e})") from None
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model type {model.get('type')!r} is not supported (only byte-level BPE)")
        for key, fine in (("dropout", None), ("continuing_subword_prefix", ""), ("end_of_word_suffix", "")):
            if (model.get(key) or fine) != fine:
                raise ValueError(f"{path}: BPE with {key}={model[key]!r} is not supported")
        if (spec.get("normalizer") or {}).get("type") not in (None, "NFC"):
            raise ValueError(f"{path}: normalizer {json.dumps(spec['normalizer'])} is not supported (byte-level BPE "
                             "only; a SentencePiece checkpoint's tokenizer.model beside it is read instead)")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError(f"{path}: decoder {json.dumps(spec.get('decoder'))} is not supported (only ByteLevel: "
                             "byte-level BPE)")
        steps = pre_tokenizer_steps(spec.get("pre_tokenizer"), str(path))
        if (spec.get("normalizer") or {}).get("type") == "NFC":  # Qwen2: the normalizer runs before the split
            steps = [lambda text: [unicodedata.normalize("NFC", text)]] + steps

        added = {}
        for a in spec.get("added_tokens", []):
            if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
                raise ValueError(f"{path}: added token {a['content']!r} with lstrip, rstrip or single_word is not "
                                 "supported")
            added[a["content"]] = a["id"]
        by_id = {**model["vocab"], **added}
        tokens = [None] * (max(by_id.values()) + 1)
        for t, i in by_id.items():
            tokens[i] = t
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]

        def id_of(token, what):
            token = token.get("content") if isinstance(token, dict) else token
            if token is None:
                return None
            if token not in by_id:
                raise ValueError(f"{path}: {what} {token!r} is not in the vocabulary")
            return by_id[token]

        template_bos = _template_bos(spec.get("post_processor"))
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        bos_id = id_of(config.get("bos_token"), "bos_token") if "bos_token" in config else template_bos
        eos_id = id_of(config.get("eos_token"), "eos_token")
        pad_id = id_of(config.get("pad_token"), "pad_token")
        add_bos = config["add_bos_token"] if "add_bos_token" in config else template_bos is not None
        return cls._checked(tokens, merges, added, steps, bos_id, eos_id, pad_id, add_bos,
                            model.get("ignore_merges", False), str(path), "tokenizer_config.json's eos_token")

    @classmethod
    def from_gguf_metadata(cls, meta: dict, where: str) -> "BPETokenizer":
        """A GGUF file's tokenizer.ggml.* keys (meta: its metadata as a dict; where: the file, for errors)."""
        model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
        if model != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model {model!r} is not supported from GGUF (only 'gpt2', "
                             "byte-level BPE); give the checkpoint's own tokenizer.model or tokenizer.json")
        if pre not in GGUF_PRE:
            raise ValueError(f"{where}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                             f"({', '.join(GGUF_PRE)})")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = meta.get("tokenizer.ggml.token_type")
        types = [1] * len(tokens) if types is None else types  # 1 normal, 3 control, 4 user-defined
        added = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user-defined
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        pad_id = meta.get("tokenizer.ggml.padding_token_id")
        # llama.cpp's defaults when the file does not say: Llama 3 adds its <|begin_of_text|>, the others nothing
        llama3 = GGUF_PRE[pre] == [split_llama3]
        add_bos = meta.get("tokenizer.ggml.add_bos_token", llama3)
        return cls._checked(tokens, merges, added, GGUF_PRE[pre], meta.get("tokenizer.ggml.bos_token_id"), eos_id,
                            pad_id, bool(add_bos), llama3, where, "tokenizer.ggml.eos_token_id")

    @classmethod
    def _checked(cls, tokens, merges, added, steps, bos_id, eos_id, pad_id, add_bos, ignore_merges, where, eos_key):
        if eos_id is None:
            raise ValueError(f"{where}: no end-of-text token ({eos_key}): needed to end answers and to pad")
        if add_bos and bos_id is None:
            raise ValueError(f"{where}: a BOS is to be added but no bos token is named")
        # no pad token (Llama 3, GPT-2): pad with eos. Padding is masked by the sequences' lengths, never by its id,
        # so a real eos is still learnt where it ends an answer
        pad_id = eos_id if pad_id is None else pad_id
        return cls(tokens, merges, added, steps, bos_id, eos_id, pad_id, add_bos, ignore_merges, where)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = [self.bos_id] if bos and self.add_bos else []
        start = 0
        for m in self.added_re.finditer(text) if self.added_re else ():
            ids += self._encode_ordinary(text[start:m.start()])
            ids.append(self.added[m.group()])
            start = m.end()
        ids += self._encode_ordinary(text[start:])
        return ids + [self.eos_id] * eos

    def _encode_ordinary(self, text: str) -> list:
        """Text without added tokens -> ids."""
        words = [text] if text else []
        for step in self.steps:
            words = [w for word in words for w in step(word)]
        ids = []
        for word in words:
            word_ids = self.cache.get(word)
            if word_ids is None:
                if len(self.cache) > 200_000:  # a long-running process meets ever new words: bound the memory
                    self.cache.clear()
                word_ids = self.cache[word] = self._bpe(word)
            ids += word_ids
        return ids

    def _bpe(self, word: str) -> list:
        """One word -> ids: its bytes as characters, then the best-ranked merge, again and again."""
        symbols = list(word.encode("utf-8").decode("latin-1").translate(BYTE_TO_CHAR))
        whole = "".join(symbols)
        if self.ignore_merges and whole in self.vocab:
            return [self.vocab[whole]]
        while len(symbols) > 1:
            ranks = [self.ranks.get(pair, len(self.ranks)) for pair in zip(symbols, symbols[1:])]
            best = min(ranks)
            if best == len(self.ranks):  # no pair left to merge
                break
            i = ranks.index(best)  # the leftmost of the best pair, as Hugging Face's and llama.cpp's queues do
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        # a byte the vocabulary lacks (SmolLM2 has no \x04, \x06, \x13, \x14, \x16, \x1d) is dropped, as Hugging
        # Face's BPE without unk_token and llama.cpp drop it
        return [self.vocab[s] for s in symbols if s in self.vocab]

    def decode(self, ids) -> str:
        """ids -> text without BOS and EOS (as SentencePiece's decode, and Hugging Face's with skip_special_tokens);
        other added tokens read as their text. A character cut between tokens reads U+FFFD."""
        out = bytearray()
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            if i not in self.token_bytes:
                self.token_bytes[i] = self._bytes_of(self.tokens[i])
            out += self.token_bytes[i]
        return out.decode("utf-8", errors="replace")

    def _bytes_of(self, token: str) -> bytes:
        """An added token is its text; any other token, characters of BYTE_TO_CHAR, one per byte."""
        if token in self.added:
            return token.encode("utf-8")
        return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in token)

    def piece(self, id: int) -> str:
        """The token as the vocabulary writes it ("Ġ" marks a space, "Ċ" a newline)."""
        return self.tokens[id]


def _template_bos(post_processor):
    """The id a tokenizer.json's post_processor puts first (its TemplateProcessing, alone or in a Sequence, starts
    with a special token: Llama 3's <|begin_of_text|>), else None."""
    post_processor = post_processor or {}
    for p in [post_processor, *post_processor.get("processors", [])]:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first = p["single"][0].get("SpecialToken")
            return p["special_tokens"][first["id"]]["ids"][0] if first else None
    return None
