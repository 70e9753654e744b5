"""Checkpoint files: written atomically, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values (no pickled classes), holding the
model, optimizer and scheduler states, every RNG state, the data position, the configs and the
tokenizer. :func:`save_atomic` (from :mod:`spheretorch.distributed`, where every checkpoint
write lives) replaces the file atomically, so a crash mid-write leaves the previous one intact.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import CHECKPOINT_FILE, EXTRA_FILE, SHARDED_CHECKPOINT, find_sharded, save_atomic
from ..models import LanguageModel, build_model, config_from_dict
from .errors import UserError
from .tokenizer import Tokenizer

__all__ = [
    "FORMAT",
    "get_rng_state",
    "load_checkpoint",
    "load_model",
    "save_atomic",
    "set_rng_state",
]

FORMAT = "spheretorch-checkpoint-v1"


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


def load_model(
    path: str | Path, device: str = "cpu"
) -> tuple[LanguageModel, Tokenizer, dict[str, Any]]:
    """Rebuild the model and tokenizer saved by the trainer (for sampling) from a run
    directory, its ``checkpoint.pt``, or the ``checkpoint.dcp`` directory of an FSDP2 run
    (read by one process: ``torch.distributed.checkpoint`` reassembles the shards)."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_FILE).is_file():
        path = path / CHECKPOINT_FILE  # a run directory
    elif path.is_dir() and not (path / EXTRA_FILE).is_file():
        found = find_sharded(path / SHARDED_CHECKPOINT)  # a run directory of an FSDP2 run
        if found is None:
            raise UserError(
                f"no checkpoint in {path}: expected {CHECKPOINT_FILE} or {SHARDED_CHECKPOINT}"
            )
        path = found
    if not path.is_dir():
        ckpt = load_checkpoint(path, map_location="cpu")
        model = build_model(
            ckpt["model_name"], config_from_dict(ckpt["model_name"], ckpt["model_config"])
        )
        model.load_state_dict(ckpt["model"])
    else:
        from ..distributed import load_sharded

        ckpt = load_checkpoint(path / EXTRA_FILE, map_location="cpu")
        model = build_model(
            ckpt["model_name"], config_from_dict(ckpt["model_name"], ckpt["model_config"])
        )
        try:
            load_sharded(path, model)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise UserError(str(e).splitlines()[0]) from None
    from .config import resolve_device

    return model.to(resolve_device(device)), Tokenizer.from_state_dict(ckpt["tokenizer"]), ckpt
