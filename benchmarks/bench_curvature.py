"""Side-by-side benchmark of functx.curvature: ``python benchmarks/bench_curvature.py [--quick]``.

Problem (issue 8): MLP 784-64(tanh)-10 (50,890 parameters), ``CrossEntropyLoss(mean)``, 8 batches
of 64, float32, 1 thread. Anchors measured in the same run: a plain double-backward HVP summed
over the batches, and curvlinops 3.0.1 when installed (bench step:
``pip install --no-deps curvlinops-for-pytorch==3.0.1 einops einconv linear_operator scipy``).
Prints medians and ratios (ratios are what to compare across machines).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, fmt_time, markdown_table

import functx.curvature as fc

QUICK = "--quick" in sys.argv


def problem(batches: int = 8, batch: int = 64) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    data = [(torch.randn(batch, 784), torch.randint(0, 10, (batch,))) for _ in range(batches)]
    return model, torch.nn.CrossEntropyLoss(), data


def plain_hvp(model: torch.nn.Module, loss: torch.nn.Module, data: list, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """The anchor: double backward per batch, summed (weights B_b / N), on the module itself."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    n = sum(len(X) for X, _ in data)
    for X, y in data:
        value = loss(model(X), y) * (len(X) / n)
        grads = torch.autograd.grad(value, params, create_graph=True)
        for t, h in zip(total, torch.autograd.grad(grads, params, v)):
            t.add_(h)
    return total


def curvlinops_ops(model: torch.nn.Module, loss: torch.nn.Module, data: list) -> dict | None:
    try:
        import curvlinops
    except ImportError:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "H": curvlinops.HessianLinearOperator(model, loss, params, data),
        "G": curvlinops.GGNLinearOperator(model, loss, params, data),
        "F": curvlinops.EFLinearOperator(model, loss, params, data),
    }


def products_table() -> str:
    model, loss, data = problem()
    params = dict(model.named_parameters())
    ops = {"H": fc.HessianOperator, "G": fc.GGNOperator, "F": fc.EFOperator}
    ours = {k: cls(model, loss, params, data) for k, cls in ops.items()}
    theirs = curvlinops_ops(model, loss, data)
    P = ours["H"].shape[0]
    v, V = torch.randn(P), torch.randn(P, 16)
    v_list = [t.detach() for t in ours["H"].unflatten(v).values()]
    candidates = {
        "plain HVP": lambda: plain_hvp(model, loss, data, v_list),
        "H @ v": lambda: ours["H"] @ v,
        "G @ v": lambda: ours["G"] @ v,
        "F @ v": lambda: ours["F"] @ v,
        "H @ V (16)": lambda: ours["H"] @ V,
        "G @ V (16)": lambda: ours["G"] @ V,
    }
    if theirs is not None:
        candidates |= {f"curvlinops {k} @ v": (lambda op=op: op @ v) for k, op in theirs.items()}
    t = compare(candidates, rounds=3 if QUICK else 11, block=0.05 if QUICK else 0.2)
    rows = [
        ["H @ v", fmt_time(t["H @ v"]), f"{t['H @ v'] / t['plain HVP']:.2f}x plain HVP", _vs(t, "H")],
        ["G @ v", fmt_time(t["G @ v"]), f"{t['G @ v'] / t['plain HVP']:.2f}x plain HVP", _vs(t, "G")],
        ["F @ v", fmt_time(t["F @ v"]), f"{t['F @ v'] / t['plain HVP']:.2f}x plain HVP", _vs(t, "F")],
        ["H @ V, V (P, 16)", fmt_time(t["H @ V (16)"]), f"{t['H @ V (16)'] / (16 * t['H @ v']):.2f}x 16 H @ v", ""],
        ["G @ V, V (P, 16)", fmt_time(t["G @ V (16)"]), f"{t['G @ V (16)'] / (16 * t['G @ v']):.2f}x 16 G @ v", ""],
        ["plain HVP (anchor)", fmt_time(t["plain HVP"]), "1.00x", ""],
    ]
    return markdown_table(["product over 8 batches of 64", "median", "ratio", "vs curvlinops 3.0.1"], rows)


def _vs(t: dict[str, float], key: str) -> str:
    theirs = t.get(f"curvlinops {key} @ v")
    return f"{t[f'{key} @ v'] / theirs:.2f}x ({fmt_time(theirs)})" if theirs else "not installed"


def eigsh_table() -> str | None:
    """``fc.eigsh(H, k=1)`` against scipy's ``eigsh`` on curvlinops' operator (same tolerance)."""
    if not hasattr(fc, "eigsh"):
        return None
    model, loss, data = problem()
    H = fc.HessianOperator(model, loss, dict(model.named_parameters()), data)
    start = time.perf_counter()
    evals, _, info = fc.eigsh(H, k=1, tol=1e-4, return_info=True)
    ours, ours_mv = time.perf_counter() - start, info.num_matvecs
    rows = [["functx `fc.eigsh(H, k=1, tol=1e-4)`", fmt_time(ours), str(ours_mv), f"{float(evals[0]):.6g}", "1.00x"]]
    theirs = curvlinops_ops(model, loss, data)
    if theirs is not None:
        from scipy.sparse.linalg import eigsh

        scipy_op = theirs["H"].to_scipy()
        calls = [0]

        def matvec(x: object) -> object:
            calls[0] += 1
            return scipy_op @ x

        from scipy.sparse.linalg import LinearOperator

        counted = LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
        start = time.perf_counter()
        ref = eigsh(counted, k=1, which="LA", tol=1e-4, return_eigenvectors=False)
        elapsed = time.perf_counter() - start
        rows.append(
            [
                "scipy `eigsh(curvlinops.to_scipy(), k=1, tol=1e-4)`",
                fmt_time(elapsed),
                str(calls[0]),
                f"{float(ref[0]):.6g}",
                f"{ours / elapsed:.2f}x (functx / scipy)",
            ]
        )
    return markdown_table(["top eigenvalue", "time", "matvecs", "eigenvalue", "ratio"], rows)


def kron_inverse_table() -> str | None:
    """``K.inverse(δ) @ v`` at a new damping, setup included, against curvlinops 3.0.1's
    ``KFACInverseLinearOperator(K, δ, use_exact_damping=True) @ v`` on the same factors (MLP
    784-256-128-10, 8 batches of 256, ``fisher="mc"``, joint bias): marginal-likelihood tuning
    changes δ every step, and functx reuses the factors' cached eigendecompositions."""
    try:
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
    except ImportError:
        return None
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    data = [(torch.randn(256, 784), torch.randint(0, 10, (256,))) for _ in range(2 if QUICK else 8)]
    params = dict(model.named_parameters())
    theirs = KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(params.values()), data, fisher_type="mc", separate_weight_and_bias=False
    )
    theirs.compute_kronecker_factors()
    ours = _kron_from_curvlinops(theirs, params)  # the same factors: only the algebra is compared
    v = torch.randn(ours.shape[0])
    deltas = [10.0 ** (-3 - k / 100) for k in range(100_000)]  # a new damping at every call
    step = iter(range(len(deltas)))
    check = ours.inverse(1e-3) @ v  # the eigendecompositions, once (any later damping reuses them)
    reference = KFACInverseLinearOperator(theirs, 1e-3, use_exact_damping=True) @ v
    assert float((check - reference).norm() / reference.norm()) < 1e-3, "not the same inverse as curvlinops"
    Ki = ours.inverse(1e-3)
    Ki_theirs = KFACInverseLinearOperator(theirs, 1e-3, use_exact_damping=True)
    Ki_theirs @ v  # its cache
    candidates = {
        "new": lambda: ours.inverse(deltas[next(step)]) @ v,
        "curvlinops new": lambda: KFACInverseLinearOperator(theirs, deltas[next(step)], use_exact_damping=True) @ v,
        "product": lambda: Ki @ v,
        "curvlinops product": lambda: Ki_theirs @ v,
    }
    t = compare(candidates, rounds=3 if QUICK else 11, block=0.05 if QUICK else 0.2)
    rows = [
        [
            "`K.inverse(δ) @ v`, new δ (setup included)",
            fmt_time(t["new"]),
            f"{t['new'] / t['curvlinops new']:.2f}x ({fmt_time(t['curvlinops new'])})",
        ],
        [
            "`Ki @ v`, δ fixed (inverse built)",
            fmt_time(t["product"]),
            f"{t['product'] / t['curvlinops product']:.2f}x ({fmt_time(t['curvlinops product'])})",
        ],
    ]
    header = ["KFAC exact damped inverse, MLP 784-256-128-10", "median", "vs curvlinops 3.0.1 (exact damping)"]
    return markdown_table(header, rows)


def _kron_from_curvlinops(op: object, params: dict[str, torch.Tensor]) -> object:
    """A functx Kronecker operator on curvlinops' factors (joint bias: a ones column last in A)."""
    from functx._curvature._kron import KronBlock, KroneckerOperatorBase
    from functx._curvature._params import Layout

    blocks = {}
    for module, pos in op._mapping.items():  # type: ignore[attr-defined]
        names = tuple(f"{module}.{kind}" for kind in ("weight", "bias") if kind in pos)
        blocks[names[0]] = KronBlock(names, op._gradient_covariances[module], op._input_covariances[module])  # type: ignore[attr-defined]

    class Factors(KroneckerOperatorBase):
        def __init__(self) -> None:
            self._api = "functx.curvature.KroneckerOperatorBase"
            self._layout = Layout({k: t.detach() for k, t in params.items()}, self._api)
            self._num_data = 1
            self._set_blocks(blocks)

    return Factors()


# -- KFAC / EKFAC (issue 17) ------------------------------------------------------------------


def kfac_problem(net: str) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """MLP 784-256-128-10 (8 batches of 256) or a small CNN (two Conv2d + Linear, 8 x 64)."""
    torch.manual_seed(0)
    nn = torch.nn
    if net == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
        data = [(torch.randn(256, 784), torch.randint(0, 10, (256,))) for _ in range(8)]
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(512, 10),
        )
        data = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(8)]
    return model, nn.CrossEntropyLoss(), data


def _kfac_builders(net: str) -> dict[str, object]:
    """Zero-argument constructors (construction plus one product) of ours and curvlinops'."""
    model, loss, data = kfac_problem(net)
    params = dict(model.named_parameters())
    P = sum(p.numel() for p in params.values())
    v = torch.randn(P)
    kw = dict(fisher="mc", joint_bias=True, check_deterministic=False)
    builders = {
        "KFAC": lambda: fc.KFACOperator(model, loss, params, data, **kw) @ v,
        "EKFAC": lambda: fc.EKFACOperator(model, loss, params, data, **kw) @ v,
    }
    try:
        import curvlinops
    except ImportError:
        return builders
    ckw = dict(fisher_type="mc", separate_weight_and_bias=False, check_deterministic=False)
    plist = list(params.values())
    builders["curvlinops KFAC"] = lambda: curvlinops.KFACLinearOperator(model, loss, plist, data, **ckw) @ v
    builders["curvlinops EKFAC"] = lambda: curvlinops.EKFACLinearOperator(model, loss, plist, data, **ckw) @ v
    return builders


def _peak_memory(net: str, which: str, runs: int = 3) -> float | None:
    """Peak resident memory added by one construction (incl. its first product), in MiB, in a fresh
    process (resident set size polled every millisecond; Linux only): the median of ``runs``
    processes (one varies by about 1 MiB, the allocator's and the first-touched library pages')."""
    import statistics

    peaks = [_peak_memory_once(net, which) for _ in range(runs)]
    return None if peaks[0] is None else statistics.median(p for p in peaks if p is not None)


def _peak_memory_once(net: str, which: str) -> float | None:
    import subprocess

    code = (
        "import sys, threading, time, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1)\n"
        "import bench_curvature as b\n"
        "build = b._kfac_builders(sys.argv[2]).get(sys.argv[3])\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "peak, done = [rss()], []\n"
        "def poll():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.001)\n"
        "before = rss(); t = threading.Thread(target=poll); t.start()\n"
        "if build is not None: build()\n"
        "done.append(1); t.join()\n"
        "print(-1 if build is None else (max(peak[0], rss()) - before) / 1024)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), net, which],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    kib = float(out.stdout.strip().splitlines()[-1])
    return None if kib < 0 else kib / 1024


def kfac_table() -> str:
    """KFAC/EKFAC construction (incl. the first product), K @ v and peak memory vs curvlinops."""
    rows = []
    for net in ("mlp", "cnn"):
        builders = _kfac_builders(net)
        t = compare(builders, rounds=3 if QUICK else 7, warmup=1, block=0.0)  # type: ignore[arg-type]
        model, loss, data = kfac_problem(net)
        params = dict(model.named_parameters())
        K = fc.KFACOperator(model, loss, params, data, fisher="mc", joint_bias=True, check_deterministic=False)
        v = torch.randn(K.shape[0])
        products: dict[str, object] = {"K @ v": lambda: K @ v}
        try:
            import curvlinops

            C = curvlinops.KFACLinearOperator(
                model, loss, list(params.values()), data, fisher_type="mc", separate_weight_and_bias=False,
                check_deterministic=False,
            )  # fmt: skip
            C @ v
            products["curvlinops K @ v"] = lambda: C @ v
        except ImportError:
            pass
        if hasattr(K, "inverse"):  # a new damping every call: marginal-likelihood tuning (setup included)
            step = iter(range(10**9))
            products["K.inverse(d) @ v"] = lambda: K.inverse(1e-3 * (1 + next(step) % 97)) @ v
            if "curvlinops K @ v" in products:
                products["curvlinops inverse @ v"] = lambda: (
                    curvlinops.KFACInverseLinearOperator(
                        C, damping=1e-3 * (1 + next(step) % 97), use_exact_damping=True
                    )
                    @ v
                )
        tp = compare(products, rounds=3 if QUICK else 11, block=0.05 if QUICK else 0.2)  # type: ignore[arg-type]
        for ours, theirs, label in (
            ("KFAC", "curvlinops KFAC", "KFAC construction + first K @ v"),
            ("EKFAC", "curvlinops EKFAC", "EKFAC construction + first E @ v"),
        ):
            ratio = f"{t[ours] / t[theirs]:.2f}x ({fmt_time(t[theirs])})" if theirs in t else "not installed"
            mine, other = _peak_memory(net, ours), _peak_memory(net, theirs)
            memory = f"{mine:.0f} MiB" + (f" vs {other:.0f} MiB" if other is not None else "")
            rows.append([f"{net}: {label}", fmt_time(t[ours]), ratio, memory])
        ratio = (
            f"{tp['K @ v'] / tp['curvlinops K @ v']:.2f}x ({fmt_time(tp['curvlinops K @ v'])})"
            if "curvlinops K @ v" in tp
            else "not installed"
        )
        rows.append([f"{net}: K @ v", fmt_time(tp["K @ v"]), ratio, ""])
        if "K.inverse(d) @ v" in tp:
            theirs = tp.get("curvlinops inverse @ v")
            ratio = f"{tp['K.inverse(d) @ v'] / theirs:.2f}x ({fmt_time(theirs)})" if theirs else "not installed"
            rows.append([f"{net}: K.inverse(new damping) @ v", fmt_time(tp["K.inverse(d) @ v"]), ratio, ""])
    header = [
        "KFAC (fisher='mc', joint bias, float32)",
        "median",
        "vs curvlinops 3.0.1",
        "peak memory (ours vs theirs)",
    ]
    return markdown_table(header, rows)


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float32; MLP 784-64(tanh)-10, CrossEntropyLoss(mean), 8 x 64\n")
    print(products_table())
    table = eigsh_table()
    if table is not None:
        print()
        print(table)
    print("\n" + (kron_inverse_table() or "curvlinops not installed: no KFAC inverse rows"))
    print()
    print("MLP 784-256-128-10 (8 x 256) and CNN Conv2d(3,16)-Conv2d(16,32)-Linear(512,10) (8 x 64)\n")
    print(kfac_table())


if __name__ == "__main__":
    main()
