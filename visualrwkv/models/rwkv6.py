"""The RWKV-6 (x060) language model (SPEC §2) with a recurrent-state API.

    model = RWKV6(RWKV6Config(n_layer=24, n_embd=2048))
    logits, state = model(input_ids)                     # parallel forward, state after the last token
    logits, state = model(next_ids, state=state)         # continue: equals one longer forward
    logits, state = model(inputs_embeds=x, state=state)  # same, on embeddings (images spliced in)

The state holds per layer the TimeMix shift (B, C), the WKV state (B, H, N, N) in float32 and the
ChannelMix shift (B, C), stacked over layers (see ``RWKVState``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from visualrwkv.layers.rwkv6 import Block, RWKV6Config

__all__ = ["RWKV6", "RWKV6Config", "RWKVState"]


@dataclass
class RWKVState:
    """Recurrent state of all layers. att_shift, ffn_shift: (L, B, C); wkv: (L, B, H, N, N) float32."""

    att_shift: torch.Tensor
    wkv: torch.Tensor
    ffn_shift: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[1]

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.att_shift[i], self.wkv[i], self.ffn_shift[i]

    @staticmethod
    def from_layers(layers: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "RWKVState":
        return RWKVState(
            torch.stack([s[0] for s in layers]), torch.stack([s[1] for s in layers]), torch.stack([s[2] for s in layers])
        )

    def clone(self) -> "RWKVState":
        return RWKVState(self.att_shift.clone(), self.wkv.clone(), self.ffn_shift.clone())

    def copy_(self, other: "RWKVState") -> "RWKVState":
        """Overwrite these buffers in place with ``other``'s values (CUDA graphs' static state)."""
        self.att_shift.copy_(other.att_shift)
        self.wkv.copy_(other.wkv)
        self.ffn_shift.copy_(other.ffn_shift)
        return self

    def select(self, index) -> "RWKVState":
        """Rows of the batch: ``index`` is an int, a list or a LongTensor of batch positions."""
        if isinstance(index, int):
            index = [index]
        idx = torch.as_tensor(index, device=self.wkv.device, dtype=torch.long)
        return RWKVState(self.att_shift.index_select(1, idx), self.wkv.index_select(1, idx),
                         self.ffn_shift.index_select(1, idx))

    def repeat(self, n: int) -> "RWKVState":
        """Tile a batch-1 state n times (several questions about one image)."""
        return RWKVState(self.att_shift.expand(-1, n, -1).clone(), self.wkv.expand(-1, n, -1, -1, -1).clone(),
                         self.ffn_shift.expand(-1, n, -1).clone())

    @staticmethod
    def cat(states: Sequence["RWKVState"]) -> "RWKVState":
        return RWKVState(torch.cat([s.att_shift for s in states], 1), torch.cat([s.wkv for s in states], 1),
                         torch.cat([s.ffn_shift for s in states], 1))

    def to(self, device=None, dtype=None) -> "RWKVState":
        """dtype applies to the shift states only; the WKV state stays float32."""
        return RWKVState(self.att_shift.to(device=device, dtype=dtype), self.wkv.to(device=device),
                         self.ffn_shift.to(device=device, dtype=dtype))


class _InvolutionGather(torch.autograd.Function):
    """``x.gather(1, idx)`` for an ``idx`` that is its own inverse along dim 1 (the scan permutation
    reverses image segments, so applying it twice is the identity).

    The gradient of a gather is a scatter-add into zeros (a memset, then atomic adds); for an
    involution it is the same gather, so backward costs one pass like forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return x.gather(1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return grad.gather(1, idx), None


def involution_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, T, C); idx: (B, T, C) long with idx[b, idx[b, t, c], c] = t. Returns x.gather(1, idx)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _InvolutionGather.apply(x, idx)
    return x.gather(1, idx)


class RWKV6(nn.Module):
    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.grad_cp = False  # gradient checkpointing per block during training (--grad_cp 1)

    # ------------------------------------------------------------------------------------------
    def init_weights(self, seed: Optional[int] = None) -> "RWKV6":
        """Fresh weights following RWKV-6's published initialisation (decay spread from slow to fast
        channels, small LoRAs, zero output projections), so a new model trains well from scratch."""
        # The generator lives where the weights are (a 1.6B model initialises in seconds on a GPU).
        gen = torch.Generator(device=self.emb.weight.device).manual_seed(seed) if seed is not None else None
        cfg = self.cfg
        C, L = cfg.n_embd, cfg.n_layer
        with torch.no_grad():
            self.emb.weight.uniform_(-1e-4, 1e-4, generator=gen)
            nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(cfg.vocab_size / C), generator=gen)
            for ln in [self.ln_out] + [m for b in self.blocks for m in b.modules() if isinstance(m, nn.LayerNorm)]:
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            n = torch.arange(C, dtype=torch.float32, device=self.emb.weight.device)
            ddd = (n / C).view(1, 1, C)
            for i, blk in enumerate(self.blocks):
                r01 = i / max(L - 1, 1)  # 0 at the first layer, 1 at the last
                r10 = 1.0 - i / L  # 1 at the first layer, towards 0 at the last
                a = blk.att
                a.time_maa_x.copy_(1.0 - ddd ** r10)
                a.time_maa_w.copy_(1.0 - ddd ** r10)
                a.time_maa_k.copy_(1.0 - ddd ** r10)
                a.time_maa_v.copy_(1.0 - (ddd ** r10 + 0.3 * r01))
                a.time_maa_r.copy_(1.0 - ddd ** (0.5 * r10))
                a.time_maa_g.copy_(1.0 - ddd ** (0.5 * r10))
                a.time_maa_w1.zero_()
                a.time_maa_w2.uniform_(-0.01, 0.01, generator=gen)
                decay = -6.0 + 5.0 * (n / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
                a.time_decay.copy_(decay.view(1, 1, C))
                a.time_decay_w1.zero_()
                a.time_decay_w2.uniform_(-0.01, 0.01, generator=gen)
                zigzag = ((n + 1) % 3 - 1) * 0.1
                a.time_faaaa.copy_((r01 * (1.0 - n / max(C - 1, 1)) + zigzag).view(cfg.n_head, cfg.head_size))
                nn.init.orthogonal_(a.receptance.weight, gain=1.0, generator=gen)
                nn.init.orthogonal_(a.value.weight, gain=1.0, generator=gen)
                nn.init.orthogonal_(a.key.weight, gain=0.1, generator=gen)
                nn.init.orthogonal_(a.gate.weight, gain=0.1, generator=gen)
                a.output.weight.zero_()
                a.ln_x.weight.fill_(1.0)
                a.ln_x.bias.zero_()
                f = blk.ffn
                f.time_maa_k.copy_(1.0 - ddd ** r10)
                f.time_maa_r.copy_(1.0 - ddd ** r10)
                nn.init.orthogonal_(f.key.weight, gain=1.0, generator=gen)
                f.receptance.weight.zero_()
                f.value.weight.zero_()
        return self

    def compile_blocks(self, dynamic: bool = True, fused_norm_gate: bool = False,
                       wkv_custom_op: bool = False, fused_mix: bool = False,
                       wkv_keep_states: bool = False) -> "RWKV6":
        """Compile each block with torch.compile (GPU training/prefill): fuses the token shift,
        LoRA mixes, norms and gates into few kernels. The WKV kernel itself runs uncompiled.

        fused_norm_gate: run ln_x and the gate product as the fused Triton kernels of
        ``ops.norm_gate`` (CUDA tensors only; custom ops that stay inside the block's graph as opaque
        nodes) instead of inductor's lowering of GroupNorm.
        wkv_custom_op: packed training calls of fla's WKV kernels as custom ops inside the block's graph
        instead of a graph break around them (``ops.wkv6.compilable_wkv6``); training's default
        (``compile_for_training``).
        fused_mix: the time mixing's LoRA output and five interpolations as the fused Triton kernels of
        ``ops.maa_mix`` (CUDA tensors; custom ops inside the graph); opt-in until measured.
        wkv_keep_states: with wkv_custom_op, the WKV forward keeps fla's chunk states and cumulative decays
        for the backward instead of computing them again there (``ops.wkv6._fla_packed_ops``)."""
        from visualrwkv.ops.maa_mix import fused_maa_mix_fn
        from visualrwkv.ops.norm_gate import fused_norm_gate_fn, norm_gate
        from visualrwkv.ops.partition import KeepOutputs
        from visualrwkv.ops.wkv6 import compilable_wkv6

        wkv_fn = compilable_wkv6(custom_op=wkv_custom_op, keep_states=wkv_keep_states)
        gate_fn = fused_norm_gate_fn() if fused_norm_gate else norm_gate
        mix_fn = fused_maa_mix_fn() if fused_mix else None
        # The custom kernels' forward outputs are kept, never recomputed (ops/partition.py).
        options = {"joint_custom_pre_pass": KeepOutputs()}
        # Block.body is the same code for every layer (ln0 of layer 0 stays outside it) and reads no
        # per-layer Python constant, so dynamo builds one graph per input shape class and reuses it
        # for all layers (parameters are graph inputs), instead of one compile per layer.
        for blk in self.blocks:
            blk.att.wkv_fn = wkv_fn
            blk.att.norm_gate_fn = gate_fn
            blk.att.maa_mix_fn = mix_fn
            blk.body = torch.compile(blk.body, dynamic=dynamic, options=options)
        return self

    # ------------------------------------------------------------------------------------------
    def empty_state(self, batch_size: int, device=None, dtype=None) -> RWKVState:
        cfg = self.cfg
        device = device or self.emb.weight.device
        dtype = dtype or self.emb.weight.dtype
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return RWKVState(torch.zeros(L, batch_size, C, device=device, dtype=dtype),
                         torch.zeros(L, batch_size, H, N, N, device=device, dtype=torch.float32),
                         torch.zeros(L, batch_size, C, device=device, dtype=dtype))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)

    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        state: Optional[RWKVState] = None,
        *,
        valid: Optional[torch.Tensor] = None,
        scan_perm: Optional[torch.Tensor] = None,
        backend: str = "auto",
        need_state: bool = True,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[RWKVState]]:
        """Blocks + ln_out. inputs_embeds: (B, T, C). Returns (hidden (B, T, C), new state).

        valid: (B, T) bool, False on right padding (the state is taken at each row's last real token).
        scan_perm: (B, T) long; odd layers see ``x.gather(1, scan_perm)`` and their output is put
        back with the same gather (the permutation is an involution: it reverses image segments).
        cu_seqlens: (S + 1,) offsets when S sequences are packed into one row (training; no state).
        """
        x = inputs_embeds
        new_layers: List = []
        perm_idx = None
        if scan_perm is not None:
            perm_idx = scan_perm.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        for i, blk in enumerate(self.blocks):
            reverse = perm_idx is not None and i % 2 == 1
            if reverse:
                x = involution_gather(x, perm_idx)
            layer_state = None if state is None else state.layer(i)
            if self.grad_cp and self.training and torch.is_grad_enabled():
                x, s = cp.checkpoint(blk, x, layer_state, backend, valid, cu_seqlens, use_reentrant=False)
            else:
                x, s = blk(x, layer_state, backend=backend, valid=valid, cu_seqlens=cu_seqlens)
            if reverse:
                x = involution_gather(x, perm_idx)
            if need_state and cu_seqlens is None:
                new_layers.append(s)
        x = self.ln_out(x)
        return x, (RWKVState.from_layers(new_layers) if new_layers else None)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        state: Optional[RWKVState] = None,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        valid: Optional[torch.Tensor] = None,
        scan_perm: Optional[torch.Tensor] = None,
        backend: str = "auto",
        last_only: bool = False,
    ) -> Tuple[torch.Tensor, RWKVState]:
        """Token ids (B, T) or embeddings (B, T, C) -> (logits (B, T, V) or (B, V) with last_only, state)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h, new_state = self.forward_hidden(x, state, valid=valid, scan_perm=scan_perm, backend=backend)
        if last_only:
            if valid is not None:
                idx = (valid.long().sum(1) - 1).clamp(min=0)
                h = h[torch.arange(h.shape[0], device=h.device), idx]
            else:
                h = h[:, -1]
        return self.head(h), new_state
