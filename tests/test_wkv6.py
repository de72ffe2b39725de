"""The WKV6 backends against the slow recurrent reference: outputs, final state and gradients."""
import concurrent.futures

import pytest
import torch

from visualrwkv.ops import resolve_backend, wkv6, wkv6_chunked, wkv6_reference, wkv6_step
from utils import rel

# Raw decays w (decay = exp(-exp(w))): weak ~ 0.993 per step, moderate, strong ~ 0.2 .. 6e-4.
REGIMES = {
    "weak": lambda s, g: torch.randn(s, generator=g) * 0.5 - 5.0,
    "moderate": lambda s, g: torch.randn(s, generator=g) - 1.0,
    "strong": lambda s, g: torch.rand(s, generator=g) * 1.5 + 0.5,
    "mixed": lambda s, g: torch.randn(s, generator=g) * 2.0,
}


def _inputs(B, T, H, N, regime, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = REGIMES[regime]((B, T, H, N), g)
    u = torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    return [x.requires_grad_(requires_grad) for x in (r, k, v, w, u, s0)]


@pytest.mark.parametrize("T", [1, 15, 64, 100, 500])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_chunked_matches_reference(T, regime):
    args = _inputs(2, T, 2, 16, regime, seed=T)
    y1, S1 = wkv6_reference(*args[:5], initial_state=args[5], output_final_state=True)
    gy, gS = torch.randn_like(y1), torch.randn_like(S1)
    g1 = torch.autograd.grad((y1 * gy).sum() + (S1 * gS).sum(), args)
    y2, S2 = wkv6_chunked(*args[:5], initial_state=args[5], output_final_state=True)
    g2 = torch.autograd.grad((y2 * gy).sum() + (S2 * gS).sum(), args)
    assert rel(y2, y1) <= 1e-5
    assert rel(S2, S1) <= 1e-5
    for name, a, b in zip(["r", "k", "v", "w", "u", "initial_state"], g2, g1):
        assert rel(a, b) <= 1e-5, name


@pytest.mark.parametrize("chunk_size", [4, 8, 16, 32])
def test_chunk_sizes_and_no_initial_state(chunk_size):
    r, k, v, w, u, _ = _inputs(1, 37, 3, 8, "moderate", seed=1, requires_grad=False)
    y1, S1 = wkv6_reference(r, k, v, w, u, output_final_state=True)
    y2, S2 = wkv6_chunked(r, k, v, w, u, output_final_state=True, chunk_size=chunk_size)
    assert rel(y2, y1) <= 1e-5 and rel(S2, S1) <= 1e-5


def test_reference_is_the_recurrence_in_float64():
    # The reference itself against the SPEC formula written elementwise, in float64.
    r, k, v, w, u, s0 = (x.double() for x in _inputs(1, 5, 1, 3, "moderate", seed=2, requires_grad=False))
    S = s0[0, 0].clone()
    for t in range(5):
        y = torch.zeros(3, dtype=torch.float64)
        for j in range(3):
            y[j] = sum(r[0, t, 0, i] * (u[0, i] * k[0, t, 0, i] * v[0, t, 0, j] + S[i, j]) for i in range(3))
        for i in range(3):
            for j in range(3):
                S[i, j] = S[i, j] * torch.exp(-torch.exp(w[0, t, 0, i])) + k[0, t, 0, i] * v[0, t, 0, j]
        y_ref, _ = wkv6_reference(r[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], w[:, t:t + 1], u,
                                  initial_state=s0 if t == 0 else S_prev, output_final_state=True)
        S_prev = S.clone().view(1, 1, 3, 3)
        assert torch.allclose(y_ref[0, 0, 0], y, atol=1e-12)


def test_step_equals_sequence():
    r, k, v, w, u, s0 = _inputs(2, 9, 2, 8, "moderate", seed=3, requires_grad=False)
    y_seq, S_seq = wkv6_reference(r, k, v, w, u, initial_state=s0, output_final_state=True)
    S = s0.clone()
    for t in range(9):
        y, S = wkv6_step(r[:, t], k[:, t], v[:, t], w[:, t], u, S)
        assert rel(y, y_seq[:, t]) <= 1e-6
    assert rel(S, S_seq) <= 1e-6


def test_backend_selection_is_explicit():
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError):
        resolve_backend("triton-magic", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("fla", torch.device("cpu"))


def test_shape_errors_are_clear():
    r = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="u must be"):
        wkv6(r, r, r, r, torch.randn(3, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fla_matches_reference_bf16():
    from visualrwkv.ops import fla_available

    if not fla_available():
        pytest.skip("flash-linear-attention is not installed")
    torch.manual_seed(0)
    B, T, H, N = 2, 256, 4, 64
    dev = "cuda"
    r, k, v = (torch.randn(B, T, H, N, device=dev) for _ in range(3))
    w = torch.randn(B, T, H, N, device=dev) - 1.0
    u = torch.randn(H, N, device=dev)
    s0 = torch.randn(B, H, N, N, device=dev)
    args32 = [x.clone().requires_grad_() for x in (r, k, v, w, u, s0)]
    y1, S1 = wkv6_reference(*args32[:5], initial_state=args32[5], output_final_state=True)
    (y1.sum() + S1.sum()).backward()
    args16 = [x.clone().to(torch.bfloat16).requires_grad_() for x in (r, k, v, w, u)]
    y2, S2 = wkv6(*args16, initial_state=s0.clone().requires_grad_(), output_final_state=True, backend="fla")
    (y2.float().sum() + S2.sum()).backward()
    assert rel(y2.float(), y1) < 1e-2 and rel(S2, S1) < 1e-2
    for a, b in zip(args16, args32[:5]):
        assert rel(a.grad.float(), b.grad) < 1e-2


def test_sync_free_chunk_bound_covers_every_split():
    # fla_varlen sizes fla's per-chunk state buffer from host integers: it must never be short.
    from visualrwkv.ops.fla_varlen import max_split_chunks

    g = torch.Generator().manual_seed(0)
    for size in (16, 64, 128):
        for _ in range(200):
            lens = torch.randint(1, 3000, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            exact = sum(-(-n // size) for n in lens)
            bound = max_split_chunks(sum(lens), len(lens), size)
            assert exact <= bound <= exact + len(lens)
    assert all(max_split_chunks(n, 1, 64) == -(-n // 64) for n in range(1, 300))  # one sequence: exact


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fla_packed_is_sync_free_and_exact():
    """Packed (cu_seqlens) fla calls run without a host sync in forward and backward, and give
    bit-identical outputs and gradients to fla's own state pass; both match the reference."""
    from visualrwkv.ops import fla_available, fla_varlen

    if not fla_available():
        pytest.skip("flash-linear-attention is not installed")
    torch.manual_seed(0)
    dev, H, N = "cuda", 32, 64  # the 1.6B model's heads, bf16: the kernels training compiles and tunes
    lens = [77, 300, 1, 130, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)
    T = sum(lens)
    base = [torch.randn(1, T, H, N, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    base.append(torch.randn(1, T, H, N, device=dev, dtype=torch.bfloat16) - 1.0)
    u = torch.randn(H, N, device=dev, dtype=torch.bfloat16)

    def run(enabled):
        fla_varlen.set_enabled(enabled)
        try:
            xs = [x.clone().requires_grad_() for x in base + [u]]
            y, _ = wkv6(*xs, backend="fla", cu_seqlens=cu)
            y.float().pow(2).sum().backward()
            return [y.detach()] + [x.grad for x in xs]
        finally:
            fla_varlen.set_enabled(True)

    assert fla_varlen.install(), "the sync-free state pass did not register with this fla version"
    own = run(False)
    run(True)  # warm-up: autotuning and fla's per-cu_seqlens index caches may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        free = run(True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(free, own):
        assert torch.equal(a, b)
    xs = [x.float().requires_grad_() for x in base + [u]]
    y_ref, _ = wkv6(*xs, backend="reference", cu_seqlens=cu.cpu())
    y_ref.pow(2).sum().backward()
    assert rel(free[0].float(), y_ref) < 1e-2
    for a, b in zip(free[1:], xs):
        assert rel(a.float(), b.grad) < 2e-2


def test_primed_chunk_indices_are_flas_own():
    # fla's per-chunk [sequence, chunk] table, written from host ints into fla's memo, must be exactly
    # what fla computes (its prepare_chunk_indices runs on CPU tensors too), under both call spellings.
    pytest.importorskip("triton")
    try:
        from fla.ops.utils import prepare_chunk_indices
    except Exception:
        pytest.skip("flash-linear-attention is not importable here")
    from visualrwkv.ops import fla_varlen

    g = torch.Generator().manual_seed(0)
    cases = [[577, 100], [64, 128, 1], [0, 5, 0, 64], [3000]]
    cases += [torch.randint(0, 2000, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
              for _ in range(20)]
    for lens in cases:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
        assert fla_varlen.prime_chunk_indices(cu, lens)
        primed = prepare_chunk_indices(cu, 64)
        assert prepare_chunk_indices(cu, 64, cu_seqlens_cpu=None) is primed
        own = prepare_chunk_indices(cu.clone(), 64)  # a new tensor: fla computes it
        assert primed.dtype == own.dtype and torch.equal(primed, own), lens
    fla_varlen.set_enabled(False)
    try:
        assert not fla_varlen.prime_chunk_indices(cu, lens)
    finally:
        fla_varlen.set_enabled(True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fla_packed_with_primed_indices_never_syncs():
    """With the lengths given on the host (prepare_packed), a packed fla call on new offsets runs
    forward and backward without any host sync, and equals the call that lets fla build its tables."""
    from visualrwkv.ops import fla_available
    from visualrwkv.ops.wkv6 import prepare_packed

    if not fla_available():
        pytest.skip("flash-linear-attention is not installed")
    torch.manual_seed(0)
    dev, H, N = "cuda", 32, 64
    lens = [577, 130, 1, 640]
    T = sum(lens)
    base = [torch.randn(1, T, H, N, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    base.append(torch.randn(1, T, H, N, device=dev, dtype=torch.bfloat16) - 1.0)
    u = torch.randn(H, N, device=dev, dtype=torch.bfloat16)

    def run(prime):
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)  # new offsets each call
        torch.cuda.synchronize()
        if prime:
            prepare_packed(cu, lens)
            torch.cuda.set_sync_debug_mode("error")
        try:
            xs = [x.clone().requires_grad_() for x in base + [u]]
            y, _ = wkv6(*xs, backend="fla", cu_seqlens=cu)
            y.float().pow(2).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return [y.detach()] + [x.grad for x in xs]

    own = run(False)  # also the warm-up (autotuning)
    primed = run(True)
    for a, b in zip(primed, own):
        assert torch.equal(a, b)


def test_fla_packed_custom_ops_plumbing_with_stand_in_kernels(monkeypatch):
    # The custom-op route (compilable_wkv6(custom_op=True)) on this CPU: fla's function-level forward and
    # backward are replaced by stand-ins built on the chunked PyTorch backend, so what is checked is the
    # plumbing: arguments (chunk table, scale, no state), fake shapes, autograd pairing, casts, and no
    # graph break under torch.compile(fullgraph=True). The real kernels: the GPU test below.
    pytest.importorskip("triton")
    try:
        from fla.ops.rwkv6 import chunk as fla_chunk
        from fla.ops.utils import prepare_chunk_indices
    except Exception:
        pytest.skip("flash-linear-attention is not importable here")
    from visualrwkv.ops.wkv6 import _fla_packed_ops, wkv6_fla_packed_op

    ops = _fla_packed_ops()
    assert ops is not None, "fla's chunk_rwkv6_fwd/bwd signatures changed"
    seen = []

    def chunked(q, k, v, g, u, cu):
        return wkv6(q, k, v, torch.log(-g), u, backend="chunked", cu_seqlens=cu)[0]

    def fwd(q, k, v, g, u, scale, initial_state, output_final_state, cu_seqlens, chunk_size, chunk_indices):
        assert scale == 1.0 and initial_state is None and not output_final_state and chunk_size == 64
        seen.append(torch.equal(chunk_indices, prepare_chunk_indices(cu_seqlens.clone(), 64)))
        return q.new_zeros(*q.shape[:3], 64, dtype=torch.float32), None, None, chunked(q, k, v, g, u, cu_seqlens)

    def bwd(q, k, v, g, u, scale, initial_state, A, do, dht, cu_seqlens, chunk_size, chunk_indices):
        assert A.shape == (*q.shape[:3], 64) and dht is None

        def vjp():  # in a thread of its own: a custom op's body runs with autograd's dispatch key excluded
            xs = [t.detach().requires_grad_() for t in (q, k, v, g, u)]
            return torch.autograd.grad(chunked(*xs, cu_seqlens), xs, do)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            grads = pool.submit(vjp).result()
        return (*grads, None)

    monkeypatch.setattr(fla_chunk, "chunk_rwkv6_fwd", fwd)
    monkeypatch.setattr(fla_chunk, "chunk_rwkv6_bwd", bwd)
    gen = torch.Generator().manual_seed(0)
    H, N = 2, 8
    step = torch.compile(lambda r, k, v, w, u, cu: wkv6_fla_packed_op(r * 1.0, k, v, w, u, cu, ops) * 2,
                         backend="aot_eager", fullgraph=True, dynamic=True)
    for lens in ([5, 70, 1], [33, 64]):
        T = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
        base = [torch.randn(1, T, H, N, generator=gen) for _ in range(3)]
        base += [torch.randn(1, T, H, N, generator=gen) - 1.0, torch.randn(H, N, generator=gen)]
        probe = torch.randn(1, T, H, N, generator=gen)
        results = []
        for f in (lambda *a: wkv6_fla_packed_op(*a, ops) * 2, step,
                  lambda r, k, v, w, u, cu: wkv6(r, k, v, w, u, backend="chunked", cu_seqlens=cu)[0] * 2):
            xs = [x.clone().requires_grad_() for x in base]
            y = f(*xs, cu)
            (y * probe).sum().backward()
            results.append([y.detach()] + [x.grad for x in xs])
        for got in results[:2]:
            for a, c in zip(got, results[2]):
                assert rel(a, c) <= 1e-5
    assert seen and all(seen)


def test_fla_kept_states_ops_fake_shapes_and_autograd():
    # The kept-states variant's fakes (what torch.compile traces): its extra outputs are shaped from the
    # input shapes alone, h with the sync-free state pass's row bound, and its backward pairs with the
    # forward. Fake tensors only, so it runs wherever fla imports; the real kernels: the GPU test below.
    pytest.importorskip("triton")
    try:
        import fla.ops.rwkv6.chunk  # noqa: F401
    except Exception:
        pytest.skip("flash-linear-attention is not importable here")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from visualrwkv.ops.fla_varlen import max_split_chunks
    from visualrwkv.ops.wkv6 import _fla_packed_ops, wkv6_fla_packed_op

    ops = _fla_packed_ops(True)
    assert ops is not None and ops.op_name == "visualrwkv::wkv6_fla_packed_keep_fwd"
    assert _fla_packed_ops() is _fla_packed_ops(False) is not ops
    T, H, N, S = 300, 4, 64, 3
    with FakeTensorMode(shape_env=ShapeEnv()):
        xs = [torch.empty(1, T, H, N, dtype=torch.bfloat16).requires_grad_() for _ in range(4)]
        u = torch.empty(H, N).requires_grad_()
        cu = torch.empty(S + 1, dtype=torch.int64)
        o, A, gi, ge, h = torch.ops.visualrwkv.wkv6_fla_packed_keep_fwd(*xs, u, cu)
        assert o.shape == (1, T, H, N) and A.shape == (1, T, H, 64) and A.dtype == torch.float32
        assert gi.shape == ge.shape == (1, T, H, N) and gi.dtype == torch.float32
        assert h.shape == (1, max_split_chunks(T, S, 64), H, N, N) and h.dtype == torch.float32
        y = wkv6_fla_packed_op(*xs, u, cu, ops)
        y.float().sum().backward()
        assert all(x.grad.shape == x.shape for x in xs) and u.grad.shape == u.shape
    # Symbolic shapes (as dynamic=True compiles): h's rows follow T and the number of sequences.
    graph = make_fx(lambda *a: torch.ops.visualrwkv.wkv6_fla_packed_keep_fwd(*a), tracing_mode="symbolic")(
        *[torch.randn(1, T, H, N) for _ in range(4)], torch.randn(H, N), torch.tensor([0, 100, 200, T]))
    shapes = [n.meta["val"].shape for n in graph.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
    assert len(shapes) == 5 and len(shapes[4]) == 5 and not str(shapes[4][1]).isdigit()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("keep_states", [False, True])
def test_fla_packed_custom_ops_equal_flas_function_on_gpu(keep_states):
    """The custom-op route gives fla's own results bit for bit (same kernels), eagerly and compiled;
    with the chunk states kept from the forward too (the backward skips their recomputation)."""
    from visualrwkv.ops import fla_available
    from visualrwkv.ops.wkv6 import _fla_packed_ops, prepare_packed, wkv6_fla_packed_op

    if not fla_available():
        pytest.skip("flash-linear-attention is not installed")
    ops = _fla_packed_ops(keep_states)
    assert ops is not None and ops.op_name.endswith("_keep_fwd" if keep_states else "packed_fwd")
    torch.manual_seed(0)
    dev, H, N = "cuda", 32, 64
    lens = [577, 130, 1, 640]
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev)
    prepare_packed(cu, lens)
    base = [torch.randn(1, T, H, N, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    base.append(torch.randn(1, T, H, N, device=dev, dtype=torch.bfloat16) - 1.0)
    base.append(torch.randn(H, N, device=dev))
    # The ops are built outside the traced function, as compilable_wkv6 does (their registration is
    # not traceable).
    compiled = torch.compile(lambda *a: wkv6_fla_packed_op(*a, ops=ops) * 1, fullgraph=True, dynamic=True)
    results = []
    for f in (lambda *a: wkv6(*a[:5], backend="fla", cu_seqlens=a[5])[0],
              lambda *a: wkv6_fla_packed_op(*a, ops=ops), compiled):
        xs = [x.clone().requires_grad_() for x in base]
        y = f(*xs, cu)
        y.float().pow(2).sum().backward()
        results.append([y.detach()] + [x.grad for x in xs])
    names = ["y", "dr", "dk", "dv", "dw", "du"]
    for route, got in zip(("eager op", "compiled op"), results[1:]):
        for name, a, c in zip(names, got, results[0]):
            assert torch.equal(a, c), f"{route}: {name} differs by up to {(a.float() - c.float()).abs().max().item()}"


def test_sync_free_state_pass_registers_with_fla_for_packed_calls_only():
    # Runs wherever fla imports (it needs triton, not a GPU); the GPU test above checks the results.
    pytest.importorskip("triton")
    try:
        from fla.backends import _get_operation_registry
        from fla.ops.common.chunk_h import chunk_fwd_h  # noqa: F401
    except Exception:
        pytest.skip("flash-linear-attention is not importable here")
    from visualrwkv.ops import fla_varlen

    assert fla_varlen.install() and fla_varlen.install()  # once, then the same answer
    backends = [b for b in _get_operation_registry("common")._backends.values()
                if b.backend_type == "visualrwkv_sync_free_varlen"]
    assert len(backends) == 1
    b = backends[0]
    k = torch.zeros(1, 10, 2, 4)
    assert b.verify("chunk_fwd_h", k=k, v=k, cu_seqlens=torch.tensor([0, 3, 10]))[0]
    assert not b.verify("chunk_fwd_h", k=k, v=k)[0]  # unpacked: fla's own path (it has no sync)
    fla_varlen.set_enabled(False)
    try:
        assert not b.is_enabled()
    finally:
        fla_varlen.set_enabled(True)
