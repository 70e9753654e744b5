"""Named training presets: model size, batch, steps, evaluation, learning rates, LR sweep."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "get_preset"]

#: the preset of ``train`` and ``compare`` (command line and Python) when none is named
DEFAULT_PRESET = "cpu-small"


@dataclass(frozen=True)
class Preset:
    """A complete recipe for ``train`` and ``compare``.

    ``lr`` holds each model's default learning rate (what ``train`` uses without ``--lr``);
    ``compare`` instead sweeps ``sweep_lrs`` for every model, each candidate trained for
    ``sweep_fraction * steps`` steps (same budget per model), then runs the best for ``steps``.
    ``warmup_fraction`` applies to the AdamW recipe (GPT, GeoNorm); nGPT uses no warmup.
    ``threads``: CPU threads the command line uses by default (``None``: torch's default); tiny
    models run fastest on one thread and do not collapse when other processes share the cores.
    ``corpus``: the ``spheretorch prepare`` command of the prepared corpus the preset is made
    for; such a preset refuses a text file or the built-in text (:meth:`check_data`).
    """

    name: str
    description: str
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    batch_size: int
    steps: int
    eval_interval: int
    eval_batches: int
    lr: dict[str, float]
    sweep_lrs: tuple[float, ...]
    sweep_fraction: float
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    timing_rounds: int = 3
    timing_steps: int = 10
    threads: int | None = None
    corpus: str = ""
    model_options: dict[str, Any] = field(default_factory=dict)

    def check_data(self, data: str | Path | None) -> None:
        """A preset made for a prepared corpus needs ``--data DIR`` naming one."""
        if self.corpus and (data is None or not Path(data).is_dir()):
            given = "the built-in text" if data is None else f"the text file {data}"
            raise UserError(
                f"preset {self.name} trains on a prepared corpus, not {given}: make one with "
                f"`{self.corpus}` and pass --data DIR (see docs/data.md)"
            )

    def model_config_kwargs(self) -> dict[str, Any]:
        return {
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "d_model": self.d_model,
            "seq_len": self.seq_len,
            **self.model_options,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CPU_SMALL = Preset(
    name="cpu-small",
    description="char-level tinyshakespeare, 4 layers, d=128, context 128 (CPU)",
    n_layer=4,
    n_head=4,
    d_model=128,
    seq_len=128,
    batch_size=16,
    steps=800,
    eval_interval=40,
    eval_batches=8,
    lr={"gpt": 4e-3, "ngpt": 8e-3, "geonorm": 4e-3},
    sweep_lrs=(2e-3, 4e-3, 8e-3, 1.6e-2),
    sweep_fraction=0.25,
    timing_rounds=5,
    timing_steps=10,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smoke",
            description="a few seconds per model: CI and tests",
            n_layer=2,
            n_head=2,
            d_model=64,
            seq_len=32,
            batch_size=8,
            steps=60,
            eval_interval=20,
            eval_batches=2,
            lr={"gpt": 1e-2, "ngpt": 1e-2, "geonorm": 1e-2},
            sweep_lrs=(3e-3, 1e-2),
            sweep_fraction=0.5,
            timing_rounds=2,
            timing_steps=3,
            threads=1,
        ),
        _CPU_SMALL,
        dataclasses.replace(
            _CPU_SMALL,
            name="cpu-bpe",
            description="cpu-small on tinyshakespeare as a prepared 1024-token BPE",
            corpus="spheretorch prepare tinyshakespeare --tokenizer bpe --vocab-size 1024 "
            "--out data/shakespeare-bpe",
        ),
        Preset(
            name="gpu-quick",
            description="8 layers, d=512, context 1024, byte-level corpus: a GPU study in "
            "minutes (benchmarks/gpu_study.py)",
            n_layer=8,
            n_head=8,
            d_model=512,
            seq_len=1024,
            batch_size=16,
            steps=600,
            eval_interval=50,
            eval_batches=8,
            lr={"gpt": 1e-3, "ngpt": 4e-3, "geonorm": 2e-3},
            sweep_lrs=(1e-3, 2e-3, 4e-3),
            sweep_fraction=0.2,
            warmup_fraction=0.05,
            timing_rounds=3,
            timing_steps=10,
            corpus="python benchmarks/gpu_study.py (a byte-level corpus of the installed "
            "packages' Python sources)",
        ),
        Preset(
            name="gpu-medium",
            description="12 layers, d=768, context 1024, GPT-2 BPE corpus: for a GPU",
            n_layer=12,
            n_head=12,
            d_model=768,
            seq_len=1024,
            batch_size=32,
            steps=5000,
            eval_interval=250,
            eval_batches=16,
            lr={"gpt": 1e-3, "ngpt": 3e-3, "geonorm": 1e-3},
            sweep_lrs=(1e-3, 3e-3),
            sweep_fraction=0.1,
            warmup_fraction=0.04,
            corpus="spheretorch prepare owt.jsonl --tokenizer gpt2 --val-fraction 0.005 "
            "--out data/owt-gpt2",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
