"""Checkpoint files: one file written atomically, or a sharded (DCP) directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .process import _barrier, _initialized, is_main_process

__all__ = [
    "CHECKPOINT_FILE",
    "EXTRA_FILE",
    "SHARDED_CHECKPOINT",
    "find_sharded",
    "fsync_dir",
    "full_state_dict",
    "load_sharded",
    "save_atomic",
    "save_sharded",
]

#: file in a sharded checkpoint directory that holds ``extra`` (written by rank 0)
EXTRA_FILE = "extra.pt"
#: a training run's checkpoint: one file, or (FSDP2) a DCP directory
CHECKPOINT_FILE = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint.dcp"


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """An ordinary ``state_dict`` of full (unsharded) CPU tensors, gathered on rank 0.

    Collective: every rank must call it. Rank 0 gets every tensor; the other ranks get an
    empty dict. Works for DDP, FSDP2 and plain modules (keys without DDP's ``module.``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories can't be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` via temp file + flush + fsync + ``os.replace`` + directory
    fsync: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one process reading or
    writing a sharded checkpoint is a supported use here (e.g. resharding onto 1 rank)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"torch\.distributed is .*uninitialized", category=UserWarning
        )
        yield


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def save_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a DCP checkpoint of ``model`` (and ``optimizer``) into the directory ``path``.

    Collective: every rank calls it with the same ``path`` on a shared file system. Each
    rank writes its own shards (``torch.distributed.checkpoint.save`` of
    ``get_state_dict(model, optimizer)``), rank 0 writes ``extra`` (a dict of plain Python
    values and tensors, e.g. step, scheduler and RNG states) to ``extra.pt``. Everything goes
    to ``<path>.tmp`` first; once all ranks are done rank 0 renames it to ``path``, so a
    process killed while writing leaves the previous checkpoint in place. Returns ``path``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    path = Path(path)
    tmp, old = _sidecar(path, ".tmp"), _sidecar(path, ".old")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that died
        tmp.mkdir(parents=True)
    _barrier()
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _initialized())
    if is_main_process():
        if extra is not None:
            with open(tmp / EXTRA_FILE, "wb") as f:
                torch.save(extra, f)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def find_sharded(path: str | os.PathLike[str]) -> Path | None:
    """The DCP directory to read for ``path``: ``path`` itself, else ``<path>.old`` (left when
    :func:`save_sharded` died between its two renames), else ``None``. The only place that
    knows this fallback."""
    path = Path(path)
    for found in (path, _sidecar(path, ".old")):
        if found.is_dir():
            return found
    return None


def _resolve_checkpoint(path: Path) -> Path:
    found = find_sharded(path)
    if found is None:
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    if not (found / ".metadata").is_file():
        raise ValueError(
            f"{found} is not a torch.distributed.checkpoint directory (no .metadata file)"
        )
    return found


@torch.no_grad()
def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the lazily built optimizer state with one step of zero gradients at ``lr = 0``,
    so that DCP has tensors (of the right shape and placement) to load into.

    The step renormalises sphere parameters (a change of an ulp at most): call it before the
    model's weights are loaded. Existing gradients are put back afterwards.
    """
    if optimizer.state:
        return
    saved: list[tuple[Tensor, Tensor | None]] = []
    lrs = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        lrs.append(lr)
        group["lr"] = torch.zeros_like(lr) if isinstance(lr, Tensor) else 0.0
        for p in group["params"]:
            if p.requires_grad:
                saved.append((p, p.grad))
                p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p, g in saved:
            p.grad = g


def load_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` into ``model`` (and ``optimizer``),
    in place; returns its ``extra`` dict (empty if none was saved).

    Collective. ``model`` must be wrapped as for training (any world size: DCP reshards) and
    ``optimizer`` built on it; its state is created first if the optimizer has not stepped
    yet. Sphere parameters keep their ``sphere_dim``. Raises ``FileNotFoundError`` /
    ``ValueError`` naming ``path`` when there is no checkpoint or it is not a DCP one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    found = _resolve_checkpoint(Path(path))
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        _init_optimizer_state(optimizer)
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=found, no_dist=not _initialized())
    except Exception as e:
        raise RuntimeError(f"cannot load the sharded checkpoint {found}: {e}") from e
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    extra_file = found / EXTRA_FILE
    return torch.load(extra_file, weights_only=True) if extra_file.is_file() else {}
