"""Shared test utilities: a catalogue of pytrees, tree comparison, finite differences and a
JAX-style ``check_grads`` (JVP against central differences, VJP by the adjoint identity)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

import functx

DTYPE = torch.float64
NS = "functx"


def tree_map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    return optree.tree_map(f, tree, *rest, namespace=NS)


def tree_leaves(tree: Any) -> list[Any]:
    return optree.tree_leaves(tree, namespace=NS)


def assert_tree_allclose(actual: Any, expected: Any, rtol: float = 1e-9, atol: float = 1e-9) -> None:
    """Same structure (functx policy) and leaves close; names the key path on failure."""
    spec_a = optree.tree_structure(actual, namespace=NS)
    spec_e = optree.tree_structure(expected, namespace=NS)
    assert spec_a == spec_e, f"structures differ:\n  actual   {spec_a}\n  expected {spec_e}"
    accessors, leaves_a, _ = optree.tree_flatten_with_accessor(actual, namespace=NS)
    for accessor, a, e in zip(accessors, leaves_a, tree_leaves(expected)):
        where = accessor.codify("tree")
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{where}: expected a tensor, got {type(a)}"
            assert a.shape == e.shape, f"{where}: shape {tuple(a.shape)} != {tuple(e.shape)}"
            assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
        else:
            assert a == e, f"{where}: {a!r} != {e!r}"


def tree_vdot(x: Any, y: Any) -> torch.Tensor:
    return sum((a * b).sum() for a, b in zip(tree_leaves(x), tree_leaves(y)))


def tree_axpy(alpha: float, x: Any, y: Any) -> Any:
    return tree_map(lambda a, b: alpha * a + b, x, y)


def randn_like_tree(tree: Any, generator: torch.Generator | None = None) -> Any:
    return tree_map(lambda t: torch.randn(t.shape, dtype=t.dtype, generator=generator), tree)


# ---------------------------------------------------------------------------------------
# Finite differences (float64, central, step 1e-6 gives ~1e-9 accuracy on smooth functions)


def fd_jvp(f: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...], eps: float = 1e-6) -> Any:
    """Central difference of ``f`` at ``primals`` along ``tangents`` (pytrees of tensors)."""
    plus = f(*(tree_axpy(eps, t, p) for p, t in zip(primals, tangents)))
    minus = f(*(tree_axpy(-eps, t, p) for p, t in zip(primals, tangents)))
    return tree_map(lambda a, b: (a - b) / (2 * eps), plus, minus)


def fd_grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central-difference gradient of a scalar function of one tensor."""
    flat = x.reshape(-1)
    g = torch.zeros_like(flat)
    for k in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[k] = eps
        g[k] = (f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * eps)
    return g.reshape(x.shape)


def check_grads(
    f: Callable[..., Any],
    primals: tuple[Any, ...],
    order: int = 2,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    """JAX's check_grads for functx: at each order up to ``order``, the JVP matches central
    differences and the VJP satisfies <t, vjp(c)> = <jvp(t), c> for random t, c."""
    gen = torch.Generator().manual_seed(seed)
    tangents = tuple(randn_like_tree(p, gen) for p in primals)
    out, tangent_out = functx.jvp(f, primals, tangents)
    assert_tree_allclose(tangent_out, fd_jvp(f, primals, tangents, eps), rtol=rtol, atol=atol)
    cotangents = randn_like_tree(out, gen)
    _, vjp_fn = functx.vjp(f, *primals)
    lhs = sum(tree_vdot(t, c) for t, c in zip(tangents, vjp_fn(cotangents)))
    rhs = tree_vdot(tangent_out, cotangents)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    if order > 1:
        # the next order: differentiate the JVP with respect to the primals (tangents fixed)
        check_grads(lambda *p: functx.jvp(f, p, tangents)[1], primals, order - 1, eps, rtol, atol, seed + 1)


# ---------------------------------------------------------------------------------------
# The tree catalogue: every pytree kind functx promises to handle.


class Pair(NamedTuple):
    a: Any
    b: Any


@optree.dataclasses.dataclass(namespace=NS)
class Params:
    w: torch.Tensor
    b: torch.Tensor
    name: str = dataclasses.field(default="layer", metadata={"pytree_node": False})


# optree's global namespace is a private sentinel; users reach it through libraries that
# register globally (and functx's namespace sees those registrations too).
_GLOBAL = optree.registry.__dict__["__GLOBAL_NAMESPACE"]


@optree.register_pytree_node_class(namespace=_GLOBAL)
class GlobalPoint:
    """Registered globally with ``optree.register_pytree_node_class``."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    def tree_flatten(self):
        return (self.x, self.y), None, ("x", "y")

    @classmethod
    def tree_unflatten(cls, metadata: Any, children: Any) -> GlobalPoint:
        return cls(*children)


def _t(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=DTYPE, generator=gen)


def tree_catalogue(seed: int = 0) -> dict[str, Any]:
    """Named example pytrees of float64 tensors (fresh tensors on every call)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "tensor": _t(3, gen=g),
        "scalar": _t(gen=g),
        "matrix": _t(2, 3, gen=g),
        "dict": {"w": _t(2, 2, gen=g), "b": _t(2, gen=g)},
        "nested": {"layer": [_t(2, gen=g), (_t(1, 2, gen=g), _t(gen=g))], "none": None, "z": {"u": _t(3, gen=g)}},
        "namedtuple": Pair(a=_t(2, gen=g), b={"c": _t(2, gen=g)}),
        "ordereddict": collections.OrderedDict([("z", _t(2, gen=g)), ("a", _t(1, gen=g))]),
        "dataclass": Params(w=_t(2, 3, gen=g), b=_t(3, gen=g)),
        "global_class": GlobalPoint(_t(2, gen=g), _t(2, gen=g)),
    }


def small_problem() -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """``(params, x, v)`` of a one-layer tanh net in float64: params/v ``{"w": (3, 2), "b": (2,)}``, x ``(4, 3)``."""
    g = torch.Generator().manual_seed(0)
    d = torch.float64
    p = {"w": torch.randn(3, 2, dtype=d, generator=g), "b": torch.randn(2, dtype=d, generator=g)}
    x = torch.randn(4, 3, dtype=d, generator=g)
    v = {"w": torch.randn(3, 2, dtype=d, generator=g), "b": torch.randn(2, dtype=d, generator=g)}
    return p, x, v


def small_net(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The net of :func:`small_problem`."""
    return torch.tanh(x @ p["w"] + p["b"])


def small_loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A scalar loss of :func:`small_net`."""
    return (small_net(p, x) ** 2).sum()
