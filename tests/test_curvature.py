"""functx.curvature operators: products against independent float64 dense references,
purity, determinism checks and bad-input errors."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import functx
import functx.curvature as fc

F64 = torch.float64
N_SPLIT = (4, 4, 2)  # uneven last batch


# -- problems -------------------------------------------------------------------------------


def mlp(d_in: int = 3, d_out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).to(F64)


def targets(kind: str, n: int, c: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "ce":
        return torch.randint(0, c, (n,), generator=gen)
    if kind == "bce":
        return torch.rand(n, c, generator=gen, dtype=F64).round()
    return torch.randn(n, c, generator=gen, dtype=F64)


def split(
    X: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...] = N_SPLIT
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(X.split(list(sizes)), y.split(list(sizes))))


def squared(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # a callable loss, per-sample mean
    return ((pred - y) ** 4).sum() / pred.shape[0]


def squared_sum(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 4).sum()


LOSSES = {
    "ce-mean": (lambda: nn.CrossEntropyLoss(), "ce", None),
    "ce-sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), "ce", None),
    "mse-mean": (lambda: nn.MSELoss(), "mse", None),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), "mse", None),
    "bce-mean": (lambda: nn.BCEWithLogitsLoss(), "bce", None),
    "bce-sum": (lambda: nn.BCEWithLogitsLoss(reduction="sum"), "bce", None),
    "callable-mean": (lambda: squared, "mse", "mean"),
    "callable-sum": (lambda: squared_sum, "mse", "sum"),
}


def setup(name: str, n: int = 10):
    make, kind, reduction = LOSSES[name]
    model = mlp()
    X = torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    return model, make(), reduction, X, targets(kind, n)


# -- independent references -------------------------------------------------------------------


def flat_params(model: nn.Module, names: list[str]) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([named[k].detach().reshape(-1) for k in names])


def as_dict(model: nn.Module, names: list[str], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    named, out, i = dict(model.named_parameters()), {}, 0
    for k in names:
        out[k] = flat[i : i + named[k].numel()].reshape(named[k].shape)
        i += named[k].numel()
    return out


def call(model: nn.Module, names: list[str], flat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(model, as_dict(model, names, flat), (X,))


def dataset_loss(model, loss, names, data, reduction):
    n = sum(len(X) for X, _ in data)

    def L(flat: torch.Tensor) -> torch.Tensor:
        return sum((len(X) / n if reduction == "mean" else 1.0) * loss(call(model, names, flat, X), y) for X, y in data)

    return L


def dense_hessian(model, loss, names, data, reduction):
    flat = flat_params(model, names)
    return torch.autograd.functional.hessian(dataset_loss(model, loss, names, data, reduction), flat)


def dense_ggn(model, loss, names, data, reduction):
    flat, n = flat_params(model, names), sum(len(X) for X, _ in data)
    total = 0
    for X, y in data:
        w = len(X) / n if reduction == "mean" else 1.0
        out = call(model, names, flat, X)
        J = torch.autograd.functional.jacobian(lambda f: call(model, names, f, X), flat).reshape(out.numel(), -1)
        Hout = torch.autograd.functional.hessian(lambda o: loss(o.reshape(out.shape), y), out.reshape(-1))
        total = total + w * J.T @ Hout @ J
    return total


def dense_ef(model, names, data, per_sample_loss, c):
    """``c * sum_n g_n g_n^T`` from per-sample gradients of the sum-reduced loss."""
    flat = flat_params(model, names)
    rows = []
    for X, y in data:
        for i in range(len(X)):
            f = lambda p: per_sample_loss(call(model, names, p, X[i : i + 1]), y[i : i + 1])
            rows.append(torch.autograd.functional.jacobian(f, flat))
    g = torch.stack(rows)
    return c * g.T @ g


SUM_LOSS = {
    "ce": lambda o, y: nn.functional.cross_entropy(o, y, reduction="sum"),
    "mse": lambda o, y: nn.functional.mse_loss(o, y, reduction="sum"),
    "bce": lambda o, y: nn.functional.binary_cross_entropy_with_logits(o, y, reduction="sum"),
}


def check_products(op, dense: torch.Tensor, names: list[str]) -> None:
    """``op @ v`` for flat, matrix and dict ``v`` against ``dense``, and ``to_dense``."""
    P = dense.shape[0]
    gen = torch.Generator().manual_seed(3)
    v, V = torch.randn(P, dtype=F64, generator=gen), torch.randn(P, 5, dtype=F64, generator=gen)
    torch.testing.assert_close(op @ v, dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V, dense @ V, rtol=1e-10, atol=1e-12)
    tree = op.unflatten(v)
    assert list(tree) == names
    result = op @ tree
    assert list(result) == names
    torch.testing.assert_close(op.flatten(result), dense @ v, rtol=1e-10, atol=1e-12)
    matrix_tree = op @ op.unflatten(V)
    torch.testing.assert_close(torch.cat([t.reshape(-1, 5) for t in matrix_tree.values()]), dense @ V)
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12)
    assert op.shape == (P, P) and op.dtype == F64 and op.device == torch.device("cpu")


ALL = ["0.weight", "0.bias", "2.weight", "2.bias"]


# -- products ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_hessian_matches_dense(name):
    model, loss, reduction, X, y = setup(name)
    data = split(X, y)
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), data, reduction=reduction)
    check_products(H, dense_hessian(model, loss, ALL, data, H._loss.reduction), ALL)


@pytest.mark.parametrize("name", list(LOSSES))
def test_ggn_matches_dense(name):
    model, loss, reduction, X, y = setup(name)
    data = split(X, y)
    G = fc.GGNOperator(model, loss, dict(model.named_parameters()), data, reduction=reduction)
    check_products(G, dense_ggn(model, loss, ALL, data, G._loss.reduction), ALL)


@pytest.mark.parametrize("name", list(LOSSES))
def test_ef_matches_per_sample_outer_products(name):
    model, loss, reduction, X, y = setup(name)
    data = split(X, y)
    F = fc.EFOperator(model, loss, dict(model.named_parameters()), data, reduction=reduction)
    kind, mean = LOSSES[name][1], F._loss.reduction == "mean"
    if name.startswith("callable"):
        per_sample, c = squared_sum, (1 / 10 if mean else 1.0)
    else:
        per_sample, c = SUM_LOSS[kind], (1.0 if not mean else 1 / 10 if kind == "ce" else 1 / 30)
    check_products(F, dense_ef(model, ALL, data, per_sample, c), ALL)


def test_parameter_subset_is_the_block_of_the_full_matrix():
    model, loss, _, X, y = setup("ce-mean")
    data = split(X, y)
    full = dense_hessian(model, loss, ALL, data, "mean")
    named = dict(model.named_parameters())
    subset = {"2.weight": named["2.weight"], "0.bias": named["0.bias"]}  # key order sets the flattening
    H = fc.HessianOperator(model, loss, subset, data)
    idx = torch.cat([torch.arange(12, 16), torch.arange(16, 28)])  # 0.bias entries, then 2.weight's
    idx = torch.cat([torch.arange(16, 28), torch.arange(12, 16)])
    torch.testing.assert_close(H.to_dense(), full[idx][:, idx], rtol=1e-10, atol=1e-12)
    G = fc.GGNOperator(model, loss, subset, data)
    torch.testing.assert_close(G.to_dense(), dense_ggn(model, loss, ALL, data, "mean")[idx][:, idx])


def test_a_list_of_the_modules_parameters_as_curvlinops_takes_it():
    model, loss, _, X, y = setup("ce-mean")
    data = split(X, y)
    full = dense_hessian(model, loss, ALL, data, "mean")
    named = dict(model.named_parameters())
    subset = [named["2.weight"], named["0.bias"]]  # the list's order is the flattening order
    idx = torch.cat([torch.arange(16, 28), torch.arange(12, 16)])
    H = fc.HessianOperator(model, loss, subset, data)
    torch.testing.assert_close(H.to_dense(), full[idx][:, idx], rtol=1e-10, atol=1e-12)
    v = [torch.randn_like(t) for t in subset]
    Hv = H @ v  # trees are lists, as given
    assert isinstance(Hv, list) and [t.shape for t in Hv] == [t.shape for t in subset]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in Hv]), H @ H.flatten(v))
    assert isinstance(H.unflatten(torch.zeros(H.shape[0])), list)
    K = fc.KFACOperator(model, loss, list(model.parameters()), data, fisher="type-2")
    K_named = fc.KFACOperator(model, loss, named, data, fisher="type-2")
    torch.testing.assert_close(K.to_dense(), K_named.to_dense())
    assert list(K.blocks) == list(K_named.blocks)  # blocks named by the parameters' names either way
    as_dict = {"2.weight": named["2.weight"], "0.bias": named["0.bias"]}
    S = torch.eye(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        fc.output_covariance(model, subset, X, S), fc.output_covariance(model, as_dict, X, S)
    )  # the applications take the list too
    torch.testing.assert_close(
        fc.influence(model, loss, subset, data, data[:1], S), fc.influence(model, loss, as_dict, data, data[:1], S)
    )
    with pytest.raises(TypeError, match=r"params\[0\] must be one of the model's own parameters"):
        fc.GGNOperator(model, loss, [named["0.bias"].detach().clone()], data)
    with pytest.raises(ValueError, match=r"params\[1\] must appear once"):
        fc.GGNOperator(model, loss, [named["0.bias"], named["0.bias"]], data)
    with pytest.raises(ValueError, match=r"`v` must be a list with one tensor per parameter"):
        H @ v[:1]


def test_curvature_at_given_values_with_fixed_rest():
    model, loss, _, X, y = setup("mse-mean")
    data = split(X, y)
    named = dict(model.named_parameters())
    moved = {"2.weight": named["2.weight"].detach() + 0.5}
    H = fc.HessianOperator(model, loss, moved, data)
    flat = flat_params(model, ALL)
    flat[16:28] += 0.5
    L = dataset_loss(model, loss, ALL, data, "mean")
    full = torch.autograd.functional.hessian(L, flat)
    torch.testing.assert_close(H.to_dense(), full[16:28, 16:28])


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.net(batch["x"]) * batch["scale"]


def test_dict_like_X_with_batch_size_fn():
    model, loss, _, X, y = setup("ce-mean")
    wrapped = DictInput()
    data = [({"x": xb, "scale": 2.0}, yb) for xb, yb in split(X, y)]
    with pytest.raises(TypeError, match=r"batch_size_fn"):
        fc.HessianOperator(wrapped, loss, dict(wrapped.named_parameters()), data)
    ops = [
        cls(wrapped, loss, dict(wrapped.named_parameters()), data, batch_size_fn=lambda b: b["x"].shape[0])
        for cls in (fc.HessianOperator, fc.GGNOperator)
    ]
    assert ops[0].num_data == 10
    scaled = nn.Sequential(model, _Scale())
    names = ["0." + k for k in ALL]
    ref_data = split(X, y)
    torch.testing.assert_close(ops[0].to_dense(), dense_hessian(scaled, loss, names, ref_data, "mean"))
    torch.testing.assert_close(ops[1].to_dense(), dense_ggn(scaled, loss, names, ref_data, "mean"))


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x


def test_callable_model_with_a_pytree_of_params():
    module, loss, _, X, y = setup("bce-mean")
    named = {k: t.detach() for k, t in module.named_parameters()}
    params = {"layers": [(named["0.weight"], named["0.bias"]), (named["2.weight"], named["2.bias"])]}

    def model(p, x):
        (w1, b1), (w2, b2) = p["layers"]
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    data = split(X, y)
    H = fc.HessianOperator(model, loss, params, data)
    ref = fc.HessianOperator(module, loss, dict(module.named_parameters()), data).to_dense()
    torch.testing.assert_close(H.to_dense(), ref)  # leaf order = the key order here
    out = H @ params
    assert isinstance(out["layers"][1], tuple) and out["layers"][1][0].shape == (3, 4)


def test_num_data_overrides_the_count():
    model, loss, _, X, y = setup("mse-mean")
    data = split(X, y)
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), data)
    H20 = fc.HessianOperator(model, loss, dict(model.named_parameters()), data, num_data=20)
    assert H20.num_data == 20
    torch.testing.assert_close(H20.to_dense(), H.to_dense() / 2)


# -- sequences, ignore_index, curvlinops ------------------------------------------------------


class Tagger(nn.Module):
    """Per-position logits (B, C, T) from inputs (B, T, D)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).transpose(1, 2)


def sequence_problem():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(7, 5, 3, dtype=F64, generator=gen)
    y = torch.randint(0, 4, (7, 5), generator=gen)
    y[0, :3] = -100
    y[5, 4] = -100
    return Tagger(), X, y, split(X, y, (3, 3, 1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_sequence_targets_with_ignore_index(reduction):
    model, X, y, data = sequence_problem()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    names = ["net." + k for k in ALL]
    params = dict(model.named_parameters())
    H = fc.HessianOperator(model, loss, params, data)
    torch.testing.assert_close(H.to_dense(), dense_hessian(model, loss, names, data, reduction))
    G = fc.GGNOperator(model, loss, params, data)
    torch.testing.assert_close(G.to_dense(), dense_ggn(model, loss, names, data, reduction))


def test_ef_sequence_rows_sum_reduced():
    # sum reduction: the EF sums outer products of per-position gradients (ignored ones are 0)
    model, X, y, data = sequence_problem()
    loss = nn.CrossEntropyLoss(reduction="sum")
    names = ["net." + k for k in ALL]
    F = fc.EFOperator(model, loss, dict(model.named_parameters()), data)
    flat = flat_params(model, names)
    rows = []
    for i in range(len(X)):
        for t in range(5):
            f = lambda p: nn.functional.cross_entropy(
                call(model, names, p, X[i : i + 1])[..., t], y[i : i + 1, t], reduction="sum"
            )
            rows.append(torch.autograd.functional.jacobian(f, flat))
    g = torch.stack(rows)
    torch.testing.assert_close(F.to_dense(), g.T @ g)


CURVLINOPS_CASES = {
    "ce": (lambda: nn.CrossEntropyLoss(), "ce"),
    "mse": (lambda: nn.MSELoss(), "mse"),
    "bce": (lambda: nn.BCEWithLogitsLoss(), "bce"),
}


@pytest.mark.parametrize("case", [*CURVLINOPS_CASES, "sequence"])
def test_equal_to_curvlinops(case):
    curvlinops = pytest.importorskip("curvlinops")
    if case == "sequence":
        model, _, _, data = sequence_problem()
        loss = nn.CrossEntropyLoss()
    else:
        model, loss, _, X, y = setup(f"{case}-mean")
        data = split(X, y)
    params = dict(model.named_parameters())
    pairs = [
        (fc.HessianOperator, curvlinops.HessianLinearOperator),
        (fc.GGNOperator, curvlinops.GGNLinearOperator),
        (fc.EFOperator, curvlinops.EFLinearOperator),
    ]
    v = torch.randn(sum(p.numel() for p in params.values()), 3, dtype=F64)
    for ours, theirs in pairs:
        expected = theirs(model, loss, list(params.values()), data) @ v
        torch.testing.assert_close(ours(model, loss, params, data) @ v, expected, rtol=1e-9, atol=1e-12)


# -- determinism, purity ----------------------------------------------------------------------


def test_check_deterministic_catches_dropout_and_train_mode_batchnorm():
    _, loss, _, X, y = setup("ce-mean")
    data = split(X, y)
    dropout = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 3)).to(F64)
    with pytest.raises(
        ValueError, match=r"HessianOperator`: two passes .* the module\(s\) '1' \(Dropout\) in training"
    ):
        fc.HessianOperator(dropout, loss, dict(dropout.named_parameters()), data)
    bn = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(F64)
    before = {k: b.clone() for k, b in bn.named_buffers()}
    with pytest.raises(
        ValueError,
        match=r"GGNOperator`: .*'1' \(BatchNorm1d\) in training mode and a forward that updates the buffer\(s\) \['1.num_batches_tracked', '1.running_mean', '1.running_var'\]",
    ):
        fc.GGNOperator(bn, loss, dict(bn.named_parameters()), data)
    assert all(torch.equal(before[k], b) for k, b in bn.named_buffers())
    bn.eval()
    fc.GGNOperator(bn, loss, dict(bn.named_parameters()), data)  # eval mode: deterministic
    fc.EFOperator(dropout, loss, dict(dropout.named_parameters()), data, check_deterministic=False)


def snapshot(model: nn.Module):
    return (
        [
            (k, id(p), p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
            for k, p in model.named_parameters()
        ],
        [(k, id(b), b.clone()) for k, b in model.named_buffers()],
        [m.training for m in model.modules()],
    )


def assert_same(a, b) -> None:
    for (ka, ia, va, ra, ga), (kb, ib, vb, rb, gb) in zip(a[0], b[0]):
        assert (ka, ia, ra) == (kb, ib, rb) and torch.equal(va, vb)
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    for (ka, ia, va), (kb, ib, vb) in zip(a[1], b[1]):
        assert (ka, ia) == (kb, ib) and torch.equal(va, vb)
    assert a[2] == b[2]


@pytest.mark.parametrize("cls", [fc.HessianOperator, fc.GGNOperator, fc.EFOperator])
def test_module_untouched(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    model[1].running_mean.add_(0.3)
    model.eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[3].bias.requires_grad_(False)
    _, loss, _, X, y = setup("ce-mean")
    before = snapshot(model)
    op = cls(model, loss, dict(model.named_parameters()), split(X, y))
    op @ torch.randn(op.shape[0], dtype=F64)
    op @ torch.randn(op.shape[0], 2, dtype=F64)
    op.to_dense()
    assert_same(before, snapshot(model))


def test_concurrent_products_from_threads():
    model, loss, _, X, y = setup("ce-mean")
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), split(X, y))
    vs = [torch.randn(H.shape[0], dtype=F64) for _ in range(4)]
    expected = [H @ v for v in vs]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, H @ vs[k])) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        torch.testing.assert_close(results[k], expected[k], rtol=0, atol=0)


def test_to_scipy_and_progress():
    pytest.importorskip("scipy")
    model, loss, _, X, y = setup("mse-sum")
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), split(X, y))
    dense = H.to_dense().numpy()
    A = H.to_scipy()
    v = torch.randn(H.shape[0], 2, dtype=F64).numpy()
    assert A.shape == H.shape
    torch.testing.assert_close(torch.as_tensor(A @ v), torch.as_tensor(dense @ v))
    torch.testing.assert_close(torch.as_tensor(A @ v[:, 0]), torch.as_tensor(dense @ v[:, 0]))
    try:
        import tqdm  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match=r"progress=True needs tqdm"):
            fc.HessianOperator(model, loss, dict(model.named_parameters()), split(X, y), progress=True)
    else:
        P = fc.HessianOperator(model, loss, dict(model.named_parameters()), split(X, y), progress=True)
        torch.testing.assert_close(P.to_dense().numpy(), dense)


def test_empty_matrix_and_float32_vectors():
    model, loss, _, X, y = setup("mse-mean")
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), split(X, y))
    assert (H @ torch.zeros(H.shape[0], 0, dtype=F64)).shape == (H.shape[0], 0)
    v = torch.randn(H.shape[0])
    out = H @ v  # float32 in: computed in the operator's dtype
    assert out.dtype == F64
    torch.testing.assert_close(out, H @ v.to(F64))


# -- errors -----------------------------------------------------------------------------------


def test_bad_vectors():
    model, loss, _, X, y = setup("ce-mean")
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), split(X, y))
    P = H.shape[0]
    with pytest.raises(
        ValueError, match=r"`functx.curvature.HessianOperator`: `v` must have shape \(31,\) or \(31, K\), got \(32,\)"
    ):
        H @ torch.zeros(P + 1, dtype=F64)
    with pytest.raises(ValueError, match=r"`v` must have shape"):
        H @ torch.zeros(P, 2, 2, dtype=F64)
    with pytest.raises(TypeError, match=r"`v` must be a real floating-point tensor, got dtype torch.int64"):
        H @ torch.zeros(P, dtype=torch.long)
    tree = H.unflatten(torch.zeros(P, dtype=F64))
    with pytest.raises(ValueError, match=r"`v` must be a dict with the keys of params"):
        H @ {k: t for k, t in tree.items() if k != "0.bias"}
    tree["0.bias"] = torch.zeros(5, dtype=F64)
    with pytest.raises(ValueError, match=r"params\['0.bias'\] must have shape \(4,\)"):
        H @ tree
    with pytest.raises(
        TypeError,
        match=r"cannot be compiled, exported or traced|cannot run inside a functx/torch.func transform or torch.compile",
    ):
        torch.compile(lambda v: H @ v, backend="eager")(torch.zeros(P, dtype=F64))


def test_bad_construction():
    model, loss, _, X, y = setup("ce-mean")
    params, data = dict(model.named_parameters()), split(X, y)
    api = r"`functx.curvature.GGNOperator`: "
    with pytest.raises(ValueError, match=api + r"`data` must hold at least one sample"):
        fc.GGNOperator(model, loss, params, [])
    with pytest.raises(ValueError, match=api + r"params\['1.weight'\] must be a parameter of the model"):
        fc.GGNOperator(model, loss, {"1.weight": torch.zeros(3, dtype=F64)}, data)
    with pytest.raises(ValueError, match=api + r"params\['0.bias'\] must have the shape"):
        fc.GGNOperator(model, loss, {"0.bias": torch.zeros(3, dtype=F64)}, data)
    with pytest.raises(ValueError, match=api + r"the loss's reduction must be 'mean' or 'sum'.*'none'"):
        fc.GGNOperator(model, nn.CrossEntropyLoss(reduction="none"), params, data)
    with pytest.raises(ValueError, match=api + r"the loss's reduction must be 'mean' or 'sum'.*'max'"):
        fc.GGNOperator(model, squared, params, data, reduction="max")
    with pytest.raises(
        ValueError, match=api + r"`reduction` must agree with the loss module's reduction 'mean', got 'sum'"
    ):
        fc.GGNOperator(model, loss, params, data, reduction="sum")
    with pytest.raises(TypeError, match=api + r"`reduction` must be given for a callable `loss` without a `reduction`"):
        fc.GGNOperator(model, squared, params, data)
    with pytest.raises(TypeError, match=api + r"`loss` must be a torch.nn loss module or a callable"):
        fc.GGNOperator(model, "mse", params, data)
    with pytest.raises(TypeError, match=api + r"`model` must be a torch.nn.Module or a callable"):
        fc.GGNOperator(42, loss, params, data)
    with pytest.raises(TypeError, match=api + r"`data` must be a re-iterable .* one-shot iterator"):
        fc.GGNOperator(model, loss, params, iter(data))
    with pytest.raises(ValueError, match=api + r"`num_data` must be an int >= 1, got 0"):
        fc.GGNOperator(model, loss, params, data, num_data=0)
    with pytest.raises(TypeError, match=api + r"params\['0.bias'\] must be a floating-point tensor"):
        fc.GGNOperator(model, loss, {"0.bias": torch.zeros(4, dtype=torch.long)}, data)
    with pytest.raises(ValueError, match=api + r"batch 0 of `data` must be a pair"):
        fc.GGNOperator(model, loss, params, [X])
    with pytest.raises(ValueError, match=api + r"every tensor of `params` must have one dtype and device"):
        fc.GGNOperator(model, loss, {"0.bias": params["0.bias"], "2.bias": params["2.bias"].float()}, data)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.CrossEntropyLoss(label_smoothing=0.1),
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=F64)),
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0, 3.0], dtype=F64)),
        lambda: nn.HuberLoss(delta=0.5),
    ],
    ids=["ce-label-smoothing", "ce-weight", "bce-pos-weight", "huber"],
)
def test_ggn_autodiff_output_hessian_where_no_closed_form(make):
    loss = make()
    kind = "ce" if isinstance(loss, nn.CrossEntropyLoss) else "bce" if isinstance(loss, nn.BCEWithLogitsLoss) else "mse"
    model = mlp()
    X = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    data = split(X, targets(kind, 10))
    G = fc.GGNOperator(model, loss, dict(model.named_parameters()), data)
    torch.testing.assert_close(G.to_dense(), dense_ggn(model, loss, ALL, data, "mean"))


@pytest.mark.parametrize("name", ["ce-mean", "mse-sum", "bce-mean"])
def test_closed_form_output_hessians_are_used(name, monkeypatch):
    from functx._curvature import _losses

    def refuse(*args, **kwargs):
        raise AssertionError("autodiff used where a closed form applies")

    monkeypatch.setattr(_losses, "_autodiff_hessian_product", refuse)
    model, loss, _, X, y = setup(name)
    G = fc.GGNOperator(model, loss, dict(model.named_parameters()), split(X, y))
    G @ torch.randn(G.shape[0], dtype=F64)


def test_callable_model_pytree_v_of_the_wrong_structure_names_the_key_path():
    def model(p, X):
        return X @ p["a"]["w"] + p["b"]

    p = {"a": {"w": torch.randn(3, 2, dtype=torch.float64)}, "b": torch.zeros(2, dtype=torch.float64)}
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    H = fc.HessianOperator(model, torch.nn.MSELoss(), p, data)
    with pytest.raises(
        ValueError, match=r"`v` must have the same tree structure as `params`: missing leaf \"v\['b'\]\""
    ):
        H @ {"a": {"w": torch.ones(3, 2, dtype=torch.float64)}}


# -- products under transforms (issue 15, item 3) ---------------------------------------------


def operator_and_dense(cls_name: str):
    model, loss, reduction, X, y = setup("ce-mean")
    data = split(X, y)
    op = getattr(fc, cls_name)(model, loss, dict(model.named_parameters()), data)
    if cls_name == "HessianOperator":
        dense = dense_hessian(model, loss, ALL, data, "mean")
    elif cls_name == "GGNOperator":
        dense = dense_ggn(model, loss, ALL, data, "mean")
    else:
        dense = dense_ef(model, ALL, data, SUM_LOSS["ce"], 1.0 / len(X))
    return op, dense


OPERATORS = ["HessianOperator", "GGNOperator", "EFOperator"]


@pytest.mark.parametrize("cls_name", OPERATORS)
def test_products_are_differentiable_in_v(cls_name):
    A, dense = operator_and_dense(cls_name)
    P = A.shape[0]
    gen = torch.Generator().manual_seed(5)
    v, u = torch.randn(P, dtype=F64, generator=gen), torch.randn(P, dtype=F64, generator=gen)
    V = torch.randn(3, P, dtype=F64, generator=gen)
    ones = torch.ones(P, dtype=F64)
    tol = {"rtol": 1e-9, "atol": 1e-11}
    # functx's transforms (plain-autograd fast paths included)
    torch.testing.assert_close(functx.grad(lambda v: (A @ v).sum())(v), dense.T @ ones, **tol)
    torch.testing.assert_close(functx.grad(lambda v: v @ (A @ v))(v), 2 * dense @ v, **tol)
    torch.testing.assert_close(functx.vjp(lambda v: A @ v, v)[1](u)[0], dense.T @ u, **tol)
    torch.testing.assert_close(functx.jvp(lambda v: A @ v, (v,), (u,))[1], dense @ u, **tol)
    torch.testing.assert_close(functx.vmap(lambda v: A @ v)(V), V @ dense.T, **tol)
    torch.testing.assert_close(functx.vmap(functx.grad(lambda v: v @ (A @ v)))(V), 2 * V @ dense, **tol)
    torch.testing.assert_close(functx.jacrev(lambda v: A @ v)(v), dense, **tol)
    torch.testing.assert_close(functx.jacfwd(lambda v: A @ v)(v), dense, **tol)
    torch.testing.assert_close(functx.hessian(lambda v: v @ (A @ v))(v), 2 * dense, **tol)
    # torch.func
    torch.testing.assert_close(torch.func.grad(lambda v: v @ (A @ v))(v), 2 * dense @ v, **tol)
    torch.testing.assert_close(torch.func.vjp(lambda v: A @ v, v)[1](u)[0], dense.T @ u, **tol)
    torch.testing.assert_close(torch.func.jvp(lambda v: A @ v, (v,), (u,))[1], dense @ u, **tol)
    torch.testing.assert_close(torch.func.vmap(lambda v: A @ v)(V), V @ dense.T, **tol)
    torch.testing.assert_close(torch.func.vmap(lambda v: A @ v, in_dims=1)(V.T), V @ dense.T, **tol)
    # plain autograd, a v that requires grad outside any transform, and forward-mode AD
    w = v.clone().requires_grad_()
    out = A @ w
    assert out.requires_grad
    (g,) = torch.autograd.grad(out @ u, w)
    torch.testing.assert_close(g, dense.T @ u, **tol)
    W = V.T.clone().requires_grad_()  # a (P, K) matrix
    (G,) = torch.autograd.grad((A @ W).sum(), W)
    torch.testing.assert_close(G, (dense.T @ ones)[:, None].expand(P, 3), **tol)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(A @ fwAD.make_dual(v, u)).tangent
    torch.testing.assert_close(tangent, dense @ u, **tol)


def test_composites_refuse_what_they_cannot_differentiate():
    G, _ = operator_and_dense("GGNOperator")
    H, _ = operator_and_dense("HessianOperator")
    v = torch.randn(G.shape[0], dtype=F64)
    for C in (G + H, 2.0 * G, G @ H):
        torch.testing.assert_close(C @ v, C.to_dense() @ v)  # plain products work
        with pytest.raises(TypeError, match=r"must be a plain tensor that does not require grad"):
            C @ v.clone().requires_grad_()
        with pytest.raises(TypeError, match=r"must be a plain tensor that does not require grad"):
            functx.grad(lambda v: (C @ v).sum())(v)
        with pytest.raises(TypeError, match=r"must be a plain tensor that does not require grad"):
            torch.func.vmap(lambda v: C @ v)(v[None])


# -- inference mode (issue 15, item 4) --------------------------------------------------------


def test_inference_mode():
    model, loss, reduction, X, y = setup("mse-mean")
    params = dict(model.named_parameters())
    with torch.inference_mode():
        with pytest.raises(
            RuntimeError, match=r"HessianOperator`: the operator must be built outside torch.inference_mode"
        ):
            fc.HessianOperator(model, loss, params, split(X, y))
        Xi, yi, vi = X.clone(), y.clone(), torch.randn(31, dtype=F64)
    assert Xi.is_inference() and vi.is_inference()
    H = fc.HessianOperator(model, loss, params, split(Xi, yi))  # inference-tensor data: copied per batch
    dense = dense_hessian(model, loss, ALL, split(X, y), "mean")
    torch.testing.assert_close(H @ vi, dense @ vi)
    with torch.inference_mode():
        torch.testing.assert_close(H @ vi, dense @ vi)  # products inside inference mode
        values = fc.eigsh(H, k=2)[0]
    torch.testing.assert_close(values, torch.linalg.eigvalsh(dense)[-2:])
    with torch.inference_mode():
        frozen = mlp()
    with pytest.raises(ValueError, match=r"params\['0.weight'\] must be a normal tensor, got an inference tensor"):
        fc.HessianOperator(frozen, loss, dict(frozen.named_parameters()), split(X, y))


# -- empty and non-finite data (issue 15, item 5) ---------------------------------------------


@pytest.mark.parametrize("cls_name", OPERATORS)
def test_empty_batches_are_skipped(cls_name):
    model, loss, _, X, y = setup("ce-mean")
    params = dict(model.named_parameters())
    data = split(X, y)
    with_empty = [(X[:0], y[:0]), data[0], (X[:0], y[:0]), *data[1:], (X[:0], y[:0])]
    expected = getattr(fc, cls_name)(model, loss, params, data).to_dense()
    A = getattr(fc, cls_name)(model, loss, params, with_empty)
    assert A.num_data == len(X)
    torch.testing.assert_close(A.to_dense(), expected, rtol=1e-12, atol=1e-14)


def test_non_finite_data_names_the_batch_and_what():
    model, loss, _, X, y = setup("mse-mean")
    params = dict(model.named_parameters())
    api = r"^`functx.curvature.GGNOperator`: batch 1 of `data` must "
    bad_X, bad_y = X.clone(), y.clone()
    bad_X[5, 1] = float("nan")
    bad_y[6, 0] = float("inf")
    for data, what in [(split(bad_X, y), "X"), (split(X, bad_y), "y")]:
        with pytest.raises(ValueError, match=api + rf"hold finite values, got a nan or inf in {what}\.$"):
            fc.GGNOperator(model, loss, params, data)
        with pytest.raises(ValueError, match=api + rf"hold finite values, got a nan or inf in {what}\.$"):
            fc.GGNOperator(model, loss, params, data, check_deterministic=False)  # the counting pass
    infinite = lambda out, y: ((out - y) ** 2).mean() / (y[0, 0] != y[0, 0]).to(out.dtype)
    data = split(X, y)
    with pytest.raises(
        ValueError, match=r"batch 0 of `data` must give a finite loss and gradient, got a nan or inf in the loss\."
    ):
        fc.GGNOperator(model, infinite, params, data, reduction="mean")
    kink = lambda out, y: (out - y).abs().sqrt().mean()
    zero = nn.Linear(3, 3).to(F64)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    with pytest.raises(
        ValueError,
        match=r"batch 0 of `data` must give a finite loss and gradient, got a nan or inf in the gradient of the loss\.",
    ):
        fc.GGNOperator(zero, kink, dict(zero.named_parameters()), [(X, torch.zeros_like(y))], reduction="mean")


# -- clear errors before any data pass (issue 15, item 9) -------------------------------------


class CountingModel:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls = model, 0

    def __call__(self, params, X):
        self.calls += 1
        return torch.func.functional_call(self.model, params, (X,))


def test_wrong_losses_are_named_on_the_first_batch():
    model, _, _, X, y = setup("mse-mean")
    params = {k: p.detach() for k, p in model.named_parameters()}
    api = r"^`functx.curvature.HessianOperator`: "
    cases = [
        (
            nn.MSELoss,
            None,
            TypeError,
            api + r"`loss` must be a loss instance or a callable, got the class MSELoss \(e.g. MSELoss\(\)\)",
        ),
        (
            lambda o, y: ((o - y) ** 2).mean(1),
            "mean",
            ValueError,
            api
            + r"`loss` must return a 0-d tensor \(a scalar\), got a torch.float64 tensor of shape \(4,\) for batch 0",
        ),
        (
            lambda o, y: float(((o - y) ** 2).mean().detach()),
            "mean",
            TypeError,
            api + r"`loss` must return a 0-d tensor, got a value of type float for batch 0 \(a Python number is not",
        ),
        (
            lambda o, y: ((o - y) ** 2).mean().detach(),
            "mean",
            ValueError,
            api + r"`loss` must return a tensor that depends on the prediction",
        ),
    ]
    for loss, reduction, error, match in cases:
        counting = CountingModel(model)
        with pytest.raises(error, match=match):
            fc.HessianOperator(counting, loss, params, split(X, y), reduction=reduction)
        assert counting.calls <= 1  # at most one forward, on the first batch


def test_ggn_prediction_must_be_a_tensor_on_the_first_batch():
    model, loss, _, X, y = setup("mse-mean")
    params = {k: p.detach() for k, p in model.named_parameters()}
    forward = lambda p, X: {"out": torch.func.functional_call(model, p, (X,))}
    with pytest.raises(
        TypeError, match=r"GGNOperator`: the model's prediction must be a tensor, got a value of type dict"
    ):
        fc.GGNOperator(forward, lambda o, y: o["out"].sum(), params, split(X, y), reduction="sum")


def test_shuffling_alone_passes_the_determinism_check():
    # The curvature is a sum over the samples: a shuffled loader gives the same operator. A loader
    # that drops a different last batch each pass does not, and is named.
    model, loss, _, X, y = setup("ce-mean", n=10)
    params = dict(model.named_parameters())
    dataset = torch.utils.data.TensorDataset(X, y)
    plain = fc.GGNOperator(model, loss, params, torch.utils.data.DataLoader(dataset, batch_size=4))
    torch.manual_seed(0)
    shuffled = fc.GGNOperator(model, loss, params, torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True))
    torch.testing.assert_close(shuffled.to_dense(), plain.to_dense(), rtol=1e-10, atol=1e-12)
    dropping = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match=r"without modules in training mode.*shuffle=True with drop_last=True"):
        fc.GGNOperator(model, loss, params, dropping, num_data=8)


def test_import_functx_loads_curvature_without_scipy():
    import subprocess
    import sys

    code = (
        "import sys, functx; assert 'curvature' in functx.__all__; functx.curvature.eigsh; "
        "assert not [m for m in sys.modules if m == 'scipy' or m.startswith('scipy.')], 'scipy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
