"""What to train: :class:`TrainConfig`, the optimizer recipes and the LR schedule.

Recipes (the nGPT paper's, Adam betas (0.9, 0.95), gradient clipping at 1.0, cosine to 0):
GPT and GeoNorm use AdamW (torch's fused kernel), weight decay 0.1 on matrices, linear warmup;
nGPT uses :class:`spheretorch.optim.RenormAdam` (Adam, then every sphere matrix renormalized),
no weight decay, no warmup. ``optim`` swaps the optimizer for any model: ``renorm``,
``riemannian`` (:class:`spheretorch.optim.RiemannianAdam`) or ``adamw`` (sphere parameters then
drift off the sphere, an ablation), and beyond Adam: ``muon`` (torch.optim.Muon's step on
hidden matrices, sphere parameters then renormalized: :class:`spheretorch.optim.SphereMuon`
with ``ordering="renorm"``), ``sphere_muon`` (:class:`spheretorch.optim.SphereMuon`: sphere
parameters turn by an angle along their orthogonalized tangent momentum) and ``adamh``
(:class:`spheretorch.optim.AdamH`: hyperball Adam on sphere parameters). In the Muon recipes
Euclidean embeddings, head and vectors get AdamW at ``lr`` and Muon's LR is
:data:`MUON_LR_SCALE` times ``lr``; on GPT (no sphere parameters) ``adamh`` is AdamW and both
Muon recipes are Muon + AdamW.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import MODELS, LanguageModel, TransformerConfig, make_config
from .compile_check import COMPILE_CHECKS
from .errors import UserError
from .presets import DEFAULT_PRESET, get_preset
from .text import count

__all__ = [
    "OPTIMIZERS",
    "CosineSchedule",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "resolve_device",
]

OPTIMIZERS = ("renorm", "riemannian", "adamw", "muon", "sphere_muon", "adamh")

#: ``muon``/``sphere_muon``: Muon's LR (the sphere step's angle) is this times ``lr``; the
#: parameters Muon users leave to AdamW (embeddings, head, vectors) keep ``lr`` itself, the
#: presets' Adam LR (4e-3 -> Muon 0.02, Keller Jordan's default)
MUON_LR_SCALE = 5.0
#: parameters that Muon recipes give to AdamW when Euclidean (Muon is for hidden matrices)
_MUON_EXCLUDED = ("tok_emb.", "lm_head.")


#: what ``resume`` may change; every other field given must equal the checkpoint's
RESUME_OVERRIDES = (
    "steps",
    "device",
    "compile",
    "compile_check",
    "max_bad_steps",
    "check_memory",
    "stretch_schedule",
)
logger = logging.getLogger(__name__)
_SEEDS = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


def flag_of(name: str) -> str:
    """The command-line flag that sets the field ``name``."""
    special = {"model_options": "--set", "check_memory": "--no-memory-check"}
    return special.get(name, "--" + name.replace("_", "-"))


def _absolute(data: str | None) -> str | None:
    """A data path made absolute (so that a checkpoint resumes from any directory); the
    built-in text's name stays as it is."""
    if data is None or not Path(data).exists():
        return data
    return str(Path(data).resolve())


@dataclass
class TrainConfig:
    """What to train. ``None`` fields are filled from the preset, the model's recipe and the
    defaults below by :meth:`resolve` (``None`` means "not given": on resume, every field
    given must agree with the checkpoint, see :meth:`resumed`)."""

    model: str = "gpt"
    preset: str | None = None  # DEFAULT_PRESET
    data: str | None = None  # the built-in tinyshakespeare
    tokenizer: str | None = None  # char for a text file; a prepared corpus has its own
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optim: str | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float | None = None  # 0
    betas: tuple[float, float] | None = None
    grad_clip: float | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None
    seed: int | None = None  # 0
    device: str | None = None  # auto
    dtype: str | None = None  # auto
    compile: bool | None = None  # False
    # with compile: compiled vs eager gradients on the first batch (train.compile_check)
    compile_check: str | None = None  # error
    max_bad_steps: int | None = None  # 5
    check_memory: bool | None = None  # True: refuse a run that cannot fit in memory
    param_dtype: str | None = None  # float32: fp32 master weights; bfloat16: bf16 weights
    stretch_schedule: bool | None = None  # False: a resume may not change steps (see resumed)
    model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        aliases = {"bf16": "bfloat16", "fp32": "float32"}
        self.dtype = aliases.get(self.dtype, self.dtype) if self.dtype else self.dtype
        if self.param_dtype:
            self.param_dtype = aliases.get(self.param_dtype, self.param_dtype)

    def resolve(self) -> TrainConfig:
        """A copy with every field concrete and validated (``UserError`` on bad values)."""
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        c = dataclasses.replace(self, model_options=dict(self.model_options))
        # tokenizer stays None unless given: char for a text file, a corpus's own otherwise
        defaults = dict(preset=DEFAULT_PRESET, min_lr_ratio=0.0, seed=0, param_dtype="float32")
        defaults.update(stretch_schedule=False)
        defaults.update(device="auto", dtype="auto", compile=False, max_bad_steps=5)
        defaults.update(compile_check="error")
        for name, value in {**defaults, "check_memory": True}.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        p = get_preset(c.preset)
        ngpt = c.model == "ngpt"
        c.steps = p.steps if c.steps is None else c.steps
        c.batch_size = p.batch_size if c.batch_size is None else c.batch_size
        c.lr = p.lr[c.model] if c.lr is None else c.lr
        c.optim = ("renorm" if ngpt else "adamw") if c.optim is None else c.optim
        c.weight_decay = (
            (0.0 if ngpt else p.weight_decay) if c.weight_decay is None else c.weight_decay
        )
        if c.warmup_steps is None:
            c.warmup_steps = 0 if ngpt else round(p.warmup_fraction * c.steps)
        c.betas = tuple(p.betas if c.betas is None else c.betas)
        c.grad_clip = p.grad_clip if c.grad_clip is None else c.grad_clip
        c.eval_interval = p.eval_interval if c.eval_interval is None else c.eval_interval
        c.eval_batches = p.eval_batches if c.eval_batches is None else c.eval_batches
        c._validate()
        if c.warmup_steps >= c.steps:
            c.warmup_steps = max(c.steps - 1, 0)
        return c

    def _validate(self) -> None:
        c = self
        for name in ("steps", "batch_size", "eval_interval", "eval_batches", "max_bad_steps"):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {value}")
        if not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
            raise UserError(f"lr must be a positive number, got {c.lr}")
        if c.optim not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {c.optim!r}; choose from {', '.join(OPTIMIZERS)}")
        # non-finite values would only show up later as a "diverged" run with a wrong hint
        for name in ("weight_decay", "grad_clip", "min_lr_ratio", "warmup_steps"):
            value = getattr(c, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(
                    f"{name.replace('_', '-')} must be a finite number >= 0, got {value}"
                )
        if c.min_lr_ratio > 1:
            raise UserError(f"min-lr-ratio must be in [0, 1], got {c.min_lr_ratio}")
        if len(c.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in c.betas
        ):
            raise UserError(f"betas must be two numbers in [0, 1), got {c.betas}")
        for key, value in c.model_options.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--set {key}={value}: model options must be finite")
        if (
            isinstance(c.seed, bool)
            or not isinstance(c.seed, int)
            or not (_SEEDS[0] <= c.seed <= _SEEDS[1])
        ):
            raise UserError(f"seed must be an integer in [-2**63, 2**64 - 1], got {c.seed}")
        if c.compile_check not in COMPILE_CHECKS:
            raise UserError(
                f"unknown compile-check {c.compile_check!r}; choose {', '.join(COMPILE_CHECKS)}"
            )
        if c.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"unknown dtype {c.dtype!r}; choose auto, float32 or bfloat16")
        if c.param_dtype not in ("float32", "bfloat16"):
            raise UserError(f"unknown param-dtype {c.param_dtype!r}; choose float32 or bfloat16")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint; ``data`` as an absolute path."""
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"]) if d["betas"] is not None else None
        d["data"] = _absolute(d["data"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def resumed(self, saved: dict[str, Any], step: int) -> TrainConfig:
        """The configuration ``saved`` in a checkpoint at ``step``, for this one's resume.

        The model must match; of the other fields given (not ``None``), only
        ``RESUME_OVERRIDES`` may differ (``steps`` may only grow: it extends the run); any
        other difference is a ``UserError`` naming the flag.
        """
        c = TrainConfig.from_dict(saved)
        if self.model != c.model:
            raise UserError(f"--model {self.model} does not match the checkpoint's model {c.model}")
        if self.steps is not None and self.steps != c.steps and self.steps < step:
            raise UserError(f"--steps {self.steps} is below the checkpoint's step {step}")
        if self.steps is not None and self.steps != c.steps:
            # the cosine schedule is a function of the total: a new total moves the LR at the
            # checkpoint's step (e.g. from ~0 back up to half the peak)
            if not self.stretch_schedule:
                raise UserError(
                    f"--steps {self.steps} differs from the checkpoint's {c.steps}: it would "
                    f"stretch the cosine LR schedule (the LR at step {step} jumps from "
                    f"{CosineSchedule(1.0, c.steps, c.warmup_steps or 0)(step):.3g} to "
                    f"{CosineSchedule(1.0, self.steps, c.warmup_steps or 0)(step):.3g} of the "
                    "peak); pass --stretch-schedule to do so anyway"
                )
            logger.warning(
                "resume: the cosine schedule is stretched from %d to %d steps (the LR at step "
                "%d changes)",
                c.steps,
                self.steps,
                step,
            )
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(c, f.name)
            if f.name in RESUME_OVERRIDES:
                setattr(c, f.name, theirs if mine is None else mine)
                continue
            if f.name == "data":
                mine, theirs = _absolute(mine), _absolute(theirs)
            if f.name == "model_options":
                mine = {k: v for k, v in mine.items() if theirs.get(k) != v}
                theirs = {k: theirs.get(k) for k in mine}
            if mine is not None and mine != {} and _plain(mine) != _plain(theirs):
                allowed = ", ".join(flag_of(n) for n in RESUME_OVERRIDES)
                raise UserError(
                    f"{flag_of(f.name)} {_show(mine)} conflicts with the checkpoint's "
                    f"{_show(theirs)}: a resumed run keeps its configuration (it may change "
                    f"only {allowed}); start a new run with --force or another --out"
                )
        return c

    def model_config(self, vocab_size: int) -> TransformerConfig:
        """The model's config for a corpus of ``vocab_size`` tokens: the preset's sizes, then
        ``model_options`` (which may set any field, ``vocab_size`` included: a larger one pads
        the embedding, a smaller one is refused by ``TextData.check_vocab``)."""
        kwargs = {**get_preset(self.preset).model_config_kwargs(), "vocab_size": vocab_size}
        kwargs.update(self.model_options)
        try:
            return make_config(self.model, **kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"bad model options: {e}") from None


class CosineSchedule:
    r"""Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_ratio * lr`` at
    ``total``: the ``lr_lambda`` of a :class:`torch.optim.lr_scheduler.LambdaLR`.

    ``schedule(s)`` is the factor on the peak LR for the update that takes step ``s`` to
    ``s + 1``: :math:`(s+1)/w` during warmup, then
    :math:`m + (1-m)\tfrac12(1+\cos\pi p)` with :math:`p = (s-w)/(T-w)` clipped to 1;
    ``lr_at(s) = lr * schedule(s)``. Being a callable object (not a function), its fields are
    saved in the scheduler's ``state_dict`` and so in the checkpoint.
    """

    def __init__(self, lr: float, total: int, warmup: int = 0, min_ratio: float = 0.0) -> None:
        self.lr, self.total, self.warmup, self.min_ratio = lr, total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        return self.lr * self(step)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.total = state["lr"], state["total"]
        self.warmup, self.min_ratio = state["warmup"], state["min_ratio"]


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's LR schedule over ``optimizer`` (whose groups start at the peak ``config.lr``)."""
    c = config
    schedule = CosineSchedule(c.lr, c.steps, c.warmup_steps, c.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={'(unset)' if v is None else v}" for k, v in value.items())
    return "(unset)" if value is None else str(_plain(value))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # e.g. meta: no storage
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        exist = "exists" if n == 1 else "exist"
        raise UserError(f"device {name} requested but only {count(n, 'GPU')} {exist}")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UserError("device mps requested but MPS is not available")
    return device


def _muon_groups(model: LanguageModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Muon recipes' groups: hidden matrices and sphere parameters (Muon, LR from the
    optimizer's default), Euclidean embeddings/head (AdamW, decayed) and vectors (AdamW)."""
    from ..parameter import sphere_dim_of

    muon, decay, other = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if sphere_dim_of(p) is not None or (p.dim() == 2 and not name.startswith(_MUON_EXCLUDED)):
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else other).append(p)
    groups = [
        {"params": muon, "weight_decay": 0.0},
        {"params": decay, "use_muon": False, "lr": lr, "adamw_weight_decay": weight_decay},
        {"params": other, "use_muon": False, "lr": lr, "adamw_weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: LanguageModel,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.Optimizer:
    """The optimizer for ``--optim name`` over ``model.param_groups(weight_decay)``."""
    from torch.distributed.tensor import DTensor

    groups = model.param_groups(weight_decay)
    if name == "adamw":
        # torch's fused kernel where it has one (CPU, CUDA): RenormAdam uses it too.
        # (not on FSDP2's DTensor parameters, which the fused kernel does not accept).
        fused = (
            all(p.device.type in ("cpu", "cuda") for p in model.parameters())
            and not any(isinstance(p, DTensor) for p in model.parameters())
        ) or None
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)
    from .. import optim as sphere_optim

    # The trainer owns the non-finite policy (one check, one host sync per step): the
    # optimizers must not check again.
    kw: dict[str, Any] = dict(lr=lr, betas=betas, eps=1e-8, decoupled_weight_decay=True)
    # On CUDA the fused kernels take the trainer's device-side skip decision (found_inf) as
    # an input; other paths would snapshot and restore every tensor they write each step.
    params = list(model.parameters())
    on_cuda = all(p.device.type == "cuda" and not isinstance(p, DTensor) for p in params)
    if on_cuda:
        kw["fused"] = True
    if name == "renorm":
        return sphere_optim.RenormAdam(groups, nonfinite="ignore", **kw)
    if name == "riemannian":
        return sphere_optim.RiemannianAdam(groups, nonfinite="ignore", **kw)
    # The Muon family has no fused kernel: capturable=True takes the device-side skip
    # without a host read (the step undone on the device where found_inf is set).
    capturable = on_cuda
    if name == "adamh":
        return sphere_optim.AdamH(
            groups, lr=lr, betas=betas, eps=1e-8, nonfinite="ignore", capturable=capturable
        )
    if name in ("muon", "sphere_muon"):
        return sphere_optim.SphereMuon(
            _muon_groups(model, lr, weight_decay),
            lr=lr * MUON_LR_SCALE,
            ordering="renorm" if name == "muon" else "riemannian",
            adamw_betas=betas,
            nonfinite="ignore",
            capturable=capturable,
        )
    raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
