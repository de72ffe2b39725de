"""Training arithmetic that the GPU speed work changed: gradient clipping folded into the fused
AdamW step, and the token mixing in autocast's dtype."""
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
