"""Probe 5: which rounding torch's fused AdamW gives the decoupled weight decay (grad = m = v = 0 isolates it),
and the Triton kernel's mismatches against torch._fused_adamw_ over steps (1M elements)."""
import torch

from visualrwkv.ops.adamw import adamw_master_

torch.manual_seed(0)
n = 1 << 20
lr, wd = 2e-3, 0.01
w = torch.randn(n, device="cuda")
z = torch.zeros(n, device="cuda")
fw = w.clone()
torch._fused_adamw_([fw], [z.clone()], [z.clone()], [z.clone()], [], [torch.tensor(1.0, device="cuda")], lr=lr,
                    beta1=0.9, beta2=0.99, weight_decay=wd, eps=1e-8, amsgrad=False, maximize=False)
t = torch.tensor(lr, dtype=torch.float32) * torch.tensor(wd, dtype=torch.float32)  # fp32 product
t = float(t)
fma = (w.double() * -t + w.double()).float()
sep = w - (t * w)
mul = w * float(torch.tensor(1 - lr * wd, dtype=torch.float32))
for name, x in (("fma(-(lr wd), w, w)", fma), ("w - (lr wd) w", sep), ("w (1 - lr wd)", mul)):
    print(f"decay as {name}: {int((x != fw).sum())} of {n} differ from fused", flush=True)
for wd in (0.0, 0.01):
    for scale in (None, torch.tensor(1.7, device="cuda")):
        w = torch.randn(n, device="cuda")
        tri = [w.to(torch.bfloat16), w.clone(), z.clone(), z.clone()]
        fu = [w.clone(), z.clone(), z.clone()]
        bad = []
        for step in range(1, 9):
            g = (torch.randn(n, device="cuda") * 1e-3).to(torch.bfloat16)
            adamw_master_(tri[0], g, *tri[1:], lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, step=step,
                          grad_scale=scale, backend="triton")
            torch._fused_adamw_([fu[0]], [g.float()], [fu[1]], [fu[2]], [], [torch.tensor(float(step), device="cuda")],
                                lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd, eps=1e-8, amsgrad=False, maximize=False,
                                grad_scale=scale, found_inf=None)
            bad.append(tuple(int((a != b).sum()) for a, b in zip(tri[1:], fu)))
        print(f"triton vs fused, wd {wd}, scale {scale is not None}: mismatches (master, m, v) per step {bad}", flush=True)
