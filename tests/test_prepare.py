"""`prepare`: inputs, the four tokenizers, the nanoGPT file layout, chunking, memory bound."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spheretorch.cli import main
from spheretorch.train import UserError, get_preset, load_data
from spheretorch.train import prepare as prep
from spheretorch.train.corpus import Corpus
from spheretorch.train.prepare import dtype_for, find_inputs, prepare
from spheretorch.train.tokenizer import EOT, TIKTOKEN_FILE_ENV, Tokenizer

SHAKESPEARE = Path(prep.__file__).parents[1] / "data" / "tinyshakespeare.txt"
TEXT = SHAKESPEARE.read_text(encoding="utf-8")


def tokens(corpus: Corpus) -> np.ndarray:
    return np.concatenate([np.asarray(corpus.train.tokens), np.asarray(corpus.val.tokens)])


@pytest.fixture(scope="module")
def small_bpe() -> Tokenizer:
    return Tokenizer.train_bpe([TEXT[:100_000]], 320)


# -- char and byte: the same tokens and split as the built-in text path -----------------------


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_char_and_byte_equal_the_text_path(tmp_path: Path, kind: str) -> None:
    meta = prepare([SHAKESPEARE], tmp_path, kind, progress=False, chunk_bytes=1 << 15)
    corpus = Corpus(tmp_path)
    ref = load_data(None, kind)
    assert corpus.tokenizer == ref.tokenizer
    assert np.array_equal(np.asarray(corpus.train.tokens), ref.train.numpy())
    assert np.array_equal(np.asarray(corpus.val.tokens), ref.val.numpy())
    assert meta["dtype"] == "uint16" and meta["documents"] == 1
    assert meta["tokens"] == {"train": len(ref.train), "val": len(ref.val)}
    assert (tmp_path / "train.bin").stat().st_size == 2 * len(ref.train)  # flat uint16 (nanoGPT)
    assert json.loads((tmp_path / "meta.json").read_text())["split"]["rule"] == "tail"


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path: Path) -> None:
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    text = "".join(map(chr, range(0x10000, 0x10000 + 66_000)))  # 66k distinct characters
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "wide.txt"], tmp_path / "out", "char", progress=False)
    corpus = Corpus(tmp_path / "out")
    assert meta["dtype"] == "uint32" and corpus.tokenizer.vocab_size == 66_000
    assert corpus.tokenizer.decode(tokens(corpus).tolist()) == text


# -- bpe -------------------------------------------------------------------------------------


def test_bpe_round_trip_deterministic_and_chunk_independent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in.txt"
    src.write_text(TEXT[:60_000], encoding="utf-8")
    a = prepare([src], tmp_path / "a", "bpe", vocab_size=300, progress=False)
    b = prepare([src], tmp_path / "b", "bpe", vocab_size=300, progress=False)
    assert a == {**b, "inputs": a["inputs"]}
    assert (tmp_path / "a/train.bin").read_bytes() == (tmp_path / "b/train.bin").read_bytes()
    corpus = Corpus(tmp_path / "a")
    tok = corpus.tokenizer
    assert tok.kind == "bpe" and tok.vocab_size == 300 and tok.eot == 0
    ids = tokens(corpus)
    assert ids[-1] == tok.eot and tok.decode(ids[:-1].tolist()) == TEXT[:60_000]
    assert np.array_equal(ids[:-1], tok.encode(TEXT[:60_000]))  # pieces == whole text
    # Tiny pieces and batches: still the tokens of the whole text.
    monkeypatch.setattr(prep, "READ_BYTES", 97)
    prepare([src], tmp_path / "c", "bpe", vocab_size=300, progress=False, chunk_bytes=500)
    assert np.array_equal(tokens(Corpus(tmp_path / "c")), ids)


@given(st.text(alphabet="ab .'\n\t", max_size=60), st.integers(0, 60))
def test_cut_points_do_not_change_bpe_tokens(small_bpe: Tokenizer, text: str, at: int) -> None:
    k = prep._cut(text[: max(at, 1)])
    if k:
        assert small_bpe.encode(text[:k]) + small_bpe.encode(text[k:]) == small_bpe.encode(text)


def test_bpe_vocab_size_checked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="at least 258"):
        prepare([SHAKESPEARE], tmp_path, "bpe", vocab_size=100, progress=False)
    with pytest.raises(UserError, match="--vocab-size applies to --tokenizer bpe only"):
        prepare([SHAKESPEARE], tmp_path, "char", vocab_size=1000, progress=False)


# -- inputs ----------------------------------------------------------------------------------


def test_directories_globs_jsonl_and_gzip(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file\n")
    (d / "a.txt").write_text("first file\n")
    (d / "sub" / "c.md").write_text("third\n")
    (d / "skip.csv").write_text("not,text\n")
    (d / ".hidden.txt").write_text("hidden\n")
    with gzip.open(d / "sub" / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": "doc two"}) + "\n")
    files = find_inputs([d])
    assert [f.relative_to(d).as_posix() for f in files] == [
        "a.txt",
        "b.txt",
        "sub/c.md",
        "sub/d.jsonl.gz",
    ]
    assert find_inputs([str(d / "*.txt"), d / "skip.csv"]) == [
        d / "a.txt",
        d / "b.txt",
        d / "skip.csv",
    ]
    meta = prepare([d], tmp_path / "out", "bpe", vocab_size=300, progress=False, val_fraction=0.2)
    corpus = Corpus(tmp_path / "out")
    assert meta["documents"] == 5 and meta["files"] == 4
    text = corpus.tokenizer.decode(tokens(corpus).tolist())
    assert text == EOT.join(["first file\n", "second file\n", "third\n", "doc one", "doc two", ""])


def test_input_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="input not found"):
        prepare([tmp_path / "nope.txt"], out, progress=False)
    with pytest.raises(UserError, match="no file matches"):
        prepare([str(tmp_path / "*.nothing")], out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no \.txt"):
        prepare([tmp_path / "empty"], out, progress=False)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match=r"not UTF-8 text \(invalid byte at offset 3\)"):
        prepare([tmp_path / "latin1.txt"], out, "char", progress=False)
    prepare([tmp_path / "latin1.txt"], out, "byte", progress=False, val_fraction=0.5)  # any bytes
    with pytest.raises(UserError, match="already holds a prepared corpus; pass --force"):
        prepare([tmp_path / "latin1.txt"], out, "byte", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: expected a JSON object"):
        prepare([tmp_path / "bad.jsonl"], out, "char", progress=False, force=True)
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(UserError, match="too few for a train and a val split"):
        prepare([tmp_path / "tiny.txt"], out, "char", progress=False, force=True)
    with pytest.raises(UserError, match="--val-fraction must be between 0 and 1"):
        prepare([tmp_path / "tiny.txt"], out, "char", val_fraction=1.0, progress=False)
    assert not list(out.glob(".*.tmp"))  # failed runs leave no temporary files


def test_missing_optional_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import raises ImportError
    with pytest.raises(UserError, match=r"needs the 'tokenizers' package: pip install"):
        prepare([SHAKESPEARE], tmp_path, "bpe", progress=False)


# -- gpt2 through tiktoken, from local files only ---------------------------------------------


def write_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """A ``.tiktoken`` file: one ``base64(token) rank`` line per token."""
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_gpt2_without_local_encoding_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TIKTOKEN_FILE_ENV, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached
    with pytest.raises(UserError, match=r"not available locally.*TIKTOKEN_CACHE_DIR") as e:
        prepare([SHAKESPEARE], tmp_path / "out", "gpt2", progress=False)
    assert "\n" not in str(e.value)


def test_gpt2_from_a_local_tiktoken_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small stand-in for r50k_base.tiktoken: the 256 bytes, then a few merges.
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"he", b" t", b" the", b"the", b"in", b"an", b"nd"):
        ranks[merge] = len(ranks)
    write_ranks(ranks, tmp_path / "small.tiktoken")
    monkeypatch.setenv(TIKTOKEN_FILE_ENV, str(tmp_path / "small.tiktoken"))
    src = tmp_path / "in.txt"
    src.write_text(TEXT[:5000], encoding="utf-8")
    meta = prepare([src], tmp_path / "out", "gpt2", progress=False)
    corpus = Corpus(tmp_path / "out")
    tok = corpus.tokenizer
    assert meta["vocab_size"] == 265 and tok.eot == 264 and meta["tokenizer"]["encoding"] == "gpt2"
    ids = tokens(corpus)
    assert tok.decode(ids.tolist()) == TEXT[:5000] + EOT and (ids == 256).sum() > 0  # "th"
    # Another rank file under the same name: the recorded fingerprint tells them apart.
    ranks[b"zz"] = len(ranks)
    write_ranks(ranks, tmp_path / "other.tiktoken")
    monkeypatch.setenv(TIKTOKEN_FILE_ENV, str(tmp_path / "other.tiktoken"))
    with pytest.raises(UserError, match="is not the one these tokens were made with"):
        Corpus(tmp_path / "out").tokenizer.decode([1, 2])


# -- a corpus larger than the memory it may use -----------------------------------------------


@pytest.mark.slow
def test_200mb_corpus_streams_in_bounded_memory(tmp_path: Path) -> None:
    """200 MB of text -> 200M char tokens (400 MB as uint16, 1.6 GB as int64 in RAM), prepared
    in a fresh process whose peak RSS may grow by at most 100 MB over its imports."""
    src = tmp_path / "big.txt"
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \nABCDE.,;:!?'-", np.uint8)
    with open(src, "wb") as f:
        for _ in range(25):
            f.write(alphabet[rng.integers(0, len(alphabet), 8 << 20)].tobytes())
    script = textwrap.dedent(
        """
        import json, resource, sys
        from spheretorch.train.prepare import prepare
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        meta = prepare([sys.argv[1]], sys.argv[2], "char", progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"grew_kib": peak - base, "tokens": meta["tokens"]}))
        """
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", script, str(src), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    report = json.loads(run.stdout)
    src.unlink()
    assert report["tokens"] == {"train": 188_743_680, "val": 20_971_520}
    assert report["grew_kib"] < 100 * 1024, report
    assert (out / "train.bin").stat().st_size == 2 * 188_743_680
    corpus = Corpus(out)
    assert corpus.tokenizer.vocab_size == len(set(alphabet)) and len(corpus.val) == 20_971_520


# -- the whole path from the command line -----------------------------------------------------


@pytest.mark.slow
def test_cpu_bpe_preset_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    train = ["train", "--model", "ngpt", "--preset", "cpu-bpe", "--out", "run", "--threads", "1"]
    quick = ["--steps", "2", "--eval-interval", "2", "--eval-batches", "1", "--batch-size", "2"]
    assert main([*train, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "preset cpu-bpe trains on a prepared corpus, not the built-in text" in err
    prepare_cmd = get_preset("cpu-bpe").corpus.split()[1:]  # the command the preset names
    assert main([*prepare_cmd, "--no-progress"]) == 0
    assert "(bpe vocab 1,024, uint16)" in capsys.readouterr().out
    corpus = "data/shakespeare-bpe"
    assert main([*train, *quick, "--data", corpus, "--no-progress"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    row = [json.loads(line) for line in Path("run/metrics.jsonl").read_text().splitlines()][-1]
    assert row["tokens_per_s"] > 0 and row["tflops_per_s"] > 0 and row["mfu"] is None
    summary = json.loads(Path("run/summary.json").read_text())
    assert summary["flops_per_token"] > 0 and summary["peak_source"] == "peak of cpu unknown"
    assert torch.load("run/checkpoint.pt", weights_only=True)["tokenizer"]["kind"] == "bpe"
    sample = ["sample", "--checkpoint", "run/checkpoint.pt", "--tokens", "12", "--data", corpus]
    assert main([*sample, "--prompt", "ROMEO:"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    # The same directory prepared again with another tokenizer: resuming is refused.
    assert main(["prepare", "tinyshakespeare", "--tokenizer", "char", "--out", corpus,
                 "--force", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main([*train, "--data", corpus, "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "prepared with tokenizer char vocab 65, but the checkpoint uses bpe vocab 1024" in err
    assert main(sample) == 2
