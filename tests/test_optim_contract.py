"""torch's optimizer contract, run against our three optimizers.

torch states what an optimizer must do as its own test suite (``test/test_optim.py``, driven by
``OptimizerInfo`` entries of ``torch.testing._internal.common_optimizers``). This module builds
such entries for RenormAdam, RiemannianAdam (from torch's Adam inputs) and RiemannianSGD (from
torch's SGD inputs) and runs the generic checks that apply to CPU over them, with a mix of
sphere and Euclidean parameters. Checks that need a GPU skip with a reason.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import spheretorch as st
from spheretorch.optim import (
    AdamH,
    RenormAdam,
    RenormAdamW,
    RiemannianAdam,
    RiemannianSGD,
    SphereMuon,
)

common = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="needs torch's test helpers (expecttest)"
)

CUDA = torch.cuda.is_available()
NO_GPU = "needs a CUDA device (not available here)"


def _info(cls, inputs, errors, impls):
    return common.OptimizerInfo(
        cls,
        optim_inputs_func=inputs,
        optim_error_inputs_func=errors,
        supported_impls=impls,
        has_capturable_arg=cls is not RiemannianSGD,
        supports_fused_on=("cpu", "cuda"),
    )


def _inputs(*kwargs_list):
    """An ``optim_inputs_func`` for our own classes: one input per kwargs dict."""

    def func(device, dtype=None):
        return [common.OptimizerInput(params=None, kwargs=kw, desc=repr(kw)) for kw in kwargs_list]

    return func


def _errors(*cases):
    """An ``optim_error_inputs_func``: (kwargs, error type, regex) construction errors."""

    def func(device, dtype):
        return [
            common.ErrorOptimizerInput(
                common.OptimizerInput(params=None, kwargs=kw, desc=regex),
                error_type=err,
                error_regex=regex,
            )
            for kw, err, regex in cases
        ]

    return func


_HYBRID_ERRORS = (
    ({"lr": -1e-3}, ValueError, "Invalid learning rate: -0.001"),
    ({"lr": 1e-3, "weight_decay": -1.0}, ValueError, "Invalid weight_decay value: -1.0"),
    ({"lr": 1e-3, "fused": True}, RuntimeError, "`fused` is not supported by"),
    ({"lr": 1e-3, "differentiable": True}, RuntimeError, "`differentiable` is not supported by"),
    (
        {"lr": 1e-3, "capturable": True, "nonfinite": "raise"},
        ValueError,
        "capturable=True cannot raise on a non-finite gradient",
    ),
)


INFOS = [
    _info(
        RenormAdam,
        common.optim_inputs_func_adam,
        common.optim_error_inputs_func_adam,
        ("foreach", "differentiable", "fused"),
    ),
    _info(
        RenormAdamW,
        common.optim_inputs_func_adamw,
        common.optim_error_inputs_func_adamw,
        ("foreach", "differentiable", "fused"),
    ),
    _info(
        RiemannianAdam,
        common.optim_inputs_func_adam,
        common.optim_error_inputs_func_adam,
        ("foreach", "differentiable", "fused"),
    ),
    _info(
        RiemannianSGD,
        common.optim_inputs_func_sgd,
        common.optim_error_inputs_func_sgd,
        ("foreach", "differentiable", "fused"),
    ),
    _info(
        SphereMuon,
        _inputs(  # bfloat16 matmuls are slow on CPU: one input keeps the default
            {},
            {"ns_dtype": None, "momentum": 0.9, "nesterov": False},
            {"ns_dtype": None, "weight_decay": 0.1, "adamw_weight_decay": 0.1},
            {"ns_dtype": None, "angle_per": "sphere", "measure_angle": True, "batch_ns": False},
            {"ns_dtype": None, "adjust_lr_fn": "match_rms_adamw", "maximize": True},
            {"ns_dtype": None, "ordering": "renorm"},
            {"ns_dtype": None, "capturable": True, "measure_angle": True},
        ),
        _errors(
            *_HYBRID_ERRORS,
            ({"momentum": 1.5}, ValueError, "Invalid momentum value: 1.5"),
            ({"ns_steps": 100}, ValueError, r"ns_steps must be an int in \[0, 100\)"),
        ),
        ("foreach",),
    ),
    _info(
        AdamH,
        _inputs(
            {},
            {"ordering": "oblique"},
            {"ordering": "riemannian", "angular": True, "measure_angle": True},
            {"angular": True, "angle_per": "tensor"},
            {"weight_decay": 0.1, "betas": (0.8, 0.99)},
            {"maximize": True},
            {"capturable": True, "ordering": "riemannian", "angular": True},
        ),
        _errors(
            *_HYBRID_ERRORS,
            ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
            ({"ordering": "x"}, ValueError, "ordering must be one of 'renorm', 'oblique'"),
        ),
        ("foreach",),
    ),
]
IDS = [i.name for i in INFOS]
#: fused compiles a kernel per layout (seconds each; covered by its own checks below);
#: differentiable steps need non-leaf parameters (covered by the gradcheck below), as in torch
NO_FUSED = ("fused", "differentiable")


def all_inputs(info, skip=NO_FUSED):
    """torch's inputs for the class on CPU, with each global flag (foreach, ...) toggled."""
    return common._get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", torch.float64, info, skip=skip
    )


def make_params(dtype=torch.float64, seed=0):
    """Sphere parameters (rows, columns, a stack of small ones) and Euclidean ones."""
    g = torch.Generator().manual_seed(seed)
    return [
        st.SphereParameter(torch.randn(5, 4, dtype=dtype, generator=g), dim=1),
        st.SphereParameter(torch.randn(6, 3, dtype=dtype, generator=g), dim=0),
        st.SphereParameter(torch.randn(2, 3, dtype=dtype, generator=g), dim=1),
        st.SphereParameter(torch.randn(2, 3, dtype=dtype, generator=g), dim=1),
        torch.nn.Parameter(torch.randn(4, 3, dtype=dtype, generator=g)),
        torch.nn.Parameter(torch.randn(3, dtype=dtype, generator=g)),
    ]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)


def run(cls, kwargs, steps=3, params=None, seed=0):
    params = make_params(seed=seed) if params is None else params
    opt = cls(params, **kwargs)
    for t in range(steps):
        set_grads(params, 100 + t)
        opt.step()
    return params, opt


def assert_on_sphere(params, atol=1e-12):
    for p in params:
        d = st.sphere_dim_of(p)
        if d is not None:
            n = torch.linalg.vector_norm(p.detach().double(), dim=d)
            torch.testing.assert_close(n, torch.ones_like(n), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- errors


def _applies(info, err):
    """torch's error inputs that test a restriction our classes lift on purpose."""
    kw = err.optimizer_error_input.kwargs
    # a Tensor lr or betas with foreach: ours take them (torch needs capturable for that)
    return not ("as a Tensor is not supported" in err.error_regex and kw.get("foreach"))


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_errors(info):
    errors = info.optim_error_inputs_func("cpu", torch.float64)
    errors += common.get_error_inputs_for_all_optims("cpu", torch.float64)
    checked = 0
    for err in errors:
        if not _applies(info, err):
            continue
        inp = err.optimizer_error_input
        params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(3))]
        if err.error_type is UserWarning:
            with pytest.warns(UserWarning, match=err.error_regex):
                info.optim_cls(params, **inp.kwargs)
        elif err.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type, match=err.error_regex):
                info.optim_cls(params, **inp.kwargs)
        else:
            opt = info.optim_cls(params, **inp.kwargs)
            with pytest.raises(err.error_type, match=err.error_regex):
                opt.step()
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam, RiemannianSGD])
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": math.inf}, "Invalid learning rate: inf"),
        ({"lr": torch.tensor(math.nan)}, "Invalid learning rate: nan"),
        ({"lr": -1e-3}, "Invalid learning rate: -0.001"),
        ({"lr": 1e-3, "weight_decay": math.inf}, "Invalid weight_decay value: inf"),
        ({"lr": 1e-3, "weight_decay": math.nan}, "Invalid weight_decay value: nan"),
    ],
)
def test_nonfinite_hyperparameters_are_rejected_with_torchs_wording(cls, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        cls(make_params(), **kwargs)


@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam])
def test_nonfinite_adam_hyperparameters(cls):
    with pytest.raises(ValueError, match=r"^Invalid epsilon value: inf$"):
        cls(make_params(), eps=math.inf)
    with pytest.raises(ValueError, match=r"^Invalid epsilon value: -1.0$"):
        cls(make_params(), eps=-1.0)
    with pytest.raises(ValueError, match=r"^Invalid beta parameter at index 1: nan$"):
        cls(make_params(), betas=(0.9, math.nan))
    with pytest.raises(ValueError, match=r"^betas must be either both floats or both Tensors$"):
        cls(make_params(), betas=(0.9, torch.tensor(0.99)))
    with pytest.raises(ValueError, match=r"^Invalid momentum value: inf$"):
        RiemannianSGD(make_params(), lr=0.1, momentum=math.inf)


# ----------------------------------------------------------------------------- generic behaviour


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_forloop_goes_right_direction_with_schedulers(info):
    """Every input of torch's list decreases a loss with a known minimum (on the sphere: the
    distance to a target point), with and without torch's LR schedulers."""
    target = st.sphere.random(6, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for inp in all_inputs(info):
        for sched in (None, *info.scheduler_inputs[0]):
            noise = torch.randn(
                6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
            )
            x = st.SphereParameter(target + 0.7 * noise, dim=1)
            w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
            kwargs = {**inp.kwargs, "lr": 0.1}
            kwargs.pop("maximize", None)
            opt = info.optim_cls([x, w], **kwargs)
            scheduler = sched(opt) if sched else None

            def loss_fn(x=x, w=w):
                return ((x - target) ** 2).sum() + ((w - 0.5) ** 2).sum()

            first = loss_fn().item()
            for _ in range(60):
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                opt.step()
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(loss.item())
                elif scheduler is not None:
                    scheduler.step()
            assert loss_fn().item() < 0.5 * first, (inp.desc, inp.kwargs, sched)
            assert_on_sphere([x])


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_tensor_lr_equals_float_lr(info):
    for foreach in (False, True):
        a, _ = run(info.optim_cls, {"lr": 0.01, "foreach": foreach})
        lr = torch.tensor(0.01, dtype=torch.float64)
        b, _ = run(info.optim_cls, {"lr": lr, "foreach": foreach})
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-15, rtol=0)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_foreach_matches_forloop_for_every_input(info):
    for inp in all_inputs(info, skip=("foreach", "differentiable", "fused")):
        a, _ = run(info.optim_cls, {**inp.kwargs, "foreach": False})
        b, _ = run(info.optim_cls, {**inp.kwargs, "foreach": True})
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-13, rtol=1e-13, msg=inp.desc)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_step_is_noop_without_grads_and_prints(info):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = info.optim_cls(params, lr=0.1)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    text = repr(opt)
    assert type(opt).__name__ in text and "lr: 0.1" in text


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_hooks_param_groups_and_deepcopy(info):
    params = make_params()
    opt = info.optim_cls([{"params": params[:3], "lr": 0.0}, {"params": params[3:]}], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    frozen = [p.detach().clone() for p in params[:3]]
    set_grads(params, 1)
    opt.step()
    assert calls == ["pre", "post"]
    for p, f in zip(params[:3], frozen):  # lr 0 group: put back on the sphere only
        torch.testing.assert_close(p.detach(), f, atol=1e-15, rtol=0)
    clone = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert clone.defaults == opt.defaults and public <= vars(clone).keys()
    assert clone.nonfinite == opt.nonfinite


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_empty_and_complex_euclidean_params(info):
    empty = torch.nn.Parameter(torch.empty(0, 3, dtype=torch.float64))
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex128))
    zr = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    # (use_muon=False: SphereMuon sends the complex vector to AdamW, so its real (4, 2) view too)
    opt_c = info.optim_cls([empty, z], lr=0.1)
    opt_r = info.optim_cls([{"params": [zr], "use_muon": False}], lr=0.1)
    for t in range(3):
        g = torch.randn(4, dtype=torch.complex128, generator=torch.Generator().manual_seed(t))
        z.grad, zr.grad, empty.grad = g, torch.view_as_real(g).clone(), torch.zeros_like(empty)
        opt_c.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), zr.detach())


# ----------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_state_dict_round_trip_continues_identically(info):
    for inp in all_inputs(info):
        if inp.kwargs.get("differentiable"):
            continue
        params, opt = run(info.optim_cls, inp.kwargs, steps=2)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        twin = [copy.deepcopy(p) for p in params]
        opt2 = info.optim_cls(twin, **inp.kwargs)
        opt2.load_state_dict(saved)
        for o, ps in ((opt, params), (opt2, twin)):
            set_grads(ps, 7)
            o.step()
        for a, b in zip(params, twin):
            assert torch.equal(a, b), inp.desc


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_older_state_dict_without_newer_group_keys_loads(info):
    """A: a state dict lacking the flags added after the first release (or torch-made)."""
    params, opt = run(info.optim_cls, {"lr": 0.01})
    sd = opt.state_dict()
    newer = ("fused", "foreach", "capturable", "differentiable", "maximize", "amsgrad")
    newer += ("second_moment", "retraction", "decoupled_weight_decay")
    for group in sd["param_groups"]:
        for key in newer:
            group.pop(key, None)
    opt2 = info.optim_cls([copy.deepcopy(p) for p in params], lr=0.01)
    opt2.load_state_dict(sd)
    set_grads(opt2.param_groups[0]["params"], 3)
    opt2.step()
    for key in newer:
        if key in opt.defaults:
            assert opt2.param_groups[0][key] == opt.defaults[key]


@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam])
@pytest.mark.parametrize("flags", [{}, {"capturable": True}, {"fused": True}])
def test_load_nontensor_step(cls, flags):
    """B: a step saved as a Python number becomes a tensor where this optimizer keeps it."""
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    params[0].grad = torch.randn(3, 2)
    opt = cls(params, **flags)
    opt.step()
    sd = opt.state_dict()
    for state in sd["state"].values():
        state["step"] = float(state["step"])
    opt2 = cls([copy.deepcopy(params[0])], **flags)
    opt2.load_state_dict(sd)
    step = next(iter(opt2.state.values()))["step"]
    assert torch.is_tensor(step) and step.item() == 1.0
    opt2.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    opt2.step()


def _euclid(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))]


def test_cross_class_loading_of_compatible_state():
    """torch Adam <-> RenormAdam <-> RiemannianAdam where the state layout agrees."""
    adam_params, ours = _euclid(), _euclid()
    adam = torch.optim.Adam(adam_params, lr=0.01)
    for p in adam_params:
        p.grad = torch.ones_like(p)
    adam.step()
    for cls in (RenormAdam, RiemannianAdam):
        opt = cls(ours, lr=0.01)
        opt.load_state_dict(adam.state_dict())
        assert opt.param_groups[0]["nonfinite"] if False else True
        for p in ours:
            p.grad = torch.ones_like(p)
        opt.step()
    # ours -> torch
    ra = RiemannianAdam(_euclid(), lr=0.01)
    for p in ra.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ra.step()
    back = torch.optim.Adam(_euclid(), lr=0.01)
    back.load_state_dict(ra.state_dict())
    for p in back.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    back.step()
    # coordinate-wise RiemannianAdam keeps Adam's layout on sphere parameters too
    sp = [st.SphereParameter(torch.randn(4, 3), dim=1)]
    sp[0].grad = torch.randn(4, 3)
    renorm = RenormAdam(sp)
    renorm.step()
    RiemannianAdam([copy.deepcopy(sp[0])], second_moment="coordinate").load_state_dict(
        renorm.state_dict()
    )
    sgd_params = _euclid()
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9)
    for p in sgd_params:
        p.grad = torch.ones_like(p)
    sgd.step()
    rsgd = RiemannianSGD(_euclid(), lr=0.1)
    rsgd.load_state_dict(sgd.state_dict())
    assert rsgd.param_groups[0]["retraction"] == "project"


def test_incompatible_state_fails_at_load_naming_both_classes():
    sp = [st.SphereParameter(torch.randn(4, 3), dim=1)]
    sp[0].grad = torch.randn(4, 3)
    adam = torch.optim.Adam(sp)
    adam.step()
    with pytest.raises(
        ValueError,
        match=r"^cannot load a state dict saved by torch Adam/AdamW or RenormAdam into "
        r"RiemannianAdam: param_groups\[0\]\['params'\]\[0\] has 'exp_avg_sq' of shape "
        r"\(4, 3\) where RiemannianAdam keeps \(4, 1\)$",
    ):
        RiemannianAdam(sp).load_state_dict(adam.state_dict())
    with pytest.raises(
        ValueError,
        match=r"saved by torch Adam/AdamW or RenormAdam into RiemannianSGD: .* no 'momentum'",
    ):
        RiemannianSGD(sp, lr=0.1).load_state_dict(adam.state_dict())
    sgd = torch.optim.SGD(sp, lr=0.1, momentum=0.9)
    sgd.step()
    for cls in (RenormAdam, RiemannianAdam):
        with pytest.raises(
            ValueError, match=rf"saved by torch SGD into {cls.__name__}: .* no 'betas'"
        ):
            cls(sp).load_state_dict(sgd.state_dict())
    before = RiemannianAdam(sp, second_moment="coordinate")
    with pytest.raises(ValueError, match=r"^cannot load a state dict saved by torch Adam"):
        RenormAdam(sp).load_state_dict(
            {
                "state": {0: {"step": torch.tensor(1.0)}},
                "param_groups": adam.state_dict()["param_groups"],
            }
        )
    assert before.param_groups[0]["second_moment"] == "coordinate"


def test_second_moment_mismatch_does_not_silently_switch():
    """issue 13: RiemannianAdam(second_moment='coordinate').load_state_dict(row_state)."""
    sp = [st.SphereParameter(torch.randn(4, 3), dim=1)]
    sp[0].grad = torch.randn(4, 3)
    row = RiemannianAdam(sp)
    row.step()
    coord = RiemannianAdam(sp, second_moment="coordinate")
    with pytest.raises(
        ValueError,
        match=r"^cannot load a state dict saved by RiemannianAdam into RiemannianAdam: it keeps "
        r"second_moment='row' state and this optimizer was built with "
        r"second_moment='coordinate' \(build it with second_moment='row' to resume\)$",
    ):
        coord.load_state_dict(row.state_dict())
    assert coord.param_groups[0]["second_moment"] == "coordinate" and not coord.state


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam, RiemannianSGD])
def test_differentiable_step_gradcheck(cls):
    """torch's check: gradients flow through ``step`` to the parameter, its gradient and the
    optimizer state (float64, a sphere and a Euclidean parameter)."""
    g = torch.Generator().manual_seed(0)
    for dim, shape in ((1, (3, 4)), (None, (3,))):
        p0 = torch.randn(shape, dtype=torch.float64, generator=g)
        if dim is not None:
            p0 = p0 / p0.norm(dim=dim, keepdim=True)
        p0.requires_grad_(True)
        grad = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
        if cls is RiemannianSGD:
            kwargs = {"lr": 0.1, "momentum": 0.9}
            state = {"momentum_buffer": torch.randn(shape, dtype=torch.float64, generator=g)}
        else:
            kwargs = {"lr": 0.1, "amsgrad": True}
            moment = (3, 1) if cls is RiemannianAdam and dim is not None else shape
            state = {
                "step": torch.tensor(2.0, dtype=torch.float64),
                "exp_avg": torch.randn(shape, dtype=torch.float64, generator=g),
                "exp_avg_sq": torch.rand(moment, dtype=torch.float64, generator=g) + 0.1,
                "max_exp_avg_sq": torch.rand(moment, dtype=torch.float64, generator=g) + 0.2,
            }
        tensors = {k: v.requires_grad_(True) for k, v in state.items() if k != "step"}

        def fn(p, grad, *moments, dim=dim, state=state, kwargs=kwargs, tensors=tensors):
            p = p.clone()
            if dim is not None:
                p.sphere_dim = dim
            p.grad = grad
            opt = cls([p], differentiable=True, **kwargs)
            opt.state[p].update({k: v.clone() for k, v in zip(tensors, moments)})
            if "step" in state:
                opt.state[p]["step"] = state["step"].clone()
            opt.step()
            return (p, *(opt.state[p][k] for k in tensors))

        torch.autograd.gradcheck(fn, (p0, grad, *tensors.values()))


@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam])
def test_capturable_equals_noncapturable_on_cpu_and_keeps_state_on_device(cls):
    lr = torch.tensor(0.01, dtype=torch.float64)
    for kwargs in ({}, {"amsgrad": True, "weight_decay": 0.1}, {"lr": lr}):
        a, _ = run(cls, {"foreach": True, **kwargs})
        for foreach in (False, True):
            b, opt = run(cls, {"capturable": True, "foreach": foreach, **kwargs})
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-14, rtol=1e-14)
            assert all(s["step"].device == p.device for p, s in opt.state.items())


def test_capturable_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """No ``.item()``/``bool()`` of a tensor inside ``step`` (sphere parameters; on CPU torch's
    own Adam reads its host-side step for Euclidean ones), non-finite skip included."""
    params = make_params()[:4]
    opt = RiemannianAdam(params, capturable=True)
    set_grads(params, 0)
    opt.step()  # state created
    before = [p.detach().clone() for p in params]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a capturable step")

    set_grads(params, 1)
    params[0].grad[0, 0] = float("nan")
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    opt.step()
    monkeypatch.undo()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.skipped_steps == 1
    set_grads(params, 2)
    opt.step()
    assert not all(torch.equal(p, b) for p, b in zip(params, before))


#: the Muon family's capturable checks: float64 Newton-Schulz (bfloat16 is slow on CPU)
_HYBRID_KW = {SphereMuon: {"ns_dtype": None}, AdamH: {}}


@pytest.mark.parametrize("cls", [SphereMuon, AdamH])
def test_hybrid_capturable_equals_noncapturable_on_cpu_and_keeps_state_on_device(cls):
    lr = torch.tensor(0.01, dtype=torch.float64)
    extra = ({}, {"lr": lr}, {"ordering": "riemannian", "angular": True, "measure_angle": True})
    if cls is SphereMuon:
        extra = ({}, {"lr": lr}, {"ordering": "renorm"}, {"measure_angle": True})
    for kwargs in extra:
        kwargs = {**_HYBRID_KW[cls], **kwargs}
        a, ref = run(cls, {"foreach": True, **kwargs})
        for foreach in (False, True):
            b, opt = run(cls, {"capturable": True, "foreach": foreach, **kwargs})
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-14, rtol=1e-14)
            for p, q in zip(a, b):
                for key, value in ref.state[p].items():
                    torch.testing.assert_close(opt.state[q][key].double(), value.double())
            assert all(s["step"].device == p.device for p, s in opt.state.items() if "step" in s)


@pytest.mark.parametrize("cls", [SphereMuon, AdamH])
def test_hybrid_capturable_step_never_reads_a_tensor_on_the_host(cls, monkeypatch):
    """No ``.item()``/``bool()``/``float()`` of a tensor inside a capturable step of the Muon
    family (sphere parameters of both kinds and, for SphereMuon, a Euclidean matrix: on CPU
    torch's own AdamW reads its host-side step), the non-finite skip on the device included:
    the skipped step restores parameters and state bitwise and is counted."""
    g = torch.Generator().manual_seed(0)
    params = [
        st.SphereParameter(torch.randn(5, 4, dtype=torch.float64, generator=g), dim=1),
        st.SphereParameter(torch.randn(3, 4, dtype=torch.float64, generator=g), dim=None),
    ]
    if cls is SphereMuon:
        params.append(torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=g)))
    lr = torch.tensor(0.02, dtype=torch.float64)
    opt = cls(params, lr=lr, capturable=True, measure_angle=True, **_HYBRID_KW[cls])
    set_grads(params, 0)
    opt.step()  # state created
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(params)})

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a capturable step")

    set_grads(params, 1)
    params[0].grad[0, 0] = float("nan")
    for name in ("item", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    monkeypatch.undo()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for i, p in enumerate(params):
        for key, value in state[i].items():
            now = opt.state[p][key]
            assert torch.equal(now, value), key  # the angles too: those of the last step
    with pytest.warns(st.optim.NonfiniteGradientWarning):
        assert opt.skipped_steps == 1
    set_grads(params, 2)
    opt.step()
    assert not any(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.skipif(not CUDA, reason=NO_GPU)
@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam, SphereMuon, AdamH])
def test_capturable_step_in_a_cuda_graph(cls):  # pragma: no cover - needs a GPU
    params = [p.detach().cuda().requires_grad_() for p in make_params(torch.float32)]
    for p, q in zip(params, make_params(torch.float32)):
        if st.sphere_dim_of(q) is not None:
            p.sphere_dim = q.sphere_dim
    ref = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(ref, params):
        if hasattr(q, "sphere_dim"):
            p.sphere_dim = q.sphere_dim
    opt, opt_ref = cls(params, capturable=True), cls(ref, capturable=True)
    for p in params + ref:
        p.grad = torch.ones_like(p)
    opt.step()
    opt_ref.step()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        graph.replay()
        opt_ref.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [RenormAdam, RiemannianAdam, RiemannianSGD])
def test_fused_checks_devices_and_dtypes_like_torch(cls):
    """C: torch's check and wording for fused=True (meta and complex parameters)."""
    msg = r"`fused=True` requires all the params to be floating point Tensors"
    for p in (
        torch.nn.Parameter(torch.randn(3, device="meta")),
        torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)),
    ):
        p.grad = torch.ones_like(p)
        opt = cls([p], lr=0.1, fused=True)
        with pytest.raises(RuntimeError, match=msg):
            opt.step()
    with pytest.raises(RuntimeError, match=r"`fused` and `foreach` cannot be `True` together\."):
        cls(make_params(), lr=0.1, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        cls(make_params(), lr=0.1, fused=True, differentiable=True)


def assert_renorm_adam_is_torch_adam(ours, ref, opt, opt_ref, n_sphere, steps=3):
    """``opt`` on ``ours`` is ``opt_ref`` on ``ref`` followed by renormalising the first
    ``n_sphere`` parameters along their last axis: the state (moments, steps) and the
    Euclidean parameters bitwise, the sphere parameters within one ulp of the exactly
    rounded renormalisation (the fused CPU kernel's; torch's float32 norm may differ by an
    ulp), re-synchronised after each step."""
    for t in range(steps):
        set_grads(ours, t)
        for p, q in zip(ref, ours):
            p.grad = q.grad.clone()
        opt.step()
        opt_ref.step()
        with torch.no_grad():
            for p in ref[:n_sphere]:
                p.div_(p.double().norm(dim=-1, keepdim=True).to(p.dtype))
        for i, (p, q) in enumerate(zip(ref, ours)):
            if i < n_sphere:
                assert (p - q).abs().max() <= torch.finfo(p.dtype).eps
                with torch.no_grad():
                    p.copy_(q)
            else:
                assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt_ref.state[p][key], opt.state[q][key])


def test_fused_renorm_adam_is_bitwise_torch_fused_adam_plus_renormalization():
    """D: small same-shaped float32 parameters are not stacked under fused=True."""
    g = torch.Generator().manual_seed(0)
    ours = [st.SphereParameter(torch.randn(4, 8, generator=g), dim=1) for _ in range(6)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, opt_ref = RenormAdam(ours, lr=0.05, fused=True), torch.optim.Adam(ref, lr=0.05, fused=True)
    assert_renorm_adam_is_torch_adam(ours, ref, opt, opt_ref, n_sphere=6)


@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True, "maximize": True}])
def test_fused_renorm_adam_in_row_blocks_stays_bitwise(monkeypatch, kwargs):
    """CPU buckets: large parameters cut into blocks of rows (tiny bucket size forced here)
    give bitwise torch Adam(fused=True) + renormalisation; a Euclidean one keeps its decay."""
    import spheretorch.optim.renorm_adam as renorm_module

    monkeypatch.setattr(renorm_module, "RENORM_BUCKET_BYTES", 3 * 8 * 4)
    g = torch.Generator().manual_seed(1)
    ours = [st.SphereParameter(torch.randn(*s, generator=g), dim=-1) for s in [(10, 8), (2, 5, 8)]]
    ours.append(torch.nn.Parameter(torch.randn(7, generator=g)))
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = RenormAdam(ours, lr=0.05, weight_decay=0.1, fused=True, **kwargs)
    groups = [{"params": ref[:2], "weight_decay": 0.0}, {"params": ref[2:]}]
    opt_ref = torch.optim.Adam(groups, lr=0.05, weight_decay=0.1, fused=True, **kwargs)
    assert_renorm_adam_is_torch_adam(ours, ref, opt, opt_ref, n_sphere=2)


F32, F64 = (torch.float32, 1e-6), (torch.float64, 1e-12)
ADAM_EXP = {"lr": 0.05, "second_moment": "coordinate", "retraction": "exp", "amsgrad": True}


@pytest.mark.slow
@pytest.mark.parametrize(
    "cls,kwargs,dtype_rtol",
    [
        (RiemannianAdam, {"lr": 0.05}, F32),
        (RiemannianAdam, {"lr": 0.05}, F64),
        (RiemannianAdam, ADAM_EXP, F64),
        (RiemannianSGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, F32),
    ],
    ids=["adam-f32", "adam-f64", "adam-coordinate-exp-amsgrad-f64", "sgd-nesterov-f32"],
)
@pytest.mark.parametrize("path", ["native", "foreach-masked"])
def test_fused_equals_foreach_and_skips_nonfinite_steps_on_the_device(
    cls, kwargs, dtype_rtol, path, monkeypatch
):
    r"""Both CPU fused implementations: the hand-written kernel (``native``) and, where no
    kernel applies, the foreach path masked on the device (``foreach-masked``): four variants
    cover both dtypes, both optimizers, both retractions and second moments (test_optim_native
    sweeps all options natively; test_optim_kernels runs the Triton kernels)."""
    from spheretorch.optim import _native

    if path == "foreach-masked":
        monkeypatch.setattr(_native, "usable", lambda *a, **k: False)
    elif _native.library() is None:
        pytest.skip("no C++ compiler here")
    dtype, rtol = dtype_rtol
    a = make_params(dtype)
    b = [copy.deepcopy(p) for p in a]
    opt_a, opt_b = cls(a, **kwargs), cls(b, fused=True, **kwargs)
    for t in range(4):
        set_grads(a, 10 + t)
        for p, q in zip(a, b):
            q.grad = p.grad.clone()
        if t == 2:
            b[1].grad[0, 0] = float("nan")  # fused skips this step; the reference does not take it
        else:
            opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(q, p, rtol=rtol, atol=rtol)
        assert_on_sphere(b, atol=10 * rtol)
    assert opt_b.skipped_steps == 1
    assert all(torch.is_tensor(s.get("step", torch.zeros(()))) for s in opt_b.state.values())


def test_renorm_adamw_is_renorm_adam_with_decoupled_decay_and_adamws_defaults():
    a, b = make_params(), make_params()
    opt_a = RenormAdamW(a, lr=0.01)
    opt_b = RenormAdam(b, lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True)
    for t in range(3):
        set_grads(a, t)
        set_grads(b, t)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert (
        opt_a.defaults["weight_decay"]
        == torch.optim.AdamW([torch.zeros(1)]).defaults["weight_decay"]
    )


def test_riemannian_sgd_takes_sparse_gradients_as_torchs_sgd():
    """torch's SGD accepts sparse gradients (foreach or not): Euclidean parameters get
    exactly its step, sphere parameters the step of the dense gradient."""
    for foreach in (False, True):
        g = torch.Generator().manual_seed(0)
        emb = torch.nn.Parameter(torch.randn(10, 4, generator=g, dtype=torch.float64))
        ref = torch.nn.Parameter(emb.detach().clone())
        sph = st.SphereParameter(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
        sph_ref = st.SphereParameter(sph.detach().clone(), dim=1)
        opt = RiemannianSGD([emb, sph], lr=0.1, momentum=0.9, foreach=foreach)
        opt_ref = torch.optim.SGD([ref], lr=0.1, momentum=0.9, foreach=foreach)
        opt_sph = RiemannianSGD([sph_ref], lr=0.1, momentum=0.9, foreach=foreach)
        for t in range(3):
            idx = torch.tensor([[t, t + 2, 7]])
            values = torch.randn(3, 4, generator=g, dtype=torch.float64)
            grad = torch.sparse_coo_tensor(idx, values, (10, 4))
            emb.grad, ref.grad = grad.clone(), grad.clone()
            sph.grad, sph_ref.grad = grad.clone(), grad.to_dense()
            opt.step()
            opt_ref.step()
            opt_sph.step()
        assert torch.equal(emb, ref)
        torch.testing.assert_close(sph, sph_ref, rtol=1e-12, atol=1e-12)
        assert emb.grad.is_sparse  # never densified in place
