"""KFACOperator and EKFACOperator (issue 17): the factors against exact float64 oracles.

``B_l``: the dense block of GGNOperator/EFOperator restricted to block l's parameters. Where
KFAC is exact (deep linear nets with MSE, one datum, disjoint tied uses) it must equal B_l; EKFAC
must match ``diag(Q^T B_l Q)``; curvlinops 3.0.1 gives the same dense matrix everywhere they
overlap.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import functx.curvature as fc

DT = torch.float64


def close(a, b, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def spans(op):
    sizes = dict(zip(op._names, op._layout.sizes))
    out, start = [], 0
    for block in op.blocks.values():
        size = sum(sizes[p] for p in block.params)
        out.append((start, start + size))
        start += size
    return out


def block_diag_of(op, dense):
    return torch.block_diag(*[dense[a:b, a:b] for a, b in spans(op)])


def exact(cls, model, loss, params, data, **kw):
    return cls(model, loss, params, data, **kw).to_dense()


def deep_linear(*dims, bias=True):
    torch.manual_seed(0)
    layers = [nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(dims)]
    return nn.Sequential(*layers).to(DT)


def split(X, y, cuts):
    return [(X[a:b], y[a:b]) for a, b in zip([0, *cuts], [*cuts, len(X)])]


# ---------------------------------------------------------------------------------- 1. deep linear MLP


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("joint", [False, True])
def test_deep_linear_mse_type2_equals_ggn_blocks(reduction, joint):
    model = deep_linear(4, 5, 3, 2)
    X, y = torch.randn(11, 4, dtype=DT), torch.randn(11, 2, dtype=DT)
    data = split(X, y, [3, 7])  # uneven batches
    loss = nn.MSELoss(reduction=reduction)
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, loss, params, data, fisher="type-2", joint_bias=joint)
    assert len(K.blocks) == (3 if joint else 6)
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, loss, params, data)))


def test_params_subset_and_dict_inputs():
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, X):
            return self.b(self.a(X["x"]) * 2.0)

    model = Net().to(DT)
    X, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    data = [({"x": X[:2]}, y[:2]), ({"x": X[2:]}, y[2:])]
    params = {"a.weight": model.a.weight, "b.weight": model.b.weight, "b.bias": model.b.bias}
    kw = dict(batch_size_fn=lambda X: X["x"].shape[0])
    K = fc.KFACOperator(model, nn.MSELoss(), params, data, fisher="type-2", joint_bias=True, **kw)
    assert {k: v.params for k, v in K.blocks.items()} == {"a.weight": ("a.weight",), "b.weight": ("b.weight", "b.bias")}
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.MSELoss(), params, data, **kw)))


# ---------------------------------------------------------------------------------- 2. one datum


def _nonlinear():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Tanh(), nn.Linear(8, 3)
    ).to(DT)


LOSSES = {
    "ce": (nn.CrossEntropyLoss(), lambda: torch.tensor([2])),
    "bce": (nn.BCEWithLogitsLoss(), lambda: torch.tensor([[1.0, 0.0, 1.0]], dtype=DT)),
    "mse": (nn.MSELoss(), lambda: torch.randn(1, 3, dtype=DT)),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("joint", [False, True])
def test_one_datum_type2_is_ggn_and_empirical_is_ef(name, joint):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(DT)
    loss, target = LOSSES[name]
    data = [(torch.randn(1, 4, dtype=DT), target())]
    params = dict(model.named_parameters())
    for fisher, oracle in (("type-2", fc.GGNOperator), ("empirical", fc.EFOperator)):
        K = fc.KFACOperator(model, loss, params, data, fisher=fisher, joint_bias=joint)
        close(K.to_dense(), block_diag_of(K, exact(oracle, model, loss, params, data)))


# ---------------------------------------------------------------------------------- 3. weight sharing


def test_sequence_linear_expand_and_reduce():
    model = deep_linear(3, 4, 2)
    X = torch.randn(6, 5, 3, dtype=DT)
    params = dict(model.named_parameters())
    # expand: a per-position MSE
    Y = torch.randn(6, 5, 2, dtype=DT)
    data = split(X, Y, [2])
    K = fc.KFACOperator(model, nn.MSELoss(), params, data, fisher="type-2", joint_bias=True)
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.MSELoss(), params, data)))

    # reduce: a mean over positions before the loss
    def pooled(p, X):
        return torch.func.functional_call(model, p, (X,)).mean(1)

    y = torch.randn(6, 2, dtype=DT)
    data = split(X, y, [4])
    R = fc.KFACOperator(pooled, nn.MSELoss(), params, data, fisher="type-2", kfac_approx="reduce")
    close(R.to_dense(), block_diag_of(R, exact(fc.GGNOperator, pooled, nn.MSELoss(), params, data)))


def test_conv_with_average_pool_reduce():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = model.to(DT)
    X, y = torch.randn(5, 2, 7, 7, dtype=DT), torch.randn(5, 3, dtype=DT)
    params = dict(model.named_parameters())
    for joint in (False, True):
        K = fc.KFACOperator(
            model, nn.MSELoss(), params, [(X, y)], fisher="type-2", kfac_approx="reduce", joint_bias=joint
        )
        close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.MSELoss(), params, [(X, y)])))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own note on the copy
def test_conv_same_padding_even_kernel_reduce():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(DT)
    X, y = torch.randn(4, 2, 5, 5, dtype=DT), torch.randn(4, 3, dtype=DT)
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, nn.MSELoss(), params, [(X, y)], fisher="type-2", kfac_approx="reduce", joint_bias=True)
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.MSELoss(), params, [(X, y)])))


def test_callable_loss_type2_by_autodiff():
    model = deep_linear(3, 4, 2)
    X, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    params = dict(model.named_parameters())

    def loss(f, t):
        return 1.5 * (f - t).square().sum()

    data = split(X, y, [3])
    K = fc.KFACOperator(model, loss, params, data, fisher="type-2", reduction="sum")
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, loss, params, data, reduction="sum")))


# ---------------------------------------------------------------------------------- 4. tying


def test_tied_linear_on_both_halves():
    torch.manual_seed(4)
    layer = nn.Linear(3, 2).to(DT)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, X):
            return torch.cat([self.layer(X[:, :3]), self.layer(X[:, 3:])], dim=1)

    model = Tied()
    X, y = torch.randn(9, 6, dtype=DT), torch.randn(9, 4, dtype=DT)
    params = dict(model.named_parameters())
    for joint in (False, True):
        K = fc.KFACOperator(model, nn.MSELoss(), params, split(X, y, [4]), fisher="type-2", joint_bias=joint)
        close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.MSELoss(), params, split(X, y, [4]))))


def test_embedding_expand_is_exact_for_a_linear_readout():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Linear(3, 2)).to(DT)
    X = torch.tensor([[1], [2], [2], [5], [0], [3]])
    y = torch.randn(6, 1, 2, dtype=DT)
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, nn.MSELoss(), params, [(X, y)], fisher="type-2")
    assert K.blocks["0.weight"].transposed and K.blocks["0.weight"].A.shape == (6,)
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.MSELoss(), params, [(X, y)])))
    with pytest.raises(ValueError, match=r"kfac_approx='reduce' is not defined for an embedding"):
        fc.KFACOperator(model, nn.MSELoss(), params, [(X, y)], fisher="type-2", kfac_approx="reduce")


# ---------------------------------------------------------------------------------- 5. EKFAC


@pytest.mark.parametrize("fisher,oracle", [("type-2", fc.GGNOperator), ("empirical", fc.EFOperator)])
def test_ekfac_eigenvalues_are_exact_second_moments(fisher, oracle):
    model = _nonlinear()
    X, y = torch.randn(7, 2, 4, 4, dtype=DT), torch.randint(0, 3, (7,))
    data = split(X, y, [3])
    loss, params = nn.CrossEntropyLoss(), dict(model.named_parameters())
    K = fc.KFACOperator(model, loss, params, data, fisher=fisher, joint_bias=True)
    E = fc.EKFACOperator(model, loss, params, data, fisher=fisher, joint_bias=True)
    B = block_diag_of(E, exact(oracle, model, loss, params, data))
    for (a, b), (name, block) in zip(spans(E), E.blocks.items()):
        assert block.G.shape == K.blocks[name].G.shape
        QG = torch.linalg.eigh(block.G).eigenvectors
        Q = torch.kron(QG, torch.linalg.eigh(block.A).eigenvectors) if block.A is not None else QG
        close(block.eigenvalues.reshape(-1), torch.diagonal(Q.T @ _joint_order(block, B[a:b, a:b]) @ Q))
    Kd, Ed = K.to_dense(), E.to_dense()
    close(torch.trace(Ed), torch.trace(B))
    lhs = (Kd - B).square().sum()
    close(lhs, (Kd - Ed).square().sum() + (Ed - B).square().sum())


def _joint_order(block, M):
    """Reorder a joint block's dense matrix from [vec W, b] to the row-major vec of [W | b]."""
    if len(block.params) == 1:
        return M
    m = block.G.shape[0]
    n = block.A.shape[0]
    idx = torch.arange(m * n).reshape(m, n)
    order = torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]])
    perm = torch.empty_like(order)
    perm[order] = torch.arange(m * n)
    return M[perm][:, perm]


def test_ekfac_embedding_trace_is_exact():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    X, y = torch.randint(0, 5, (8, 2)), torch.randint(0, 2, (8,))
    loss, params = nn.CrossEntropyLoss(), dict(model.named_parameters())
    E = fc.EKFACOperator(model, loss, params, split(X, y, [5]), fisher="type-2")
    B = block_diag_of(E, exact(fc.GGNOperator, model, loss, params, split(X, y, [5])))
    close(torch.trace(E.to_dense()), torch.trace(B))
    K = fc.KFACOperator(model, loss, params, split(X, y, [5]), fisher="type-2").to_dense()
    Ed = E.to_dense()
    close((K - B).square().sum(), (K - Ed).square().sum() + (Ed - B).square().sum())


def test_ekfac_equals_kfac_where_kfac_is_exact_and_refuses_3d_outputs():
    model = deep_linear(3, 4, 2)
    X, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, nn.MSELoss(), params, [(X, y)], fisher="type-2", joint_bias=True)
    E = fc.EKFACOperator(model, nn.MSELoss(), params, [(X, y)], fisher="type-2", joint_bias=True)
    close(E.to_dense(), K.to_dense(), rtol=1e-8, atol=1e-10)
    seq = [(torch.randn(4, 5, 3, dtype=DT), torch.randn(4, 5, 2, dtype=DT))]
    with pytest.raises(ValueError, match=r"EKFAC needs the model's prediction to be 2-D.*\(4, 5, 2\)"):
        fc.EKFACOperator(model, nn.MSELoss(), params, seq, fisher="type-2")


# ---------------------------------------------------------------------------------- 7. MC


def test_mc_tends_to_type2_and_is_reproducible():
    model = _nonlinear()
    X, y = torch.randn(6, 2, 4, 4, dtype=DT), torch.randint(0, 3, (6,))
    loss, params = nn.CrossEntropyLoss(), dict(model.named_parameters())
    state = torch.get_rng_state()
    T = fc.KFACOperator(model, loss, params, [(X, y)], fisher="type-2").to_dense()
    M = fc.KFACOperator(model, loss, params, [(X, y)], fisher="mc", mc_samples=2000, seed=1).to_dense()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert ((M - T).norm() / T.norm()).item() < 0.1
    a = fc.KFACOperator(model, loss, params, [(X, y)], seed=7).to_dense()
    b = fc.KFACOperator(model, loss, params, [(X, y)], seed=7).to_dense()
    c = fc.KFACOperator(model, loss, params, [(X, y)], seed=8).to_dense()
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------- 8. curvlinops


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_parity_with_curvlinops(net):
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(6)
    if net == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        X = torch.randn(9, 5, dtype=DT)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 2, groups=2),
            nn.Flatten(),
            nn.Linear(16, 3),
        ).to(DT)
        X = torch.randn(9, 2, 6, 6, dtype=DT)
    params = dict(model.named_parameters())
    cases = [
        (nn.CrossEntropyLoss(), torch.randint(0, 3, (9,))),
        (nn.MSELoss(reduction="sum"), torch.randn(9, 3, dtype=DT)),
        (nn.BCEWithLogitsLoss(), torch.randint(0, 2, (9, 3)).to(DT)),
    ]
    for loss, y in cases:
        data = split(X, y, [4])
        for fisher, approx, joint in [
            ("type-2", "expand", False),
            ("type-2", "reduce", True),
            ("mc", "expand", True),
            ("mc", "reduce", False),
            ("empirical", "expand", True),
            ("empirical", "reduce", False),
        ]:
            mc = 2 if fisher == "mc" else 1
            kw = dict(fisher=fisher, kfac_approx=approx, joint_bias=joint, seed=3, mc_samples=mc)
            K = fc.KFACOperator(model, loss, params, data, **kw)
            C = curvlinops.KFACLinearOperator(
                model, loss, list(params.values()), data, fisher_type=fisher, kfac_approx=approx,
                separate_weight_and_bias=not joint, seed=3, mc_samples=mc, check_deterministic=False,
            )  # fmt: skip
            close(K.to_dense(), C @ torch.eye(C.shape[1], dtype=DT))
        for fisher in ("type-2", "empirical"):
            E = fc.EKFACOperator(model, loss, params, data, fisher=fisher, joint_bias=True)
            C = curvlinops.EKFACLinearOperator(
                model, loss, list(params.values()), data, fisher_type=fisher,
                separate_weight_and_bias=False, check_deterministic=False,
            )  # fmt: skip
            close(E.to_dense(), C @ torch.eye(C.shape[1], dtype=DT), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------- unsupported, purity


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]))

    def forward(self, X):
        return torch.tanh(self.lin(X)) * self.scale


def test_unsupported_error_names_parameter_and_op_and_diagonal_is_exact():
    torch.manual_seed(7)
    model = Scaled().to(DT)
    X, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6, 2)).to(DT)
    params = dict(model.named_parameters())
    loss = nn.BCEWithLogitsLoss()
    with pytest.raises(ValueError, match=r"params\['scale'\] reaches the loss through .*mul"):
        fc.KFACOperator(model, loss, params, [(X, y)], fisher="type-2")
    for fisher, oracle in (("type-2", fc.GGNOperator), ("empirical", fc.EFOperator)):
        K = fc.KFACOperator(model, loss, params, split(X, y, [2]), fisher=fisher, unsupported="diagonal")
        assert K.blocks["scale"].A is None and K.blocks["scale"].G.shape == (2,)
        dense = exact(oracle, model, loss, params, split(X, y, [2]))
        assert next(iter(params)) == "scale"  # own parameters come first in named_parameters()
        close(K.blocks["scale"].G, torch.diagonal(dense)[:2])


def test_module_untouched_inplace_relu_and_callable_model():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, y = torch.randn(1, 3, dtype=DT), torch.randint(0, 2, (1,))
    params = dict(model.named_parameters())
    K = fc.KFACOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], fisher="type-2")
    close(K.to_dense(), block_diag_of(K, exact(fc.GGNOperator, model, nn.CrossEntropyLoss(), params, [(X, y)])))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    v = torch.randn(K.shape[0], dtype=DT)
    tree = K @ K.unflatten(v)
    close(K.flatten(tree), K @ v)


# ---------------------------------------------------------------------------------- 9. distributed


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_uneven_shards_equal_one_process(world):
    store = dist.TCPStore("127.0.0.1", 0, world + 1, True, timeout=timedelta(seconds=60), wait_for_workers=False)
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    worker = here / "_kfac_dist_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(store.port), str(r), str(world)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, (text, _)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r}:\n{text}"


# ---------------------------------------------------------------------------------- 10. bad input


def test_bad_input():
    model = deep_linear(3, 2)
    X, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    params, loss, data = dict(model.named_parameters()), nn.MSELoss(), [(X, y)]
    api = r"^`functx.curvature.KFACOperator`: "
    for kw, kind, text in [
        (dict(fisher="type-3"), ValueError, "`fisher` must be one of"),
        (dict(fisher=2), TypeError, "`fisher` must be one of"),
        (dict(kfac_approx="shrink"), ValueError, "`kfac_approx` must be one of"),
        (dict(unsupported="ignore"), ValueError, "`unsupported` must be one of"),
        (dict(joint_bias=1), TypeError, "`joint_bias` must be a bool"),
        (dict(mc_samples=0), ValueError, "`mc_samples` must be an int >= 1"),
        (dict(fisher="type-2", mc_samples=2), ValueError, "`mc_samples` must be 1 unless"),
        (dict(seed=1.5), TypeError, "`seed` must be an int"),
    ]:
        with pytest.raises(kind, match=api + text):
            fc.KFACOperator(model, loss, params, data, **kw)
    with pytest.raises(ValueError, match=r"^`functx.curvature.EKFACOperator`: `fisher` must be one of"):
        fc.EKFACOperator(model, loss, params, data, fisher="exact")
    with pytest.raises(TypeError, match=api + r"`eigh_dtype` must be None or a floating-point torch.dtype"):
        fc.KFACOperator(model, loss, params, data, eigh_dtype="float64")
    with pytest.raises(ValueError, match=r"`eigh_dtype` must be None or a floating-point torch.dtype, got torch.int64"):
        fc.EKFACOperator(model, loss, params, data, eigh_dtype=torch.int64)
    K = fc.KFACOperator(model, loss, params, data, fisher="type-2")
    with pytest.raises(ValueError, match=r"`v` must have shape \(8,\)"):
        K @ torch.randn(7, dtype=DT)
    with pytest.raises(ValueError, match=r"`v` must be a dict with the keys of params"):
        K @ {"0.weight": torch.randn(2, 3, dtype=DT)}
    with pytest.raises(ValueError, match=r"mc' draws labels"):
        fc.KFACOperator(model, lambda f, y: (f - y).abs().sum(), params, data, reduction="sum")
    reordered = {"0.bias": model[0].bias, "0.weight": model[0].weight}
    with pytest.raises(ValueError, match=r"bias must come right after the weight"):
        fc.KFACOperator(model, loss, reordered, data, fisher="type-2", joint_bias=True)


# ---------------------------------------------------------------------------------- construction internals


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=(3, 2), stride=1, padding=0, dilation=1, groups=1),
        dict(kernel_size=(3, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=1),
        dict(kernel_size=(2, 3), stride=1, padding="same", dilation=2, groups=1),
        dict(kernel_size=(3, 3), stride=2, padding="valid", dilation=1, groups=1),
        dict(kernel_size=(1, 1), stride=1, padding=0, dilation=1, groups=1),
        dict(kernel_size=(3, 3), stride=1, padding=1, dilation=1, groups=2),
    ],
)
def test_conv_patches_are_unfold(options):
    # the strided copy equals F.unfold of the channel-group-averaged (and, for "same", padded) input,
    # also for a channels-last input
    from functx._curvature._capture import _paddings, conv_patches

    torch.manual_seed(0)
    x = torch.randn(3, 4, 7, 8, dtype=DT)
    groups, kernel = options["groups"], options["kernel_size"]
    dilation = options["dilation"] if isinstance(options["dilation"], tuple) else (options["dilation"],) * 2
    top, bottom, left, right = _paddings(options["padding"], kernel, dilation)
    averaged = x.reshape(3, groups, 4 // groups, 7, 8).mean(1)
    padded = torch.nn.functional.pad(averaged, (left, right, top, bottom))
    expected = torch.nn.functional.unfold(padded, kernel, dilation=options["dilation"], stride=options["stride"])
    for inp in (x, x.to(memory_format=torch.channels_last)):
        assert torch.equal(conv_patches(inp, options), expected)
    weight = torch.randn(6, 4 // groups, *kernel, dtype=DT)
    out = torch.nn.functional.conv2d(x, weight, None, options["stride"], options["padding"], dilation, groups)
    assert expected.shape[2] == out.shape[2] * out.shape[3]


@pytest.mark.parametrize("K, joint", [(1, False), (1, True), (3, True)])
def test_ekfac_moment_routes_agree(K, joint):
    # both exact routes (per-example gradients, and the gramian over positions) against the explicit
    # per-example gradients of two uses (tying) with different numbers of positions
    from functx._curvature._kfac import _gramian_moments, _per_example_moments

    torch.manual_seed(0)
    B, m, n = 5, 3, 4
    gs = [torch.randn(K, B, m, S, dtype=DT) for S in (1, 3)]
    xs = [torch.randn(B, S, n, dtype=DT).mT for S in (1, 3)]  # transposed views, as for a Linear
    QG = torch.linalg.qr(torch.randn(m, m, dtype=DT))[0]
    QA = torch.linalg.qr(torch.randn(n + joint, n + joint, dtype=DT))[0]
    ones = [torch.ones(B, 1, x.shape[2], dtype=DT) for x in xs]
    W = sum(g @ (torch.cat([x, o], 1) if joint else x).mT for g, x, o in zip(gs, xs, ones))
    expected = (QG.mT @ W @ QA).square().sum((0, 1))
    close(_per_example_moments(gs, xs, QG, QA, joint), expected)
    close(_gramian_moments(gs, xs, QG, QA, joint), expected)


def test_symmetrised_in_place():
    from functx._curvature._kfac import _symmetric_

    torch.manual_seed(0)
    M = torch.randn(300, 300, dtype=DT)  # several bands of rows
    expected = (M + M.T) / 2
    out = _symmetric_(M)
    assert out is M and torch.equal(M, M.T)
    close(M, expected, rtol=0, atol=0)


def test_ekfac_basis_dtype():
    # float32 factors: the default basis is float32 (as curvlinops), eigh_dtype=float64 gives the
    # float64 one; both measure their eigenvalues exactly, so the operators agree to float32 rounding
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    params, loss = dict(model.named_parameters()), nn.CrossEntropyLoss()
    E32 = fc.EKFACOperator(model, loss, params, [(X, y)], fisher="type-2", joint_bias=True)
    E64 = fc.EKFACOperator(model, loss, params, [(X, y)], fisher="type-2", joint_bias=True, eigh_dtype=torch.float64)
    assert E32._eigen("0.weight").a_vecs.dtype == torch.float32
    assert E64._eigen("0.weight").a_vecs.dtype == torch.float64
    torch.testing.assert_close(E32.to_dense(), E64.to_dense(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(E32.trace(), E64.trace(), rtol=1e-5, atol=0)
    v = torch.randn(E32.shape[0])
    torch.testing.assert_close(E32.inverse(0.1) @ v, E64.inverse(0.1) @ v, rtol=1e-4, atol=1e-5)
    K = fc.KFACOperator(model, loss, params, [(X, y)], fisher="type-2", eigh_dtype=torch.float32)
    assert K._eigen("0.weight").a_vecs.dtype == torch.float32
    K64 = fc.KFACOperator(model, loss, params, [(X, y)], fisher="type-2")
    assert K64._eigen("0.weight").a_vecs.dtype == torch.float64
    torch.testing.assert_close(K.inverse(0.1) @ v, K64.inverse(0.1) @ v, rtol=1e-4, atol=1e-5)


def test_first_batch_checked_on_the_factor_pass():
    # the first-batch checks (loss kind, finite data) run on the factor pass's first forward: a
    # wrong loss is named after one forward, and a nan in the first batch is named without num_data
    torch.manual_seed(0)
    model = deep_linear(3, 2)
    X, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    params, calls = dict(model.named_parameters()), []

    def counting(p, X):
        calls.append(1)
        return torch.func.functional_call(model, p, (X,))

    with pytest.raises(ValueError, match=r"`loss` must return a 0-d tensor \(a scalar\), got .* for batch 0"):
        fc.KFACOperator(
            counting, lambda o, t: ((o - t) ** 2).mean(1), params, split(X, y, [3]), reduction="mean",
            fisher="empirical", check_deterministic=False,
        )  # fmt: skip
    assert len(calls) == 1
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 0 of `data` must hold finite values, got a nan or inf in X"):
        fc.KFACOperator(model, nn.MSELoss(), params, [(bad, y)], fisher="type-2", num_data=6)
    from functx._curvature._data import _all_finite

    huge = torch.full((4, 3), 3e38)  # float32: the sum overflows, the entries are finite
    assert _all_finite(huge) and _all_finite(torch.zeros(0))
    for value in (float("nan"), float("inf"), -float("inf")):
        assert not _all_finite(torch.cat([huge.reshape(-1), torch.tensor([value])]))
