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
    with pytest.raises(ValueError, match=r"HessianOperator`: two passes .* the module\(s\) '1' \(Dropout\) in training"):
        fc.HessianOperator(dropout, loss, dict(dropout.named_parameters()), data)
    bn = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(F64)
    before = {k: b.clone() for k, b in bn.named_buffers()}
    with pytest.raises(ValueError, match=r"GGNOperator`: .*'1' \(BatchNorm1d\) in training mode and a forward that updates the buffer\(s\) \['1.num_batches_tracked', '1.running_mean', '1.running_var'\]"):
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
    with pytest.raises(TypeError, match=r"cannot be compiled, exported or traced|outside transforms and torch.compile"):
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
    with pytest.raises(ValueError, match=api + r"`reduction` must agree with the loss module's reduction 'mean', got 'sum'"):
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
