"""The training loop: recipes, evaluation, metrics, checkpoints and exact resume.

Structure (kept small so distributed training can wrap it): :class:`TrainConfig` says what to
run, :meth:`Trainer.train_step` does one optimizer step on one batch, :meth:`Trainer.evaluate`
scores the fixed validation batches, :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict`
hold everything a checkpoint needs. Batches are a function of ``(seed, step)``
(:func:`spheretorch.train.data.get_batch`), so resuming at a checkpoint replays the
uninterrupted run bit for bit on CPU.

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
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models import MODELS, LanguageModel, TransformerConfig, build_model
from .checkpoints import FORMAT, get_rng_state, load_checkpoint, save_atomic, set_rng_state
from .data import TextData, eval_batches, get_batch, load_data
from .errors import UserError
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
        for name in ("steps", "batch_size", "eval_interval", "eval_batches"):
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
            return TransformerConfig(vocab_size=vocab_size, **kwargs)
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
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) or None
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

    Args:
        config: what to train (resolved against its preset here).
        out_dir: run directory, or ``None`` for an in-memory run (LR sweeps).
        resume: continue from ``out_dir/checkpoint.pt``; the saved configuration is used, except
            ``steps`` when ``config.steps`` is given (extends the run; the cosine schedule is then
            stretched to the new total).
        progress: show a tqdm progress bar with the live loss.
        save_checkpoints: write a checkpoint at every evaluation.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool = False,
        save_checkpoints: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.save_checkpoints = save_checkpoints and self.out_dir is not None
        self.rank, self.world_size = 0, 1
        ckpt = None
        if resume:
            if self.out_dir is None:
                raise UserError("--resume needs --out DIR")
            ckpt = load_checkpoint(self.out_dir / CHECKPOINT)
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
            TransformerConfig.from_dict(ckpt["model_config"])
            if ckpt
            else config.model_config(self.tokenizer.vocab_size)
        )
        self.data.check_fits(self.model_config.seq_len)
        if config.batch_size > len(self.data.train):
            raise UserError(f"batch size {config.batch_size} exceeds the training tokens")

        torch.manual_seed(config.seed)
        self.model = build_model(config.model, self.model_config).to(self.device)
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
        self.forward_model = self.model
        if config.compile:
            if self.device.type == "cuda":
                self.forward_model = torch.compile(self.model)
            else:
                print("note: --compile is used on CUDA only; running eagerly", file=sys.stderr)
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
        self._loss_sum: Tensor = torch.zeros((), device=self.device)
        self._loss_count = 0
        if ckpt:
            self.load_state_dict(ckpt)

    # -- pieces ------------------------------------------------------------------------------
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

    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward, backward, clip, optimizer step at the scheduled LR; returns the loss."""
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            _, loss = self.forward_model(x, y)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.eval_data:
            with self.autocast():
                total += self.forward_model(x, y)[1].float()
        self.model.train()
        return float(total.item() / len(self.eval_data))

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_name": self.config.model,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        if self.out_dir is not None:
            save_atomic(self.state_dict(), self.out_dir / CHECKPOINT)

    def _write_metrics(self, row: dict[str, Any]) -> None:
        if self.out_dir is None:
            return
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _prepare_out_dir(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Keep exactly the evaluations the checkpoint knows about (a crash between writing a
        # metrics line and the checkpoint must not leave a duplicate after resuming).
        lines = [json.dumps(row) + "\n" for row in self.history]
        (self.out_dir / METRICS).write_text("".join(lines), encoding="utf-8")

    # -- loop --------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps`` (or stop once ``stop_after`` steps are done, at an
        evaluation boundary, as an interruption would); returns the summary."""
        c = self.config
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        self._prepare_out_dir()
        bar = None
        if self.progress:
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
            while self.step < end and not self.diverged:
                t0 = time.perf_counter()
                loss = self.train_step(*self.batch(self.step))
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.train_time_s += time.perf_counter() - t0
                self.timed_steps += 1
                self._loss_sum += loss.float()
                self._loss_count += 1
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == end:
                        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if self.step % c.eval_interval == 0 or self.step == c.steps:
                    self._eval_and_save(start, bar)
        finally:
            if bar is not None:
                bar.close()
        self.elapsed_s = time.perf_counter() - start
        summary = self.summary()
        if self.out_dir is not None:
            (self.out_dir / SUMMARY).write_text(
                json.dumps(summary, indent=2) + "\n", encoding="utf-8"
            )
        return summary

    def _eval_and_save(self, start: float, bar: Any) -> None:
        train_loss = float((self._loss_sum / max(self._loss_count, 1)).item())
        self._loss_sum.zero_()
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
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            self.diverged = True
            print(
                f"{self.config.model}: loss became non-finite at step {self.step}; stopping",
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
            "diverged": self.diverged,
        }


def load_model(
    path: str | Path, device: str = "cpu"
) -> tuple[LanguageModel, Tokenizer, dict[str, Any]]:
    """Rebuild the model and tokenizer saved in a trainer checkpoint (for sampling)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    config = TransformerConfig.from_dict(ckpt["model_config"])
    model = build_model(ckpt["model_name"], config)
    model.load_state_dict(ckpt["model"])
    return model.to(resolve_device(device)), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt
