"""Tokenizers that need no downloads: characters of the training text, or raw bytes.

A tokenizer is saved inside every checkpoint (:meth:`Tokenizer.state_dict`) so that sampling
uses exactly the vocabulary the model was trained with.
"""

from __future__ import annotations

from typing import Any, Literal

from .errors import UserError

__all__ = ["Tokenizer"]

Kind = Literal["char", "byte"]


class Tokenizer:
    """Character-level (vocabulary = the sorted distinct characters of a text) or byte-level
    (vocabulary = the 256 byte values, any file, UTF-8 decoding with replacement on output)."""

    def __init__(self, kind: Kind, chars: str = "") -> None:
        if kind not in ("char", "byte"):
            raise UserError(f"unknown tokenizer {kind!r}; choose char or byte")
        if kind == "char" and not chars:
            raise UserError("a character tokenizer needs a non-empty vocabulary")
        self.kind: Kind = kind
        self.chars = chars if kind == "char" else ""
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str, kind: Kind = "char") -> Tokenizer:
        """Build the vocabulary from ``text`` (for ``"byte"`` the text is not needed)."""
        return cls(kind, "".join(sorted(set(text))) if kind == "char" else "")

    @property
    def vocab_size(self) -> int:
        return len(self.chars) if self.kind == "char" else 256

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in the model's vocabulary of "
                f"{self.vocab_size} characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        if self.kind == "byte":
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        return "".join(self.chars[int(i)] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Tokenizer:
        return cls(state["kind"], state.get("chars", ""))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
