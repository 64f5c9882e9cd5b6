"""The code of :mod:`functx.nn`, by concern.

* ``_plan``: the module tree analysed once (:class:`_plan.Plan`), and the check that it
  did not change since;
* ``_convert``: what cannot be converted, and the per-call redirections of attributes and
  hooks that refer to modules of the tree;
* ``_tensors``: the tensors of a call (names, aliases, tied groups) resolved and checked;
* ``_copy``: the per-call shallow copy of the module tree holding the given tensors;
* ``_state``: buffers (clones, updates detected by version counters);
* ``_module``: :class:`FunctionalModule` and :func:`make_functional`;
* ``_stack``: :func:`stack` (ensembles);
* ``_select``: :func:`partition` / :func:`combine`.
"""
