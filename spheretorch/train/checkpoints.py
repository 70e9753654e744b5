"""Checkpoint files: written atomically, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values (no pickled classes), holding the
model, optimizer and scheduler states, every RNG state, the data position, the configs and the
tokenizer. :func:`save_atomic` writes a temporary file in the destination's directory, flushes
and fsyncs it, then ``os.replace``-s it over the old file, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

__all__ = ["FORMAT", "get_rng_state", "load_checkpoint", "save_atomic", "set_rng_state"]

FORMAT = "spheretorch-checkpoint-v1"


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` via temp file + flush + fsync + ``os.replace`` (+ dir fsync)."""
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
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the trainer; a one-line ``UserError`` for a missing,
    truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    # torch.save writes a zip archive whose directory sits at the end: a file cut short (or
    # any other kind of file) has none, and is named as such rather than by torch's message.
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"cannot read checkpoint {path}: not a complete PyTorch file (truncated, or another "
            f"kind of file)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses pickled classes, which trainer checkpoints never hold
        raise UserError(f"{path} is not a spheretorch training checkpoint") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: {reason[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a spheretorch training checkpoint")
    return ckpt


def get_rng_state() -> dict[str, Any]:
    """Every RNG the training loop may touch, as tensors and plain Python values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
