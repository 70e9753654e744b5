r"""``torch.distributed`` support: DDP and FSDP2 for sphere models, and their checkpoints.

A run on ``N`` processes, each given ``1/N`` of the batch, computes what one process computes
on the whole batch (up to the order of floating-point sums), and every sphere parameter stays
unit along its axis. Under ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on CUDA)::

    import spheretorch.distributed as sd

    ctx = sd.init_from_env()                     # process group from torchrun's variables
    model = sd.wrap(NGPT(cfg), "fsdp", ctx)      # or "ddp"; build the optimizer *after* this
    opt = RenormAdam(model.parameters(), lr=...)
    for step in ...:
        idx = sd.local_batch(global_batch, ctx)  # this rank's equal share of the batch
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward(); opt.step(); opt.zero_grad()
        logged = sd.all_reduce_mean(loss)        # the full-batch mean, for metrics
    sd.save_sharded(run_dir / "dcp", model, opt, extra={"step": step})
    extra = sd.load_sharded(run_dir / "dcp", model, opt)  # into a freshly wrapped model/opt
    sd.cleanup()

:class:`Parallel` bundles all of this for a training loop (the trainer asks it for its rank,
its share of a batch, the wrapped model, agreement across ranks and checkpoint files).

What is communicated
--------------------
DDP (``mode="ddp"``)
    Parameters stay ordinary tensors (:class:`~spheretorch.SphereParameter` keeps its class),
    broadcast from rank 0 at wrapping; gradients are all-reduced and **averaged** in
    ``backward``, so every rank runs the same optimizer step on the same numbers.
FSDP2 (``mode="fsdp"``, :func:`fully_shard`)
    Every parameter becomes a ``DTensor`` sharded on dim 0; gradients are reduce-scattered and
    **averaged**. torch drops the ``SphereParameter`` class; :func:`fully_shard` puts
    ``sphere_dim`` back, and the optimizers then all-reduce exactly what needs a whole slice:
    norms and inner products along a sharded sphere axis (nGPT's ``dim=0`` output
    projections), :class:`~spheretorch.optim.RiemannianAdam`'s per-slice second moment (kept
    replicated), and the optimizers' own non-finite test. Along an unsharded axis everything
    is local.
Metrics
    :func:`all_reduce_mean` averages a scalar over ranks; rank 0 writes files
    (:func:`is_main_process`).

Checkpoints: :func:`save_atomic` writes one file atomically; under FSDP2 :func:`save_sharded`
writes a ``torch.distributed.checkpoint`` (DCP) directory (one shard file per rank, rank 0's
``extra.pt``) atomically through ``<path>.tmp`` and ``<path>.old``, and :func:`load_sharded`
reads it on any number of ranks (DCP reshards), falling back to ``<path>.old`` when a save
died between its two renames. :func:`full_state_dict` gathers an unsharded ``state_dict``.

Limitations
-----------
* Build the model (weights initialised) **before** sharding and the optimizer **after**.
  ``NGPT.reset_parameters`` replaces parameter objects: never call it on a sharded model.
* Under FSDP2 only ``forward`` all-gathers parameters: call the model, not helpers such as
  ``spheretorch.analysis.trajectory`` (load :func:`full_state_dict` into an unsharded copy).
* Equality with one process needs equal shares per rank: :func:`local_batch` insists on it.
* ``foreach=None`` picks the single-tensor implementation for DTensor parameters; with
  ``fused=True`` a non-finite step is skipped on the host (the flag needs an all-reduce).
* :func:`save_sharded` is atomic when every rank writes to one shared file system.
"""

from .checkpoint import (
    CHECKPOINT_FILE,
    EXTRA_FILE,
    SHARDED_CHECKPOINT,
    find_sharded,
    fsync_dir,
    full_state_dict,
    load_sharded,
    save_atomic,
    save_sharded,
)
from .parallel import Parallel
from .process import (
    MODES,
    DistributedContext,
    Mode,
    all_reduce_mean,
    cleanup,
    fully_shard,
    init_from_env,
    is_main_process,
    local_batch,
    shard_rows,
    unwrap,
    wrap,
)

__all__ = [
    "CHECKPOINT_FILE",
    "EXTRA_FILE",
    "MODES",
    "SHARDED_CHECKPOINT",
    "DistributedContext",
    "Mode",
    "Parallel",
    "all_reduce_mean",
    "cleanup",
    "find_sharded",
    "fsync_dir",
    "full_state_dict",
    "fully_shard",
    "init_from_env",
    "is_main_process",
    "load_sharded",
    "local_batch",
    "save_atomic",
    "save_sharded",
    "shard_rows",
    "unwrap",
    "wrap",
]
