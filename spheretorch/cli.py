"""Command line: ``spheretorch train | compare | sample | prepare`` (``python -m spheretorch``).

Exit status: 0 done; 1 the run diverged (non-finite validation loss, or ``--max-bad-steps``
non-finite steps in a row); 2 a user error (bad flag or value, missing or unreadable file, a
directory that holds another run or is in use, a run that cannot fit in memory: one line on
stderr, no traceback); ``128 + N`` stopped by signal ``N`` (130 for SIGINT, 143 for SIGTERM;
train and compare save a checkpoint first: continue with ``--resume``); 70 an unexpected
failure (a bug, or the system: one line naming the exception; ``--debug`` shows the
traceback). Every case and its message: ``docs/errors.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, NoReturn

__all__ = ["EXIT_INTERNAL", "main"]

#: exit status of an unexpected exception (BSD sysexits' EX_SOFTWARE)
EXIT_INTERNAL = 70


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class _Help(argparse.HelpFormatter):
    """Shows every option's default (none for flags and for defaults the preset decides)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # by identity: 0 == False, and a default of 0 (--seed) is shown
        default = action.default
        shown = not any(default is v for v in (None, False, argparse.SUPPRESS)) and default != []
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _number(kind: type, test: Any, expected: str) -> Any:
    """An argparse type: ``kind(text)`` that passes ``test``, else "expected ...". NaN and
    inf never pass (non-finite hyperparameters are refused up front)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
_seed = _number(int, lambda v: -(2**63) <= v <= 2**64 - 1, "an integer in [-2**63, 2**64 - 1]")


class _Once(argparse.Action):
    """An option that may be given once: a second occurrence would silently replace the
    first (e.g. two --grid), so it is an error (exit 2) naming the option."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option} given twice; give it once (a list goes in one value: A,B)")
        setattr(namespace, self.dest, values)


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value: Any = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            continue
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{key}={raw}: expected a finite number")
    if raw in ("true", "false", "True", "False"):
        value = raw.lower() == "true"
    return key.replace("-", "_"), value


_THREADS_HELP = (
    "CPU threads (default: the idle cores, i.e. torch's default less the 1-minute load "
    "average, at least 1; see docs/quickstart.md)"
)


_PARAM_DTYPE: dict[str, Any] = {
    "choices": ["fp32", "float32", "bf16", "bfloat16"],
    "help": "storage dtype of the weights: fp32 (fp32 master weights; bf16 autocast computes) "
    "or bf16 (the weights themselves in bf16: an ablation that hurts GPT; default: fp32)",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .distributed import MODES
    from .models import MODELS
    from .train.compile_check import COMPILE_CHECKS
    from .train.config import OPTIMIZERS, RESUME_OVERRIDES, flag_of
    from .train.presets import DEFAULT_PRESET, PRESETS
    from .train.specs import DEFAULT_MODELS, DEFAULT_SWEEP_BOUNDS
    from .train.text import count

    parser = _Parser(
        prog="spheretorch",
        description="Train and compare GPT, nGPT and GeoNorm transformers on text.",
        epilog="Run 'spheretorch COMMAND --help' for a command's options. Exit statuses: "
        "docs/errors.md.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"spheretorch {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    common = _Parser(add_help=False, parents=[debug])
    presets = ", ".join(f"{p.name} ({count(p.steps, 'step')})" for p in PRESETS.values())
    common.add_argument("--preset", help=f"one of {presets} (default: {DEFAULT_PRESET})")
    common.add_argument(
        "--data",
        help="UTF-8 text file, or a directory made by 'spheretorch prepare' (default: the "
        "built-in tinyshakespeare)",
    )
    common.add_argument("--seed", type=_seed, help="seed of the weights and batches (default: 0)")
    common.add_argument(
        "--device", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps (default: auto)"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument(
        "--threads", type=_positive_int, help=_THREADS_HELP + " (a preset may fix it)"
    )
    common.add_argument(
        "--set",
        dest="options",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option (a model config field), e.g. --set update_decay=linear; "
        "repeatable; compare applies it to every model whose config has the field",
    )
    common.add_argument(
        "--force",
        action="store_true",
        help="replace the run in --out: the old "
        "one is removed once the new one has written its first checkpoint",
    )

    fmt = {"formatter_class": _Help}
    allowed = ", ".join(flag_of(n) for n in RESUME_OVERRIDES)
    t = sub.add_parser("train", parents=[common], help="train one model", **fmt)
    t.add_argument("--model", required=True, choices=list(MODELS), help="the model to train")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--steps", type=_positive_int, help="training steps (default: the preset's)")
    t.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in --out exactly; flags given must match its configuration "
        f"(exit 2 naming the one that does not), except {allowed}, --threads and "
        f"--no-progress (a different --steps needs --stretch-schedule)",
    )
    t.add_argument(
        "--optim",
        choices=list(OPTIMIZERS),
        help="default: the model's recipe (renorm for ngpt, adamw otherwise)",
    )
    t.add_argument(
        "--lr",
        type=_positive_float,
        help="peak learning rate (default: the preset's for the model)",
    )
    t.add_argument(
        "--batch-size", type=_positive_int, help="sequences per step (default: the preset's)"
    )
    t.add_argument(
        "--eval-interval",
        type=_positive_int,
        help="steps between evaluations and checkpoints (default: the preset's)",
    )
    t.add_argument(
        "--eval-batches",
        type=_positive_int,
        help="validation batches per evaluation (default: the preset's)",
    )
    t.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        help="decoupled weight decay on matrices (default: 0.1, 0 for ngpt)",
    )
    t.add_argument(
        "--warmup-steps",
        type=_nonnegative_int,
        help="linear warmup (default: 5%% of the steps, 0 for ngpt)",
    )
    t.add_argument(
        "--tokenizer",
        choices=["char", "byte"],
        help="for a text file (default: char); a prepared corpus has its own",
    )
    t.add_argument(
        "--dtype",
        choices=["auto", "float32", "fp32", "bfloat16", "bf16"],
        help="autocast dtype (weights stay float32): bf16 on CUDA or CPU; auto is bf16 on "
        "CUDA, float32 elsewhere (default: auto)",
    )
    t.add_argument(
        "--compile", action="store_true", help="torch.compile the model (inductor: CUDA or CPU)"
    )
    t.add_argument(
        "--stretch-schedule",
        action="store_true",
        help="with --resume and a different --steps: stretch the cosine LR schedule to the new "
        "total (the LR at the checkpoint's step changes; refused without this flag)",
    )
    t.add_argument("--param-dtype", **_PARAM_DTYPE)
    t.add_argument(
        "--compile-check",
        choices=list(COMPILE_CHECKS),
        help="with --compile: compare compiled and eager gradients on the first batch and "
        "stop (error: exit 2), train eager with a warning (eager), or not check (off) "
        "(default: error)",
    )
    t.add_argument(
        "--max-bad-steps",
        type=_positive_int,
        help="stop after this many non-finite steps in a row (each is skipped; default: 5)",
    )
    t.add_argument(
        "--no-memory-check",
        action="store_true",
        help="start even when the estimated memory need exceeds the free memory",
    )
    t.add_argument(
        "--distributed",
        choices=list(MODES),
        default="none",
        help="data-parallel mode under torchrun: ddp or fsdp (FSDP2)",
    )

    c = sub.add_parser("compare", parents=[common], help="compare models at equal budget", **fmt)
    c.add_argument(
        "--models",
        action=_Once,
        help="comma-separated [LABEL=]MODEL[:KEY=VALUE...], KEY a model config field or optim "
        f"(default: {DEFAULT_MODELS})",
    )
    c.add_argument(
        "--optims",
        action=_Once,
        help=f"optimizer recipes as an axis, each (model, recipe) pair with its own LR sweep: "
        f"comma-separated from {', '.join(OPTIMIZERS)} (default: each model's own recipe)",
    )
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--no-sweep", action="store_true", help="use the preset's LRs, no LR sweep")
    c.add_argument(
        "--seeds", type=_positive_int, default=1, help="full runs per model (seeds --seed ...)"
    )
    c.add_argument(
        "--budgets",
        action=_Once,
        help="fractions of the steps, each run with its own schedule, e.g. 0.25,0.5,1 "
        "(iso-loss speedups)",
    )
    c.add_argument(
        "--grid",
        action=_Once,
        metavar="FIELD=V,V,...",
        help="a study over a model field, e.g. seq_len=64,128,256 (tokens per step held "
        "fixed) or n_layer=2,4,8; every point gets its own LR sweep",
    )
    c.add_argument("--resume", action="store_true", help="continue an interrupted compare")
    c.add_argument("--steps", type=_positive_int, help="full-run steps (default: the preset's)")
    c.add_argument(
        "--batch-size",
        type=_positive_int,
        help="sequences per step (default: the preset's; a seq_len grid scales it)",
    )
    c.add_argument(
        "--eval-interval",
        type=_positive_int,
        help="steps between evaluations of the full runs (default: the preset's)",
    )
    c.add_argument(
        "--eval-batches",
        type=_positive_int,
        help="validation batches per evaluation (default: the preset's)",
    )
    c.add_argument(
        "--sweep-lrs",
        action=_Once,
        help="comma-separated LR candidates (default: the preset's); a best LR at either end "
        "extends the sweep one candidate further (same spacing) until it is interior or "
        "--sweep-bounds stops it",
    )
    c.add_argument(
        "--sweep-bounds",
        action=_Once,
        metavar="LO,HI",
        help="the LRs an extended sweep may reach (default: "
        + ",".join(f"{b:g}" for b in DEFAULT_SWEEP_BOUNDS)
        + ")",
    )
    c.add_argument("--param-dtype", **_PARAM_DTYPE)
    c.add_argument(
        "--sweep-fraction",
        type=_positive_float,
        help="length of a sweep run as a fraction of --steps (default: the preset's)",
    )

    from .train.tokenizer import KINDS

    pr = sub.add_parser(
        "prepare", parents=[debug], help="tokenize text once into train.bin / val.bin", **fmt
    )
    pr.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text or .jsonl files (.gz too), directories, globs; tinyshakespeare: the built-in",
    )
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument(
        "--tokenizer",
        required=True,
        choices=KINDS,
        help="char, byte, bpe (trained on the inputs) or gpt2 (tiktoken, from a local file)",
    )
    pr.add_argument("--vocab-size", type=_positive_int, help="bpe vocabulary (default: 8192)")
    pr.add_argument(
        "--val-fraction",
        type=_positive_float,
        default=0.1,
        help="the last fraction of the tokens, kept for validation",
    )
    pr.add_argument("--text-field", default="text", help="the text's field in .jsonl lines")
    pr.add_argument(
        "--bpe-train-mb", type=_positive_float, default=100.0, help="MB of text to train bpe on"
    )
    pr.add_argument("--force", action="store_true", help="overwrite a corpus in --out")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--threads", type=_positive_int, help=_THREADS_HELP)

    s = sub.add_parser("sample", parents=[debug], help="generate text from a checkpoint", **fmt)
    s.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory, its checkpoint.pt, or an FSDP run's checkpoint.dcp",
    )
    s.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    s.add_argument("--tokens", type=_positive_int, default=200, help="tokens to generate")
    s.add_argument(
        "--temperature",
        type=_nonnegative_float,
        default=0.8,
        help="sampling temperature; 0 is greedy decoding",
    )
    s.add_argument(
        "--top-k",
        type=_positive_int,
        default=None,
        help="sample from the k most likely tokens (default: all)",
    )
    s.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    s.add_argument("--threads", type=_positive_int, help=_THREADS_HELP)
    s.add_argument("--data", help="check the checkpoint's tokenizer against this corpus")
    return parser


def _set_threads(args: argparse.Namespace) -> None:
    from .train.presets import DEFAULT_PRESET, get_preset
    from .train.threads import set_threads

    set_threads(args.threads, get_preset(args.preset or DEFAULT_PRESET).threads)


def _train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.rundir import RunDir
    from .train.trainer import Trainer

    with RunDir(args.out).claim("train", resume=args.resume, force=args.force):
        _set_threads(args)
        given = ("data", "tokenizer", "steps", "batch_size", "lr", "optim", "weight_decay")
        given += ("warmup_steps", "eval_interval", "eval_batches", "seed", "device", "dtype")
        config = TrainConfig(
            model=args.model,
            # None: the default preset (a fresh run), the checkpoint's (on resume)
            preset=args.preset,
            compile=args.compile or None,
            compile_check=args.compile_check,
            max_bad_steps=args.max_bad_steps,
            check_memory=False if args.no_memory_check else None,
            param_dtype=args.param_dtype,
            stretch_schedule=args.stretch_schedule or None,
            model_options=dict(args.options),
            **{name: getattr(args, name) for name in given},
        )
        trainer = Trainer(
            config,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            distributed=args.distributed,
            handle_signals=True,
        )
        try:
            return _run_training(trainer, args.resume)
        finally:
            trainer.close()


def _run_training(trainer: Any, resumed: bool) -> int:
    from .train.text import count

    c = trainer.config
    say = trainer.is_main  # only rank 0 talks
    if say:
        print(
            f"{c.model}: {trainer.model.num_parameters():,} parameters, preset {c.preset}, "
            f"optim {c.optim}, lr {c.lr:g}, {count(c.steps, 'step')} on {trainer.device} "
            f"({trainer.data.name}, {trainer.tokenizer.kind} vocab "
            f"{trainer.tokenizer.vocab_size})"
            + (f", {trainer.parallel}" if trainer.parallel.world_size > 1 else "")
            + (f", resuming at step {trainer.step}" if resumed else ""),
            file=sys.stderr,
        )
    summary = trainer.train()
    if summary["interrupted"]:
        name = summary["interrupted"]
        if say:
            print(
                f"{c.model}: interrupted by {name} at step {summary['steps']}; saved "
                f"{trainer.checkpoint_path}; continue with --resume",
                file=sys.stderr,
            )
        return 128 + int(getattr(signal, name))
    if say:
        val = summary["final_val_loss"]
        skipped = summary["skipped_steps"]
        saved = trainer.parallel.resume_file(trainer.out_dir) is not None
        print(
            f"{c.model}: step {summary['steps']}, val loss "
            + (f"{val:.4f}" if val is not None else "non-finite")
            + f", {summary['ms_per_step']:.1f} ms/step, {summary['tokens_per_s']:,.0f} tokens/s, "
            + (
                f"MFU {100 * summary['mfu']:.1f}%"
                if summary["mfu"] is not None
                else f"{summary['tflops_per_s']:.3g} TFLOP/s ({summary['peak_source']})"
            )
            + (
                f" (steady state; {summary['warmup_s']:.1f} s of warm-up not counted)"
                if summary["steady"]
                else " (warm-up steps only: the run is too short for a steady state)"
            )
            + (f", {count(skipped, 'non-finite step')} skipped" if skipped else "")
            + f"; wrote {trainer.out_dir / 'metrics.jsonl'}"
            + (
                f", {trainer.checkpoint_path}"
                if saved
                else " (no checkpoint: the run diverged before its first one)"
            )
        )
    return 1 if summary["diverged"] else 0


def _compare(args: argparse.Namespace) -> int:
    from .train.compare import CompareConfig, CompareInterrupted, compare
    from .train.rundir import RunDir

    config = CompareConfig(
        preset=args.preset,
        out=args.out,
        data=args.data,
        seed=args.seed or 0,
        device=args.device or "auto",
        seeds=args.seeds,
        optims=args.optims,
        budgets=args.budgets,
        grid=args.grid,
        options=dict(args.options),
        steps=args.steps,
        batch_size=args.batch_size,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        sweep=not args.no_sweep,
        sweep_lrs=args.sweep_lrs,
        sweep_fraction=args.sweep_fraction,
        sweep_bounds=args.sweep_bounds,
        param_dtype=args.param_dtype,
        resume=args.resume,
    )
    if args.models is not None:
        config.models = args.models
    with RunDir(args.out).claim("compare", resume=args.resume, force=args.force):
        _set_threads(args)
        try:
            compare(config, progress=not args.no_progress, log=print, handle_signals=True)
        except CompareInterrupted as e:
            print(f"spheretorch: {e}; saved; continue with --resume", file=sys.stderr)
            return 128 + int(getattr(signal, e.signal_name))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import time

    from .train.prepare import describe, prepare
    from .train.threads import set_threads

    set_threads(args.threads)
    start = time.perf_counter()
    meta = prepare(
        args.inputs,
        args.out,
        args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        bpe_train_bytes=int(args.bpe_train_mb * 2**20),
        progress=not args.no_progress,
        force=args.force,
    )
    print(describe(meta, args.out, time.perf_counter() - start))
    return 0


#: the most tokens one ``sample`` call generates (hours of CPU time even for small models)
MAX_SAMPLE_TOKENS = 1_000_000


class _Stopped(Exception):
    """SIGTERM while sampling (SIGINT is Python's KeyboardInterrupt)."""


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .train.checkpoints import load_model
    from .train.errors import UserError
    from .train.threads import set_threads

    if args.tokens > MAX_SAMPLE_TOKENS:
        raise UserError(
            f"--tokens {args.tokens} is more than the {MAX_SAMPLE_TOKENS:,} one call generates; "
            f"ask for fewer (the output streams, Ctrl-C stops it)"
        )
    set_threads(args.threads)
    model, tokenizer, ckpt = load_model(args.checkpoint, args.device)
    if args.data is not None:  # the corpus must be the one the model was trained on
        from .train.data import load_data

        load_data(args.data, tokenizer)
    prompt = tokenizer.default_prompt if args.prompt is None else args.prompt
    if prompt == "":
        raise UserError("--prompt must not be empty")
    ids = tokenizer.encode(prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    generator = torch.Generator(device=idx.device).manual_seed(args.seed)
    tokens = model.generate_stream(
        idx, args.tokens, args.temperature, args.top_k, generator, ckpt["vocab_limit"]
    )

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    out = sys.stdout
    try:  # the prompt, then the text as it comes (a token may end mid-character: held back)
        out.write(tokenizer.decode(ids))
        out.flush()
        for text in tokenizer.decode_stream(int(t) for t in tokens):
            out.write(text)
            out.flush()
    except (_Stopped, KeyboardInterrupt) as e:
        out.write("\n")
        out.flush()
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else "SIGTERM"
        print(f"spheretorch: sampling interrupted by {name}", file=sys.stderr)
        return 128 + int(getattr(signal, name))
    except BrokenPipeError:  # the reader left (`| head`): as much text as it wanted, done
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no error at exit's flush
        return 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    out.write("\n")
    return 0


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (``main`` may run many times in one
    process, as in tests, each with its own stderr)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging() -> None:
    """Library messages (``logging``) reach the user as plain lines on stderr."""
    log = logging.getLogger("spheretorch")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spheretorch`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `spheretorch`: the usage, on the one error line
        usage = " ".join(parser.format_usage().split())
        print(
            f"spheretorch: error: a command is required; {usage} (see spheretorch --help)",
            file=sys.stderr,
        )
        return 2
    _setup_logging()
    from .train.errors import TrainingDiverged, UserError

    try:
        commands = {"train": _train, "compare": _compare, "sample": _sample, "prepare": _prepare}
        return commands[args.command](args)
    except UserError as e:
        print(f"spheretorch: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"spheretorch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spheretorch: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(
            f"spheretorch: internal error: {type(e).__name__}: {first} (exit status "
            f"{EXIT_INTERNAL}; rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
