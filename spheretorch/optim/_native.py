r"""The hand-written CPU kernels of the fused paths (``_native.cpp``): build, cache, call.

How it is built: on first use the C++ file shipped beside this module is compiled with the
system C++ compiler (``$CXX``, else ``c++``; ``-O3 -march=native -fopenmp``, 2-2.5 s) into
a shared library cached under ``$SPHERETORCH_CACHE_DIR`` (default
``~/.cache/spheretorch``), keyed by the source, the compiler, its flags and the CPU, and written
atomically so that concurrent processes (DDP ranks) can race safely. Later processes load the
cached file (milliseconds). The library uses no torch headers: it is called through
:mod:`ctypes` with the tensors' data pointers and shapes, and links the OpenMP runtime torch
has already loaded (one thread pool, ``torch.get_num_threads()`` threads).

When there is no compiler, the compilation fails, or ``SPHERETORCH_NATIVE=0`` is set,
:func:`library` returns ``None`` (logged once) and the callers take their other path (the
``_foreach`` paths, torch's reductions): same results within round-off, slower.

Each wrapper takes lists of contiguous CPU tensors of one floating dtype; :func:`usable` tells
whether a list qualifies. The kernels write through raw pointers, so the wrappers bump the
written tensors' autograd version counters as torch's in-place ops do.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..sphere.dtensor import is_dtensor
from ..sphere.layout import SphereLayout, sphere_layout

__all__ = ["library", "nonfinite", "renormalize", "riemannian_adam", "riemannian_sgd", "usable"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_native.cpp")
_ABI_VERSION = 4  # st_abi_version() of the C++ file
_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c++17"]
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_p = ctypes.c_void_p
_pp = ctypes.POINTER(ctypes.c_void_p)
_i64p = ctypes.POINTER(ctypes.c_int64)
_f32p = ctypes.POINTER(ctypes.c_float)
_d, _i, _i64 = ctypes.c_double, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {
    "st_riemannian_adam": [_i, _i64, _pp, _pp, _pp, _pp, _pp, _pp, _i64p]
    + [_d] * 4
    + [_i] * 4
    + [_f32p, _i],
    "st_riemannian_sgd": [_i, _i64, _pp, _pp, _pp, _i64p] + [_d] * 3 + [_i] * 4 + [_f32p, _i],
    "st_renormalize": [_i, _i64, _pp, _i64p, _f32p, _i],
    "st_nonfinite": [_i64, _pp, _i64p, ctypes.POINTER(ctypes.c_int), _i],
}


def _cache_dir() -> Path:
    root = os.environ.get("SPHERETORCH_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "spheretorch"


def _cpu_id() -> str:
    """The CPU model and feature flags (``-march=native`` code runs only where built)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _compile(cxx: str, flags: list[str], out: Path) -> bool:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as e:
        log.debug("native kernels: cannot write into %s: %s", out.parent, e)
        return False
    cmd = [cxx, *flags, str(_SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            log.debug("native kernels: %s failed:\n%s", " ".join(cmd), proc.stderr[-2000:])
            return False
        os.replace(tmp, out)  # atomic: a concurrent process sees no file or a whole one
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("native kernels: %s failed: %s", " ".join(cmd), e)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call, then cached on disk), or ``None``."""
    if os.environ.get("SPHERETORCH_NATIVE", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        log.warning(
            "spheretorch: no C++ compiler found: the native CPU kernels (fused optimizer "
            "steps, the non-finite test) fall back to torch (same results, slower)"
        )
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        log.debug("native kernels: %s --version failed: %s", cxx, e)
        version = cxx
    common = (version, _cpu_id(), torch.__version__)
    source = _SOURCE.read_bytes()
    # the user's cache, else (no or read-only home) a per-user temporary directory
    tmp = Path(tempfile.gettempdir()) / f"spheretorch-{getattr(os, 'getuid', lambda: 0)()}"
    try:
        dirs = [_cache_dir(), tmp]
    except RuntimeError:  # Path.home() without a home directory
        dirs = [tmp]
    for flags, cache in itertools.product((["-march=native", *_FLAGS], _FLAGS), dirs):
        tag = "\0".join((*common, " ".join(flags))).encode()
        key = hashlib.sha256(tag + b"\0" + source).hexdigest()[:24]
        path = cache / f"native-{key}.so"
        if not path.exists() and not _compile(cxx, flags, path):
            continue
        try:
            lib = ctypes.CDLL(str(path))
            if lib.st_abi_version() != _ABI_VERSION:
                raise OSError(f"ABI version {lib.st_abi_version()}, expected {_ABI_VERSION}")
        except OSError as e:
            log.debug("native kernels: cannot load %s: %s", path, e)
            continue
        for name, args in _SIGNATURES.items():
            getattr(lib, name).argtypes = args
        return lib
    log.warning(
        "spheretorch: compiling the native CPU kernels with %s failed (the compiler's message "
        "is logged at DEBUG level): fused optimizer steps and the non-finite test fall back "
        "to torch (same results, slower)",
        cxx,
    )
    return None


def usable(
    *lists: Sequence[Tensor | None],
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    same_dtype: bool = True,
    host_flags: Sequence[Tensor | None] = (),
) -> bool:
    """True when every tensor is a contiguous CPU tensor with a dtype in ``dtypes`` (one
    dtype for all with ``same_dtype``), nothing needs autograd, every one of ``host_flags``
    (step counters, ``found_inf``: read by the kernel) is ``None`` or a float32 CPU tensor,
    and the library is available."""
    if not all(t is None or (t.is_cpu and t.dtype == torch.float32) for t in host_flags):
        return False
    first = lists[0][0] if lists and lists[0] else None
    if first is None or torch.compiler.is_compiling():
        return False
    for ts in lists:
        for t in ts:
            if t is None:
                continue
            if is_dtensor(t) or not (t.is_cpu and t.is_contiguous() and t.dtype in dtypes):
                return False
            if same_dtype and t.dtype != first.dtype:
                return False
            if t.requires_grad and torch.is_grad_enabled():
                return False
    return library() is not None


def _ptrs(ts: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


def _shapes(xs: Sequence[Tensor], dims: Sequence[int | SphereLayout]) -> ctypes.Array:
    """``(outer, n, inner)`` of each tensor: its :class:`SphereLayout`, or around one axis."""
    flat: list[int] = []
    for x, d in zip(xs, dims):
        lay = d if isinstance(d, SphereLayout) else sphere_layout(x.shape, d)
        flat += [lay.outer, lay.size, lay.inner]
    return (ctypes.c_int64 * len(flat))(*flat)


def _flag(t: Tensor | None) -> ctypes._Pointer | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_cpu:
        raise ValueError("found_inf must be a float32 CPU tensor for the native kernels")
    return ctypes.cast(t.data_ptr(), _f32p)


def _written(*lists: Sequence[Tensor]) -> None:
    ts = [t for ts in lists for t in ts]
    if ts:
        torch.autograd.graph.increment_version(ts)


def riemannian_adam(
    xs: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    vmaxs: list[Tensor],
    steps: list[Tensor],
    dims: Sequence[int | SphereLayout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    row: bool,
    exp: bool,
    found_inf: Tensor | None,
) -> None:
    """One RiemannianAdam step of sphere tensors ``xs`` (float32 step counters ``steps``
    read and incremented); nothing changes when ``found_inf`` is nonzero."""
    lib = library()
    assert lib is not None
    lib.st_riemannian_adam(
        _DTYPE_CODE[xs[0].dtype],
        len(xs),
        _ptrs(xs),
        _ptrs(gs),
        _ptrs(ms),
        _ptrs(vs),
        _ptrs(vmaxs) if vmaxs else None,
        _ptrs(steps),
        _shapes(xs, dims),
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        int(maximize),
        int(row),
        int(exp),
        int(bool(vmaxs)),
        _flag(found_inf),
        torch.get_num_threads(),
    )
    _written(xs, ms, vs, vmaxs, steps)


def riemannian_sgd(
    xs: list[Tensor],
    gs: list[Tensor],
    bufs: list[Tensor],
    dims: Sequence[int | SphereLayout],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    exp: bool,
    first: bool,
    found_inf: Tensor | None,
) -> None:
    """One RiemannianSGD step (``bufs`` empty: no momentum; ``first``: the buffers are set to
    the Riemannian gradient, as torch's first SGD step); nothing changes when ``found_inf``
    is nonzero."""
    lib = library()
    assert lib is not None
    lib.st_riemannian_sgd(
        _DTYPE_CODE[xs[0].dtype],
        len(xs),
        _ptrs(xs),
        _ptrs(gs),
        _ptrs(bufs) if bufs else None,
        _shapes(xs, dims),
        float(lr),
        float(momentum),
        float(dampening),
        int(nesterov),
        int(maximize),
        int(exp),
        int(first),
        _flag(found_inf),
        torch.get_num_threads(),
    )
    _written(xs, bufs)


def renormalize(
    xs: list[Tensor], dims: Sequence[int | SphereLayout], *, keep: Tensor | None = None
) -> None:
    r"""In place :math:`x \leftarrow x / \|x\|` along ``dims``: ``x`` times the reciprocal
    norm, computed from a float64 sum of squares and rounded once, within an ulp of the
    exactly rounded quotient; nothing changes when ``keep`` is nonzero."""
    lib = library()
    assert lib is not None
    code = _DTYPE_CODE[xs[0].dtype]
    lib.st_renormalize(
        code, len(xs), _ptrs(xs), _shapes(xs, dims), _flag(keep), torch.get_num_threads()
    )
    _written(xs)


def nonfinite(ts: Sequence[Tensor]) -> bool:
    """True when some element of the contiguous CPU tensors ``ts`` is infinite or NaN (an
    exact test reading each element once)."""
    lib = library()
    assert lib is not None
    n = len(ts)
    numels = (ctypes.c_int64 * n)(*[t.numel() for t in ts])
    codes = (ctypes.c_int * n)(*[_DTYPE_CODE[t.dtype] for t in ts])
    return bool(lib.st_nonfinite(n, _ptrs(ts), numels, codes, torch.get_num_threads()))
