"""The data-parallel side of a training loop, in one object the loop asks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINT_FILE,
    EXTRA_FILE,
    SHARDED_CHECKPOINT,
    find_sharded,
    load_sharded,
    save_atomic,
    save_sharded,
)
from .process import (
    MODES,
    DistributedContext,
    _barrier,
    all_reduce_mean,
    cleanup,
    init_from_env,
    shard_rows,
    wrap,
)

__all__ = ["Parallel"]


class Parallel:
    """The data-parallel side of a training loop, in one object the loop asks: its rank and
    share of each batch, the wrapped model, agreement across ranks, and where and how
    checkpoints are written (one file from rank 0, or a sharded DCP directory under FSDP2).

    ``Parallel(mode)`` checks the mode, ``check_launch()`` that a ``ddp``/``fsdp`` process
    was started by ``torchrun``, :meth:`start` that the batch splits evenly (``ValueError``
    each, before any process group exists) and then joins the process group; ``close()``
    leaves it. With ``mode="none"`` every answer is the one-process one.
    """

    def __init__(self, mode: str = "none") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown distributed mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode = mode
        self.ctx = DistributedContext(0, 1, 0, torch.device("cpu"), None)

    def check_launch(self) -> None:
        if self.mode != "none" and "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"--distributed {self.mode} needs a process started by torchrun (WORLD_SIZE is "
                f"not set); e.g. torchrun --nproc-per-node 2 -m spheretorch train"
            )

    def start(self, device: torch.device, batch_size: int) -> None:
        """Join the process group on ``device`` (the rank's own GPU under CUDA)."""
        self.check_launch()
        if self.mode == "none":
            self.ctx = DistributedContext(0, 1, 0, device, None)
            return
        shard_rows(batch_size, 0, int(os.environ["WORLD_SIZE"]))
        self.ctx = init_from_env(device)

    def close(self) -> None:
        if self.mode != "none":
            cleanup()

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes metrics and single-file checkpoints."""
        return self.ctx.is_main

    def __str__(self) -> str:
        return "1 process" if self.mode == "none" else f"{self.world_size} ranks ({self.mode})"

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``(train_module, eval_module)``: train through DDP's wrapper or through ``model``
        sharded in place; evaluate through ``model`` itself (DDP's gradient synchronisation
        is not needed there; FSDP2's all-gathers are, and live in ``model``)."""
        wrapped = wrap(model, self.mode, self.ctx)
        return wrapped, model

    def all_true(self, flags: Tensor) -> Tensor:
        """``flags`` (a 1-d tensor of 0/1) and-ed element-wise over ranks, on the device: no
        host sync, so it can ride along with the step's one read."""
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags

    def stop_now(self, local: bool, agreed: bool) -> bool:
        """Whether to stop for a signal: ``agreed`` (some rank had one at the last
        :meth:`all_true`), or, alone, this process's ``local`` flag, which is current."""
        return agreed or (local and self.world_size == 1)

    def mean(self, value: Tensor) -> Tensor:
        return all_reduce_mean(value)

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_path(self, out_dir: Path) -> Path:
        return out_dir / (SHARDED_CHECKPOINT if self.mode == "fsdp" else CHECKPOINT_FILE)

    def resume_file(self, out_dir: Path) -> Path | None:
        """The file holding a run's resume state (``checkpoint.pt``, or the ``extra.pt`` of
        ``checkpoint.dcp`` or of its ``.old``), or ``None`` when there is nothing to resume.
        One process also resumes an FSDP2 run's sharded checkpoint (DCP reshards it)."""
        sharded = find_sharded(out_dir / SHARDED_CHECKPOINT)
        if self.mode == "fsdp":
            return None if sharded is None else sharded / EXTRA_FILE
        path = out_dir / CHECKPOINT_FILE
        if path.is_file():
            return path
        return sharded / EXTRA_FILE if sharded is not None and self.mode == "none" else None

    def missing_checkpoint(self, out_dir: Path) -> str:
        """Why :meth:`resume_file` found nothing, and the command that would resume."""
        if self.mode == "fsdp" and (out_dir / CHECKPOINT_FILE).is_file():
            return (
                f"{out_dir / CHECKPOINT_FILE} is a single-file checkpoint (a one-process or ddp "
                f"run), which --distributed fsdp cannot resume: resume it in one process or "
                f"with --distributed ddp"
            )
        if self.mode == "ddp" and find_sharded(out_dir / SHARDED_CHECKPOINT) is not None:
            return (
                f"{out_dir / SHARDED_CHECKPOINT} is an FSDP2 (sharded) checkpoint: resume it "
                f"with --distributed fsdp, or in one process (without torchrun)"
            )
        path = self.checkpoint_path(out_dir)
        return f"checkpoint not found, nothing to resume: {path} does not exist"

    @staticmethod
    def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> dict:
        """What a single-file checkpoint holds: ``extra`` plus model and optimizer states."""
        return {**extra, "model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def remove_partial_writes(self, out_dir: Path) -> None:
        """Delete what a killed checkpoint write left behind (:func:`save_atomic`'s temp
        files; :func:`save_sharded` clears its own ``.tmp`` directory)."""
        for stale in out_dir.glob(f".{CHECKPOINT_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)

    def save(
        self, out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        """Write the checkpoint atomically. Collective: every rank calls it."""
        path = self.checkpoint_path(out_dir)
        if self.mode == "fsdp":
            save_sharded(path, model, optimizer, extra=extra)
            return
        if self.is_main:
            save_atomic(self.full_state(model, optimizer, extra), path)
            # an FSDP2 run continued in one process: its shards are now older than the file
            for stale in (SHARDED_CHECKPOINT, SHARDED_CHECKPOINT + ".old"):
                shutil.rmtree(out_dir / stale, ignore_errors=True)
        _barrier()  # nobody runs ahead (or exits) before the checkpoint is on disk

    def load(
        self, out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        """Load model and optimizer tensors: from ``state`` (read from :meth:`resume_file`),
        or under FSDP2 from the shards beside it."""
        try:
            if self.mode == "fsdp" or "model" not in state:  # the latter: an FSDP2 run's
                load_sharded(out_dir / SHARDED_CHECKPOINT, model, optimizer)
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # torch's message spans lines
            lines = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ValueError(
                f"the checkpoint in {out_dir} does not fit this run's model and optimizer: "
                f"{lines[:300]}"
            ) from None
