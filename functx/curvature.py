"""Curvature of a loss over a dataset: ``functx.curvature``.

Operators (matrix-free, ``P x P`` with ``P`` the number of entries of ``params``)::

    H = HessianOperator(model, loss, params, data)   # Hessian of L = sum_b w_b l_b
    G = GGNOperator(model, loss, params, data)       # sum_b w_b J_b^T (d^2 l_b / d f^2) J_b
    F = EFOperator(model, loss, params, data)        # empirical Fisher c * sum_n g_n g_n^T
    H @ v            # v: (P,), (P, K) or a dict like params -> the same form back

* Scaling (curvlinops' convention): batch ``b`` of ``B_b`` samples enters with weight
  ``w_b = B_b / N`` for ``reduction="mean"`` (``N`` counted in one pass, or ``num_data``)
  and ``1`` for ``"sum"``. For ``CrossEntropyLoss``/``MSELoss``/``BCEWithLogitsLoss`` this
  is the loss of the whole dataset taken as one batch: ``c = 1/N`` for cross-entropy,
  ``1/(N C)`` for the other two over ``C`` output entries.
* Flattening: ``params``' key order, each tensor raveled row-major (C order);
  :meth:`~HessianOperator.flatten` / :meth:`~HessianOperator.unflatten` convert.
* Pure: the module is evaluated through :func:`functx.nn.make_functional` and never
  written; operators may be applied from several threads.
* Differentiable: ``H @ v`` is differentiable in ``v`` (its derivative is ``H``) under
  autograd and every functx/torch.func transform; products may run inside
  ``torch.inference_mode()``, construction may not.
* ``torch.distributed``: each process passes its shard of the data; products are
  all-reduced once each, ``N`` is global, and every rank raises the same errors.

Kronecker-factored operators (closed-form inverses, powers and log-determinants)::

    K = KFACOperator(model, loss, params, data, fisher="type-2")  # or EKFACOperator
    K.inverse(damping=1e-3) @ v      # (K + damping I)^-1 v, exact; K.power(-0.5), K.logdet(1e-3)
    InverseOperator(G + 0.1 * H, damping=1e-3, preconditioner=K.inverse(1e-3))  # any operator

Estimators, working on any object with ``shape``, ``dtype``, ``device``, ``@``,
``flatten`` and ``unflatten`` (or a symmetric tensor), reproducible from ``seed`` on every
rank::

    evals, evecs = eigsh(H, k=3, which="LA")                  # block Lanczos, thick restarts
    trace(H, num_matvecs=100, method="hutch++")               # "hutchinson", "xtrace"
    diagonal(H, num_matvecs=100, method="xdiag", as_tree=True)  # "hutchinson"; (P,) or a dict
    grid, density = spectral_density(H, num_probes=10, num_steps=50)  # stochastic Lanczos quadrature

Applications (any operator above, an inverse of one, or a dense tensor as ``S``/``inverse``)::

    cov = output_covariance(model, params, X, S)     # J(x) S J(x)^T per row: (B, C, C)
    scores = influence(model, loss, params, train, queries, inverse)  # (num_queries, num_train)
"""

from ._curvature._estimators import EigshInfo as EigshInfo
from ._curvature._estimators import diagonal as diagonal
from ._curvature._estimators import eigsh as eigsh
from ._curvature._estimators import spectral_density as spectral_density
from ._curvature._estimators import trace as trace
from ._curvature._influence import influence as influence
from ._curvature._inverse import InverseOperator as InverseOperator
from ._curvature._kfac import EKFACOperator as EKFACOperator
from ._curvature._kfac import KFACOperator as KFACOperator
from ._curvature._kron import KronBlock as KronBlock
from ._curvature._operators import EFOperator as EFOperator
from ._curvature._operators import GGNOperator as GGNOperator
from ._curvature._operators import HessianOperator as HessianOperator
from ._curvature._predictive import output_covariance as output_covariance

__all__ = [
    "EFOperator",
    "EKFACOperator",
    "EigshInfo",
    "GGNOperator",
    "HessianOperator",
    "InverseOperator",
    "KFACOperator",
    "KronBlock",
    "diagonal",
    "eigsh",
    "influence",
    "output_covariance",
    "spectral_density",
    "trace",
]
