"""The training loop: one step, evaluation, metrics, checkpoints and exact resume.

:class:`Trainer` sets a run up from a :class:`~spheretorch.train.config.TrainConfig` (data,
model, optimizer, LR scheduler), then :meth:`Trainer.train` loops: :meth:`Trainer.train_step`,
an evaluation and a checkpoint every ``eval_interval`` steps. Batches are a function of
``(seed, step)`` (:func:`spheretorch.train.data.get_batch`), so resuming at a checkpoint
replays the uninterrupted run bit for bit on CPU. Everything data-parallel (ranks, wrapping,
agreement, checkpoint files) is asked of one :class:`spheretorch.distributed.Parallel`.
Fault policies: :class:`Trainer` and ``docs/errors.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..distributed import CHECKPOINT_FILE, Parallel
from ..models import LanguageModel, build_model, config_from_dict
from . import memory
from .checkpoints import (
    FORMAT,
    check_checkpoint,
    get_rng_state,
    load_checkpoint,
    set_rng_state,
)
from .config import (
    OPTIMIZERS,
    CosineSchedule,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    resolve_device,
)
from .data import eval_batches, get_batch, load_data, max_eval_batches
from .errors import TrainingDiverged, UserError
from .presets import get_preset
from .rundir import RunDir
from .signals import StopSignals
from .text import count
from .throughput import flops_per_token, peak_flops, throughput
from .tokenizer import Tokenizer

__all__ = [
    "OPTIMIZERS",
    "CosineSchedule",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "resolve_device",
]

logger = logging.getLogger(__name__)

CHECKPOINT = CHECKPOINT_FILE


@contextlib.contextmanager
def _user_error() -> Any:
    """The parallel set-up's ``ValueError`` (bad mode, launch, batch) as a user's mistake."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e)) from None


_NOTED: set[tuple[int, int]] = set()  # --eval-batches caps already noted


class _EvalStopped(Exception):
    """A signal arrived during an evaluation (one process)."""


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class Trainer:
    """One training run, optionally writing ``metrics.jsonl``, ``checkpoint.pt`` and
    ``summary.json`` under ``out_dir``.

    Faults (``docs/errors.md``): a step with a non-finite loss or gradient norm is skipped
    and counted (``skipped_steps``); ``max_bad_steps`` in a row raise
    :class:`~spheretorch.train.errors.TrainingDiverged`; a non-finite validation loss stops the
    run (``diverged``). The trainer alone decides (optimizers get ``nonfinite="ignore"``), in
    one host sync per step that also carries the bar's loss and the ranks' agreement.
    SIGINT/SIGTERM (``handle_signals``): the step in flight finishes, a checkpoint is written,
    :meth:`train` returns with ``summary["interrupted"]``; ``resume=True`` continues exactly.

    Args:
        config: what to train (resolved against its preset here).
        out_dir: run directory, or ``None`` for an in-memory run (LR sweeps).
        resume: continue from the checkpoint in ``out_dir``; the saved configuration is used,
            except ``steps`` when ``config.steps`` is given (extends the run; the cosine
            schedule is then stretched to the new total).
        progress: show a tqdm progress bar with the live loss.
        save_checkpoints: write a checkpoint at every evaluation.
        distributed: ``"none"``, ``"ddp"`` or ``"fsdp"`` (see
            :class:`spheretorch.distributed.Parallel`): under ``torchrun`` each rank trains on
            its share of every global batch; rank 0 writes metrics and summaries.
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
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.save_checkpoints = save_checkpoints and self.out_dir is not None
        self.handle_signals = handle_signals
        with _user_error():
            self.parallel = Parallel(distributed)
        found = self._find_resume_checkpoint() if resume else None
        with _user_error():
            self.parallel.check_launch()
        ckpt = load_checkpoint(found) if found is not None else None
        if ckpt is not None:
            check_checkpoint(ckpt, found, resume=True)  # one line naming what does not fit
            config = config.resumed(ckpt["train_config"], ckpt["step"])
        self.config = config.resolve()
        self._setup_data(ckpt)
        self._setup_model()
        self._reset_progress()
        if ckpt is not None:
            with _user_error():  # weights or optimizer state that do not fit the model
                self.load_state_dict(ckpt)

    # -- set-up ------------------------------------------------------------------------------
    def _find_resume_checkpoint(self) -> Path:
        if self.out_dir is None:
            raise UserError("--resume needs --out DIR")
        found = self.parallel.resume_file(self.out_dir)
        if found is None:
            raise UserError(self.parallel.missing_checkpoint(self.out_dir))
        return found

    def _setup_data(self, ckpt: dict[str, Any] | None) -> None:
        c = self.config
        self.device = resolve_device(c.device)
        get_preset(c.preset).check_data(c.data)
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"]) if ckpt else c.tokenizer
        self.data = load_data(c.data, tokenizer)
        self.tokenizer = self.data.tokenizer
        self.model_config = (
            config_from_dict(c.model, ckpt["model_config"])
            if ckpt
            else c.model_config(self.tokenizer.vocab_size)
        )
        seq_len = self.model_config.seq_len
        self.data.check_vocab(self.model_config.vocab_size)
        self.data.check_fits(seq_len, c.batch_size)
        n_eval = min(c.eval_batches, max_eval_batches(len(self.data.val), c.batch_size, seq_len))
        memory.check(self.model_config, c, self.device, enforce=c.check_memory, eval_batches=n_eval)

    def _setup_model(self) -> None:
        c = self.config
        with _user_error():
            self.parallel.start(self.device, c.batch_size)
        self.device = self.parallel.device
        torch.manual_seed(c.seed)
        self.model: LanguageModel = build_model(c.model, self.model_config).to(self.device)
        self.forward_model, self.eval_model = self.parallel.wrap(self.model)
        self.optimizer = build_optimizer(self.model, c.optim, c.lr, c.weight_decay, c.betas)
        self.scheduler = build_scheduler(self.optimizer, c)
        self.schedule: CosineSchedule = self.scheduler.lr_lambdas[0]
        # bf16 autocast by default on CUDA, on request elsewhere (CPU autocast); the weights
        # and the optimizer state stay float32.
        cuda = self.device.type == "cuda"
        bf16 = c.dtype == "bfloat16" or (cuda and c.dtype == "auto")
        self.amp_dtype = torch.bfloat16 if bf16 else None
        if c.compile:  # inductor: Triton kernels on CUDA, C++ on CPU
            compiled = torch.compile(self.forward_model)
            if self.eval_model is self.forward_model:
                self.eval_model = compiled
            self.forward_model = compiled
        m = self.model_config
        self.flops_per_token = flops_per_token(self.model, m.n_layer, m.seq_len, m.d_model)
        self.peak_flops, self.peak_source = peak_flops(self.device, self.amp_dtype or torch.float32)
        self.eval_data = [
            (x.to(self.device), y.to(self.device))
            for x, y in eval_batches(
                self.data.val, c.eval_batches, c.batch_size, self.model_config.seq_len
            )
        ]
        noted = (c.eval_batches, len(self.eval_data))  # once per process (compare's runs)
        if len(self.eval_data) < c.eval_batches and self.is_main and noted not in _NOTED:
            _NOTED.add(noted)
            logger.warning(
                "note: --eval-batches %d: the validation split holds %s of %d distinct windows; "
                "evaluating those",
                c.eval_batches,
                count(len(self.eval_data), "batch", "batches", fmt=","),
                c.batch_size,
            )

    def _reset_progress(self) -> None:
        self.step = 0
        self.elapsed_s = 0.0  # wall clock of the training loop, evaluations included
        self.train_time_s = 0.0  # time spent in training steps only
        self.timed_steps = 0
        self._timed_at_eval = (0.0, 0)  # (train_time_s, timed_steps) at the last evaluation
        self.history: list[dict[str, Any]] = []
        self.diverged = False
        self.skipped_steps = 0  # non-finite steps skipped so far
        self.bad_in_a_row = 0
        self.last_loss = math.nan  # this rank's loss at the last step, on the host
        self.interrupted: str | None = None
        self._eval_pending = False  # a signal stopped this step's evaluation: redo on resume
        self._training = False  # in train(): a signal may stop an evaluation
        self._signals = StopSignals()
        self._stop = False  # some rank got a signal (agreed at the last step)
        self._loss_sum: Tensor = torch.zeros((), device=self.device)
        self._loss_count = 0

    # -- pieces ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (always so in one process), the process that writes files."""
        return self.parallel.is_main

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/checkpoint.pt``, or ``out_dir/checkpoint.dcp`` under FSDP2."""
        return None if self.out_dir is None else self.parallel.checkpoint_path(self.out_dir)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        c, p = self.config, self.parallel
        seq_len = self.model_config.seq_len
        x, y = get_batch(self.data.train, c.seed, step, c.batch_size, seq_len, p.rank, p.world_size)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

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
        """Forward, backward, clip, optimizer step at the scheduled LR; returns the loss (NaN
        for a skipped step).

        A non-finite loss or gradient norm skips the update (see the class docstring) and
        raises :class:`TrainingDiverged` at the ``max_bad_steps``-th such step in a row.
        """
        with self.autocast():
            _, loss = self.forward_model(x, y)
        loss.backward()
        loss = loss.detach()
        finite = torch.isfinite(loss) & torch.isfinite(self._grad_norm())
        flags = torch.stack((finite, finite.new_tensor(self._signals.received is None))).int()
        flags = self.parallel.all_true(flags)  # every rank takes the same branches
        # the step's one host sync: skip or not, stop or not, and the loss for the bar
        ok, no_signal, self.last_loss = torch.cat((flags.float(), loss.float().view(1))).tolist()
        if ok:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step is no misordered scheduler
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.step += 1
        self._stop = not no_signal
        if self.bad_in_a_row >= self.config.max_bad_steps:
            first = self.step - self.bad_in_a_row + 1
            saved = self.checkpoint_path is not None and self.parallel.resume_file(self.out_dir)
            raise TrainingDiverged(
                f"{self.config.model}: non-finite loss or gradients at "
                f"{count(self.bad_in_a_row, 'step')} in a row (steps {first}-{self.step}); "
                f"stopping. Lower --lr or raise --max-bad-steps; "
                + ("the last checkpoint is untouched" if saved else "no checkpoint was written")
            )
        return loss if ok else torch.full((), math.nan, device=loss.device)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (every rank scores all of them: the
        model is the same on every rank, and FSDP2 needs every rank in each forward).
        Within :meth:`train`, in one process, a SIGINT/SIGTERM stops it between batches
        (:meth:`train` checkpoints and evaluates again on resume)."""
        stoppable = self._training and self.parallel.world_size == 1
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.eval_data:
            if stoppable and self._signals.received is not None:
                raise _EvalStopped  # one process stops at once; ranks finish together
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
            "scheduler": self.scheduler.state_dict(),
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
            "eval_pending": self._eval_pending,
        }

    def state_dict(self) -> dict[str, Any]:
        """A single-file checkpoint (what :meth:`save_checkpoint` writes outside FSDP2)."""
        return Parallel.full_state(self.model, self.optimizer, self._resume_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.out_dir is not None or self.parallel.mode != "fsdp"
        self.parallel.load(self.out_dir, self.model, self.optimizer, state)
        total = self.schedule.total  # a resumed run may extend the schedule
        sched = state["scheduler"]
        if "last_epoch" not in sched:  # v0.1 saved the schedule's fields alone
            sched = {**self.scheduler.state_dict(), "last_epoch": int(state["step"])}
            sched["lr_lambdas"] = [state["scheduler"]] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(sched)
        self.schedule.total = total
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)  # for the new total
        self.step = int(state["step"])
        self.elapsed_s = float(state["elapsed_s"])
        self.train_time_s = float(state["train_time_s"])
        self.timed_steps = int(state["timed_steps"])
        self._timed_at_eval = (self.train_time_s, self.timed_steps)
        self.history = list(state["history"])
        if "loss_sum" in state:  # absent from the first checkpoints of v0.1
            self._loss_sum = state["loss_sum"].to(self.device)
            self._loss_count = int(state["loss_count"])
            self.skipped_steps = int(state["skipped_steps"])
            self.bad_in_a_row = int(state["bad_in_a_row"])
        self._eval_pending = bool(state.get("eval_pending", False))
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (collective under ``distributed``)."""
        if self.out_dir is not None:
            self.parallel.save(self.out_dir, self.model, self.optimizer, self._resume_state())
        if self._files is not None:
            self._files.checkpoint_written()

    @property
    def _files(self) -> RunDir | None:
        """The run directory's files, on the process that writes them."""
        return RunDir(self.out_dir) if self.out_dir is not None and self.is_main else None

    def _progress_bar(self) -> Any:
        if not (self.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.steps,
            initial=self.step,
            desc=self.config.model,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=True,
        )

    # -- loop --------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps`` (or stop once ``stop_after`` steps are done, at an
        evaluation boundary, as an interruption would); returns the summary."""
        c = self.config
        end = c.steps if stop_after is None else min(c.steps, stop_after)
        self._stop, self.interrupted = False, None
        if self._files is not None:
            self._files.start(self.history)
            self.parallel.remove_partial_writes(self._files.path)
        bar = self._progress_bar()
        start = time.perf_counter() - self.elapsed_s
        try:
            with self._signals.catching(self.handle_signals):
                self._training = True
                if self._eval_pending:  # the evaluation a signal stopped
                    self._eval_and_save(start, bar)
                    if self._eval_pending:  # stopped again
                        self.interrupted = self._signals.name
                while self.step < end and not self.diverged and self.interrupted is None:
                    t0 = time.perf_counter()
                    # no device sync for timing: each step already waits for its own loss,
                    # so over many steps the mean time per step is right
                    loss = self.train_step(*self.batch(self.step))
                    self.train_time_s += time.perf_counter() - t0
                    self.timed_steps += 1
                    if self.bad_in_a_row == 0:
                        self._loss_sum += loss.float()
                        self._loss_count += 1
                    if bar is not None:
                        bar.update(1)
                        if self.step % 10 == 0 or self.step == end:
                            bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
                    stop = self.parallel.stop_now(self._signals.received is not None, self._stop)
                    if self.step % c.eval_interval == 0 or self.step == c.steps:
                        self._eval_and_save(start, bar)
                        stop = stop or self._eval_pending
                    elif stop:
                        self.elapsed_s = time.perf_counter() - start
                        self.save_checkpoint()
                    if stop:
                        self.interrupted = self._signals.name
                        break
        finally:
            self._training = False
            if bar is not None:
                bar.close()
        self.elapsed_s = time.perf_counter() - start
        summary = self.summary()
        if self._files is not None:
            self._files.write_summary(summary)
        return summary

    def _eval_and_save(self, start: float, bar: Any) -> None:
        try:
            val_loss = self.evaluate()
        except _EvalStopped:
            self.model.train()
            self._eval_pending = True
            self.elapsed_s = time.perf_counter() - start
            if self.save_checkpoints:
                self.save_checkpoint()
            return
        self._eval_pending = False
        mean = self._loss_sum / self._loss_count if self._loss_count else self._loss_sum * math.nan
        train_loss = float(self.parallel.mean(mean).item())
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self.elapsed_s = time.perf_counter() - start
        row = {
            "step": self.step,
            "train_loss": _json_float(train_loss),
            "val_loss": _json_float(val_loss),
            "elapsed_s": round(self.elapsed_s, 3),
            **self._throughput(since=self._timed_at_eval),
        }
        self._timed_at_eval = (self.train_time_s, self.timed_steps)
        self.history.append(row)
        if self._files is not None:
            self._files.append_metrics(row)
        if bar is not None:
            info = {"loss": f"{train_loss:.4f}", "val": f"{val_loss:.4f}"}
            info["tok/s"] = f"{row['tokens_per_s']:.0f}"
            if row["mfu"] is not None:
                info["MFU"] = f"{100 * row['mfu']:.1f}%"
            else:
                info["TFLOP/s"] = f"{row['tflops_per_s']:.3g}"
            bar.set_postfix(info, refresh=True)
        if not math.isfinite(val_loss):
            self.diverged = True
            if self.is_main:
                logger.error(
                    "%s: validation loss became non-finite at step %d; stopping",
                    self.config.model,
                    self.step,
                )
            return
        if self.save_checkpoints:
            self.save_checkpoint()

    def summary(self) -> dict[str, Any]:
        c = self.config
        last = self.history[-1] if self.history else {}
        ms = 1000 * self.train_time_s / self.timed_steps if self.timed_steps else None
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
            **self._throughput(),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "peak_source": self.peak_source,
            "elapsed_s": self.elapsed_s,
            "n_params": self.model.num_parameters(),
            "device": str(self.device),
            "world_size": self.parallel.world_size,
            "diverged": self.diverged,
            "skipped_steps": self.skipped_steps,
            "interrupted": self.interrupted,
        }

    def _throughput(self, since: tuple[float, int] = (0.0, 0)) -> dict[str, Any]:
        """Tokens/s, achieved TFLOP/s and MFU over the training steps timed after ``since``
        (``(train_time_s, timed_steps)`` then); evaluations are not counted."""
        seconds, steps = self.train_time_s - since[0], self.timed_steps - since[1]
        tokens = steps * self.config.batch_size * self.model_config.seq_len
        return throughput(tokens, seconds, self.flops_per_token, self.peak_flops)

    def close(self) -> None:
        """Leave the process group (under ``torchrun``); nothing to do in one process."""
        self.parallel.close()
