"""The training loop: recipes, evaluation, metrics, checkpoints and exact resume.

Structure (kept small so distributed training can wrap it): :class:`TrainConfig` says what to
run, :meth:`Trainer.train_step` does one optimizer step on one batch, :meth:`Trainer.evaluate`
scores the fixed validation batches, :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict`
hold everything a checkpoint needs. Batches are a function of ``(seed, step)``
(:func:`spheretorch.train.data.get_batch`), so resuming at a checkpoint replays the
uninterrupted run bit for bit on CPU. Under ``torchrun`` (``distributed="ddp" | "fsdp"``)
rank ``r`` of ``N`` trains on rows ``r::N`` of each global batch and rank 0 writes the files.
Fault policies (non-finite steps, signals) are described on :class:`Trainer` and in
``docs/errors.md``.

Recipes (the nGPT paper's, Adam betas (0.9, 0.95), gradient clipping at 1.0, cosine to 0):

* GPT and GeoNorm: AdamW (torch's fused kernel), weight decay 0.1 on matrices (not on gains or
  scales), linear warmup.
* nGPT: :class:`spheretorch.optim.RenormAdam` (Adam, then every sphere matrix renormalized),
  no weight decay, no warmup.

``optim`` swaps the optimizer for any model: ``renorm`` (RenormAdam), ``riemannian``
(:class:`spheretorch.optim.RiemannianAdam`: project, step, retract) or ``adamw`` (plain torch
AdamW; sphere parameters then drift off the sphere, an ablation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models import MODELS, LanguageModel, TransformerConfig, build_model, make_config
from .checkpoints import FORMAT, get_rng_state, load_checkpoint, save_atomic, set_rng_state
from .data import TextData, eval_batches, get_batch, load_data
from .errors import TrainingDiverged, UserError
from .presets import get_preset
from .tokenizer import Tokenizer

__all__ = [
    "OPTIMIZERS",
    "CosineSchedule",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "load_model",
    "resolve_device",
]

OPTIMIZERS = ("renorm", "riemannian", "adamw")
CHECKPOINT = "checkpoint.pt"
#: directory of a sharded (FSDP2) checkpoint, written by ``torch.distributed.checkpoint``
SHARDED_CHECKPOINT = "checkpoint.dcp"
DISTRIBUTED = ("none", "ddp", "fsdp")
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass
class TrainConfig:
    """What to train. ``None`` fields are filled from the preset and the model's recipe by
    :meth:`resolve`."""

    model: str = "gpt"
    preset: str = "smoke"
    data: str | None = None
    tokenizer: str = "char"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optim: str | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] | None = None
    grad_clip: float | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    max_bad_steps: int = 5
    model_options: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> TrainConfig:
        """A copy with every field concrete and validated (``UserError`` on bad values)."""
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        p = get_preset(self.preset)
        c = dataclasses.replace(self, model_options=dict(self.model_options))
        ngpt = c.model == "ngpt"
        c.steps = p.steps if c.steps is None else c.steps
        c.batch_size = p.batch_size if c.batch_size is None else c.batch_size
        c.lr = p.lr[c.model] if c.lr is None else c.lr
        c.optim = ("renorm" if ngpt else "adamw") if c.optim is None else c.optim
        c.weight_decay = (
            (0.0 if ngpt else p.weight_decay) if c.weight_decay is None else c.weight_decay
        )
        if c.warmup_steps is None:
            c.warmup_steps = 0 if ngpt else round(p.warmup_fraction * c.steps)
        c.betas = tuple(p.betas if c.betas is None else c.betas)  # type: ignore[assignment]
        c.grad_clip = p.grad_clip if c.grad_clip is None else c.grad_clip
        c.eval_interval = p.eval_interval if c.eval_interval is None else c.eval_interval
        c.eval_batches = p.eval_batches if c.eval_batches is None else c.eval_batches
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "max_bad_steps"):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value}")
        if not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
            raise UserError(f"lr must be a positive number, got {c.lr}")
        if c.optim not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {c.optim!r}; choose from {', '.join(OPTIMIZERS)}")
        if c.weight_decay < 0 or c.warmup_steps < 0 or c.grad_clip < 0:
            raise UserError("weight decay, warmup steps and grad clip must be >= 0")
        if c.warmup_steps >= c.steps:
            c.warmup_steps = max(c.steps - 1, 0)
        if c.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"unknown dtype {c.dtype!r}; choose auto, float32 or bfloat16")
        return c

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"]) if d["betas"] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def model_config(self, vocab_size: int) -> TransformerConfig:
        kwargs = get_preset(self.preset).model_config_kwargs()
        kwargs.update(self.model_options)
        try:
            return make_config(self.model, vocab_size=vocab_size, **kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"bad model options: {e}") from None


class CosineSchedule:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_ratio * lr`` at
    ``total``. ``lr_at(s)`` is the rate used by the update that takes step ``s`` to ``s + 1``."""

    def __init__(self, lr: float, total: int, warmup: int = 0, min_ratio: float = 0.0) -> None:
        self.lr, self.total, self.warmup, self.min_ratio = lr, total, warmup, min_ratio

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.lr * (
            self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "total": self.total,
            "warmup": self.warmup,
            "min_ratio": self.min_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.total = state["lr"], state["total"]
        self.warmup, self.min_ratio = state["warmup"], state["min_ratio"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("device mps requested but MPS is not available")
    return device


def build_optimizer(
    model: LanguageModel,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.Optimizer:
    """The optimizer for ``--optim name`` over ``model.param_groups(weight_decay)``."""
    groups = model.param_groups(weight_decay)
    if name == "adamw":
        # torch's fused kernel where it has one (CPU, CUDA): RenormAdam uses it too.
        # (not on FSDP2's DTensor parameters, which the fused kernel does not accept).
        from torch.distributed.tensor import DTensor

        fused = (
            all(p.device.type in ("cpu", "cuda") for p in model.parameters())
            and not any(isinstance(p, DTensor) for p in model.parameters())
        ) or None
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)
    from .. import optim as sphere_optim

    if name == "renorm":
        return sphere_optim.RenormAdam(
            groups, lr=lr, betas=betas, eps=1e-8, decoupled_weight_decay=True
        )
    if name == "riemannian":
        return sphere_optim.RiemannianAdam(
            groups, lr=lr, betas=betas, eps=1e-8, decoupled_weight_decay=True
        )
    raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class Trainer:
    """One training run, optionally writing ``metrics.jsonl``, ``checkpoint.pt`` and
    ``summary.json`` under ``out_dir``.

    Faults (policy, documented in ``docs/errors.md``):

    * **Non-finite loss or gradients.** A step whose loss or total gradient norm is NaN/inf
      is skipped: no optimizer update, its loss is left out of the logged train loss, the
      data position still advances (the next step sees the next batch) and the step is
      counted in ``skipped_steps``. After ``config.max_bad_steps`` such steps *in a row*
      training stops with :class:`~spheretorch.train.errors.TrainingDiverged`; the last
      checkpoint (written at the previous evaluation) is left as it was. A non-finite
      validation loss stops the run (``diverged`` in the summary).
    * **SIGINT / SIGTERM** (with ``handle_signals=True``, as the command line does): the step
      in flight finishes, a checkpoint is written, and :meth:`train` returns with
      ``summary["interrupted"]`` set to the signal's name; ``--resume`` then continues
      exactly where the uninterrupted run would have been.

    Args:
        config: what to train (resolved against its preset here).
        out_dir: run directory, or ``None`` for an in-memory run (LR sweeps).
        resume: continue from the checkpoint in ``out_dir``; the saved configuration is used,
            except ``steps`` when ``config.steps`` is given (extends the run; the cosine
            schedule is then stretched to the new total).
        progress: show a tqdm progress bar with the live loss.
        save_checkpoints: write a checkpoint at every evaluation.
        distributed: ``"none"``, ``"ddp"`` or ``"fsdp"``. The last two need a process started
            by ``torchrun`` (:func:`spheretorch.distributed.init_from_env`); each rank trains
            on its ``1/world_size`` share of every global batch, and only rank 0 writes
            metrics, summaries and single-file checkpoints. Under ``"fsdp"`` the checkpoint is
            the sharded directory ``checkpoint.dcp`` (every rank writes its shards).
        handle_signals: turn SIGINT/SIGTERM into "checkpoint and stop" while :meth:`train`
            runs (main thread only).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool = False,
        save_checkpoints: bool = True,
        distributed: str = "none",
        handle_signals: bool = False,
    ) -> None:
        if distributed not in DISTRIBUTED:
            raise UserError(
                f"unknown distributed mode {distributed!r}; choose from {', '.join(DISTRIBUTED)}"
            )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.save_checkpoints = save_checkpoints and self.out_dir is not None
        self.distributed = distributed
        self.handle_signals = handle_signals
        self.rank, self.world_size = 0, 1
        if distributed != "none" and "WORLD_SIZE" not in os.environ:
            raise UserError(
                f"--distributed {distributed} needs a process started by torchrun "
                f"(WORLD_SIZE is not set); e.g. torchrun --nproc-per-node 2 -m spheretorch train"
            )
        ckpt = None
        if resume:
            if self.out_dir is None:
                raise UserError("--resume needs --out DIR")
            ckpt = self._read_checkpoint_meta()
            saved = TrainConfig.from_dict(ckpt["train_config"])
            if config.model != saved.model:
                raise UserError(
                    f"--model {config.model} does not match the checkpoint's model {saved.model}"
                )
            if config.steps is not None and config.steps != saved.steps:
                if config.steps < ckpt["step"]:
                    raise UserError(
                        f"--steps {config.steps} is below the checkpoint's step {ckpt['step']}"
                    )
                saved.steps = config.steps
            config = saved
        self.config = config = config.resolve()
        self.device = resolve_device(config.device)
        tokenizer: Tokenizer | str = (
            Tokenizer.from_state_dict(ckpt["tokenizer"]) if ckpt else config.tokenizer
        )
        self.data: TextData = load_data(config.data, tokenizer)
        self.tokenizer = self.data.tokenizer
        self.model_config = (
            make_config(config.model, **ckpt["model_config"])
            if ckpt
            else config.model_config(self.tokenizer.vocab_size)
        )
        self.data.check_fits(self.model_config.seq_len)
        windows = len(self.data.train) - self.model_config.seq_len
        if config.batch_size > windows:
            raise UserError(
                f"batch size {config.batch_size} is larger than the data: {self.data.name} has "
                f"{windows} training windows of length {self.model_config.seq_len}"
            )

        if distributed != "none":
            from .. import distributed as sd

            world = int(os.environ["WORLD_SIZE"])
            if config.batch_size % world:  # checked before any process group exists
                raise UserError(
                    f"batch size {config.batch_size} is not divisible by the world size "
                    f"{world}: every rank needs an equal share"
                )
            ctx = sd.init_from_env(self.device)
            self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, self.model_config).to(self.device)
        self.forward_model: torch.nn.Module = self.model
        if distributed == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        elif distributed == "fsdp":
            from .. import distributed as sd

            sd.wrap(self.model, "fsdp")  # shards in place; keeps sphere_dim
        self.optimizer = build_optimizer(
            self.model, config.optim, config.lr, config.weight_decay, config.betas
        )
        self.schedule = CosineSchedule(
            config.lr, config.steps, config.warmup_steps, config.min_lr_ratio
        )
        self.amp_dtype = (
            torch.bfloat16
            if self.device.type == "cuda" and config.dtype in ("auto", "bfloat16")
            else None
        )
        if config.dtype == "bfloat16" and self.device.type != "cuda":
            warnings.warn("bf16 autocast is used on CUDA only; training in float32", stacklevel=2)
        if config.compile:
            if self.device.type == "cuda":
                self.forward_model = torch.compile(self.forward_model)
            else:
                print("note: --compile is used on CUDA only; running eagerly", file=sys.stderr)
        # evaluation needs no gradient synchronisation: DDP's wrapper is bypassed there
        self.eval_model = self.model if distributed == "ddp" else self.forward_model
        self.eval_data = [
            (x.to(self.device), y.to(self.device))
            for x, y in eval_batches(
                self.data.val, config.eval_batches, config.batch_size, self.model_config.seq_len
            )
        ]
        self.step = 0
        self.elapsed_s = 0.0  # wall clock of the training loop, evaluations included
        self.train_time_s = 0.0  # time spent in optimizer steps only
        self.timed_steps = 0
        self.history: list[dict[str, Any]] = []
        self.diverged = False
        self.skipped_steps = 0  # non-finite steps skipped so far
        self.bad_in_a_row = 0
        self.interrupted: str | None = None
        self._signal: int | None = None
        self._loss_sum: Tensor = torch.zeros((), device=self.device)
        self._loss_count = 0
        if ckpt:
            self.load_state_dict(ckpt)

    # -- pieces ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0 (always true without ``distributed``): the process that writes files."""
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt``, or ``out_dir/checkpoint.dcp`` under FSDP2."""
        if self.out_dir is None:
            return None
        return self.out_dir / (SHARDED_CHECKPOINT if self.distributed == "fsdp" else CHECKPOINT)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        c = self.config
        x, y = get_batch(
            self.data.train,
            c.seed,
            step,
            c.batch_size,
            self.model_config.seq_len,
            self.rank,
            self.world_size,
        )
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _all_ranks_agree(self, flag: bool) -> bool:
        """``flag`` and-ed over ranks (every rank must take the same branch)."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def _grad_norm(self) -> Tensor:
        """Total 2-norm of all gradients (clipped to ``grad_clip`` when that is set)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
        return full() if full is not None else norm

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward, backward, clip, optimizer step at the scheduled LR; returns the loss.

        A non-finite loss or gradient norm skips the update (see the class docstring) and
        raises :class:`TrainingDiverged` at the ``max_bad_steps``-th such step in a row.
        """
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            _, loss = self.forward_model(x, y)
        loss.backward()
        norm = self._grad_norm()
        finite = bool(torch.isfinite(loss.detach()).item() and torch.isfinite(norm).item())
        finite = self._all_ranks_agree(finite)
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.bad_in_a_row >= self.config.max_bad_steps:
            first = self.step - self.bad_in_a_row + 1
            raise TrainingDiverged(
                f"{self.config.model}: non-finite loss or gradients at {self.bad_in_a_row} "
                f"steps in a row (steps {first}-{self.step}); stopping. Lower --lr or raise "
                f"--max-bad-steps; the last checkpoint is untouched"
            )
        return loss.detach() if finite else torch.full((), math.nan, device=loss.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (every rank scores all of them: the
        model is the same on every rank, and FSDP2 needs every rank in each forward)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.eval_data:
            with self.autocast():
                total += self.eval_model(x, y)[1].float()
        self.model.train()
        return float(total.item() / len(self.eval_data))

    # -- state -------------------------------------------------------------------------------
    def _resume_state(self) -> dict[str, Any]:
        """Everything except the model and optimizer tensors."""
        return {
            "format": FORMAT,
            "model_name": self.config.model,
            "scheduler": self.schedule.state_dict(),
            "step": self.step,
            "data": {"seed": self.config.seed, "step": self.step},
            "rng": get_rng_state(),
            "train_config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer.state_dict(),
            "elapsed_s": self.elapsed_s,
            "train_time_s": self.train_time_s,
            "timed_steps": self.timed_steps,
            "history": self.history,
            # the train-loss accumulator: an interruption between evaluations resumes exactly
            "loss_sum": self._loss_sum.detach().cpu(),
            "loss_count": self._loss_count,
            "skipped_steps": self.skipped_steps,
            "bad_in_a_row": self.bad_in_a_row,
        }

    def state_dict(self) -> dict[str, Any]:
        """A single-file checkpoint (not under FSDP2, where :meth:`save_checkpoint` writes a
        sharded one)."""
        return {
            **self._resume_state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.distributed == "fsdp":
            from .. import distributed as sd

            assert self.out_dir is not None
            sd.load_sharded(self.out_dir / SHARDED_CHECKPOINT, self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        total = self.schedule.total  # a resumed run may extend the schedule
        self.schedule.load_state_dict(state["scheduler"])
        self.schedule.total = total
        self.step = int(state["step"])
        self.elapsed_s = float(state["elapsed_s"])
        self.train_time_s = float(state["train_time_s"])
        self.timed_steps = int(state["timed_steps"])
        self.history = list(state["history"])
        if "loss_sum" in state:
            self._loss_sum = state["loss_sum"].to(self.device)
            self._loss_count = int(state["loss_count"])
            self.skipped_steps = int(state["skipped_steps"])
            self.bad_in_a_row = int(state["bad_in_a_row"])
        set_rng_state(state["rng"])

    def _read_checkpoint_meta(self) -> dict[str, Any]:
        """The checkpoint to resume from: ``checkpoint.pt``, or under FSDP2 the small
        ``extra.pt`` of ``checkpoint.dcp`` (the shards are read later, once sharded)."""
        assert self.out_dir is not None
        if self.distributed != "fsdp":
            return load_checkpoint(self.out_dir / CHECKPOINT)
        from .. import distributed as sd

        for d in (self.out_dir / SHARDED_CHECKPOINT, self.out_dir / (SHARDED_CHECKPOINT + ".old")):
            if (d / sd.EXTRA_FILE).is_file():
                return load_checkpoint(d / sd.EXTRA_FILE)
        raise UserError(f"checkpoint not found: {self.out_dir / SHARDED_CHECKPOINT}")

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (collective under ``distributed``)."""
        if self.out_dir is None:
            return
        if self.distributed == "fsdp":
            from .. import distributed as sd

            sd.save_sharded(
                self.out_dir / SHARDED_CHECKPOINT,
                self.model,
                self.optimizer,
                extra=self._resume_state(),
            )
            return
        if self.is_main:
            save_atomic(self.state_dict(), self.out_dir / CHECKPOINT)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # nobody runs ahead (or exits) before the checkpoint is on disk

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self.out_dir is None or not self.is_main:
            return
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def _prepare_out_dir(self) -> None:
        if self.out_dir is None or not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # temp files of a checkpoint write that was killed (save_atomic's naming)
        for stale in self.out_dir.glob(f".{CHECKPOINT}.*.tmp"):
            stale.unlink(missing_ok=True)
        # Keep exactly the evaluations the checkpoint knows about (a crash between writing a
        # metrics line and the checkpoint must not leave a duplicate after resuming).
        lines = [json.dumps(row) + "\n" for row in self.history]
        (self.out_dir / METRICS).write_text("".join(lines), encoding="utf-8")

    @contextlib.contextmanager
    def _signals(self) -> Any:
        """While training: SIGINT/SIGTERM only set a flag, checked after every step."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._signal is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now (checkpoints stay atomic)
            self._signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- loop --------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps`` (or stop once ``stop_after`` steps are done, at an
        evaluation boundary, as an interruption would); returns the summary."""
        c = self.config
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        self._signal, self.interrupted = None, None
        self._prepare_out_dir()
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=c.steps,
                initial=self.step,
                desc=f"{c.model}",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )
        start = time.perf_counter() - self.elapsed_s
        try:
            with self._signals():
                while self.step < end and not self.diverged:
                    t0 = time.perf_counter()
                    loss = self.train_step(*self.batch(self.step))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    self.train_time_s += time.perf_counter() - t0
                    self.timed_steps += 1
                    if self.bad_in_a_row == 0:
                        self._loss_sum += loss.float()
                        self._loss_count += 1
                    if bar is not None:
                        bar.update(1)
                        if self.step % 10 == 0 or self.step == end:
                            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                    stop = self._interrupt_requested()
                    if self.step % c.eval_interval == 0 or self.step == c.steps:
                        self._eval_and_save(start, bar)
                    elif stop:
                        self.elapsed_s = time.perf_counter() - start
                        self.save_checkpoint()
                    if stop:
                        self.interrupted = signal.Signals(self._signal or signal.SIGTERM).name
                        break
        finally:
            if bar is not None:
                bar.close()
        self.elapsed_s = time.perf_counter() - start
        summary = self.summary()
        if self.out_dir is not None and self.is_main:
            (self.out_dir / SUMMARY).write_text(
                json.dumps(summary, indent=2) + "\n", encoding="utf-8"
            )
        return summary

    def _interrupt_requested(self) -> bool:
        requested = self._all_ranks_agree(self._signal is None) is False
        if requested and self._signal is None:
            self._signal = signal.SIGTERM  # another rank got it (torchrun forwards signals)
        return requested

    def _eval_and_save(self, start: float, bar: Any) -> None:
        from .. import distributed as sd

        mean = self._loss_sum / self._loss_count if self._loss_count else self._loss_sum * math.nan
        train_loss = float(sd.all_reduce_mean(mean).item())
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        val_loss = self.evaluate()
        self.elapsed_s = time.perf_counter() - start
        row = {
            "step": self.step,
            "train_loss": _json_float(train_loss),
            "val_loss": _json_float(val_loss),
            "elapsed_s": round(self.elapsed_s, 3),
        }
        self.history.append(row)
        self._write_metrics(row)
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}", refresh=True)
        if not math.isfinite(val_loss):
            self.diverged = True
            if self.is_main:
                print(
                    f"{self.config.model}: validation loss became non-finite at step "
                    f"{self.step}; stopping",
                    file=sys.stderr,
                )
            return
        if self.save_checkpoints:
            self.save_checkpoint()

    def summary(self) -> dict[str, Any]:
        c = self.config
        last = self.history[-1] if self.history else {}
        ms = 1000 * self.train_time_s / self.timed_steps if self.timed_steps else None
        tokens = c.batch_size * self.model_config.seq_len
        return {
            "model": c.model,
            "preset": c.preset,
            "data": self.data.name,
            "optim": c.optim,
            "lr": c.lr,
            "steps": self.step,
            "final_val_loss": last.get("val_loss"),
            "final_train_loss": last.get("train_loss"),
            "ms_per_step": ms,
            "tokens_per_s": tokens / (ms / 1000) if ms else None,
            "elapsed_s": self.elapsed_s,
            "n_params": self.model.num_parameters(),
            "device": str(self.device),
            "world_size": self.world_size,
            "diverged": self.diverged,
            "skipped_steps": self.skipped_steps,
            "interrupted": self.interrupted,
        }


def load_model(
    path: str | Path, device: str = "cpu"
) -> tuple[LanguageModel, Tokenizer, dict[str, Any]]:
    """Rebuild the model and tokenizer saved in a trainer checkpoint (for sampling): a
    ``checkpoint.pt`` file, or the ``checkpoint.dcp`` directory of an FSDP2 run (read here by
    one process: ``torch.distributed.checkpoint`` reassembles the shards)."""
    path = Path(path)
    if path.is_dir():
        from .. import distributed as sd

        ckpt = load_checkpoint(path / sd.EXTRA_FILE, map_location="cpu")
        model = build_model(
            ckpt["model_name"], make_config(ckpt["model_name"], **ckpt["model_config"])
        )
        try:
            sd.load_sharded(path, model)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise UserError(str(e).splitlines()[0]) from None
    else:
        ckpt = load_checkpoint(path, map_location="cpu")
        model = build_model(
            ckpt["model_name"], make_config(ckpt["model_name"], **ckpt["model_config"])
        )
        model.load_state_dict(ckpt["model"])
    return model.to(resolve_device(device)), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt
