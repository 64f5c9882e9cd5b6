"""Matrix-free linear solvers on pytrees: ``functx.solvers``.

Every solver is a function ``solver(matvec, b, x0=None, *, ...) -> Solution``: ``b`` and the
solution are pytrees of tensors with the same structure, ``matvec(x)`` returns a pytree of
that structure, and the returned :class:`Solution` always reports ``num_steps``,
``residual_norm`` (recomputed from the solution) and ``converged``; failure is never silent.
With ``throw=True`` a solve that did not converge raises :class:`functx.NonConvergenceError`
(carrying those statistics) instead; the flag is read in eager mode and under every
transform (any ``vmap`` lane), not under ``torch.compile`` or tracing, where ``converged`` is
the report. User callables (``matvec``, ``preconditioner``, ``rmatvec``) never receive the
caller's tensors, and must not write their argument in place (refused in eager mode).

=================  ==============================================  ==========================
solver             operator                                        cost per iteration
=================  ==============================================  ==========================
:func:`cg`         Hermitian positive definite                     1 matvec
:func:`minres`     Hermitian, possibly indefinite                  1 matvec
:func:`gmres`      general square (``restart`` Krylov vectors)     1 matvec + O(restart n)
:func:`bicgstab`   general square                                  2 matvecs
:func:`normal_cg`  any, least squares ``min ||Ax - b||``           1 matvec + 1 rmatvec
:func:`lu`         general square, dense                           n matvecs + O(n^3), once
:func:`cholesky`   Hermitian positive definite, dense              n matvecs + O(n^3), once
=================  ==============================================  ==========================

:func:`factorize` materialises and factors once for many right-hand sides, and
:func:`solve` picks a solver by name or by structure. Every solver takes ``ridge``
(solve ``(A + ridge I) x = b``; for ``normal_cg``, ``(A^H A + ridge I) x = A^H b``).

Tolerances: converged when ``||b - A x|| <= max(atol, rtol * ||b||)``; the default
``rtol`` depends on the dtype (1e-12 for float64, 1e-5 for float32, 1e-2 for float16,
5e-2 for bfloat16) and ``atol`` defaults to 0. ``max_iter`` defaults to
``min(10 n, 1000)`` with ``n`` the total number of unknowns.

Transforms: the solvers are written for ``torch.vmap``, ``functx``/``torch.func``
transforms and ``torch.compile``: masked updates (a converged lane is frozen), no
``.item()``, and guarded divisions (no 0/0 or inf in converged lanes, in values or
derivatives). In plain eager mode the iterative solvers stop as soon as they converge;
under ``vmap`` and the other transforms in eager mode they stop as soon as *every* lane
has converged (the flag is read under the functorch wrappers, once per iteration; the
remaining masked iterations would change nothing). Only where no value can be read
(``torch.compile``, tracing, fake tensors) do they run the fixed trip count of
``max_iter`` iterations, so keep ``max_iter`` small there. The results are the same
either way, up to rounding.

The differentiable, transposable linear solve that :mod:`functx.implicit` is built on
(JAX's ``custom_linear_solve``) lives in this room too (``functx._solvers.linear_solve``).
"""

from ._solvers._common import Solution as Solution
from ._solvers.bicgstab import bicgstab as bicgstab
from ._solvers.cg import cg as cg
from ._solvers.cg import normal_cg as normal_cg
from ._solvers.dense import (
    Factorization as Factorization,
)
from ._solvers.dense import (
    cholesky as cholesky,
)
from ._solvers.dense import (
    factorize as factorize,
)
from ._solvers.dense import (
    lu as lu,
)
from ._solvers.dispatch import solve as solve
from ._solvers.gmres import gmres as gmres
from ._solvers.minres import minres as minres

__all__ = [
    "Factorization",
    "Solution",
    "bicgstab",
    "cg",
    "cholesky",
    "factorize",
    "gmres",
    "lu",
    "minres",
    "normal_cg",
    "solve",
]
