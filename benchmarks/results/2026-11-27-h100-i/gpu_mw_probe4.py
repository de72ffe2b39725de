"""Device probe (not a suite test): the master's last differences between the Triton kernel (variant 2 of
probe 3: moments now bit-equal) and the torch reference: the bias-correction division and the final update."""
import numpy as np
import torch
import triton
import triton.language as tl

from visualrwkv.ops.adamw import reference_adamw_master_


@triton.jit
def k(P, G, W, M, V, n, c1, beta1, c2, beta2, eps, decay, neg_step, bc, DEN: tl.constexpr, UPD: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * 1024 + tl.arange(0, 1024)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0) * decay
    m = tl.fma(g, c1, tl.load(M + offs, mask=mask, other=0.0) * beta1)
    v = tl.fma(g * g, c2, tl.load(V + offs, mask=mask, other=0.0) * beta2)
    if DEN == 0:
        d = tl.sqrt_rn(v) * bc + eps
    else:
        d = tl.div_rn(tl.sqrt_rn(v), bc) + eps
    if UPD == 0:
        w = tl.fma(tl.div_rn(m, d), neg_step, w)
    elif UPD == 1:
        w = w + neg_step * tl.div_rn(m, d)
    else:
        w = tl.fma(neg_step, tl.div_rn(m, d), w)
    tl.store(W + offs, w, mask=mask)
    tl.store(P + offs, w.to(tl.bfloat16), mask=mask)


def test_variants():
    g = torch.Generator(device="cuda").manual_seed(0)
    f32 = lambda x: float(np.float32(x))
    for den, bcf in ((0, lambda b: float(np.float32(1.0) / np.float32(b))), (0, lambda b: f32(1.0 / b)),
                     (1, f32)):
        for upd in (0, 1):
            bad = 0
            tot = 0
            for step in (1, 2, 7, 100):
                n = 300001
                w = torch.randn(n, generator=g, device="cuda")
                a0 = torch.randn(n, generator=g, device="cuda") * 1e-3
                b0 = torch.rand(n, generator=g, device="cuda") * 1e-6
                grad = (torch.randn(n, generator=g, device="cuda") * 1e-3).to(torch.bfloat16)
                lr, b1, b2, eps, wd = 2e-3, 0.9, 0.99, 1e-8, 0.01
                p1, w1, m1, v1 = w.to(torch.bfloat16), w.clone(), a0.clone(), b0.clone()
                reference_adamw_master_(p1, grad, w1, m1, v1, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                                        step=step)
                p2, w2 = w.to(torch.bfloat16), w.clone()
                k[(-(-n // 1024),)](p2, grad, w2, a0.clone(), b0.clone(), n, f32(1 - b1), f32(b1), f32(1 - b2),
                                    f32(b2), f32(eps), f32(1 - lr * wd), f32(-lr / (1 - b1 ** step)),
                                    bcf((1 - b2 ** step) ** 0.5), DEN=den, UPD=upd, num_warps=4,
                                    enable_fp_fusion=False)
                bad += int((w1 != w2).sum())
                tot += n
            print(f"PROBE4 den {den} bc {bcf(0.3)!r} upd {upd}: master mismatches {bad} of {tot}", flush=True)
