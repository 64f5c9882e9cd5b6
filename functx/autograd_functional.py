"""A drop-in, faster ``torch.autograd.functional``.

Change one import line and keep every behaviour::

    import functx.autograd_functional as AF   # was: import torch.autograd.functional as AF

The six functions have the original's signatures, defaults, result nesting, ``strict`` and
``create_graph`` semantics, ``no_grad`` behaviour, exception types and messages. What
changes is the engine (the policy is ``functx._autograd_functional._spec.route``; the
speed-ups are measured in docs/benchmarks.md):

* ``jacobian`` and ``hessian`` run functx's vectorized core (``torch.func`` underneath)
  by default, not only with ``vectorize=True``. ``strategy``
  keeps its meaning (reverse or forward mode), and forward mode also works without
  ``vectorize=True`` and with ``create_graph=True``, which the original refuses.
* ``jvp`` runs forward mode instead of the double-backward trick for large inputs.
* ``hvp`` runs reverse over reverse instead of the double-backward trick (one backward
  pass fewer).
* ``vjp`` and ``vhp`` are already optimal and run the original algorithm unchanged.
* complex inputs or outputs run the original: its conventions, and its errors (such as
  ``jacobian`` of a complex output), are kept exactly.
* a ``func`` that writes its inputs in place raises the original's ``RuntimeError`` in
  every mode and size; the caller's tensors are never written.
* whenever ``torch.func`` cannot run ``func`` (a legacy ``autograd.Function``, ``.item()``
  under ``vmap``, an operation without a forward-mode formula...), the call is rerun with
  the original algorithm: the result, or the error, is the original's.
"""

from ._autograd_functional._api import hessian as hessian
from ._autograd_functional._api import hvp as hvp
from ._autograd_functional._api import jacobian as jacobian
from ._autograd_functional._api import jvp as jvp
from ._autograd_functional._api import vhp as vhp
from ._autograd_functional._api import vjp as vjp

__all__ = ["hessian", "hvp", "jacobian", "jvp", "vhp", "vjp"]
