"""Triton kernel of ``ops/adamw.py`` (imported only when the Triton backend is first used: triton is an
optional dependency)."""
import triton
import triton.language as tl


@triton.jit
def adamw_master_kernel(P, G, W, M, V, S, BC, n, lr, weight_decay, beta1, beta2, eps,
                        HAS_SCALE: tl.constexpr, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr):
    # torch's fused AdamW CUDA kernel (ATen/native/cuda/fused_adam_utils.cuh, adam_math) operation for
    # operation: the scalars in fp32, its fma where it writes std::fma or nvcc contracts a - b * c, IEEE
    # division and square root (launched without fp fusion, so nothing else is contracted). A last-bit
    # difference moves a bf16 weight by an ulp now and then, and a --master_weights 1 run drifts from the
    # fp32-weight run. P, G: (n,) weight and gradient (bf16); W, M, V: (n,) fp32 master, exp_avg,
    # exp_avg_sq; S: the gradient's divisor (clipping); BC: (2,) [1 - beta1^t, 1 - beta2^t].
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(S))
    w = tl.load(W + offs, mask=mask, other=0.0)
    if HAS_DECAY:
        w = tl.fma(-(lr * weight_decay), w, w)
    m = tl.fma(beta1, tl.load(M + offs, mask=mask, other=0.0), tl.fma(-beta1, g, g))
    gg = g * g
    v = tl.fma(beta2, tl.load(V + offs, mask=mask, other=0.0), tl.fma(-beta2, gg, gg))
    step_size = tl.div_rn(lr, tl.load(BC))  # lr / (1 - beta1^t)
    bc2_sqrt = tl.sqrt_rn(tl.load(BC + 1))  # sqrt(1 - beta2^t)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w - tl.div_rn(step_size * m, denom)
    tl.store(W + offs, w, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    tl.store(P + offs, w.to(P.dtype.element_ty), mask=mask)
