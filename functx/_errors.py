"""The one failure vocabulary of every iterative routine (solvers, implicit functions, ``eigsh``,
inverse operators).

* Every iterative public API takes ``throw: bool``. ``throw=True`` raises
  :class:`NonConvergenceError` when the method did not converge; ``throw=False`` reports it in
  the result (``converged``) and, where the caller gets no result to read it from (an implicit
  function's derivative), warns with :class:`NonConvergenceWarning`.
* Results and errors name their statistics the same way: ``converged``, ``num_steps`` (the
  iterations of the method, what ``max_iter`` bounds), ``num_matvecs`` (operator products),
  ``residual_norm``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ._validate import api_name


class NonConvergenceError(RuntimeError):
    """An iterative method did not converge (raised with ``throw=True``).

    Attributes:
        api: the public name of the routine, e.g. ``"functx.solvers.cg"``.
        stats: what the routine measured, under the shared names (``num_steps``,
            ``num_matvecs``, ``residual_norm``, ...), as a dict.
    """

    def __init__(self, message: str, *, api: str = "", stats: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.api = api_name(api).strip("`") if api else ""
        self.stats: dict[str, Any] = dict(stats or {})


class NonConvergenceWarning(RuntimeWarning):
    """An iterative method did not converge and ``throw=False``: the result is an approximation."""


def report_nonconvergence(
    api: str, message: str, stats: Mapping[str, Any] | None, throw: bool, warn: bool = True, stacklevel: int = 3
) -> None:
    """Raise :class:`NonConvergenceError` (``throw``) or warn with :class:`NonConvergenceWarning`
    (``warn``); the message is prefixed with the API name and suffixed with the way out."""
    text = f"{api_name(api)}: {message}"
    if throw:
        raise NonConvergenceError(text, api=api, stats=stats)
    if warn:
        warnings.warn(text + " (pass throw=True to raise)", NonConvergenceWarning, stacklevel=stacklevel + 1)
