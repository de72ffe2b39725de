"""Recurrent decoding and short prefills captured in CUDA graphs.

One decoding step of RWKV-6 is ~60 small kernels per layer; launched one by one from Python the
GPU mostly waits for the CPU (measured on an H100: 59 ms per token for the 1.6B shape, eager).
A CUDA graph replays the whole step with one launch. The graph reads its inputs from, and writes
its outputs to, fixed ("static") buffers, so the state lives in buffers owned by this object and
is updated in place on every replay.

    dec = GraphedDecoder(model.rwkv, batch_size=B)   # captures once per batch size
    dec.load_state(state)                            # copy a prefill state in
    logits = dec.step(tokens)                        # (B,) -> (B, V) fp32 view, overwritten next step
    state = dec.state()                              # a copy of the current state

``compile=True`` additionally runs each layer's step through ``torch.compile`` (one graph with
static shapes, shared by all layers), which fuses the elementwise work between the matrix-vector
products: fewer kernels per token inside the graph.

Prefill (image + a short prompt) is launch-bound in the same way; ``PrefillGraphs`` right-pads a
prompt to a length bucket (the padding leaves the state untouched, see ``TimeMix.forward``'s
``valid``) and replays a graph captured for that bucket. ``GraphedTower`` does the same for the
vision tower, whose input shape is fixed.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch

from visualrwkv.layers.rwkv6 import Block
from visualrwkv.models.rwkv6 import RWKV6, RWKVState

log = logging.getLogger(__name__)

# The server captures graphs lazily in one thread (the vision tower in a request thread, prefill and
# decoding in the engine's worker) while others keep launching work: "thread_local" makes a capture
# fail only on this thread's unsafe calls instead of on any CUDA call made elsewhere meanwhile.
CAPTURE_MODE = "thread_local"


def _layer_step(blk: Block, x: torch.Tensor, att_shift: torch.Tensor, wkv: torch.Tensor,
                ffn_shift: torch.Tensor) -> torch.Tensor:
    """One decoding step of one block without ln0: x (B, 1, C) -> (B, 1, C). The block's state
    (att_shift (B, C), wkv (B, H, N, N) fp32, ffn_shift (B, C)) is updated in place."""
    x, (a, w, f) = Block.body(blk, x, (att_shift, wkv, ffn_shift))
    att_shift.copy_(a)
    wkv.copy_(w)
    ffn_shift.copy_(f)
    return x


@functools.lru_cache(maxsize=1)
def compiled_layer_step() -> Callable:
    """``_layer_step`` under torch.compile: fullgraph (the T = 1 path has no kernel call that dynamo
    cannot trace) and static shapes, so it compiles once per batch size. The parameters are graph
    inputs, so every layer reuses the same compiled graph."""
    return torch.compile(_layer_step, fullgraph=True, dynamic=False)


def decode_step_(rwkv: RWKV6, tokens: torch.Tensor, state: RWKVState, compile: bool = False) -> torch.Tensor:
    """One decoding step that updates ``state`` in place: tokens (B, 1) long -> logits (B, V) in
    the model's dtype. Equals ``rwkv(tokens, state=state, last_only=True)``."""
    step = compiled_layer_step() if compile else _layer_step
    x = rwkv.emb(tokens)  # (B, 1, C)
    x = rwkv.blocks[0].ln0(x)
    for i, blk in enumerate(rwkv.blocks):
        x = step(blk, x, state.att_shift[i], state.wkv[i], state.ffn_shift[i])
    return rwkv.head(rwkv.ln_out(x[:, -1]))


def _warm_up(fn: Callable[[], object], n: int) -> None:
    """Run fn n times on a side stream (allocator, autotuning, compilation), as capture requires."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def _need_cuda(module: torch.nn.Module, what: str) -> torch.device:
    dev = next(module.parameters()).device
    if not torch.cuda.is_available() or dev.type != "cuda":
        raise RuntimeError(f"{what} needs the model on a CUDA device")
    return dev


class GraphedDecoder:
    def __init__(self, rwkv: RWKV6, batch_size: int, warmup: int = 3, compile: bool = False):
        dev = _need_cuda(rwkv, "GraphedDecoder")
        self.rwkv = rwkv
        self.batch_size = batch_size
        self.compile = compile
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.static_state = rwkv.empty_state(batch_size)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            _warm_up(self._step_body, warmup)
            self.load_state(rwkv.empty_state(batch_size))  # warm-up changed it; start clean
            with torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
                self.logits = self._step_body()

    def _step_body(self) -> torch.Tensor:
        return decode_step_(self.rwkv, self.tokens, self.static_state, compile=self.compile).float()

    def load_state(self, state: RWKVState) -> None:
        if state.batch_size != self.batch_size:
            raise ValueError(f"state has batch {state.batch_size}, the graph was captured for {self.batch_size}")
        self.static_state.copy_(state)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B,) long on any device -> logits (B, V) float32 (a static buffer: copy to keep)."""
        self.tokens.copy_(tokens.view(-1, 1))
        self.graph.replay()
        return self.logits

    def state(self) -> RWKVState:
        return self.static_state.clone()


class DecoderCache:
    """Captured decoders by batch size (capture costs a few hundred ms; replays are cheap)."""

    def __init__(self, rwkv: RWKV6, max_graphs: int = 4, compile: bool = False):
        self.rwkv = rwkv
        self.max_graphs = max_graphs
        self.compile = compile
        self._graphs = {}

    def get(self, batch_size: int) -> Optional[GraphedDecoder]:
        if batch_size not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[batch_size] = GraphedDecoder(self.rwkv, batch_size, compile=self.compile)
        return self._graphs[batch_size]


def pad_prompt(embeds: torch.Tensor, valid: Optional[torch.Tensor], scan_perm: Optional[torch.Tensor],
               length: int) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Right-pad a spliced prompt to ``length`` positions: embeds (B, T, C) with zeros, valid (B, T)
    with False (all True when None), scan_perm (B, T) with the identity. Padding cannot reach real
    positions (the model is causal and the scan permutation stays inside the image) and leaves the
    state unchanged, so running the padded prompt gives the same logits and state."""
    B, T, C = embeds.shape
    extra = length - T
    dev = embeds.device
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    embeds = torch.cat([embeds, embeds.new_zeros(B, extra, C)], 1)
    valid = torch.cat([valid, valid.new_zeros(B, extra)], 1)
    if scan_perm is not None:
        tail = torch.arange(T, length, device=dev).expand(B, extra)
        scan_perm = torch.cat([scan_perm, tail], 1)
    return embeds, valid, scan_perm


class _PrefillGraph:
    """One captured prefill for (B rows, T positions, with or without the image scan)."""

    def __init__(self, rwkv: RWKV6, B: int, T: int, with_scan: bool, backend: str, pool, warmup: int = 2):
        dev = next(rwkv.parameters()).device
        C = rwkv.cfg.n_embd
        self.rwkv, self.backend = rwkv, backend
        self.embeds = torch.zeros(B, T, C, device=dev, dtype=rwkv.emb.weight.dtype)
        self.valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        self.scan_perm = torch.arange(T, device=dev).expand(B, T).contiguous() if with_scan else None
        self.state_in = rwkv.empty_state(B)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            _warm_up(self._body, warmup)
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                self.logits, self.state_out = self._body()

    def _body(self):
        logits, st = self.rwkv(inputs_embeds=self.embeds, state=self.state_in, valid=self.valid,
                               scan_perm=self.scan_perm, backend=self.backend, last_only=True)
        return logits.float(), st

    def run(self, embeds, valid, scan_perm, state: RWKVState) -> Tuple[torch.Tensor, RWKVState]:
        self.embeds.copy_(embeds)
        self.valid.copy_(valid)
        if scan_perm is not None:
            self.scan_perm.copy_(scan_perm)
        self.state_in.copy_(state)
        self.graph.replay()
        return self.logits.clone(), self.state_out.clone()


class PrefillGraphs:
    """Prefill of short prompts through captured graphs: the prompt is right-padded to the next
    multiple of ``bucket`` positions and a graph per (rows, padded length, image scan or not) is
    captured on first use and kept (least recently used beyond ``max_graphs``). Prompts longer than
    ``max_tokens`` positions in all are compute-bound and run eagerly.

    Call it like the model: ``logits (B, V) float32, state = graphs(embeds, state, valid, scan_perm)``.
    """

    def __init__(self, rwkv: RWKV6, backend: str = "auto", bucket: int = 64, max_tokens: int = 2048,
                 max_graphs: int = 8):
        _need_cuda(rwkv, "PrefillGraphs")
        self.rwkv, self.backend = rwkv, backend
        self.bucket, self.max_tokens, self.max_graphs = bucket, max_tokens, max_graphs
        self._graphs: "OrderedDict[tuple, _PrefillGraph]" = OrderedDict()
        # One memory pool for all of them: they never run at the same time, so their activations
        # can share memory (only each graph's outputs stay reserved).
        self.pool = torch.cuda.graph_pool_handle()
        self.disabled = False

    def __call__(self, embeds: torch.Tensor, state: RWKVState, valid: Optional[torch.Tensor] = None,
                 scan_perm: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, RWKVState]:
        B, T, _ = embeds.shape
        Tb = -(-T // self.bucket) * self.bucket
        if self.disabled or B * Tb > self.max_tokens:
            logits, st = self.rwkv(inputs_embeds=embeds, state=state, valid=valid, scan_perm=scan_perm,
                                   backend=self.backend, last_only=True)
            return logits.float(), st
        key = (B, Tb, scan_perm is not None)
        g = self._graphs.get(key)
        if g is None:
            try:
                g = _PrefillGraph(self.rwkv, B, Tb, scan_perm is not None, self.backend, self.pool)
            except Exception as e:  # capture can fail (memory, a kernel that syncs): stay eager from now on
                log.warning("CUDA graph capture of the prefill failed (%s); prefilling without graphs", e)
                self.disabled = True
                return self(embeds, state, valid, scan_perm)
            self._graphs[key] = g
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return g.run(*pad_prompt(embeds, valid, scan_perm, Tb), state)


class GraphedTower:
    """``model.encode_images`` through a CUDA graph per number of images, up to ``max_images`` (the
    tower's input shape is fixed, so one capture per count serves every later call; more images at
    once are compute-bound and run eagerly)."""

    def __init__(self, model, max_images: int = 4):
        _need_cuda(model.proj, "GraphedTower")
        self.model, self.max_images = model, max_images
        self._graphs: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] > self.max_images:
            return self.model.encode_images(pixel_values)
        key = tuple(pixel_values.shape)
        entry = self._graphs.get(key)
        if entry is None:
            px = pixel_values.clone()
            _warm_up(lambda: self.model.encode_images(px), 2)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=CAPTURE_MODE):
                out = self.model.encode_images(px)
            entry = self._graphs[key] = (graph, px, out)
        graph, px, out = entry
        px.copy_(pixel_values)
        graph.replay()
        return out.clone()
