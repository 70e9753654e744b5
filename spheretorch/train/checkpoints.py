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
from ..models import MODELS, LanguageModel, TransformerConfig, build_model, config_from_dict
from .errors import UserError
from .tokenizer import Tokenizer

__all__ = [
    "FORMAT",
    "check_checkpoint",
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


#: what every checkpoint holds (a single file also holds "model", and "optimizer" to resume)
_SAMPLE_KEYS = ("model_name", "model_config", "tokenizer")
_RESUME_KEYS = (
    *_SAMPLE_KEYS,
    *("train_config", "step", "scheduler", "rng", "history", "elapsed_s", "train_time_s"),
    "timed_steps",
)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(lines)[:300] or type(e).__name__


def check_checkpoint(
    ckpt: dict[str, Any], path: str | Path, *, resume: bool = False
) -> tuple[TransformerConfig, Tokenizer, int | None]:
    """Check that the checkpoint ``ckpt`` (read from ``path``) fits its own model before
    anything is built: every entry present, ``model_config`` a config of ``model_name``, the
    weights (in a single file) with the model's keys and shapes and finite values, the
    tokenizer no larger than the vocabulary (and equal to it unless the run set
    ``vocab_size``). ``resume``: also what a resumed run reads. A one-line ``UserError``
    names what does not fit (exit status 2).

    Returns the model's config, the tokenizer, and the number of token ids the tokenizer can
    decode when that is below the vocabulary (else ``None``): sampling keeps to those.
    """
    single = Path(path).name != EXTRA_FILE  # a sharded checkpoint keeps its tensors apart
    need = [*(_RESUME_KEYS if resume else _SAMPLE_KEYS)]
    need += ["model"] if single else []
    need += ["optimizer"] if single and resume else []
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise UserError(
            f"checkpoint {path} has no {', '.join(repr(k) for k in missing)} entry: it is "
            f"incomplete or was edited"
        )
    name = ckpt["model_name"]
    if name not in MODELS:
        raise UserError(
            f"checkpoint {path}: unknown model_name {name!r} (expected one of {', '.join(MODELS)})"
        )
    if resume:
        saved = ckpt["train_config"]
        if not isinstance(saved, dict) or saved.get("model") != name:
            model = saved.get("model") if isinstance(saved, dict) else saved
            raise UserError(
                f"checkpoint {path}: its train_config's model {model!r} does not match its "
                f"model_name {name!r}"
            )
    try:
        config = config_from_dict(name, ckpt["model_config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(
            f"checkpoint {path}: its model_config does not fit model {name!r}: {_first_line(e)}"
        ) from None
    try:
        tokenizer = Tokenizer.from_state_dict(ckpt["tokenizer"])
        n_tokens = tokenizer.vocab_size
    except Exception as e:  # any malformed entry: KeyError, TypeError, the backend's own
        raise UserError(
            f"checkpoint {path}: its tokenizer does not load: {_first_line(e)}"
        ) from None
    if n_tokens > config.vocab_size:
        raise UserError(
            f"checkpoint {path}: its tokenizer has {n_tokens} tokens, more than the model's "
            f"vocabulary of {config.vocab_size}"
        )
    if n_tokens < config.vocab_size and _vocab_set_by_run(ckpt) != config.vocab_size:
        raise UserError(
            f"checkpoint {path}: its tokenizer has {n_tokens} tokens but the model's vocabulary "
            f"is {config.vocab_size} (the run set no vocab_size): the tokenizer is not the "
            f"model's"
        )
    if single:
        _check_weights(ckpt["model"], name, config, path)
    limit = n_tokens if n_tokens < config.vocab_size else None
    return config, tokenizer, limit


def _vocab_set_by_run(ckpt: dict[str, Any]) -> int | None:
    """The ``vocab_size`` the run's model options (``--set``) or preset set, if any."""
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict):
        return None
    options = saved.get("model_options") or {}
    if "vocab_size" in options:
        return options["vocab_size"]
    from .presets import PRESETS

    preset = PRESETS.get(saved.get("preset"))
    return None if preset is None else preset.model_options.get("vocab_size")


def _check_weights(state: Any, name: str, config: TransformerConfig, path: str | Path) -> None:
    """The model's keys and shapes (from a build on the meta device: no memory), finite."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    with torch.device("meta"):
        expected = build_model(name, config).state_dict()
    shown = f"its model ({name}, n_layer={config.n_layer}, d_model={config.d_model})"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for what, keys in (("lack", missing), ("hold an unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise UserError(
                f"checkpoint {path} does not fit {shown}: the weights {what} {keys[0]!r}{more}"
            )
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise UserError(
                f"checkpoint {path} does not fit {shown}: {key!r} has shape {tuple(got.shape)}, "
                f"the model's is {tuple(want.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise UserError(f"checkpoint {path}: the weight {key!r} holds NaN or inf values")


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
        config, tokenizer, limit = check_checkpoint(ckpt, path)
        model = build_model(ckpt["model_name"], config)
        model.load_state_dict(ckpt["model"])
    else:
        from ..distributed import load_sharded

        ckpt = load_checkpoint(path / EXTRA_FILE, map_location="cpu")
        config, tokenizer, limit = check_checkpoint(ckpt, path / EXTRA_FILE)
        model = build_model(ckpt["model_name"], config)
        try:
            load_sharded(path, model)
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            raise UserError(_first_line(e)) from None
        bad = [n for n, p in model.state_dict().items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(f"checkpoint {path}: the weight {bad[0]!r} holds NaN or inf values")
    ckpt["vocab_limit"] = limit  # the ids the tokenizer can decode, when below the vocabulary
    from .config import resolve_device

    return model.to(resolve_device(device)), tokenizer, ckpt
