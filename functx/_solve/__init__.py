"""Matrix-free linear solvers (private; the public namespace is :mod:`functx.solvers`).

Layout: ``_common.py`` holds the protocol (:class:`~functx._solve._common.Solution`), option
validation, the pytree <-> flat-vector :class:`~functx._solve._common.Layout`, the
:class:`~functx._solve._common.Problem` every solver is set up with, and the fixed-trip-count
driver with masked updates. Each solver family has one module: ``cg.py`` (CG and
normal-equation CG share one kernel), ``minres.py``, ``bicgstab.py``, ``gmres.py``,
``dense.py`` (LU / Cholesky and :func:`factorize`) and ``dispatch.py`` (:func:`solve`).
"""
