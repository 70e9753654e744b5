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
from .compile_check import CompiledGradientMismatch, grad_parity
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

#: the first steps of each Trainer are warm-up (compilation, the compile check, allocator and
#: cuBLAS/inductor autotuning caches): timed apart (``warmup_s``), not in ms/step, tokens/s, MFU
UNTIMED_WARMUP_STEPS = 2

#: with the non-finite decision on the device (CUDA), the host reads the loss, the skip and
#: divergence counters and the ranks' stop agreement every this many steps (the bar's cadence)
HOST_READ_INTERVAL = 10


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
    run (``diverged``). The trainer alone decides (optimizers get ``nonfinite="ignore"``).
    On CUDA, with an optimizer that takes a device-side ``found_inf`` (torch's GradScaler
    protocol: ``_step_supports_amp_scaling``, e.g. fused AdamW), the decision and the skip stay
    on the device and the host reads the loss, the counters and the ranks' agreement only
    every ``HOST_READ_INTERVAL`` steps and at evaluations (``device_skip``; divergence is then
    raised at the next read, naming the same steps). Otherwise one host sync per step carries
    the decision, the bar's loss and the ranks' agreement.
    With ``compile``, the first step compares compiled and eager gradients
    (:mod:`~spheretorch.train.compile_check`, ``config.compile_check``).
    SIGINT/SIGTERM (``handle_signals``): the step in flight finishes, a checkpoint is written,
    :meth:`train` returns with ``summary["interrupted"]``; ``resume=True`` continues exactly.

    Args:
        config: what to train (resolved against its preset here).
        out_dir: run directory, or ``None`` for an in-memory run (LR sweeps).
        resume: continue from the checkpoint in ``out_dir``; the saved configuration is used.
            A different ``config.steps`` stretches the cosine schedule to the new total, which
            is refused unless ``config.stretch_schedule`` (see ``TrainConfig.resumed``).
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
        if c.param_dtype == "bfloat16":  # bf16 storage (no fp32 master copy): an ablation
            self.model.to(torch.bfloat16)
        self.forward_model, self.eval_model = self.parallel.wrap(self.model)
        self.optimizer = build_optimizer(self.model, c.optim, c.lr, c.weight_decay, c.betas)
        self.scheduler = build_scheduler(self.optimizer, c)
        self.schedule: CosineSchedule = self.scheduler.lr_lambdas[0]
        # bf16 autocast by default on CUDA, on request elsewhere (CPU autocast); the weights
        # and the optimizer state stay float32.
        cuda = self.device.type == "cuda"
        bf16 = c.dtype == "bfloat16" or (cuda and c.dtype == "auto")
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.eager_forward_model = self.forward_model
        self._compile_check_pending = bool(c.compile) and c.compile_check != "off"
        self.compile_check: dict[str, Any] | None = None  # the check's outcome (summary)
        if c.compile:  # inductor: Triton kernels on CUDA, C++ on CPU
            compiled = torch.compile(self.forward_model)
            if self.eval_model is self.forward_model:
                self.eval_model = compiled
            self.forward_model = compiled
        m = self.model_config
        self.flops_per_token = flops_per_token(self.model, m.n_layer, m.seq_len, m.d_model)
        self.peak_flops, self.peak_source = peak_flops(self.device, self.amp_dtype or torch.float32)
        #: the non-finite decision and skip on the device (see the class docstring)
        self.device_skip = cuda and bool(getattr(self.optimizer, "_step_supports_amp_scaling", 0))
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
        self.warmup_s = 0.0  # wall time of the untimed warm-up steps (all processes)
        self.warmup_steps = 0
        self.compile_s: float | None = None  # the first compiled forward+backward (compiling)
        self._warmup_left = UNTIMED_WARMUP_STEPS  # of this process's Trainer
        # (train_time_s, timed_steps, warmup_s, warmup_steps) at the last evaluation
        self._timed_at_eval = (0.0, 0, 0.0, 0)
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
        self._loss_count: Tensor = torch.zeros((), device=self.device)
        # device-side bookkeeping (device_skip): bad steps in a row, skipped steps, the step
        # at which max_bad_steps in a row were reached (-1: not yet), the last loss
        self._dev = torch.tensor([0, 0, -1], device=self.device)
        self._last_loss_dev = torch.full((), math.nan, device=self.device)

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
        if self.device.type == "cuda":  # a copy from pageable memory would wait for the GPU
            x, y = x.pin_memory(), y.pin_memory()
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
        raises :class:`TrainingDiverged` at the ``max_bad_steps``-th such step in a row (with
        ``device_skip``: at the next host read, naming the same steps).
        """
        if self._compile_check_pending:
            loss = self._checked_forward_backward(x, y)
        else:
            timing = self.config.compile and self.compile_s is None
            t0 = self._sync_time() if timing else 0.0
            with self.autocast():
                _, loss = self.forward_model(x, y)
            loss.backward()
            if timing:
                self.compile_s = self._sync_time() - t0
        loss = loss.detach()
        finite = torch.isfinite(loss) & torch.isfinite(self._grad_norm())
        if self.device_skip:
            return self._step_on_device(loss, finite)
        flags = torch.stack((finite, finite.new_tensor(self._signals.received is None))).int()
        flags = self.parallel.all_true(flags)  # every rank takes the same branches
        # the step's one host sync: skip or not, stop or not, and the loss for the bar
        ok, no_signal, self.last_loss = torch.cat((flags.float(), loss.float().view(1))).tolist()
        if ok:
            self.optimizer.step()
            self.bad_in_a_row = 0
            self._loss_sum += loss.float()
            self._loss_count += 1
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        self._after_update()
        self._stop = not no_signal
        if self.bad_in_a_row >= self.config.max_bad_steps:
            self._raise_diverged(self.step)
        return loss if ok else torch.full((), math.nan, device=loss.device)

    def _after_update(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step is no misordered scheduler
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.step += 1

    def _step_on_device(self, loss: Tensor, finite: Tensor) -> Tensor:
        """The step with the decision on the device: the optimizer skips on ``found_inf``
        (GradScaler's protocol), the counters are tensors, nothing is read by the host."""
        ok = self.parallel.all_true(finite.view(1).int()).view(()).bool()
        bad = (~ok).to(self._dev.dtype)
        self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        self.optimizer.grad_scale = None  # type: ignore[attr-defined]
        self.optimizer.step()
        run = (self._dev[0] + 1) * bad  # bad steps in a row, ending at this one
        hit = (run >= self.config.max_bad_steps) & (self._dev[2] < 0)
        at = torch.where(hit, self.step + 1, self._dev[2])
        self._dev = torch.stack((run, self._dev[1] + bad, at))
        self._loss_sum += torch.where(ok, loss.float(), 0.0)
        self._loss_count += ok
        self._last_loss_dev = loss.float()
        self._after_update()
        return torch.where(ok, loss, math.nan)

    def read_host_state(self) -> None:
        """With ``device_skip``: read the device-side loss, counters and (across ranks) the
        stop flag into the host attributes; raise :class:`TrainingDiverged` when
        ``max_bad_steps`` bad steps in a row happened since. One host sync."""
        if not self.device_skip:
            return
        stop = torch.tensor([self._signals.received is None], device=self.device).int()
        stop = self.parallel.all_true(stop)
        parts = (self._dev, stop, self._last_loss_dev.view(1))
        run, skipped, at, no_signal, self.last_loss = torch.cat(
            [t.double() for t in parts]
        ).tolist()
        self.bad_in_a_row, self.skipped_steps = int(run), int(skipped)
        self._stop, at = not no_signal, int(at)
        if at >= 0:
            self._raise_diverged(at)

    def _raise_diverged(self, at: int) -> None:
        n = self.config.max_bad_steps
        first = at - n + 1
        saved = self.checkpoint_path is not None and self.parallel.resume_file(self.out_dir)
        raise TrainingDiverged(
            f"{self.config.model}: non-finite loss or gradients at {count(n, 'step')} "
            f"in a row (steps {first}-{at}); stopping. Lower --lr or raise --max-bad-steps; "
            + ("the last checkpoint is untouched" if saved else "no checkpoint was written")
        )

    def _sync_time(self) -> float:
        """``time.perf_counter()`` once the device has finished its queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _checked_forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """The first compiled forward and backward, checked against eager ones on the same
        batch (:mod:`.compile_check`); returns the loss whose gradients are in ``.grad``."""
        self._compile_check_pending = False

        def loss_of(forward: Any) -> Any:
            def run() -> Tensor:
                with self.autocast():
                    return forward(x, y)[1]

            return run

        dropout = getattr(self.model_config, "dropout", 0.0)
        if dropout:  # compiled and eager draw different masks: compare without dropout
            self.model.eval()
        t0 = self._sync_time()
        eager_run = loss_of(self.eager_forward_model)
        t_compiled = [0.0]

        def compiled_run() -> Tensor:
            t_compiled[0] = self._sync_time()
            return loss_of(self.forward_model)()

        checked = grad_parity(self.model, eager_run, compiled_run, self.amp_dtype or torch.float32)
        self.compile_s = self._sync_time() - t_compiled[0]
        if dropout:  # the step itself, with dropout, compiled
            self.model.train()
            for p in self.model.parameters():
                p.grad = None
            with self.autocast():
                loss = self.forward_model(x, y)[1]
            loss.backward()
            checked_loss = loss
        else:
            checked_loss = checked.compiled_loss
        parity = checked.parity
        name, err = parity.worst
        self.compile_check = {
            "policy": self.config.compile_check,
            "ok": parity.ok,
            "worst_param": name,
            "worst_error": err,
            "tolerance": parity.tolerance,
            "eager_s": round(t_compiled[0] - t0, 3),
        }
        if parity.ok:
            logger.info("compiled gradients equal eager ones (worst: %s, %.2g)", name, err)
            return checked_loss
        if self.config.compile_check == "error":
            for p in self.model.parameters():
                p.grad = None
            raise CompiledGradientMismatch(parity.message())
        warnings.warn(parity.message(fallback=True), RuntimeWarning, stacklevel=2)
        if self.eval_model is self.forward_model:
            self.eval_model = self.eager_forward_model
        self.forward_model = self.eager_forward_model
        checked.restore_eager_grads(self.model)
        return checked.eager_loss

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
            "warmup_s": self.warmup_s,
            "warmup_steps": self.warmup_steps,
            "compile_s": self.compile_s,
            "history": self.history,
            # the train-loss accumulator: an interruption between evaluations resumes exactly
            "loss_sum": self._loss_sum.detach().cpu(),
            "loss_count": int(self._loss_count),
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
        self.warmup_s = float(state.get("warmup_s", 0.0))  # absent before 0.3
        self.warmup_steps = int(state.get("warmup_steps", 0))
        self.compile_s = state.get("compile_s")
        self._timed_at_eval = self._timing_marks()
        self.history = list(state["history"])
        if "loss_sum" in state:  # absent from the first checkpoints of v0.1
            self._loss_sum = state["loss_sum"].to(self.device)
            self._loss_count = torch.tensor(float(state["loss_count"]), device=self.device)
            self.skipped_steps = int(state["skipped_steps"])
            self.bad_in_a_row = int(state["bad_in_a_row"])
            self._dev = torch.tensor(
                [self.bad_in_a_row, self.skipped_steps, -1], device=self.device
            )
        self._eval_pending = bool(state.get("eval_pending", False))
        set_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (collective under ``distributed``)."""
        self.read_host_state()  # the counters it saves; a diverged run saves nothing
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
                    warm = self._warmup_left > 0
                    t0 = self._sync_time() if warm else time.perf_counter()
                    self.train_step(*self.batch(self.step))
                    evaluating = self.step % c.eval_interval == 0 or self.step == c.steps
                    read = evaluating or self.step % HOST_READ_INTERVAL == 0 or self.step == end
                    if read:  # (device_skip) timed: the host waits here for the queued steps
                        self.read_host_state()
                    # no device sync for timing steady steps: the host waits for the device
                    # every step (its loss) or at every read (device_skip), so over many steps
                    # the mean time per step is right
                    if warm:  # compilation, the compile check, first-use costs
                        self._warmup_left -= 1
                        self.warmup_s += self._sync_time() - t0
                        self.warmup_steps += 1
                    else:
                        self.train_time_s += time.perf_counter() - t0
                        self.timed_steps += 1
                    if bar is not None:
                        bar.update(1)
                        if read:
                            bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
                    stop = self.parallel.stop_now(self._signals.received is not None, self._stop)
                    if evaluating:
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
        self.read_host_state()  # divergence first: no checkpoint of a diverged run
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
        mean = self._loss_sum / self._loss_count  # NaN when every step was skipped
        train_loss = float(self.parallel.mean(mean).item())
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = torch.zeros((), device=self.device)
        self.elapsed_s = time.perf_counter() - start
        row = {
            "step": self.step,
            "train_loss": _json_float(train_loss),
            "val_loss": _json_float(val_loss),
            "elapsed_s": round(self.elapsed_s, 3),
            **self._throughput(since=self._timed_at_eval),
        }
        self._timed_at_eval = self._timing_marks()
        self.history.append(row)
        if self._files is not None:
            self._files.append_metrics(row)
        if bar is not None:
            info = {"loss": f"{train_loss:.4f}", "val": f"{val_loss:.4f}"}
            info["ms/step"] = f"{row['ms_per_step']:.1f}"
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
        return {
            "model": c.model,
            "preset": c.preset,
            "data": self.data.name,
            "optim": c.optim,
            "lr": c.lr,
            "steps": self.step,
            "final_val_loss": last.get("val_loss"),
            "final_train_loss": last.get("train_loss"),
            **self._throughput(),
            "warmup_steps_untimed": self.warmup_steps,
            "warmup_s": round(self.warmup_s, 3),
            "compile_s": None if self.compile_s is None else round(self.compile_s, 3),
            "compile_check": self.compile_check,
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

    def _timing_marks(self) -> tuple[float, int, float, int]:
        return (self.train_time_s, self.timed_steps, self.warmup_s, self.warmup_steps)

    def _throughput(self, since: tuple[float, int, float, int] = (0.0, 0, 0.0, 0)) -> dict:
        """``ms_per_step``, tokens/s, achieved TFLOP/s and MFU over the steady training steps
        timed after ``since`` (:meth:`_timing_marks` then): the warm-up steps
        (``UNTIMED_WARMUP_STEPS``: compilation, the compile check) and evaluations are not
        counted. ``steady`` is False when there was no steady step, and the figures are then
        those of the warm-up steps (a run that short has nothing else to show)."""
        seconds, steps = self.train_time_s - since[0], self.timed_steps - since[1]
        steady = steps > 0
        if not steady:
            seconds, steps = self.warmup_s - since[2], self.warmup_steps - since[3]
        tokens = steps * self.config.batch_size * self.model_config.seq_len
        return {
            "ms_per_step": round(1000 * seconds / steps, 4) if steps else None,
            **throughput(tokens, seconds, self.flops_per_token, self.peak_flops),
            "steady": steady,
        }

    def close(self) -> None:
        """Leave the process group (under ``torchrun``); nothing to do in one process."""
        self.parallel.close()
