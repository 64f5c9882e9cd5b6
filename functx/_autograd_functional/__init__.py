"""The code of :mod:`functx.autograd_functional`, by concern.

* ``_spec``: one frozen :class:`~_spec.Spec` per API (its original, engine, arguments,
  nesting rules, ``strict`` policy) and :func:`~_spec.route`, the whole engine policy;
* ``_checks``: the original's checks of ``inputs``/``v``/outputs/``strategy``, with its
  exception types and messages;
* ``_strict``: ``strict=True`` for ``jacobian``/``hessian`` (plain-autograd probes);
* ``_engine``: :func:`~_engine.call`, the one adapter from the original's API to functx's
  core (preparing inputs, computing, rerunning the original, undoing the tupling);
* ``_api``: the six public functions.
"""
