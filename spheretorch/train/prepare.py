"""``spheretorch prepare``: tokenize text once into memmappable ``train.bin`` / ``val.bin``.

The layout is nanoGPT's: each file is a flat array of token ids (``uint16`` when the vocabulary
has at most 65536 tokens, else ``uint32``, little-endian), next to ``meta.json`` holding the
tokenizer, the split and the counts (:mod:`spheretorch.train.corpus` reads it). Inputs stream
through in chunks, so memory stays bounded whatever the corpus size. Documents (a plain text
file, or one line of a ``.jsonl`` file) are separated by ``<|endoftext|>`` for ``bpe`` and
``gpt2``. The split is deterministic: the last ``val_fraction`` of the token stream is ``val``.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import UserError
from .rundir import RunDir, check_out
from .text import count
from .tokenizer import KINDS, Tokenizer

__all__ = ["FORMAT", "META", "SPLITS", "describe", "dtype_for", "find_inputs", "prepare"]

FORMAT = "spheretorch-corpus-v1"
META = "meta.json"
SPLITS = {"train": "train.bin", "val": "val.bin"}
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")  # what a directory contributes (also .gz)
READ_BYTES = 1 << 18  # one piece of a document: bpe/gpt2 encode many pieces in parallel
BPE_VOCAB = 8192
BUILTIN = "tinyshakespeare"
MAX_CARRY = 1 << 24  # text without a safe cut in 16M characters is cut anyway


def dtype_for(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocabulary of at most 65536), else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _is_text(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return not path.name.startswith(".") and name.endswith(TEXT_SUFFIXES)


def find_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named by ``inputs``, in order: a file as is (``tinyshakespeare``: the text shipped
    with the package); a directory's ``.txt``, ``.text``,
    ``.md``, ``.jsonl`` files (optionally ``.gz``) recursively in sorted order; a glob's
    matches sorted."""
    if not inputs:
        raise UserError("prepare needs at least one INPUT (a text file, a directory or a glob)")
    files: list[Path] = []
    for item in map(str, inputs):
        if item == BUILTIN and not Path(item).exists():
            files.append(
                Path(str(resources.files("spheretorch").joinpath("data", BUILTIN + ".txt")))
            )
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise UserError(f"no file matches {item!r}")
            files += matches
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).rglob("*") if p.is_file() and _is_text(p))
            if not found:
                raise UserError(
                    f"directory {item} holds no {', '.join(TEXT_SUFFIXES)} files (or .gz of them)"
                )
            files += found
        elif Path(item).is_file():
            files.append(Path(item))
        else:
            raise UserError(f"input not found: {item}")
    return files


def _open(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream to read, underlying file whose ``tell()`` is the progress in bytes)."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw  # type: ignore[return-value]
    return raw, raw


def _cut(text: str) -> int:
    """Where to end a piece so that tokenizing the pieces equals tokenizing the whole: at a
    newline, else a space, that follows a non-space (no GPT-2 pre-token spans such a
    boundary); 0: no such place."""
    for sep in ("\n", " "):
        k = len(text)
        while (k := text.rfind(sep, 0, k)) > 0:
            if not text[k - 1].isspace():
                return k
    return 0


def _pieces(
    files: Sequence[Path],
    raw_bytes: bool,
    word_safe: bool,
    text_field: str,
    advance: Callable[[int], None],
) -> Iterator[tuple[str | bytes, bool]]:
    """Yield ``(piece, ends_document)`` over every document of ``files`` in order.

    ``raw_bytes``: plain files come as bytes (the byte tokenizer; no decoding). ``word_safe``:
    pieces end only where :func:`_cut` allows. ``advance(n)``: n more input bytes consumed.
    """
    for path in files:
        stream, raw = _open(path)
        with raw, stream:
            try:
                yield from _file_pieces(
                    path, stream, raw, raw_bytes, word_safe, text_field, advance
                )
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise UserError(f"cannot read {path}: {e}") from None


def _file_pieces(
    path: Path,
    stream: BinaryIO,
    raw: BinaryIO,
    raw_bytes: bool,
    word_safe: bool,
    text_field: str,
    advance: Callable[[int], None],
) -> Iterator[tuple[str | bytes, bool]]:
    done = 0

    def progress() -> None:
        nonlocal done
        pos = raw.tell()
        advance(pos - done)
        done = pos

    is_jsonl = path.name.removesuffix(".gz").endswith(".jsonl")
    if is_jsonl:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, IndexError):
                raise UserError(
                    f"{path} line {lineno}: expected a JSON object with a string "
                    f"{text_field!r} field (set the field with --text-field)"
                ) from None
            yield (text.encode("utf-8") if raw_bytes else text), True
            if lineno % 256 == 0:
                progress()
        progress()
        return
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, carry, any_text = 0, "", False
    while True:
        block = stream.read(READ_BYTES)
        final = not block
        if raw_bytes:
            piece: str | bytes = block
        else:
            pending = len(decoder.getstate()[0])
            try:
                piece = carry + decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8 text (invalid byte at offset "
                    f"{offset - pending + e.start}); convert it or use --tokenizer byte"
                ) from None
            carry = ""
            if word_safe and not final and len(piece) < MAX_CARRY:
                k = _cut(piece)
                piece, carry = piece[:k], piece[k:]
        offset += len(block)
        progress()
        if final:
            if piece or any_text:
                yield piece, True
            return
        if piece:
            any_text = True
            yield piece, False


class _TokenWriter:
    """Appends token arrays to a file in ``dtype``, checking every id fits the vocabulary."""

    def __init__(self, path: Path, vocab_size: int, eot: int | None) -> None:
        self.path, self.vocab_size, self.eot = path, vocab_size, eot
        self.dtype = dtype_for(vocab_size)
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.count = 0
        self.documents = 0

    def write(self, arrays: list[np.ndarray], ends: list[bool]) -> None:
        parts: list[np.ndarray] = []
        for ids, end in zip(arrays, ends):
            parts.append(ids)
            if end:
                self.documents += 1
                if self.eot is not None:
                    parts.append(np.array([self.eot], dtype=np.uint32))
        if not parts:
            return
        ids = np.concatenate(parts)
        if len(ids) and int(ids.max()) >= self.vocab_size:  # a tokenizer bug, never user data
            raise RuntimeError(f"token id {int(ids.max())} outside vocabulary {self.vocab_size}")
        ids.astype(self.dtype).tofile(self.file)
        self.count += len(ids)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is optional
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _size(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def _build_tokenizer(
    kind: str,
    files: Sequence[Path],
    vocab_size: int | None,
    bpe_train_bytes: int,
    text_field: str,
    progress: bool,
) -> Tokenizer:
    if kind == "byte":
        return Tokenizer("byte")
    if kind == "gpt2":
        return Tokenizer("gpt2")
    total = _size(files)
    if kind == "char":
        seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
        with _bar(progress, total, "vocabulary") as bar:
            advance = bar.update if bar is not None else (lambda n: None)
            for piece, _ in _pieces(files, False, False, text_field, advance):
                seen[np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)] = True
        if not seen.any():
            raise UserError("the inputs hold no text")
        return Tokenizer("char", "".join(map(chr, np.flatnonzero(seen))))

    def sample() -> Iterator[str]:
        taken = 0
        for piece, _ in _pieces(files, False, True, text_field, advance):
            yield piece  # type: ignore[misc]
            taken += len(piece)
            if taken >= bpe_train_bytes:
                return

    with _bar(progress, min(total, bpe_train_bytes), "training bpe") as bar:
        advance = bar.update if bar is not None else (lambda n: None)
        return Tokenizer.train_bpe(sample(), vocab_size or BPE_VOCAB)


def _guard(out: Path, force: bool) -> None:
    """A corpus gets a directory of its own, as a run does (``spheretorch.train.rundir``):
    ``--out`` is new, empty, or holds a corpus (replaced with ``--force``); never a run's
    directory or one with other files."""
    if not out.is_dir():
        return
    ours = {META, *SPLITS.values(), ".train.bin.tmp", ".val.bin.tmp"}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    kind = RunDir(out).kind() if others else None
    if kind is not None:
        raise UserError(
            f"{out} holds a {kind} run; prepare writes a corpus into a directory of its own: "
            f"choose another --out"
        )
    if others:
        raise UserError(
            f"{out} holds other files ({others[0]!r}"
            + (f" and {len(others) - 1} more" if len(others) > 1 else "")
            + "); prepare writes a corpus into a new or empty directory: choose another --out"
        )
    if not force and any((out / name).exists() for name in ours):
        raise UserError(f"{out} already holds a prepared corpus; pass --force to overwrite it")


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer: str = "char",
    *,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    bpe_train_bytes: int = 100 << 20,
    chunk_bytes: int = 4 << 20,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``.

    ``tokenizer``: ``char`` (vocabulary: the corpus's characters, found in a first pass),
    ``byte``, ``bpe`` (a byte-level BPE of ``vocab_size`` tokens, default 8192, trained on the
    first ``bpe_train_bytes`` of text) or ``gpt2``. ``chunk_bytes`` of text are tokenized at a
    time, which bounds memory. Returns the metadata written to ``meta.json``.
    """
    if tokenizer not in KINDS:
        raise UserError(f"unknown --tokenizer {tokenizer!r}; choose {', '.join(KINDS)}")
    if vocab_size is not None and tokenizer != "bpe":
        raise UserError(f"--vocab-size applies to --tokenizer bpe only, not {tokenizer}")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out = check_out(out)
    _guard(out, force)
    files = find_inputs(inputs)
    tok = _build_tokenizer(tokenizer, files, vocab_size, bpe_train_bytes, text_field, progress)

    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # no meta.json: the directory is not a valid corpus
    tmp_train, tmp_val = out / ".train.bin.tmp", out / ".val.bin.tmp"
    try:
        writer = _TokenWriter(tmp_train, tok.vocab_size, tok.eot)
        batch: list[str | bytes] = []
        ends: list[bool] = []
        size = 0
        word_safe = tokenizer in ("bpe", "gpt2")
        with _bar(progress, _size(files), f"tokenizing ({tokenizer})") as bar:
            advance = bar.update if bar is not None else (lambda n: None)
            for piece, end in _pieces(files, tokenizer == "byte", word_safe, text_field, advance):
                batch.append(piece)
                ends.append(end)
                size += len(piece)
                if size >= chunk_bytes:
                    writer.write(tok.encode_batch(batch), ends)
                    batch, ends, size = [], [], 0
            writer.write(tok.encode_batch(batch), ends)
        writer.close()
        total = writer.count
        n_val = int(total * val_fraction)
        if n_val < 1 or total - n_val < 1:
            raise UserError(
                f"the inputs give {count(total, 'token')}: too few for a train and a val split "
                f"with --val-fraction {val_fraction}"
            )
        _split_tail(tmp_train, tmp_val, total - n_val, writer.dtype)
        os.replace(tmp_train, out / SPLITS["train"])
        os.replace(tmp_val, out / SPLITS["val"])
    except BaseException as e:
        for tmp in (tmp_train, tmp_val):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # reading errors are UserErrors already: this is writing
            raise UserError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    meta = {
        "format": FORMAT,
        "tokenizer": tok.state_dict(),
        "vocab_size": tok.vocab_size,
        "dtype": writer.dtype.name,
        "tokens": {"train": total - n_val, "val": n_val},
        "split": {"rule": "tail", "val_fraction": val_fraction},
        "documents": writer.documents,
        "files": len(files),
        "bytes": _size(files),
        "inputs": [str(i) for i in inputs],
    }
    tmp_meta = out / (META + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_meta, out / META)  # last: a directory with meta.json is complete
    return meta


def describe(meta: dict[str, Any], out: str | Path, seconds: float) -> str:
    """One line about a prepared corpus, for the command line."""
    n, tok = meta["tokens"], meta["tokenizer"]
    mib = meta["bytes"] / 2**20
    return (
        f"{out}: {n['train']:,} train + {n['val']:,} val tokens ({tok['kind']} vocab "
        f"{meta['vocab_size']:,}, {meta['dtype']}) from {count(meta['files'], 'file')}, "
        f"{count(meta['documents'], 'document', fmt=',')}, {mib:.1f} MiB in {seconds:.1f} s "
        f"({mib / max(seconds, 1e-9):.1f} MiB/s)"
    )


def _split_tail(src: Path, dst: Path, keep: int, dtype: np.dtype, block: int = 1 << 22) -> None:
    """Move ``src``'s tokens from position ``keep`` on into ``dst``, in bounded blocks."""
    with open(src, "r+b") as f, open(dst, "wb") as g:
        f.seek(keep * dtype.itemsize)
        while chunk := f.read(block * dtype.itemsize):
            g.write(chunk)
        g.flush()
        os.fsync(g.fileno())
        f.truncate(keep * dtype.itemsize)
