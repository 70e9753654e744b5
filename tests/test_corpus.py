"""Reading a prepared corpus: memmapped splits, batches, tokenizer records, one-line errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spheretorch.train import Tokenizer, UserError, eval_batches, get_batch, load_data
from spheretorch.train.corpus import Corpus, TokenFile, is_corpus
from spheretorch.train.prepare import prepare


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare([Path(__file__).parents[1] / "spheretorch/data/tinyshakespeare.txt"], out, "char",
            progress=False)  # fmt: skip
    return out


def broken(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_splits_are_memmaps_and_batches_match_the_text_path(corpus_dir: Path) -> None:
    corpus = Corpus(corpus_dir)
    ref = load_data(None, "char")
    assert is_corpus(corpus_dir) and not is_corpus(corpus_dir / "train.bin")
    assert isinstance(corpus.train, TokenFile) and isinstance(corpus.train.tokens, np.memmap)
    assert len(corpus.train) == len(ref.train) and len(corpus.val) == len(ref.val)
    pos = torch.tensor([[0, 5], [7, 100]])
    assert torch.equal(corpus.train[pos], ref.train[pos]) and corpus.train[pos].dtype == torch.long
    # The batch code takes a TokenFile wherever it took a token tensor: same windows.
    for step in (0, 3):
        for got, want in zip(
            get_batch(corpus.train, 1, step, 4, 16, rank=1, world_size=2),
            get_batch(ref.train, 1, step, 4, 16, rank=1, world_size=2),
        ):
            assert torch.equal(got, want)
    for (x, y), (rx, ry) in zip(eval_batches(corpus.val, 2, 3, 8), eval_batches(ref.val, 2, 3, 8)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_load_data_opens_a_corpus_and_checks_tokenizer_and_vocabulary(corpus_dir: Path) -> None:
    data = load_data(corpus_dir)
    assert isinstance(data.train, TokenFile) and data.name == str(corpus_dir)
    assert load_data(corpus_dir, "char").tokenizer == data.tokenizer == load_data().tokenizer
    with pytest.raises(
        UserError, match="prepared with tokenizer char vocab 65, but the checkpoint"
    ):
        load_data(corpus_dir, Tokenizer("byte"))  # e.g. resuming a byte-level run
    with pytest.raises(UserError, match=r"--tokenizer byte does not apply to .* char vocab 65"):
        load_data(corpus_dir, "byte")
    with pytest.raises(UserError, match="--tokenizer bpe needs a prepared corpus: run `spheret"):
        load_data(None, "bpe")
    data.check_vocab(65)
    with pytest.raises(UserError, match="vocabulary of 65 tokens, larger than the model's 64"):
        data.check_vocab(64)


def test_bad_directories_give_one_line_errors(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        Corpus(tmp_path / "nope")
    cases = {
        "meta.json is missing": lambda d: (d / "meta.json").unlink(),
        "val.bin is missing": lambda d: (d / "val.bin").unlink(),
        "train.bin is truncated: 2000 bytes": lambda d: _truncate(d / "train.bin", 2000),
        "val.bin is longer than recorded": lambda d: _append(d / "val.bin"),
        "cannot read": lambda d: (d / "meta.json").write_text("{"),
        "is not a spheretorch-corpus-v1 file": lambda d: _edit(d, format="nanogpt"),
        "is inconsistent: vocab_size 300": lambda d: _edit(d, vocab_size=300),
        "incomplete or damaged": lambda d: _edit(d, tokens={"train": 5}),
    }
    for i, (message, damage) in enumerate(cases.items()):
        path = broken(corpus_dir, tmp_path / str(i))
        damage(path)
        with pytest.raises(UserError, match=message) as e:
            Corpus(path)
        assert "\n" not in str(e.value)


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0\0")


def _edit(d: Path, **fields: object) -> None:
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, **fields}))


def test_tokenizer_records_survive_checkpoints(corpus_dir: Path) -> None:
    """Every kind's state is plain data: it loads under ``weights_only=True`` and rebuilds an
    equal tokenizer that decodes alike."""
    text = "To be, or not to be: that is the question.\n"
    for tok in (
        Corpus(corpus_dir).tokenizer,
        Tokenizer("byte"),
        Tokenizer.train_bpe([text * 20], 280),
    ):
        buf = io.BytesIO()
        torch.save({"tokenizer": tok.state_dict()}, buf)
        buf.seek(0)
        back = Tokenizer.from_state_dict(torch.load(buf, weights_only=True)["tokenizer"])
        assert back == tok and back.decode(back.encode(text)) == text
        assert json.loads(json.dumps(tok.state_dict())) == tok.state_dict()
    assert Tokenizer.train_bpe([text], 300).default_prompt == "\n"
    with pytest.raises(UserError, match="unknown tokenizer 'word'"):
        Tokenizer("word")  # type: ignore[arg-type]
