"""Issue 24, a new user's hour: each item as a class (crashes, hangs, checkpoints that do not
fit, resume of an FSDP2 run in one process, threads, evaluation size and signals, prepare's
output directory, the meta-device build, sphere_ in place, wording)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spheretorch as st
from spheretorch.cli import MAX_SAMPLE_TOKENS, build_parser, main
from spheretorch.models import MODELS, make_config
from spheretorch.train import TrainConfig, Trainer, UserError, load_checkpoint
from spheretorch.train.data import eval_batches, max_eval_batches
from spheretorch.train.text import count
from spheretorch.train.tokenizer import Tokenizer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--no-progress"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spheretorch: error: ")
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step nGPT run on the smoke preset (its checkpoint is copied and edited below)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = TrainConfig(model="ngpt", preset="smoke", steps=2, eval_interval=2)
    Trainer(cfg, out).train()
    return out


# -- model options given twice (vocab_size, seq_len, ...) -----------------------------------
def test_model_options_may_set_derived_fields() -> None:
    cfg = TrainConfig(model="gpt", preset="smoke", model_options={"vocab_size": 512})
    assert cfg.resolve().model_config(65).vocab_size == 512
    cfg = TrainConfig(model="ngpt", preset="smoke", model_options={"seq_len": 16, "n_layer": 1})
    m = cfg.resolve().model_config(65)
    assert (m.vocab_size, m.seq_len, m.n_layer) == (65, 16, 1)


def test_set_vocab_size_reaches_the_documented_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--model", "gpt", *SMOKE, "--steps", "1", "--out", str(tmp_path / "r")]
    assert main([*args, "--set", "vocab_size=8"]) == 2
    msg = one_error_line(capsys)
    assert msg.endswith("tinyshakespeare has a vocabulary of 65 tokens, larger than the model's 8")
    assert main([*args, "--set", "vocab_size=100"]) == 0
    assert "char vocab 65" in capsys.readouterr().err
    # compare takes it too (its preflight reaches the same check)
    cmp = ["compare", "--models", "gpt", *SMOKE, "--out", str(tmp_path / "c"), "--no-sweep"]
    assert main([*cmp, "--set", "vocab_size=8"]) == 2
    assert "larger than the model's 8" in one_error_line(capsys)
    # a larger vocabulary samples only ids the tokenizer knows
    assert main(["sample", "--checkpoint", str(tmp_path / "r"), "--tokens", "50"]) == 0


# -- sampling numerics ------------------------------------------------------------------------
def small_model(name: str = "gpt", seq_len: int = 8) -> nn.Module:
    torch.manual_seed(0)
    cfg = make_config(name, vocab_size=11, seq_len=seq_len, n_layer=1, n_head=2, d_model=8)
    return MODELS[name](cfg)


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324, 1e-12])
def test_tiny_temperatures_are_greedy(temperature: float) -> None:
    model = small_model()
    idx = torch.tensor([[1, 2, 3]])
    greedy = model.generate(idx, 12, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(idx, 12, temperature=temperature, generator=g), greedy)


@pytest.mark.parametrize("temperature", [1e300, 1e10, 1.0])
@pytest.mark.parametrize("top_k", [None, 1, 3, 11, 1000])
def test_any_temperature_and_top_k_give_valid_tokens(temperature: float, top_k: int) -> None:
    model = small_model("ngpt")
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.tensor([[1], [2]]), 20, temperature, top_k, generator=g)
    assert out.shape == (2, 21) and int(out.min()) >= 0 and int(out.max()) < 11
    if top_k == 1:  # the one most likely token: greedy at any temperature
        assert torch.equal(out, model.generate(torch.tensor([[1], [2]]), 20, temperature=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-30, 1e30, 1e300])
def test_next_token_at_extreme_temperatures(dtype: torch.dtype, temperature: float) -> None:
    from spheretorch.models.base import _next_token

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6], [-5.0, 0.0, 7.0, 7.0]], dtype=dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([_next_token(logits, temperature, None, g) for _ in range(50)], dim=1)
    if temperature < 1:  # greedy, ties shared (row 1: ids 2 and 3 tie)
        assert set(ids[0].tolist()) <= {1, 3} and set(ids[1].tolist()) <= {2, 3}
    else:  # uniform: every id appears
        assert set(ids[0].tolist()) == {0, 1, 2, 3}


def test_vocab_limit_and_short_context() -> None:
    model = small_model(seq_len=1)  # a context of one token: the window must stay at 1
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.tensor([[1, 2]]), 200, 1e6, generator=g, vocab_limit=3)
    assert int(out[0, 2:].max()) < 3
    with pytest.raises(ValueError, match="vocab_limit must be a positive int"):
        model.generate(torch.tensor([[1]]), 1, vocab_limit=0)


def test_generate_is_the_stream_and_keeps_a_window() -> None:
    model = small_model()
    idx = torch.tensor([[1, 2, 3]])
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    out = model.generate(idx, 30, 0.7, generator=torch.Generator().manual_seed(3))
    assert max(seen) == model.config.seq_len  # a window, not the whole sequence
    stream = model.generate_stream(idx, 30, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, torch.cat([idx, *stream], dim=1))


def test_decode_stream_holds_partial_characters() -> None:
    tok = Tokenizer("byte")
    ids = tok.encode("naïve → ok ✓")
    pieces = list(tok.decode_stream(ids))
    assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces)


def test_sample_tokens_cap_threads_and_temperature(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sample", "--checkpoint", str(trained)]
    assert main([*base, "--tokens", str(MAX_SAMPLE_TOKENS + 1)]) == 2
    assert f"--tokens {MAX_SAMPLE_TOKENS + 1} is more than the" in one_error_line(capsys)
    outs = set()
    for t in ("1e-45", "1e-300", "0"):
        assert main([*base, "--tokens", "10", "--temperature", t, "--threads", "1"]) == 0
        outs.add(capsys.readouterr().out)
    assert len(outs) == 1  # tiny temperatures: the greedy text


def test_sample_streams_and_stops_on_sigterm(trained: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "spheretorch", "sample", "--checkpoint", str(trained)]
    proc = subprocess.Popen(
        [*cmd, "--tokens", str(MAX_SAMPLE_TOKENS), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        first = proc.stdout.read(20)  # streamed: arrives long before the million tokens
        assert len(first) == 20
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=30) == 143
        assert time.monotonic() - start < 10
        assert "sampling interrupted by SIGTERM" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()


def test_sample_into_a_closed_pipe_ends_quietly(trained: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "spheretorch", "sample", "--checkpoint", str(trained)]
    proc = subprocess.Popen(
        [*cmd, "--tokens", "100000", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert len(proc.stdout.read(5)) == 5  # then the reader goes, as `| head -c 5` does
        proc.stdout.close()
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read().decode() == ""
    finally:
        proc.kill()
        proc.wait()


# -- checkpoints that do not fit their model --------------------------------------------------
def _edit(trained: Path, tmp_path: Path, change) -> Path:
    ckpt = load_checkpoint(trained / "checkpoint.pt")
    change(ckpt)
    out = tmp_path / "edited"
    out.mkdir(exist_ok=True)
    torch.save(ckpt, out / "checkpoint.pt")
    return out


def _nan_row(c: dict) -> None:
    c["model"]["tok_emb.weight"][3] = float("nan")


def _truncate_chars(c: dict) -> None:
    c["tokenizer"]["chars"] = c["tokenizer"]["chars"][:40]


EDITS = {
    "n_layer": (lambda c: c["model_config"].update(n_layer=3), "lack 'blocks.2."),
    "nan_rows": (_nan_row, "the weight 'tok_emb.weight' holds NaN or inf values"),
    "model_name": (lambda c: c.update(model_name="gpt"), "model 'gpt' has no option"),
    "no_model": (lambda c: c.pop("model"), "has no 'model' entry"),
    "small_tokenizer": (_truncate_chars, "its tokenizer has 40 tokens but the model's"),
    "big_tokenizer": (
        lambda c: c["tokenizer"].update(chars=c["tokenizer"]["chars"] + "\u00e9\u00ea"),
        "its tokenizer has 67 tokens, more than the model's vocabulary of 65",
    ),
    "shape": (
        lambda c: c["model"].update({"s_z.param": torch.ones(3)}),
        "'s_z.param' has shape (3,), the model's is (65,)",
    ),
    "tokenizer_kind": (lambda c: c["tokenizer"].update(kind="words"), "tokenizer does not load"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_checkpoint_that_does_not_fit(
    case: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, expected = EDITS[case]
    run = _edit(trained, tmp_path, change)
    assert main(["sample", "--checkpoint", str(run), "--tokens", "5"]) == 2
    assert expected in one_error_line(capsys)
    args = [
        "train",
        "--model",
        "ngpt",
        *SMOKE,
        "--steps",
        "4",
        "--out",
        str(run),
        "--resume",
        "--stretch-schedule",
    ]
    assert main(args) == 2  # train --resume (and compare --resume, through the trainer)
    msg = one_error_line(capsys)
    assert expected in msg or "does not match its model_name" in msg


def test_resume_with_optimizer_state_that_does_not_fit(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def change(c: dict) -> None:
        group = c["optimizer"]["param_groups"][0]
        group["params"] = group["params"][:1]

    run = _edit(trained, tmp_path, change)
    args = [
        "train",
        "--model",
        "ngpt",
        *SMOKE,
        "--steps",
        "4",
        "--out",
        str(run),
        "--resume",
        "--stretch-schedule",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the stretch notice, then the error
    assert err[-1].startswith("spheretorch: error: ")
    assert "does not fit this run's model and optimizer: loaded state dict" in err[-1]


# -- an FSDP2 (sharded) checkpoint resumed by one process ------------------------------------
def test_sharded_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    from spheretorch.distributed import Parallel, save_sharded

    cfg = {"model": "ngpt", "preset": "smoke", "eval_interval": 5}
    Trainer(TrainConfig(**cfg, steps=10), tmp_path / "one").train()
    Trainer(
        TrainConfig(model="ngpt", steps=20, stretch_schedule=True), tmp_path / "one", resume=True
    ).train()
    expected = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()

    t = Trainer(TrainConfig(**cfg, steps=10), tmp_path / "fsdp")
    t.train()
    # what an FSDP2 run leaves: the DCP directory only (same tensors, sharded layout)
    save_sharded(tmp_path / "fsdp" / "checkpoint.dcp", t.model, t.optimizer, t._resume_state())
    (tmp_path / "fsdp" / "checkpoint.pt").unlink()
    assert Parallel("ddp").resume_file(tmp_path / "fsdp") is None
    assert "resume it with --distributed fsdp, or in one process" in Parallel(
        "ddp"
    ).missing_checkpoint(tmp_path / "fsdp")
    args = ["train", "--model", "ngpt", *SMOKE, "--out", str(tmp_path / "fsdp"), "--resume"]
    assert main([*args, "--steps", "20", "--stretch-schedule"]) == 0
    got = (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()
    for g, e in zip(got, expected, strict=True):
        g, e = json.loads(g), json.loads(e)
        assert (g["step"], g["train_loss"], g["val_loss"]) == (
            e["step"],
            e["train_loss"],
            e["val_loss"],
        )
    # one checkpoint remains: the single file the continued run wrote
    assert (tmp_path / "fsdp" / "checkpoint.pt").is_file()
    assert not (tmp_path / "fsdp" / "checkpoint.dcp").exists()
    msg = Parallel("fsdp").missing_checkpoint(tmp_path / "fsdp")
    assert "is a single-file checkpoint" in msg and "resume it in one process" in msg


# -- threads ----------------------------------------------------------------------------------
def test_threads_default_follows_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from spheretorch.train import threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
        assert threads.default_threads()[0] == 1
        assert threads.set_threads() == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert threads.default_threads()[0] == min(2, threads._cores())
        assert threads.set_threads(3) == 3 and threads.set_threads(None, 1) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        torch.set_num_threads(2)
        assert threads.default_threads() == (2, "OMP_NUM_THREADS")
    finally:
        torch.set_num_threads(before)
    for command in ("train", "compare", "prepare", "sample"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        assert "--threads" in sub.format_help(), command


# -- evaluation: size and signals -------------------------------------------------------------
def test_eval_batches_capped_at_distinct_windows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = torch.arange(200)
    batches = eval_batches(data, 100000, 8, 32)
    assert len(batches) == max_eval_batches(200, 8, 32) == 21
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(set(starts.tolist())) == len(starts)  # no window twice
    text = tmp_path / "small.txt"
    text.write_text("".join(chr(97 + (i * 7) % 26) for i in range(3000)))
    cfg = TrainConfig(model="gpt", preset="smoke", steps=1, eval_batches=100000, data=str(text))
    t = Trainer(cfg)
    assert len(t.eval_data) == max_eval_batches(len(t.data.val), 8, 32)
    assert "--eval-batches 100000: the validation split holds" in caplog.text


def test_sigterm_stops_an_evaluation_at_once_and_resume_redoes_it(tmp_path: Path) -> None:
    cfg = {"model": "gpt", "preset": "smoke", "steps": 10, "eval_interval": 5, "eval_batches": 6}
    Trainer(TrainConfig(**cfg), tmp_path / "ref").train()
    t = Trainer(TrainConfig(**cfg), tmp_path / "cut", handle_signals=True)
    calls = []
    forward = t.eval_model.forward

    def eval_forward(*a, **k):  # SIGTERM arrives during the second evaluation's first batch
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*a, **k)

    t.eval_model.forward = eval_forward
    summary = t.train()
    assert summary["interrupted"] == "SIGTERM" and len(calls) == 7  # no batch after it
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["eval_pending"]
    Trainer(TrainConfig(model="gpt"), tmp_path / "cut", resume=True).train()

    def rows(run: str) -> list[list[float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [[json.loads(r)[k] for k in ("step", "train_loss", "val_loss")] for r in lines]

    assert rows("cut") == rows("ref")


# -- prepare's output directory --------------------------------------------------------------
def test_prepare_out_is_guarded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("x")
    prep = ["prepare", "tinyshakespeare", "--tokenizer", "char", "--no-progress", "--out"]
    assert main([*prep, str(docs)]) == 2
    assert "holds other files ('index.md')" in one_error_line(capsys)
    run = tmp_path / "run"
    assert main(["train", "--model", "gpt", *SMOKE, "--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main([*prep, str(run), "--force"]) == 2
    assert "holds a train run; prepare writes a corpus into a directory of its own" in (
        one_error_line(capsys)
    )
    corpus = tmp_path / "corpus"
    assert main([*prep, str(corpus)]) == 0
    assert main([*prep, str(corpus)]) == 2
    assert "pass --force to overwrite it" in one_error_line(capsys)
    assert main([*prep, str(corpus), "--force"]) == 0
    capsys.readouterr()
    args = ["train", "--model", "gpt", *SMOKE, "--steps", "1", "--data", str(corpus)]
    assert main([*args, "--out", str(corpus)]) == 2
    assert "holds a prepared corpus; train writes into a directory of its own" in (
        one_error_line(capsys)
    )


def test_install_docs_name_the_data_extra() -> None:
    assert "pip install -e '.[data]'" in (ROOT / "README.md").read_text()
    assert "spheretorch[data]" not in (ROOT / "docs" / "data.md").read_text()
    assert "/data/" in (ROOT / ".gitignore").read_text().splitlines()
    from spheretorch.train import tokenizer

    with pytest.raises(UserError, match=r"pip install -e '\.\[data\]' in the spheretorch"):
        tokenizer._require("no_such_module_xyz", "bpe")


# -- meta-device build ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "tie"), [(n, False) for n in MODELS] + [("gpt", True), ("geonorm", True)]
)
def test_meta_build_equals_a_plain_eager_build(name: str, tie: bool) -> None:
    fields = dict(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=16)
    cfg = make_config(name, **fields, **({"tie_embeddings": True} if tie else {}))
    torch.manual_seed(0)
    eager = MODELS[name](cfg)
    with torch.device("meta"):
        meta = MODELS[name](cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.reset_parameters()
    for (k, a), b in zip(eager.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    if tie:
        assert meta.lm_head.weight is meta.tok_emb.weight


def test_transformers_doc_snippet_runs() -> None:
    import re

    text = (ROOT / "docs" / "transformers.md").read_text()
    section = text[text.index("## Building large models on the meta device") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "transformers.md", "exec"), {})


# -- sphere_ in place, dims, on_zero ----------------------------------------------------------
def test_sphere_keeps_a_tied_head_and_the_optimizer() -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    before = emb.weight
    st.sphere_(emb, dim=1)
    assert emb.weight is before and head.weight is emb.weight
    assert isinstance(head.weight, st.SphereParameter) and head.weight.sphere_dim == 1
    assert torch.allclose(emb.weight.norm(dim=1), torch.ones(10))
    assert opt.param_groups[0]["params"][0] is emb.weight
    snapshot = emb.weight.detach().clone()
    head(emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    assert not torch.equal(snapshot, emb.weight)  # the optimizer trains the sphere parameter


@pytest.mark.parametrize("cls", [st.optim.RiemannianAdam, st.optim.RenormAdam])
def test_sphere_after_a_sphere_optimizer_was_built(cls: type) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    opt = cls(lin.parameters(), lr=0.1)
    st.sphere_(lin, dim=1)
    before = lin.weight.detach().clone()
    for _ in range(3):
        lin(torch.randn(3, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, lin.weight)
    assert torch.allclose(lin.weight.norm(dim=1), torch.ones(4), atol=1e-6)


def test_dims_accept_numpy_ints_and_refuse_bool_and_float() -> None:
    x = torch.randn(3, 4)
    assert st.SphereParameter(x, dim=np.int64(1)).sphere_dim == 1
    assert st.SphereParameter(x, dim=torch.tensor(0)).sphere_dim == 0
    assert torch.equal(st.sphere.normalize(x, dim=np.int32(1)), st.sphere.normalize(x, dim=1))
    for bad, name in ((True, "bool"), (1.0, "float"), (np.bool_(True), "bool")):
        with pytest.raises(TypeError, match=f"dim must be an int, got {name}"):
            st.SphereParameter(x, dim=bad)


def test_zero_slice_suggestion_is_an_accepted_option() -> None:
    emb = nn.Embedding(10, 4, padding_idx=0)
    with pytest.raises(ValueError, match="pass on_zero='fixed'") as e:
        st.sphere_(emb)
    assert "on_zero='fixed'" in str(e.value)
    st.sphere_(emb, on_zero="fixed")  # the suggestion works, for sphere_ ...
    assert torch.equal(emb.weight[0].detach(), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    p = st.SphereParameter(torch.zeros(2, 3), on_zero="fixed")  # ... and SphereParameter
    assert torch.equal(p.detach(), torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    with pytest.raises(ValueError, match="on_zero must be 'raise' or 'fixed', got 'keep'"):
        st.SphereParameter(torch.randn(2, 3), on_zero="keep")


# -- wording ----------------------------------------------------------------------------------
def test_every_option_shows_its_default() -> None:
    parser = build_parser()
    assert "prepare" in parser.format_help().split("positional arguments")[0]
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
                continue
            if isinstance(action.default, bool) or not action.option_strings:
                continue
            text = sub.formatter_class("x")._get_help_string(action)
            assert "default" in text, (name, action.option_strings)
    sample = parser._subparsers._group_actions[0].choices["sample"]
    assert "sampling seed (default: 0)" in " ".join(sample.format_help().split())


def test_counts_in_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (count(1, "step"), count(2, "step"), count(0, "seed")) == (
        "1 step",
        "2 steps",
        "0 seeds",
    )
    assert count(1, "batch", "batches") == "1 batch" and count(1234, "token", fmt=",") == (
        "1,234 tokens"
    )
    out = tmp_path / "r"
    assert main(["train", "--model", "gpt", *SMOKE, "--steps", "1", "--out", str(out)]) == 0
    assert ", 1 step on cpu" in capsys.readouterr().err
    for path in (ROOT / "spheretorch").rglob("*.py"):  # no hand-made plural after a count
        text = path.read_text()
        assert "file(s)" not in text and "document(s)" not in text, path
