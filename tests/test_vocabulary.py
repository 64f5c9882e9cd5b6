"""One vocabulary across rooms (issue 14): every iterative public API takes ``throw`` and raises
``functx.NonConvergenceError`` (with statistics under the shared names) when told to; every
room's argument errors speak one grammar."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import functx
import functx.curvature as fc
from functx import implicit, solvers

ROOMS = (functx, solvers, implicit, fc)
SHARED_STATS = {"converged", "num_steps", "num_matvecs", "residual_norm"}


def _public_callables():
    for room in ROOMS:
        for name in room.__all__:
            obj = getattr(room, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                try:
                    params = inspect.signature(obj).parameters
                except (TypeError, ValueError):
                    continue
                yield f"{room.__name__}.{name}", params


def test_every_iterative_api_takes_throw():
    """An API with an iteration budget or a failure policy takes ``throw`` (and no other spelling)."""
    iterative = [(name, p) for name, p in _public_callables() if {"max_iter", "max_matvecs", "on_failure"} & set(p)]
    assert len(iterative) >= 12, [name for name, _ in iterative]
    missing = [name for name, p in iterative if "throw" not in p]
    assert not missing, f"iterative APIs without `throw`: {missing}"


def test_one_exception_class():
    assert implicit.NonConvergenceError is functx.NonConvergenceError
    assert issubclass(functx.NonConvergenceError, RuntimeError)
    assert issubclass(functx.NonConvergenceWarning, RuntimeWarning)


def _spd(n=30, cond=1e8):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ q.T


A = _spd()
B = torch.ones(30, dtype=torch.float64)


def _solver_case(name):
    return lambda throw: getattr(solvers, name)(lambda x: A @ x, B, max_iter=2, throw=throw)


def _implicit_case(throw):
    # the root of F(x, theta) = A x - theta, solved badly (one CG step), differentiated: the
    # linear solves of the derivative get max_iter=1 through `solve`
    import functools

    def F(x, theta):
        return A @ x - theta

    solve = functools.partial(solvers.cg, max_iter=1)
    root = implicit.custom_root(F, solve=solve, throw=throw)(lambda x0, theta: torch.linalg.solve(A, theta))
    return functx.grad(lambda t: root(None, t).sum())(B)


def _eigsh_case(throw):
    return fc.eigsh(_spd(200, 1e4), k=3, which="SA", max_matvecs=30, ncv=10, throw=throw)


CASES = {
    **{f"solvers.{n}": _solver_case(n) for n in ("cg", "minres", "gmres", "bicgstab", "normal_cg")},
    "implicit.custom_root": _implicit_case,
    "curvature.eigsh": _eigsh_case,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_throw_raises_the_shared_error_with_shared_stats(name):
    with pytest.raises(functx.NonConvergenceError) as info:
        CASES[name](True)
    err = info.value
    assert err.api.startswith("functx."), err.api
    assert str(err).startswith(f"`{err.api}`"), str(err)
    assert "converged" in err.stats or SHARED_STATS & set(err.stats), err.stats
    assert set(err.stats) & {"num_steps", "num_matvecs"}, err.stats


GRAMMAR = re.compile(r"^`functx\.[\w.]+`: ")


@pytest.mark.parametrize(
    "call",
    [
        lambda: functx.grad(lambda x: x.sum(), argnums="0"),
        lambda: functx.hessian(lambda x: x.sum(), mode="x"),
        lambda: functx.vmap(lambda x: x, chunk_size=0),
        lambda: solvers.cg(lambda x: x, B, max_iter=-1),
        lambda: solvers.cg(lambda x: x, B, rtol="tight"),
        lambda: fc.eigsh(A, k=0),
        lambda: fc.trace(A, num_matvecs="many"),
        lambda: fc.GGNOperator(torch.nn.Linear(2, 1), torch.nn.MSELoss(), {}, [], num_data=-1),
        lambda: implicit.custom_root(lambda x, t: x - t, solve=3),
    ],
)
def test_argument_errors_speak_one_grammar(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert GRAMMAR.match(str(info.value)), str(info.value)
