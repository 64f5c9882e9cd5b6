"""functx.curvature.output_covariance and functx.curvature.influence against independent float64
references: explicit Jacobians, dense GGNs, per-example gradients by a loop, ridge regression's
closed form, and the Laplace pipeline (log marginal likelihood, probit predictive) on a tiny
network against a dense computation. The distributed check is in tests/_dist_worker.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import functx
import functx.curvature as fc

F64 = torch.float64
SIZES = (3, 5, 2)  # uneven batches


def mlp(d_in: int = 3, d_out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).to(F64)


def data(kind: str = "ce", n: int = sum(SIZES), c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 3, generator=gen, dtype=F64)
    y = torch.randint(0, c, (n,), generator=gen) if kind == "ce" else torch.randn(n, c, generator=gen, dtype=F64)
    return X, y


def batches(X: torch.Tensor, y: torch.Tensor, sizes=SIZES) -> list:
    return list(zip(X.split(list(sizes)), y.split(list(sizes))))


def spd(P: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=gen, dtype=F64)
    return A @ A.T / P + 0.1 * torch.eye(P, dtype=F64)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def explicit_jacobian(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """(B, C, P) by functx.jacrev of the whole batch's output w.r.t. the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(theta):
        tree = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return torch.func.functional_call(model, tree, (X,))

    return functx.jacrev(f)(flat_params(model))


def per_example_gradients(model: nn.Module, loss_sum, X, y) -> torch.Tensor:
    """(N, P) by a plain loop of torch.autograd.grad (an independent reference)."""
    rows = []
    for i in range(X.shape[0]):
        value = loss_sum(model(X[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))]))
    return torch.stack(rows)


# -- output_covariance -------------------------------------------------------------------------


def test_output_covariance_dense_equals_explicit_jacobian():
    model = mlp()
    X, _ = data()
    params = dict(model.named_parameters())
    P = sum(p.numel() for p in params.values())
    S = spd(P)
    J = explicit_jacobian(model, X)
    reference = torch.einsum("bcp,pq,bdq->bcd", J, S, J)
    torch.testing.assert_close(fc.output_covariance(model, params, X, S), reference)
    torch.testing.assert_close(
        fc.output_covariance(model, params, X, S, diagonal=True), reference.diagonal(dim1=1, dim2=2)
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_output_covariance_chunking_gives_the_same_numbers(chunk_size):
    model = mlp()
    X, _ = data()
    params = dict(model.named_parameters())
    S = spd(sum(p.numel() for p in params.values()))
    full = fc.output_covariance(model, params, X, S)
    torch.testing.assert_close(fc.output_covariance(model, params, X, S, chunk_size=chunk_size), full)
    torch.testing.assert_close(
        fc.output_covariance(model, params, X, S, diagonal=True, chunk_size=chunk_size),
        full.diagonal(dim1=1, dim2=2),
    )


def test_output_covariance_operator_and_callable_model():
    """An operator S (the GGN: any @/shape object) and a callable model on tuple params."""
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    G = fc.GGNOperator(model, nn.CrossEntropyLoss(), params, batches(X, y))
    J = explicit_jacobian(model, X)
    reference = torch.einsum("bcp,pq,bdq->bcd", J, G.to_dense(), J)
    torch.testing.assert_close(fc.output_covariance(model, params, X, G), reference)
    W1, b1, W2, b2 = (p.detach() for p in model.parameters())

    def f(p, x):
        return torch.tanh(x @ p[0][0].T + p[0][1]) @ p[1][0].T + p[1][1]

    torch.testing.assert_close(fc.output_covariance(f, ((W1, b1), (W2, b2)), X, G), reference)


def test_output_covariance_only_a_parameter_subset():
    model = mlp()
    X, _ = data()
    params = {"2.weight": model[2].weight}
    S = spd(12)
    J = explicit_jacobian(model, X)[:, :, 16:28]  # 2.weight's entries in the full flattening
    torch.testing.assert_close(fc.output_covariance(model, params, X, S), torch.einsum("bcp,pq,bdq->bcd", J, S, J))


def test_output_covariance_is_differentiable_in_the_damping():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    G = fc.GGNOperator(model, nn.CrossEntropyLoss(), params, batches(X, y)).to_dense()
    eye = torch.eye(G.shape[0], dtype=F64)

    def objective(delta):
        cov = fc.output_covariance(model, params, X, torch.linalg.inv(G + delta * eye), chunk_size=4)
        return (
            cov.sum() + fc.output_covariance(model, params, X, torch.linalg.inv(G + delta * eye), diagonal=True).sum()
        )

    delta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(delta), delta)
    h = 1e-5
    fd = (objective(torch.tensor(0.3 + h, dtype=F64)) - objective(torch.tensor(0.3 - h, dtype=F64))) / (2 * h)
    torch.testing.assert_close(grad, fd.detach(), rtol=1e-6, atol=1e-8)


def test_output_covariance_leaves_inputs_alone():
    model = mlp()
    X, _ = data()
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in params.items()}
    fc.output_covariance(model, params, X, spd(31))
    assert all(torch.equal(before[k], v) and v.grad is None and v.requires_grad for k, v in params.items())
    assert not X.requires_grad


def test_output_covariance_empty_input():
    model = mlp()
    params = dict(model.named_parameters())
    assert fc.output_covariance(model, params, torch.zeros(0, 3, dtype=F64), spd(31)).shape == (0, 3, 3)


@pytest.mark.skipif(not hasattr(fc, "KFACOperator"), reason="KFAC operators not on this branch yet")
def test_output_covariance_kfac_inverse_and_inverse_operator():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    loss, train = nn.CrossEntropyLoss(), batches(X, y)
    K = fc.KFACOperator(model, loss, params, train, fisher="type-2")
    J = explicit_jacobian(model, X)
    S = torch.linalg.inv(K.to_dense() + 0.5 * torch.eye(31, dtype=F64))
    torch.testing.assert_close(
        fc.output_covariance(model, params, X, K.inverse(0.5)), torch.einsum("bcp,pq,bdq->bcd", J, S, J)
    )
    if hasattr(fc, "InverseOperator"):
        G = fc.GGNOperator(model, loss, params, train)
        S = torch.linalg.inv(G.to_dense() + 0.5 * torch.eye(31, dtype=F64))
        inv = fc.InverseOperator(G, 0.5, method="cg", rtol=1e-12)
        torch.testing.assert_close(
            fc.output_covariance(model, params, X, inv, diagonal=True),
            torch.einsum("bcp,pq,bcq->bc", J, S, J),
            rtol=1e-7,
            atol=1e-9,
        )


@pytest.mark.skipif(not hasattr(fc, "KFACOperator"), reason="KFAC operators not on this branch yet")
def test_output_covariance_gradient_through_kfac_inverse():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, nn.CrossEntropyLoss(), params, batches(X, y), fisher="type-2")

    def objective(delta):
        return fc.output_covariance(model, params, X, K.inverse(delta), diagonal=True).sum()

    delta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(delta), delta)
    h = 1e-5
    fd = (objective(torch.tensor(0.3 + h, dtype=F64)) - objective(torch.tensor(0.3 - h, dtype=F64))) / (2 * h)
    torch.testing.assert_close(grad, fd.detach(), rtol=1e-6, atol=1e-8)


# -- influence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["ce-mean", "ce-sum", "mse-mean", "mse-sum"])
def test_influence_equals_dense_reference(loss_name):
    kind, reduction = loss_name.split("-")
    model = mlp()
    X, y = data(kind)
    loss = nn.CrossEntropyLoss(reduction=reduction) if kind == "ce" else nn.MSELoss(reduction=reduction)
    loss_sum = nn.CrossEntropyLoss(reduction="sum") if kind == "ce" else nn.MSELoss(reduction="sum")
    params = dict(model.named_parameters())
    train = batches(X, y)
    G = fc.GGNOperator(model, loss, params, train).to_dense()
    inverse = torch.linalg.inv(G + 0.1 * torch.eye(31, dtype=F64))
    grads = per_example_gradients(model, loss_sum, X, y)
    Xq, yq = X[[0, 4, 9]] + 0.1, y[[0, 4, 9]]
    gq = per_example_gradients(model, loss_sum, Xq, yq)
    scores = fc.influence(model, loss, params, train, [(Xq[:2], yq[:2]), (Xq[2:], yq[2:])], inverse)
    torch.testing.assert_close(scores, gq @ inverse @ grads.T)
    self_scores = fc.influence(model, loss, params, train, None, inverse, self_influence=True)
    torch.testing.assert_close(self_scores, ((grads @ inverse) * grads).sum(1))
    pairwise = fc.influence(model, loss, params, train, train, inverse)
    torch.testing.assert_close(self_scores, pairwise.diagonal())
    assert loss.reduction == reduction  # the user's module is untouched


def test_influence_callable_model_with_tuple_params_and_operator_inverse():
    model = mlp()
    X, y = data()
    W1, b1, W2, b2 = (p.detach() for p in model.parameters())

    def f(p, x):
        return torch.tanh(x @ p[0][0].T + p[0][1]) @ p[1][0].T + p[1][1]

    def ce(out, target):
        return nn.functional.cross_entropy(out, target)

    params = ((W1, b1), (W2, b2))
    train = batches(X, y)
    G = fc.GGNOperator(f, ce, params, train, reduction="mean")
    inverse = torch.linalg.inv(G.to_dense() + 0.1 * torch.eye(31, dtype=F64))
    grads = per_example_gradients(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    scores = fc.influence(f, ce, params, train, train[:1], inverse)
    torch.testing.assert_close(scores, grads[:3] @ inverse @ grads.T)
    # an operator with shape/@ (here the GGN itself, not an inverse) is used as given
    scores = fc.influence(f, ce, params, train, train[:1], G)
    torch.testing.assert_close(scores, grads[:3] @ G.to_dense() @ grads.T)


def test_influence_ridge_regression_closed_form():
    """Linear model + summed squared error + L2: G + 2 lam I = 2 (X^T X + lam I), grad l_n = 2 r_n x_n,
    so score(q, t) = 2 r_q r_t x_q^T (X^T X + lam I)^-1 x_t; and it predicts leave-one-out retraining
    (exactly, up to the leverage factor 1 / (1 - h_t))."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(20, 4, generator=gen, dtype=F64)
    y = X @ torch.randn(4, 1, generator=gen, dtype=F64) + 0.3 * torch.randn(20, 1, generator=gen, dtype=F64)
    lam = 0.5
    A = X.T @ X + lam * torch.eye(4, dtype=F64)
    w = torch.linalg.solve(A, X.T @ y)  # ridge MAP
    model = nn.Linear(4, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(w.T)
    params = dict(model.named_parameters())
    train = batches(X, y, (7, 7, 6))
    loss = nn.MSELoss(reduction="sum")
    Ginv = torch.linalg.inv(fc.GGNOperator(model, loss, params, train).to_dense() + 2 * lam * torch.eye(4, dtype=F64))
    r = (X @ w - y)[:, 0]
    closed = 2 * r[:, None] * r[None, :] * (X @ torch.linalg.solve(A, X.T))
    scores = fc.influence(model, loss, params, train, train, Ginv)
    torch.testing.assert_close(scores, closed)
    # leave-one-out: the loss change of example q when t is removed is ~ score(q, t) (exact: linear)
    for t in (0, 5, 13):
        keep = torch.arange(20) != t
        w_t = torch.linalg.solve(X[keep].T @ X[keep] + lam * torch.eye(4, dtype=F64), X[keep].T @ y[keep])
        # first order in the removed example: dw = A^-1 x_t r_t, dl_q = 2 r_q x_q^T dw
        h = X[t] @ torch.linalg.solve(A, X[t])
        change = 2 * r * (X @ (w_t - w))[:, 0]
        torch.testing.assert_close(change * (1 - h), scores[:, t], rtol=1e-10, atol=1e-12)


def test_influence_uneven_query_batches_and_empty_train_batch():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    train = [*batches(X, y), (X[:0], y[:0])]
    inverse = spd(31)
    grads = per_example_gradients(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    scores = fc.influence(model, nn.CrossEntropyLoss(), params, train, batches(X, y, (1, 9)), inverse)
    torch.testing.assert_close(scores, grads @ inverse @ grads.T)


@pytest.mark.skipif(not hasattr(fc, "InverseOperator"), reason="InverseOperator not on this branch yet")
def test_influence_with_inverse_operator():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    train = batches(X, y)
    G = fc.GGNOperator(model, nn.CrossEntropyLoss(), params, train)
    inverse = fc.InverseOperator(G, 0.1, method="cg", rtol=1e-12)
    reference = torch.linalg.inv(G.to_dense() + 0.1 * torch.eye(31, dtype=F64))
    torch.testing.assert_close(
        fc.influence(model, nn.CrossEntropyLoss(), params, train, train[:1], inverse),
        fc.influence(model, nn.CrossEntropyLoss(), params, train, train[:1], reference),
        rtol=1e-7,
        atol=1e-9,
    )
    with pytest.raises(ValueError, match="damping"):
        fc.InverseOperator(G, -1.0)


# -- InverseOperator: batched CG over the columns of a (P, K) right-hand side ------------------


def _counting(op):
    """Record the number of columns of every product the operator makes (a data pass each)."""
    calls = []
    apply = op._apply

    def counted(V):
        calls.append(V.shape[0])
        return apply(V)

    op._apply = counted
    return calls


def test_inverse_operator_batched_cg_matches_dense_solves():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    G = fc.GGNOperator(model, nn.CrossEntropyLoss(), params, batches(X, y))
    D = G.to_dense() + 0.05 * torch.eye(31, dtype=F64)
    evals, evecs = torch.linalg.eigh(D)
    gen = torch.Generator().manual_seed(3)
    V = torch.randn(31, 4, generator=gen, dtype=F64)
    V[:, 1] = evecs[:, -1]  # an eigenvector: converges in one iteration
    V[:, 2] = 0.0  # a zero column: no iteration, x = 0
    calls = _counting(G)
    Gi = fc.InverseOperator(G, 0.05, method="cg", rtol=1e-12)
    X_cg = Gi @ V
    torch.testing.assert_close(X_cg, torch.linalg.solve(D, V), rtol=1e-9, atol=1e-12)
    assert X_cg[:, 2].abs().max() == 0
    assert Gi.converged is True and Gi.residual_norm <= 1e-12 * float(V.norm(dim=0).max())
    # one data pass per iteration over the columns still running, plus one for the true residuals
    assert len(calls) == Gi.num_steps + 1 and calls[-1] == 4
    assert calls[0] == 3 and calls[1] == 2  # the zero column never runs, the eigenvector stops
    assert Gi.num_matvecs == sum(calls)
    # the same answer, column by column, as a vector product
    for k in range(4):
        torch.testing.assert_close(Gi @ V[:, k], X_cg[:, k], rtol=1e-9, atol=1e-12)


def test_inverse_operator_batched_cg_preconditioner_and_gradients():
    M = spd(12)
    gen = torch.Generator().manual_seed(4)
    V = torch.randn(12, 3, generator=gen, dtype=F64)
    ref = torch.linalg.solve(M + 0.1 * torch.eye(12, dtype=F64), V)
    plain = fc.InverseOperator(M, 0.1)
    # a good preconditioner (the inverse of a nearby matrix): the same answer in fewer steps
    near = torch.linalg.inv(M + 0.1 * torch.eye(12, dtype=F64) + 1e-3 * spd(12, seed=7))
    pre = fc.InverseOperator(M, 0.1, preconditioner=near)
    torch.testing.assert_close(plain @ V, ref)
    torch.testing.assert_close(pre @ V, ref)
    assert pre.converged and pre.num_steps < plain.num_steps
    # gradients through the iterations, w.r.t. the right-hand sides and a tensor damping
    delta = torch.tensor(0.1, dtype=F64, requires_grad=True)
    W = V.clone().requires_grad_()
    U = torch.randn(12, 3, generator=gen, dtype=F64)
    gW, gd = torch.autograd.grad((U * (fc.InverseOperator(M, delta) @ W)).sum(), (W, delta))
    A = M + 0.1 * torch.eye(12, dtype=F64)
    torch.testing.assert_close(gW, torch.linalg.solve(A, U))
    torch.testing.assert_close(gd, -(U * torch.linalg.solve(A, torch.linalg.solve(A, V))).sum())


def test_inverse_operator_batched_cg_nonconvergence_and_foreign_op():
    M = spd(12)
    V = torch.randn(12, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    with pytest.raises(functx.NonConvergenceError, match="InverseOperator") as info:
        fc.InverseOperator(M, 1e-3, max_iter=2) @ V
    assert info.value.stats["converged"] is False and info.value.stats["num_steps"] == 2
    quiet = fc.InverseOperator(M, 1e-3, max_iter=2, throw=False)
    with pytest.warns(functx.NonConvergenceWarning):
        last = quiet @ V
    assert quiet.converged is False and quiet.num_steps == 2 and quiet.num_matvecs == 3 * 2 + 3
    residual = (V - (M + 1e-3 * torch.eye(12, dtype=F64)) @ last).norm(dim=0).max()
    assert math.isclose(quiet.residual_norm, float(residual), rel_tol=1e-9)

    class Foreign:  # `@` on (P,) only: applied column by column
        shape = (12, 12)
        dtype = F64

        def __matmul__(self, x):
            assert x.ndim == 1
            return M @ x

    ref = torch.linalg.solve(M + 0.1 * torch.eye(12, dtype=F64), V)
    torch.testing.assert_close(fc.InverseOperator(Foreign(), 0.1) @ V, ref)
    torch.testing.assert_close(fc.InverseOperator(M, 0.1, method="minres", rtol=1e-12) @ V, ref)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    train = batches(X, y)
    loss = nn.CrossEntropyLoss()
    api = r"^`functx.curvature.output_covariance`: "
    with pytest.raises(ValueError, match=api + r"`S` must have shape \(31, 31\)"):
        fc.output_covariance(model, params, X, torch.eye(30, dtype=F64))
    with pytest.raises(ValueError, match=api + r"`S` must have shape \(31, 31\)"):
        fc.output_covariance(model, params, X, fc.GGNOperator(model, loss, {"0.weight": model[0].weight}, train))
    with pytest.raises(TypeError, match=api + r"`S` must be a \(P, P\) tensor or an operator"):
        fc.output_covariance(model, params, X, "eye")
    with pytest.raises(TypeError, match=api + r"`diagonal` must be a bool"):
        fc.output_covariance(model, params, X, torch.eye(31, dtype=F64), diagonal=1)
    with pytest.raises(ValueError, match=r"`chunk_size`"):
        fc.output_covariance(model, params, X, torch.eye(31, dtype=F64), chunk_size=0)
    with pytest.raises(ValueError, match=api + r"the leaves of `X` must share the number of rows"):
        fc.output_covariance(lambda p, x: model(x["a"]), params, {"a": X, "b": X[:2]}, torch.eye(31, dtype=F64))
    api = r"^`functx.curvature.influence`: "
    eye = torch.eye(31, dtype=F64)
    with pytest.raises(ValueError, match=api + r"`inverse` must have shape \(31, 31\)"):
        fc.influence(model, loss, params, train, train, torch.eye(3, dtype=F64))
    with pytest.raises(TypeError, match=api + r"`inverse` must be a \(P, P\) tensor or an operator"):
        fc.influence(model, loss, params, train, train, None)
    with pytest.raises(ValueError, match=api + r"the batches of `queries` must have the structure"):
        fc.influence(model, loss, params, train, [(X[:, :2], y)], eye)
    with pytest.raises(ValueError, match=api + r"the batches of `queries` must have the structure"):
        fc.influence(model, loss, params, train, [({"x": X}, y)], eye)
    with pytest.raises(ValueError, match=api + r"`queries` must be None with self_influence=True"):
        fc.influence(model, loss, params, train, train, eye, self_influence=True)
    with pytest.raises(ValueError, match=api + r"`queries` must be a re-iterable"):
        fc.influence(model, loss, params, train, None, eye)
    with pytest.raises(TypeError, match=api + r"`loss` must be a torch.nn loss module or a callable"):
        fc.influence(model, 3, params, train, train, eye)
    with pytest.raises(TypeError, match=r"`functx.curvature.influence`: `data` must be a re-iterable"):
        fc.influence(model, loss, params, iter(train), train, eye)
    with pytest.raises(
        ValueError, match=r"`functx.curvature.influence`: params\['nope'\] must be a parameter of the model"
    ):
        fc.influence(model, loss, {"nope": X}, train, train, eye)


@pytest.mark.skipif(not hasattr(fc, "KFACOperator"), reason="KFAC operators not on this branch yet")
def test_negative_damping_is_refused():
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, nn.CrossEntropyLoss(), params, batches(X, y), fisher="type-2")
    with pytest.raises(ValueError, match="damping"):
        fc.output_covariance(model, params, X, K.inverse(-1.0))
    with pytest.raises(ValueError, match="damping"):
        K.inverse(torch.tensor(-1.0, dtype=F64))


# -- the Laplace pipeline on a tiny network, against a dense computation ----------------------


def test_full_ggn_laplace_marginal_likelihood_and_probit_predictive_match_dense():
    """The pipeline of examples/laplace.py with the exact GGN: log ML and probit predictive."""
    model = mlp()
    X, y = data()
    params = dict(model.named_parameters())
    train = batches(X, y)
    loss = nn.CrossEntropyLoss(reduction="sum")
    prior = torch.tensor(0.7, dtype=F64, requires_grad=True)
    G = fc.GGNOperator(model, loss, params, train)
    theta = flat_params(model)
    P = theta.numel()
    # pipeline: log ML = log lik - 1/2 (logdet(G + d) - P log d + d |theta|^2)
    precision = G.to_dense() + prior * torch.eye(P, dtype=F64)
    log_lik = -float(sum(loss(model(xb), yb).detach() for xb, yb in train))
    log_ml = log_lik - 0.5 * (torch.logdet(precision) - P * torch.log(prior) + prior * theta @ theta)
    # dense reference: Hessian of the log-joint through autograd (GGN part), Gaussian integral
    J = explicit_jacobian(model, X)
    probs = torch.softmax(model(X), 1).detach()
    Lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    ggn = torch.einsum("bcp,bcd,bdq->pq", J, Lam, J)
    reference = log_lik - 0.5 * (
        torch.logdet(ggn + 0.7 * torch.eye(P, dtype=F64)) - P * math.log(0.7) + 0.7 * theta @ theta
    )
    torch.testing.assert_close(log_ml.detach(), reference)
    (grad,) = torch.autograd.grad(log_ml, prior)
    expected = -0.5 * (torch.trace(torch.linalg.inv(ggn + 0.7 * torch.eye(P, dtype=F64))) - P / 0.7 + theta @ theta)
    torch.testing.assert_close(grad, expected)
    # probit predictive: softmax(f / sqrt(1 + pi/8 diag(J S J^T)))
    S = torch.linalg.inv(precision.detach())
    var = fc.output_covariance(model, params, X, S, diagonal=True)
    dense_var = torch.einsum("bcp,pq,bcq->bc", J, torch.linalg.inv(ggn + 0.7 * torch.eye(P, dtype=F64)), J)
    torch.testing.assert_close(var, dense_var)
    pred = torch.softmax(model(X).detach() / torch.sqrt(1 + math.pi / 8 * var), 1)
    dense = torch.softmax(model(X).detach() / torch.sqrt(1 + math.pi / 8 * dense_var), 1)
    torch.testing.assert_close(pred, dense)
