"""RWKV-6 ("Finch", x060) blocks as plain ``nn.Module``s (SPEC §2).

Parameter names equal the official checkpoint keys (``blocks.i.att.time_maa_x`` ...), so official
files load with ``load_state_dict(strict=True)`` and no renaming.

Shapes: x is (B, T, C); H heads of size N (C = H * N); F = dim_ffn.
Each mixer takes an optional state and returns its new state, so the same code serves a full
parallel forward, a forward in chunks, and token-by-token decoding (T = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from visualrwkv.ops import wkv6, wkv6_step
from visualrwkv.ops.norm_gate import norm_gate


@dataclass(frozen=True)
class RWKV6Config:
    """Dimensions of an RWKV-6 model. Normally read from a checkpoint with ``from_state_dict``."""

    n_layer: int
    n_embd: int
    vocab_size: int = 65536
    head_size: int = 64
    dim_ffn: Optional[int] = None  # default int(3.5 * C) // 32 * 32
    maa_rank: Optional[int] = None  # time_maa LoRA rank R: 32, or 64 when C >= 4096
    decay_rank: Optional[int] = None  # time_decay LoRA rank D: 64, or 128 when C >= 4096

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"--n_embd ({self.n_embd}) must be a multiple of --head_size_a ({self.head_size})")
        if self.dim_ffn is None:
            object.__setattr__(self, "dim_ffn", int(self.n_embd * 3.5) // 32 * 32)
        if self.maa_rank is None:
            object.__setattr__(self, "maa_rank", 64 if self.n_embd >= 4096 else 32)
        if self.decay_rank is None:
            object.__setattr__(self, "decay_rank", 128 if self.n_embd >= 4096 else 64)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int):
        super().__init__()
        C, R, D = cfg.n_embd, cfg.maa_rank, cfg.decay_rank
        self.layer_id = layer_id
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        # Values are overwritten by init_weights() or a checkpoint; shapes follow the official keys.
        self.time_maa_x = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * R))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, R, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, D))
        self.time_decay_w2 = nn.Parameter(torch.zeros(D, C))
        self.time_faaaa = nn.Parameter(torch.zeros(self.n_head, self.head_size))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=64e-5)  # eps = 1e-5 * head_size_divisor(8)^2
        # The WKV call; RWKV6.compile_blocks() swaps in a version that torch.compile leaves alone
        # (the kernels are already fused), so the elementwise work around it gets fused instead.
        self.wkv_fn = wkv6
        # ln_x and the gate product (B*T, C) -> (B*T, C); compile_blocks(fused_norm_gate=True) swaps in
        # the fused Triton kernels.
        self.norm_gate_fn = norm_gate
        # None: the LoRA bmm and the five interpolations below as PyTorch ops; compile_blocks(fused_mix=True)
        # sets ops.maa_mix's fused kernels: (x, xx (M, C), maa (5, C), h (5, M, R), w2 (5, R, C)) -> (5, M, C).
        self.maa_mix_fn = None

    def forward(
        self,
        x: torch.Tensor,
        shift: Optional[torch.Tensor] = None,
        wkv_state: Optional[torch.Tensor] = None,
        backend: str = "auto",
        valid: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, C) normalised input; shift: (B, C) last input of the previous call;
        wkv_state: (B, H, N, N) float32. valid: optional (B, T) bool, False on right padding:
        padded steps leave the state untouched. cu_seqlens: (S + 1,) int offsets of S sequences
        packed in one row (B = 1, training only): the shift and the WKV state restart at each start.
        Returns (out, new_shift, new_wkv_state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        dt = compute_dtype(x)
        x = x.to(dt)
        xx = token_shift(x, shift, cu_seqlens) - x  # shift(x) - x
        xxx = x + xx * self.time_maa_x.to(dt)
        m = torch.tanh(xxx @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)  # (5, B*T, R)
        if self.maa_mix_fn is not None:
            maa = torch.cat([self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r,
                             self.time_maa_g]).view(5, C)
            mixed = self.maa_mix_fn(x.reshape(B * T, C), xx.reshape(B * T, C), maa, m, self.time_maa_w2)
            xw, xk, xv, xr, xg = mixed.view(5, B, T, C).unbind(0)
        else:
            m = torch.bmm(m, self.time_maa_w2).view(5, B, T, C)  # (5, B, T, C)
            mw, mk, mv, mr, mg = m.unbind(0)
            xw = x + xx * (self.time_maa_w.to(dt) + mw)
            xk = x + xx * (self.time_maa_k.to(dt) + mk)
            xv = x + xx * (self.time_maa_v.to(dt) + mv)
            xr = x + xx * (self.time_maa_r.to(dt) + mr)
            xg = x + xx * (self.time_maa_g.to(dt) + mg)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        # The raw decay stays in the parameter's precision (float32 under autocast): exp(-exp(w))
        # is sensitive to it.
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # raw decay (B, T, C)
        if valid is not None:
            # k = 0 and decay = exp(-exp(-inf)) = 1 on padding: the state passes through unchanged.
            k = k.masked_fill(~valid.unsqueeze(-1), 0.0)
            w = w.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        u = self.time_faaaa
        if T == 1 and wkv_state is not None and not torch.is_grad_enabled():
            y, new_state = wkv6_step(*(t.view(B, H, N) for t in (r, k, v, w)), u, wkv_state)
            y = y.view(B, 1, C)
        else:
            y, new_state = self.wkv_fn(
                r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N), w.view(B, T, H, N), u,
                initial_state=wkv_state, output_final_state=cu_seqlens is None, backend=backend,
                cu_seqlens=cu_seqlens,
            )
            y = y.reshape(B, T, C)
        y = self.norm_gate_fn(y.reshape(B * T, C).to(dt), g.reshape(B * T, C), self.ln_x)  # ln_x(y) * g
        out = self.output(y.view(B, T, C))
        return out, _last(x, valid), new_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int):
        super().__init__()
        C, Fd = cfg.n_embd, cfg.dim_ffn
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x, shift=None, valid=None, cu_seqlens=None):
        """x: (B, T, C); shift: (B, C). Returns (out, new_shift)."""
        dt = compute_dtype(x)
        x = x.to(dt)
        xx = token_shift(x, shift, cu_seqlens) - x
        xk = x + xx * self.time_maa_k.to(dt)
        xr = x + xx * self.time_maa_r.to(dt)
        k = torch.relu(self.key(xk)) ** 2
        return torch.sigmoid(self.receptance(xr)) * self.value(k), _last(x, valid)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the token mixing: x's own, or autocast's (bf16) when autocast is on.

    Under autocast (training with --precision bf16) LayerNorm returns float32 and the float32
    time_maa_* parameters would keep every mix in float32, then cast each result to bf16 for its
    matmul; mixing in bf16 instead halves the memory traffic of the token shift, the five LoRA
    mixes and their gradients, which dominate the step's elementwise time. It is the arithmetic of
    bf16 inference and of the original's bf16 training; without autocast nothing changes."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def token_shift(x: torch.Tensor, shift: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor] = None):
    """shift(x)[t] = x[t - 1]; at t = 0 the previous call's last input (or zeros). With packed
    sequences (cu_seqlens), every sequence start sees zeros. (B, T, C) -> (B, T, C)."""
    prev = torch.zeros_like(x[:, 0]) if shift is None else shift.to(x.dtype)
    out = torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)
    if cu_seqlens is not None:
        out = out.index_fill(1, cu_seqlens[:-1], 0.0)
    return out


def _last(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """The last real time step of each row: (B, T, C) -> (B, C)."""
    if valid is None:
        return x[:, -1]
    idx = (valid.long().sum(1) - 1).clamp(min=0)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), idx]


class Block(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C = cfg.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg, layer_id)

    def forward(self, x, state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                backend: str = "auto", valid: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None):
        """x: (B, T, C). state: (att_shift (B, C), wkv (B, H, N, N) fp32, ffn_shift (B, C)) or None.
        Returns (x, new_state)."""
        if self.layer_id == 0:
            # Under bf16 autocast (bf16 training) LayerNorm returns float32; casting here keeps the
            # residual stream (B, T, C) in bf16 through every block, as in the original's bf16
            # training: half the bytes for each residual add, norm input, saved activation and
            # gradient of the stream. Not under fp16 autocast: the stream grows with depth and fp16's
            # range could overflow. Without autocast this is a no-op.
            x = self.ln0(x)
            if compute_dtype(x) == torch.bfloat16:
                x = x.to(torch.bfloat16)
        return self.body(x, state, backend=backend, valid=valid, cu_seqlens=cu_seqlens)

    def body(self, x, state: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
             backend: str = "auto", valid: Optional[torch.Tensor] = None,
             cu_seqlens: Optional[torch.Tensor] = None):
        """The block without ln0: the same code for every layer, so torch.compile can reuse one
        graph for all of them (RWKV6.compile_blocks compiles this)."""
        s_att, s_wkv, s_ffn = (None, None, None) if state is None else state
        a, s_att, s_wkv = self.att(self.ln1(x), s_att, s_wkv, backend=backend, valid=valid, cu_seqlens=cu_seqlens)
        x = x + a
        f, s_ffn = self.ffn(self.ln2(x), s_ffn, valid=valid, cu_seqlens=cu_seqlens)
        x = x + f
        return x, (s_att, s_wkv, s_ffn)
