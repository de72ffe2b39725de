"""ops/partition.py: the joint-graph pass that keeps custom kernels' outputs under --act_budget."""
import pytest
import torch
from torch._functorch import config as functorch_config

from visualrwkv.ops.partition import KERNEL_FORWARD_OPS, KeepOutputs

_calls = [0]


@torch.library.custom_op("visualrwkv_test::costly", mutates_args=())
def _costly(x: torch.Tensor) -> torch.Tensor:
    _calls[0] += 1
    return x.sin()


@_costly.register_fake
def _(x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * x.cos()


_costly.register_autograd(_backward, setup_context=_setup)


def _f(x, w):
    return (_costly(x @ w) @ w).relu().sum()


@pytest.mark.parametrize("keep", [False, True])
def test_kept_custom_op_is_not_recomputed_in_backward(keep):
    # A small budget makes the partitioner recompute what it may; an opaque custom op counts as one
    # FLOP, so without the pass its forward runs again in backward (2 calls per step), with it once.
    torch._dynamo.reset()
    opts = {"joint_custom_pre_pass": KeepOutputs(["visualrwkv_test::costly"])} if keep else {}
    with functorch_config.patch(activation_memory_budget=0.05):
        _check(torch.compile(_f, options=opts), 1 if keep else 2)
    torch._dynamo.reset()


def _check(f, calls):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, generator=gen, requires_grad=True)
    w = torch.randn(16, 16, generator=gen, requires_grad=True)
    f(x, w).backward()  # compiles
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    _calls[0] = 0
    f(x, w).backward()
    assert _calls[0] == calls
    x.grad = w.grad = None
    _f(x, w).backward()  # eager: the same gradients either way
    torch.testing.assert_close(grads, (x.grad, w.grad))


def test_keep_outputs_cache_key_names_its_ops():
    assert KeepOutputs() == KeepOutputs(reversed(KERNEL_FORWARD_OPS))  # one graph shared by all layers
    assert KeepOutputs().uuid() == KeepOutputs(reversed(KERNEL_FORWARD_OPS)).uuid()
    assert KeepOutputs().uuid() != KeepOutputs(KERNEL_FORWARD_OPS[:1]).uuid()


def test_keep_outputs_cache_key_follows_the_ops_definitions(tmp_path, monkeypatch):
    # The compiled graphs' caches see a custom op only by name: the pass's uuid must change when the
    # code that defines the ops changes, or a cached graph calls an op with another schema.
    from visualrwkv.ops import partition

    mod = tmp_path / "vrwkv_fake_op_defs.py"
    mod.write_text("SCHEMA = 'bwd(Tensor A) -> Tensor'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = partition.definitions_digest(("vrwkv_fake_op_defs",))
    mod.write_text("SCHEMA = 'bwd(Tensor[] saved) -> Tensor'\n")
    partition.definitions_digest.cache_clear()
    after = partition.definitions_digest(("vrwkv_fake_op_defs",))
    assert before != after
    assert partition.definitions_digest() == partition.definitions_digest(partition.OP_DEFINING_MODULES)
    uuid = KeepOutputs().uuid()
    monkeypatch.setattr(partition, "definitions_digest", lambda modules=None: "another definition")
    assert KeepOutputs().uuid() != uuid
