"""Parsing what a ``compare`` study asks for: models, optimizer recipes, LRs, budgets, a grid.

Each parser takes the command line's text (or an already split list, from Python) and returns
typed values, raising :class:`~spheretorch.train.errors.UserError` with one line naming the
flag and the expected form on bad input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_SWEEP_BOUNDS",
    "ModelSpec",
    "grid_fields",
    "grid_points",
    "model_fields",
    "parse_budgets",
    "parse_grid",
    "parse_lr_bounds",
    "parse_lrs",
    "parse_models",
    "parse_optims",
    "point_name",
]


#: the models ``compare`` compares when none are named
DEFAULT_MODELS = "gpt,ngpt,geonorm"
#: how far an LR sweep may be extended beyond its candidates (``--sweep-bounds``)
DEFAULT_SWEEP_BOUNDS = (1e-5, 0.5)


@dataclass(frozen=True)
class ModelSpec:
    """A compared model: ``label`` (its name in tables and directories), the model family,
    model options on top of the preset's (e.g. ``gpt`` with ``norm_position="post"``) and the
    optimizer recipe (``None``: the family's own, see ``spheretorch.train.config``)."""

    label: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    optim: str | None = None

    @property
    def is_default_gpt(self) -> bool:
        """Whether this is GPT with its own recipe and no options (the natural baseline)."""
        return self.model == "gpt" and not self.options and self.optim in (None, "adamw")


def _split(spec: str | Sequence[Any] | None) -> list[Any]:
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [s.strip() if isinstance(s, str) else s for s in items if s != "" and s is not None]


def _coerce(field_name: str, raw: str, kind: tuple[type, bool], flag: str = "--grid") -> Any:
    """``raw`` as the field's type ``kind = (type, accepts None)``; ``none`` for ``None``."""
    typ, nullable = kind
    text = raw.strip()
    try:
        if nullable and text.lower() in ("none", "null"):
            return None
        if typ is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        return typ(text)
    except ValueError:
        raise UserError(
            f"{flag} {field_name}: {raw!r} is not a valid {typ.__name__} value"
        ) from None


def model_fields(model: str | None = None) -> dict[str, tuple[type, bool]]:
    """``{field: (type, accepts None)}`` of a model's config (every model's with ``None``);
    ``vocab_size`` defaults to the data's, and a larger one may be set (padding)."""
    from .. import models as m

    names = [model] if model is not None else list(m.MODELS)
    out: dict[str, tuple[type, bool]] = {}
    for name in names:
        cls = getattr(m.MODELS[name], "config_class", m.TransformerConfig)
        for f in dataclasses.fields(cls):
            if f.name in out:
                continue
            t = str(f.type)
            typ: type = str
            for prefix, kind in (("int", int), ("float", float), ("bool", bool)):
                if t.startswith(prefix):
                    typ = kind
            out[f.name] = (typ, "None" in t)
    return out


def _check_optim(name: str, flag: str) -> str:
    from .config import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise UserError(f"{flag}: unknown optimizer recipe {name!r}; choose from "
                        f"{', '.join(OPTIMIZERS)}")  # fmt: skip
    return name


def parse_models(spec: str | Sequence[str]) -> list[ModelSpec]:
    """``"gpt,ngpt,post=gpt:norm_position=post,gpt:optim=renorm"``: comma-separated
    ``[LABEL=]MODEL[:KEY=V...]`` (KEY a field of the model's config, or ``optim`` naming a
    recipe of ``spheretorch.train.config.OPTIMIZERS``; the label defaults to the whole
    item). A repeated label keeps its first definition."""
    from ..models import MODELS

    items = _split(spec)
    if not items:
        raise UserError("--models needs at least one model")
    specs: dict[str, ModelSpec] = {}
    for item in items:
        head, *opts = item.split(":")
        label, sep, model = head.partition("=")
        if not sep:
            label, model = item, head
        if model not in MODELS:
            raise UserError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
        kinds = model_fields(model)
        options: dict[str, Any] = {}
        optim = None
        for opt in opts:
            key, eq, raw = opt.partition("=")
            if eq and key == "optim":
                optim = _check_optim(raw, f"--models {item!r}")
                continue
            if not eq or key not in kinds:
                raise UserError(
                    f"--models {item!r}: model options are KEY=VALUE with KEY a field of "
                    f"{model}'s config or optim, e.g. gpt:norm_position=post; got {opt!r}"
                )
            options[key] = _coerce(key, raw, kinds[key], "--models")
        if not label or "/" in label or label.startswith("."):
            raise UserError(f"--models {item!r}: the label must be a plain name")
        specs.setdefault(label, ModelSpec(label, model, options, optim))
    return list(specs.values())


def parse_optims(spec: str | Sequence[str] | None) -> list[str]:
    """``"adamw,renorm"`` -> ``["adamw", "renorm"]``: optimizer recipes (names registered in
    ``spheretorch.train.config.OPTIMIZERS``), an axis of the study; empty: none."""
    return list(dict.fromkeys(_check_optim(s, "--optims") for s in _split(spec)))


def cross_optims(specs: list[ModelSpec], optims: list[str]) -> list[ModelSpec]:
    """Every model with every recipe in ``optims`` (label ``MODEL+RECIPE``); ``specs`` as
    they are when ``optims`` is empty. A model that names its own recipe keeps it."""
    if not optims:
        return specs
    out = []
    for s in specs:
        if s.optim is not None:
            out.append(s)
            continue
        out += [dataclasses.replace(s, label=f"{s.label}+{o}", optim=o) for o in optims]
    return out


def parse_lrs(spec: str | Sequence[float] | None, flag: str = "--sweep-lrs") -> list[float]:
    """``"1e-3,3e-3"`` -> sorted unique positive finite learning rates."""
    lrs = []
    for item in _split(spec):
        try:
            lr = float(item)
        except (TypeError, ValueError):
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"{flag} takes positive numbers such as 1e-3,3e-3; got {item!r}")
        lrs.append(lr)
    return sorted(set(lrs))


def parse_lr_bounds(spec: str | Sequence[float] | None) -> tuple[float, float] | None:
    """``"1e-5,1"`` -> ``(1e-5, 1.0)``: how far an LR sweep may be extended (``None``: the
    default bounds)."""
    if spec is None or spec == "":
        return None
    lrs = parse_lrs(spec, "--sweep-bounds")
    if len(lrs) != 2:
        raise UserError(f"--sweep-bounds takes two learning rates LO,HI such as 1e-5,1; "
                        f"got {spec!r}")  # fmt: skip
    return lrs[0], lrs[1]


def parse_budgets(spec: str | Sequence[float] | None) -> list[float]:
    """``"0.25,0.5,1"`` -> ``[0.25, 0.5, 1.0]``: sorted, unique, each in (0, 1]; the full
    budget 1 is added when absent (it defines the target loss)."""
    out: set[float] = set()
    for item in _split(spec):
        try:
            b = float(item)
        except (TypeError, ValueError):
            raise UserError(
                f"--budgets takes fractions of the preset's steps such as 0.25,0.5,1; got {item!r}"
            ) from None
        if not (math.isfinite(b) and 0 < b <= 1):
            raise UserError(f"--budgets: each fraction must be in (0, 1], got {item!r}")
        out.add(b)
    out.add(1.0)
    return sorted(out)


def budget_steps(budgets: list[float], steps: int) -> dict[float, int]:
    """Steps of each budget, ``max(1, round(b * steps))``; ``UserError`` when two budgets
    round to the same count (they would be one run reported twice)."""
    out = {b: max(1, round(b * steps)) for b in budgets}
    seen: dict[int, float] = {}
    for b, n in out.items():
        if n in seen:
            raise UserError(
                f"--budgets {seen[n]:g} and {b:g} both round to {n} of {steps} steps; "
                "give budgets that differ by at least one step"
            )
        seen[n] = b
    return out


def grid_fields() -> dict[str, tuple[type, bool]]:
    """Fields a grid may vary: any model's config fields and ``batch_size``."""
    return {"batch_size": (int, False), **model_fields()}


def parse_grid(spec: str | None) -> tuple[str, list[Any]] | None:
    """``"seq_len=64,128,256"`` -> ``("seq_len", [64, 128, 256])`` (values typed by field)."""
    if spec is None or spec == "":
        return None
    field_name, sep, values = spec.partition("=")
    field_name = field_name.strip()
    kinds = grid_fields()
    if not sep or not values.strip():
        raise UserError(f"--grid takes FIELD=V,V,... such as seq_len=64,128; got {spec!r}")
    if field_name not in kinds:
        raise UserError(f"--grid: unknown field {field_name!r}; choose from {', '.join(kinds)}")
    raw = [v.strip() for v in values.split(",") if v.strip()]
    parsed = list(dict.fromkeys(_coerce(field_name, v, kinds[field_name]) for v in raw))
    if not parsed:
        raise UserError(f"--grid {field_name} needs at least one value")
    if kinds[field_name][0] is int and any(v is None or v <= 0 for v in parsed):
        raise UserError(f"--grid {field_name}: values must be positive integers")
    return field_name, parsed


def grid_points(
    grid: tuple[str, list[Any]] | None, base_seq_len: int, base_batch_size: int
) -> list[dict[str, Any]]:
    """One dict of overrides per grid point. Varying ``seq_len`` keeps the tokens per step
    ``base_batch_size * base_seq_len`` fixed by setting ``batch_size`` to
    ``tokens // seq_len`` (which must divide exactly)."""
    if grid is None:
        return [{}]
    field_name, values = grid
    points = []
    for v in values:
        point: dict[str, Any] = {field_name: v}
        if field_name == "seq_len":
            tokens = base_batch_size * base_seq_len
            if tokens % v:
                raise UserError(
                    f"--grid seq_len={v}: tokens per step ({base_batch_size} x {base_seq_len} "
                    f"= {tokens}) must be a multiple of each context length"
                )
            point["batch_size"] = tokens // v
        points.append(point)
    return points


def point_name(point: dict[str, Any], field_name: str | None) -> str:
    """Directory name of a grid point, e.g. ``seq_len=256``."""
    return "" if field_name is None else f"{field_name}={point[field_name]}"
