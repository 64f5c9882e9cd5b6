"""One rank of the distributed curvature tests (tests/test_curvature_distributed.py).

Run as ``python tests/_dist_worker.py PORT RANK WORLD_SIZE OUT_DIR``: joins the gloo group through
the parent's TCPStore at PORT, runs every check in ``CHECKS`` in order (each is a collective
program: every rank runs the same checks in the same order) and writes one JSON line per check to
``OUT_DIR/rank{RANK}.jsonl``: ``{"check": name, "error": None or the traceback}``. The parent test
reads those lines, so that one process start-up per world size serves every check.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import functx.curvature as fc
from functx._curvature import _distributed as D

API = "functx.curvature.HessianOperator"
CHECKS: dict[str, Callable[[int, int], None]] = {}


def check(fn: Callable[[int, int], None]) -> Callable[[int, int], None]:
    CHECKS[fn.__name__] = fn
    return fn


def rank_input(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rank r's contribution, reproducible on every rank (so each can form the reference sum)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = 10.0 ** torch.randint(-6, 7, shape, generator=gen).to(torch.float64)  # mixed magnitudes
    return (x * scale).to(dtype)


def all_equal_across_ranks(t: torch.Tensor, group=None) -> bool:
    """Bitwise: every rank of ``group`` holds exactly the bits of ``t``."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, t.contiguous(), group=group)
    bits = lambda x: x.view(torch.int64) if x.dtype == torch.float64 else x
    return all(torch.equal(bits(g), bits(t.contiguous())) for g in gathered)


# ----------------------------------------------------------------------------------- the five functions
@check
def resolve_group_kinds(rank: int, world: int) -> None:
    assert D.resolve_group(None, API) is dist.group.WORLD
    assert D.resolve_group(dist.group.WORLD, API) is dist.group.WORLD
    with pytest.raises(TypeError, match=r"^`functx.curvature.HessianOperator`: `group` must be None or a"):
        D.resolve_group("world", API)
    single, _ = dist.new_subgroups(group_size=1)  # collective: every rank gets its own one-member group
    assert D.resolve_group(single, API) is None  # one member: no collective at all
    pair = dist.new_group([0, 1])  # collective; ranks >= 2 get GroupMember.NON_GROUP_MEMBER
    if rank < 2:
        assert D.resolve_group(pair, API) is pair
    else:
        with pytest.raises(ValueError, match=r"this rank is not a member of `group`"):
            D.resolve_group(pair, API)
    dist.barrier()


@check
def all_reduce_sum_float64_exact_and_identical(rank: int, world: int) -> None:
    for size in (1, 7, 1000, 300_000):
        mine = rank_input(1000 * size + rank, (size,))
        total = D.all_reduce_sum(mine.clone(), dist.group.WORLD)
        inputs = [rank_input(1000 * size + r, (size,)) for r in range(world)]
        bound = world * 2.0**-52 * sum(x.abs() for x in inputs)  # summation in any order
        assert ((total - sum(inputs)).abs() <= bound).all()
        assert all_equal_across_ranks(total), f"all_reduce results differ across ranks (size {size})"


@check
def all_reduce_sum_over_a_subgroup(rank: int, world: int) -> None:
    members = [0, world - 1]
    group = dist.new_group(members)  # collective
    if rank in members:
        total = D.all_reduce_sum(rank_input(7 + rank, (5, 3)), D.resolve_group(group, API))
        torch.testing.assert_close(total, sum(rank_input(7 + r, (5, 3)) for r in members), rtol=1e-14, atol=0)
    dist.barrier()


@check
def all_reduce_sum_leaves_inputs_alone(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    base = rank_input(rank, (4, 6))
    noncontiguous = base.t()  # (6, 4), strided
    total = D.all_reduce_sum(noncontiguous, group)
    assert torch.equal(noncontiguous, base.t()), "input modified"
    torch.testing.assert_close(total, sum(rank_input(r, (4, 6)) for r in range(world)).t(), rtol=1e-14, atol=0)
    leaf = rank_input(rank, (3,)).requires_grad_()
    total = D.all_reduce_sum(leaf, group)
    assert leaf.requires_grad and leaf.grad is None and not total.requires_grad
    torch.testing.assert_close(total, sum(rank_input(r, (3,)) for r in range(world)), rtol=1e-14, atol=0)
    for dtype in (torch.float32, torch.int64):
        ints = torch.arange(5, dtype=dtype) * (rank + 1)
        assert torch.equal(D.all_reduce_sum(ints, group), torch.arange(5, dtype=dtype) * (world * (world + 1) // 2))
    empty = D.all_reduce_sum(torch.zeros(0, dtype=torch.float64), group)
    assert empty.shape == (0,)


@check
def all_reduce_sum_checks_the_same_vectors(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    v = rank_input(9, (6, 2))  # the same on every rank
    for dtype in (torch.float64, torch.float32):
        total = D.all_reduce_sum(rank_input(rank, (6, 2), dtype), group, same=v.to(dtype), api=API)
        assert total.dtype == dtype and total.shape == (6, 2)
        reference = sum(rank_input(r, (6, 2), dtype).double() for r in range(world))
        torch.testing.assert_close(total.double(), reference, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=0)
        assert all_equal_across_ranks(total)
    flipped = (v.view(torch.int64) ^ 1).view(torch.float64)  # one last bit
    variants = {
        "last bit": flipped,
        "permuted": v.flip(0),
        "reshaped": v.reshape(2, 6),
        "other dtype": v.float(),
        "negative zero": torch.where(torch.arange(12).view(6, 2) == 0, torch.tensor(-0.0, dtype=torch.float64), v),
    }
    v = torch.where(torch.arange(12).view(6, 2) == 0, torch.tensor(0.0, dtype=torch.float64), v)
    D.all_reduce_sum(torch.zeros(3), group, same=v, api=API)  # equal: no error
    for what, other in variants.items():
        with pytest.raises(ValueError, match=r"^`functx.curvature.HessianOperator`: the vectors multiplied differ"):
            D.all_reduce_sum(torch.zeros(3), group, same=other if rank == world - 1 else v, api=API)
            raise AssertionError(f"no error for {what}")


@check
def empty_shard_contributes_zero(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    last = rank == world - 1  # this rank has no data: it still takes part, with zeros
    mine = torch.zeros(11, dtype=torch.float64) if last else rank_input(50 + rank, (11,))
    total = D.all_reduce_sum(mine, group)
    torch.testing.assert_close(total, sum(rank_input(50 + r, (11,)) for r in range(world - 1)), rtol=1e-14, atol=0)
    assert D.global_count(0 if last else 10 * (rank + 1), group) == 10 * sum(range(1, world))


@check
def global_count_sums(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    count = D.global_count(3 * rank + 1, group)
    assert isinstance(count, int) and count == sum(3 * r + 1 for r in range(world))
    assert D.global_count(2**40 + rank, group) == world * 2**40 + sum(range(world))  # no int32/float rounding


@check
def any_rank_and_flagged_ranks(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    assert D.any_rank(rank == world - 1, group) is True
    assert D.any_rank(False, group) is False
    assert D.any_rank(True, group) is True
    assert D.flagged_ranks(rank == world - 1, group) == [world - 1]
    assert D.flagged_ranks(rank % 2 == 0, group) == list(range(0, world, 2))
    assert D.flagged_ranks(False, group) == []


@check
def on_every_rank_shares_a_local_failure(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    assert D.on_every_rank(lambda: rank * 10, group, API, "counting") == rank * 10

    def count() -> int:
        if rank == world - 1:
            raise TypeError("batch 3 of `data` is not a pair")
        return 1

    if rank == world - 1:
        with pytest.raises(TypeError, match=r"^batch 3 of `data` is not a pair$"):
            D.on_every_rank(count, group, API, "counting the samples of `data`")
    else:
        message = rf"^`{API}`: counting the samples of `data` failed on rank\(s\) \[{world - 1}\] of the process"
        with pytest.raises(ValueError, match=message):
            D.on_every_rank(count, group, API, "counting the samples of `data`")
    assert D.global_count(1, group) == world  # the ranks are still in step


@check
def same_signature_passes(rank: int, world: int) -> None:
    signature = [("layer.weight", (3, 4), torch.float64), ("layer.bias", (3,), torch.float64)]
    D.check_same_across_ranks(signature, D.resolve_group(None, API), API)
    D.check_same_across_ranks([], D.resolve_group(None, API), API)


@check
def signature_mismatch_raises_on_every_rank(rank: int, world: int) -> None:
    group = D.resolve_group(None, API)
    base = [("layer.weight", (3, 4), torch.float64), ("layer.bias", (3,), torch.float64)]
    last = world - 1
    others = ", ".join(map(str, range(world - 1)))
    plural = "s" if world > 2 else ""
    cases = [  # (what the last rank holds, the message every rank must raise)
        (
            [base[0], ("layer.bias", (4,), torch.float64)],
            rf"Parameter entry 1: rank{plural} {others}: layer.bias with shape \(3,\) and dtype torch.float64; "
            rf"rank {last}: layer.bias with shape \(4,\)",
        ),
        ([base[0], ("layer.bias", (3,), torch.float32)], r"Parameter entry 1: .*rank \d: layer.bias .*float32"),
        ([base[1], base[0]], r"Parameter entry 0: .*layer.weight.*layer.bias"),
        ([*base, ("extra", (1,), torch.float64)], r"Parameter entry 2: .*no such entry \(only 2 parameters\).*extra"),
        (base[:1], r"Parameter entry 1: .*layer.bias.*no such entry \(only 1 parameters\)"),
    ]
    for theirs, message in cases:
        signature = theirs if rank == last else base
        with pytest.raises(ValueError, match=message) as info:
            D.check_same_across_ranks(signature, group, API)
        assert str(info.value).startswith(f"`{API}`: the parameters differ across the ranks"), str(info.value)


# ----------------------------------------------------------------------------------- the operators
SIZES = [5, 5, 5, 5, 5, 5, 3]  # 7 batches, the last one short
_SINGLE: list = []  # this rank's one-member group: operators over it run as one process


def single_group():
    if not _SINGLE:
        _SINGLE.append(dist.new_subgroups(group_size=1)[0])  # collective, done once on every rank
    return _SINGLE[0]


def mlp(hidden: int = 4, dtype: torch.dtype = torch.float64, dropout: bool = False) -> torch.nn.Module:
    """A small tanh MLP; with ``dropout`` its Dropout layer is in training mode (nondeterministic)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(hidden, 2)]
    return torch.nn.Sequential(*layers).to(dtype).train(dropout)


def all_batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(sum(SIZES), 3, generator=gen, dtype=torch.float64)
    y = (
        torch.randint(0, 2, (sum(SIZES),), generator=gen)
        if kind == "ce"
        else torch.randn(sum(SIZES), 2, generator=gen, dtype=torch.float64)
    )
    return list(zip(X.split(SIZES), y.split(SIZES)))


def uneven_shard(batches: list, rank: int, world: int) -> list:
    """The last rank holds only the short last batch; rank 0 holds the most batches."""
    if rank == world - 1:
        return batches[-1:]
    rest = batches[:-1]
    first = len(rest) - 2 * (world - 2)  # rank 0: 6 (world 2) or 4 (world 3) batches; others 2
    return rest[:first] if rank == 0 else rest[first + 2 * (rank - 1) : first + 2 * rank]


LOSSES = {
    "ce-mean": (lambda: torch.nn.CrossEntropyLoss(), "ce"),
    "ce-sum": (lambda: torch.nn.CrossEntropyLoss(reduction="sum"), "ce"),
    "mse-mean": (lambda: torch.nn.MSELoss(), "mse"),
}


def operator_pair(fc, name: str, loss_key: str, shard: list, **kwargs):
    """(distributed operator over ``shard``, one-process operator over all the data)."""
    make_loss, kind = LOSSES[loss_key]
    model = mlp()
    params = dict(model.named_parameters())
    cls = getattr(fc, name)
    return (
        cls(model, make_loss(), params, shard, **kwargs),
        cls(model, make_loss(), params, all_batches(kind), group=single_group()),
    )


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max().clamp(min=1.0)))


@check
def products_match_one_process_on_all_data(rank: int, world: int) -> None:
    for loss_key, (_, kind) in LOSSES.items():
        shard = uneven_shard(all_batches(kind), rank, world)
        for name in ("HessianOperator", "GGNOperator", "EFOperator"):
            A, reference = operator_pair(fc, name, loss_key, shard)
            assert A.num_data == reference.num_data == sum(SIZES)
            gen = torch.Generator().manual_seed(3)  # the same v on every rank
            v = torch.randn(A.shape[0], generator=gen, dtype=torch.float64)
            V = torch.randn(A.shape[0], 4, generator=gen, dtype=torch.float64)
            for x in (v, V):
                result = A @ x
                close(result, reference @ x)
                assert all_equal_across_ranks(result), f"{name} {loss_key}: products differ across ranks"
            tree = A @ A.unflatten(v)
            close(A.flatten(tree), reference @ v)


@check
def hessian_equals_dense_autograd_reference(rank: int, world: int) -> None:
    batches = all_batches("ce")
    model = mlp()
    params = dict(model.named_parameters())
    H = fc.HessianOperator(model, torch.nn.CrossEntropyLoss(), params, uneven_shard(batches, rank, world))
    X = torch.cat([x for x, _ in batches])
    y = torch.cat([t for _, t in batches])
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        pieces = [c.view(s) for c, s in zip(theta.split([s.numel() for s in shapes]), shapes)]
        out = torch.func.functional_call(model, dict(zip(names, pieces)), (X,))
        return torch.nn.functional.cross_entropy(out, y)

    close(H.to_dense(), torch.autograd.functional.hessian(loss, flat))


@check
def one_collective_per_product(rank: int, world: int) -> None:
    shard = uneven_shard(all_batches("ce"), rank, world)
    calls = []
    inner = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    for name in ("HessianOperator", "GGNOperator", "EFOperator"):
        A, _ = operator_pair(fc, name, "ce-mean", shard, check_deterministic=False)
        dist.all_reduce = counting
        try:
            for x in (torch.ones(A.shape[0], dtype=torch.float64), torch.ones(A.shape[0], 5, dtype=torch.float64)):
                calls.clear()
                A @ x
                assert len(calls) == 1, f"{name}: {len(calls)} all_reduce calls for one product"
        finally:
            dist.all_reduce = inner


@check
def estimators_match_one_process(rank: int, world: int) -> None:
    shard = uneven_shard(all_batches("ce"), rank, world)
    H, reference = operator_pair(fc, "HessianOperator", "ce-mean", shard)
    values, vectors = fc.eigsh(H, k=3, seed=0)
    ref_values, ref_vectors = fc.eigsh(reference, k=3, seed=0)
    close(values, ref_values)
    close((vectors.T @ ref_vectors).abs(), torch.eye(3, dtype=torch.float64))  # same vectors up to sign
    dense = torch.linalg.eigvalsh(reference.to_dense())[-3:]
    torch.testing.assert_close(values, dense, rtol=1e-8, atol=1e-10)
    assert all_equal_across_ranks(values) and all_equal_across_ranks(vectors)
    for method in ("hutch++", "hutchinson", "xtrace"):
        estimate = fc.trace(H, num_matvecs=9, method=method, seed=0)
        close(estimate, fc.trace(reference, num_matvecs=9, method=method, seed=0))
        assert all_equal_across_ranks(estimate.reshape(1))
    close(fc.diagonal(H, num_matvecs=6, seed=0), fc.diagonal(reference, num_matvecs=6, seed=0))
    grid, density = fc.spectral_density(H, num_probes=2, num_steps=6, seed=0)
    ref_grid, ref_density = fc.spectral_density(reference, num_probes=2, num_steps=6, seed=0)
    close(grid, ref_grid)
    close(density, ref_density)


@check
def a_v_that_differs_across_ranks_raises_on_every_rank(rank: int, world: int) -> None:
    H, _ = operator_pair(fc, "HessianOperator", "ce-mean", uneven_shard(all_batches("ce"), rank, world))
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(rank))  # per-rank seed
    with pytest.raises(ValueError, match=r"^`functx.curvature.HessianOperator`: the vectors multiplied differ"):
        H @ v


@check
def a_bad_batch_on_one_rank_raises_on_every_rank(rank: int, world: int) -> None:
    shard = uneven_shard(all_batches("ce"), rank, world)
    last = rank == world - 1
    if last:
        shard = [*shard, shard[0][0]]  # X alone, not an (X, y) pair
    message = (
        r"batch 1 of `data` must be a pair" if last else rf"failed on rank\(s\) \[{world - 1}\] of the process group"
    )
    model = mlp()
    with pytest.raises(ValueError, match=message):
        fc.HessianOperator(model, torch.nn.CrossEntropyLoss(), dict(model.named_parameters()), shard)
    assert D.global_count(1, D.resolve_group(None, API)) == world  # the ranks are still in step


@check
def a_non_finite_batch_on_one_rank_raises_on_every_rank(rank: int, world: int) -> None:
    shard = uneven_shard(all_batches("ce"), rank, world)
    last = rank == world - 1
    if last:
        X, y = shard[0]
        shard = [(X, y), (torch.full_like(X, float("nan")), y)]
    message = (
        r"batch 1 of `data` must hold finite values, got a nan or inf in X"
        if last
        else rf"failed on rank\(s\) \[{world - 1}\] of the process group"
    )
    model = mlp()
    with pytest.raises(ValueError, match=message):
        fc.GGNOperator(model, torch.nn.CrossEntropyLoss(), dict(model.named_parameters()), shard)
    assert D.global_count(1, D.resolve_group(None, API)) == world  # the ranks are still in step


@check
def products_are_differentiable_in_v(rank: int, world: int) -> None:
    H, reference = operator_pair(fc, "HessianOperator", "ce-mean", uneven_shard(all_batches("ce"), rank, world))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    close(torch.func.grad(lambda v: v @ (H @ v))(v), 2 * (reference @ v))  # one collective per product
    close(torch.func.vmap(lambda v: H @ v)(torch.stack([v, 2 * v])), torch.stack([reference @ v, reference @ (2 * v)]))


@check
def empty_shard_takes_part(rank: int, world: int) -> None:
    batches = all_batches("ce")
    shard = [] if rank == world - 1 else batches[rank :: world - 1]  # the last rank has no data
    for name in ("HessianOperator", "GGNOperator", "EFOperator"):
        A, reference = operator_pair(fc, name, "ce-mean", shard)
        assert A.num_data == sum(SIZES)
        v = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        close(A @ v, reference @ v)


@check
def nondeterminism_on_one_rank_raises_on_every_rank(rank: int, world: int) -> None:
    model = mlp(dropout=rank == 1)  # train-mode dropout on rank 1 only
    shard = uneven_shard(all_batches("ce"), rank, world)
    for name in ("HessianOperator", "GGNOperator", "EFOperator"):
        with pytest.raises(ValueError, match=r"^`functx.curvature.\w+Operator`: two passes over `data`"):
            getattr(fc, name)(model, torch.nn.CrossEntropyLoss(), dict(model.named_parameters()), shard)


@check
def parameter_shapes_or_dtypes_differ_raise_on_every_rank(rank: int, world: int) -> None:
    shard = uneven_shard(all_batches("ce"), rank, world)
    last = rank == world - 1
    for model, what in (
        (mlp(hidden=5 if last else 4), r"shape"),
        (mlp(dtype=torch.float32 if last else torch.float64), r"float32"),
    ):
        shard_here = [(x.to(next(model.parameters()).dtype), t) for x, t in shard]
        with pytest.raises(ValueError, match=rf"the parameters differ across the ranks.*Parameter entry 0: .*{what}"):
            fc.HessianOperator(model, torch.nn.CrossEntropyLoss(), dict(model.named_parameters()), shard_here)


@check
def group_argument_selects_the_ranks(rank: int, world: int) -> None:
    members = [0, world - 1]
    group = dist.new_group(members)  # collective
    batches = all_batches("ce")
    if rank in members:
        shards = {0: batches[:2], world - 1: batches[2:3]}
        model = mlp()
        params = dict(model.named_parameters())
        H = fc.HessianOperator(model, torch.nn.CrossEntropyLoss(), params, shards[rank], group=group)
        reference = fc.HessianOperator(model, torch.nn.CrossEntropyLoss(), params, batches[:3], group=single_group())
        assert H.num_data == sum(SIZES[:3])
        v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        close(H @ v, reference @ v)
    dist.barrier()
    with pytest.raises(TypeError, match=r"`group` must be None or a torch.distributed.ProcessGroup"):
        fc.HessianOperator(mlp(), torch.nn.CrossEntropyLoss(), dict(mlp().named_parameters()), batches, group=0)


@check
def influence_matches_one_process(rank: int, world: int) -> None:
    """fc.influence: each rank scores its uneven shard; the gathered scores equal one process's."""
    batches = all_batches("ce")
    shard = uneven_shard(batches, rank, world)
    model = mlp()
    params = dict(model.named_parameters())
    loss = torch.nn.CrossEntropyLoss()
    G = fc.GGNOperator(model, loss, params, shard)  # products all-reduce: used as the "inverse" operator
    reference_G = fc.GGNOperator(model, loss, params, batches, group=single_group())
    queries = batches[:2]  # the same on every rank
    scores = fc.influence(model, loss, params, shard, queries, G)
    reference = fc.influence(model, loss, params, batches, queries, reference_G, group=single_group())
    assert scores.shape == (sum(SIZES[:2]), sum(SIZES))
    close(scores, reference)
    assert all_equal_across_ranks(scores)
    inverse = torch.linalg.inv(reference_G.to_dense() + 0.1 * torch.eye(G.shape[0], dtype=torch.float64))
    own = fc.influence(model, loss, params, shard, None, inverse, self_influence=True)
    close(own, fc.influence(model, loss, params, batches, None, inverse, self_influence=True, group=single_group()))


def main() -> None:
    port, rank, world, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    warnings.simplefilter("error")
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    with open(os.path.join(out, f"rank{rank}.jsonl"), "w") as log:
        for name, fn in CHECKS.items():
            torch.manual_seed(0)
            try:
                fn(rank, world)
                error = None
            except BaseException:  # reported to the parent, which fails the test
                error = traceback.format_exc()
            log.write(json.dumps({"check": name, "error": error}) + "\n")
            log.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
