"""Tokenizers: characters of the text, raw bytes, a byte-level BPE trained on the corpus
(Hugging Face ``tokenizers``), or the GPT-2 encoding (``tiktoken``, from a local file).

A tokenizer is saved inside every checkpoint and every prepared corpus
(:meth:`Tokenizer.state_dict`, plain JSON-able values) so that training, resuming and sampling
use exactly the vocabulary the tokens were made with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import UserError
from .text import count

__all__ = ["EOT", "KINDS", "TIKTOKEN_FILE_ENV", "Tokenizer"]

Kind = Literal["char", "byte", "bpe", "gpt2"]
KINDS: tuple[str, ...] = ("char", "byte", "bpe", "gpt2")
EOT = "<|endoftext|>"  # document separator of the bpe and gpt2 tokenizers
TIKTOKEN_FILE_ENV = "SPHERETORCH_TIKTOKEN_FILE"

# GPT-2's pre-tokenization pattern (tiktoken_ext.openai_public.r50k_pat_str) and the two files
# tiktoken.get_encoding("gpt2") reads, looked up in its cache only: no network access.
_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_GPT2_URLS = tuple(
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/" + name
    for name in ("vocab.bpe", "encoder.json")
)
_GPT2_HOWTO = (
    "the GPT-2 encoding is not available locally: on a machine with internet run "
    "`TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` "
    f"and set TIKTOKEN_CACHE_DIR=DIR here, or set {TIKTOKEN_FILE_ENV} to a local "
    "r50k_base.tiktoken file (the GPT-2 ranks)"
)


def _require(module: str, kind: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = "tokenizers" if module == "tokenizers" else "tiktoken"
        raise UserError(
            f"--tokenizer {kind} needs the {package!r} package: pip install -e '.[data]' in the "
            f"spheretorch checkout (or pip install {package})"
        ) from None


def _tiktoken_cache_dir() -> str:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _load_gpt2() -> Any:
    """The GPT-2 ``tiktoken.Encoding`` from ``$SPHERETORCH_TIKTOKEN_FILE`` or tiktoken's cache."""
    tiktoken = _require("tiktoken", "gpt2")
    path = os.environ.get(TIKTOKEN_FILE_ENV)
    if path:
        from tiktoken.load import load_tiktoken_bpe

        if not Path(path).is_file():
            raise UserError(f"{TIKTOKEN_FILE_ENV}={path} is not a file")
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:  # a foreign file: base64 or int parse errors
            raise UserError(
                f"{TIKTOKEN_FILE_ENV}={path} is not a .tiktoken rank file: {e}"
            ) from None
        return tiktoken.Encoding(
            name="gpt2",
            pat_str=_GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: len(ranks)},
        )
    cache = _tiktoken_cache_dir()
    keys = [hashlib.sha1(url.encode()).hexdigest() for url in _GPT2_URLS]
    if not cache or not all(os.path.exists(os.path.join(cache, k)) for k in keys):
        raise UserError(_GPT2_HOWTO)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # a corrupt cache makes tiktoken try the network
        raise UserError(f"{_GPT2_HOWTO} ({type(e).__name__} reading {cache})") from None


def _fingerprint(encoding: Any) -> str:
    """sha256 of every token's bytes in id order: equal iff two rank files tokenize alike."""
    h = hashlib.sha256()
    for i in range(encoding.n_vocab):
        token = encoding.decode_single_token_bytes(i)
        h.update(len(token).to_bytes(4, "little") + token)
    return h.hexdigest()[:16]


class Tokenizer:
    """Text to token ids and back.

    * ``char``: the sorted distinct characters of a text (``chars``).
    * ``byte``: the 256 byte values; any file; UTF-8 decoding with replacement on output.
    * ``bpe``: a byte-level BPE trained with :meth:`train_bpe` (``bpe_json``: the Hugging Face
      tokenizer JSON, vocabulary and merges); ``<|endoftext|>`` separates documents.
    * ``gpt2``: the GPT-2 encoding through ``tiktoken``, read from a local file (see
      ``SPHERETORCH_TIKTOKEN_FILE`` / ``TIKTOKEN_CACHE_DIR``), never downloaded;
      ``fingerprint`` (recorded in checkpoints and corpora) rejects a different rank file.
    """

    def __init__(
        self,
        kind: Kind,
        chars: str = "",
        *,
        bpe_json: str = "",
        fingerprint: str = "",
        vocab_size: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise UserError(f"unknown tokenizer {kind!r}; choose {', '.join(KINDS)}")
        if kind == "char" and not chars:
            raise UserError("a character tokenizer needs a non-empty vocabulary")
        if kind == "bpe" and not bpe_json:
            raise UserError("a bpe tokenizer needs its tokenizer JSON (vocabulary and merges)")
        self.kind: Kind = kind
        self.chars = chars if kind == "char" else ""
        self.bpe_json = bpe_json if kind == "bpe" else ""
        self._index = {c: i for i, c in enumerate(self.chars)}
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._table: np.ndarray | None = None
        self._backend: Any = None
        self.fingerprint = ""
        if kind == "bpe":
            tokenizers = _require("tokenizers", "bpe")
            try:
                self._backend = tokenizers.Tokenizer.from_str(bpe_json)
            except Exception as e:
                raise UserError(f"the bpe tokenizer JSON does not load: {e}") from None
        elif kind == "gpt2":
            # Loaded lazily: training on a prepared gpt2 corpus needs no encoding file.
            self.fingerprint, self._n_vocab = fingerprint, vocab_size
            if not fingerprint:
                self._gpt2()

    def _gpt2(self) -> Any:
        if self._backend is None:
            enc = _load_gpt2()
            found = _fingerprint(enc)
            if self.fingerprint and found != self.fingerprint:
                raise UserError(
                    f"the local GPT-2 encoding (fingerprint {found}) is not the one these tokens "
                    f"were made with ({self.fingerprint}); point {TIKTOKEN_FILE_ENV} or "
                    "TIKTOKEN_CACHE_DIR at the original file"
                )
            self._backend, self.fingerprint, self._n_vocab = enc, found, enc.n_vocab
        return self._backend

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_text(cls, text: str, kind: Kind = "char") -> Tokenizer:
        """Build the vocabulary from ``text`` (for ``"byte"`` the text is not needed)."""
        return cls(kind, "".join(sorted(set(text))) if kind == "char" else "")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE of at most ``vocab_size`` tokens (``<|endoftext|>``, the 256
        bytes, then merges; fewer when the text runs out of pairs) on ``texts``."""
        if vocab_size < 258:
            raise UserError(
                f"--vocab-size must be at least 258 for bpe (256 bytes, <|endoftext|> and one "
                f"merge), got {vocab_size}"
            )
        tk = _require("tokenizers", "bpe")
        bpe = tk.Tokenizer(tk.models.BPE())
        bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer=trainer)
        return cls("bpe", bpe_json=bpe.to_str())

    # -- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        if self.kind == "char":
            return len(self.chars)
        if self.kind == "byte":
            return 256
        if self.kind == "bpe":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._n_vocab

    @property
    def eot(self) -> int | None:
        """Id of the document separator ``<|endoftext|>`` (``None`` for char and byte)."""
        if self.kind == "bpe":
            return self._backend.token_to_id(EOT)
        if self.kind == "gpt2":
            return self._gpt2().eot_token
        return None

    @property
    def default_prompt(self) -> str:
        """A newline when the vocabulary has one, else its first character."""
        return self.chars[0] if self.kind == "char" and "\n" not in self.chars else "\n"

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        """Token ids (uint32 arrays) of each text; ``bytes`` are taken as UTF-8 (raw for
        ``byte``). ``bpe`` and ``gpt2`` encode the texts in parallel threads."""
        if self.kind == "byte":
            return [
                np.frombuffer(t if isinstance(t, bytes) else t.encode("utf-8"), np.uint8).astype(
                    np.uint32
                )
                for t in texts
            ]
        strs = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        if self.kind == "char":
            return [self._encode_chars(t) for t in strs]
        if self.kind == "bpe":
            out = self._backend.encode_batch(strs, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.uint32) for e in out]
        import torch  # its thread count: what --threads set (spheretorch.train.threads)

        out = self._gpt2().encode_ordinary_batch(strs, num_threads=torch.get_num_threads())
        return [np.asarray(ids, dtype=np.uint32) for ids in out]

    def _encode_chars(self, text: str) -> np.ndarray:
        # Characters as UTF-32 code points, mapped through a dense table (-1: not in vocab).
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if self._table is None:
            self._table = np.full(int(self._codepoints.max()) + 2, -1, dtype=np.int32)
            self._table[self._codepoints] = np.arange(len(self.chars), dtype=np.int32)
        ids = self._table[np.minimum(cps, len(self._table) - 1)]
        if len(ids) and ids.min() < 0:
            c = chr(int(cps[np.argmax(ids < 0)]))
            raise UserError(
                f"character {c!r} is not in the model's vocabulary of "
                f"{count(self.vocab_size, 'character')}"
            )
        return ids.astype(np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        if self.kind == "bpe":
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._gpt2().decode(ids, errors="replace")

    def decode_stream(self, ids: Iterable[int], hold: int = 8) -> Iterator[str]:
        """``decode`` of ``ids`` as they come, in pieces: a token that ends inside a UTF-8
        character (byte, bpe, gpt2) is held back until the character is complete (at most
        ``hold`` tokens), so the pieces join to ``decode(ids)`` for valid UTF-8."""
        if self.kind == "char":
            for i in ids:
                yield self.chars[i]
            return
        pending: list[int] = []
        for i in ids:
            pending.append(i)
            text = self.decode(pending)
            if text.endswith("\ufffd") and len(pending) < hold:
                continue
            yield text
            pending = []
        if pending:
            yield self.decode(pending)

    # -- (de)serialisation ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (checkpoints load with ``weights_only=True``; corpora use JSON)."""
        if self.kind == "bpe":
            return {"kind": "bpe", "bpe_json": self.bpe_json}
        if self.kind == "gpt2":
            return {
                "kind": "gpt2",
                "encoding": "gpt2",
                "vocab_size": self._n_vocab,
                "fingerprint": self.fingerprint,
            }
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Tokenizer:
        return cls(
            state["kind"],
            state.get("chars", ""),
            bpe_json=state.get("bpe_json", ""),
            fingerprint=state.get("fingerprint", ""),
            vocab_size=state.get("vocab_size", 0),
        )

    def describe(self) -> str:
        """``"bpe vocab 4096"``: for messages."""
        return f"{self.kind} vocab {self.vocab_size}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.state_dict() == other.state_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.state_dict().items())))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
