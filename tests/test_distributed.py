"""DDP and FSDP2 (2 processes, gloo on CPU) against one process on the full batch.

Each scenario spawns two processes once (``torch.multiprocessing``, rendezvous through a file
in ``tmp_path``, so no port can collide) and runs several cases in them; every rank saves its
gathered results and the assertions run here, against a single-process reference computed in
this process. Models are float64 so that the only differences left are the order of the
floating-point sums (measured: about 1e-15; the issue's bound is 1e-5).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import spheretorch.distributed as sd
from spheretorch.models import GPT, NGPT, TransformerConfig
from spheretorch.optim import AdamH, RenormAdam, RiemannianAdam, RiemannianSGD, SphereMuon
from spheretorch.parameter import sphere_dim_of

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
)

WORLD = 2
TOL = 1e-5  # the bound on max |distributed - single process|
UNIT_TOL = {"float64": 1e-12, "float32": 1e-6}  # | ||slice|| - 1 |
CFG = dict(vocab_size=33, seq_len=8, n_layer=2, n_head=2, d_model=16, d_mlp=24)
BATCH = 4  # 2 sequences per rank
STEPS = 4
LR = 1e-2
POISONED = "blocks.0.attn.proj.weight"  # a dim=0 sphere matrix, sharded along its axis


# ---------------------------------------------------------------------------- shared set-up


def make_model(kind: str = "ngpt", seed: int = 0, dtype: str = "float64") -> nn.Module:
    torch.manual_seed(seed)
    cls = {"ngpt": NGPT, "gpt": GPT}[kind]
    return cls(TransformerConfig(**CFG)).to(getattr(torch, dtype))


def batches(n: int = STEPS) -> list[Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [
        torch.randint(0, CFG["vocab_size"], (BATCH, CFG["seq_len"] + 1), generator=g)
        for _ in range(n)
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[Tensor], ctx=None) -> None:
    """``len(data)`` steps; with ``ctx`` each rank takes its share of every batch."""
    for b in data:
        if ctx is not None:
            b = sd.local_batch(b, ctx)
        opt.zero_grad(set_to_none=True)
        loss = model(b[:, :-1], b[:, 1:])[1]
        loss.backward()
        opt.step()


#: name -> (model kind, optimizer factory taking the model)
OPTIMIZERS: dict[str, tuple[str, Callable[[nn.Module], torch.optim.Optimizer]]] = {
    "renorm": ("ngpt", lambda m: RenormAdam(m.parameters(), lr=LR)),
    "renorm-foreach": ("ngpt", lambda m: RenormAdam(m.parameters(), lr=LR, foreach=True)),
    "renorm-fused": ("ngpt", lambda m: RenormAdam(m.parameters(), lr=LR, fused=True)),
    "radam": ("ngpt", lambda m: RiemannianAdam(m.parameters(), lr=LR)),
    "radam-foreach": ("ngpt", lambda m: RiemannianAdam(m.parameters(), lr=LR, foreach=True)),
    "radam-coord-exp-ams": (
        "ngpt",
        lambda m: RiemannianAdam(
            m.parameters(), lr=LR, second_moment="coordinate", retraction="exp", amsgrad=True
        ),
    ),
    "radam-exp-ams-foreach": (
        "ngpt",
        lambda m: RiemannianAdam(
            m.parameters(), lr=LR, retraction="exp", amsgrad=True, foreach=True
        ),
    ),
    "rsgd": (
        "ngpt",
        lambda m: RiemannianSGD(
            m.parameters(), lr=0.1, momentum=0.9, nesterov=True, retraction="exp"
        ),
    ),
    "rsgd-foreach": (
        "ngpt",
        lambda m: RiemannianSGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True),
    ),
    "gpt-renorm-adamw": (
        "gpt",
        lambda m: RenormAdam(m.param_groups(0.1), lr=LR, decoupled_weight_decay=True),
    ),
    # the Muon family: Newton-Schulz (bfloat16) on each gathered matrix, then redistributed
    "sphere-muon": ("ngpt", lambda m: SphereMuon(m.parameters(), lr=LR)),
    "gpt-muon": ("gpt", lambda m: SphereMuon(m.parameters(), lr=LR, weight_decay=0.1)),
    "adamh-riemannian-angular": (
        "ngpt",
        lambda m: AdamH(m.parameters(), lr=LR, ordering="riemannian", angular=True),
    ),
}
#: (optimizer, dtype): float64 leaves only the order of sums; float32 is what users train in
DDP_CASES = [(c, dt) for c in ("renorm", "radam") for dt in ("float64", "float32")]
FSDP_CASES = [(c, "float64") for c in OPTIMIZERS] + [(c, "float32") for c in ("renorm", "radam")]
#: FSDP2 cases with every matrix sharded on dim 1: dim=1 sphere rows split across ranks
SHARD1_CASES = [("radam", "float64"), ("renorm-foreach", "float64"), ("sphere-muon", "float64")]
CHECKPOINT_CASES = ["radam", "renorm"]
NONFINITE_CASES = ["radam", "renorm-fused", "adamh-riemannian-angular"]


def shard_dim1(p: nn.Parameter) -> Any:
    from torch.distributed.tensor import Shard

    return Shard(1) if p.dim() == 2 else None


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (DTensors are gathered), detached, cloned."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def full_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: full(p) for n, p in sd.unwrap(model).named_parameters()}


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Tensor]]:
    out = {}
    for n, p in sd.unwrap(model).named_parameters():
        out[n] = {k: full(v) for k, v in opt.state[p].items() if isinstance(v, Tensor)}
    return out


def sphere_dims(model: nn.Module) -> dict[str, int | None]:
    return {n: sphere_dim_of(p) for n, p in sd.unwrap(model).named_parameters()}


@functools.cache
def reference(case: str, dtype: str = "float64") -> tuple[dict, dict, dict]:
    """One process, full batches: parameters, optimizer state, initial parameters."""
    kind, factory = OPTIMIZERS[case]
    model = make_model(kind, dtype=dtype)
    init = full_params(model)
    opt = factory(model)
    train(model, opt, batches())
    return full_params(model), full_state(model, opt), init


def max_error(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def unit_error(params: dict[str, Tensor], dims: dict[str, int | None]) -> float:
    """max | ||slice|| - 1 | over every sphere matrix (full tensors), along its axis
    (0 for a model without any, e.g. GPT)."""
    errs = [
        (params[n].norm(dim=d) - 1).abs().max().item() for n, d in dims.items() if d is not None
    ]
    return max(errs, default=0.0)


# ---------------------------------------------------------------------------- spawning


def _worker(rank: int, scenario: str, tmp: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    try:
        ctx = sd.DistributedContext(rank, WORLD, rank, torch.device("cpu"), "gloo")
        out = SCENARIOS[scenario](ctx, Path(tmp))
        torch.save(out, Path(tmp) / f"{scenario}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(scenario: str, tmp: Path) -> None:
    """Run ``SCENARIOS[scenario]`` on 2 processes; each rank saves its results in ``tmp``."""
    mp.spawn(_worker, args=(scenario, str(tmp)), nprocs=WORLD, join=True)


# ---------------------------------------------------------------------------- scenarios
# (run inside the spawned processes)


def _ddp(ctx: sd.DistributedContext, tmp: Path) -> dict[str, Any]:
    out = {}
    for case, dtype in DDP_CASES:
        kind, factory = OPTIMIZERS[case]
        # (the float32 runs leave ctx out: wrap then reads the initialised process group)
        model = sd.wrap(make_model(kind, dtype=dtype), "ddp", ctx if dtype == "float64" else None)
        opt = factory(model)
        train(model, opt, batches(), ctx)
        out[case, dtype] = {"params": full_params(model), "dims": sphere_dims(model)}
    # the DCP helpers take a DDP model too (keys without "module.")
    sd.save_sharded(tmp / "ckpt-ddp", model, opt, extra={"case": DDP_CASES[-1]})
    return out


def _fsdp_case(ctx, case: str, dtype: str = "float64", **shard_kwargs: Any) -> dict[str, Any]:
    kind, factory = OPTIMIZERS[case]
    model = sd.wrap(make_model(kind, dtype=dtype), "fsdp", ctx, **shard_kwargs)
    opt = factory(model)
    train(model, opt, batches(), ctx)
    per_slice = {}  # RiemannianAdam's per-slice second moments, as stored on this rank
    for n, p in model.named_parameters():
        v = opt.state[p].get("exp_avg_sq")
        if sphere_dim_of(p) is not None and v is not None and v.shape != p.shape:
            per_slice[n] = (str(v.placements), v.to_local().clone(), str(p.placements))
    return {
        "params": full_params(model),
        "state": full_state(model, opt),
        "dims": sphere_dims(model),
        "dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "per_slice": per_slice,
    }


def _nonfinite(ctx, case: str, policy: str) -> dict[str, Any]:
    """One clean step, then a NaN in rank 1's shard of one gradient, then a clean step."""
    kind, factory = OPTIMIZERS[case]
    model = sd.wrap(make_model(kind), "fsdp", ctx)
    opt = factory(model)
    opt.nonfinite = policy
    data = batches(3)
    train(model, opt, data[:1], ctx)
    before = full_params(model)
    b = sd.local_batch(data[1], ctx)
    opt.zero_grad(set_to_none=True)
    model(b[:, :-1], b[:, 1:])[1].backward()
    target = dict(model.named_parameters())[POISONED]
    if ctx.rank == 1:
        target.grad.to_local()[0, 0] = float("nan")
    error = None
    try:
        opt.step()
    except FloatingPointError as e:
        error = str(e)
    after_bad = full_params(model)
    steps = {n: float(opt.state[p]["step"]) for n, p in model.named_parameters()}
    skipped = opt.skipped_steps
    train(model, opt, data[2:], ctx)  # must not hang: all ranks took the same branch
    return {
        "error": error,
        "skipped": skipped,
        "unchanged": max_error(before, after_bad),
        "steps": steps,
        "moved_after": max_error(after_bad, full_params(model)),
    }


def _fsdp(ctx: sd.DistributedContext, tmp: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    out: dict[str, Any] = {"cases": {}, "shard1": {}}
    for case, dtype in FSDP_CASES:
        out["cases"][case, dtype] = _fsdp_case(ctx, case, dtype)
    for case, dtype in SHARD1_CASES:
        out["shard1"][case, dtype] = _fsdp_case(ctx, case, dtype, shard_placement_fn=shard_dim1)
    # Negative control: torch's own fully_shard drops sphere_dim, so nothing is renormalised.
    model = make_model()
    for block in model.blocks:
        torch_fully_shard(block)
    torch_fully_shard(model)
    opt = OPTIMIZERS["renorm"][1](model)
    train(model, opt, batches(), ctx)
    out["torch_fully_shard"] = {"params": full_params(model), "dims": sphere_dims(model)}
    return out


def _nonfinite_all(ctx: sd.DistributedContext, tmp: Path) -> dict[str, Any]:
    return {
        (case, policy): _nonfinite(ctx, case, policy)
        for case in NONFINITE_CASES
        for policy in ("skip", "raise")
    }


def _checkpoint(ctx: sd.DistributedContext, tmp: Path) -> dict[str, Any]:
    out = {}
    data = batches()
    for case in CHECKPOINT_CASES:
        kind, factory = OPTIMIZERS[case]
        path = tmp / f"ckpt-{case}"
        model = sd.wrap(make_model(kind), "fsdp", ctx)
        opt = factory(model)
        train(model, opt, data[:1], ctx)
        sd.save_sharded(path, model, opt, extra={"step": 1})
        train(model, opt, data[1:2], ctx)
        sd.save_sharded(path, model, opt, extra={"step": 2, "note": "replaces the first"})
        at_save = full_params(model)
        train(model, opt, data[2:], ctx)
        uninterrupted = full_params(model), full_state(model, opt)
        # A fresh model with other weights and a fresh optimizer: everything must be loaded.
        model2 = sd.wrap(make_model(kind, seed=1), "fsdp", ctx)
        opt2 = factory(model2)
        extra = sd.load_sharded(path, model2, opt2)
        loaded = full_params(model2)
        dims_after_load = sphere_dims(model2)
        gathered = sd.full_state_dict(model2)  # rank 0: every tensor; others: nothing
        train(model2, opt2, data[2:], ctx)
        out[case] = {
            "extra": extra,
            "loaded_vs_saved": max_error(loaded, at_save),
            "full_state_dict": gathered,
            "at_save": at_save,
            "dims": dims_after_load,
            "uninterrupted": uninterrupted,
            "resumed": (full_params(model2), full_state(model2, opt2)),
            "files": sorted(p.name for p in tmp.iterdir() if p.name.startswith("ckpt")),
        }
    return out


SCENARIOS: dict[str, Callable[[sd.DistributedContext, Path], dict[str, Any]]] = {
    "ddp": _ddp,
    "fsdp": _fsdp,
    "nonfinite": _nonfinite_all,
    "checkpoint": _checkpoint,
}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _one_thread():
    """The models are tiny: one thread (several contend badly on a busy 2-core machine,
    where the single-process references took 100x longer with two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shared_results(scenario: str, tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """Run a scenario once per test session, also under pytest-xdist: the first worker to
    need it spawns the processes while holding a file lock; the others wait and read."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # shared by all workers of this session
    tmp = root / f"spheretorch-distributed-{scenario}"
    with FileLock(f"{tmp}.lock"):
        failed = tmp / "FAILED"
        if failed.exists():
            pytest.fail(f"scenario {scenario!r} failed in another worker:\n{failed.read_text()}")
        if not (tmp / "DONE").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                spawn(scenario, tmp)
            except Exception as e:
                failed.write_text(f"{type(e).__name__}: {e}")
                raise
            (tmp / "DONE").touch()
    results = [torch.load(tmp / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, results


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict[str, Any]]:
    return shared_results("ddp", tmp_path_factory)[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict[str, Any]]:
    return shared_results("fsdp", tmp_path_factory)[1]


@pytest.fixture(scope="module")
def nonfinite_results(tmp_path_factory) -> list[dict[str, Any]]:
    return shared_results("nonfinite", tmp_path_factory)[1]


@pytest.fixture(scope="module")
def checkpoint_results(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    return shared_results("checkpoint", tmp_path_factory)


def assert_matches_reference(result: dict[str, Any], case: str, dtype: str = "float64") -> None:
    params, _, init = reference(case, dtype)
    moved = max_error(params, init)
    assert moved > 100 * TOL, f"{case}: the reference hardly moved ({moved:.2e})"
    err = max_error(result["params"], params)
    assert err <= TOL, f"{case} {dtype}: max |distributed - single process| = {err:.3e}"
    assert unit_error(result["params"], result["dims"]) <= UNIT_TOL[dtype]


# ---------------------------------------------------------------------------- DDP


@pytest.mark.parametrize(("case", "dtype"), DDP_CASES)
def test_ddp_equals_one_process_on_the_full_batch(ddp_results, case, dtype):
    ref_dims = sphere_dims(make_model(OPTIMIZERS[case][0]))
    for rank, res in enumerate(ddp_results):
        # the SphereParameter class (and so the sphere axis) survives DDP untouched
        assert res[case, dtype]["dims"] == ref_dims, f"rank {rank}"
        assert_matches_reference(res[case, dtype], case, dtype)


# ---------------------------------------------------------------------------- FSDP2


@pytest.mark.parametrize(("case", "dtype"), FSDP_CASES)
def test_fsdp_equals_one_process_on_the_full_batch(fsdp_results, case, dtype):
    ref_dims = sphere_dims(make_model(OPTIMIZERS[case][0]))
    for res in fsdp_results:
        r = res["cases"][case, dtype]
        assert r["dtensor"], "fully_shard should have made every parameter a DTensor"
        assert r["dims"] == ref_dims  # sphere_dim re-attached to the DTensor parameters
        assert_matches_reference(r, case, dtype)


@pytest.mark.parametrize(("case", "dtype"), SHARD1_CASES)
def test_fsdp_shard_dim1_splits_sphere_rows(fsdp_results, case, dtype):
    for res in fsdp_results:
        assert_matches_reference(res["shard1"][case, dtype], case, dtype)


def test_fsdp_optimizer_state_matches_reference(fsdp_results):
    for case in ("radam", "radam-foreach", "renorm", "rsgd"):
        _, ref_state, _ = reference(case)
        for res in fsdp_results:
            state = res["cases"][case, "float64"]["state"]
            for name, ref in ref_state.items():
                for key, value in ref.items():
                    err = (state[name][key] - value).abs().max().item()
                    assert err <= TOL, f"{case} {name} {key}: {err:.2e}"


@pytest.mark.parametrize("where", ["cases", "shard1"])
def test_fsdp_per_slice_second_moment_is_replicated_and_consistent(fsdp_results, where):
    """RiemannianAdam's per-slice second moment of a slice split across ranks is one
    replicated number per slice, equal on both ranks; otherwise it is sharded like the
    parameter's other axis."""
    r0, r1 = (res[where]["radam", "float64"]["per_slice"] for res in fsdp_results)
    ngpt = make_model()
    assert set(r0) == {n for n, p in ngpt.named_parameters() if sphere_dim_of(p) is not None}
    sharded_dim = 0 if where == "cases" else 1
    for name, (placements, local0, p_placements) in r0.items():
        d = sphere_dim_of(dict(ngpt.named_parameters())[name])
        placements1, local1, _ = r1[name]
        assert placements == placements1
        if d == sharded_dim:
            assert placements == "(Replicate(),)", (name, placements, p_placements)
            assert torch.equal(local0, local1), name
        else:
            assert placements == p_placements, (name, placements, p_placements)


def test_torch_fully_shard_loses_the_sphere(fsdp_results):
    """Negative control: with torch's fully_shard the optimizer sees no sphere parameter,
    so the same comparison fails loudly (the oracle above can fail)."""
    res = fsdp_results[0]["torch_fully_shard"]
    assert all(d is None for d in res["dims"].values())
    params, _, _ = reference("renorm")
    assert max_error(res["params"], params) > 1e-3
    dims = sphere_dims(make_model())
    assert unit_error(res["params"], dims) > 1e-3


@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_fsdp_nonfinite_gradient_on_one_rank_is_seen_by_all(nonfinite_results, case):
    """A NaN in rank 1's shard only: with "skip" both ranks skip the step (nothing changes,
    no step counter moves) and train on afterwards; with "raise" both raise."""
    skip = [res[case, "skip"] for res in nonfinite_results]
    for r in skip:
        assert r["error"] is None
        assert r["skipped"] == 1
        assert r["unchanged"] == 0.0
        assert set(r["steps"].values()) == {1.0}
        assert r["moved_after"] > 0.0
    raised = [res[case, "raise"] for res in nonfinite_results]
    for r in raised:
        assert r["error"] is not None and "non-finite gradient" in r["error"]
        assert r["unchanged"] == 0.0
    assert raised[0]["error"] == raised[1]["error"]  # both name the same parameter


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_fsdp_checkpoint_resume_equals_uninterrupted_run(checkpoint_results, case):
    for res in checkpoint_results[1]:
        r = res[case]
        assert r["extra"] == {"step": 2, "note": "replaces the first"}
        assert r["loaded_vs_saved"] == 0.0
        assert r["dims"] == sphere_dims(make_model(OPTIMIZERS[case][0]))
        (p_a, s_a), (p_b, s_b) = r["uninterrupted"], r["resumed"]
        assert max_error(p_a, p_b) == 0.0  # bitwise: same shards, same operations
        for name in s_a:
            for key in s_a[name]:
                assert torch.equal(s_a[name][key], s_b[name][key]), (name, key)
        # the second save replaced the first; no temporary directory is left behind
        done = CHECKPOINT_CASES[: CHECKPOINT_CASES.index(case) + 1]
        assert r["files"] == [f"ckpt-{c}" for c in done]


def test_ddp_checkpoint_loads_into_one_process(tmp_path_factory, ddp_results):
    tmp, _ = shared_results("ddp", tmp_path_factory)
    case, dtype = DDP_CASES[-1]
    kind, factory = OPTIMIZERS[case]
    model = make_model(kind, seed=1, dtype=dtype)
    assert sd.load_sharded(tmp / "ckpt-ddp", model, factory(model)) == {"case": (case, dtype)}
    assert max_error(full_params(model), ddp_results[0][case, dtype]["params"]) == 0.0


def test_full_state_dict_gathers_on_rank0(checkpoint_results):
    r0, r1 = (res["radam"] for res in checkpoint_results[1])
    assert r1["full_state_dict"] == {}
    # gathered right after loading: exactly the saved parameters, as plain CPU tensors
    assert all(type(t) is torch.Tensor for t in r0["full_state_dict"].values())
    assert max_error(r0["full_state_dict"], r0["at_save"]) == 0.0


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_fsdp_checkpoint_loads_into_one_process(checkpoint_results, case):
    """DCP reshards: the 2-rank checkpoint loads into an unsharded model and optimizer in
    this process, which then continues like the 2-rank run."""
    tmp, results = checkpoint_results
    kind, factory = OPTIMIZERS[case]
    model = make_model(kind, seed=1)
    opt = factory(model)
    extra = sd.load_sharded(tmp / f"ckpt-{case}", model, opt)
    assert extra["step"] == 2
    train(model, opt, batches()[2:])
    err = max_error(full_params(model), results[0][case]["uninterrupted"][0])
    assert err <= TOL
    assert unit_error(full_params(model), sphere_dims(model)) <= UNIT_TOL["float64"]


# ---------------------------------------------------------------------------- single process


def test_single_process_save_load_roundtrip_and_recovery(tmp_path):
    model, opt = make_model(), OPTIMIZERS["radam"][1]
    opt = opt(model)
    train(model, opt, batches(2))
    path = sd.save_sharded(tmp_path / "ck", model, opt, extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    model2 = make_model(seed=3)
    opt2 = OPTIMIZERS["radam"][1](model2)
    assert sd.load_sharded(path, model2, opt2) == {"step": 2}
    assert max_error(full_params(model), full_params(model2)) == 0.0
    # a save killed between its two renames leaves <path>.old: load_sharded falls back to it
    path.rename(tmp_path / "ck.old")
    model3 = make_model(seed=4)
    assert sd.load_sharded(path, model3) == {"step": 2}
    assert max_error(full_params(model), full_params(model3)) == 0.0


def test_load_sharded_errors_name_the_path(tmp_path):
    model = make_model()
    with pytest.raises(FileNotFoundError, match=r"no sharded checkpoint at .*missing"):
        sd.load_sharded(tmp_path / "missing", model)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"foreign is not a torch\.distributed\.checkpoint"):
        sd.load_sharded(tmp_path / "foreign", model)


def test_wrap_and_local_batch_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="mode must be one of"):
        sd.wrap(model, "zero3")
    assert sd.wrap(model, "none") is model
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="needs an initialised process group"):
            sd.wrap(model, "ddp")
    ctx = sd.DistributedContext(1, 2, 1, torch.device("cpu"), "gloo")
    x = torch.arange(12).view(6, 2)
    assert torch.equal(sd.local_batch(x, ctx), x[1::2])  # rows rank::world (shard_rows)
    with pytest.raises(ValueError, match="batch size 5 is not divisible by the world size 2"):
        sd.local_batch(x[:5], ctx)
    assert sd.unwrap(model) is model
    assert math.isclose(float(sd.all_reduce_mean(torch.tensor(3.0))), 3.0)
