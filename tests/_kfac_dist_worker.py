"""One rank of the distributed KFAC/EKFAC test (tests/test_curvature_kfac.py).

Run as ``python tests/_kfac_dist_worker.py PORT RANK WORLD_SIZE``: joins the gloo group through the
parent's TCPStore, builds KFAC and EKFAC on this rank's (uneven) shard, compares them with the
operators of one process on the whole data (built on a one-member group: no collective), counts
the floating-point all-reduces of the construction (one for KFAC, two for EKFAC) and of the
products (none), and exits 0 when every check passed.
"""

from __future__ import annotations

import itertools
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import functx.curvature as fc


def main() -> None:
    port, rank, world = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    single, _ = dist.new_subgroups(group_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    X, y = torch.randn(23, 4, dtype=torch.float64), torch.randint(0, 3, (23,))
    cuts = [0, 3, 11, 23] if world == 2 else [0, 2, 9, 14, 23]
    batches = [(X[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]
    shard = batches[rank::world] if world == 2 else batches[rank : rank + 1] + batches[3:] * (rank == 2)
    params = dict(model.named_parameters())
    loss = torch.nn.CrossEntropyLoss()
    counted = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted.append(tensor.dtype)
        return original(tensor, *args, **kwargs)

    for cls, collectives in ((fc.KFACOperator, 1), (fc.EKFACOperator, 2)):
        for fisher in ("type-2", "empirical"):
            reference = cls(model, loss, params, batches, fisher=fisher, joint_bias=True, group=single).to_dense()
            counted.clear()
            dist.all_reduce = counting
            try:
                op = cls(model, loss, params, shard, fisher=fisher, joint_bias=True, num_data=23)
                floats = sum(dtype.is_floating_point for dtype in counted)
                counted.clear()
                dense = op.to_dense()
                after = len(counted)
            finally:
                dist.all_reduce = original
            assert floats == collectives, (cls.__name__, fisher, floats)
            assert after == 0, (cls.__name__, fisher, after)
            torch.testing.assert_close(dense, reference, rtol=1e-10, atol=1e-12)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
