"""Command line: ``spheretorch train | compare | sample`` (also ``python -m spheretorch``).

Exit status: 0 done; 1 the run diverged (non-finite validation loss, or ``--max-bad-steps``
non-finite steps in a row); 2 a user error (unknown model or preset, missing or unreadable
file, bad values, conflicting flags: one line on stderr, no traceback, nothing written);
``128 + N`` stopped by signal ``N`` after saving a checkpoint (130 for SIGINT, 143 for
SIGTERM; continue with ``--resume``). Every case and its message: ``docs/errors.md``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


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
    if raw in ("true", "false", "True", "False"):
        value = raw.lower() == "true"
    return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS
    from .train.presets import PRESETS
    from .train.trainer import DISTRIBUTED, OPTIMIZERS

    parser = _Parser(
        prog="spheretorch",
        description="Train and compare GPT, nGPT and GeoNorm transformers on text.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--preset", default="cpu-small", help=f"one of {', '.join(PRESETS)}")
    common.add_argument("--data", help="UTF-8 text file (default: built-in tinyshakespeare)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument(
        "--threads", type=_positive_int, help="CPU threads (default: the preset's, else torch's)"
    )
    common.add_argument(
        "--set",
        dest="options",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option (a model config field), e.g. --set update_decay=linear; compare "
        "applies it to every model whose config has the field",
    )

    t = sub.add_parser("train", parents=[common], help="train one model")
    t.add_argument("--model", required=True, choices=list(MODELS))
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--steps", type=_positive_int)
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    t.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    t.add_argument("--optim", choices=list(OPTIMIZERS), help="default: the model's recipe")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate")
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--eval-interval", type=_positive_int)
    t.add_argument("--eval-batches", type=_positive_int)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--tokenizer", choices=["char", "byte"], default="char")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    t.add_argument(
        "--max-bad-steps",
        type=_positive_int,
        help="stop after this many non-finite steps in a row (each is skipped; default 5)",
    )
    t.add_argument(
        "--distributed",
        choices=list(DISTRIBUTED),
        default="none",
        help="data-parallel mode under torchrun: ddp or fsdp (FSDP2)",
    )

    c = sub.add_parser("compare", parents=[common], help="compare models at equal budget")
    c.add_argument("--models", default="gpt,ngpt,geonorm", help="comma-separated model names")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--no-sweep", action="store_true", help="use preset LRs, no LR sweep")
    c.add_argument(
        "--seeds", type=_positive_int, default=1, help="full runs per model (seeds --seed ...)"
    )
    c.add_argument(
        "--budgets",
        help="fractions of the steps, each run with its own schedule, e.g. 0.25,0.5,1 "
        "(iso-loss speedups)",
    )
    c.add_argument(
        "--grid",
        metavar="FIELD=V,V,...",
        help="a study over a model field, e.g. seq_len=64,128,256 (tokens per step held "
        "fixed) or n_layer=2,4,8; every point gets its own LR sweep",
    )
    c.add_argument("--resume", action="store_true", help="continue an interrupted compare")
    c.add_argument("--steps", type=_positive_int, help="full-run steps (default: the preset's)")
    c.add_argument("--batch-size", type=_positive_int)
    c.add_argument("--eval-interval", type=_positive_int)
    c.add_argument("--eval-batches", type=_positive_int)
    c.add_argument("--sweep-lrs", help="comma-separated LR candidates (default: the preset's)")
    c.add_argument("--sweep-fraction", type=_positive_float, help="sweep run length / steps")

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument(
        "--checkpoint", required=True, help="checkpoint.pt, or an FSDP run's checkpoint.dcp"
    )
    s.add_argument("--prompt", default=None, help="default: a newline")
    s.add_argument("--tokens", type=_positive_int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=_positive_int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    return parser


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    from .train.presets import get_preset

    threads = args.threads or get_preset(args.preset).threads
    if threads:
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:
    from .train.errors import UserError
    from .train.trainer import CHECKPOINT, METRICS, SHARDED_CHECKPOINT, TrainConfig, Trainer

    out = Path(args.out)
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: pass one of them")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    existing = any((out / f).exists() for f in (CHECKPOINT, SHARDED_CHECKPOINT, METRICS))
    ckpt = out / (SHARDED_CHECKPOINT if args.distributed == "fsdp" else CHECKPOINT)
    # A sharded save killed between its two renames leaves only checkpoint.dcp.old, which the
    # loader falls back to (spheretorch.distributed.load_sharded): that run is resumable too.
    found = [ckpt] + ([out / (SHARDED_CHECKPOINT + ".old")] if args.distributed == "fsdp" else [])
    if args.resume and not any(c.exists() for c in found):
        raise UserError(f"nothing to resume: {ckpt} does not exist")
    if existing and not args.resume and not args.force:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --force")
    _set_threads(args)
    config = TrainConfig(
        model=args.model,
        preset=args.preset,
        data=args.data,
        tokenizer=args.tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optim=args.optim,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        model_options=dict(args.options),
    )
    if args.max_bad_steps is not None:
        config.max_bad_steps = args.max_bad_steps
    trainer = Trainer(
        config,
        out,
        resume=args.resume,
        progress=not args.no_progress,
        distributed=args.distributed,
        handle_signals=True,
    )
    try:
        return _run_training(trainer, args.resume)
    finally:
        if args.distributed != "none":
            from .distributed import cleanup

            cleanup()


def _run_training(trainer: Any, resumed: bool) -> int:
    c = trainer.config
    out = trainer.out_dir
    say = trainer.is_main  # only rank 0 talks
    if say:
        print(
            f"{c.model}: {trainer.model.num_parameters():,} parameters, preset {c.preset}, "
            f"optim {c.optim}, lr {c.lr:g}, {c.steps} steps on {trainer.device} "
            f"({trainer.data.name}, {trainer.tokenizer.kind} vocab "
            f"{trainer.tokenizer.vocab_size})"
            + (
                f", {trainer.world_size} ranks ({trainer.distributed})"
                if trainer.world_size > 1
                else ""
            )
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
        print(
            f"{c.model}: step {summary['steps']}, val loss "
            + (f"{val:.4f}" if val is not None else "non-finite")
            + f", {summary['ms_per_step']:.1f} ms/step"
            + (f", {skipped} non-finite steps skipped" if skipped else "")
            + f"; wrote {out / 'metrics.jsonl'}, {trainer.checkpoint_path}"
        )
    return 1 if summary["diverged"] else 0


def _compare(args: argparse.Namespace) -> int:
    from .train.compare import CompareInterrupted, compare

    _set_threads(args)
    try:
        compare(
            models=args.models,
            preset=args.preset,
            out=args.out,
            data=args.data,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
            sweep=not args.no_sweep,
            log=print,
            seeds=args.seeds,
            budgets=args.budgets,
            grid=args.grid,
            options=dict(args.options),
            steps=args.steps,
            batch_size=args.batch_size,
            eval_interval=args.eval_interval,
            eval_batches=args.eval_batches,
            sweep_lrs=args.sweep_lrs,
            sweep_fraction=args.sweep_fraction,
            resume=args.resume,
            handle_signals=True,
        )
    except CompareInterrupted as e:
        print(f"spheretorch: {e}; saved; continue with --resume", file=sys.stderr)
        return 128 + int(getattr(signal, e.signal_name))
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .train.trainer import load_model

    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    prompt = args.prompt
    if prompt is None:
        prompt = "\n" if tokenizer.kind == "byte" or "\n" in tokenizer.chars else tokenizer.chars[0]
    if prompt == "":
        from .train.errors import UserError

        raise UserError("--prompt must not be empty")
    ids = tokenizer.encode(prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    generator = torch.Generator(device=idx.device).manual_seed(args.seed)
    out = model.generate(idx, args.tokens, args.temperature, args.top_k, generator=generator)
    sys.stdout.write(tokenizer.decode(out[0].tolist()) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spheretorch`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train.errors import TrainingDiverged, UserError

    try:
        return {"train": _train, "compare": _compare, "sample": _sample}[args.command](args)
    except UserError as e:
        print(f"spheretorch: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"spheretorch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spheretorch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
