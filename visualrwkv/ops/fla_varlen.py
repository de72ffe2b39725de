"""A host-sync-free state pass for fla's packed (``cu_seqlens``) RWKV-6 kernel.

fla-core 0.6.0's ``chunk_fwd_h`` sizes its per-chunk state buffer ``h`` (B, NS, H, K, V) from
``split_offsets[-1].item()``: the exact number of chunks over all packed sequences, read back from
the GPU. ``chunk_rwkv6`` calls it once in the forward and once more in the backward (it recomputes
``h``), so a 24-layer packed training step waits for the GPU 48 times and the GPU idles while the
host catches up (profile: 48 of the 67 host syncs of a stage-2 step, ~40 ms of idle GPU).

The buffer only needs *at least* NS rows: every kernel that reads ``h`` addresses it by the global
chunk index from ``chunk_indices``/``split_offsets`` (never by ``h.shape``), so a bound computed on
the host from the packed length and the number of sequences gives the same results with no sync.
The replacement is registered through fla's own backend registry (``fla.backends.register``) for
the ``chunk_fwd_h`` entry point, only for packed calls, and only when the installed fla's
``chunk_fwd_h`` and its kernel have the signatures this was written against; otherwise fla's own
code runs.

The chunk tables (``prime_chunk_indices``, below) remove the last syncs of the packed path: fla
builds its [sequence, chunk] table with a GPU ``repeat_interleave`` (4 syncs per step); the lengths
are known on the host, so the table is built there and handed to fla's memo (H100, 1.6B stage 2:
syncs 7 -> 3 per step, ~3.5 ms; ``benchmarks/results/2026-11-27-h100-f``).
"""
from __future__ import annotations

import inspect
from collections import deque

import torch

# The signature of fla-core 0.6.0's fla.ops.common.chunk_h.chunk_fwd_h.
_EXPECTED_PARAMS = ("k", "v", "g", "g_gamma", "gk", "gv", "h0", "output_final_state", "state_v_first",
                    "cu_seqlens", "chunk_size", "split_size", "states_in_fp32")

# ... and of the Triton kernel it launches (fla.ops.common.chunk_h.chunk_fwd_kernel_h).
_EXPECTED_KERNEL_ARGS = ("k", "v", "h", "g", "g_gamma", "gk", "gv", "h0", "ht", "cu_seqlens", "split_offsets", "T",
                         "H", "K", "V", "BT", "BS", "BK", "BV", "USE_G", "USE_G_GAMMA", "USE_GK", "USE_GV",
                         "USE_INITIAL_STATE", "STORE_FINAL_STATE", "IS_VARLEN", "STATE_V_FIRST")

_enabled = True
_installed: "bool | None" = None


def max_split_chunks(n_tokens: int, n_seqs: int, split_size: int) -> int:
    """An upper bound, from host integers only, on sum_i ceil(len_i / split_size) over n_seqs
    sequences of n_tokens in all: ceil(l / S) = floor((l + S - 1) / S) and a sum of floors is at
    most the floor of the sum."""
    return (n_tokens + n_seqs * (split_size - 1)) // split_size


def set_enabled(flag: bool) -> None:
    """Turn the sync-free path on (default) or off (fla's own ``chunk_fwd_h``; benchmarks' baseline)."""
    global _enabled
    _enabled = bool(flag)


def install() -> bool:
    """Register the sync-free ``chunk_fwd_h`` with fla once. Returns whether it is in use: False
    without fla or when fla's ``chunk_fwd_h`` differs from the version this was written for."""
    global _installed
    if _installed is not None:
        return _installed and _enabled
    _installed = False
    try:
        from fla.backends import BaseBackend, register
        from fla.ops.common import chunk_h
        from fla.ops.utils import prepare_chunk_offsets
    except Exception:
        return False
    signature = inspect.signature(inspect.unwrap(chunk_h.chunk_fwd_h))
    kernel_args = tuple(getattr(getattr(chunk_h, "chunk_fwd_kernel_h", None), "arg_names", None) or ())
    if tuple(signature.parameters) != _EXPECTED_PARAMS or kernel_args != _EXPECTED_KERNEL_ARGS:
        return False  # another fla: its own chunk_fwd_h runs

    class SyncFreeVarlen(BaseBackend):
        backend_type = "visualrwkv_sync_free_varlen"
        priority = 4  # before fla's defaults (5); its opt-in backends are off unless asked for

        def is_enabled(self) -> bool:
            return _enabled

        def chunk_fwd_h_verifier(self, *args, **kwargs):
            a = signature.bind(*args, **kwargs).arguments
            if a.get("cu_seqlens") is None:
                return False, "not a packed call"
            if a["k"].shape[0] != 1:
                return False, "packed calls have one row"
            return True, None

        def chunk_fwd_h(self, k, v, g=None, g_gamma=None, gk=None, gv=None, h0=None, output_final_state=False,
                        state_v_first=False, cu_seqlens=None, chunk_size=64, split_size=None, states_in_fp32=False):
            # k: (1, T, H, K) packed; v: (1, T, H, V); cu_seqlens: (N + 1,) on the GPU.
            B, T, H, K = k.shape
            V = v.shape[-1]
            BS = chunk_size if split_size is None else split_size
            if BS % chunk_size:
                raise ValueError(f"split_size {BS} must be a multiple of chunk_size {chunk_size}")
            N = cu_seqlens.numel() - 1
            split_offsets = prepare_chunk_offsets(cu_seqlens, BS)  # (N + 1,) on the GPU, no sync
            NS = max_split_chunks(T, N, BS)  # >= split_offsets[-1]; rows past it stay unused
            state_shape = (V, K) if state_v_first else (K, V)
            h = k.new_empty(B, NS, H, *state_shape, dtype=torch.float if states_in_fp32 else k.dtype)
            ht = k.new_empty(N, H, *state_shape, dtype=torch.float) if output_final_state else None

            def grid(meta):
                return (-(-K // meta["BK"]) * -(-V // meta["BV"]) * N * H,)

            chunk_h.chunk_fwd_kernel_h[grid](
                k=k, v=v, h=h, g=g, g_gamma=g_gamma, gk=gk, gv=gv, h0=h0, ht=ht,
                cu_seqlens=cu_seqlens, split_offsets=split_offsets, T=T, H=H, K=K, V=V, BT=chunk_size, BS=BS,
                USE_G=g is not None, USE_G_GAMMA=g_gamma is not None, USE_GK=gk is not None,
                USE_GV=gv is not None, STATE_V_FIRST=state_v_first,
            )
            return h, ht

    register("common")(SyncFreeVarlen)
    _installed = True
    return _enabled


# chunk_rwkv6's own chunk size (fla-core 0.6.0 calls its autograd function with chunk_size=None -> 64).
FLA_RWKV6_CHUNK = 64


def prime_chunk_indices(cu_seqlens: torch.Tensor, seq_lens, chunk_size: int = FLA_RWKV6_CHUNK) -> bool:
    """Hand fla the packed call's chunk indices, built from host integers, before the kernels ask.

    fla-core 0.6.0's ``prepare_chunk_indices(cu_seqlens, chunk_size)`` expands per-sequence chunk counts
    with ``repeat_interleave`` on the GPU, which reads the total back (a host sync). ``chunk_rwkv6``
    asks for them once in its forward and ``chunk_gla_bwd_dv`` once more in the backward (with another
    argument spelling), each memoised by the identity of ``cu_seqlens`` in fla's ``tensor_cache``: two
    calls, four syncs per training step. The lengths are known on the host (``build_inputs`` reads them
    back with its other numbers), so this writes the same (n_chunks, 2) [sequence, chunk] table into that
    memo under both spellings, copied without a sync. Returns False (fla computes them itself, as
    before) when the sync-free path is off or fla's memo is not the one this was written for.

    cu_seqlens: (S + 1,) offsets on the GPU, the very tensor the kernels will get; seq_lens: S ints."""
    if not _enabled:
        return False
    cache = _chunk_indices_memo()
    if cache is None:
        return False
    pairs = [(i, j) for i, n in enumerate(seq_lens) for j in range(-(-int(n) // chunk_size))]
    host = torch.tensor(pairs, dtype=cu_seqlens.dtype).reshape(-1, 2)
    if cu_seqlens.is_cuda:
        host = host.pin_memory()
    table = host.to(cu_seqlens.device, non_blocking=True)
    cache.append(((cu_seqlens, chunk_size), {}, table))
    cache.append(((cu_seqlens, chunk_size), {"cu_seqlens_cpu": None}, table))
    return True


def _chunk_indices_memo():
    """fla's memo of ``prepare_chunk_indices`` (a deque of (args, kwargs, result)), or None."""
    try:
        from fla.ops.utils import index
    except Exception:
        return None
    fn = index.prepare_chunk_indices
    if getattr(fn, "__closure__", None) is None or not hasattr(fn, "__wrapped__"):
        return None
    if tuple(inspect.signature(fn.__wrapped__).parameters) != ("cu_seqlens", "chunk_size", "cu_seqlens_cpu"):
        return None
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
    cache = cells["cached"].cell_contents if "cached" in cells else None
    if not isinstance(cache, deque) or (cache.maxlen is not None and cache.maxlen < 2):
        return None
    return cache
