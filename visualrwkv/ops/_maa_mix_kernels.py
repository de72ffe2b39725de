"""Triton kernels of ``ops/maa_mix.py`` (imported only when the fused backend is first used: triton is
an optional dependency). Module-level so that the helpers resolve in compiled and interpreted runs."""
import triton
import triton.language as tl


@triton.jit
def _lora(Hm, W2, i, rows, rmask, cols, M, C: tl.constexpr, R: tl.constexpr, dtype: tl.constexpr,
          PREC: tl.constexpr):
    # (BLOCK_M, BLOCK_C) tile of h[i] @ w2[i] in float32, rounded to the activations' dtype as the
    # reference's bmm output is; also returns the h[i] tile (BLOCK_M, R).
    rk = tl.arange(0, R)
    # Operands in float32 holding x's dtype's values: with PREC "tf32" (bf16/fp16 activations) the
    # tensor cores multiply them exactly, and Triton's CPU interpreter (tests) computes the same.
    hv = tl.load(Hm + i * M * R + rows[:, None] * R + rk[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    wv = tl.load(W2 + i * R * C + rk[:, None] * C + cols[None, :]).to(tl.float32)
    m = tl.dot(hv, wv, input_precision=PREC).to(dtype).to(tl.float32)
    return m, hv, wv

@triton.jit
def maa_mix_fwd(X, XX, MAA, Hm, W2, Out, M, C: tl.constexpr, R: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: 5 x M x C may pass 2^31
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    offs = rows[:, None] * C + cols[None, :]
    dtype = Out.dtype.element_ty
    x = tl.load(X + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    xx = tl.load(XX + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    for i in tl.static_range(5):
        m, _, _ = _lora(Hm, W2, i, rows, rmask, cols, M, C, R, dtype, PREC)
        a = tl.load(MAA + i * C + cols).to(dtype).to(tl.float32)
        tl.store(Out + i * M * C + offs, (x + xx * (a[None, :] + m)).to(dtype), mask=rmask[:, None])

@triton.jit
def _bwd_one(DOut, XX_t, MAA, Hm, W2, i, rows, rmask, cols, offs, M, C: tl.constexpr, R: tl.constexpr,
             dtype: tl.constexpr, PREC: tl.constexpr):
    # Path i's share of one (row block, column block) tile: dout[i], dout[i] * (maa[i] + m[i]), and
    # dh[i]'s partial sum over these columns (BLOCK_M, R).
    m, _, wv = _lora(Hm, W2, i, rows, rmask, cols, M, C, R, dtype, PREC)
    a = tl.load(MAA + i * C + cols).to(dtype).to(tl.float32)
    do = tl.load(DOut + i * M * C + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    dm = (do * XX_t).to(dtype).to(tl.float32)  # the gradient reaching the LoRA output, rounded as autograd's
    dh = tl.dot(dm, tl.trans(wv), input_precision=PREC)
    return do, do * (a[None, :] + m), dh

@triton.jit
def maa_mix_bwd_rows(DOut, XX, MAA, Hm, W2, DX, DXX, DH, M, C: tl.constexpr, R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
    # One program: rows [m0, m0 + BLOCK_M) x all C columns (the dh sums run over C).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    dtype = DX.dtype.element_ty
    dh0 = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    dh1 = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    dh2 = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    dh3 = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    dh4 = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        offs = rows[:, None] * C + cols[None, :]
        xx = tl.load(XX + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        d0, e0, g0 = _bwd_one(DOut, xx, MAA, Hm, W2, 0, rows, rmask, cols, offs, M, C, R, dtype, PREC)
        d1, e1, g1 = _bwd_one(DOut, xx, MAA, Hm, W2, 1, rows, rmask, cols, offs, M, C, R, dtype, PREC)
        d2, e2, g2 = _bwd_one(DOut, xx, MAA, Hm, W2, 2, rows, rmask, cols, offs, M, C, R, dtype, PREC)
        d3, e3, g3 = _bwd_one(DOut, xx, MAA, Hm, W2, 3, rows, rmask, cols, offs, M, C, R, dtype, PREC)
        d4, e4, g4 = _bwd_one(DOut, xx, MAA, Hm, W2, 4, rows, rmask, cols, offs, M, C, R, dtype, PREC)
        dh0 += g0
        dh1 += g1
        dh2 += g2
        dh3 += g3
        dh4 += g4
        tl.store(DX + offs, (d0 + d1 + d2 + d3 + d4).to(dtype), mask=rmask[:, None])
        tl.store(DXX + offs, (e0 + e1 + e2 + e3 + e4).to(dtype), mask=rmask[:, None])
    rk = tl.arange(0, R)
    hoffs = rows[:, None] * R + rk[None, :]
    tl.store(DH + hoffs, dh0.to(DH.dtype.element_ty), mask=rmask[:, None])
    tl.store(DH + M * R + hoffs, dh1.to(DH.dtype.element_ty), mask=rmask[:, None])
    tl.store(DH + 2 * M * R + hoffs, dh2.to(DH.dtype.element_ty), mask=rmask[:, None])
    tl.store(DH + 3 * M * R + hoffs, dh3.to(DH.dtype.element_ty), mask=rmask[:, None])
    tl.store(DH + 4 * M * R + hoffs, dh4.to(DH.dtype.element_ty), mask=rmask[:, None])

@triton.jit
def maa_mix_bwd_cols(DOut, XX, Hm, DW2, DMAA, M, C: tl.constexpr, R: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # One program: path i x columns [c0, c0 + BLOCK_C) x rows [s * SPLIT * BLOCK_M, (s + 1) * SPLIT * BLOCK_M):
    # partial sums of dw2[i] and dmaa[i] over those rows, one slice per s (summed by the caller, so the
    # result does not depend on scheduling, unlike atomics).
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2)
    rk = tl.arange(0, R)
    dtype = Hm.dtype.element_ty
    dw = tl.zeros((R, BLOCK_C), dtype=tl.float32)
    da = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in tl.static_range(SPLIT):
        rows = (s * SPLIT + j).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        offs = rows[:, None] * C + cols[None, :]
        xx = tl.load(XX + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        do = tl.load(DOut + i * M * C + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        dm = (do * xx).to(dtype).to(tl.float32)
        hv = tl.load(Hm + i * M * R + rows[:, None] * R + rk[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        dw += tl.dot(tl.trans(hv), dm, input_precision=PREC)
        da += tl.sum(dm, axis=0)
    base = s.to(tl.int64) * 5 + i
    tl.store(DW2 + base * R * C + rk[:, None] * C + cols[None, :], dw)
    tl.store(DMAA + base * C + cols, da)
