"""Gradient clipping folded into a fused AdamW step, AdamW over bf16 weights with fp32 master copies,
and the bf16 gradient all-reduce of DDP (plain PyTorch; used by the Lightning module and the GPU
training benchmark)."""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn

from visualrwkv.ops.adamw import adamw_master_, bias_corrections, resolve_backend


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
    if grads[0].device.type == "cuda":
        # Sums of squares in float64, where bf16 and fp32 values square exactly and the summation order (the
        # multi-tensor kernel's differs by dtype) moves the result by ~1e-16: the norm, rounded to fp32, is the
        # same for bf16 gradients (--master_weights 1) as for the same values in fp32, so both runs clip
        # alike. One multi-tensor launch per dtype (per-tensor norms cost the host ~300 launches a step).
        by_dtype = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault((g.device, g.dtype), []).append(i)
        norms: List[torch.Tensor] = [None] * len(grads)
        for idx in by_dtype.values():
            for i, n in zip(idx, torch._foreach_norm([grads[i] for i in idx], 2, dtype=torch.float64)):
                norms[i] = n
        norm = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms])).float()
    elif any(g.dtype != torch.float32 for g in grads):
        # CPU (float64 norms cost 15x there: 30 vs 2 ms for 9.5M gradients): each tensor's norm in fp32, as
        # from the fp32 gradients they would otherwise be cast to (a bf16 result would round each one).
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in grads]))
    elif hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
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


def avg_allreduce_hook(process_group, bucket):
    """DDP communication hook (``--ddp_avg_in_allreduce 1``): the all-reduce itself averages the bucket.

    Without a hook DDP divides every gradient by the world size before its all-reduce: one elementwise
    kernel per parameter (~370 in a 1.6B stage-2 step; eager elementwise kernels took 4.06 / 4.64 ms of a
    DDP step's kernel time in the r60 / r63 profiles, against 0.50 ms on one GPU). NCCL's AVG scales each
    contribution inside the reduction kernel. For a power-of-two world size the scaling is exact, so the
    result is the same to the bit as DDP's. gloo (the CPU tests) has no AVG: there the bucket is divided
    once, then summed, which is DDP's own arithmetic."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    if dist.get_backend(group) == "nccl":
        work = dist.all_reduce(buf, op=dist.ReduceOp.AVG, group=group, async_op=True)
    else:
        buf.div_(dist.get_world_size(group))
        work = dist.all_reduce(buf, group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def bf16_linear_weights_(model: nn.Module) -> List[str]:
    """Store the trainable weights of the model's nn.Linear layers in bf16, in place (``--master_weights
    1``); returns their names. Under bf16 autocast a linear layer computes with the bf16-rounded weight
    either way, and its weight gradient is the bf16 matmul output either way: what changes is that no
    cast runs per step (and the optimizer must keep the fp32 copy: ``MasterAdamW``). Everything else
    (biases, norms, the time-mix and decay vectors, the LoRA matrices, frozen weights) stays as it is."""
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad and module.weight.dtype == torch.float32:
            w = module.weight
            # The optimizer's master starts from these fp32 values, not from their bf16 rounding (taken
            # by MasterAdamW at its first step, or dropped when it loads a saved state).
            w._fp32_master = w.data
            w.data = w.data.to(torch.bfloat16)
            names.append(f"{mname}.weight" if mname else "weight")
    return names


class MasterAdamW(torch.optim.Optimizer):
    """AdamW that keeps an fp32 master copy of every parameter stored in a lower precision
    (``--master_weights 1`` with bf16 autocast; ``bf16_linear_weights_`` makes such parameters).

    bf16 parameters: fp32 master, moments and step in this optimizer's state; one pass per tensor
    (``ops.adamw.adamw_master_``: bf16 gradient in, master, moments and the bf16 weight out), so the
    training step has no weight cast in the forward and no gradient cast in the backward. fp32 parameters:
    torch's fused AdamW kernel, as ``torch.optim.AdamW(fused=True)``. Same update and defaults as
    torch's AdamW; honours ``grad_scale`` as the fused optimizers do, so ``clip_grad_norm_in_step_``
    folds gradient clipping into the step. Gradients of bf16 parameters are bf16: no accumulation of
    several micro-batches (``--accumulate_grad_batches 1``)."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 backend: str = "auto"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # where the parameters are (training keeps them on one device)
            first = next((p for g in self.param_groups for p in g["params"] if p.grad is not None), None)
            scale = scale.to(first.device) if first is not None else scale
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            full: List[torch.Tensor] = []
            bias: dict = {}  # (step count, device) -> the Triton kernel's bias corrections, made once for all
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if p.dtype == torch.float32:
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    full.append(p)
                    continue
                if not state:
                    # The step count as a Python int: bias corrections without reading a device tensor.
                    state["step"] = 0
                    # The weights before bf16_linear_weights_ (where that ran before the model moved to its
                    # device, e.g. built on the CPU and moved by Lightning, they are still where it ran).
                    start = p.__dict__.pop("_fp32_master", None)
                    start = p.detach() if start is None else start
                    state["master"] = start.to(device=p.device, dtype=torch.float32).contiguous()
                    state["exp_avg"] = torch.zeros_like(state["master"])
                    state["exp_avg_sq"] = torch.zeros_like(state["master"])
                state["step"] += 1
                key = (state["step"], p.device)
                if key not in bias:  # (the reference takes them in double)
                    bias[key] = bias_corrections(beta1, beta2, state["step"], p.device) \
                        if resolve_backend(self.backend, p.device) == "triton" else None
                adamw_master_(p, p.grad, state["master"], state["exp_avg"], state["exp_avg_sq"], lr=lr, beta1=beta1,
                              beta2=beta2, eps=eps, weight_decay=wd, step=state["step"], grad_scale=scale,
                              bias=bias[key], backend=self.backend)
            if full:
                steps = [self.state[p]["step"] for p in full]
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(full, [p.grad for p in full], [self.state[p]["exp_avg"] for p in full],
                                    [self.state[p]["exp_avg_sq"] for p in full], [], steps, lr=lr, beta1=beta1,
                                    beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                                    grad_scale=scale, found_inf=None)
        return loss

    def load_state_dict(self, state_dict) -> None:
        # torch's loader casts every floating state tensor to its parameter's dtype: the fp32 masters and
        # moments of bf16 parameters would come back rounded to bf16. Put the saved fp32 values back.
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:  # the saved masters replace the initial fp32 weights
            p.__dict__.pop("_fp32_master", None)
        for i, st in saved.items():
            p = params[int(i)]
            if p.dtype == torch.float32:
                if torch.is_tensor(self.state[p].get("step")):  # the fused kernel wants it on the device
                    self.state[p]["step"] = self.state[p]["step"].to(device=p.device, dtype=torch.float32)
                continue
            for key in ("master", "exp_avg", "exp_avg_sq"):
                if key in st:
                    self.state[p][key] = st[key].to(device=p.device, dtype=torch.float32).contiguous()
            if "step" in st:
                self.state[p]["step"] = int(st["step"])
