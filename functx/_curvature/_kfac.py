"""KFAC and EKFAC: Kronecker factors computed from data (issue 17).

One pass over the data (two for EKFAC). Per batch: one functional forward under
:class:`._capture.Capture` (layer inputs and outputs of the ``params`` layers, recognised by
identity), the output-space vectors of the chosen Fisher (``type-2``: the columns of the output
Hessian's square root; ``mc``: gradients of the loss at labels drawn from the predictive;
``empirical``: the gradient at the true labels), and one backward of all of them to the layer
outputs (``is_grads_batched`` when there are several). The factors, for a layer with inputs
``a`` and output gradients ``g`` over ``S`` shared positions per sample (``N`` samples):

* expand: ``A = sum a a^T / (N S)``, ``G = sum_b s_b sum g g^T`` (over samples, positions,
  vectors);
* reduce: ``A = sum_n abar_n abar_n^T / N`` with ``abar_n`` the mean over positions,
  ``G = sum_b s_b sum_n gbar_n gbar_n^T`` with ``gbar_n`` the sum over positions;

with ``s_b`` the batch scale: ``w_b`` for type-2 (the square root is of the batch loss's own
Hessian), ``w_b R_b / mc_samples`` for mc and ``w_b R_b`` for empirical (as
:class:`~._operators.EFOperator`). These are curvlinops 3.0.1's factors; type-2 KFAC equals
the GGN's blocks where KFAC is exact. Uses of one weight (tying) count as further positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._validate import check_bool, check_choice, check_int, check_optional_float_dtype, check_seed
from ._capture import Capture, Use, conv_patches
from ._distributed import all_reduce_sum, check_same_across_ranks, on_every_rank
from ._kron import KronBlock, KroneckerOperatorBase, factor_eigh, spectral_dtype
from ._losses import draw_labels, output_hessian_sqrt
from ._operators import EmpiricalRisk

_FISHERS = ("type-2", "mc", "empirical")
_APPROX = ("expand", "reduce")
_UNSUPPORTED = ("error", "diagonal")
_EKFAC_CHUNK = 2**18  # entries of per-example gradients held at once by EKFAC's second pass (1 MiB in float32)


class _Restart(Exception):
    """A parameter turned out to need a diagonal block after the pass began."""


class _KroneckerFromData(KroneckerOperatorBase, EmpiricalRisk):
    """The shared construction of :class:`KFACOperator` and :class:`EKFACOperator`."""

    _eigen_corrected = False

    def __init__(
        self,
        model: Any,
        loss: Any,
        params: Any,
        data: Any,
        *,
        fisher: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        kfac_approx: str = "expand",
        joint_bias: bool = False,
        unsupported: str = "error",
        reduction: str | None = None,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = True,
        progress: bool = False,
        eigh_dtype: torch.dtype | None = None,
        group: Any = None,
    ) -> None:
        api = self._api = f"functx.curvature.{type(self).__name__}"
        short = api.removeprefix("functx.")
        self._fisher = check_choice(fisher, "fisher", _FISHERS, short)
        self._mc_samples = check_int(mc_samples, "mc_samples", short, minimum=1)
        if fisher != "mc" and mc_samples != 1:
            raise ValueError(f"`{api}`: `mc_samples` must be 1 unless fisher='mc', got {mc_samples}.")
        self._seed = check_seed(seed, short)
        self._approx = check_choice(kfac_approx, "kfac_approx", _APPROX, short)
        self._joint = check_bool(joint_bias, "joint_bias", short)
        self._unsupported = check_choice(unsupported, "unsupported", _UNSUPPORTED, short)
        self._eigh_dtype = check_optional_float_dtype(eigh_dtype, "eigh_dtype", short)
        self._init_data(
            model,
            loss,
            params,
            data,
            reduction=reduction,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            check_deterministic=check_deterministic,
            progress=progress,
            group=group,
        )
        self._names = list(self._layout.keys) if self._layout.keys is not None else list(self._layout.paths)
        blocks, eigen = self._build()
        self._set_blocks(blocks, eigen=eigen)

    # -- the pass over the data ----------------------------------------------------------------

    def _build(self) -> tuple[dict[str, KronBlock], dict[str, tuple[Any, ...]] | None]:
        """Local passes under :func:`on_every_rank` (a failure on one rank raises on all), the
        collectives outside them, in the same order on every rank."""
        stats = on_every_rank(self._local_factors, self._group, self._api, "computing the Kronecker factors")
        blocks = self._assemble(self._reduce(stats))
        del stats
        if self._eigen_corrected:
            return self._correct(blocks)
        return blocks, None

    def _local_factors(self) -> dict[str, torch.Tensor]:
        self._diagonal: set[str] = set()
        while True:
            try:
                stats = self._factor_pass()
                break
            except _Restart:
                continue
        for n in self._names:  # parameters no layer used and no op reached: zero diagonal blocks
            if n not in self._structure_names() and f"D:{n}" not in stats:
                stats[f"D:{n}"] = torch.zeros(self._size_of(n), dtype=self.dtype, device=self.device)
        return stats

    def _generator(self) -> torch.Generator:
        rank = torch.distributed.get_rank(self._group) if self._group is not None else 0
        return torch.Generator(device=self.device).manual_seed(self._seed + rank * 2**32)

    def _check_first_batch(self) -> None:
        """Deferred to the first batch of the first pass, whose captured forward serves both."""
        self._first_unchecked = True

    def _batches(self) -> Any:
        """Yield ``(uses, out, y, size, leaves)`` after one captured forward per batch."""
        roles: dict[str, tuple[str, str]] = {}
        for k, X, y, size in self._data.indexed_batches("Kronecker factors"):
            clone = False
            while True:
                leaves = [leaf.detach().requires_grad_() for leaf in self._layout.leaves]
                capture = Capture({id(t): n for t, n in zip(leaves, self._names)}, self._diagonal, roles, clone)
                with torch.enable_grad(), capture:
                    out = self._forward(self._layout.to_tree(leaves), X)
                if capture.unsupported.keys() - self._diagonal:
                    self._unsupported_use(capture.unsupported)
                if not capture.modified() or clone:
                    break
                clone = True
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"`{self._api}`: the model's prediction must be a tensor, got {type(out).__name__}.")
            if self._first_unchecked:  # EmpiricalRisk's first-batch checks, on this forward
                self._data.check_finite(X, "X", k)
                self._data.check_finite(y, "y", k)
                self._check_prediction(out)
                self._loss.value(out, y, k)
                self._first_unchecked = False
            yield capture.uses, out, y, size, leaves
            del capture, out, leaves  # nothing of this batch stays alive during the next forward

    def _unsupported_use(self, found: dict[str, str]) -> None:
        new = {n: op for n, op in found.items() if n not in self._diagonal}
        if self._unsupported == "error":
            name, op = next(iter(new.items()))
            raise ValueError(
                f"`{self._api}`: params[{name!r}] reaches the loss through {op}, which has no Kronecker factors "
                f"(supported: F.linear, F.conv2d and F.embedding taking the parameter as their weight or bias). "
                f"Pass unsupported='diagonal' to give it the exact diagonal as its block, or leave it out of params."
            )
        self._diagonal |= set(new)
        raise _Restart

    def _output_vectors(self, out: torch.Tensor, y: Any, size: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
        """``(K, *out.shape)`` output-space vectors and the batch scale ``s_b``."""
        w = self._loss.weight(size, self._num_data)
        if self._fisher == "type-2":
            return output_hessian_sqrt(self._loss, out, y, self._api), w
        scale = self._loss.ef_scale(out, size, self._num_data)
        if self._fisher == "empirical":
            return self._loss.output_gradient(out, y).unsqueeze(0), scale
        draws = [
            self._loss.output_gradient(out, draw_labels(self._loss, out, gen, self._api))
            for _ in range(self._mc_samples)
        ]
        return torch.stack(draws), scale / self._mc_samples

    def _backward(
        self, uses: list[Use], out: torch.Tensor, vectors: torch.Tensor, retain: bool = False
    ) -> list[torch.Tensor]:
        """The gradients ``(K, *layer output)`` of the vectors at every recorded layer output
        (the outputs are released: their gradients are all the passes need of them)."""
        if not uses:
            return []
        K = vectors.shape[0]
        outputs: list[torch.Tensor] = []
        for u in uses:
            assert u.output is not None
            outputs.append(u.output)
            u.output = None
        if not out.requires_grad:
            grads: tuple[torch.Tensor | None, ...] = (None,) * len(uses)
        else:
            grads = torch.autograd.grad(
                out,
                outputs,
                vectors if K > 1 else vectors[0],
                retain_graph=retain,
                allow_unused=True,
                is_grads_batched=K > 1,
            )
        result = []
        for g, o in zip(grads, outputs):
            if g is None:
                g = torch.zeros((K,) + tuple(o.shape), dtype=o.dtype, device=o.device)
            result.append(g if K > 1 else g.unsqueeze(0))
        return result

    def _factor_pass(self) -> dict[str, torch.Tensor]:
        stats: dict[str, torch.Tensor] = {}
        gen = self._generator()
        self._structure: dict[str, dict[str, Any]] = {}
        for uses, out, y, size, leaves in self._batches():
            vectors, scale = self._output_vectors(out, y, size, gen)
            diag_leaves = [(n, t) for n, t in zip(self._names, leaves) if n in self._diagonal]
            grads = self._backward(uses, out, vectors, retain=bool(diag_leaves))
            keys = [self._key(u) for u in uses]
            if self._approx == "expand":
                self._expand(stats, keys, uses, grads, scale, size)
            else:
                self._reduce_batch(stats, keys, uses, grads, scale, size)
            if diag_leaves:
                self._accumulate_diagonal(stats, diag_leaves, out, vectors, scale)
            del uses, out, vectors, grads, leaves, diag_leaves  # this batch's tensors go before the next forward
        return stats

    def _key(self, u: Use) -> str:
        key = u.weight if u.weight is not None else u.bias
        assert key is not None
        info = self._structure.setdefault(key, {"kind": u.kind, "weight": u.weight, "bias": u.bias})
        if info["bias"] != u.bias or info["weight"] != u.weight:
            raise ValueError(
                f"`{self._api}`: params[{key!r}] is used by {u.kind} layers with different "
                f"{'biases' if u.weight is not None else 'weights'} ({info['bias'] or info['weight']!r} and "
                f"{u.bias or u.weight!r}); KFAC has no common Kronecker block for it."
            )
        if u.kind == "embedding" and self._approx == "reduce":
            raise ValueError(
                f"`{self._api}`: kfac_approx='reduce' is not defined for an embedding (params[{key!r}]): its input "
                f"is a token index, whose mean over positions is no input. Use kfac_approx='expand'."
            )
        return key

    def _joint_for(self, key: str) -> bool:
        info = self._structure[key]
        return self._joint and info["kind"] != "embedding" and info["weight"] is not None and info["bias"] is not None

    def _expand(
        self, stats: dict[str, torch.Tensor], keys: list[str], uses: list[Use], grads: list[torch.Tensor], scale: float,
        size: int,
    ) -> None:  # fmt: skip
        """expand: ``G += s_b sum g g^T`` over rows and vectors; ``A += sum a a^T / (N S)`` with
        ``S`` the rows per sample of all uses of the weight in this batch (``grads`` is emptied
        before the inputs' patches are made)."""
        for key, u, g in zip(keys, uses, grads):
            _add_gram(stats, f"G:{key}", _grad_vectors(u, g), scale)
        grads.clear()
        rows: dict[str, int] = {}
        for key, u in zip(keys, uses):
            if u.weight is not None:
                rows[key] = rows.get(key, 0) + _num_rows(u)
        for key, u in zip(keys, uses):
            if u.weight is None:
                continue
            alpha = size / (self._num_data * rows[key])
            if u.kind == "embedding":
                counts = torch.bincount(u.input.reshape(-1), minlength=u.options["num_embeddings"]).to(self.dtype)
                if u.options["padding_idx"] is not None:
                    counts[u.options["padding_idx"]] = 0.0  # no gradient reaches the padding row
                _add(stats, f"A:{key}", counts.mul_(alpha))
            else:
                _add_gram(stats, f"A:{key}", _input_vectors(u), alpha, joint=self._joint_for(key))

    def _reduce_batch(
        self, stats: dict[str, torch.Tensor], keys: list[str], uses: list[Use], grads: list[torch.Tensor], scale: float,
        size: int,
    ) -> None:  # fmt: skip
        """reduce: ``G += s_b sum_n gbar gbar^T`` (``gbar``: the sum over positions and uses of a
        sample's output gradients); ``A += sum_n abar abar^T / N`` (``abar``: the mean input)
        (``grads`` is emptied before the inputs' patches are made)."""
        g_sums: dict[str, torch.Tensor] = {}
        x_sums: dict[str, torch.Tensor] = {}
        positions: dict[str, int] = {}
        pers = [self._per_sample(key, u, _num_rows(u), size) for key, u in zip(keys, uses)]
        for key, u, g, per in zip(keys, uses, grads, pers):
            _add(g_sums, key, _sample_sums(_grad_vectors(u, g), per))
        grads.clear()
        for key, u, per in zip(keys, uses, pers):
            if u.weight is not None:
                _add(x_sums, key, _sample_sums(_input_vectors(u), per))
                positions[key] = positions.get(key, 0) + per
        for key, gbar in g_sums.items():
            _add_gram(stats, f"G:{key}", gbar, scale)
        for key, xsum in x_sums.items():
            _add_gram(stats, f"A:{key}", xsum.div_(positions[key]), 1 / self._num_data, joint=self._joint_for(key))

    def _per_sample(self, key: str, u: Use, rows: int, size: int) -> int:
        """The positions per sample of a use whose rows are sample-major (reduce and EKFAC)."""
        if size == 0 or rows % size:
            what = "kfac_approx='reduce'" if not self._eigen_corrected else "EKFACOperator"
            raise ValueError(
                f"`{self._api}`: {what} needs the {u.kind} layer of params[{key!r}] to keep the batch axis "
                f"first ({size} samples), got {rows} rows of inputs."
            )
        return rows // size

    def _accumulate_diagonal(
        self,
        stats: dict[str, torch.Tensor],
        leaves: list[tuple[str, torch.Tensor]],
        out: torch.Tensor,
        vectors: torch.Tensor,
        scale: float,
    ) -> None:
        """The exact diagonal: per-row vectors (each vector restricted to one row of the
        prediction), backpropagated to the parameters, squared and summed."""
        per_row = _per_row(vectors, self._loss.row_dims(out))
        names = [n for n, _ in leaves]
        grads: tuple[torch.Tensor | None, ...]
        if out.requires_grad:
            grads = torch.autograd.grad(out, [t for _, t in leaves], per_row, allow_unused=True, is_grads_batched=True)
        else:
            grads = (None,) * len(leaves)
        for n, g, (_, t) in zip(names, grads, leaves):
            value = torch.zeros_like(t).reshape(-1) if g is None else g.reshape(g.shape[0], -1).square().sum(0)
            _add(stats, f"D:{n}", value * scale)

    # -- reduction and assembly ------------------------------------------------------------------

    def _reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One all-reduce of every factor (after a digest check that the ranks found the same layers)."""
        keys = sorted(stats)
        if self._group is None:
            return stats
        signature = [(k, tuple(stats[k].shape), stats[k].dtype) for k in keys]
        check_same_across_ranks(signature, self._group, self._api)
        flat = torch.cat([stats[k].reshape(-1) for k in keys])
        flat = all_reduce_sum(flat, self._group)
        pieces = flat.split([stats[k].numel() for k in keys])
        return {k: p.reshape(stats[k].shape) for k, p in zip(keys, pieces)}

    def _structure_names(self) -> set[str]:
        names: set[str] = set()
        for info in self._structure.values():
            names.update(n for n in (info["weight"], info["bias"]) if n is not None)
        return names

    def _size_of(self, name: str) -> int:
        return self._layout.sizes[self._names.index(name)]

    def _assemble(self, stats: dict[str, torch.Tensor]) -> dict[str, KronBlock]:
        blocks: dict[str, KronBlock] = {}
        for key, info in self._structure.items():
            G = _symmetric_(stats[f"G:{key}"])
            w, b = info["weight"], info["bias"]
            if w is None:
                blocks[b] = KronBlock((b,), G, None)
                continue
            A = stats[f"A:{key}"]
            A = A if A.ndim == 1 else _symmetric_(A)
            if self._joint_for(key):
                if self._names.index(b) != self._names.index(w) + 1:
                    raise ValueError(
                        f"`{self._api}`: joint_bias=True puts params[{w!r}] and params[{b!r}] in one block, so the "
                        f"bias must come right after the weight in params; reorder params or pass joint_bias=False."
                    )
                blocks[w] = KronBlock((w, b), G, A)
                continue
            blocks[w] = KronBlock((w,), G, A, transposed=info["kind"] == "embedding")
            if b is not None:
                blocks[b] = KronBlock((b,), G, None)
        for n in self._names:
            if f"D:{n}" in stats:
                blocks[n] = KronBlock((n,), stats[f"D:{n}"], None)
        order = {n: i for i, n in enumerate(self._names)}
        return dict(sorted(blocks.items(), key=lambda item: order[item[1].params[0]]))

    def _correct(self, blocks: dict[str, KronBlock]) -> tuple[dict[str, KronBlock], dict[str, tuple[Any, ...]]]:
        raise NotImplementedError


class KFACOperator(_KroneckerFromData):
    """Kronecker-factored approximate curvature (KFAC) of the GGN, Fisher or empirical Fisher.

    A block-diagonal ``(P, P)`` operator: one block ``G ⊗ A`` per layer of ``params``
    (``F.linear`` with any leading axes, ``F.conv2d`` with any stride, padding, dilation and
    groups, ``F.embedding`` under ``"expand"``), recognised by parameter identity during a
    functional forward of the model (no hooks on the module, nothing traced per batch size).
    A block acts on the row-major flattening of its ``(out, in...)`` weight: ``V -> G V A``
    (``G`` over the output features, ``A`` over the inputs). The factors are computed once, at
    construction, in one pass over ``data``; products, traces and inverses need no data.

    Args:
        model: an ``nn.Module`` (through :func:`functx.nn.make_functional`, never written)
            or a callable ``model(params, X) -> prediction``.
        loss: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` or (for
            ``"type-2"``/``"empirical"``) another loss module or callable.
        params: a dict name -> tensor (a subset of ``named_parameters()`` for a module).
        data: a re-iterable of ``(X, y)`` batches (under ``torch.distributed``, this
            process's shard).
        fisher: ``"type-2"`` (the columns of the output Hessian's square root: KFAC of the
            GGN), ``"mc"`` (``mc_samples`` labels drawn from the predictive) or
            ``"empirical"`` (the true labels: KFAC of :class:`EFOperator`). (default: ``"mc"``)
        mc_samples: labels drawn per sample for ``"mc"``. (default: 1)
        seed: seeds a private ``torch.Generator`` for ``"mc"`` (the global RNG is not used;
            rank ``r`` of a process group uses ``seed + r * 2**32``). (default: 0)
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers over extra axes (Eschenhagen et
            al., 2023). (default: ``"expand"``)
        joint_bias: one block for a layer's weight and bias (a ones column appended to the
            inputs: the row-major vec of ``[W | b]``); ``False`` gives a bias its own block
            ``G``. (default: ``False``)
        unsupported: what to do with a parameter reaching the loss through another
            operation: ``"error"`` (a ``ValueError`` naming it and the operation) or
            ``"diagonal"`` (its exact diagonal, of the GGN for ``"type-2"``, of the Fisher's
            MC estimate for ``"mc"``, of the empirical Fisher, as its block).
            (default: ``"error"``)
        reduction: ``"mean"`` or ``"sum"``: required for a callable ``loss``. (default: the
            loss module's ``reduction``)
        num_data: the number of samples ``N`` over all processes. (default: counted in one
            pass over ``data``)
        batch_size_fn: ``X -> int`` for a batch whose ``X`` is not a tensor. (default:
            ``X.shape[0]``)
        check_deterministic: evaluate the loss and gradient twice at construction and raise
            ``ValueError`` when they differ. (default: ``True``)
        progress: a tqdm progress bar over the batches of each pass. (default: ``False``)
        eigh_dtype: the dtype of the factors' eigendecompositions (computed once, at the
            first ``inverse``, ``power`` or ``logdet``, which use the factors' eigenvalues).
            (default: float64 for float32 factors, else the factors' dtype)
        group: the ``torch.distributed`` process group the factors are reduced over.
            (default: the world group when ``torch.distributed`` is initialised, else none)

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> params = dict(model.named_parameters())
        >>> K = fc.KFACOperator(model, torch.nn.MSELoss(), params, [(X, y)],
        ...                     fisher="type-2", joint_bias=True)
        >>> list(K.blocks)
        ['weight']
        >>> G = fc.GGNOperator(model, torch.nn.MSELoss(), params, [(X, y)])
        >>> torch.allclose(K.to_dense(), G.to_dense(), atol=1e-6)  # exact for one layer
        True
    """

    _eigen_corrected = False


class EKFACOperator(_KroneckerFromData):
    """Eigenvalue-corrected KFAC (George et al., 2018).

    The eigenbasis ``Q_G ⊗ Q_A`` of :class:`KFACOperator`'s blocks, with the eigenvalues
    replaced by the exact second moments of the per-example gradients (per output column for
    ``"type-2"``) in that basis: the eigenvalues of a block equal ``diag(Qᵀ B Q)`` for the
    block ``B`` of the matrix KFAC approximates, so the trace is exact. A second pass over
    the data. The model's prediction must be 2-D (one row per example). Arguments as for
    :class:`KFACOperator`, except ``eigh_dtype``: the dtype of the decompositions that give
    the basis, at construction. Default: the factors' dtype, as curvlinops (EKFAC uses only the
    eigenvectors, and measures its eigenvalues exactly in the basis it got; a float32 basis of
    a 785 x 785 factor is orthonormal to about 1e-6). ``torch.float64`` gives float32 factors a
    basis orthonormal to float32's rounding, at up to 2.5 times the cost of the decompositions
    (the largest cost of construction for wide MLPs).

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> params = dict(model.named_parameters())
        >>> E = fc.EKFACOperator(model, torch.nn.CrossEntropyLoss(), params, [(X, y)], fisher="type-2")
        >>> G = fc.GGNOperator(model, torch.nn.CrossEntropyLoss(), params, [(X, y)]).to_dense()
        >>> blocks = torch.block_diag(*[G[a:b, a:b] for a, b in [(0, 12), (12, 16), (16, 24), (24, 26)]])
        >>> torch.isclose(torch.trace(E.to_dense()), torch.trace(blocks), rtol=1e-4).item()
        True
    """

    _eigen_corrected = True

    def _correct(self, blocks: dict[str, KronBlock]) -> tuple[dict[str, KronBlock], dict[str, tuple[Any, ...]]]:
        bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._blocks_shapes: dict[str, tuple[int, int]] = {}
        eigen: dict[str, tuple[Any, ...]] = {}  # handed to the base: the basis the eigenvalues were measured in
        dtype = self._eigh_dtype or self.dtype  # the basis; the spectral functions stay in `spectral`
        spectral = spectral_dtype(self.dtype)
        for key, info in self._structure.items():
            block = blocks[key if info["weight"] is not None else info["bias"]]
            g_vals, g_vecs = factor_eigh(block.G, dtype, symmetric=True)  # made so by _assemble
            a_vals, a_vecs = factor_eigh(block.A, dtype, symmetric=True) if block.A is not None else (None, None)
            assert g_vecs is not None
            g_vals, a_vals = g_vals.to(spectral), None if a_vals is None else a_vals.to(spectral)
            bases[key] = (g_vecs.to(self.dtype), None if a_vecs is None else a_vecs.to(self.dtype))
            A = blocks[info["weight"]].A if info["weight"] is not None else None
            self._blocks_shapes[key] = (block.G.shape[0], 1 if A is None else A.shape[0])
            for name in (info["weight"], info["bias"]):
                if name is not None and name in blocks:
                    b = blocks[name]
                    eigen[name] = (g_vals, g_vecs, a_vals, a_vecs) if b.A is not None else (g_vals, g_vecs, None, None)
        eig = on_every_rank(lambda: self._local_moments(bases), self._group, self._api, "EKFAC's second pass")
        keys = sorted(eig)
        if self._group is not None:
            flat = all_reduce_sum(torch.cat([eig[k].reshape(-1) for k in keys]), self._group)
            eig = {k: p.reshape(eig[k].shape) for k, p in zip(keys, flat.split([eig[k].numel() for k in keys]))}
        corrected = dict(blocks)
        for key, info in self._structure.items():
            w, b = info["weight"], info["bias"]
            if w is not None:
                corrected[w] = blocks[w]._replace(eigenvalues=eig[f"W:{key}"])
            if b is not None and b in blocks:
                corrected[b] = blocks[b]._replace(eigenvalues=eig[f"B:{key}"])
        return corrected, eigen

    def _local_moments(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        """This rank's second moments in the eigenbases (every key present, zero without data)."""
        eig: dict[str, torch.Tensor] = {}
        for key, info in self._structure.items():
            block_w = self._blocks_shapes[key]
            if info["weight"] is not None:
                eig[f"W:{key}"] = torch.zeros(block_w, dtype=self.dtype, device=self.device)
            if info["bias"] is not None and (info["weight"] is None or not self._joint_for(key)):
                eig[f"B:{key}"] = torch.zeros(block_w[0], dtype=self.dtype, device=self.device)
        gen = self._generator()
        for uses, out, y, size, _ in self._batches():
            if out.ndim != 2:
                raise ValueError(
                    f"`{self._api}`: EKFAC needs the model's prediction to be 2-D (one row per example), got the "
                    f"output of shape {tuple(out.shape)}; use KFACOperator for sequence or image outputs."
                )
            vectors, scale = self._output_vectors(out, y, size, gen)
            grads = self._backward(uses, out, vectors)
            grouped: dict[str, list[tuple[Use, torch.Tensor]]] = {}
            for u, g in zip(uses, grads):
                grouped.setdefault(self._key(u), []).append((u, g))
            for key, items in grouped.items():
                self._moments(eig, key, items, bases[key], size, scale)
            del uses, out, vectors, grads, grouped  # this batch's tensors go before the next forward
        return eig

    def _moments(
        self,
        eig: dict[str, torch.Tensor],
        key: str,
        items: list[tuple[Use, torch.Tensor]],
        basis: tuple[torch.Tensor, torch.Tensor | None],
        size: int,
        scale: float,
    ) -> None:
        """Add ``scale * sum_{k,n} (Q_G^T grad_{k,n} Q_A)^2`` of this batch (per-example gradients
        summed over positions and uses)."""
        info = self._structure[key]
        QG, QA = basis
        per = [self._per_sample(key, u, _num_rows(u), size) for u, _ in items]
        gs = [_columns(_grad_vectors(u, g), g.shape[0], size, p) for (u, g), p in zip(items, per)]  # (K, B, m, S)
        if info["bias"] is not None and (info["weight"] is None or not self._joint_for(key)):
            gsum = sum(g.sum(3) for g in gs)
            assert isinstance(gsum, torch.Tensor)
            _add(eig, f"B:{key}", (gsum @ QG).square().sum((0, 1)).mul_(scale))
        if info["weight"] is None:
            return
        if info["kind"] == "embedding":
            _add(eig, f"W:{key}", _embedding_moments(items, gs, QG, size).mul_(scale))
            return
        xs = [_columns(_input_vectors(u), 1, size, p)[0] for (u, _), p in zip(items, per)]  # (B, n, S)
        _add(eig, f"W:{key}", _eigen_moments(gs, xs, QG, QA, self._joint_for(key)).mul_(scale))


def _num_rows(u: Use) -> int:
    """The rows (samples times positions) of one use: the vectors its factors sum over."""
    if u.kind == "conv2d":
        return u.shape[0] * u.shape[2] * u.shape[3]
    if u.kind == "embedding":
        return u.input.numel()
    return u.input.numel() // max(1, u.input.shape[-1])


def _grad_vectors(u: Use, g: torch.Tensor) -> torch.Tensor:
    """The output gradients ``(K, *output)`` of a use as ``(K R, m)`` rows, or for a conv2d as
    ``(K B, m, S)``: one column per output location of each sample (the layout of the output,
    no copy)."""
    if u.kind == "conv2d":
        return g.reshape(g.shape[0] * g.shape[1], g.shape[2], -1)
    return g.reshape(-1, g.shape[-1])


def _input_vectors(u: Use) -> torch.Tensor:
    """The inputs of a linear use as ``(R, n)`` rows; a conv2d's patches as ``(B, n, S)``."""
    if u.kind == "conv2d":
        return conv_patches(u.input, u.options)
    return u.input.reshape(-1, u.input.shape[-1])


def _sample_sums(t: torch.Tensor, per: int) -> torch.Tensor:
    """Per-sample sums over positions: of ``(R, d)`` sample-major rows (``per`` rows each), or
    of ``(B, d, S)`` columns; ``(samples, d)``."""
    return t.sum(2) if t.ndim == 3 else t.reshape(-1, per, t.shape[1]).sum(1)


def _add_gram(store: dict[str, torch.Tensor], key: str, t: torch.Tensor, alpha: float, joint: bool = False) -> None:
    """``store[key] += alpha * sum v v^T`` over the vectors ``v`` of ``t``: the rows of a 2-D
    ``(R, n)``, or the columns of every sample of a 3-D ``(B, n, S)``; ``joint`` appends a 1 to
    each ``v`` (the bias column, last). In place, into a buffer allocated at the first call."""
    n = t.shape[1]
    buf = store.get(key)
    if buf is None:
        buf = store[key] = t.new_zeros(n + joint, n + joint)
    inner = buf[:n, :n]
    if t.ndim == 2:
        inner.addmm_(t.mT, t, alpha=alpha)
    else:  # per-sample products, in chunks whose (c, n, n) products are a quarter of t at most
        step = max(1, t.numel() // (4 * n * n))
        for i in range(0, t.shape[0], step):
            inner.add_(torch.bmm(t[i : i + step], t[i : i + step].mT).sum(0), alpha=alpha)
    if joint:
        sums = t.sum(0) if t.ndim == 2 else t.sum((0, 2))
        buf[:n, n].add_(sums, alpha=alpha)
        buf[n, :n].add_(sums, alpha=alpha)
        buf[n, n] += alpha * (t.shape[0] if t.ndim == 2 else t.shape[0] * t.shape[2])


def _columns(t: torch.Tensor, K: int, size: int, per: int) -> torch.Tensor:
    """``(K, B, d, S)``: the vectors of each sample as columns, from ``(K R, d)`` sample-major
    rows (a transposed view) or ``(K B, d, S)`` columns (a view)."""
    if t.ndim == 3:
        return t.reshape(K, size, t.shape[1], t.shape[2])
    return t.reshape(K, size, per, t.shape[1]).mT


def _eigen_moments(
    gs: list[torch.Tensor], xs: list[torch.Tensor], QG: torch.Tensor, QA: torch.Tensor | None, joint: bool
) -> torch.Tensor:
    """``sum_{k,b} (Q_G^T W_{k,b} Q_A)^2`` for the per-example gradients ``W_{k,b} = sum_u
    g_u x_u^T`` (``x`` with a trailing 1 with ``joint``), from the uses' output gradients
    ``(K, B, m, S_u)`` and inputs ``(B, n, S_u)``, by the cheaper of two exact routes: the
    per-example gradients, rotated (cost ``m n (S + m + n)`` per example and vector), or, for
    few positions, the Gram matrices of the rotated vectors over positions (curvlinops'
    "gramian"; for one position, ``(Q_G^T g)^2 ⊗ (Q_A^T x)^2``, no ``m x n`` matrix per example)."""
    assert QA is not None
    K, _, m = gs[0].shape[:3]
    n = QA.shape[0]
    S = sum(g.shape[3] for g in gs)
    per_example = K * m * n * (S + m + n)
    gramian = S * (K * m * m + n * n) + S * S * (K * m + n + m * n)
    return (_gramian_moments if gramian < per_example else _per_example_moments)(gs, xs, QG, QA, joint)


def _per_example_moments(
    gs: list[torch.Tensor], xs: list[torch.Tensor], QG: torch.Tensor, QA: torch.Tensor, joint: bool
) -> torch.Tensor:
    """The per-example gradients, rotated and squared, in chunks of examples."""
    K, B, m = gs[0].shape[:3]
    n = QA.shape[0]
    total = gs[0].new_zeros(m, n)
    step = max(1, _EKFAC_CHUNK // (K * m * n))
    for i in range(0, B, step):
        W = _per_example(gs[0][:, i : i + step], xs[0][i : i + step], joint)
        for g, x in zip(gs[1:], xs[1:]):
            W += _per_example(g[:, i : i + step], x[i : i + step], joint)
        W = QG.mT @ W
        total += (W @ QA).square_().sum((0, 1))
    return total


def _per_example(g: torch.Tensor, x: torch.Tensor, joint: bool) -> torch.Tensor:
    """``(K, c, m, n)``: ``sum_s g x^T`` per example and vector (a ones column last with ``joint``)."""
    K, c, m, S = g.shape
    rows = g.transpose(0, 1).reshape(c, K * m, S)  # a view for K = 1
    W = torch.bmm(rows, x.mT).reshape(c, K, m, -1).transpose(0, 1)
    return torch.cat([W, g.sum(3, keepdim=True)], dim=3) if joint else W


def _gramian_moments(
    gs: list[torch.Tensor], xs: list[torch.Tensor], QG: torch.Tensor, QA: torch.Tensor, joint: bool
) -> torch.Tensor:
    """``sum_{b,s,t} (sum_k gt_bs gt_bt) ⊗ (xt_bs xt_bt)`` for the rotated vectors ``gt``, ``xt``."""
    gt = (torch.cat([g.mT for g in gs], dim=2) if len(gs) > 1 else gs[0].mT) @ QG  # (K, B, S, m)
    xt = torch.cat([x.mT for x in xs], dim=1) if len(xs) > 1 else xs[0].mT  # (B, S, n)
    xt = xt @ QA[:-1] + QA[-1] if joint else xt @ QA  # [x, 1] @ QA without the ones column
    K, B, S, m = gt.shape
    n = xt.shape[2]
    total = gt.new_zeros(m, n)
    step = max(1, _EKFAC_CHUNK // (S * S * (K * m + n)))
    for i in range(0, B, step):
        g, x = gt[:, i : i + step], xt[i : i + step]
        Yg = (g.unsqueeze(3) * g.unsqueeze(2)).sum(0)  # (c, S, S, m)
        Xg = x.unsqueeze(2) * x.unsqueeze(1)  # (c, S, S, n)
        total.addmm_(Yg.reshape(-1, m).mT, Xg.reshape(-1, n))
    return total


def _embedding_moments(
    items: list[tuple[Use, torch.Tensor]], gs: list[torch.Tensor], QG: torch.Tensor, size: int
) -> torch.Tensor:
    """``sum_{k,b} (Q_G^T W_{k,b})^2`` for an embedding: ``W`` scatters the gradients into the rows
    of the looked-up tokens (``A`` is diagonal, its basis the identity)."""
    u0 = items[0][0]
    V, padding = u0.options["num_embeddings"], u0.options["padding_idx"]
    gt = torch.cat([g.mT for g in gs], dim=2) @ QG  # (K, B, S, m)
    K, B, S, m = gt.shape
    idx = torch.cat([u.input.reshape(size, -1) for u, _ in items], dim=1)  # (B, S)
    weights = torch.ones_like(idx, dtype=gt.dtype) if padding is None else (idx != padding).to(gt.dtype)
    per_ex = gt.new_zeros(K, B, m, V)
    src = (gt * weights[None, :, :, None]).transpose(2, 3)  # (K, B, m, S)
    per_ex.scatter_add_(3, idx[None, :, None, :].expand(K, B, m, S), src)
    return per_ex.square().sum((0, 1))


def _per_row(vectors: torch.Tensor, row_dims: tuple[int, ...]) -> torch.Tensor:
    """``(K * R, *out)``: each of the ``K`` vectors restricted to each of the ``R`` rows."""
    shape = vectors.shape[1:]
    other = [d for d in range(len(shape)) if d not in row_dims]
    R = 1
    for d in other:
        R *= shape[d]
    ids = torch.arange(R, device=vectors.device).reshape([shape[d] for d in other])
    for d in sorted(row_dims):
        ids = ids.unsqueeze(d)
    masks = ids.unsqueeze(0) == torch.arange(R, device=vectors.device).reshape((R,) + (1,) * len(shape))
    return (vectors.unsqueeze(1) * masks.unsqueeze(0).to(vectors.dtype)).reshape((-1,) + tuple(shape))


def _add(store: dict[str, Any], key: str, value: torch.Tensor) -> None:
    """``store[key] += value`` (in place: every ``value`` passed here is a fresh tensor)."""
    if key in store:
        store[key].add_(value)
    else:
        store[key] = value


def _symmetric_(M: torch.Tensor) -> torch.Tensor:
    """``M <- (M + M^T) / 2``, exactly symmetric, in place: a band of rows (and the matching
    columns) at a time, so that no second ``n x n`` matrix is made."""
    n = M.shape[0]
    step = max(1, 2**16 // max(1, n))
    for i in range(0, n, step):
        rows, cols = M[i : i + step, i:], M[i:, i : i + step]
        mean = (rows + cols.mT).mul_(0.5)
        rows.copy_(mean)
        cols.copy_(mean.mT)
    return M
