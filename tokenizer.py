"""
A thin wrapper over SentencePiece, the tokenizer of LLaMA 1 and 2, and a way to train a small one.

LLaMA's tokenizer.model has bos=1, eos=2, unk=0 and no padding token; we pad with unk (0), as
LLM-Adapters and Alpaca-LoRA do, and padded positions are masked everywhere they could matter.
"""
import io
import os
import tempfile
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
    def from_dir(cls, path) -> "Tokenizer":
        """The tokenizer that ships with a checkpoint: tokenizer.model, or the directory's only *.model file."""
        path = Path(path)
        if path.is_file():  # a llama2.c .bin or a consolidated.pth: look beside it
            path = path.parent
        if (path / "tokenizer.model").is_file():
            return cls(path / "tokenizer.model")
        candidates = sorted(path.glob("*.model"))
        if len(candidates) == 1:
            return cls(candidates[0])
        raise FileNotFoundError(f"{path}: no tokenizer.model (SentencePiece) found; copy the checkpoint's "
                                "tokenizer.model into this directory")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


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
