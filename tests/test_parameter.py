"""Tests for :class:`spheretorch.SphereParameter` and its helpers."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import spheretorch as st
from spheretorch import SphereParameter, renormalize_, sphere_, sphere_dim_of


def unit_along(p: torch.Tensor, dim: int, atol: float = 1e-6) -> None:
    n = p.detach().double().norm(dim=dim)
    torch.testing.assert_close(n, torch.ones_like(n), atol=atol, rtol=0)


def roundtrip_save(obj, weights_only: bool):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = SphereParameter(torch.randn(10, 6), dim=-1)
        self.cols = SphereParameter(torch.randn(6, 4), dim=0)
        self.lin = nn.Linear(6, 3)


def assert_same_param(q, p):
    assert type(q) is SphereParameter
    assert q.sphere_dim == p.sphere_dim
    assert q.requires_grad == p.requires_grad
    assert q.dtype == p.dtype and q.shape == p.shape
    torch.testing.assert_close(q.detach(), p.detach(), atol=0, rtol=0)


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("shape", "dim", "expected"),
    [
        ((5,), -1, 0),
        ((3, 4), -1, 1),
        ((3, 4), 0, 0),
        ((2, 3, 4), -2, 1),
        ((2, 3, 4), 2, 2),
    ],
)
def test_projected_at_construction_with_nonnegative_sphere_dim(shape, dim, expected):
    data = torch.randn(shape) * 7
    p = SphereParameter(data, dim=dim)
    assert isinstance(p, nn.Parameter) and isinstance(p, SphereParameter)
    assert p.sphere_dim == expected and type(p.sphere_dim) is int
    assert sphere_dim_of(p) == expected
    assert p.dim() == len(shape)  # torch's method is untouched
    assert p.requires_grad and p.is_leaf
    unit_along(p, expected)
    torch.testing.assert_close(p.detach() * data.norm(dim=expected, keepdim=True), data)
    assert not SphereParameter(data, dim, requires_grad=False).requires_grad
    assert "SphereParameter(dim=" in repr(p)


def test_construction_keeps_dtype_and_handles_half_types():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        p = SphereParameter(torch.randn(4, 8, dtype=dtype) * 300, dim=1)
        assert p.dtype == dtype
        unit_along(p, 1, atol=1e-2 if dtype != torch.float64 else 1e-14)


def test_sphere_dim_of_plain_tensors_is_none():
    assert sphere_dim_of(torch.randn(3)) is None
    assert sphere_dim_of(nn.Parameter(torch.randn(3))) is None


def test_gradients_flow_and_the_parameter_trains():
    p = SphereParameter(torch.randn(3, 5))
    (p * torch.arange(5.0)).sum().backward()
    assert p.grad is not None and p.grad.shape == (3, 5)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.step()
    assert type(p) is SphereParameter
    renormalize_(p)
    unit_along(p, 1)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match=r"data must have a floating-point dtype.*torch.int64"):
        SphereParameter(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"data must be a torch\.Tensor, got list"):
        SphereParameter([1.0, 2.0])
    with pytest.raises(TypeError, match="SphereParameter needs data"):
        SphereParameter()
    with pytest.raises(ValueError, match=r"dim=2 is out of range for a tensor of shape \(3, 4\)"):
        SphereParameter(torch.randn(3, 4), dim=2)
    with pytest.raises(ValueError, match=r"dim=-3 is out of range"):
        SphereParameter(torch.randn(3, 4), dim=-3)
    with pytest.raises(TypeError, match="dim must be an int, got float"):
        SphereParameter(torch.randn(3, 4), dim=1.0)
    with pytest.raises(ValueError, match="0-d tensor"):
        SphereParameter(torch.tensor(2.0))
    zero = torch.randn(3, 4)
    zero[:, 2] = 0
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*x\[:, 2\] has zero norm"):
        SphereParameter(zero, dim=0)
    nan = torch.randn(3, 4)
    nan[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x\[1, :\] has non-finite values"):
        SphereParameter(nan)
    inf = torch.randn(3, 4)
    inf[2, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        SphereParameter(inf, dim=0)


def test_tiny_and_huge_rows_are_not_mistaken_for_zero_or_inf():
    # float32 squares of 1e-30 underflow and of 1e30 overflow; the rows are still valid.
    data = torch.randn(3, 8)
    data[0] *= 1e-30
    data[2] *= 1e30
    p = SphereParameter(data)
    unit_along(p, 1)
    ref = data.double() / data.double().norm(dim=1, keepdim=True)
    torch.testing.assert_close(p.detach().double(), ref, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("dim", [0, -1])
def test_deepcopy_and_pickle_keep_class_and_sphere_dim(dim):
    p = SphereParameter(torch.randn(4, 6), dim=dim)
    p.extra_tag = "kept"
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert_same_param(q, p)
        assert q.data_ptr() != p.data_ptr()
    assert copy.deepcopy(p).extra_tag == "kept"
    frozen = SphereParameter(torch.randn(4, 6), requires_grad=False)
    assert_same_param(copy.deepcopy(frozen), frozen)
    assert_same_param(pickle.loads(pickle.dumps(frozen)), frozen)
    # Deep-copying a list holding the same parameter twice keeps the aliasing.
    a, b = copy.deepcopy([p, p])
    assert a is b


@pytest.mark.parametrize("weights_only", [False, True])
def test_torch_save_load_of_the_parameter(weights_only):
    p = SphereParameter(torch.randn(3, 5, dtype=torch.float64), dim=0)
    assert_same_param(roundtrip_save(p, weights_only), p)
    # A list/dict of them too (an optimizer-like payload).
    out = roundtrip_save({"p": p, "ps": [p]}, weights_only)
    assert_same_param(out["p"], p)
    assert_same_param(out["ps"][0], p)


def test_module_deepcopy_pickle_and_save():
    net = Net()
    for other in (
        copy.deepcopy(net),
        pickle.loads(pickle.dumps(net)),
        roundtrip_save(net, weights_only=False),
    ):
        assert_same_param(other.emb, net.emb)
        assert_same_param(other.cols, net.cols)
        assert type(other.lin.weight) is nn.Parameter
        names = [n for n, q in other.named_parameters() if isinstance(q, SphereParameter)]
        assert names == ["emb", "cols"]


def test_module_to_keeps_class_and_sphere_dim():
    net = Net()
    before = net.emb
    net.to(torch.float64)
    assert net.emb is before  # the same object, data converted in place
    assert type(net.emb) is SphereParameter and net.emb.dtype == torch.float64
    assert net.emb.sphere_dim == 1 and net.cols.sphere_dim == 0
    net.to(torch.bfloat16)
    assert type(net.cols) is SphereParameter and net.cols.dtype == torch.bfloat16
    net.double()
    net.to("cpu")
    assert type(net.emb) is SphereParameter
    unit_along(net.emb, 1, atol=1e-2)


def test_state_dict_is_plain_tensors_and_loads_with_weights_only():
    net = Net()
    sd = net.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    loaded = roundtrip_save(sd, weights_only=True)
    other = Net()
    objects = (other.emb, other.cols)
    other.load_state_dict(loaded)
    assert other.emb is objects[0] and other.cols is objects[1]  # loaded in place
    assert_same_param(other.emb, net.emb)
    assert_same_param(other.cols, net.cols)
    torch.testing.assert_close(other.lin.weight, net.lin.weight)
    # A float64 module can load a float32 state dict (copied into the existing parameter).
    other64 = Net().double()
    other64.load_state_dict(sd)
    assert type(other64.emb) is SphereParameter and other64.emb.dtype == torch.float64
    torch.testing.assert_close(other64.emb.float(), net.emb.detach())


def test_load_state_dict_of_whole_module_checkpoint():
    # A full checkpoint dict with nested state dicts and metadata, weights_only=True.
    net = Net()
    ckpt = {"model": net.state_dict(), "step": 7, "cfg": {"d": 6}}
    loaded = roundtrip_save(ckpt, weights_only=True)
    other = Net()
    other.load_state_dict(loaded["model"])
    assert loaded["step"] == 7
    assert_same_param(other.emb, net.emb)


# ----------------------------------------------------------------------------- helpers


def test_sphere_converts_a_registered_parameter():
    lin = nn.Linear(8, 4)
    w = lin.weight.detach().clone()
    out = sphere_(lin, "weight", dim=1)
    assert out is lin
    assert type(lin.weight) is SphereParameter and lin.weight.sphere_dim == 1
    assert "weight" in dict(lin.named_parameters())
    unit_along(lin.weight, 1)
    torch.testing.assert_close(lin.weight.detach(), w / w.norm(dim=1, keepdim=True))
    # Negative dims are stored non-negative; requires_grad is carried over.
    emb = nn.Embedding(5, 3)
    emb.weight.requires_grad_(False)
    sphere_(emb, dim=-2)
    assert emb.weight.sphere_dim == 0 and not emb.weight.requires_grad
    lin(torch.randn(2, 8)).sum().backward()
    assert lin.weight.grad is not None


def test_sphere_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Linear has no registered parameter 'w'.*weight, bias"):
        sphere_(lin, "w")
    with pytest.raises(TypeError, match=r"module must be an nn\.Module, got Tensor"):
        sphere_(torch.randn(3), "weight")
    with pytest.raises(ValueError, match="out of range"):
        sphere_(lin, "weight", dim=2)
    lin.bias.data.zero_()
    with pytest.raises(ValueError, match="zero norm"):
        sphere_(lin, "bias")


def test_renormalize_module_list_and_tensor():
    net = Net()
    with torch.no_grad():
        net.emb.mul_(3.0)
        net.cols.add_(0.5)
        net.lin.weight.mul_(5.0)
    lin_w = net.lin.weight.detach().clone()
    assert renormalize_(net) == 2
    unit_along(net.emb, 1)
    unit_along(net.cols, 0)
    torch.testing.assert_close(net.lin.weight.detach(), lin_w)  # Euclidean: untouched
    with torch.no_grad():
        net.emb.mul_(2.0)
        net.cols.mul_(2.0)
    assert renormalize_([net.emb, net.lin.weight]) == 1
    unit_along(net.emb, 1)
    assert renormalize_(iter([net.cols])) == 1
    unit_along(net.cols, 0)
    with torch.no_grad():
        net.cols.mul_(4.0)
    assert renormalize_(net.cols) == 1
    unit_along(net.cols, 0)
    assert renormalize_(nn.Linear(2, 2)) == 0
    # Zero slices are left alone (no NaN), objects are kept.
    p = SphereParameter(torch.randn(3, 4))
    with torch.no_grad():
        p[1] = 0
    obj = p
    renormalize_([p])
    assert obj is p and not torch.isnan(p).any() and (p[1] == 0).all()
    # Half types: norms in float32.
    h = SphereParameter(torch.randn(2, 4096, dtype=torch.float16))
    with torch.no_grad():
        h.mul_(200.0)  # sum of squares overflows float16
    renormalize_([h])
    unit_along(h, 1, atol=2e-3)


# ----------------------------------------------------------------------------- geoopt interop


def test_geoopt_round_trip():
    geoopt = pytest.importorskip("geoopt")
    p = SphereParameter(torch.randn(5, 7, dtype=torch.float64))
    g = st.to_geoopt(p)
    assert isinstance(g, geoopt.ManifoldParameter)
    assert isinstance(g.manifold, geoopt.Sphere)
    assert g.requires_grad == p.requires_grad
    g.manifold.assert_check_point_on_manifold(g)
    assert g.manifold.check_point_on_manifold(g)
    ok, reason = g.manifold.check_point_on_manifold(g, explain=True)
    assert ok, reason
    torch.testing.assert_close(g.detach(), p.detach(), atol=0, rtol=0)
    assert g.data_ptr() != p.data_ptr()  # a copy, not a view
    back = st.from_geoopt(g)
    # from_geoopt re-projects (geoopt parameters drift): equal up to that last-ulp rounding.
    assert type(back) is SphereParameter and back.sphere_dim == p.sphere_dim
    assert back.dtype == p.dtype and back.requires_grad
    torch.testing.assert_close(back.detach(), p.detach(), atol=2e-16, rtol=0)
    assert back.data_ptr() != g.data_ptr()
    # A geoopt optimizer step keeps it on the sphere, and it comes back as a SphereParameter.
    g.grad = torch.randn(g.shape, dtype=g.dtype)
    geoopt.optim.RiemannianSGD([g], lr=0.1).step()
    assert g.manifold.check_point_on_manifold(g)
    back = st.from_geoopt(g)
    assert type(back) is SphereParameter and back.sphere_dim == 1
    # From a freshly made geoopt parameter.
    fresh = geoopt.ManifoldParameter(geoopt.Sphere().random_uniform(3, 4, dtype=torch.float64))
    assert st.from_geoopt(fresh).sphere_dim == 1
    frozen = st.to_geoopt(SphereParameter(torch.randn(2, 3), requires_grad=False))
    assert not frozen.requires_grad
    assert not st.from_geoopt(frozen).requires_grad


def test_geoopt_interop_errors():
    geoopt = pytest.importorskip("geoopt")
    msg = r"geoopt\.Sphere works on the last axis; .*sphere_dim is 0"
    with pytest.raises(ValueError, match=msg):
        st.to_geoopt(SphereParameter(torch.randn(4, 3), dim=0))
    with pytest.raises(TypeError, match="to_geoopt expects a SphereParameter"):
        st.to_geoopt(nn.Parameter(torch.randn(3)))
    euclid = geoopt.ManifoldParameter(torch.randn(3, 4), manifold=geoopt.Euclidean())
    with pytest.raises(TypeError, match=r"geoopt\.Sphere, got manifold Euclidean"):
        st.from_geoopt(euclid)
    with pytest.raises(TypeError, match="got manifold NoneType"):
        st.from_geoopt(torch.randn(3))


def test_sphere_parameter_needs_two_coordinates():
    for data in (torch.empty(4, 0), torch.randn(3, 1)):
        with pytest.raises(
            ValueError,
            match=r"^the sphere axis dim=1 of a tensor of shape .* a sphere needs at least 2",
        ):
            SphereParameter(data, dim=1)


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = sphere_(nn.Linear(5, 4), dim=1)  # rows on the sphere
        self.cols = SphereParameter(torch.randn(6, 3, dtype=torch.float64), dim=0)
        self.bias = nn.Parameter(torch.randn(3))


def test_load_state_dict_renormalizes_off_sphere_rows_with_a_warning():
    m = _Holder()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["inner.weight"] *= 5  # nGPT's x5 rows: must not stay at norm 5
    sd["cols"][:, 1] *= 0.5
    sd["bias"] *= 5  # Euclidean: loaded as is
    with (
        pytest.warns(
            UserWarning,
            match=r"'inner.weight' has slices off the unit sphere along dim=1 \(max .* = 4\)",
        ),
        pytest.warns(UserWarning, match=r"'cols' has slices off .* dim=0"),
    ):
        m.load_state_dict(sd)
    assert isinstance(m.inner.weight, SphereParameter) and m.inner.weight.sphere_dim == 1
    torch.testing.assert_close(m.inner.weight.detach().norm(dim=1), torch.ones(4))
    torch.testing.assert_close(m.cols.detach().norm(dim=0), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(m.inner.weight.detach(), sd["inner.weight"] / 5)
    assert torch.equal(m.bias.detach(), sd["bias"])


def test_load_state_dict_on_sphere_is_bitwise_and_silent():
    import warnings

    src, dst = _Holder(), _Holder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dst.load_state_dict(src.state_dict())
        copy.deepcopy(dst).load_state_dict(src.state_dict())  # the hook survives deepcopy
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)


def test_load_state_dict_with_zero_or_nan_rows_fails_naming_the_key():
    m = _Holder()
    for bad in (0.0, float("nan")):
        sd = m.state_dict()
        sd = {k: v.clone() for k, v in sd.items()}
        sd["inner.weight"][2] = bad
        before = m.inner.weight.detach().clone()
        with pytest.raises(
            RuntimeError, match=r'copying the parameter named "inner.weight": .*x\[2, :\] has'
        ):
            m.load_state_dict(sd)
        assert torch.equal(m.inner.weight.detach(), before)
