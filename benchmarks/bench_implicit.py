"""Implicit differentiation vs differentiating through the solver's iterations.

Two bilevel problems, each with an inner solver run for K = 10, 100, 1000 iterations:

* ridge: ``z*(lam) = argmin ||X z - y||^2 / 2 + lam ||z||^2 / 2`` by gradient descent
  (n=200, p=50), hypergradient of the validation loss with respect to ``lam``; the error is
  measured against the closed form ``L'(lam) = -g^T A^{-1} z*``;
* deq: ``z = tanh(W z + U x + b)`` for a batch of 64 samples (hidden size 32, ||W|| = 0.9)
  by fixed-point iteration, gradient of a loss with respect to ``(W, U, b)``; the error is
  measured against the implicit gradient at an exact fixed point (1000 iterations, dense LU).

``unrolled`` backpropagates through the K iterations (torch autograd); ``implicit`` runs
the same K iterations without autograd and differentiates the optimality condition with
``functx.implicit`` (one CG / GMRES / BiCGStab solve per gradient).

Method: times are medians of interleaved rounds (``_timing.compare``), reported as ratios
to the implicit gradient at the same K. Memory is the autograd graph built by the forward
pass: the bytes of the tensors saved for backward, counted once per storage through
``torch.autograd.graph.saved_tensors_hooks``, leaving out the problem's data and the
parameters (saved by both methods). The backward pass runs outside the hooks (torch.func,
which the implicit rules use, refuses them); the implicit backward holds O(size of z)
work vectors of the linear solve, independent of K. Errors are
relative (max-abs error / max-abs reference). Run ``--quick`` for K = 10, 100 and fewer
rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import compare, fmt_time, markdown_table, setup_threads

from functx.implicit import custom_fixed_point, custom_root

D = torch.float64


@contextlib.contextmanager
def saved_bytes(seen: dict[int, int] | None, data: list[torch.Tensor]) -> Iterator[None]:
    """Record in ``seen`` the bytes saved for backward while the block runs, once per
    storage, leaving out the storages of ``data`` (the problem's inputs, shared by all)."""
    if seen is None:
        yield
        return
    skip = {t.untyped_storage().data_ptr() for t in data}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


Run = Callable[[dict[int, int] | None], dict[str, torch.Tensor]]


def gradient(
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor], point: dict[str, torch.Tensor], data: list[torch.Tensor]
) -> Run:
    """``run(seen)``: the gradient of ``loss`` at ``point``; the forward pass's saved bytes go to ``seen``.

    (Backward runs outside the hooks: torch.func, used by the implicit rules, refuses them.)
    """

    def run(seen: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in point.items()}
        with saved_bytes(seen, data + list(leaves.values())):
            value = loss(leaves)
        return dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))

    return run


def fmt_bytes(n: int) -> str:
    for unit, scale in (("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def rel_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    err = max((got[k] - ref[k]).abs().max().item() for k in ref)
    return err / max(ref[k].abs().max().item() for k in ref)


# --------------------------------------------------------------------------------------
# Ridge regression, gradient descent inner solver


class Ridge:
    n, p = 200, 50

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.X, self.y = torch.randn(self.n, self.p, generator=g, dtype=D), torch.randn(self.n, generator=g, dtype=D)
        self.Xv, self.yv = torch.randn(self.n, self.p, generator=g, dtype=D), torch.randn(self.n, generator=g, dtype=D)
        self.lam = torch.tensor(1.0, dtype=D)
        self.data = [self.X, self.y, self.Xv, self.yv]
        self.step = 1.0 / (torch.linalg.matrix_norm(self.X, 2) ** 2 + self.lam).item()

    def F(self, z, lam, X, y):
        return X.T @ (X @ z - y) + lam * z

    def gd(self, lam, steps):
        z = torch.zeros(self.p, dtype=D)
        for _ in range(steps):
            z = z - self.step * self.F(z, lam, self.X, self.y)
        return z

    def val(self, z):
        return 0.5 * ((self.Xv @ z - self.yv) ** 2).sum()

    def reference(self) -> dict[str, torch.Tensor]:
        A = self.X.T @ self.X + self.lam * torch.eye(self.p, dtype=D)
        z = torch.linalg.solve(A, self.X.T @ self.y)
        g = self.Xv.T @ (self.Xv @ z - self.yv)
        return {"lam": -g @ torch.linalg.solve(A, z)}

    def unrolled(self, steps: int) -> Run:
        return gradient(lambda p: self.val(self.gd(p["lam"], steps)), {"lam": self.lam}, self.data)

    def implicit(self, steps: int, solve: str = "cg") -> Run:
        solver = custom_root(self.F, solve=solve, symmetric=solve in ("cg", "cholesky"))(
            lambda init, lam, X, y: self.gd(lam, steps)
        )
        return gradient(lambda p: self.val(solver(None, p["lam"], self.X, self.y)), {"lam": self.lam}, self.data)


# --------------------------------------------------------------------------------------
# Deep equilibrium layer, fixed-point iteration


class Deq:
    batch, h, d = 64, 32, 8

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        W = torch.randn(self.h, self.h, generator=g, dtype=D)
        self.params = {
            "W": 0.9 * W / torch.linalg.matrix_norm(W, 2),
            "U": torch.randn(self.h, self.d, generator=g, dtype=D),
            "b": torch.randn(self.h, generator=g, dtype=D),
        }
        self.x = torch.randn(self.batch, self.d, generator=g, dtype=D)

    @staticmethod
    def T(z, p, x):
        return torch.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])

    def iterate(self, p, steps):
        z = torch.zeros(self.batch, self.h, dtype=D)
        for _ in range(steps):
            z = self.T(z, p, self.x)
        return z

    @staticmethod
    def loss(z):
        return (z**2).sum() + z[:, 0].sum()

    def reference(self) -> dict[str, torch.Tensor]:
        return self.implicit(1000, solve="lu")()

    def unrolled(self, steps: int) -> Run:
        return gradient(lambda p: self.loss(self.iterate(p, steps)), self.params, [self.x])

    def implicit(self, steps: int, solve: str = "gmres") -> Run:
        solver = custom_fixed_point(self.T, solve=solve)(lambda init, p, x: self.iterate(p, steps))
        return gradient(lambda p: self.loss(solver(None, p, self.x)), self.params, [self.x])


# --------------------------------------------------------------------------------------


def measure(problem, steps_list: list[int], solves: list[str], rounds: int) -> str:
    reference = problem.reference()
    rows = []
    for steps in steps_list:
        candidates = {f"implicit ({s})": problem.implicit(steps, s) for s in solves}
        candidates["unrolled"] = problem.unrolled(steps)
        times = compare(candidates, rounds=rounds, warmup=2)
        base = times[f"implicit ({solves[0]})"]
        for name, fn in candidates.items():
            seen: dict[int, int] = {}
            grads = fn(seen)
            rows.append(
                [
                    str(steps),
                    name,
                    fmt_time(times[name]),
                    f"{times[name] / base:.2f}",
                    fmt_bytes(sum(seen.values())),
                    f"{rel_error(grads, reference):.1e}",
                ]
            )
    header = ["K", "method", "time", "time / implicit", "graph memory (beyond data)", "gradient error"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 10, 100 and fewer rounds")
    args = parser.parse_args()
    steps = [10, 100] if args.quick else [10, 100, 1000]
    rounds = 3 if args.quick else 7
    warnings.simplefilter("ignore")
    print(f"# functx.implicit vs unrolled differentiation ({setup_threads()})\n")
    print("## ridge regression, gradient descent (n=200, p=50): d val_loss / d lam\n")
    print(measure(Ridge(), steps, ["cg", "gmres", "bicgstab", "lu"], rounds))
    print("\n## deep equilibrium layer, fixed-point iteration (batch 64, hidden 32): d loss / d (W, U, b)\n")
    print(measure(Deq(), steps, ["gmres", "bicgstab"], rounds))


if __name__ == "__main__":
    main()
