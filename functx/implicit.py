"""Implicit differentiation: derivatives of solutions of equations, not of solvers.

A solution ``z*(theta)`` defined by an optimality condition ``F(z*, theta) = 0`` (or a
fixed point ``z* = T(z*, theta)``) has derivatives given by the implicit function theorem,
``dz*/dtheta = -(dF/dz)^{-1} dF/dtheta``, whatever algorithm found ``z*``. This module
attaches those derivatives to any solver, matrix-free (one linear solve per
Jacobian-vector or vector-Jacobian product), on pytrees:

* :func:`custom_root` / :func:`custom_fixed_point`: decorators for
  ``solver(init, *args, **kwargs) -> z`` (JAX's ``lax.custom_root``, JAXopt's decorators);
* :func:`root_vjp` / :func:`root_jvp`: the two products, usable directly;
* :func:`implicit_jacobian` / :func:`implicit_hessian`: sensitivity_torch's API (Jacobians,
  second derivatives, chain rules with an outer objective, Hessian-vector products).

Every derivative rule is itself built from linear solves whose rules are solves (JAX's
transposable ``custom_linear_solve`` design), so every functx / ``torch.func`` transform
works at every order: ``grad``, ``vjp``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian`` (all
modes), ``hvp`` (all modes), ``grad(grad(...))``, ``jacfwd(jacfwd(...))`` and ``vmap`` of
each. Forward-over-forward compositions go through a functx fix for a torch bug
(pytorch/pytorch#197867), checked at run time; where that check fails functx raises
instead of returning wrong numbers.

Linear solves: ``solve="auto"`` is CG when the Jacobian ``dF/dz`` is declared symmetric
(``symmetric=True``: ``F`` is the gradient of an objective at a strict minimum) and GMRES
otherwise (fixed points are never symmetric); tolerances follow :mod:`functx.solvers`
(dtype-aware). Failures are never silent: the forward residual ``||F(z*)||`` and every
linear solve are checked: ``throw=True`` raises :class:`NonConvergenceError` (the same class
as ``functx.NonConvergenceError``, carrying ``stats``), ``throw=False`` (the default) warns
with :class:`NonConvergenceWarning`, since the caller of a derivative has no result to
read a flag from. Under ``vmap`` a failure in any lane is reported (the flags are read for
the report only, in eager mode; under ``torch.compile`` nothing is reported). The former
``on_failure="warn"|"raise"|"ignore"`` is deprecated for one release (``"raise"`` is
``throw=True``, ``"warn"`` is ``throw=False``, ``"ignore"`` is ``throw=False`` without the
warning: filter :class:`NonConvergenceWarning` instead). A Jacobian declared symmetric (``symmetric=True``, or
``solve`` in ``"cg"``, ``"minres"``, ``"cholesky"``) is checked once per call
(``u.(A v)`` against ``v.(A u)`` for fixed pseudo-random ``u, v``, to ``sqrt(eps)``
relative) and reported the same way: a nonsymmetric Jacobian with a direct solve would
otherwise give the transposed derivatives.

``torch.compile``: implicit functions are not traceable (Dynamo inlines an
``autograd.Function``'s forward inside ``torch.func`` transforms and drops its derivative
rules), so functx marks them with ``torch.compiler.disable``: under ``fullgraph=True``
compiling refuses with that reason; otherwise the value (and ``vmap`` of it) runs eagerly
at a graph break. Apply derivative transforms outside compiled regions.

Closures: derivatives flow only to the arguments of the decorated solver. ``F`` is run
once per call under a check that raises ``ValueError`` when it uses a captured tensor
that requires grad or that an enclosing ``grad``/``jvp`` transform traces.
"""

from ._errors import NonConvergenceError as NonConvergenceError
from ._errors import NonConvergenceWarning as NonConvergenceWarning
from ._implicit._root import custom_fixed_point as custom_fixed_point
from ._implicit._root import custom_root as custom_root
from ._implicit._root import root_jvp as root_jvp
from ._implicit._root import root_vjp as root_vjp
from ._implicit._sensitivity import implicit_hessian as implicit_hessian
from ._implicit._sensitivity import implicit_jacobian as implicit_jacobian

__all__ = [
    "NonConvergenceError",
    "NonConvergenceWarning",
    "custom_fixed_point",
    "custom_root",
    "implicit_hessian",
    "implicit_jacobian",
    "root_jvp",
    "root_vjp",
]
