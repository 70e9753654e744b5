r"""Triton kernels of the sphere optimizers' steps: multi-tensor, one launch per row length.

What each kernel computes is specified by ONE readable reference, the single-tensor loop of its
optimizer (``_single_tensor_riemannian_adam`` in ``spheretorch/optim/riemannian_adam.py``,
``_single_tensor_riemannian_sgd`` in ``spheretorch/optim/riemannian_sgd.py``, the
renormalisation of ``spheretorch/optim/renorm_adam.py``; for the steps of SphereMuon and AdamH,
:func:`spheretorch.optim.sphere_steps.sphere_step`), written with the formulas of
:mod:`spheretorch.sphere`; ``tests/test_optim_kernels.py`` checks every kernel against it
(through Triton's interpreter on CPU tensors).

Layout. Every sphere tensor is seen as ``(outer, size, inner)``
(``spheretorch.sphere.layout.sphere_layout``): ``outer * inner`` spheres of ``size``
values, sphere ``s`` at element offsets ``(s // inner) * size * inner + s % inner + k * inner``.
The tensors of one launch share ``size`` (and dtype); a program holds ``BLOCK_R`` whole spheres
in registers (``[BLOCK_R, BLOCK_N]`` tiles), so every per-sphere reduction (projection, second
moment, retraction norm, transport) is a register reduction and each value is read and written
once. Consecutive spheres are consecutive in memory when ``inner == 1`` (rows) and
interleaved when ``inner > 1`` (columns), so loads coalesce in both cases. Spheres longer than
``MAX_ROW`` are not handled by these row kernels (callers take their multi-tensor torch path),
except whole-tensor spheres (``dim=None``: one sphere over all values, any size): their step
(``sphere_whole_step_``) and renormalisation (``renormalize_whole_``) run in two passes,
per-program partial sums (``BLOCK`` values each, TILES mapping programs to ``(tensor, first
value)``), summed per tensor by one torch reduction, then the update, whose norms follow from
the sums.

AdamH fuses its moments into the Muon family's step kernels (``AdamMoments``): the
gradients take the direction's column and the moments two more, the first launch updates them
and a second pass (per-tensor angles, whole tensors) recomputes the direction from them.

Directions of the Muon family's steps are read laid out like their parameter (as an Adam
direction and the polar factor of a wide matrix come; the transposed polar factor of a tall
matrix is copied once, a coalesced transpose, where strided reads would not coalesce).
Measured angles (``measure``): the kernels write each
sphere's :math:`(\|\hat y - c\hat x\|, c)`, :math:`c = \langle \hat x, \hat y\rangle`, and
one ``torch.atan2`` gives the angles (Triton has no ``atan2``).

Multi-tensor addressing. A launch gets one base tensor per list (the lowest address) and a
per-tensor table ``INFO`` of int64 element offsets from those bases (pointer arithmetic in
int64, valid for any tensor size); ``TILES`` maps each program to ``(tensor, first sphere)``.
The tables are built on the host once per set of tensors and cached on the device, so a step
launches: the step-counter increment (one ``_foreach_add_``), one kernel per row length, and
nothing that synchronises with the host (a table built anew is copied asynchronously; the
hyper-parameters, new whenever the schedule changes the learning rate, are written on the
device by fill kernels).
Scalars (learning rate, betas, ...) travel as a small float64 tensor (cached by value) so that
float64 parameters get float64 hyper-parameters; a tensor ``lr`` and device step counters are
read by the kernel (``capturable`` by construction: no host read). CUDA graphs: take one step
before capturing, as for any optimizer (state is created then); tensors first allocated in the
capture get their tables then, copied from page-locked memory set aside at an eager step
(``_Arena``), and whatever a graph reads is kept alive for its replays (``_cached``).

Radius. Each tensor has a radius :math:`r` (1 for ``SphereParameter``; ``|x|`` at construction
for a whole-tensor sphere): the kernel works on :math:`x/r`, with the step :math:`u/r`, and
stores :math:`r\,y`; this is the update on the sphere of radius :math:`r` with the induced
metric (projection :math:`g - \langle x, g\rangle x / r^2`, retraction
:math:`r (x+u)/\|x+u\|`).

Non-finite skip: a nonzero ``found_inf`` (a 0-d device tensor) masks every store, so parameters,
moments and step counters stay bitwise unchanged without a host synchronisation.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..sphere.layout import SphereLayout
from .backend import triton_available

__all__ = [
    "MAX_ROW",
    "AdamMoments",
    "handles",
    "nonfinite_flag",
    "project",
    "renormalize_",
    "renormalize_whole_",
    "sphere_adam_",
    "sphere_rows_step_",
    "sphere_sgd_",
    "sphere_whole_step_",
]

#: longest sphere (``size``) a kernel keeps in registers
MAX_ROW = 16384
#: values per program (``BLOCK_R * BLOCK_N``): enough to hide latency, few enough registers
_TILE = 2048
#: the same through Triton's interpreter (CPU tensors, the tests): small tiles waste less
_TILE_INTERPRETED = 64
#: values per program of the whole-tensor kernels (flat, one reduction per program)
_WHOLE_TILE = 4096
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def handles(
    xs: Sequence[Tensor],
    layouts: Sequence[Any],
    *others: Sequence[Any],
    max_row: int | None = None,
) -> bool:
    """Whether these tensors can go through the kernels: contiguous, supported dtypes, spheres
    of at most ``max_row`` values (default ``MAX_ROW``: the row kernels; any size for the
    whole-tensor kernels, which reduce across programs), no autograd, not DTensors.
    ``others``: lists (of gradients, moments, ...) that must be contiguous too (``None``
    entries allowed)."""
    if not triton_available():
        return False
    max_row = MAX_ROW if max_row is None else max_row
    for x, lay in zip(xs, layouts):
        if x.dtype not in _DTYPES or lay.size > max_row or not x.is_contiguous():
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False
        if type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
            return False  # DTensor and other subclasses
    return all(t is None or t.is_contiguous() for ts in others for t in ts)


# ---------------------------------------------------------------------- host side: tables


_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_CACHE_SIZE = 64
#: what the CUDA graphs captured in this process read (tables, hyper-parameters): kept for the
#: process's lifetime, because a graph reads them at every replay, long after the cache may
#: have evicted them
_CAPTURED: list[Any] = []
#: bytes of page-locked host memory set aside (outside a capture) for the tables a capture
#: builds; a new arena is set aside when less than half of this is left
ARENA_BYTES = 1 << 22


class _Arena:
    """Page-locked host memory for the tables built while a CUDA graph is captured.

    A graph can only record a host-to-device copy from page-locked memory, reads it at every
    replay, and no page-locked memory can be allocated during a capture (``pin_memory()``
    queries events and may allocate, which a capture forbids). So a plain host buffer is
    registered with CUDA (``cudaHostRegister``, outside torch's caching host allocator: no
    event is recorded on it) at an eager step, and a capture takes slices of it, never given
    back (the graphs that read them may replay at any time)."""

    def __init__(self, nbytes: int) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8)
        _register(self.buf)
        self.used = 0

    def left(self) -> int:
        return self.buf.numel() - self.used

    def take(self, t: Tensor) -> Tensor:
        """A page-locked copy of ``t`` (one of this arena's slices, 16-byte aligned)."""
        nbytes = t.numel() * t.element_size()
        if nbytes > self.left():
            raise RuntimeError(
                "spheretorch kernels: the page-locked tables of the CUDA graphs captured so far "
                f"fill the {self.buf.numel()} bytes set aside; raise "
                "spheretorch.kernels.optim.ARENA_BYTES before the eager step that precedes the "
                "capture"
            )
        out = self.buf[self.used : self.used + nbytes].view(t.dtype).view(t.shape)
        self.used += -(-nbytes // 16) * 16
        out.copy_(t)
        return out


_ARENAS: dict[torch.device, _Arena] = {}


def _register(buf: Tensor) -> None:
    """Page-lock ``buf`` (a host tensor kept alive by its arena) for CUDA copies."""
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"spheretorch kernels: cudaHostRegister failed ({err})")


def _arena(device: torch.device) -> _Arena:
    """This device's arena (set aside outside a capture, at the eager step before it)."""
    arena = _ARENAS.get(device)
    if arena is None:
        raise RuntimeError(
            "spheretorch kernels: take one optimizer step on this device before capturing a "
            "CUDA graph (its page-locked tables are set aside then)"
        )
    return arena


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph (never for other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(key: tuple[Any, ...], make: Any) -> Any:
    """The value cached under ``key`` (``key[1]``: the device), made on a miss.

    While a CUDA graph is being captured, kernels (copies, fills) are recorded, not run: a
    value made then holds its contents only once the graph replays, so it serves this capture
    alone (never the cache, whose next reader may be an eager step or another graph), and a
    value taken from the cache is kept alive for the graph's replays (``_CAPTURED``)."""
    if _capturing(key[1]):
        value = _CACHE.get(key)
        if value is None:
            value = make()
        _CAPTURED.append(value)
        return value
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = make()
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def _offsets(ts: Sequence[Tensor | None]) -> tuple[Tensor | None, list[int]]:
    """The lowest-addressed tensor of ``ts`` and each one's element offset from it."""
    real = [t for t in ts if t is not None]
    if not real:
        return None, [0] * len(ts)
    base = min(real, key=Tensor.data_ptr)
    size = base.element_size()
    out = []
    for t in ts:
        if t is None:
            out.append(0)
            continue
        delta = t.data_ptr() - base.data_ptr()
        if delta % size:  # cannot happen for tensors of one dtype; checked, not assumed
            raise RuntimeError("spheretorch kernels: misaligned tensor in a multi-tensor launch")
        out.append(delta // size)
    return base, out


_JIT: dict[bool, Any] = {}


def _jit(device: torch.device) -> Any:
    """The kernels of ``_optim_jit.py``: interpreted for CPU tensors, compiled for CUDA ones.

    Triton decides between its interpreter and its compiler when a function is decorated,
    from ``TRITON_INTERPRET``; the module is loaded once per mode with that variable set
    accordingly, so that the choice follows the device whatever the environment held when
    spheretorch was imported.
    """
    interpret = device.type != "cuda"
    mod = _JIT.get(interpret)
    if mod is None:
        # triton itself first, in the process's own mode (its standard library must not
        # change mode later); only this module's functions are decorated in the device's
        import triton.language  # noqa: F401

        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            name = f"{__package__}._optim_jit_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(
                name, Path(__file__).with_name("_optim_jit.py")
            )
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # triton resolves the helpers through the module
            spec.loader.exec_module(mod)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
        _JIT[interpret] = mod
    return mod


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _blocks(size: int, device: torch.device) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_N, num_warps)`` for spheres of ``size`` values."""
    block_n = _next_power_of_2(size)
    block_r = max(1, (_TILE if device.type == "cuda" else _TILE_INTERPRETED) // block_n)
    num_warps = min(16, max(1, block_n * block_r // 256))
    return block_r, block_n, num_warps


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host-built table on ``device``. Asynchronous (the driver stages pageable host
    memory at once and the step does not wait for the device): a table rebuilt because a
    tensor moved (gradients reallocated, a new LR) must not synchronise a CUDA step.

    While a CUDA graph is being captured (tensors allocated in the capture, such as gradients
    set to None before it or a step's directions, have new addresses, so their tables are
    built then) the copy is from page-locked memory (:class:`_Arena`), the only host-to-device
    copy a graph can record; outside a capture, the arena is set aside (or renewed) first."""
    if _capturing(device):
        return _arena(device).take(t).to(device, non_blocking=True)
    if device.type == "cuda":
        arena = _ARENAS.get(device)
        if arena is None or arena.left() < ARENA_BYTES // 2:
            if arena is not None:
                _CAPTURED.append(arena)  # graphs captured so far read its slices
            _ARENAS[device] = _Arena(ARENA_BYTES)
    return t.to(device, non_blocking=True)


def _plan(
    lists: Sequence[Sequence[Tensor | None]],
    layouts: Sequence[Any],
    block_r: int,
) -> tuple[list[Tensor | None], Tensor, Tensor]:
    """Bases of ``lists``, the INFO table (count, inner, offsets...) and the TILES table, on
    the device. TILES depends on the shapes only (cached by them: it is the large one, one
    entry per program); INFO, one small row per tensor, is cached by the tensors' addresses
    (rebuilt when gradients move: a few microseconds and one small copy)."""
    device = lists[0][0].device  # type: ignore[union-attr]
    shapes = tuple((lay.outer, lay.size, lay.inner) for lay in layouts)

    def make_tiles() -> Tensor:
        tiles = [v for i, lay in enumerate(layouts) for s in range(0, lay.count, block_r)
                 for v in (i, s)]  # fmt: skip
        return _to_device(torch.tensor(tiles, dtype=torch.int64), device)

    def make_info() -> tuple[list[int | None], Tensor]:
        bases, offs = zip(*(_offsets(ts) for ts in lists))
        info = [[lay.count, lay.inner, *(o[i] for o in offs)] for i, lay in enumerate(layouts)]
        # the bases are kept as addresses, not references (no tensor kept alive by the cache)
        ptrs = [None if base is None else base.data_ptr() for base in bases]
        return ptrs, _to_device(torch.tensor(info, dtype=torch.int64), device)

    tiles_t = _cached(("tiles", device, block_r, shapes), make_tiles)
    addresses = tuple(tuple(0 if t is None else t.data_ptr() for t in ts) for ts in lists)
    ptrs, info_t = _cached(("info", device, addresses, shapes), make_info)
    bases = []
    for ts, ptr in zip(lists, ptrs):
        bases.append(next((t for t in ts if t is not None and t.data_ptr() == ptr), None))
    return bases, info_t, tiles_t


def _hyper(
    device: torch.device, dtype: torch.dtype, values: Sequence[float], radii: Sequence[float]
) -> Tensor:
    """``[lr, beta1/momentum, beta2/dampening, eps, step, radius_0, radius_1, ...]`` as a
    tensor of ``dtype`` on ``device`` (cached by value; built on the device without a
    host-to-device copy of the values)."""
    key = ("hyper", device, dtype, tuple(values), tuple(radii))

    def make() -> Tensor:
        # The radii (constant for a set of tensors) are copied to the device once; the
        # values (the LR changes every step under a schedule) are written by fill kernels,
        # whose scalar travels with the launch: no host-to-device copy, which would
        # synchronise with the host on CUDA.
        const = _cached(
            ("hyper-radii", device, dtype, tuple(radii)),
            lambda: _to_device(torch.tensor(list(radii), dtype=dtype), device),
        )
        out = torch.empty(len(values) + len(radii), dtype=dtype, device=device)
        out[len(values) :].copy_(const)
        for i, v in enumerate(values):
            out[i].fill_(v)
        return out

    return _cached(key, make)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dummy(like: Tensor) -> Tensor:
    return torch.empty(1, dtype=torch.float32, device=like.device)


def _by_size(layouts: Sequence[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, lay in enumerate(layouts):
        out.setdefault(lay.size, []).append(i)
    return out


def _pick(ts: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    return [ts[i] for i in idx]


def _device_lr(lr: float | Tensor, device: torch.device) -> tuple[float | Tensor, bool]:
    """``lr`` and whether it is a tensor; a tensor moved to ``device``, where the kernel
    reads it (a float travels in the hyper-parameter table)."""
    if isinstance(lr, Tensor):
        if lr.device != device and _capturing(device):
            raise ValueError(
                f"lr: a Tensor lr must be on the parameters' device ({device}) while a CUDA "
                f"graph is captured, got one on {lr.device}"
            )
        return (lr if lr.device == device else lr.to(device)), True
    return lr, False


def _check_rule(name: str, rule: str, project: bool) -> None:
    """The step rules the Muon family's kernels implement (``"angular"`` always projects)."""
    if rule not in ("angular", "hyperball") or (rule == "angular" and not project):
        raise ValueError(f"{name}: no kernel for rule={rule!r}, project={project}")


def _value(x: float | Tensor | None) -> float:
    return 0.0 if x is None or isinstance(x, Tensor) else float(x)


# ---------------------------------------------------------------------- host side: launches


def sphere_adam_(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    ms: Sequence[Tensor],
    vs: Sequence[Tensor],
    vmaxs: Sequence[Tensor],
    layouts: Sequence[Any],
    radii: Sequence[float],
    *,
    steps: Sequence[Tensor] | None,
    step: float | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    row: bool,
    exp: bool,
    found_inf: Tensor | None,
) -> None:
    """One RiemannianAdam step of sphere tensors of one dtype (all contiguous; ``ms``, ``vs``,
    ``vmaxs`` in the compute dtype, ``vs`` of ``count`` values per tensor for ``row``).

    ``steps``: per-tensor step counters on the device, already incremented (read by the
    kernel), or ``None`` with the common ``step`` number given. Writes nothing where
    ``found_inf`` is nonzero.
    """
    amsgrad = bool(vmaxs)
    device = xs[0].device
    lr, lr_tensor = _device_lr(lr, device)
    dummy = _dummy(xs[0])
    for size, idx in _by_size(layouts).items():
        block_r, block_n, warps = _blocks(size, device)
        lists = [_pick(xs, idx), _pick(gs, idx), _pick(ms, idx), _pick(vs, idx)]
        lists.append(_pick(vmaxs, idx) if amsgrad else [None] * len(idx))
        lists.append(_pick(steps, idx) if steps is not None else [None] * len(idx))
        bases, info, tiles = _plan(lists, _pick(layouts, idx), block_r)
        hyper = _hyper(
            xs[0].device,
            torch.float64,
            [_value(lr), beta1, beta2, eps, _value(step)],
            _pick(radii, idx),
        )
        _jit(device)._adam_kernel[(tiles.shape[0] // 2,)](
            bases[0], bases[1], bases[2], bases[3],
            bases[4] if amsgrad else dummy,
            bases[5] if steps is not None else dummy,
            tiles, info, hyper,
            lr if lr_tensor else dummy,
            found_inf if found_inf is not None else dummy,
            size,
            N_INFO=info.shape[1], BLOCK_R=block_r, BLOCK_N=block_n,
            MAXIMIZE=maximize, ROW=row, EXP=exp, AMSGRAD=amsgrad,
            LR_TENSOR=lr_tensor, STEP_TENSOR=steps is not None,
            HAS_FOUND_INF=found_inf is not None, num_warps=warps,
        )  # fmt: skip


def sphere_sgd_(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    bufs: Sequence[Tensor] | None,
    layouts: Sequence[Any],
    radii: Sequence[float],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    exp: bool,
    first: bool,
    found_inf: Tensor | None,
) -> None:
    """One RiemannianSGD step (``bufs=None``: no momentum; ``first``: the buffers are set to
    the Riemannian gradient, torch's first step). Writes nothing where ``found_inf`` is
    nonzero."""
    cd = _compute_dtype(xs[0].dtype)
    device = xs[0].device
    lr, lr_tensor = _device_lr(lr, device)
    dummy = _dummy(xs[0])
    for size, idx in _by_size(layouts).items():
        block_r, block_n, warps = _blocks(size, device)
        lists = [_pick(xs, idx), _pick(gs, idx)]
        lists.append(_pick(bufs, idx) if bufs is not None else [None] * len(idx))
        bases, info, tiles = _plan(lists, _pick(layouts, idx), block_r)
        hyper = _hyper(
            xs[0].device, cd, [_value(lr), momentum, dampening, 0.0, 0.0], _pick(radii, idx)
        )
        _jit(device)._sgd_kernel[(tiles.shape[0] // 2,)](
            bases[0], bases[1], bases[2] if bufs is not None else dummy,
            tiles, info, hyper,
            lr if lr_tensor else dummy,
            found_inf if found_inf is not None else dummy,
            size,
            N_INFO=info.shape[1], BLOCK_R=block_r, BLOCK_N=block_n,
            MAXIMIZE=maximize, EXP=exp, MOMENTUM=bufs is not None, FIRST=first,
            NESTEROV=nesterov, LR_TENSOR=lr_tensor, HAS_FOUND_INF=found_inf is not None,
            num_warps=warps,
        )  # fmt: skip


def _row_op(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor] | None,
    outs: Sequence[Tensor] | None,
    layouts: Sequence[Any],
    radii: Sequence[float],
    found_inf: Tensor | None,
) -> None:
    cd = _compute_dtype(xs[0].dtype)
    device = xs[0].device
    dummy = _dummy(xs[0])
    project_ = gs is not None
    for size, idx in _by_size(layouts).items():
        block_r, block_n, warps = _blocks(size, device)
        lists = [_pick(xs, idx)]
        if project_:
            lists += [_pick(gs, idx), _pick(outs, idx)]  # type: ignore[arg-type]
        bases, info, tiles = _plan(lists, _pick(layouts, idx), block_r)
        hyper = _hyper(xs[0].device, cd, [0.0] * 5, _pick(radii, idx))
        _jit(device)._renorm_kernel[(tiles.shape[0] // 2,)](
            bases[0], bases[1] if project_ else dummy, bases[2] if project_ else dummy,
            tiles, info, hyper,
            found_inf if found_inf is not None else dummy,
            size,
            N_INFO=info.shape[1], BLOCK_R=block_r, BLOCK_N=block_n,
            PROJECT=project_, HAS_FOUND_INF=found_inf is not None, num_warps=warps,
        )  # fmt: skip


def renormalize_(
    xs: Sequence[Tensor],
    layouts: Sequence[Any],
    radii: Sequence[float],
    *,
    keep: Tensor | None = None,
) -> None:
    r"""In place :math:`x \leftarrow r\,x / \|x\|` on every sphere; nothing changes where
    ``keep`` (0-d) is nonzero."""
    _row_op(xs, None, None, layouts, radii, keep)


def project(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    layouts: Sequence[Any],
    radii: Sequence[float],
) -> list[Tensor]:
    r"""New tensors :math:`g - \langle x, g\rangle x / r^2` (the tangent part of ``g`` at
    ``x``), in ``g``'s dtype."""
    outs = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in gs]
    gs = [g.contiguous() for g in gs]
    _row_op(xs, gs, outs, layouts, radii, None)
    return outs


@dataclass(frozen=True)
class AdamMoments:
    r"""AdamH fused into the sphere steps: instead of a direction, each tensor's gradient
    and Adam moments, which the kernels update (:math:`m \leftarrow \mathrm{lerp}(m, g,
    1 - \beta_1)`, :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`) and from which they
    take the direction up to scale, :math:`m / (\sqrt{v} / \sqrt{1 - \beta_2^t} +
    \epsilon)` (:func:`spheretorch.optim.sphere_steps.adam_directions` with
    ``up_to_scale=True``: the steps normalize it). One pass over the gradient and moments
    instead of the ``_foreach`` moments and direction (about eight).

    ``grads``, ``exp_avgs``, ``exp_avg_sqs``: one per tensor, contiguous, laid out as the
    tensors (moments in the compute dtype); ``steps``: the step number shared by all
    (a float, after its increment) or one device counter per tensor (capturable).
    """

    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    steps: float | Sequence[Tensor]
    betas: tuple[float, float]
    eps: float
    maximize: bool = False

    def lists(self) -> list[Sequence[Tensor | None]]:
        """The moment and (device) step lists, in the INFO table's order (after the
        gradients, which take the direction's column)."""
        steps = [list(self.steps)] if self.step_tensor else []  # type: ignore[arg-type]
        return [self.exp_avgs, self.exp_avg_sqs, *steps]

    @property
    def step_tensor(self) -> bool:
        return not isinstance(self.steps, (int, float))


def _step_args(
    adam: AdamMoments | None,
    lr: float | Tensor,
    radii: Sequence[float],
    bases: list[Tensor | None],
    dummy: Tensor,
    cd: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(HYPER, M, V, STEP, EPS)`` of a Muon-family step launch: HYPER =
    ``(lr, beta1, beta2, tiny, step, radii...)`` in the compute dtype ``cd`` (betas and step
    0 without ``adam``; step 0 with device counters), and with ``adam`` the bases of the
    moment and step lists (INFO columns 5-7: ``bases[3:6]``) and ``[eps]``."""
    b1 = b2 = step = 0.0
    if adam is not None:
        b1, b2 = float(adam.betas[0]), float(adam.betas[1])
        step = 0.0 if adam.step_tensor else float(adam.steps)  # type: ignore[arg-type]
    values = [_value(lr), b1, b2, torch.finfo(cd).tiny, step]
    hyper = _hyper(dummy.device, cd, values, radii)
    if adam is None:
        return hyper, dummy, dummy, dummy, dummy
    steps = bases[5] if adam.step_tensor else dummy
    eps = _hyper(dummy.device, cd, [adam.eps], [])  # cached by value, as HYPER
    return hyper, bases[3], bases[4], steps, eps  # type: ignore[return-value]


def _like(d: Tensor) -> Tensor:
    """A direction as the kernels read it: its values in row-major order, laid out in memory
    like the (contiguous) parameter. ``d`` itself where it already lies so (an Adam
    direction, the polar factor of a wide matrix); else one copy (e.g. the transposed polar
    factor of a tall matrix): reading it through its strides instead would not coalesce on
    a GPU (a program holds a few spheres, each across the direction's fast axis), where a
    transposing copy is one coalesced pass."""
    return d if d.is_contiguous() else d.contiguous()


def _angles(buf: Tensor) -> Tensor:
    """The angles from a kernel's ``(|y' - c x'|, c)`` pairs: their ``atan2``, exactly as
    :func:`spheretorch.optim.sphere_steps.step_angle` (Triton has no ``atan2``)."""
    return torch.atan2(buf[0::2], buf[1::2])


def sphere_rows_step_(
    xs: Sequence[Tensor],
    ds: Sequence[Tensor] | None,
    layout: Any,
    radii: Sequence[float],
    lr: float | Tensor,
    *,
    rule: str,
    project: bool,
    per_tensor: bool,
    measure: bool = False,
    adam: AdamMoments | None = None,
) -> Tensor | None:
    r"""A step of :func:`spheretorch.optim.sphere_steps.sphere_step` (its one reference) on
    same-layout sphere tensors (``layout``: rows ``inner == 1``, or interleaved spheres
    ``inner > 1`` such as columns; at most ``MAX_ROW`` values each), in place: per sphere
    :math:`x` of radius :math:`r` (``radii``, one per tensor) with direction :math:`d` and
    :math:`d_T = d - \langle \hat x, d\rangle \hat x` (``project``; else :math:`d`):

    * ``rule="angular"`` (``project`` on): :math:`x \leftarrow r\,\mathrm{normalize}(\cos
      \theta\, x - r\sin\theta\, d_T / \|d_T\|)`, :math:`\theta = \eta` (a zero :math:`d_T`
      stays) or, ``per_tensor``, :math:`\theta_i = \eta \|d_{T,i}\| / \mathrm{rms}_j
      \|d_{T,j}\|` over each tensor's spheres;
    * ``rule="hyperball"``: :math:`x \leftarrow r\,\mathrm{normalize}(x - \eta r d_T /
      \|d_T\|)`.

    ``ds``: shaped like ``xs``, one dtype, any strides (:func:`_like`: read where they lie
    when their memory is laid out as ``xs``', else copied once). One launch; with
    ``per_tensor`` two (the tangent norms, torch takes their RMS per tensor, then the step:
    each value read twice, written once). A tensor ``lr`` is read by the kernel (no host
    read). ``measure``: returns the angle each sphere turned, ``(len(xs) * count,)`` in the
    compute dtype (tensor by tensor, spheres in the order of
    :func:`spheretorch.optim.sphere_steps.rows`), as ``step_angle``.

    ``adam`` (``ds`` None): AdamH fused, the directions from the gradients and moments
    (:class:`AdamMoments`), updated by the first launch.
    """
    _check_rule("sphere_rows_step_", rule, project)
    device = xs[0].device
    cd = _compute_dtype(xs[0].dtype)
    lr, lr_tensor = _device_lr(lr, device)
    block_r, block_n, warps = _blocks(layout.size, device)
    count, n = layout.count, len(xs)
    per_tensor = per_tensor and rule == "angular"
    dummy = _dummy(xs[0])
    norms = rms = dummy
    first = adam.grads if adam is not None else [_like(d) for d in ds]  # type: ignore[union-attr]
    lists: list[Sequence[Tensor | None]] = [xs, first, [None] * n]
    if per_tensor:  # one buffer per set of shapes, reused: stable addresses, cached tables
        norms = _cached(
            ("rows-step-norms", device, cd, n, count),
            lambda: torch.empty(n * count, dtype=cd, device=device),
        )
        lists[2] = list(norms.view(n, count).unbind(0))
    if adam is not None:
        lists += adam.lists()
    bases, info, tiles = _plan(lists, [layout] * n, block_r)
    hyper, m, v, steps, eps = _step_args(adam, lr, radii, bases, dummy, cd)
    angle = torch.empty(2 * n * count, dtype=cd, device=device) if measure else dummy
    kernel = _jit(device)._rows_step_kernel
    grid = (tiles.shape[0] // 2,)
    for i, pass_norms in enumerate((True, False) if per_tensor else (False,)):
        if not pass_norms and per_tensor:
            rms = norms.view(n, count).square().mean(dim=1).sqrt()
        kernel[grid](
            bases[0], bases[1], norms, rms, angle, tiles, info, hyper,
            lr if lr_tensor else dummy,
            layout.size, m, v, steps, eps,
            N_INFO=info.shape[1], BLOCK_R=block_r, BLOCK_N=block_n,
            PASS_NORMS=pass_norms, PER_TENSOR=per_tensor, LR_TENSOR=lr_tensor,
            HYPERBALL=rule == "hyperball", PROJECT=project,
            MEASURE=measure and not pass_norms, ADAM=adam is not None, UPDATE=i == 0,
            MAXIMIZE=bool(adam and adam.maximize), STEP_TENSOR=bool(adam and adam.step_tensor),
            num_warps=warps,
        )  # fmt: skip
    return _angles(angle) if measure else None


def _whole(
    xs: Sequence[Tensor],
    ds: Sequence[Tensor] | None,
    radii: Sequence[float],
    lr: float | Tensor,
    *,
    rule: str,
    project: bool,
    measure: bool,
    adam: AdamMoments | None = None,
) -> Tensor | None:
    """The two passes of the whole-tensor kernels on same-size tensors of one dtype (``ds``
    and ``adam`` None: the renormalisation); see :func:`sphere_whole_step_`."""
    device = xs[0].device
    cd = _compute_dtype(xs[0].dtype)
    n, numel = len(xs), xs[0].numel()
    if any(x.numel() != numel or x.dtype != xs[0].dtype for x in xs):
        raise ValueError("whole-tensor sphere kernels: one size and one dtype per launch")
    lr, lr_tensor = _device_lr(lr, device)
    cuda = device.type == "cuda"
    block, warps = (_WHOLE_TILE, 8) if cuda else (_TILE_INTERPRETED, 1)
    has_d = ds is not None or adam is not None
    lists: list[Sequence[Tensor | None]]
    if adam is not None:  # the gradients in the direction's place, columns as the row kernel's
        lists = [xs, adam.grads, [None] * n, *adam.lists()]
    else:
        lists = [xs, [None] * n if ds is None else [_like(d) for d in ds]]
    # one "sphere" per value: TILES holds (tensor, first value) per program of BLOCK values
    bases, info, tiles = _plan(lists, [SphereLayout(numel, 1, 1)] * n, block)
    programs = tiles.shape[0] // 2
    dummy = _dummy(xs[0])
    jit = _jit(device)
    hyper, m, v, steps, eps = _step_args(adam, lr, radii, bases, dummy, cd)
    step_tensor = bool(adam and adam.step_tensor)
    partials = torch.empty(programs * 3, dtype=cd, device=device)
    jit._whole_sums_kernel[(programs,)](
        bases[0], bases[1] if has_d else dummy, partials, tiles, info, m, v, steps, hyper, eps,
        N_INFO=info.shape[1], BLOCK=block, HAS_D=has_d, ADAM=adam is not None,
        MAXIMIZE=bool(adam and adam.maximize), STEP_TENSOR=step_tensor, num_warps=warps,
    )  # fmt: skip
    sums = partials.view(n, -1, 3).sum(dim=1)  # programs are tensor by tensor, equal counts
    angle = torch.empty(2 * n, dtype=cd, device=device) if measure else dummy
    jit._whole_step_kernel[(programs,)](
        bases[0], bases[1] if has_d else dummy, sums, angle, tiles, info, hyper,
        lr if lr_tensor else dummy, m, v, steps, eps,
        N_INFO=info.shape[1], BLOCK=block, RENORM=not has_d, HYPERBALL=rule == "hyperball",
        PROJECT=project, LR_TENSOR=lr_tensor, MEASURE=measure, ADAM=adam is not None,
        STEP_TENSOR=step_tensor, num_warps=warps,
    )  # fmt: skip
    return _angles(angle) if measure else None


def sphere_whole_step_(
    xs: Sequence[Tensor],
    ds: Sequence[Tensor] | None,
    radii: Sequence[float],
    lr: float | Tensor,
    *,
    rule: str,
    project: bool,
    measure: bool = False,
    adam: AdamMoments | None = None,
) -> Tensor | None:
    r""":func:`spheretorch.optim.sphere_steps.sphere_step` with ``whole=True`` (one sphere of
    radius :math:`r`, ``radii``, over all values of each tensor; the rules of
    :func:`sphere_rows_step_`) on same-size contiguous tensors of one dtype, of any size, in
    place. ``ds``: ``xs[i].numel()`` values each in ``xs[i]``'s order (any shape and
    strides, :func:`_like`).

    Two passes, no host synchronisation: per program of ``BLOCK`` values, the partial sums
    :math:`(\|x\|^2, \langle x, d\rangle, \|d\|^2)`; torch sums them per tensor (one small
    launch); then the step, whose norms (:math:`\|d_T\|`, the renormalisation, the measured
    angle) follow from those three sums (``_whole_step_kernel`` derives them). Each value of
    ``x`` and ``d`` is read twice and ``x`` written once. ``measure``: returns the angle each
    tensor turned, ``(len(xs),)`` in the compute dtype.

    ``adam`` (``ds`` None): AdamH fused (:class:`AdamMoments`): the first pass updates the
    moments and sums with their direction, the second recomputes it from them.
    """
    _check_rule("sphere_whole_step_", rule, project)
    return _whole(xs, ds, radii, lr, rule=rule, project=project, measure=measure, adam=adam)


def renormalize_whole_(xs: Sequence[Tensor], radii: Sequence[float]) -> None:
    r"""In place :math:`x \leftarrow r\,x / \max(\|x\|, \text{tiny})` over all values of each
    tensor (same-size contiguous tensors of one dtype, any size): the sums of squares by
    programs, summed per tensor by torch, then the scaling (two passes, no host
    synchronisation)."""
    _whole(xs, None, radii, 0.0, rule="hyperball", project=False, measure=False)


def nonfinite_flag(grads: Sequence[Tensor]) -> Tensor:
    """0-d float32 tensor on the gradients' device: 1 when some gradient holds a NaN or an
    infinity, else 0; one launch per dtype, each element read once, no host synchronisation.
    Gradients must be contiguous."""
    device = grads[0].device
    flag = torch.zeros((), dtype=torch.int32, device=device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    block = 4096 if device.type == "cuda" else 1024
    for gs in by_dtype.values():
        numels = tuple(g.numel() for g in gs)

        def make_tiles(numels: tuple[int, ...] = numels) -> Tensor:
            tiles = [v for i, n in enumerate(numels) for s in range(0, n, block) for v in (i, s)]
            return _to_device(torch.tensor(tiles, dtype=torch.int64), device)

        def make_info(gs: list[Tensor] = gs) -> tuple[int, Tensor]:
            base, offs = _offsets(gs)
            assert base is not None
            rows = [v for g, o in zip(gs, offs) for v in (g.numel(), o)]
            return base.data_ptr(), _to_device(torch.tensor(rows, dtype=torch.int64), device)

        tiles = _cached(("scan-tiles", device, block, numels), make_tiles)
        if tiles.numel() == 0:
            continue  # empty gradients only
        ptr, info = _cached(("scan", device, tuple(g.data_ptr() for g in gs)), make_info)
        base = next(g for g in gs if g.data_ptr() == ptr)
        _jit(device)._nonfinite_kernel[(tiles.shape[0] // 2,)](base, info, tiles, flag, BLOCK=block)
    return flag.to(torch.float32)
