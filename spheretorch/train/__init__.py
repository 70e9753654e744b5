"""Training on text: data and tokenizers, the trainer, checkpoints, presets and ``compare``."""

from .checkpoints import load_checkpoint, save_atomic
from .compare import compare
from .data import TextData, eval_batches, get_batch, load_data
from .errors import TrainingDiverged, UserError
from .presets import PRESETS, Preset, get_preset
from .tokenizer import Tokenizer
from .trainer import CosineSchedule, TrainConfig, Trainer, build_optimizer, load_model

__all__ = [
    "PRESETS",
    "CosineSchedule",
    "Preset",
    "TextData",
    "Tokenizer",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "UserError",
    "build_optimizer",
    "compare",
    "eval_batches",
    "get_batch",
    "get_preset",
    "load_checkpoint",
    "load_data",
    "load_model",
    "save_atomic",
]
