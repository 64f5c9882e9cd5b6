"""Core transforms vs the best torch.func recipe (and plain autograd, and JAX's jit), side by side.

Run: `python benchmarks/bench_core.py [--quick] [--no-compile]`. Prints a markdown table of
median times and ratios (functx / anchor; < 1 means functx is faster).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import func as tf

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, fmt_time, markdown_table, setup_threads

import functx

torch.manual_seed(0)
ROWS: list[list[str]] = []


def report(task: str, times: dict[str, float], ours: str, anchors: list[str], target: str = "") -> None:
    for anchor in anchors:
        ratio = times[ours] / times[anchor]
        ROWS.append([task, ours, fmt_time(times[ours]), anchor, fmt_time(times[anchor]), f"{ratio:.2f}x", target])
    print(f"  {task} vs {', '.join(anchors)}: {ours} {fmt_time(times[ours])}", flush=True)


def bench_jacobians(rounds: int) -> None:
    A = torch.randn(256, 256) / 16
    f = lambda x: torch.tanh(A @ x) * x
    x = torch.randn(256)
    times = compare(
        {
            "functx.jacrev": lambda: functx.jacrev(f)(x),
            "torch.func.jacrev": lambda: tf.jacrev(f)(x),
            "functx.jacfwd": lambda: functx.jacfwd(f)(x),
            "torch.func.jacfwd": lambda: tf.jacfwd(f)(x),
        },
        rounds=rounds,
    )
    report("jacrev R^256->R^256", times, "functx.jacrev", ["torch.func.jacrev"], "<= 1.10x")
    report("jacfwd R^256->R^256", times, "functx.jacfwd", ["torch.func.jacfwd"], "<= 1.10x")


def dense_hessian_problem():
    A = torch.randn(256, 256) / 16
    return (lambda x: (torch.tanh(A @ x) ** 2).sum() + (x**3).sum() / 3), torch.randn(256)


def bench_hessian(rounds: int) -> None:
    f, x = dense_hessian_problem()
    times = compare(
        {
            "functx.hessian": lambda: functx.hessian(f)(x),
            "torch.func.hessian": lambda: tf.hessian(f)(x),
            "torch.func.jacrev(jacrev)": lambda: tf.jacrev(tf.jacrev(f))(x),
        },
        rounds=rounds,
    )
    report("hessian R^256", times, "functx.hessian", ["torch.func.hessian"], "<= 0.33x")
    report("hessian R^256", times, "functx.hessian", ["torch.func.jacrev(jacrev)"], "<= 1.10x")


def mlp_problem(batch: int = 32):
    g = torch.Generator().manual_seed(0)
    p = {"w1": torch.randn(4, 16, generator=g) / 2, "b1": torch.zeros(16), "w2": torch.randn(16, 1, generator=g) / 4}

    def loss(p, x, y):
        return ((torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]).squeeze(-1) - y).pow(2).mean()

    return loss, p, torch.randn(batch, 1, 4, generator=g), torch.randn(batch, 1, generator=g)


def bench_per_sample_hessians(rounds: int) -> None:
    loss, p, x, y = mlp_problem()
    dims = (None, 0, 0)
    times = compare(
        {
            "functx.vmap(hessian)": lambda: functx.vmap(functx.hessian(loss), in_dims=dims)(p, x, y),
            "torch.func.vmap(hessian)": lambda: tf.vmap(tf.hessian(loss), in_dims=dims)(p, x, y),
            "torch.func.vmap(jacrev(jacrev))": lambda: tf.vmap(tf.jacrev(tf.jacrev(loss)), in_dims=dims)(p, x, y),
            "torch.func.vmap(jacrev(grad))": lambda: tf.vmap(tf.jacrev(tf.grad(loss)), in_dims=dims)(p, x, y),
        },
        rounds=rounds,
    )
    task = "per-sample Hessians, MLP (97 params), batch 32"
    anchors = ["torch.func.vmap(hessian)", "torch.func.vmap(jacrev(jacrev))", "torch.func.vmap(jacrev(grad))"]
    report(task, times, "functx.vmap(hessian)", anchors, "<= 1.10x")


def bench_per_sample_grads(rounds: int) -> None:
    loss, p, x, y = mlp_problem()
    dims = (None, 0, 0)
    times = compare(
        {
            "functx.vmap(grad)": lambda: functx.vmap(functx.grad(loss), in_dims=dims)(p, x, y),
            "torch.func.vmap(grad)": lambda: tf.vmap(tf.grad(loss), in_dims=dims)(p, x, y),
        },
        rounds=rounds,
    )
    report(
        "per-sample gradients, MLP (97 params), batch 32",
        times,
        "functx.vmap(grad)",
        ["torch.func.vmap(grad)"],
        "(informative)",
    )


def bench_hvp(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    p = {
        "w1": torch.randn(784, 512, generator=g) / 28,
        "b1": torch.zeros(512),
        "w2": torch.randn(512, 10, generator=g) / 22,
        "b2": torch.zeros(10),
    }
    x, labels = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    loss = lambda p: F.cross_entropy(torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], labels)
    leaves = [t.detach().requires_grad_() for t in p.values()]
    vs = list(v.values())

    def autograd_double_backward():
        q = dict(zip(p, leaves))
        gs = torch.autograd.grad(loss(q), leaves, create_graph=True)
        return torch.autograd.grad(gs, leaves, vs)

    times = compare(
        {
            "functx.hvp": lambda: functx.hvp(loss, (p,), (v,)),
            "torch.func.grad": lambda: tf.grad(loss)(p),
            "autograd double-backward": autograd_double_backward,
            "torch.func.jvp(grad)": lambda: tf.jvp(tf.grad(loss), (p,), (v,)),
            "torch.func.vjp(grad)": lambda: tf.vjp(tf.grad(loss), p)[1](v),
        },
        rounds=rounds,
    )
    task = f"hvp, MLP {sum(t.numel() for t in p.values()) // 1000}k params"
    report(task, times, "functx.hvp", ["torch.func.grad"], "<= 2.30x")
    report(
        task,
        times,
        "functx.hvp",
        ["autograd double-backward", "torch.func.jvp(grad)", "torch.func.vjp(grad)"],
        "<= 1.00x",
    )


def bench_overhead(rounds: int) -> None:
    x = torch.randn(3)
    f = lambda x: (x * x).sum()
    p = {"a": torch.randn(3), "b": torch.randn(2), "c": torch.randn(())}
    fp = lambda p: (p["a"] * p["a"]).sum() + p["b"].sum() * p["c"]
    times = compare(
        {
            "functx.grad": lambda: functx.grad(f)(x),
            "torch.func.grad": lambda: tf.grad(f)(x),
            "functx.grad (dict of 3)": lambda: functx.grad(fp)(p),
            "torch.func.grad (dict of 3)": lambda: tf.grad(fp)(p),
        },
        rounds=rounds,
    )
    report("grad overhead, tiny function", times, "functx.grad", ["torch.func.grad"], "<= 1.20x")
    report(
        "grad overhead, tiny function", times, "functx.grad (dict of 3)", ["torch.func.grad (dict of 3)"], "<= 1.20x"
    )


def bench_compiled(rounds: int) -> None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("  (JAX not installed: `pip install -e .[bench]` to compare with jax.jit)")
        jax = None
    loss, p, x, y = mlp_problem()
    dims = (None, 0, 0)
    eager = lambda: functx.vmap(functx.hessian(loss), in_dims=dims)(p, x, y)
    compiled_psh = torch.compile(
        lambda p, x, y: functx.vmap(functx.hessian(loss), in_dims=dims)(p, x, y), fullgraph=True
    )
    f, xd = dense_hessian_problem()
    compiled_h = torch.compile(functx.hessian(f), fullgraph=True)
    candidates = {
        "functx.vmap(hessian) eager": eager,
        "compiled functx.vmap(hessian)": lambda: compiled_psh(p, x, y),
        "functx.hessian R^256 eager": lambda: functx.hessian(f)(xd),
        "compiled functx.hessian R^256": lambda: compiled_h(xd),
    }
    if jax is not None:
        jp = {k: jnp.asarray(t.numpy()) for k, t in p.items()}
        jx, jy = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

        def jloss(p, x, y):
            return jnp.mean((((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]).squeeze(-1)) - y) ** 2)

        jit_psh = jax.jit(jax.vmap(jax.hessian(jloss), in_axes=(None, 0, 0)))
        A = jnp.asarray(torch.randn(256, 256).numpy() / 16)
        jf = lambda x: jnp.sum(jnp.tanh(A @ x) ** 2) + jnp.sum(x**3) / 3
        jit_h = jax.jit(jax.hessian(jf))
        jxd = jnp.asarray(xd.numpy())
        candidates["jax.jit(vmap(hessian))"] = lambda: jax.block_until_ready(jit_psh(jp, jx, jy))
        candidates["jax.jit(hessian) R^256"] = lambda: jax.block_until_ready(jit_h(jxd))
    times = compare(candidates, rounds=rounds, warmup=2)
    report(
        "per-sample Hessians, compiled",
        times,
        "compiled functx.vmap(hessian)",
        ["functx.vmap(hessian) eager"],
        "speed-up",
    )
    report(
        "dense Hessian R^256, compiled",
        times,
        "compiled functx.hessian R^256",
        ["functx.hessian R^256 eager"],
        "speed-up",
    )
    if jax is not None:
        report(
            "per-sample Hessians, compiled",
            times,
            "compiled functx.vmap(hessian)",
            ["jax.jit(vmap(hessian))"],
            "<= 1.00x",
        )
        report(
            "dense Hessian R^256, compiled",
            times,
            "compiled functx.hessian R^256",
            ["jax.jit(hessian) R^256"],
            "<= 1.00x",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile / JAX section")
    args = parser.parse_args()
    rounds = 3 if args.quick else 15
    print(f"# functx core benchmarks ({setup_threads()}, float32, CPU)", flush=True)
    bench_overhead(rounds)
    bench_jacobians(rounds)
    bench_hessian(rounds)
    bench_per_sample_hessians(rounds)
    bench_per_sample_grads(rounds)
    bench_hvp(rounds)
    if not args.no_compile:
        bench_compiled(rounds)
    print()
    print(markdown_table(["task", "functx", "time", "anchor", "time", "ratio", "target"], ROWS))


if __name__ == "__main__":
    main()
