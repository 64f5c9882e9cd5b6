"""``functx.nn``: a ``torch.nn.Module`` as a pure function of its tensors.

::

    fmodel, params, buffers = functx.nn.make_functional(model)
    out = fmodel(params, buffers, x)                      # == model(x)
    grads = functx.grad(lambda p: loss(fmodel(p, buffers, x), y))(params)

* ``params`` / ``buffers`` are dicts keyed by ``named_parameters()`` / ``named_buffers()``
  names (the naming of ``state_dict`` and ``torch.func.functional_call``), holding the
  module's tensors *detached*: same storage, no grad tracking, plain tensors. Tied tensors
  appear once (under their first name); a call may name a tied group by any of its names,
  and giving two different tensors for one group raises ``ValueError``.
* The user's module is never written, not even temporarily: each call runs ``forward``
  (hooks and parametrizations included) on a per-call shallow copy of the module tree
  that holds the given tensors. Calls are therefore thread-safe, and the module keeps its
  ``Parameter`` objects, values, ``requires_grad`` flags, ``.grad`` tensors, training flags
  and buffers whatever happens inside ``forward``.
* State: buffers go in as values and come out as values. ``fmodel(...)`` returns the
  output and raises ``ValueError`` if ``forward`` updated a buffer (BatchNorm in training
  mode), rather than dropping the update; ``fmodel.stateful(...)`` returns
  ``(out, new_buffers)``. Buffers are cloned before each call, so neither the module's
  nor the caller's tensors are ever written in place.
* Mode: ``make_functional(model, training=False)`` or ``fmodel.with_training(False)``
  evaluates in eval mode (``True``: training mode) without touching ``model.training``; by
  default (``None``) each submodule follows its own flag at call time. Every keyword
  argument of a call belongs to the module's ``forward``.
* Structure: a :class:`FunctionalModule` holds the structure it was made from. Calling it
  after a parameter, buffer or submodule of the module was added, removed, replaced or
  re-shaped (or a parametrization registered) raises ``ValueError`` before any work,
  naming each change; call :func:`make_functional` again.
* BatchNorm in training mode under ``functx.vmap`` (per-sample gradients, grad of vmap)
  raises ``ValueError`` naming the layers and the fixes (``model.eval()``,
  ``make_functional(model, training=False)``, ``fmodel.with_training(False)``).
* :func:`stack` builds an ensemble: ``functx.vmap(fmodel, in_dims=(0, 0, None))``.
* :func:`partition` / :func:`combine` select parameters by glob, regex, names (such as
  ``fmodel.trainable``, the names with ``requires_grad``) or predicate, and merge them back.

Not convertible (clear errors): TorchScript modules, ``torch.compile``d modules, lazy
modules before their first forward, and attributes that reach a module of the tree through
closures, partials or plain containers (the call could not substitute its tensors there).
Attributes holding a module of the tree or a method bound to one are redirected to the
per-call copies.
"""

from ._nn._module import FunctionalModule as FunctionalModule
from ._nn._module import make_functional as make_functional
from ._nn._select import combine as combine
from ._nn._select import partition as partition
from ._nn._stack import stack as stack

__all__ = ["FunctionalModule", "combine", "make_functional", "partition", "stack"]
