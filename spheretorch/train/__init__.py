"""Training on text: data and tokenizers, the trainer, checkpoints, presets and ``compare``."""

from .checkpoints import load_checkpoint, load_model, save_atomic
from .compare import CompareConfig, compare
from .config import CosineSchedule, TrainConfig, build_optimizer, build_scheduler
from .data import TextData, eval_batches, get_batch, load_data
from .errors import TrainingDiverged, UserError
from .presets import PRESETS, Preset, get_preset
from .tokenizer import Tokenizer
from .trainer import Trainer

__all__ = [
    "PRESETS",
    "CompareConfig",
    "CosineSchedule",
    "Preset",
    "TextData",
    "Tokenizer",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "UserError",
    "build_optimizer",
    "build_scheduler",
    "compare",
    "eval_batches",
    "get_batch",
    "get_preset",
    "load_checkpoint",
    "load_data",
    "load_model",
    "save_atomic",
]
