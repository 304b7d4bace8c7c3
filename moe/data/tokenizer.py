"""Byte-level BPE tokenizer (HF ``tokenizers``) with ``<|endoftext|>`` as EOS."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import EOS_TOKEN

TOKENIZER_FILE = "tokenizer.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class BPETokenizer:
    """Thin wrapper: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``.

    ``decode(encode(s)) == s`` for any str ``s`` (no normalizer, no prefix space; the byte
    alphabet is always in the vocabulary).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
        self.eos_id: int = int(eos)
        self.vocab_size: int = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_token = EOS_TOKEN

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a ``tokenizer.json`` (or a folder containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer file at {p}")
        try:
            tokenizer = Tokenizer.from_file(str(p))
        except Exception as e:   # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{p} is not a tokenizer file ({e}); copy it again from the run that trained it") from None
        return cls(tokenizer)

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        atomic_write_bytes(p, self._tok.to_str().encode("utf-8"))
        return p

    # ------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Parallel (Rust threads) encoding of many texts."""
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """The most characters of text one token stands for (so a text of n characters is at least
        n / max_token_chars tokens long), or None when a normalizer may shorten the text first.
        Byte-level: each character of a vocabulary entry is one byte, and a byte at most one character."""
        if self._tok.normalizer is not None:
            return None
        return max(len(token) for token in self._tok.get_vocab(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def hf_tokenizer(self) -> Tokenizer:
        return self._tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"
