"""Matrix-free linear solvers (private; the public namespace is :mod:`functx.solvers`).

Layout: ``_common.py`` holds the protocol (:class:`~functx._solvers._common.Solution`),
option validation, the pytree <-> flat-vector :class:`~functx._solvers._common.Layout`, the
:class:`~functx._solvers._common.LinearProblem` every solver is set up with, and the
fixed-trip-count driver with masked updates. Each solver family has one module: ``cg.py``
(CG and normal-equation CG share one kernel), ``minres.py``, ``bicgstab.py``, ``gmres.py``,
``dense.py`` (LU / Cholesky and :func:`factorize`) and ``dispatch.py`` (:func:`solve`).
``linear_solve.py`` is the differentiable, transposable linear solve that implicit
differentiation is built on (JAX's ``custom_linear_solve``), and ``_functorch.py`` the
torch.func internals it and the vmap early stop need.
"""
