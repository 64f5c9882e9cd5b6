"""Core transforms vs the best torch.func recipe (and plain autograd, and JAX's jit), side by side.

Run: `python benchmarks/bench_core.py [--quick] [--no-compile] [--cpu-clock] [--only NAME ...]`.
Prints a markdown table of median times and ratios (functx / anchor; < 1 means functx is
faster). `--cpu-clock` times the CPU time of the calling thread instead of wall time (for a
shared, loaded machine; one thread only), `--rounds N` sets the number of interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import func as tf

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, fmt_time, markdown_table, set_clock, setup_threads

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
    report("jacrev R^256->R^256", times, "functx.jacrev", ["torch.func.jacrev"], "<= 1.00x")
    report("jacfwd R^256->R^256", times, "functx.jacfwd", ["torch.func.jacfwd"], "<= 1.00x")


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
    report("hessian R^256", times, "functx.hessian", ["torch.func.hessian"], "<= 0.20x")
    report("hessian R^256", times, "functx.hessian", ["torch.func.jacrev(jacrev)"], "<= 1.10x")


def mlp_problem(batch: int = 32, d_in: int = 4, hidden: int = 16, out_bias: bool = False):
    """A one-hidden-layer tanh MLP with a squared loss; ``(loss, params, x, y)``."""
    g = torch.Generator().manual_seed(0)
    p = {
        "w1": torch.randn(d_in, hidden, generator=g) / 2,
        "b1": torch.zeros(hidden),
        "w2": torch.randn(hidden, 1, generator=g) / 4,
    }
    if out_bias:
        p["b2"] = torch.zeros(1)

    def loss(p, x, y):
        out = torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        if "b2" in p:
            out = out + p["b2"]
        return (out.squeeze(-1) - y).pow(2).mean()

    return loss, p, torch.randn(batch, 1, d_in, generator=g), torch.randn(batch, 1, generator=g)


def n_params(p) -> int:
    return sum(t.numel() for t in p.values())


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
    task = f"per-sample Hessians, MLP ({n_params(p)} params), batch 32"
    report(task, times, "functx.vmap(hessian)", ["torch.func.vmap(hessian)"], "<= 0.74x")
    anchors = ["torch.func.vmap(jacrev(jacrev))", "torch.func.vmap(jacrev(grad))"]
    report(task, times, "functx.vmap(hessian)", anchors, "<= 1.10x")


# small MLPs: (d_in, hidden, out_bias) -> 81, 96 and 161 parameters
PER_SAMPLE_GRAD_MLPS = [(8, 8, True), (4, 16, False), (8, 16, True)]


def bench_per_sample_grads(rounds: int) -> None:
    dims = (None, 0, 0)
    candidates, tasks = {}, []
    for d_in, hidden, out_bias in PER_SAMPLE_GRAD_MLPS:
        loss, p, x, y = mlp_problem(d_in=d_in, hidden=hidden, out_bias=out_bias)
        n = n_params(p)
        candidates[f"functx.vmap(grad) {n}"] = lambda loss=loss, p=p, x=x, y=y: functx.vmap(
            functx.grad(loss), in_dims=dims
        )(p, x, y)
        candidates[f"torch.func.vmap(grad) {n}"] = lambda loss=loss, p=p, x=x, y=y: tf.vmap(
            tf.grad(loss), in_dims=dims
        )(p, x, y)
        tasks.append(n)
    times = compare(candidates, rounds=rounds)
    for n in tasks:
        times["functx.vmap(grad)"], times["torch.func.vmap(grad)"] = (
            times[f"functx.vmap(grad) {n}"],
            times[f"torch.func.vmap(grad) {n}"],
        )
        report(
            f"per-sample gradients, MLP ({n} params), batch 32",
            times,
            "functx.vmap(grad)",
            ["torch.func.vmap(grad)"],
            "<= 1.00x",
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
    report(task, times, "functx.hvp", ["autograd double-backward"], "<= 1.03x")
    report(task, times, "functx.hvp", ["torch.func.jvp(grad)", "torch.func.vjp(grad)"], "<= 1.00x")


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
    report("grad overhead, tiny function", times, "functx.grad", ["torch.func.grad"], "<= 0.68x")
    report(
        "grad overhead, tiny function", times, "functx.grad (dict of 3)", ["torch.func.grad (dict of 3)"], "<= 0.68x"
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


SECTIONS = {
    "overhead": bench_overhead,
    "jacobians": bench_jacobians,
    "hessian": bench_hessian,
    "per_sample_hessians": bench_per_sample_hessians,
    "per_sample_grads": bench_per_sample_grads,
    "hvp": bench_hvp,
    "compiled": bench_compiled,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile / JAX section")
    parser.add_argument("--cpu-clock", action="store_true", help="time thread CPU time (shared machines)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 15, quick: 3)")
    parser.add_argument("--only", nargs="*", default=None, help=f"run only these sections: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    if args.cpu_clock:
        set_clock("thread")
    clock = ", thread CPU time" if args.cpu_clock else ""
    print(f"# functx core benchmarks ({setup_threads()}, float32, CPU{clock})", flush=True)
    for name, section in SECTIONS.items():
        if (args.only is None or name in args.only) and not (name == "compiled" and args.no_compile):
            section(rounds)
    print()
    print(markdown_table(["task", "functx", "time", "anchor", "time", "ratio", "target"], ROWS))


if __name__ == "__main__":
    main()
