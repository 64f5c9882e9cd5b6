"""Implicit differentiation (private; the public namespace is :mod:`functx.implicit`).

``_problem.py`` holds :class:`~functx._implicit._problem.RootProblem` (one call of an
implicit function: arguments, the optimality function on flat leaves, the implicit
function theorem) and the ``Root`` autograd Function; ``_root.py`` the public
``custom_root``/``custom_fixed_point``/``root_vjp``/``root_jvp``; ``_sensitivity.py`` the
sensitivity_torch-style API; ``_capture.py`` the call-time refusals (closure capture, plain
dual numbers). The linear solves are :mod:`functx._solvers.linear_solve` (the dependency
goes implicit -> solvers only).
"""
