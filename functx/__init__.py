"""functx: pure functional transforms for PyTorch, on arbitrary pytrees.

Transforms (JAX / torch.func conventions): :func:`grad`, :func:`value_and_grad`,
:func:`vjp`, :func:`jvp`, :func:`linearize`, :func:`jacrev`, :func:`jacfwd`,
:func:`hessian`, :func:`hvp` and :func:`vmap`. They compose with each other and with
``torch.vmap`` to any depth, and trace under ``torch.compile(fullgraph=True)``.

Pytree policy: arguments are flattened with optree in the ``"functx"`` namespace, which
includes optree's global registry; register your own classes with
``@optree.dataclasses.dataclass(namespace="functx")`` (or globally). ``None`` is an empty
subtree.

The two kinds of argument: a differentiated input (selected by ``argnums``, or every primal
of ``vjp``/``jvp``/``linearize``/``hvp``) is never changed; a ``func`` that writes one in
place raises ``ValueError`` in every mode. A non-differentiated positional argument belongs
to ``func``, which may write it in place, as under ``torch.func``.

Complex numbers follow JAX's rule: ``jacrev``/``jacfwd``/``hessian`` take ``holomorphic=``;
complex outputs are refused unless ``holomorphic=True`` (then the result is ``df/dz``), and a
complex input of a real output gets torch's gradient convention ``du/dx + i du/dy`` (the
conjugate of JAX's ``grad``).
"""

from . import autograd_functional as autograd_functional
from . import curvature as curvature
from . import implicit as implicit
from . import nn as nn
from . import solvers as solvers
from ._errors import NonConvergenceError as NonConvergenceError
from ._errors import NonConvergenceWarning as NonConvergenceWarning
from ._grad import grad as grad
from ._grad import value_and_grad as value_and_grad
from ._hessian import hessian as hessian
from ._hessian import hvp as hvp
from ._implicit._root import custom_fixed_point as custom_fixed_point
from ._implicit._root import custom_root as custom_root
from ._jacobian import jacfwd as jacfwd
from ._jacobian import jacrev as jacrev
from ._tree import NAMESPACE as NAMESPACE
from ._tree import PyTree as PyTree
from ._tree import TensorTree as TensorTree
from ._tree import ravel_pytree as ravel_pytree
from ._tree import tree_add as tree_add
from ._tree import tree_axpy as tree_axpy
from ._tree import tree_norm as tree_norm
from ._tree import tree_scale as tree_scale
from ._tree import tree_sub as tree_sub
from ._tree import tree_vdot as tree_vdot
from ._tree import tree_zeros_like as tree_zeros_like
from ._vjp_jvp import jvp as jvp
from ._vjp_jvp import linearize as linearize
from ._vjp_jvp import vjp as vjp
from ._vmap import vmap as vmap

__version__ = "0.1.0"

__all__ = [
    "NAMESPACE",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "PyTree",
    "TensorTree",
    "autograd_functional",
    "curvature",
    "custom_fixed_point",
    "custom_root",
    "grad",
    "hessian",
    "hvp",
    "implicit",
    "jacfwd",
    "jacrev",
    "jvp",
    "linearize",
    "nn",
    "ravel_pytree",
    "solvers",
    "tree_add",
    "tree_axpy",
    "tree_norm",
    "tree_scale",
    "tree_sub",
    "tree_vdot",
    "tree_zeros_like",
    "value_and_grad",
    "vjp",
    "vmap",
]
