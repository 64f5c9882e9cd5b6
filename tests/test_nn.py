"""functx.nn: conversion, the model zoo, state, modes, purity, threads, selection, errors.

References are independent: the real module (a deepcopy loaded with the same tensors)
called directly, in float64. Compositions with the transforms are in test_nn_compose.py.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import sys
import threading
import warnings

import pytest
import torch
from helpers import assert_tree_allclose
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import functx
import functx.nn as fnn
from functx import _torch_internals

D = torch.float64


# ---------------------------------------------------------------------------------------
# Snapshots: "the module is untouched" and "the caller's tensors are untouched".


def snapshot(module: nn.Module, aliases: bool = True) -> dict:
    """Everything a call must leave as it was (``aliases=False`` for reference cycles)."""
    return {
        "aliases": aliases,
        "params": [
            (n, p, p.detach().clone(), p.requires_grad, p.grad, None if p.grad is None else p.grad.clone())
            for n, p in module.named_parameters(remove_duplicate=not aliases)
        ],
        "buffers": [(n, b, b.clone()) for n, b in module.named_buffers(remove_duplicate=not aliases)],
        "modules": [
            (
                n,
                m,
                type(m),
                m.training,
                {k: id(v) for k, v in m.__dict__.items()},
                [id(w) for w in m.__dict__.get("_flat_weights", [])],
            )
            for n, m in module.named_modules()
        ],
    }


def assert_untouched(module: nn.Module, snap: dict) -> None:
    now = snapshot(module, snap["aliases"])
    assert [e[0] for e in now["params"]] == [e[0] for e in snap["params"]]
    for (n, p, value, rg, g, gvalue), (_, p2, _, rg2, g2, _) in zip(snap["params"], now["params"]):
        assert p2 is p and isinstance(p2, nn.Parameter), n
        assert torch.equal(p2.detach(), value), n
        assert rg2 == rg and g2 is g, n
        assert g is None or torch.equal(g, gvalue), n
    assert [e[0] for e in now["buffers"]] == [e[0] for e in snap["buffers"]]
    for (n, b, value), (_, b2, _) in zip(snap["buffers"], now["buffers"]):
        assert b2 is b and torch.equal(b2, value), n
    for before, after in zip(snap["modules"], now["modules"]):
        assert before[1] is after[1] and before[2] is after[2] and before[3] == after[3], before[0]
        assert before[4] == after[4], f"{before[0]!r}: attributes reassigned"
        assert before[5] == after[5], f"{before[0]!r}: _flat_weights changed"


def tensors_snapshot(tree: dict) -> dict:
    return {k: (v, v.clone()) for k, v in tree.items()}


def assert_tensors_untouched(tree: dict, snap: dict) -> None:
    assert list(tree) == list(snap)
    for k, (t, value) in snap.items():
        assert tree[k] is t and torch.equal(t, value), k


def perturbed(tree: dict, scale: float = 0.1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, dtype=v.dtype, generator=g) if v.is_floating_point() else v.clone()
        for k, v in tree.items()
    }


def reference(module: nn.Module, params: dict, buffers: dict, training: bool | None = None) -> nn.Module:
    """A deepcopy of ``module`` holding ``params`` and ``buffers`` (written with copy_)."""
    ref = copy.deepcopy(module)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(params[n])
        for n, b in ref.named_buffers():
            b.copy_(buffers[n])
    if training is not None:
        ref.train(training)
    return ref


# ---------------------------------------------------------------------------------------
# The zoo.


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.decoder = nn.Linear(6, 10, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.embed(tokens)))


class Symmetric(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu() + X.triu(1).transpose(-1, -2)


def parametrized_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    parametrize.register_parametrization(net[0], "weight", Symmetric())
    parametrizations.orthogonal(net[2])
    return net.to(D)


def hooked_linear() -> nn.Module:
    lin = nn.Linear(4, 3).to(D)
    lin.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    lin.register_forward_hook(lambda m, args, out: out + 2 * m.bias)  # reads the *called* module
    return lin


class WithKwargs(nn.Module):
    """A forward whose keyword names collide with anything an API might want to steal."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, *, training=1.0, params=0.0, buffers=0.0):
        return self.lin(x) * training + params + buffers


ZOO = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), (5, 4)),
    "cnn_bn_eval": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).eval(),
        (5, 2, 6, 6),
    ),
    "lstm": (lambda: nn.LSTM(3, 4, num_layers=2, batch_first=True), (2, 5, 3)),
    "gru": (lambda: nn.GRU(3, 4, bidirectional=True), (5, 2, 3)),
    "transformer": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), (2, 5, 8)),
    "transformer_eval": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval(), (2, 5, 8)),
    "tied": (TiedLM, None),
    "parametrized": (parametrized_net, (3, 4)),
    "hooked": (hooked_linear, (3, 4)),
}


def zoo_input(name: str, shape) -> torch.Tensor:
    if name == "tied":
        return torch.randint(0, 10, (3, 4))
    return torch.randn(shape, dtype=D)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_module(name):
    build, shape = ZOO[name]
    module = build().to(D)
    x = zoo_input(name, shape)
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)
    assert_tree_allclose(fmodel(params, buffers, x), module(x), rtol=1e-12, atol=1e-12)
    new = perturbed(params)
    assert_tree_allclose(fmodel(new, buffers, x), reference(module, new, buffers)(x), rtol=1e-12, atol=1e-12)
    assert_untouched(module, snap)


def test_params_are_detached_views_and_tied_once():
    model = TiedLM().to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    assert list(params) == ["embed.weight"] == list(fmodel.param_names)
    w = params["embed.weight"]
    assert type(w) is torch.Tensor and not w.requires_grad
    assert w.data_ptr() == model.embed.weight.data_ptr()
    assert buffers == {} and fmodel.buffer_names == ()
    assert "FunctionalModule(TiedLM, params=1, buffers=0" in repr(fmodel)


def test_plain_autograd_grads_land_on_the_given_leaves():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    snap = snapshot(model)
    fmodel, params, buffers = fnn.make_functional(model)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    x = torch.randn(5, 3, dtype=D)
    fmodel(leaves, buffers, x).sum().backward()
    ref = copy.deepcopy(model)
    ref(x).sum().backward()
    assert_tree_allclose({k: v.grad for k, v in leaves.items()}, {k: p.grad for k, p in ref.named_parameters()})
    assert all(p.grad is None for p in model.parameters())
    assert_untouched(model, snap)


def test_tied_aliases_and_conflicts():
    model = TiedLM().to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    x = zoo_input("tied", None)
    new = perturbed(params)["embed.weight"]
    expected = reference(model, {"embed.weight": new}, {})(x)
    # any alias names the group; the same tensor under both names is accepted
    for given in ({"decoder.weight": new}, {"embed.weight": new, "decoder.weight": new}):
        assert_tree_allclose(fmodel(given, buffers, x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="tied"):
        fmodel({"embed.weight": new, "decoder.weight": new.clone()}, buffers, x)


def test_shared_submodule_is_one_group():
    lin = nn.Linear(3, 3).to(D)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    fmodel, params, buffers = fnn.make_functional(model)
    assert sorted(params) == ["0.bias", "0.weight"]
    x = torch.randn(2, 3, dtype=D)
    new = perturbed(params)
    aliased = {"2.weight": new["0.weight"], "0.bias": new["0.bias"]}
    expected = reference(model, new, buffers)(x)
    assert_tree_allclose(fmodel(aliased, buffers, x), expected, rtol=1e-12, atol=1e-12)
    grads = functx.grad(lambda p: fmodel(p, buffers, x).square().sum())(new)
    ref = reference(model, new, buffers)
    ref(x).square().sum().backward()
    assert_tree_allclose(grads, {"0.weight": ref[0].weight.grad, "0.bias": ref[0].bias.grad})


def test_kwargs_belong_to_forward():
    model = WithKwargs().to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    x = torch.randn(4, 3, dtype=D)
    out = fmodel(params, buffers, x, training=2.0, params=1.0, buffers=3.0)
    assert_tree_allclose(out, model(x, training=2.0, params=1.0, buffers=3.0))
    # params and buffers are positional-only, so forward's keywords never collide
    assert_tree_allclose(fmodel.with_training(False)(params, None, x, params=5.0), model(x, params=5.0))


# ---------------------------------------------------------------------------------------
# State: buffers in, buffers out.


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=0.3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    ).to(D)


def test_batchnorm_train_stateful_matches_module_and_never_writes():
    module = bn_net()
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)  # module is in training mode
    given = tensors_snapshot(buffers)
    ref = copy.deepcopy(module)
    b = buffers
    for _step in range(2):
        x = torch.randn(4, 2, 6, 6, dtype=D)
        out, b = fmodel.stateful(params, b, x)
        assert_tree_allclose(out, ref(x), rtol=1e-12, atol=1e-12)
        assert_tree_allclose(b, dict(ref.named_buffers()), rtol=1e-12, atol=1e-12)
    assert b["1.num_batches_tracked"].item() == 2
    assert_tensors_untouched(buffers, given)
    assert_untouched(module, snap)


def test_plain_call_refuses_to_drop_buffer_updates():
    module = bn_net()
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)
    given = tensors_snapshot(buffers)
    x = torch.randn(4, 2, 6, 6, dtype=D)
    with pytest.raises(
        ValueError, match=r"updated buffer\(s\) '1.running_mean', '1.running_var', '1.num_batches_tracked'.*stateful"
    ):
        fmodel(params, buffers, x)
    # eval mode, per converted function or per call: no update, no error, module untouched
    expected = copy.deepcopy(module).eval()(x)
    for f in (fmodel.with_training(False), fnn.make_functional(module, training=False)[0]):
        assert_tree_allclose(f(params, buffers, x), expected, rtol=1e-12, atol=1e-12)
    assert module.training and all(m.training for m in module.modules())
    assert_tensors_untouched(buffers, given)
    assert_untouched(module, snap)


def test_state_in_inference_mode():
    module = bn_net()
    fmodel, params, buffers = fnn.make_functional(module)
    x = torch.randn(4, 2, 6, 6, dtype=D)
    ref = copy.deepcopy(module)
    expected = (ref(x), dict(ref.named_buffers()))
    with torch.inference_mode():
        assert_tree_allclose(fmodel.stateful(params, buffers, x), expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="updated buffer"):
            fmodel(params, buffers, x)
        inference_buffers = {k: v.clone() for k, v in buffers.items()}  # inference tensors
        assert_tree_allclose(fmodel.stateful(params, inference_buffers, x), expected, rtol=1e-12, atol=1e-12)
        assert_tree_allclose(fmodel.with_training(False)(params, buffers, x), copy.deepcopy(module).eval()(x))


@pytest.mark.parametrize("internals", ["on", "off"])
def test_buffer_updates_detected_by_version_and_by_reassignment(internals):
    """With torch's version counters, and without them (``functx._torch_internals``
    switched off: updates are found by comparing values)."""
    with contextlib.nullcontext() if internals == "on" else _torch_internals.switched_off():
        _check_buffer_updates_detected()


def _check_buffer_updates_detected():
    class Counter(nn.Module):
        def __init__(self, reassign: bool) -> None:
            super().__init__()
            self.reassign = reassign
            self.register_buffer("count", torch.zeros((), dtype=D))
            self.register_buffer("scale", torch.full((), 2.0, dtype=D))

        def forward(self, x):
            if self.reassign:
                self.count = self.count + 1
            else:
                self.count += 1
            return x * self.scale

    for reassign in (False, True):
        module = Counter(reassign)
        fmodel, params, buffers = fnn.make_functional(module)
        given = tensors_snapshot(buffers)
        with pytest.raises(ValueError, match="'count'"):
            fmodel(params, buffers, torch.ones(2, dtype=D))
        out, new = fmodel.stateful(params, buffers, torch.ones(2, dtype=D))
        assert torch.equal(out, torch.full((2,), 2.0, dtype=D))
        assert new["count"].item() == 1 and new["scale"].item() == 2.0
        assert_tensors_untouched(buffers, given)
        assert module.count.item() == 0


def test_spectral_norm_power_iteration_buffers():
    torch.manual_seed(0)
    module = nn.utils.spectral_norm(nn.Linear(4, 3)).to(D)
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)
    x = torch.randn(2, 4, dtype=D)
    with pytest.raises(ValueError, match="weight_u"):
        fmodel(params, buffers, x)
    ref = copy.deepcopy(module)
    out, new = fmodel.stateful(params, buffers, x)
    assert_tree_allclose(out, ref(x), rtol=1e-12, atol=1e-12)
    assert_tree_allclose(new, dict(ref.named_buffers()), rtol=1e-12, atol=1e-12)
    assert_tree_allclose(fmodel.with_training(False)(params, new, x), ref.eval()(x), rtol=1e-12, atol=1e-12)
    assert_untouched(module, snap)


def test_legacy_weight_norm_hook_runs_on_the_copy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = nn.utils.weight_norm(nn.Linear(4, 3)).to(D)
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)
    assert sorted(params) == ["bias", "weight_g", "weight_v"]
    x = torch.randn(2, 4, dtype=D)
    new = perturbed(params)
    v, g = new["weight_v"], new["weight_g"]
    weight = g * v / v.norm(dim=1, keepdim=True)  # weight_norm with dim=0
    assert_tree_allclose(fmodel(new, buffers, x), x @ weight.T + new["bias"], rtol=1e-12, atol=1e-12)
    assert_untouched(module, snap)  # the hook's `module.weight = ...` landed on the copy


# ---------------------------------------------------------------------------------------
# Modes.


def test_training_mode_per_function_and_per_call():
    module = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).to(D)
    module.eval()
    fmodel, params, buffers = fnn.make_functional(module)
    x = torch.randn(200, 3, dtype=D)
    assert torch.equal(fmodel(params, buffers, x), module(x))  # follows the module: eval
    dropped = fmodel.with_training(True)(params, buffers, x)
    zeros = (dropped == 0).float().mean().item()
    assert 0.3 < zeros < 0.7 and not module.training and not module[1].training
    assert fmodel.with_training(True).training is True and fmodel.training is None
    f_train, _, _ = fnn.make_functional(module, training=True)
    assert (f_train(params, buffers, x) == 0).any()
    module.train()  # training=None follows the module's flags at call time
    assert (fmodel(params, buffers, x) == 0).any()
    assert torch.equal(f_train.with_training(False)(params, buffers, x), module.eval()(x))


def test_forced_training_mode_uses_batch_statistics():
    module = bn_net().eval()
    fmodel, params, buffers = fnn.make_functional(module, training=True)
    x = torch.randn(4, 2, 6, 6, dtype=D)
    out, new = fmodel.stateful(params, buffers, x)
    ref = copy.deepcopy(module).train()
    assert_tree_allclose(out, ref(x), rtol=1e-12, atol=1e-12)
    assert_tree_allclose(new, dict(ref.named_buffers()), rtol=1e-12, atol=1e-12)
    assert not module.training


# ---------------------------------------------------------------------------------------
# Purity: exceptions, threads, cycles, references to the tree.


def test_exception_inside_forward_leaves_module_untouched():
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(self.bn(x))
            self.lin.weight = nn.Parameter(torch.zeros(3, 3, dtype=D))  # even this lands on the copy
            self.extra = y
            raise RuntimeError("boom")

    module = Fails().to(D)
    module.lin.weight.grad = torch.ones(3, 3, dtype=D)
    module.bn.weight.requires_grad_(False)
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)
    given, given_p = tensors_snapshot(buffers), tensors_snapshot(params)
    for call in (fmodel, fmodel.stateful, fmodel.with_training(False)):
        with pytest.raises(RuntimeError, match="boom"):
            call(params, buffers, torch.randn(4, 3, dtype=D))
    assert not hasattr(module, "extra")
    assert_tensors_untouched(buffers, given)
    assert_tensors_untouched(params, given_p)
    assert_untouched(module, snap)


def test_threads_every_output_correct():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(D).eval()
    module.register_forward_hook(lambda m, args, out: out * 2)
    snap = snapshot(module)
    fmodel, params, buffers = fnn.make_functional(module)
    x = torch.randn(8, 6, dtype=D)
    sets = [perturbed(params, scale=1.0, seed=i) for i in range(6)]
    expected = [reference(module, p, buffers)(x) for p in sets]
    assert all((expected[i] - expected[0]).abs().max() > 1e-3 for i in range(1, 6))
    # stateful calls in training mode race too: each must return its own batch statistics
    train = fmodel.with_training(True)
    refs = [reference(module, p, buffers, training=True) for p in sets]
    expected_train = [(r(x), dict(r.named_buffers())) for r in refs]
    results, train_results, errors = [], [], []

    def worker(tid: int) -> None:
        try:
            for it in range(40):
                i = (tid * 5 + it) % len(sets)
                results.append((i, fmodel(sets[i], buffers, x)))
                if it % 4 == 0:
                    train_results.append((i, train.stateful(sets[i], buffers, x)))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(results) == 160
    wrong = sum(not torch.allclose(out, expected[i], rtol=1e-12, atol=1e-12) for i, out in results)
    assert wrong == 0
    assert len(train_results) == 40
    for i, (out, new) in train_results:
        assert_tree_allclose((out, new), expected_train[i], rtol=1e-12, atol=1e-12)
    assert_untouched(module, snap)


def test_module_cycles_and_redirected_references():
    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)

        def forward(self, x):
            return self.lin(x) * self.parent.scale  # cycle through _modules

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(2.0, dtype=D))
            self.child = Child()
            self.child.parent = self  # registered as a submodule: a cycle
            object.__setattr__(self, "peer", self.child.lin)  # a module outside _modules
            self.act = self.child.lin.forward  # a method bound to a module of the tree
            self.register_forward_hook(self._hook)  # a hook bound to the module itself

        def _hook(self, module, args, out):
            return out + self.scale

        def forward(self, x):
            return self.child(x) + self.peer(x) + self.act(x)

    module = Parent()  # (`.to()` would recurse forever through the cycle)
    snap = snapshot(module, aliases=False)
    fmodel, params, buffers = fnn.make_functional(module)
    assert sorted(params) == ["child.lin.bias", "child.lin.weight", "scale"]
    x = torch.randn(2, 3, dtype=D)
    assert_tree_allclose(fmodel(params, buffers, x), module(x), rtol=1e-12, atol=1e-12)
    new = perturbed(params)
    w, b, s = new["child.lin.weight"], new["child.lin.bias"], new["scale"]
    lin = x @ w.T + b
    assert_tree_allclose(fmodel(new, buffers, x), lin * s + 2 * lin + s, rtol=1e-12, atol=1e-12)
    assert_untouched(module, snap)


def test_rnn_flat_weights_point_at_given_tensors():
    lstm = nn.LSTM(3, 4).to(D)
    seen = []
    # a pre-hook sees the copy before forward: its cache already holds the given tensors,
    # so forward never re-flattens (on CUDA that would re-seat the caller's tensors)
    lstm.register_forward_pre_hook(lambda m, args: seen.append([id(w) for w in m._flat_weights]))
    snap = snapshot(lstm)
    fmodel, params, buffers = fnn.make_functional(lstm)
    fmodel(params, buffers, torch.randn(5, 2, 3, dtype=D))
    assert seen[-1] == [id(params[n]) for n in lstm._flat_weights_names]
    x = torch.randn(5, 2, 3, dtype=D)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    out, (h, c) = fmodel(zeros, buffers, x)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(h, torch.zeros_like(h))
    assert_untouched(lstm, snap)


# ---------------------------------------------------------------------------------------
# Selection: partition / combine / trainable.


def test_partition_combine_and_trainable():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    model[0].requires_grad_(False)
    fmodel, params, buffers = fnn.make_functional(model)
    assert fmodel.trainable == {"2.weight", "2.bias"}
    trainable, frozen = fnn.partition(params, fmodel.trainable)
    assert sorted(trainable) == ["2.bias", "2.weight"] and sorted(frozen) == ["0.bias", "0.weight"]
    assert all(trainable[k] is params[k] for k in trainable)
    assert fnn.partition(params, "2.*")[0].keys() == trainable.keys()
    assert fnn.partition(params, re.compile(r"^2\."))[0].keys() == trainable.keys()
    assert fnn.partition(params, ["0.weight", "2.b*"])[0].keys() == {"0.weight", "2.bias"}
    assert fnn.partition(params, lambda name, t: t.dim() == 1)[0].keys() == {"0.bias", "2.bias"}
    assert fnn.partition(params, set())[0] == {}
    x = torch.randn(5, 3, dtype=D)
    loss = lambda t: fmodel(fnn.combine(t, frozen), buffers, x).square().sum()
    grads = functx.grad(loss)(trainable)
    ref = copy.deepcopy(model)
    ref(x).square().sum().backward()
    assert grads.keys() == trainable.keys()
    assert_tree_allclose(grads, {k: ref.get_parameter(k).grad for k in grads})


def test_partition_and_combine_errors():
    params = {"fc1.weight": torch.ones(1), "fc2.weight": torch.ones(1)}
    with pytest.raises(ValueError, match=r"'fc3\.\*' matches no name"):
        fnn.partition(params, "fc3.*")
    with pytest.raises(ValueError, match=r"Did you mean 'fc1\.weight'"):
        fnn.partition(params, ["fc1.wieght"])
    with pytest.raises(ValueError, match="matches no name"):
        fnn.partition(params, re.compile("conv"))
    with pytest.raises(TypeError, match="`filter` must be"):
        fnn.partition(params, 3)
    with pytest.raises(TypeError, match="`tree` must be a dict"):
        fnn.partition([torch.ones(1)], "*")
    with pytest.raises(ValueError, match=r"'fc1\.weight' appears in more than one"):
        fnn.combine(params, {"fc1.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"`trees\[1\]` must be a dict"):
        fnn.combine(params, [1])


# ---------------------------------------------------------------------------------------
# stack.


def test_stack_matches_members_and_validates():
    members = [
        nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(D).eval() for _ in range(3)
    ]
    for m in members:
        with torch.no_grad():
            m[1].running_mean.normal_()
    snaps = [snapshot(m) for m in members]
    fmodel, params, buffers = fnn.stack(members)
    assert params["0.weight"].shape == (3, 4, 3) and buffers["1.running_mean"].shape == (3, 4)
    x = torch.randn(5, 3, dtype=D)
    out = functx.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)
    assert_tree_allclose(out, torch.stack([m(x) for m in members]), rtol=1e-12, atol=1e-12)
    for m, s in zip(members, snaps):
        assert_untouched(m, s)
    with pytest.raises(ValueError, match="differs from modules\\[0\\] in its parameters"):
        fnn.stack(
            [members[0], nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).to(D).eval()]
        )
    with pytest.raises(ValueError, match="training"):
        fnn.stack([members[0], copy.deepcopy(members[0]).train()])
    mixed = [members[0], copy.deepcopy(members[1]).train()]
    f_eval, p_eval, b_eval = fnn.stack(mixed, training=False)  # flags do not matter when forced
    assert_tree_allclose(
        functx.vmap(f_eval, in_dims=(0, 0, None))(p_eval, b_eval, x)[1], members[1](x), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="empty"):
        fnn.stack([])
    with pytest.raises(TypeError, match="list or tuple"):
        fnn.stack(members[0])
    with pytest.raises(TypeError, match=r"modules\[1\]"):
        fnn.stack([members[0], "not a module"])
    with pytest.raises(ValueError, match=r"has shape \(3, 4, 3\).*vmap"):
        fmodel(params, buffers, x)


def test_stack_batchnorm_train_under_vmap_returns_per_member_buffers():
    members = [bn_net() for _ in range(2)]
    fmodel, params, buffers = fnn.stack(members)
    x = torch.randn(4, 2, 6, 6, dtype=D)
    out, new = functx.vmap(fmodel.stateful, in_dims=(0, 0, None))(params, buffers, x)
    refs = [copy.deepcopy(m) for m in members]
    assert_tree_allclose(out, torch.stack([r(x) for r in refs]), rtol=1e-12, atol=1e-12)
    expected = {k: torch.stack([dict(r.named_buffers())[k] for r in refs]) for k in new}
    assert_tree_allclose(new, expected, rtol=1e-12, atol=1e-12)
    assert all(m[1].num_batches_tracked.item() == 0 for m in members)


# ---------------------------------------------------------------------------------------
# Errors.


def test_call_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(D).eval()
    fmodel, params, buffers = fnn.make_functional(model)
    x = torch.randn(2, 3, dtype=D)
    with pytest.raises(TypeError, match="`params` must be a dict"):
        fmodel([params], buffers, x)
    with pytest.raises(TypeError, match="`buffers` must be a dict"):
        fmodel(params, None, x)
    with pytest.raises(ValueError, match=r"`params` is missing '0.bias'.*combine"):
        fmodel({k: v for k, v in params.items() if k != "0.bias"}, buffers, x)
    with pytest.raises(ValueError, match=r"params\['0.wieght'\] is not a parameter.*Did you mean '0.weight'"):
        fmodel({**params, "0.wieght": params["0.weight"]}, buffers, x)
    with pytest.raises(ValueError, match=r"params\['1.running_mean'\].*It is a buffer: pass it in `buffers`"):
        fmodel({**params, "1.running_mean": buffers["1.running_mean"]}, buffers, x)
    with pytest.raises(TypeError, match=r"params\['0.weight'\] must be a tensor, got a value of type list"):
        fmodel({**params, "0.weight": params["0.weight"].tolist()}, buffers, x)
    with pytest.raises(
        ValueError, match=r"params\['0.bias'\] has shape \(5,\) but the module's tensor has shape \(4,\)"
    ):
        fmodel({**params, "0.bias": torch.zeros(5, dtype=D)}, buffers, x)
    with pytest.raises(TypeError, match="`training` must be None or a bool, got"):
        fmodel.with_training("eval")
    with pytest.raises(TypeError, match="`training` must be None or a bool, got"):
        fnn.make_functional(model, training=1)


def test_parametrized_override_by_plain_name_is_refused():
    net = parametrized_net()
    fmodel, params, buffers = fnn.make_functional(net)
    assert "0.parametrizations.weight.original" in params and "0.weight" not in params
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(
        ValueError, match=r"params\['0.weight'\] is computed by a parametrization.*'0.parametrizations.weight.original'"
    ):
        fmodel({**params, "0.weight": torch.eye(4, dtype=D)}, buffers, x)
    with parametrize.cached():
        with pytest.raises(RuntimeError, match=r"parametrize\.cached"):
            fmodel(params, buffers, x)


def test_structure_changed_after_conversion():
    model = nn.Sequential(nn.Linear(3, 3)).to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    model.append(nn.Linear(3, 3).to(D))
    with pytest.raises(ValueError, match=r"changed after `functx.nn.make_functional`.*submodule '1' was added"):
        fmodel(params, buffers, torch.ones(1, 3, dtype=D))
    model = nn.Linear(3, 3)
    fmodel, params, buffers = fnn.make_functional(model)
    parametrize.register_parametrization(model, "weight", Symmetric())
    with pytest.raises(ValueError, match="the root module is now a ParametrizedLinear, was a Linear"):
        fmodel(params, buffers, torch.ones(1, 3))


def changed_calls():
    """``(change, expected message)``: each change made to a fresh 3-3-2 MLP."""

    def swap(m):
        m[1] = nn.ReLU()

    def reshape(m):
        m[0].weight = nn.Parameter(torch.ones(4, 3, dtype=D))

    def reshape_in_place(m):
        m[0].weight.data = torch.ones(4, 3, dtype=D)

    def drop_bias(m):
        m[2].bias = None

    def add_param(m):
        m[2].scale = nn.Parameter(torch.ones(1, dtype=D))

    def remove_buffer(m):
        del m[0].mask

    return [
        (swap, r"submodule '1' was replaced \(Tanh -> ReLU\)"),
        (reshape, r"parameter '0.weight' has shape \(4, 3\), was \(3, 3\)"),
        (reshape_in_place, r"parameter '0.weight' has shape \(4, 3\), was \(3, 3\)"),
        (drop_bias, r"parameter '2.bias' is now None"),
        (add_param, r"parameter '2.scale' was added"),
        (remove_buffer, r"buffer '0.mask' was removed"),
    ]


@pytest.mark.parametrize("change, message", changed_calls(), ids=lambda c: getattr(c, "__name__", ""))
def test_changed_module_is_a_value_error_before_work(change, message):
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(D)
    model[0].register_buffer("mask", torch.ones(3, dtype=D))
    fmodel, params, buffers = fnn.make_functional(model)
    change(model)
    ran = []
    model.register_forward_pre_hook(lambda *_: ran.append(1))
    model[0].register_forward_pre_hook(lambda *_: ran.append(1))
    new_params = {n: p.detach() for n, p in model.named_parameters()}
    # A tensor re-seated in place is seen when the given shapes disagree with the plan's
    # (with the old shapes the call is consistent: it never reads the module's tensors).
    for p in (new_params,) if change.__name__ == "reshape_in_place" else (params, new_params):
        with pytest.raises(ValueError, match=message + r".*call `functx.nn.make_functional` again"):
            fmodel(p, buffers, torch.ones(2, 3, dtype=D))
    assert not ran


def test_unchanged_structure_is_accepted():
    """Entries replaced by tensors of the same shape (a forward reassigning its buffer, a
    parameter re-created) are no structural change: the call runs, on the given tensors."""

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).to(D)
            self.register_buffer("count", torch.zeros((), dtype=D))

        def forward(self, x):
            self.count = self.count + 1
            return self.lin(x)

    model = Counter()
    fmodel, params, buffers = fnn.make_functional(model)
    x = torch.randn(3, 2, dtype=D)
    model(x)
    model.lin.weight = nn.Parameter(torch.zeros(2, 2, dtype=D))
    out, new = fmodel.stateful(params, buffers, x)
    assert_tree_allclose(out, x @ params["lin.weight"].T + params["lin.bias"])
    assert new["count"] == buffers["count"] + 1


def test_unconvertible_modules():
    with pytest.raises(TypeError, match=r"`module` must be a torch\.nn\.Module, got a value of type function"):
        fnn.make_functional(lambda x: x)
    scripted = torch.jit.script(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TorchScript"):
        fnn.make_functional(scripted)
    with pytest.raises(TypeError, match=r"submodule '1' is a TorchScript"):
        fnn.make_functional(nn.Sequential(nn.Tanh(), scripted))
    with pytest.raises(TypeError, match=r"torch\.compile"):
        fnn.make_functional(torch.compile(nn.Linear(2, 2)))
    compiled_in_place = nn.Linear(2, 2)
    compiled_in_place.compile()
    with pytest.raises(TypeError, match=r"compiled in place with `Module.compile\(\)`"):
        fnn.make_functional(compiled_in_place)
    with pytest.raises(ValueError, match="not initialized yet"):
        fnn.make_functional(nn.LazyLinear(3))


def test_unsubstitutable_references_raise_or_warn():
    class Closure(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            lin = self.lin
            self.fn = lambda x: lin(x)

    class Listed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.layers = [self.lin]

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.fn = functools.partial(torch.nn.Module.__call__, self.lin)

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            object.__setattr__(self, "weights", [self.lin.weight])  # a tensor cache, as RNNs keep

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.ones(2))
            object.__setattr__(self, "alias", self.table)

    for cls, attr in ((Closure, "fn"), (Listed, "layers"), (Partial, "fn"), (Cached, "weights"), (Aliased, "alias")):
        with pytest.raises(ValueError, match=f"attribute '{attr}' of the root module .* silently use"):
            fnn.make_functional(cls())
    model = nn.Linear(2, 2)
    model.register_forward_hook(lambda m, a, out: out + model.bias)
    with pytest.warns(UserWarning, match="hook in _forward_hooks of the root module refers"):
        fnn.make_functional(model)


# ---------------------------------------------------------------------------------------
# Clear errors instead of internal ones (issue 15, defect 9)


def test_params_with_a_non_string_key_is_named():
    fmodel, params, buffers = functx.nn.make_functional(torch.nn.Linear(2, 1))
    with pytest.raises(TypeError, match=r"`functx.nn.FunctionalModule.__call__`: `params` must be keyed by str names"):
        fmodel({0: params["weight"], "bias": params["bias"]}, buffers, torch.ones(2))
    with pytest.raises(TypeError, match=r"`buffers` must be keyed by str names, got the key 3"):
        functx.nn.make_functional(torch.nn.BatchNorm1d(2))[0](
            functx.nn.make_functional(torch.nn.BatchNorm1d(2))[1], {3: torch.zeros(2)}, torch.ones(4, 2)
        )


def test_params_as_model_parameters_suggests_named_parameters():
    model = torch.nn.Linear(2, 1)
    fmodel, _, buffers = functx.nn.make_functional(model)
    for given in (model.parameters(), list(model.parameters())):
        with pytest.raises(TypeError, match=r"`params` must be a dict.*pass `dict\(model.named_parameters\(\)\)`"):
            fmodel(given, buffers, torch.ones(2))


def test_dropout_under_vmap_names_the_layer_and_the_randomness_flag():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    fmodel, params, buffers = functx.nn.make_functional(model)
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"layer\(s\) '1' run in training mode under `vmap`.*randomness='different'"):
        functx.vmap(fmodel, in_dims=(None, None, 0))(params, buffers, x)
    with pytest.raises(RuntimeError, match=r"randomness='different'"):
        torch.func.vmap(fmodel, in_dims=(None, None, 0))(params, buffers, x)
    out = functx.vmap(fmodel, in_dims=(None, None, 0), randomness="different")(params, buffers, x)
    assert out.shape == (4, 3)
    evaluated = functx.vmap(fmodel.with_training(False), in_dims=(None, None, 0))(params, buffers, x)
    torch.testing.assert_close(evaluated, model[0](x))
