"""Training text, the 90/10 split, and batches as a deterministic function of (seed, step).

``get_batch`` draws the global batch for a given step from a generator seeded with
``(seed, step)`` alone, so a resumed run sees exactly the batches it would have seen, and a
data-parallel rank can take its slice of the same global batch (``rank``, ``world_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..distributed import shard_rows
from .corpus import Corpus, TokenFile, is_corpus
from .errors import UserError
from .text import count
from .tokenizer import KINDS, Kind, Tokenizer

__all__ = ["BUILTIN", "TextData", "eval_batches", "get_batch", "load_data", "read_text"]

BUILTIN = "tinyshakespeare"


def read_text(path: str | Path | None) -> tuple[str | bytes, str]:
    """Return ``(content, name)``. ``None`` (or ``"tinyshakespeare"``) reads the text shipped
    inside the package. Files are returned as bytes; decoding is the tokenizer's business."""
    if path is None or str(path) == BUILTIN:
        ref = resources.files("spheretorch").joinpath("data", "tinyshakespeare.txt")
        return ref.read_text(encoding="utf-8"), BUILTIN
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if not p.is_file():
        raise UserError(f"data path is not a file: {p}")
    try:
        return p.read_bytes(), str(p)
    except OSError as e:
        raise UserError(f"cannot read data file {p}: {e.strerror}") from None


def _decode(raw: str | bytes, name: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{name} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it to UTF-8 or train with --tokenizer byte"
        ) from None


@dataclass
class TextData:
    """Token ids split into ``train`` and ``val``: int64 tensors (a text file, split 90/10)
    or memmapped :class:`~spheretorch.train.corpus.TokenFile` (a prepared corpus)."""

    tokenizer: Tokenizer
    train: Tensor | TokenFile
    val: Tensor | TokenFile
    name: str

    def check_vocab(self, model_vocab: int) -> None:
        """Every token id must have an embedding row in a model of ``model_vocab`` tokens."""
        if self.tokenizer.vocab_size > model_vocab:
            raise UserError(
                f"{self.name} has a vocabulary of {self.tokenizer.vocab_size} tokens, larger "
                f"than the model's {model_vocab}"
            )

    def check_fits(self, seq_len: int, batch_size: int | None = None) -> None:
        """``UserError`` unless both splits hold a window of ``seq_len`` (+ 2) tokens and,
        given ``batch_size``, the train split has at least that many windows."""
        for split in ("train", "val"):
            n = len(getattr(self, split))
            if n < seq_len + 2:
                raise UserError(
                    f"{self.name} is too short: its {split} split has {count(n, 'token')}, "
                    f"fewer than the context length {seq_len} + 2"
                )
        windows = len(self.train) - seq_len
        if batch_size is not None and batch_size > windows:
            raise UserError(
                f"batch size {batch_size} is larger than the data: {self.name} has "
                f"{windows} training windows of length {seq_len}"
            )


def load_data(
    path: str | Path | None = None,
    tokenizer: Tokenizer | Kind | None = None,
    val_fraction: float = 0.1,
) -> TextData:
    """Read, tokenize and split a text, or open a prepared corpus (a directory).

    ``tokenizer`` is a kind (for a text: a new vocabulary is built from it; ``None``: char),
    or an existing :class:`Tokenizer` (resume, sampling), which a corpus must have been
    prepared with.
    """
    if is_corpus(path):
        corpus = Corpus(path)  # type: ignore[arg-type]
        if isinstance(tokenizer, Tokenizer):
            corpus.check_tokenizer(tokenizer)
        elif tokenizer is not None and tokenizer != corpus.tokenizer.kind:
            raise UserError(
                f"--tokenizer {tokenizer} does not apply to {path}: its tokens were made with "
                f"{corpus.tokenizer.describe()} (leave --tokenizer out)"
            )
        return TextData(corpus.tokenizer, corpus.train, corpus.val, corpus.name)
    raw, name = read_text(path)
    kind = "char" if tokenizer is None else getattr(tokenizer, "kind", tokenizer)
    if kind not in ("char", "byte"):
        raise UserError(
            f"--tokenizer {kind} needs a prepared corpus: run `spheretorch prepare FILE "
            f"--tokenizer {kind} --out DIR` and pass --data DIR"
            if kind in KINDS
            else f"unknown tokenizer {kind!r}; choose char or byte"
        )
    if kind == "byte":
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else None
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer("byte")
    else:
        text = _decode(raw, name)
        if not text:
            raise UserError(f"{name} is empty")
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_text(text)
        ids = torch.from_numpy(tok.encode_batch([text])[0].astype(np.int64))
    if ids is None or len(ids) == 0:
        raise UserError(f"{name} is empty")
    n_val = int(len(ids) * val_fraction)
    return TextData(tok, ids[: len(ids) - n_val], ids[len(ids) - n_val :], name)


def _windows(data: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator for ``(seed, step)``: independent of everything else in the process."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def get_batch(
    data: Tensor,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets ``(B/world, T)`` for training step ``step``.

    The global batch of ``batch_size`` random windows depends on ``(seed, step)`` only; rank
    ``r`` of ``world_size`` gets its share by :func:`spheretorch.distributed.shard_rows`
    (rows ``r::world_size``, the same rule as ``local_batch``).
    """
    starts = torch.randint(
        0, len(data) - seq_len, (batch_size,), generator=batch_generator(seed, step)
    )
    return _windows(data, starts[shard_rows(batch_size, rank, world_size)], seq_len)


def max_eval_batches(n_tokens: int, batch_size: int, seq_len: int) -> int:
    """Batches of distinct windows a split of ``n_tokens`` holds (at least 1)."""
    return max(1, (n_tokens - seq_len) // batch_size)


def eval_batches(
    data: Tensor, n_batches: int, batch_size: int, seq_len: int
) -> list[tuple[Tensor, Tensor]]:
    """Fixed evaluation batches: ``n_batches * batch_size`` windows evenly spaced over ``data``
    (no randomness: every model and every run sees the same ones). At most
    ``max_eval_batches`` batches: more would only repeat windows."""
    n = min(n_batches, max_eval_batches(len(data), batch_size, seq_len)) * batch_size
    starts = torch.linspace(0, len(data) - seq_len - 1, n).long()
    return [_windows(data, s, seq_len) for s in starts.split(batch_size)]
