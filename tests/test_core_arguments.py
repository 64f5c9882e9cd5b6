"""The two kinds of argument, in every transform: a differentiated input is never changed
(an in-place write to it raises the same functx error in every mode), while a
non-differentiated positional argument belongs to `func`, which may write it in place as
under torch.func. Plus the clear errors that replaced torch's."""

import pytest
import torch

import functx

D = torch.float64
INPLACE = r"writes in place to its differentiated input"


def _x():
    return torch.arange(1.0, 4.0, dtype=D)


def _calls(f, fs):
    """Every transform applied to the elementwise `f` (or the scalar `fs`) at `x`."""
    v = torch.ones(3, dtype=D)
    return {
        "grad": lambda x: functx.grad(fs)(x),
        "value_and_grad": lambda x: functx.value_and_grad(fs)(x),
        "vjp": lambda x: functx.vjp(f, x),
        "jvp": lambda x: functx.jvp(f, (x,), (v,)),
        "linearize": lambda x: functx.linearize(f, x),
        "jacrev": lambda x: functx.jacrev(f)(x),
        "jacfwd": lambda x: functx.jacfwd(f)(x),
        "hessian-rev-rev": lambda x: functx.hessian(fs, mode="rev-rev")(x),
        "hessian-fwd-rev": lambda x: functx.hessian(fs, mode="fwd-rev")(x),
        "hvp-rev-rev": lambda x: functx.hvp(fs, (x,), (v,), mode="rev-rev"),
        "hvp-fwd-rev": lambda x: functx.hvp(fs, (x,), (v,), mode="fwd-rev"),
        "hvp-rev-fwd": lambda x: functx.hvp(fs, (x,), (v,), mode="rev-fwd"),
    }


INPLACE_FUNCS = {
    "mul_": (lambda x: x.mul_(2), lambda x: x.mul_(2).sum()),
    "setitem": (lambda x: x.__setitem__(0, 5.0) or x * 1, lambda x: (x.__setitem__(0, 5.0) or x).sum()),
    "view": (lambda x: (x[:2].add_(1), x * 1)[1], lambda x: x[:2].add_(1).sum() + x.sum()),
}


@pytest.mark.parametrize("kind", sorted(INPLACE_FUNCS))
@pytest.mark.parametrize("api", sorted(_calls(None, None)))
def test_inplace_write_to_differentiated_input_raises_and_changes_nothing(api, kind):
    f, fs = INPLACE_FUNCS[kind]
    x = _x()
    before = x.clone()
    with pytest.raises(ValueError, match=rf"`functx.{api.split('-')[0]}`: `func` {INPLACE} (x|primals\[0\])"):
        _calls(f, fs)[api](x)
    assert torch.equal(x, before) and x._version == 0 and not x.requires_grad


def test_inplace_refused_inside_outer_transforms():
    x = _x()
    with pytest.raises(ValueError, match=INPLACE):
        functx.vmap(lambda x: functx.jvp(lambda x: x.mul_(2), (x,), (x,)))(torch.ones(2, 3, dtype=D))
    with pytest.raises(ValueError, match=INPLACE):
        functx.grad(lambda x: functx.grad(lambda y: y.mul_(2).sum())(x).sum())(x)


def test_writes_to_other_values_inside_func_are_fine():
    x = _x()

    def f(x):
        y = x * 2
        y.mul_(3)  # a tensor func made itself
        return y

    J = functx.jacfwd(f)(x)
    torch.testing.assert_close(J, 6 * torch.eye(3, dtype=D))
    torch.testing.assert_close(functx.jacrev(f)(x), J)


# -- non-differentiated arguments belong to func ------------------------------------------

ARGNUM_APIS = ["grad", "value_and_grad", "jacrev", "jacfwd", "hessian"]


def _reference(api):
    if api == "value_and_grad":  # torch.func returns (grad, value)
        return lambda f, argnums: lambda *args: torch.func.grad_and_value(f, argnums=argnums)(*args)[::-1]
    return getattr(torch.func, api)


def _copy_into_y(x, y):
    y.copy_(x)
    return (y * x).sum()


def _write_into_x(x, y, z):
    x[:2] = y
    return x.sum() * z * y.sum()


@pytest.mark.parametrize("api", ARGNUM_APIS)
def test_func_may_write_its_non_differentiated_arguments(api):
    ours, ref = getattr(functx, api), _reference(api)
    x = _x()
    y1, y2 = torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    got, want = ours(_copy_into_y, argnums=0)(x, y1), ref(_copy_into_y, argnums=0)(x, y2)
    torch.testing.assert_close(got, want)
    assert torch.equal(y1, x) and torch.equal(y2, x) and not y1.requires_grad  # as under torch.func
    y, z = torch.tensor([5.0, 7.0], dtype=D), torch.tensor(2.0, dtype=D)
    x1, x2 = torch.ones(3, dtype=D), torch.ones(3, dtype=D)
    got, want = ours(_write_into_x, argnums=(1, 2))(x1, y, z), ref(_write_into_x, argnums=(1, 2))(x2, y, z)
    torch.testing.assert_close(got, want)
    assert torch.equal(x1, x2) and not x1.requires_grad and x1.grad_fn is None


def test_non_differentiated_argument_written_under_vmap():
    xs = torch.randn(4, 3, dtype=D)
    ys = torch.zeros(4, 3, dtype=D)
    got = functx.vmap(functx.grad(_copy_into_y))(xs, ys)
    torch.testing.assert_close(got, 2 * xs)
    torch.testing.assert_close(ys, xs)


# -- clear errors --------------------------------------------------------------------------


def test_vmap_out_dims_out_of_range_is_value_error():
    with pytest.raises(ValueError, match=r"`functx.vmap`: `out_dims` puts the batch dimension of output at 3"):
        functx.vmap(lambda x: x * 2, out_dims=3)(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"output\['b'\] at -3"):
        functx.vmap(lambda x: {"a": x, "b": x.sum()}, out_dims={"a": 1, "b": -3})(torch.ones(4, 3))
    out = functx.vmap(lambda x: x * 2, out_dims=-1)(torch.ones(4, 3))
    assert out.shape == (3, 4)


def test_jvp_and_linearize_without_primals_are_value_errors():
    with pytest.raises(ValueError, match=r"`functx.jvp`: `primals` must contain at least one"):
        functx.jvp(lambda: torch.ones(2), (), ())
    with pytest.raises(ValueError, match=r"`functx.linearize`: `primals` must contain at least one"):
        functx.linearize(lambda p: torch.ones(2), {})


def test_jacobians_over_an_empty_tree_are_empty_in_both_modes():
    f = lambda p, x: (x**2).sum()
    x = _x()
    assert functx.jacfwd(f)({}, x) == functx.jacrev(f)({}, x) == functx.hessian(f)({}, x) == {}


@pytest.mark.parametrize("api", ["grad", "value_and_grad", "jacrev", "jacfwd", "hessian", "vjp", "hvp"])
def test_forgotten_has_aux_is_named(api):
    x = _x()
    fs = lambda x: ((x**2).sum(), {"n": 3})
    call = {
        "vjp": lambda: functx.vjp(fs, x),
        "hvp": lambda: functx.hvp(fs, (x,), (x,)),
    }.get(api, lambda: getattr(functx, api)(fs)(x))
    with pytest.raises(TypeError, match=rf"`functx.{api}`: .*did you forget has_aux=True\?"):
        call()


def test_hessian_auto_fallback_shows_the_first_error_when_both_modes_fail(monkeypatch):
    import functx._hessian as hmod

    monkeypatch.setattr(hmod, "_prefers_rev_rev", lambda leaves: False)  # pretend we are on a GPU
    calls = []

    def f(x):
        calls.append(1)
        raise RuntimeError(f"boom {len(calls)}")

    with pytest.raises(RuntimeError, match="boom 1"):
        functx.hessian(f)(_x())
    # forward over reverse, reverse over reverse, then the in-place probe on copies
    assert len(calls) == 3
