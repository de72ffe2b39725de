"""Helpers shared by the tests: small random checkpoints with the official key layout."""
from __future__ import annotations

import torch

from visualrwkv.layers.rwkv6 import RWKV6Config
from visualrwkv.models.rwkv6 import RWKV6


def random_rwkv6(n_layer=3, n_embd=128, vocab_size=65536, seed=0, noise=0.5) -> RWKV6:
    """An RWKV-6 with the published init plus noise on every tensor, so that no weight is zero and
    every path (LoRAs, gates, output projections, channel mix) matters for the logits."""
    torch.manual_seed(seed)
    model = RWKV6(RWKV6Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size)).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "emb.weight":
                p.normal_(0.0, 1.0, generator=g)
            elif p.dim() >= 2 and not name.endswith("time_faaaa"):
                p.add_(torch.randn(p.shape, generator=g) * noise / p.shape[-1] ** 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_tiny_tower(folder: str, image_size: int = 32, patch_size: int = 8, hidden: int = 32, seed: int = 0) -> str:
    """A random CLIP vision tower (4x4 patches) saved with its image processor, for offline tests."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    transformers.CLIPVisionModel(cfg).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def outputs_and_grads(fn, inputs, dout):
    """[fn(*inputs) detached, then the gradient of each input] for the backward of ``dout``; the
    inputs are cloned, so the same tensors serve several fns."""
    t = [a.clone().requires_grad_(True) for a in inputs]
    out = fn(*t)
    out.backward(dout)
    return [out.detach()] + [a.grad for a in t]


def hidden_and_grads(model, x, probe, **kw):
    """The hidden states of ``model.forward_hidden(x)`` and every parameter's gradient of (hidden * probe).sum()."""
    h, _ = model.forward_hidden(x, need_state=False, **kw)
    (h * probe).sum().backward()
    return h.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def ptxas_for_hopper(fn, signature, constexprs, num_warps):
    """Compile Triton kernel ``fn`` ahead of time for sm_90 (no GPU needed) and run Triton's bundled ptxas
    on it; returns (returncode, ptxas's -v report: registers, spills). Skips the test without ptxas."""
    import os
    import subprocess

    import pytest
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is missing")
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{fn.__name__}_{os.getpid()}.ptx")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    try:
        r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
    finally:
        os.remove(ptx)
    return r.returncode, r.stderr
