"""Training arithmetic that the GPU speed work changed: gradient clipping folded into the fused
AdamW step, and the token mixing in autocast's dtype."""
import os

import pytest
import torch

from visualrwkv.train.optim import clip_grad_norm_in_step_
from utils import random_rwkv6, rel


def _params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).requires_grad_(True) for n in (7, 130, 33)]


@pytest.mark.parametrize("max_norm", [0.3, 1e4])  # clipped, and a norm far below the limit
def test_clip_in_fused_step_equals_clip_grad_norm(max_norm):
    a, b = _params(0), _params(0)
    opt_a = torch.optim.AdamW(a, lr=1e-2, betas=(0.9, 0.99), fused=True)
    opt_b = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.99), fused=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) * 5 for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(a, max_norm)
        opt_a.step()
        norm = clip_grad_norm_in_step_(opt_b, b, max_norm)
        assert "grad_scale" in opt_b.__dict__
        opt_b.step()
        assert "grad_scale" not in opt_b.__dict__  # a later unclipped step is not scaled
        assert torch.allclose(norm, ref_norm)
        for p, q in zip(a, b):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    # Without a clip call the next step must be a plain step.
    for p, q in zip(a, b):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt_a.step()
    opt_b.step()
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_clip_in_step_needs_a_fused_optimizer():
    p = _params(0)
    with pytest.raises(ValueError, match="fused"):
        clip_grad_norm_in_step_(torch.optim.AdamW(p, foreach=True), p, 1.0)


def test_mixing_runs_in_autocast_dtype():
    """Under autocast the mixes feeding the projections and the residual stream between blocks are
    bf16 (as in bf16 inference and the original's bf16 training), the decay stays float32; without
    autocast everything stays float32; the two agree to bf16 precision."""
    model = random_rwkv6(n_layer=2, n_embd=64, vocab_size=128)
    seen = {}
    residual = []
    for b in model.blocks:
        b.register_forward_hook(lambda m, args, out: residual.append(out[0].dtype))

    def grab(name):
        def hook(module, args):
            seen.setdefault(name, []).append(args[0].dtype)
        return hook

    blk = model.blocks[1]
    blk.att.receptance.register_forward_pre_hook(grab("att"))
    blk.ffn.key.register_forward_pre_hook(grab("ffn"))
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    ref, _ = model(ids)
    assert seen == {"att": [torch.float32], "ffn": [torch.float32]}
    assert residual == [torch.float32] * 2
    seen.clear()
    residual.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(ids)
    assert seen == {"att": [torch.bfloat16], "ffn": [torch.bfloat16]}
    assert residual == [torch.bfloat16] * 2
    residual.clear()
    with torch.autocast("cpu", dtype=torch.float16):  # fp16: the stream stays float32 (range)
        model(ids)
    assert residual == [torch.float32] * 2
    assert rel(out.float(), ref) < 5e-2


def _ddp_grads(rank: int, out: str, hook: str, backend: str = "gloo") -> None:
    # One process of a 2-process group: DDP over a small model, each rank with its own data.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from visualrwkv.train.optim import avg_allreduce_hook, bf16_allreduce_hook

    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a rendezvous file per group (no TCP port to collide with another run)
    dist.init_process_group(backend, init_method=f"file://{out}.store{hook}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).to(device)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 + rank)).to(device)
        model(x).pow(2).sum().backward()  # this rank's own gradients, before any all-reduce
        torch.save([p.grad.cpu().clone() for p in model.parameters()], f"{out}.local.{rank}")
        model.zero_grad(set_to_none=True)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.001, gradient_as_bucket_view=True)  # several buckets
        if hook != "none":
            ddp.register_comm_hook(state=None, hook={"bf16": bf16_allreduce_hook, "avg": avg_allreduce_hook}[hook])
        ddp(x).pow(2).sum().backward()
        torch.save([p.grad.cpu().clone() for p in model.parameters()], f"{out}.{hook}.{rank}")
        dist.barrier()  # both ranks done before either leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without gloo's teardown: now and then it aborts the process after all the work is saved
    # ("terminate called without an active exception", SIGABRT; seen once in CI of 489d923).
    os._exit(0)


def _spawn(fn, *args):
    import torch.multiprocessing as mp

    mp.spawn(fn, args=args, nprocs=2)


def test_bf16_allreduce_hook_averages_gradients_within_bf16_rounding(tmp_path):
    out = str(tmp_path / "g")
    for hook in ("none", "bf16"):
        _spawn(_ddp_grads, out, hook)
    exact = torch.load(f"{out}.none.0")  # DDP's own fp32 average
    local = [torch.load(f"{out}.local.{rank}") for rank in (0, 1)]
    for g0, g1, e in zip(*local, exact):
        torch.testing.assert_close((g0 + g1) / 2, e)  # the reference is the average of the ranks' gradients
    for rank in (0, 1):
        got = torch.load(f"{out}.bf16.{rank}")
        assert [g.shape for g in got] == [g.shape for g in exact]
        for g, e, g0, g1 in zip(got, exact, *local):
            # each half rounded to bf16 once (unit roundoff 2^-8), their sum once more
            bound = 2 ** -8 * ((g0.abs() + g1.abs()) / 2 + e.abs()) * 1.01 + 1e-12
            assert ((g - e).abs() <= bound).all()
            assert torch.equal(g, g.to(torch.bfloat16).float())  # the wire format really was bf16
    assert any(not torch.equal(g, e) for g, e in zip(torch.load(f"{out}.bf16.0"), exact))
    assert all(torch.equal(a, b) for a, b in zip(torch.load(f"{out}.bf16.0"), torch.load(f"{out}.bf16.1")))


def _avg_hook_equals_ddps_own(out: str, backend: str) -> None:
    for hook in ("none", "avg"):
        _spawn(_ddp_grads, out, hook, backend)
    local = [torch.load(f"{out}.local.{rank}") for rank in (0, 1)]
    for rank in (0, 1):
        own, avg = torch.load(f"{out}.none.{rank}"), torch.load(f"{out}.avg.{rank}")
        for g, e, g0, g1 in zip(avg, own, *local):
            assert torch.equal(g, e)  # 2 processes: the scaling by 1/2 is exact, so DDP's result to the bit
            torch.testing.assert_close(g, (g0 + g1) / 2)


def test_avg_allreduce_hook_equals_ddps_own_average(tmp_path):
    _avg_hook_equals_ddps_own(str(tmp_path / "g"), "gloo")  # gloo: the bucket divided once, then summed


@pytest.mark.parametrize("flags, hook", [({}, None), ({"ddp_avg_in_allreduce": 1}, "avg_allreduce_hook"),
                                         ({"ddp_grad_dtype": "bf16"}, "bf16_allreduce_hook"),
                                         ({"ddp_grad_dtype": "bf16", "ddp_avg_in_allreduce": 1}, "bf16_allreduce_hook")])
def test_train_module_registers_the_chosen_allreduce_hook(tmp_path, flags, hook):
    import types

    import lightning.pytorch as pl
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from visualrwkv.train.module import VisualRWKVTrainModule
    from visualrwkv.train.strategies import BackwardGemmCarveout

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(4, 4))
        m = VisualRWKVTrainModule.__new__(VisualRWKVTrainModule)  # on_train_start alone is under test
        pl.LightningModule.__init__(m)
        m.cfg = types.SimpleNamespace(**{"ddp_grad_dtype": "fp32", "ddp_avg_in_allreduce": 0, **flags})
        m.gemm_carveout = BackwardGemmCarveout(0)
        m._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=ddp))
        m.on_train_start()
        assert [h.__name__ for h, _ in ddp._comm_hooks] == ([hook] if hook else [])
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_avg_allreduce_hook_equals_ddps_own_average_with_nccl(tmp_path):
    _avg_hook_equals_ddps_own(str(tmp_path / "g"), "nccl")  # NCCL's AVG inside the all-reduce
