"""Bad input gets a clear TypeError/ValueError naming the API, the argument and the key path."""

import dataclasses

import pytest
import torch

import functx

x3 = torch.ones(3)
square = lambda x: (x**2).sum()


def raises(exc, fragment, api):
    """Context manager checking the exception type, a message fragment and the API name."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc, match=fragment)
            self.info = self.ctx.__enter__()
            return self

        def __exit__(self, *exc_info):
            handled = self.ctx.__exit__(*exc_info)
            assert f"functx.{api}" in str(self.info.value), str(self.info.value)
            return handled

    return _Check()


@pytest.mark.parametrize("api", ["grad", "value_and_grad", "jacrev", "jacfwd", "hessian"])
@pytest.mark.parametrize(
    "argnums, exc, fragment",
    [
        ("0", TypeError, "argnums"),
        (1.0, TypeError, "argnums"),
        (True, TypeError, "argnums"),
        ((0, "a"), TypeError, "argnums"),
        ((), ValueError, "must not be empty"),
    ],
)
def test_argnums_form_rejected_when_transform_is_created(api, argnums, exc, fragment):
    with raises(exc, fragment, api):
        getattr(functx, api)(square, argnums=argnums)


@pytest.mark.parametrize("api", ["grad", "jacrev", "jacfwd", "hessian"])
def test_argnums_out_of_range_or_repeated(api):
    f = lambda x, y: (x * y).sum()
    with raises(ValueError, "out of range", api):
        getattr(functx, api)(f, argnums=2)(x3, x3)
    with raises(ValueError, "out of range", api):
        getattr(functx, api)(f, argnums=-3)(x3, x3)
    with raises(ValueError, "must not repeat", api):
        getattr(functx, api)(f, argnums=(0, -2))(x3, x3)


@pytest.mark.parametrize("api", ["grad", "value_and_grad"])
def test_grad_requires_real_scalar_tensor_output(api):
    with raises(ValueError, r"scalar \(0-dimensional\).*shape \(3,\)", api):
        getattr(functx, api)(lambda x: x * 2)(x3)
    with raises(ValueError, r"shape \(1,\)", api):
        getattr(functx, api)(lambda x: x.sum(0, keepdim=True))(x3)
    with raises(TypeError, "scalar tensor, got a value of type float", api):
        getattr(functx, api)(lambda x: 1.0)(x3)
    with raises(TypeError, "real floating-point", api):
        getattr(functx, api)(lambda x: x.sum().long())(x3)


def test_hvp_requires_scalar_output():
    with raises(ValueError, "scalar", "hvp"):
        functx.hvp(lambda x: x * 2, (x3,), (x3,))


def test_non_tensor_and_integer_leaves_name_the_key_path():
    def loss(params, x):
        return (params["w"] * x).sum()

    with raises(TypeError, r"params\['lr'\].*float", "grad"):
        functx.grad(loss)({"w": x3, "lr": 0.1}, x3)
    with raises(TypeError, r"params\['step'\].*torch.int64.*\.float\(\)", "grad"):
        functx.grad(loss)({"w": x3, "step": torch.tensor(3)}, x3)
    with raises(TypeError, r"x .*torch.int64", "jacrev"):
        functx.jacrev(lambda p, x: x * 2, argnums=1)(x3, torch.arange(3))
    with raises(TypeError, r"primals\[1\]\[0\]", "vjp"):
        functx.vjp(lambda a, b: a, x3, ["s"])


def test_unregistered_dataclass_and_module_get_hints():
    @dataclasses.dataclass
    class Plain:
        w: torch.Tensor

    with raises(TypeError, "optree.dataclasses.dataclass", "grad"):
        functx.grad(lambda p: p.w.sum())(Plain(x3))
    with raises(TypeError, "functx.nn.make_functional", "grad"):
        functx.grad(lambda m: m.weight.sum())(torch.nn.Linear(2, 2))


def test_tangents_must_match_primals():
    f = lambda p: p["a"] * p["b"].sum()
    p = {"a": x3, "b": torch.ones(2)}
    with raises(ValueError, r"tangents\[0\]\['c'\]|'c'", "jvp"):
        functx.jvp(f, (p,), ({"a": x3, "c": torch.ones(2)},))
    with raises(ValueError, r"tangents\[0\]\['b'\] has shape \(3,\).*\(2,\)", "jvp"):
        functx.jvp(f, (p,), ({"a": x3, "b": x3},))
    with raises(TypeError, r"tangents\[0\]\['b'\] has dtype torch.float64", "jvp"):
        functx.jvp(f, (p,), ({"a": x3, "b": torch.ones(2, dtype=torch.float64)},))
    with raises(TypeError, "must be a tuple", "jvp"):
        functx.jvp(f, p, (p,))
    with raises(ValueError, "same tree structure", "hvp"):
        functx.hvp(lambda p: f(p).sum(), (p,), (p, p))
    with raises(TypeError, "must be a tensor", "hvp"):
        functx.hvp(lambda p: f(p).sum(), (p,), ({"a": x3, "b": 1.0},))
    _, jvp_fn = functx.linearize(f, p)
    with raises(ValueError, "shape", "linearize"):
        jvp_fn({"a": x3, "b": x3})


def test_cotangents_must_match_outputs():
    out, vjp_fn = functx.vjp(lambda x: {"y": x * 2, "z": x.sum()}, x3)
    with raises(ValueError, "cotangents", "vjp"):
        vjp_fn({"y": x3})
    with raises(ValueError, r"cotangents\['z'\] has shape \(3,\)", "vjp"):
        vjp_fn({"y": x3, "z": x3})


@pytest.mark.parametrize("api", ["grad", "jacrev", "jacfwd", "hessian"])
def test_has_aux_requires_a_pair(api):
    with raises(TypeError, "pair", api):
        getattr(functx, api)(lambda x: (x**2).sum(), has_aux=True)(x3)
    with raises(ValueError, "length 3", api):
        getattr(functx, api)(lambda x: ((x**2).sum(), 1, 2), has_aux=True)(x3)
    with raises(TypeError, "has_aux", api):
        getattr(functx, api)(square, has_aux="yes")


def test_vjp_jvp_hvp_has_aux_pairs():
    with raises(TypeError, "pair", "vjp"):
        functx.vjp(lambda x: x, x3, has_aux=True)
    with raises(TypeError, "pair", "jvp"):
        functx.jvp(lambda x: x, (x3,), (x3,), has_aux=True)
    with raises(ValueError, "pair", "hvp"):
        functx.hvp(lambda x: (x.sum(),), (x3,), (x3,), has_aux=True)


def test_options_validated_early():
    with raises(TypeError, "callable", "grad"):
        functx.grad("not a function")
    with raises(TypeError, "callable", "vjp"):
        functx.vjp(None, x3)
    with raises(ValueError, "chunk_size", "jacrev"):
        functx.jacrev(square, chunk_size=0)
    with raises(TypeError, "chunk_size", "hessian"):
        functx.hessian(square, chunk_size=2.0)
    with raises(ValueError, "mode", "hessian"):
        functx.hessian(square, mode="rev-fwd")
    with raises(ValueError, "mode", "hvp"):
        functx.hvp(square, (x3,), (x3,), mode="fast")


def test_integer_outputs_rejected_for_jacobians():
    with raises(TypeError, r"output\['i'\].*torch.int64", "jacrev"):
        functx.jacrev(lambda x: {"f": x, "i": x.long()})(x3)
    with raises(ValueError, "no tensors", "vjp"):
        functx.vjp(lambda x: {}, x3)


def test_errors_leave_inputs_untouched():
    p = {"w": torch.ones(3, requires_grad=True), "lr": 0.1}
    with pytest.raises(TypeError, match=r"p\['lr'\]"):
        functx.grad(lambda p: p["w"].sum())(p)
    assert p["w"].requires_grad and p["w"].grad is None and p["lr"] == 0.1


# --- the failure vocabulary of the solvers and implicit rooms (helper "vocab") ---------------------

_SPD = torch.tensor([[1e4, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1e-4]], dtype=torch.float64)
_RHS = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize(
    "api, call",
    [
        *[
            (f"solvers.{m}", lambda m=m: getattr(functx.solvers, m)(lambda v: _SPD @ v, _RHS, max_iter=1, throw=True))
            for m in ("cg", "minres", "gmres", "bicgstab", "normal_cg")
        ],
        ("solvers.solve", lambda: functx.solvers.solve(lambda v: _SPD @ v, _RHS, method="cg", max_iter=1, throw=True)),
        ("solvers.lu", lambda: functx.solvers.lu(lambda v: 0 * v, _RHS, throw=True)),
        ("solvers.cholesky", lambda: functx.solvers.cholesky(lambda v: -v, _RHS, throw=True)),
        (
            "implicit.custom_root",
            lambda: functx.implicit.custom_root(lambda z, a: z - a, throw=True)(lambda init, a: a + 1)(_RHS, _RHS),
        ),
        (
            "implicit.root_vjp",
            lambda: functx.implicit.root_vjp(lambda z, a: z - a, _RHS + 1, (_RHS,), _RHS, throw=True),
        ),
        (
            "implicit.implicit_jacobian",
            lambda: functx.implicit.implicit_jacobian(lambda z, a: z - a, _RHS + 1, _RHS, throw=True),
        ),
    ],
)
def test_iterative_apis_raise_nonconvergence_error_with_throw(api, call):
    """Every iterative public API of these rooms accepts `throw` and raises the one
    functx.NonConvergenceError (also importable as functx.implicit.NonConvergenceError)."""
    with pytest.raises(functx.NonConvergenceError) as info:
        call()
    assert isinstance(info.value, functx.implicit.NonConvergenceError)
    assert "converged" in info.value.stats or "residual_norm" in info.value.stats
    if api != "solvers.solve":  # `solve` reports the solver it chose
        assert info.value.api == f"functx.{api}", info.value.api
