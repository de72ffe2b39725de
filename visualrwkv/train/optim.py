"""Gradient clipping folded into a fused AdamW step, and the bf16 gradient all-reduce of DDP (plain
PyTorch; used by the Lightning module and the GPU training benchmark)."""
from __future__ import annotations

from typing import Iterable

import torch


def _drop_grad_scale(optimizer, args, kwargs) -> None:
    optimizer.__dict__.pop("grad_scale", None)


def clip_grad_norm_in_step_(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                            max_norm: float) -> torch.Tensor:
    """Clip the gradients' global L2 norm to ``max_norm`` inside the next fused ``optimizer.step()``.

    A fused Adam/AdamW divides every gradient by ``optimizer.grad_scale`` as it reads it (the hook
    torch's GradScaler uses to unscale inside fused steps). Setting it to max(norm / max_norm, 1)
    is ``clip_grad_norm_`` (coefficient max_norm / (norm + 1e-6), at most 1) without its extra
    read and write of every gradient: 15 ms of a 1.6B stage-2 step on an H100. The attribute is
    removed after the step. Only for fused optimizers without a gradient scaler (bf16 or fp32):
    under fp16 the scaler owns grad_scale. Returns the norm (a 0-dim tensor; no host sync)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ValueError("clip_grad_norm_in_step_ needs a fused optimizer (torch.optim.AdamW(..., fused=True))")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    if not getattr(optimizer, "_clip_hook_registered", False):
        optimizer.register_step_post_hook(_drop_grad_scale)
        optimizer._clip_hook_registered = True
    return norm


def bf16_allreduce_hook(process_group, bucket):
    """DDP communication hook (``--ddp_grad_dtype bf16``): average a gradient bucket in bf16.

    The fp32 bucket (flat, a few MB of gradients) is divided by the world size, rounded to bf16 once,
    summed across ranks in bf16 and copied back into the bucket: half the bytes of the fp32
    all-reduce. Written here rather than torch's ``bf16_compress_hook``, which refuses any backend
    but NCCL/XCCL, so the CPU (gloo) tests run the same code as the GPUs."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    half = buf.div(dist.get_world_size(group)).to(torch.bfloat16)
    fut = dist.all_reduce(half, group=group, async_op=True).get_future()

    def unpack(done):
        buf.copy_(done.value()[0])
        return buf

    return fut.then(unpack)
