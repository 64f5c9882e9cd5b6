"""The one place where the curvature room talks to ``torch.distributed``.

Every operator of :mod:`functx.curvature` goes through these functions and nothing else:

* :func:`resolve_group` once at construction (``None`` means "one process": every other
  function is then the identity and no collective runs);
* :func:`all_reduce_sum` once per product (``H @ v`` or a matrix product), on one flat buffer;
* :func:`global_count` once at construction (the global number of samples ``N``);
* :func:`any_rank` (or :func:`flagged_ranks`, which also says which ranks) for checks that must
  raise on every rank together (determinism, an empty dataset), and :func:`on_every_rank` for
  local work that may raise (counting a shard);
* :func:`check_same_across_ranks` once at construction (parameter names, shapes, dtypes).

Semantics under ``torch.distributed`` (any backend):

* every function here but :func:`resolve_group` is a collective: every rank of the group calls
  it, in the same order, or the ranks that did call it wait until the group's timeout
  (``init_process_group(timeout=)``; under torchrun, a rank that exits with an error gets the
  others stopped);
  so a check that fails on one rank is first agreed on with :func:`any_rank`, then every rank
  raises the same error;
* sums are bitwise identical on every rank: gloo and nccl compute each entry of an all-reduce
  once and copy it to the other ranks (ring reduce-scatter + all-gather, or reduce + broadcast),
  the property ``DistributedDataParallel`` relies on to keep replicas in sync; the tests check it
  for gloo;
* devices: each backend reduces tensors of the device types it supports; a tensor on another
  device is copied to one it supports and the sum copied back (nccl: the group's bound device,
  else ``torch.cuda.current_device()``, so call ``torch.cuda.set_device(local_rank)`` first, as
  for any nccl program; gloo: CUDA tensors go through host memory, as gloo's CUDA support depends
  on how torch was built). The copy costs one vector per product, nothing next to the data pass.

Without ``torch.distributed`` initialised, nothing but ``torch.distributed.is_available()`` and
``torch.distributed.is_initialized()`` is touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
Signature = list[tuple[str, tuple[int, ...], torch.dtype]]


def resolve_group(group: Any, api: str) -> Any:
    """The process group products reduce over, or ``None`` when running as one process.

    Args:
        group: ``None`` (the default world group when ``torch.distributed`` is initialised) or a
            ``torch.distributed.ProcessGroup`` this rank belongs to.
        api: the public API name used in error messages.

    Returns:
        The group, or ``None`` when ``torch.distributed`` is not available or not initialised,
        or when the group has a single member (no collective is then needed).

    Raises:
        TypeError: ``group`` is not a ``ProcessGroup``.
        ValueError: ``group`` is given while ``torch.distributed`` is not initialised, or this
            rank is not a member of ``group``.

    Example:
        >>> resolve_group(None, "functx.curvature.HessianOperator") is None  # one process
        True
    """
    if not _initialised():
        if group is not None:
            raise ValueError(
                f"`{api}`: `group` was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun does not call it for you), "
                "or leave group=None to run as one process."
            )
        return None
    dist = torch.distributed
    if group is None:
        group = dist.group.WORLD
    elif isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"`{api}`: this rank is not a member of `group` (torch.distributed.new_group returned "
            "GroupMember.NON_GROUP_MEMBER here); build the operator only on the ranks of the group."
        )
    elif not isinstance(group, dist.ProcessGroup):
        hint = " (for a DeviceMesh pass mesh.get_group())" if type(group).__name__ == "DeviceMesh" else ""
        raise TypeError(
            f"`{api}`: `group` must be None or a torch.distributed.ProcessGroup{hint}, got {type(group).__name__}."
        )
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"`{api}`: this rank (global rank {dist.get_rank()}) is not a member of `group`; "
            "build the operator only on the ranks of the group."
        )
    return None if dist.get_world_size(group) == 1 else group


def all_reduce_sum(
    tensor: torch.Tensor, group: Any, *, same: torch.Tensor | None = None, api: str = ""
) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` with one collective.

    The sum is bitwise identical on every rank. It may be computed in place: use the returned
    tensor (a new one when ``tensor`` had to be copied: non-contiguous, requiring grad, or on a
    device the backend does not reduce).

    With ``same`` (the vectors the product was applied to), the same collective also checks that
    every rank multiplied bitwise the same ``same``: two extra entries carry a 20-bit digest and
    its square, which sum to ``W m`` and ``W m^2`` exactly when all ``W`` digests equal ``m``; the
    sum is then taken in float64 and every rank raises the same ``ValueError`` on a mismatch (a
    ``v`` drawn without a seed, products issued in different orders, ranks whose estimator states
    drifted apart), instead of returning the meaningless ``sum_r A_r v_r``. (For floating-point
    ``tensor``; the digest sums stay exact in float64 up to 8192 ranks.)

    Args:
        tensor: this rank's contribution (any shape and dtype the backend supports).
        group: a group from :func:`resolve_group`; ``None`` returns ``tensor`` unchanged.
        same: a tensor that must be the same on every rank. (default: ``None``, no check)
        api: the public API name used in the mismatch error. (default: ``""``)

    Returns:
        The sum over the ranks, same shape, dtype and device as ``tensor``.

    Raises:
        ValueError: on every rank, when ``same`` differs across the ranks.

    Example:
        >>> t = torch.tensor([1.0, 2.0])
        >>> all_reduce_sum(t, None) is t  # one process: the tensor itself
        True
    """
    if group is None:
        return tensor
    if same is None:
        return _all_reduce(tensor, group, torch.distributed.ReduceOp.SUM)
    code = _digest(same)
    tail = torch.tensor([code, code * code], dtype=torch.float64, device=tensor.device)
    buffer = torch.cat([tensor.detach().reshape(-1).to(torch.float64), tail])
    total = _all_reduce(buffer, group, torch.distributed.ReduceOp.SUM)
    first, second = (int(x) for x in total[-2:].tolist())
    if torch.distributed.get_world_size(group) * second != first * first:
        raise ValueError(
            f"`{api}`: the vectors multiplied differ across the ranks of the process group. Under "
            "torch.distributed every rank must apply the operator to the same `v`, in the same order: draw it "
            "from a generator seeded alike on every rank (or broadcast it from rank 0), apply the operator from "
            "one thread per rank, and keep the ranks' arithmetic identical (same threads, deterministic kernels)."
        )
    return total[:-2].view(tensor.shape).to(tensor.dtype)


def global_count(count: int, group: Any) -> int:
    """Sum a per-rank sample count over the ranks of ``group`` (a rank may count 0).

    Example:
        >>> global_count(5, None)
        5
    """
    if group is None:
        return count
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.int64), group).item())


def any_rank(flag: bool, group: Any) -> bool:
    """Whether ``flag`` is true on any rank of ``group`` (every rank gets the same answer).

    Example:
        >>> any_rank(False, None)
        False
    """
    return bool(flagged_ranks(flag, group))


def flagged_ranks(flag: bool, group: Any) -> list[int]:
    """The global ranks of ``group`` where ``flag`` is true, the same list on every rank.

    One collective, like :func:`any_rank`; use it when an error message should name the ranks.
    With ``group=None`` (one process) the answer is ``[0]`` or ``[]``.

    Example:
        >>> flagged_ranks(True, None)
        [0]
    """
    if group is None:
        return [0] if flag else []
    dist = torch.distributed
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
    flags[dist.get_rank(group)] = int(bool(flag))
    flags = all_reduce_sum(flags, group)
    ranks = dist.get_process_group_ranks(group)
    return [ranks[i] for i in flags.nonzero().flatten().tolist()]


def on_every_rank(fn: Callable[[], T], group: Any, api: str, what: str) -> T:
    """``fn()`` on this rank, with its failure shared: when it raises on any rank, every rank raises.

    A rank where ``fn`` raised re-raises its own exception; the others raise a ``ValueError``
    naming the failed ranks. One collective (:func:`flagged_ranks`), so a local check on this
    rank's shard (an unpackable batch, a wrong batch size) cannot leave the other ranks waiting
    in the next collective.

    Args:
        fn: the local work, e.g. counting this rank's samples.
        group: a group from :func:`resolve_group`; ``None`` just calls ``fn``.
        api: the public API name used in the error.
        what: what ``fn`` does, for the error ("counting the samples of `data`").

    Example:
        >>> on_every_rank(lambda: 3, None, "functx.curvature.HessianOperator", "counting")
        3
    """
    if group is None:
        return fn()
    try:
        result, error = fn(), None
    except Exception as caught:  # shared with the other ranks, then re-raised below
        result, error = None, caught
    failed = flagged_ranks(error is not None, group)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"`{api}`: {what} failed on rank(s) {failed} of the process group (see their error).")
    return result  # type: ignore[return-value]


def check_same_across_ranks(signature: Signature, group: Any, api: str) -> None:
    """Raise the same ``ValueError`` on every rank when ranks disagree on ``signature``.

    ``signature`` lists the parameters as ``(name, shape, dtype)``. One collective (a digest
    all-reduced as max and -min); only when the digests differ are the signatures gathered, on
    every rank, to name the first entry that differs and the ranks holding each variant.

    Example:
        >>> check_same_across_ranks([("w", (3, 4), torch.float64)], None, "functx.curvature.HessianOperator")
    """
    if group is None:
        return
    portable = [(str(name), tuple(int(n) for n in shape), str(dtype)) for name, shape, dtype in signature]
    digest = int.from_bytes(hashlib.blake2b(repr(portable).encode(), digest_size=7).digest(), "big")
    extremes = _all_reduce(torch.tensor([digest, -digest], dtype=torch.int64), group, torch.distributed.ReduceOp.MAX)
    if int(extremes[0]) == -int(extremes[1]):
        return
    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, portable, group=group)
    raise ValueError(_mismatch_message(gathered, torch.distributed.get_process_group_ranks(group), api))


_MOD = 2**31 - 1  # a prime: the digest's arithmetic stays exact in int64


def _digest(tensor: torch.Tensor) -> int:
    """A 20-bit digest of the bits, shape and dtype of ``tensor`` (exact integer arithmetic, so
    equal on any device for equal bits). Position weights make permutations count."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
    bits = flat.view(width).to(torch.int64).remainder(_MOD)  # in [0, 2**31)
    weights = torch.arange(bits.numel(), device=bits.device).remainder(65521).add(1)  # in [1, 2**16)
    total = int(bits.mul(weights).remainder(_MOD).sum())  # < numel * 2**31: exact below 2**32 entries
    text = f"{total}|{tuple(tensor.shape)}|{tensor.dtype}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=3).digest(), "big") >> 4


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mismatch_message(signatures: list[Any], ranks: list[int], api: str) -> str:
    """Name the first parameter entry where the ranks' signatures differ, and who holds what."""
    index = next(
        i
        for i in range(max(len(s) for s in signatures) + 1)
        if len({repr(s[i]) if i < len(s) else None for s in signatures}) > 1
    )
    variants: dict[str, list[int]] = {}
    for rank, sig in zip(ranks, signatures):
        if index < len(sig):
            name, shape, dtype = sig[index]
            what = f"{name} with shape {shape} and dtype {dtype}"
        else:
            what = f"no such entry (only {len(sig)} parameters)"
        variants.setdefault(what, []).append(rank)
    held = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {w}" for w, r in variants.items())
    return (
        f"`{api}`: the parameters differ across the ranks of the process group; every rank must pass "
        f"the same `params` (names, shapes and dtypes, in the same order). Parameter entry {index}: {held}."
    )


def _all_reduce(tensor: torch.Tensor, group: Any, op: Any) -> torch.Tensor:
    """One all-reduce, on a device the group's backend handles, the result on ``tensor``'s device."""
    device = _reduce_device(tensor.device, group)
    if device == tensor.device and tensor.is_contiguous() and not tensor.requires_grad:
        buffer = tensor
    else:
        buffer = tensor.detach().to(device, copy=True, memory_format=torch.contiguous_format)
    torch.distributed.all_reduce(buffer, op=op, group=group)
    return buffer if buffer.device == tensor.device else buffer.to(tensor.device)


def _reduce_device(device: torch.device, group: Any) -> torch.device:
    """Where the group's backend reduces a tensor that lives on ``device``."""
    backend = str(torch.distributed.get_backend(group)).lower()
    per_type = dict(pair.split(":", 1) for pair in backend.split(",")) if ":" in backend else None
    name = per_type.get(device.type) if per_type is not None else backend
    if name is None:  # e.g. "cuda:nccl" alone and a CPU tensor
        name = next(iter(per_type.values())) if per_type else backend
    if name == "nccl":
        return _nccl_device(device, group)
    if name == "gloo" and device.type != "cpu":
        return torch.device("cpu")
    return device


def _nccl_device(device: torch.device, group: Any) -> torch.device:
    bound = getattr(group, "bound_device_id", None)
    if bound is not None:
        return torch.device(bound)
    if device.type == "cuda" and device.index == torch.cuda.current_device():
        return device
    return torch.device("cuda", torch.cuda.current_device())
