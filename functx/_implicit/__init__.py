"""Implicit differentiation (private; the public namespace is :mod:`functx.implicit`).

``_functorch.py`` isolates the torch.func internals (the forward-over-forward fix, reading
flags under vmap, closure-capture detection); ``_linear.py`` is the differentiable,
transposable linear solve; ``_root.py`` holds ``custom_root``/``custom_fixed_point`` and
the implicit function theorem; ``_sensitivity.py`` the sensitivity_torch-style API.
"""
