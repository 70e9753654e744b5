r"""``torch.distributed`` support: DDP and FSDP2 for sphere models, and sharded checkpoints.

spheretorch runs on ``torch.distributed`` unchanged in meaning: a run on ``N`` processes, each
given ``1/N`` of the batch, computes what one process computes on the whole batch (up to the
order of floating-point sums), and every sphere parameter stays unit along its axis.

Usage (under ``torchrun --nproc-per-node N``; gloo on CPU, nccl on CUDA)::

    import spheretorch.distributed as sd

    ctx = sd.init_from_env()                     # process group from torchrun's variables
    model = sd.wrap(NGPT(cfg), "fsdp", ctx)      # or "ddp"; build the optimizer *after* this
    opt = RenormAdam(model.parameters(), lr=...)  # or RiemannianAdam / RiemannianSGD
    for step in ...:
        idx = sd.local_batch(global_batch, ctx)  # this rank's equal share of the batch
        loss = model(idx[:, :-1], idx[:, 1:])[1]  # mean over the local share
        loss.backward(); opt.step(); opt.zero_grad()
        logged = sd.all_reduce_mean(loss)        # the full-batch mean, for metrics
    sd.save_sharded(run_dir / "dcp", model, opt, extra={"step": step})
    extra = sd.load_sharded(run_dir / "dcp", model, opt)  # into a freshly wrapped model/opt
    sd.cleanup()

What is communicated
--------------------
DDP (``mode="ddp"``)
    The parameters stay ordinary tensors (:class:`~spheretorch.SphereParameter` keeps its
    class) and are broadcast from rank 0 once at wrapping. During ``backward`` the gradients
    are all-reduced and **averaged**, so with equal shares per rank they are the gradients
    of the full-batch mean loss. Every rank then runs the same optimizer step on the same
    numbers, so the parameters stay identical without further communication; the optimizers
    need nothing distributed.
FSDP2 (``mode="fsdp"``, :func:`fully_shard`)
    Every parameter becomes a ``DTensor`` sharded on dim 0 (or as ``shard_placement_fn``
    says); forward and backward all-gather them, and the gradients are reduce-scattered and
    **averaged**. torch's ``fully_shard`` drops the ``SphereParameter`` class and its
    ``sphere_dim``; :func:`fully_shard` here puts ``sphere_dim`` back on the sharded
    parameters, and the optimizers read it through :func:`spheretorch.parameter.sphere_dim_of`.
    Each optimizer step then all-reduces exactly what needs the whole slice:

    * norms and inner products along a sphere axis that is sharded (nGPT's ``dim=0`` output
      projections ``attn.proj`` and ``mlp.down`` under the default ``Shard(0)``; any
      ``dim=1`` matrix whose rows are split by ``Shard(1)``): a DTensor reduction, so the
      renormalisation :math:`x/\|x\|`, the tangent projection
      :math:`g - \langle x, g\rangle x` and the retraction use the full slice. Along an
      unsharded axis (``dim=1`` matrices under ``Shard(0)``: whole rows per rank) they are
      local, with no communication;
    * :class:`~spheretorch.optim.RiemannianAdam`'s per-slice second moment
      :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\|r_t\|^2` for a sharded axis: the state has
      size 1 along that axis, is **replicated** on every rank, and is updated from the
      all-reduced :math:`\|r_t\|^2`, so all ranks hold the same numbers;
    * the non-finite gradient test (``nonfinite="skip" | "raise"``): one reduction over all
      shards, so every rank skips (or raises on) the same step.

    Euclidean parameters (GPT's, nGPT's scaling vectors) get torch's Adam on their shards.
Metrics
    Nothing else is synchronised: :func:`all_reduce_mean` averages a scalar (a loss) over
    ranks for logging; write metrics and files from rank 0 (:func:`is_main_process`).

Checkpoints under FSDP2 go through ``torch.distributed.checkpoint`` (DCP):
:func:`save_sharded` writes one shard file per rank plus DCP's metadata into a directory,
:func:`load_sharded` reads it into a freshly wrapped model and optimizer (on any number of
ranks: DCP reshards). :func:`full_state_dict` gathers an ordinary, unsharded ``state_dict``
(for a single-file checkpoint or sampling on one process).

Limitations
-----------
* Build the model (weights initialised) **before** sharding and the optimizer **after**
  wrapping. ``NGPT.reset_parameters`` replaces parameter objects (it creates
  ``SphereParameter``\s), so it must not be called on a sharded model, and meta-device
  initialisation followed by ``reset_parameters`` is not supported.
* Under FSDP2 only a module's ``forward`` all-gathers its parameters: call the model
  (``model(idx, targets)``), not helpers such as ``hidden_states`` or
  ``spheretorch.analysis.trajectory``, which bypass ``forward``; for analysis load
  :func:`full_state_dict` into an unsharded copy on one process.
* The equality with one process on the whole batch needs equal shares per rank (the mean
  of per-rank means is then the full mean): :func:`local_batch` insists on it.
* ``foreach=None`` picks the single-tensor implementation for DTensor parameters;
  ``foreach=True`` (and ``RenormAdam(fused=True)``) work too and give the same numbers up
  to rounding, but stack nothing there. With ``fused=True`` a non-finite step is skipped on
  the host (the flag needs an all-reduce anyway), not inside the kernel.
* ``torch.nn.utils.clip_grad_norm_`` works on FSDP2 gradients and returns the total norm
  as a replicated DTensor (``.full_tensor()`` gives an ordinary tensor for logging).
* :func:`save_sharded` is atomic when every rank writes to one shared file system: DCP writes
  into ``<path>.tmp`` and rank 0 then renames it to ``<path>`` (the previous checkpoint is
  moved to ``<path>.old`` for the instant in between, and :func:`load_sharded` falls back to
  it if the process dies there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .parameter import sphere_dim_of

__all__ = [
    "EXTRA_FILE",
    "MODES",
    "DistributedContext",
    "Mode",
    "all_reduce_mean",
    "cleanup",
    "full_state_dict",
    "fully_shard",
    "init_from_env",
    "is_main_process",
    "load_sharded",
    "local_batch",
    "save_sharded",
    "unwrap",
    "wrap",
]

Mode = Literal["none", "ddp", "fsdp"]
MODES: tuple[str, ...] = ("none", "ddp", "fsdp")
#: file in a sharded checkpoint directory that holds ``extra`` (written by rank 0)
EXTRA_FILE = "extra.pt"


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _initialized():
        dist.barrier()


# ---------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size``, its ``device`` and ``backend``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str | torch.device | None = None) -> DistributedContext:
    """Initialise the default process group from torchrun's environment variables.

    Uses ``nccl`` when the device is CUDA and ``gloo`` otherwise. Without ``WORLD_SIZE`` in the
    environment (not launched by torchrun) returns a single-process context and initialises
    nothing.
    """
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return DistributedContext(0, 1, 0, dev, None)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistributedContext(rank, world, local, dev, backend)


def _context() -> DistributedContext:
    """The context of an already initialised process group (CPU unless it is nccl)."""
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(rank, world, local, dev, backend)


def is_main_process() -> bool:
    """True on rank 0 or when no process group is initialised."""
    return not _initialized() or dist.get_rank() == 0


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over ranks (returns ``value`` unchanged without a process group)."""
    if not _initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def cleanup() -> None:
    """Destroy the default process group if one is initialised."""
    if _initialized():
        dist.destroy_process_group()


def local_batch(batch: Tensor, ctx: DistributedContext) -> Tensor:
    """This rank's contiguous share of ``batch`` along dim 0: rows
    ``[rank * B/N, (rank + 1) * B/N)`` of a ``(B, ...)`` tensor.

    Raises ``ValueError`` unless ``B`` is a multiple of the world size ``N``: with unequal
    shares the average of the per-rank mean losses (what DDP and FSDP2 differentiate) would
    not be the full-batch mean.
    """
    if not isinstance(batch, Tensor) or batch.dim() == 0:
        raise ValueError("batch must be a tensor with a batch axis (dim 0)")
    b, n = batch.shape[0], ctx.world_size
    if b % n:
        raise ValueError(
            f"batch size {b} is not divisible by the world size {n}: every rank needs an "
            f"equal share (use a batch size that is a multiple of {n})"
        )
    share = b // n
    return batch[ctx.rank * share : (ctx.rank + 1) * share]


# ---------------------------------------------------------------------------- wrapping


def fully_shard(module: nn.Module, **kwargs: Any) -> nn.Module:
    """:func:`torch.distributed.fsdp.fully_shard` that keeps each parameter's ``sphere_dim``.

    Same arguments and return value as torch's. Call it bottom-up (blocks first, then the
    root) exactly as with torch's; parameters already sharded by an inner call keep their
    attribute.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    dims = {name: sphere_dim_of(p) for name, p in module.named_parameters()}
    out = torch_fully_shard(module, **kwargs)
    for name, p in module.named_parameters():
        if dims.get(name) is not None:
            p.sphere_dim = dims[name]
    return out


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Default FSDP2 units: the entries of a ``blocks`` ``ModuleList`` (the transformer
    layers of spheretorch's models); the root module always forms the last unit."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def wrap(
    model: nn.Module,
    mode: Mode,
    ctx: DistributedContext | None = None,
    *,
    units: Iterable[nn.Module] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Prepare ``model`` for data-parallel training; build the optimizer afterwards.

    Args:
        model: the module, weights initialised, on ``ctx.device``.
        mode: ``"ddp"`` (:class:`torch.nn.parallel.DistributedDataParallel`), ``"fsdp"``
            (FSDP2 via :func:`fully_shard`: each of ``units`` first, then ``model``) or
            ``"none"`` (returned unchanged).
        ctx: from :func:`init_from_env`; ``None`` reads the initialised process group.
        units: FSDP2 sub-modules sharded as separate units (each all-gathered only while it
            runs); default: the entries of ``model.blocks`` if that is an ``nn.ModuleList``.
        **kwargs: passed to ``DistributedDataParallel`` or to ``fully_shard`` (for example
            ``mp_policy``, ``reshard_after_forward``, ``shard_placement_fn``, ``mesh``).

    Returns:
        The DDP wrapper (``mode="ddp"``; :func:`unwrap` gives the model back) or ``model``
        itself, sharded in place (``mode="fsdp"``).

    Raises:
        ValueError: unknown ``mode``. RuntimeError: no process group initialised.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "none":
        return model
    if not _initialized():
        raise RuntimeError(
            f"wrap(mode={mode!r}) needs an initialised process group: launch with torchrun "
            f"and call spheretorch.distributed.init_from_env() first"
        )
    if ctx is None:
        ctx = _context()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    if "mesh" not in kwargs:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for unit in _shard_units(model) if units is None else units:
        fully_shard(unit, **kwargs)
    return fully_shard(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (``model.module``), else ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------------------- checkpoints


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """An ordinary ``state_dict`` of full (unsharded) CPU tensors, gathered on rank 0.

    Collective: every rank must call it. Rank 0 gets every tensor; the other ranks get an
    empty dict. Works for DDP, FSDP2 and plain modules (keys without DDP's ``module.``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories can't be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group: one process reading or
    writing a sharded checkpoint is a supported use here (e.g. resharding onto 1 rank)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"torch\.distributed is .*uninitialized", category=UserWarning
        )
        yield


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def save_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a DCP checkpoint of ``model`` (and ``optimizer``) into the directory ``path``.

    Collective: every rank calls it with the same ``path`` on a shared file system. Each
    rank writes its own shards (``torch.distributed.checkpoint.save`` of
    ``get_state_dict(model, optimizer)``), rank 0 writes ``extra`` (a dict of plain Python
    values and tensors, e.g. step, scheduler and RNG states) to ``extra.pt``. Everything goes
    to ``<path>.tmp`` first; once all ranks are done rank 0 renames it to ``path``, so a
    process killed while writing leaves the previous checkpoint in place. Returns ``path``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    path = Path(path)
    tmp, old = _sidecar(path, ".tmp"), _sidecar(path, ".old")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that died
        tmp.mkdir(parents=True)
    _barrier()
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=tmp, no_dist=not _initialized())
    if is_main_process():
        if extra is not None:
            with open(tmp / EXTRA_FILE, "wb") as f:
                torch.save(extra, f)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        found = path
    elif _sidecar(path, ".old").is_dir():  # died between the two renames of save_sharded
        found = _sidecar(path, ".old")
    else:
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    if not (found / ".metadata").is_file():
        raise ValueError(
            f"{found} is not a torch.distributed.checkpoint directory (no .metadata file)"
        )
    return found


@torch.no_grad()
def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the lazily built optimizer state with one step of zero gradients at ``lr = 0``,
    so that DCP has tensors (of the right shape and placement) to load into.

    The step renormalises sphere parameters (a change of an ulp at most): call it before the
    model's weights are loaded. Existing gradients are put back afterwards.
    """
    if optimizer.state:
        return
    saved: list[tuple[Tensor, Tensor | None]] = []
    lrs = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        lrs.append(lr)
        group["lr"] = torch.zeros_like(lr) if isinstance(lr, Tensor) else 0.0
        for p in group["params"]:
            if p.requires_grad:
                saved.append((p, p.grad))
                p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        for p, g in saved:
            p.grad = g


def load_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` into ``model`` (and ``optimizer``),
    in place; returns its ``extra`` dict (empty if none was saved).

    Collective. ``model`` must be wrapped as for training (any world size: DCP reshards) and
    ``optimizer`` built on it; its state is created first if the optimizer has not stepped
    yet. Sphere parameters keep their ``sphere_dim``. Raises ``FileNotFoundError`` /
    ``ValueError`` naming ``path`` when there is no checkpoint or it is not a DCP one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    found = _resolve_checkpoint(Path(path))
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        _init_optimizer_state(optimizer)
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=found, no_dist=not _initialized())
    except Exception as e:
        raise RuntimeError(f"cannot load the sharded checkpoint {found}: {e}") from e
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    extra_file = found / EXTRA_FILE
    return torch.load(extra_file, weights_only=True) if extra_file.is_file() else {}
