"""The RWKV-6 WKV operator: one signature, several backends.

Per head, with a state ``S`` of shape (N_key, N_value)::

    y[t, j] = sum_i r[t, i] * (u[i] * k[t, i] * v[t, j] + S[i, j])
    S[i, j] <- S[i, j] * exp(-exp(w[t, i])) + k[t, i] * v[t, j]

``w`` is the *raw* decay (``time_decay + LoRA``), exactly what the original CUDA kernel takes;
the per-step decay is ``exp(-exp(w))`` and its logarithm ``-exp(w)`` is what fla expects.

Layouts: ``r, k, v, w`` are (B, T, H, N); ``u`` is (H, N); states are (B, H, N, N) in float32.
Backends (chosen by the explicit ``backend`` argument, never by the environment):

* ``"reference"``: the recurrence written as a loop over time; slow and obviously right.
* ``"chunked"``: pure PyTorch, parallel inside chunks and recurrent across them; autograd works,
  used for CPU training and inference.
* ``"fla"``: flash-linear-attention's Triton ``chunk_rwkv6`` (CUDA only).
* ``"auto"``: ``fla`` on CUDA tensors when fla is installed, otherwise ``chunked``.

``wkv6_step`` is the one-token update used for decoding.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "chunked", "fla")


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    """True when fla's RWKV-6 kernel can be imported (it needs triton and a CUDA build)."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown WKV backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "fla" if (device.type == "cuda" and fla_available()) else "chunked"
    if backend == "fla":
        if device.type != "cuda":
            raise RuntimeError("the 'fla' WKV backend needs CUDA tensors; use backend='chunked' on a CPU")
        if not fla_available():
            raise RuntimeError("the 'fla' WKV backend needs flash-linear-attention: pip install 'visualrwkv[gpu]'")
    return backend


def _check(r, k, v, w, u, initial_state):
    if r.dim() != 4:
        raise ValueError(f"r, k, v, w must be (B, T, H, N); got r of shape {tuple(r.shape)}")
    for name, x in (("k", k), ("v", v), ("w", w)):
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(r.shape)} like r")
    B, T, H, N = r.shape
    if u.shape != (H, N):
        raise ValueError(f"u must be (H, N) = {(H, N)}; got {tuple(u.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, N, N):
        raise ValueError(f"initial_state must be (B, H, N, N) = {(B, H, N, N)}; got {tuple(initial_state.shape)}")


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = 16,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """WKV6 over a sequence. Returns ``(y, final_state)``; y is (B, T, H, N) in r's dtype,
    final_state (B, H, N, N) float32 when ``output_final_state`` else None.

    cu_seqlens: (S + 1,) offsets of S sequences packed into one row (B must be 1); each sequence
    starts from its own initial state (``initial_state`` is then (S, H, N, N)) and the final
    state is per sequence. This lets training skip padding entirely."""
    be = resolve_backend(backend, r.device)
    _check_call(r, k, v, w, u, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _wkv6_packed(r, k, v, w, u, initial_state, output_final_state, be, chunk_size, cu_seqlens)
    if be == "reference":
        return wkv6_reference(r, k, v, w, u, initial_state, output_final_state)
    if be == "chunked":
        return wkv6_chunked(r, k, v, w, u, initial_state, output_final_state, chunk_size=chunk_size)
    return wkv6_fla(r, k, v, w, u, initial_state, output_final_state)


def _check_call(r, k, v, w, u, initial_state, cu_seqlens):
    """Packed sequences need one row (each sequence is checked when it runs); otherwise the shapes."""
    if cu_seqlens is not None:
        if r.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) need a batch of one row")
    else:
        _check(r, k, v, w, u, initial_state)


def _wkv6_packed(r, k, v, w, u, initial_state, output_final_state, backend, chunk_size, cu_seqlens):
    if backend == "fla":
        return wkv6_fla(r, k, v, w, u, initial_state, output_final_state, cu_seqlens=cu_seqlens)
    # PyTorch backends: one call per sequence (used on CPU and to test the packed path).
    bounds = cu_seqlens.tolist()
    ys, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        s0 = None if initial_state is None else initial_state[i:i + 1]
        y, s = wkv6(r[:, a:b], k[:, a:b], v[:, a:b], w[:, a:b], u, s0, output_final_state, backend, chunk_size)
        ys.append(y)
        states.append(s)
    y = torch.cat(ys, dim=1)
    return y, (torch.cat(states) if output_final_state else None)


def wkv6_reference(r, k, v, w, u, initial_state=None, output_final_state=False):
    """The recurrence, one time step at a time, in float32."""
    B, T, H, N = r.shape
    dtype = r.dtype
    ct = torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64 inputs
    r, k, v, w, u = (x.to(ct) for x in (r, k, v, w, u))
    decay = torch.exp(-torch.exp(w))  # (B, T, H, N)
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, N, N)
        ys.append((r[:, t, :, :, None] * (u[None, :, :, None] * kv + S)).sum(-2))  # (B, H, N)
        S = S * decay[:, t, :, :, None] + kv
    y = torch.stack(ys, dim=1) if T > 0 else r.new_zeros(B, 0, H, N)
    return y.to(dtype), (S if output_final_state else None)


def wkv6_chunked(r, k, v, w, u, initial_state=None, output_final_state=False, chunk_size: int = 16,
                 safe_exponent: float = 20.0):
    """Chunked parallel form in float32 (float64 stays float64).

    Inside a chunk of L steps the pair (t, s < t) carries the factor exp(A[t-1] - A[s]), A being
    the inclusive cumulative log-decay. It is split at the chunk's middle step m as
    exp(A[t-1] - A[m-1]) * exp(A[m-1] - A[s]), which turns the pairs into one matrix product.
    A chunk whose split exponents exceed ``safe_exponent`` (very strong decays, where the split
    would overflow or lose precision) is computed pair by pair with exponents <= 0 instead.
    Across chunks the state is carried with matrix products whose exponents are all <= 0.
    """
    B, T, H, N = r.shape
    dtype = r.dtype
    ct = torch.promote_types(dtype, torch.float32)
    L = int(chunk_size)
    m = L // 2
    r, k, v = (x.to(ct) for x in (r, k, v))
    logw = -torch.exp(w.to(ct))  # (B, T, H, N), <= 0
    u = u.to(ct)
    nc = (T + L - 1) // L
    pad = nc * L - T
    if pad:
        # Padded steps have k = 0 and decay 1, so they leave the state untouched.
        r, k, v, logw = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, k, v, logw))

    def chunks(x):  # (B, T', H, N) -> (B, H, nc, L, N)
        return x.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)

    r, k, v, logw = chunks(r), chunks(k), chunks(v), chunks(logw)
    # Cumulative log-decays in float64: the exponents below are differences of these sums, and
    # float32 sums would lose the small differences next to large ones (strong decays).
    A = torch.cumsum(logw.double(), dim=-2)  # inclusive
    # Exclusive sum by shifting (not A - logw), so that A_prev[t] == A[t-1] bit for bit.
    A_prev = F.pad(A, (0, 0, 1, 0))[..., :-1, :]
    Am = A_prev[..., m:m + 1, :]
    eq, ek = (A_prev - Am).to(ct), (Am - A).to(ct)  # split exponents, (B, H, nc, L, N)
    q = r * torch.exp(eq.clamp(max=safe_exponent))
    kt = k * torch.exp(ek.clamp(max=safe_exponent))
    att = q @ kt.transpose(-1, -2)  # (B, H, nc, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    with torch.no_grad():
        unsafe = torch.maximum(eq.amax(dim=(-1, -2)), ek.amax(dim=(-1, -2))) > safe_exponent  # (B, H, nc)
        idx = unsafe.flatten().nonzero().squeeze(1)
    if idx.numel():
        def pick(x):
            return x.reshape(B * H * nc, L, N).index_select(0, idx)

        D = (pick(A_prev).unsqueeze(-2) - pick(A).unsqueeze(-3)).to(ct)
        D = D.masked_fill(~causal[:, :, None], float("-inf"))
        exact = (pick(r).unsqueeze(-2) * pick(k).unsqueeze(-3) * torch.exp(D)).sum(-1)  # (M, L, L)
        att = att.reshape(B * H * nc, L, L).index_copy(0, idx, exact).view(B, H, nc, L, L)
    bonus = (r * u[None, :, None, None, :] * k).sum(-1)  # (B, H, nc, L): the current-token term
    att = att.masked_fill(~causal, 0.0) + torch.diag_embed(bonus)
    y = att @ v  # (B, H, nc, L, N)

    # Inter-chunk: the state from earlier chunks, decayed to each step.
    r_dec = r * torch.exp(A_prev.to(ct))
    k_dec = (k * torch.exp((A[..., -1:, :] - A).to(ct))).transpose(-1, -2)  # decayed to the chunk's end
    chunk_decay = torch.exp(A[..., -1, :].to(ct)).unsqueeze(-1)  # (B, H, nc, N, 1)
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.to(ct)
    inter = []
    # unbind (not indexing) keeps the backward linear in the number of chunks.
    for rc, kc, vc, dc in zip(r_dec.unbind(2), k_dec.unbind(2), v.unbind(2), chunk_decay.unbind(2)):
        inter.append(rc @ S)  # (B, H, L, N)
        S = S * dc + kc @ vc
    y = y + torch.stack(inter, dim=2)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]
    return y.to(dtype), (S if output_final_state else None)


@functools.lru_cache(maxsize=1)
def _fla_chunk_rwkv6():
    """fla's ``chunk_rwkv6``, with the host-sync-free state pass for packed calls registered
    (``fla_varlen``: same results, no per-layer ``.item()``)."""
    from fla.ops.rwkv6 import chunk_rwkv6

    from visualrwkv.ops import fla_varlen

    fla_varlen.install()
    return chunk_rwkv6


def prepare_packed(cu_seqlens: torch.Tensor, seq_lens, backend: str = "auto") -> None:
    """Before a packed call: give the backend the sequence lengths as host ints (S,) for
    cu_seqlens (S + 1,). fla builds per-chunk tables from them without reading the GPU back
    (``fla_varlen.prime_chunk_indices``); the PyTorch backends need nothing."""
    if seq_lens is None or not cu_seqlens.is_cuda or resolve_backend(backend, cu_seqlens.device) != "fla":
        return
    from visualrwkv.ops import fla_varlen

    fla_varlen.prime_chunk_indices(cu_seqlens, seq_lens)


def wkv6_fla(r, k, v, w, u, initial_state=None, output_final_state=False, cu_seqlens=None, kernel=None):
    """fla's Triton kernel. RWKV-6 needs scale=1.0 and the log-space decay -exp(w).
    ``kernel``: fla's ``chunk_rwkv6`` or a stand-in with its signature (default: imported here)."""
    if kernel is None:
        kernel = _fla_chunk_rwkv6()

    g = -torch.exp(w.float())  # (B, T, H, N) float32 log-decay
    y, final = kernel(
        r, k, v, g, u,
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )
    return y.to(r.dtype), (final.float() if (output_final_state and final is not None) else None)


# fla-core 0.6.0's function-level entry points that ChunkRWKV6Function calls (checked before use).
_FLA_FWD_PARAMS = ("q", "k", "v", "g", "u", "scale", "initial_state", "output_final_state", "cu_seqlens",
                   "chunk_size", "chunk_indices")
_FLA_BWD_PARAMS = ("q", "k", "v", "g", "u", "scale", "initial_state", "A", "do", "dht", "cu_seqlens",
                   "chunk_size", "chunk_indices")


# ... and the pieces chunk_rwkv6_fwd/bwd are made of, which the kept-states ops call one by one.
_FLA_PIECES = {
    "chunk_rwkv6_fwd_cumsum": ("g", "chunk_size", "scale", "cu_seqlens", "chunk_indices"),
    "chunk_fwd_h": ("k", "v", "g", "g_gamma", "gk", "gv", "h0", "output_final_state", "state_v_first",
                    "cu_seqlens", "chunk_size", "split_size", "states_in_fp32"),
    "chunk_rwkv6_fwd_intra": ("q", "k", "gi", "ge", "u", "scale", "cu_seqlens", "chunk_size", "chunk_indices"),
    "chunk_gla_fwd_o_gk": ("q", "v", "g", "A", "h", "scale", "state_v_first", "cu_seqlens", "chunk_size",
                           "chunk_indices", "use_graph"),
    "chunk_rwkv6_bwd_dh": ("q", "k", "v", "gi", "ge", "do", "h0", "dht", "scale", "cu_seqlens", "chunk_size",
                           "states_in_fp32", "chunk_indices"),
    "chunk_gla_bwd_dA": ("v", "do", "scale", "cu_seqlens", "chunk_size", "chunk_indices"),
    "chunk_gla_bwd_dv": ("k", "g", "A", "do", "dh", "state_v_first", "cu_seqlens", "chunk_size", "chunk_indices"),
    "chunk_rwkv6_bwd_dqk_intra": ("q", "k", "gi", "ge", "dA", "cu_seqlens", "chunk_size", "chunk_indices"),
    "chunk_rwkv6_bwd_dqkgu": ("q", "k", "v", "h", "g", "gi", "ge", "u", "do", "dh", "dA", "dq", "dk", "scale",
                              "cu_seqlens", "chunk_size", "chunk_indices"),
}


def _params(fn) -> tuple:
    """A function's parameter names, through decorators' __wrapped__ (() for None: a piece this fla version lacks)."""
    import inspect

    return () if fn is None else tuple(inspect.signature(fn).parameters)


def _on_device(t: torch.Tensor):
    """fla's kernels launch on the current CUDA device (its input_guard sets it): make it t's."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _fla_packed_ops(keep_states: bool = False):
    """The custom ops of ``_build_fla_packed_ops``, built once per variant (``_fla_packed_ops()`` and
    ``_fla_packed_ops(False)`` are the same ops: a second build would register their names twice)."""
    return _build_fla_packed_ops(bool(keep_states))


@functools.lru_cache(maxsize=2)
def _build_fla_packed_ops(keep_states: bool):
    """fla's packed RWKV-6 forward and backward as ``torch.library`` custom ops, or None when fla is
    missing or its entry points differ from fla-core 0.6.0's.

    Why: behind ``torch.compiler.disable`` (``compilable_wkv6``'s default) the WKV call splits every
    compiled block into two graphs, each entered and left in forward and backward; as custom ops the
    block is one graph with the kernels as opaque nodes (as ``norm_gate``). Training calls only: packed
    (cu_seqlens), no initial or final state. Returns ``apply(r, k, v, g, u, cu_seqlens) -> o`` with
    g = -exp(w) in float32, r, k, v (1, T, H, N), u (H, N).

    keep_states: the variant of ``_fla_kept_states_ops`` (the forward keeps what the backward would
    compute again), or None where it is unavailable."""
    if keep_states:
        return _fla_kept_states_ops()
    if not fla_available():
        return None
    _fla_chunk_rwkv6()  # the sync-free state pass
    from fla.ops.rwkv6 import chunk as fla_chunk
    from fla.ops.utils import prepare_chunk_indices

    from visualrwkv.ops.fla_varlen import FLA_RWKV6_CHUNK as chunk_size

    if _params(fla_chunk.chunk_rwkv6_fwd) != _FLA_FWD_PARAMS or _params(fla_chunk.chunk_rwkv6_bwd) != _FLA_BWD_PARAMS:
        return None

    @torch.library.custom_op("visualrwkv::wkv6_fla_packed_fwd", mutates_args=())
    def fwd(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
            cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        r, k, v, g, u = (t.contiguous() for t in (r, k, v, g, u))
        with _on_device(r):
            # chunk_indices: fla's memo, filled from host numbers by prepare_packed (else fla builds it).
            A, _, _, o = fla_chunk.chunk_rwkv6_fwd(
                q=r, k=k, v=v, g=g, u=u, scale=1.0, initial_state=None, output_final_state=False,
                cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                chunk_indices=prepare_chunk_indices(cu_seqlens, chunk_size))
        return o, A

    @fwd.register_fake
    def _(r, k, v, g, u, cu_seqlens):
        # o: like v; A: (B, T, H, chunk) float32, the intra-chunk attention fla keeps for backward.
        return (torch.empty_like(v, memory_format=torch.contiguous_format),
                r.new_empty(*r.shape[:3], chunk_size, dtype=torch.float32))

    @torch.library.custom_op("visualrwkv::wkv6_fla_packed_bwd", mutates_args=())
    def bwd(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
            A: torch.Tensor, do: torch.Tensor, cu_seqlens: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r, k, v, g, u, do = (t.contiguous() for t in (r, k, v, g, u, do))
        with _on_device(r):
            dq, dk, dv, dg, du, _ = fla_chunk.chunk_rwkv6_bwd(
                q=r, k=k, v=v, g=g, u=u, scale=1.0, initial_state=None, A=A, do=do, dht=None,
                cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                chunk_indices=prepare_chunk_indices(cu_seqlens, chunk_size))
        return dq.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), du.to(u.dtype)

    @bwd.register_fake
    def _(r, k, v, g, u, A, do, cu_seqlens):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (r, k, v, g, u))

    def setup_context(ctx, inputs, output):
        r, k, v, g, u, cu_seqlens = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(r, k, v, g, u, output[1], cu_seqlens)

    def backward(ctx, do, _dA):
        r, k, v, g, u, A, cu_seqlens = ctx.saved_tensors
        return (*bwd(r, k, v, g, u, A, do, cu_seqlens), None)

    fwd.register_autograd(backward, setup_context=setup_context)

    def apply(r, k, v, g, u, cu_seqlens):
        return fwd(r, k, v, g, u, cu_seqlens)[0]

    apply.op_name = "visualrwkv::wkv6_fla_packed_fwd"
    return apply


def _fla_kept_states_ops():
    """Like ``_build_fla_packed_ops(False)``, but the forward also returns what fla's backward would
    compute again — the chunk-wise cumulative decays gi, ge (1, T, H, N) float32 and the per-chunk
    states h (1, NS, H, N, N) float32 — and the backward takes them: two of its kernels (the cumsum and
    the state pass, each as long as in the forward) are not run again, for 3 x (T, C) float32 more saved
    per layer. The same kernels on the same inputs, so the results equal fla's to the bit. Needs the
    sync-free state pass (``fla_varlen``): its h has a row count computable from the shapes
    (``max_split_chunks``), which the op's fake needs; else None. H100, 1.6B stage 2: WKV kernels
    59.6 ms per step instead of 64.8 (``benchmarks/results/2026-11-27-h100-k``)."""
    from visualrwkv.ops import fla_varlen

    if not fla_available():
        return None
    _fla_chunk_rwkv6()  # registers the sync-free state pass
    from fla.ops.rwkv6 import chunk as fla_chunk
    from fla.ops.utils import prepare_chunk_indices
    from fla.ops.utils.constant import RCP_LN2

    from visualrwkv.ops.fla_varlen import FLA_RWKV6_CHUNK as chunk_size

    if not fla_varlen.install() or any(_params(getattr(fla_chunk, name, None)) != params
                                       for name, params in _FLA_PIECES.items()):
        return None

    def n_state_rows(T, n_seqs):  # rows of h that the sync-free state pass allocates
        return fla_varlen.max_split_chunks(T, n_seqs, chunk_size)

    @torch.library.custom_op("visualrwkv::wkv6_fla_packed_keep_fwd", mutates_args=())
    def fwd(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
            cu_seqlens: torch.Tensor) -> List[torch.Tensor]:
        r, k, v, g, u = (t.contiguous() for t in (r, k, v, g, u))
        with _on_device(r):
            # chunk_indices: fla's memo, filled from host numbers by prepare_packed (else fla builds it).
            idx = prepare_chunk_indices(cu_seqlens, chunk_size)
            # chunk_rwkv6_fwd's steps, as fla-core 0.6.0 runs them.
            gi, ge = fla_chunk.chunk_rwkv6_fwd_cumsum(g, chunk_size=chunk_size, scale=RCP_LN2,
                                                      cu_seqlens=cu_seqlens, chunk_indices=idx)
            h, _ = fla_chunk.chunk_fwd_h(k=k, v=v, g=None, gk=gi, gv=None, h0=None, output_final_state=False,
                                         cu_seqlens=cu_seqlens, chunk_size=chunk_size, states_in_fp32=True)
            if h.shape[1] != n_state_rows(k.shape[1], cu_seqlens.numel() - 1):
                raise RuntimeError("wkv6 kept states: fla's state pass is not the sync-free one this was built for")
            A = fla_chunk.chunk_rwkv6_fwd_intra(q=r, k=k, gi=gi, ge=ge, u=u, scale=1.0, cu_seqlens=cu_seqlens,
                                                chunk_size=chunk_size, chunk_indices=idx)
            o = fla_chunk.chunk_gla_fwd_o_gk(q=r, v=v, g=ge, A=A, h=h, scale=1.0, cu_seqlens=cu_seqlens,
                                             chunk_size=chunk_size, chunk_indices=idx)
            return [o, A, gi, ge, h]

    @fwd.register_fake
    def _(r, k, v, g, u, cu_seqlens):
        # o: like v; A: (1, T, H, chunk) float32, the intra-chunk attention; gi, ge like g (float32);
        # h (1, NS, H, N, N) float32.
        B, T, H, N = r.shape
        return [torch.empty_like(v, memory_format=torch.contiguous_format),
                r.new_empty(B, T, H, chunk_size, dtype=torch.float32),
                torch.empty_like(g, dtype=torch.float32, memory_format=torch.contiguous_format),
                torch.empty_like(g, dtype=torch.float32, memory_format=torch.contiguous_format),
                r.new_empty(B, n_state_rows(T, cu_seqlens.shape[0] - 1), H, N, v.shape[-1], dtype=torch.float32)]

    @torch.library.custom_op("visualrwkv::wkv6_fla_packed_keep_bwd", mutates_args=())
    def bwd(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
            saved: List[torch.Tensor], do: torch.Tensor, cu_seqlens: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r, k, v, g, u, do = (t.contiguous() for t in (r, k, v, g, u, do))
        with _on_device(r):
            # chunk_rwkv6_bwd's steps after its recomputation of gi, ge and h.
            A, gi, ge, h = saved
            common = dict(cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                          chunk_indices=prepare_chunk_indices(cu_seqlens, chunk_size))
            dh, _ = fla_chunk.chunk_rwkv6_bwd_dh(q=r, k=k, v=v, gi=gi, ge=ge, do=do, h0=None, dht=None,
                                                 scale=1.0, states_in_fp32=True, **common)
            dA = fla_chunk.chunk_gla_bwd_dA(v=v, do=do, scale=1.0, **common)
            dv = fla_chunk.chunk_gla_bwd_dv(k=k, g=gi, A=A, do=do, dh=dh, **common)
            dq, dk = fla_chunk.chunk_rwkv6_bwd_dqk_intra(q=r, k=k, gi=gi, ge=ge, dA=dA, **common)
            dq, dk, dg, du = fla_chunk.chunk_rwkv6_bwd_dqkgu(q=r, k=k, v=v, h=h, g=g, gi=gi, ge=ge, u=u, do=do,
                                                             dh=dh, dA=dA, dq=dq, dk=dk, scale=1.0, **common)
        return dq.to(r.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), du.to(u.dtype)

    @bwd.register_fake
    def _(r, k, v, g, u, saved, do, cu_seqlens):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (r, k, v, g, u))

    def setup_context(ctx, inputs, output):
        r, k, v, g, u, cu_seqlens = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(r, k, v, g, u, cu_seqlens, *output[1:])

    def backward(ctx, grads):
        # grads: one per output of the list; only o's is used (the rest are not differentiable).
        r, k, v, g, u, cu_seqlens, *saved = ctx.saved_tensors
        return (*bwd(r, k, v, g, u, saved, grads[0], cu_seqlens), None)

    fwd.register_autograd(backward, setup_context=setup_context)

    def apply(r, k, v, g, u, cu_seqlens):
        return fwd(r, k, v, g, u, cu_seqlens)[0]

    apply.op_name = "visualrwkv::wkv6_fla_packed_keep_fwd"
    return apply


def wkv6_fla_packed_op(r, k, v, w, u, cu_seqlens, ops=None):
    """Packed training call (no state) through the custom ops of ``_fla_packed_ops``; same kernels and
    results as ``wkv6_fla``. r, k, v, w: (1, T, H, N); u: (H, N); cu_seqlens: (S + 1,). Returns y (1, T, H, N)."""
    ops = ops or _fla_packed_ops()
    g = -torch.exp(w.float())  # (1, T, H, N) float32 log-decay
    return ops(r, k, v, g, u, cu_seqlens).to(r.dtype)


def compilable_wkv6(custom_op: bool = False, keep_states: bool = False):
    """``wkv6`` for code that torch.compile traces (``RWKV6.compile_blocks``).

    Only the kernel call is left out of the graph: on CUDA with fla, the log-decay ``-exp(w)``
    and the dtype casts around fla's ``chunk_rwkv6`` are traced, so inductor fuses them into the
    decay LoRA's kernel instead of running three more eager passes over a (B, T, C) float32
    tensor per layer; every other case calls the whole of ``wkv6`` opaquely (the PyTorch backends
    have data-dependent loops). fla is looked up once, here, not inside the traced code.

    custom_op: packed calls without state (training) go through ``_fla_packed_ops`` (custom ops inside
    the graph, no graph break); other calls as above. The default of training's ``--compile 1`` (``--wkv_op 1``).
    keep_states: with custom_op, the forward keeps the chunk states for the backward (``_fla_packed_ops``);
    where that variant is unavailable, the recomputing one runs."""
    opaque = torch.compiler.disable(wkv6)
    kernel = ops = None
    if fla_available():
        kernel = torch.compiler.disable(_fla_chunk_rwkv6())
        if custom_op:  # the kept-states variant where asked for and available, else the recomputing one
            ops = (_fla_packed_ops(True) if keep_states else None) or _fla_packed_ops()

    def fn(r, k, v, w, u, initial_state=None, output_final_state=False, backend="auto", chunk_size=16,
           cu_seqlens=None):
        if (ops is not None and r.is_cuda and backend in ("auto", "fla") and cu_seqlens is not None
                and initial_state is None and not output_final_state):
            _check_call(r, k, v, w, u, initial_state, cu_seqlens)
            return wkv6_fla_packed_op(r, k, v, w, u, cu_seqlens, ops), None
        if kernel is not None and r.is_cuda and backend in ("auto", "fla"):
            _check_call(r, k, v, w, u, initial_state, cu_seqlens)
            return wkv6_fla(r, k, v, w, u, initial_state, output_final_state, cu_seqlens, kernel=kernel)
        return opaque(r, k, v, w, u, initial_state, output_final_state, backend, chunk_size, cu_seqlens)

    return fn


def wkv6_step(r, k, v, w, u, state):
    """One decoding step. r, k, v, w: (B, H, N); u: (H, N); state: (B, H, N, N) float32.
    Returns (y (B, H, N) in r's dtype, new_state float32)."""
    dtype = r.dtype
    r, k, v = r.float(), k.float(), v.float()
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, N, N)
    y = (r.unsqueeze(-1) * (u.float().unsqueeze(-1) * kv + state)).sum(-2)
    state = state * torch.exp(-torch.exp(w.float())).unsqueeze(-1) + kv
    return y.to(dtype), state
