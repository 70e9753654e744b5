"""A prepared corpus (``spheretorch prepare``): memmapped token files and their tokenizer.

Batches index the memmap directly, so only the windows drawn are read from disk; the files are
never loaded whole. Every check fails early with a one-line
:class:`~spheretorch.train.UserError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .prepare import FORMAT, META, SPLITS, dtype_for
from .tokenizer import Tokenizer

__all__ = ["Corpus", "TokenFile", "is_corpus"]


def is_corpus(path: str | Path | None) -> bool:
    """Whether ``--data path`` names a prepared directory (rather than a text file)."""
    return path is not None and Path(path).is_dir()


class TokenFile:
    """One split as a read-only memmap of ``len(self)`` token ids.

    Indexing with positions (an integer tensor or array, any shape) reads just those tokens
    and returns them as an ``int64`` tensor; this is all the batch code needs.
    """

    def __init__(self, path: Path, dtype: np.dtype, count: int) -> None:
        self.path = path
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: Tensor | np.ndarray | slice | int) -> Tensor:
        if isinstance(index, Tensor):
            index = index.numpy()
        return torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {len(self)} {self.tokens.dtype.name} tokens)"


class Corpus:
    """A directory written by :func:`spheretorch.train.prepare.prepare`: ``meta.json``,
    ``train.bin`` and ``val.bin``, checked on opening (format, sizes, tokenizer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = self._read_meta()
        try:
            self.tokenizer = Tokenizer.from_state_dict(self.meta["tokenizer"])
            vocab = int(self.meta["vocab_size"])
            self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            counts = {split: int(self.meta["tokens"][split]) for split in SPLITS}
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{self.path / META} is incomplete or damaged ({e!r})") from None
        if self.tokenizer.vocab_size != vocab or self.dtype != dtype_for(vocab):
            raise UserError(
                f"{self.path / META} is inconsistent: vocab_size {vocab}, dtype "
                f"{self.dtype.name}, tokenizer {self.tokenizer.describe()}"
            )
        self.splits = {s: self._open(s, counts[s]) for s in SPLITS}
        self.name = str(self.path)

    def _read_meta(self) -> dict[str, Any]:
        meta_path = self.path / META
        if not self.path.is_dir():
            raise UserError(f"prepared corpus not found: {self.path} is not a directory")
        if not meta_path.is_file():
            raise UserError(
                f"{self.path} is not a prepared corpus: {META} is missing "
                f"(make one with `spheretorch prepare INPUT... --out {self.path}`)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {meta_path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"{meta_path} is not a {FORMAT} file (format {found!r})")
        return meta

    def _open(self, split: str, count: int) -> TokenFile:
        path = self.path / SPLITS[split]
        if not path.is_file():
            raise UserError(f"{path} is missing; prepare the corpus again")
        size, expected = path.stat().st_size, count * self.dtype.itemsize
        if size != expected:
            raise UserError(
                f"{path} is {'truncated' if size < expected else 'longer than recorded'}: "
                f"{size} bytes, expected {expected} ({count} {self.dtype.name} tokens); "
                "prepare the corpus again"
            )
        if count == 0:
            raise UserError(f"{path} holds no tokens; prepare the corpus again")
        return TokenFile(path, self.dtype, count)

    @property
    def train(self) -> TokenFile:
        return self.splits["train"]

    @property
    def val(self) -> TokenFile:
        return self.splits["val"]

    def check_tokenizer(self, tokenizer: Tokenizer, source: str = "the checkpoint") -> None:
        """The tokens must have been made by ``tokenizer`` (e.g. the one a checkpoint records)."""
        if tokenizer != self.tokenizer:
            raise UserError(
                f"{self.path} was prepared with tokenizer {self.tokenizer.describe()}, but "
                f"{source} uses {tokenizer.describe()}"
            )

    def __repr__(self) -> str:
        n = {s: len(f) for s, f in self.splits.items()}
        return f"Corpus({self.name!r}, {self.tokenizer.describe()}, tokens {n})"
