"""Recurrent decoding captured in a CUDA graph.

One decoding step of RWKV-6 is ~60 small kernels per layer; launched one by one from Python the
GPU mostly waits for the CPU (measured on an H100: 59 ms per token for the 1.6B shape, eager).
A CUDA graph replays the whole step with one launch. The graph reads its inputs from, and writes
its outputs to, fixed ("static") buffers, so the state lives in buffers owned by this object and
is updated in place on every replay.

    dec = GraphedDecoder(model.rwkv, batch_size=B)   # captures once per batch size
    dec.load_state(state)                            # copy a prefill state in
    logits = dec.step(tokens)                        # (B,) -> (B, V) fp32 view, overwritten next step
    state = dec.state()                              # a copy of the current state
"""
from __future__ import annotations

from typing import Optional

import torch

from visualrwkv.models.rwkv6 import RWKV6, RWKVState


class GraphedDecoder:
    def __init__(self, rwkv: RWKV6, batch_size: int, warmup: int = 3):
        if not torch.cuda.is_available() or rwkv.emb.weight.device.type != "cuda":
            raise RuntimeError("GraphedDecoder needs the model on a CUDA device")
        self.rwkv = rwkv
        self.batch_size = batch_size
        dev = rwkv.emb.weight.device
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.static_state = rwkv.empty_state(batch_size)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            # Warm up on a side stream (allocator and kernel autotuning), as CUDA graphs require.
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(warmup):
                    self._step_body()
            torch.cuda.current_stream().wait_stream(s)
            self.static_state = rwkv.empty_state(batch_size)  # warm-up changed it; start clean
            with torch.cuda.graph(self.graph):
                self.logits = self._step_body()

    def _step_body(self) -> torch.Tensor:
        logits, new = self.rwkv(self.tokens, state=self.static_state, last_only=True)
        # In-place copies keep the state in the same buffers, so the next replay reads it.
        self.static_state.att_shift.copy_(new.att_shift)
        self.static_state.wkv.copy_(new.wkv)
        self.static_state.ffn_shift.copy_(new.ffn_shift)
        return logits.float()

    def load_state(self, state: RWKVState) -> None:
        if state.batch_size != self.batch_size:
            raise ValueError(f"state has batch {state.batch_size}, the graph was captured for {self.batch_size}")
        self.static_state.att_shift.copy_(state.att_shift)
        self.static_state.wkv.copy_(state.wkv)
        self.static_state.ffn_shift.copy_(state.ffn_shift)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B,) long on any device -> logits (B, V) float32 (a static buffer: copy to keep)."""
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits

    def state(self) -> RWKVState:
        return self.static_state.clone()


class DecoderCache:
    """Captured decoders by batch size (capture costs a few hundred ms; replays are cheap)."""

    def __init__(self, rwkv: RWKV6, max_graphs: int = 4):
        self.rwkv = rwkv
        self.max_graphs = max_graphs
        self._graphs = {}

    def get(self, batch_size: int) -> Optional[GraphedDecoder]:
        if batch_size not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[batch_size] = GraphedDecoder(self.rwkv, batch_size)
        return self._graphs[batch_size]
