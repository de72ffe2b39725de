"""Where GPU time goes: run a callable under torch.profiler and print CUDA kernel time by category
and the top kernels, with the GPU's busy fraction of the wall time (low = launch/CPU-bound).

    from gpu_profile import profile_table
    print(profile_table(step, label="stage 2 step"))   # step: a no-argument callable
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Callable

import torch

# First matching pattern (lower-case substring of the kernel name) names the category.
CATEGORIES = [
    ("communication (NCCL)", ("nccl",)),
    ("matmul (cuBLAS/CUTLASS)", ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "gemv", "splitk")),
    ("attention (ViT sdpa)", ("flash", "fmha", "attention")),
    ("ln_x + gate (fused Triton, ops/norm_gate.py)", ("norm_gate_",)),
    ("ln_x (inductor's group_norm kernels)", ("triton_", "group_norm")),
    ("WKV (fla Triton)", ("chunk", "rwkv", "fused_recurrent", "wy_", "_fwd_kernel", "_bwd_kernel")),
    ("fused elementwise (inductor Triton)", ("triton_",)),
    ("optimizer (multi-tensor)", ("multi_tensor", "adam")),
    ("norms / softmax / loss", ("layer_norm", "group_norm", "softmax", "nll", "cross_entropy", "cunn_")),
    ("reductions", ("reduce_kernel",)),
    ("copies / gather / index", ("copy", "gather", "scatter", "index", "cat", "memcpy", "memset", "fill")),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled")),
]


def _category(name: str) -> str:
    low = name.lower()
    for cat, pats in CATEGORIES:
        if cat.startswith("ln_x (inductor"):  # both patterns: an inductor kernel that fuses a group_norm
            if all(p in low for p in pats):
                return cat
        elif any(p in low for p in pats):
            return cat
    return "other"


def profile_table(fn: Callable[[], object], label: str = "", repeat: int = 1, top: int = 12) -> str:
    """Profile ``repeat`` calls of fn (already warmed up) and return a printable breakdown."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / repeat
    return table_from_profile(prof, wall, label, repeat, top)


def table_from_profile(prof, wall: float, label: str = "", repeat: int = 1, top: int = 12) -> str:
    """The breakdown of a finished torch.profiler run covering ``repeat`` steps of ``wall`` seconds each."""
    by_name = defaultdict(lambda: [0.0, 0])
    spans = []  # (start_us, end_us, name) of every kernel, for the idle-gap table
    for ev in prof.events():
        # User annotations (e.g. "Optimizer.step#AdamW.step") are also listed on the GPU timeline as
        # ranges spanning their kernels: counting them would count those kernels twice.
        if ev.device_type == torch.autograd.DeviceType.CUDA and not getattr(ev, "is_user_annotation", False) \
                and "#" not in ev.name:
            by_name[ev.name][0] += ev.device_time / 1e3 / repeat  # ms per call
            by_name[ev.name][1] += 1
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    total = sum(v[0] for v in by_name.values())
    n_kernels = sum(v[1] for v in by_name.values()) / repeat
    cats = defaultdict(float)
    for name, (ms, _) in by_name.items():
        cats[_category(name)] += ms
    lines = [f"profile {label}: wall {wall * 1e3:.1f} ms per call, GPU kernels {total:.1f} ms "
             f"({100 * total / max(wall * 1e3, 1e-9):.0f}% busy), {n_kernels:.0f} kernel launches",
             "| category | ms | share of kernel time |", "|---|---:|---:|"]
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {ms:.2f} | {100 * ms / max(total, 1e-9):.1f}% |")
    lines += ["", f"top {top} kernels", "| kernel | calls | ms |", "|---|---:|---:|"]
    for name, (ms, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {name[:90]} | {calls // repeat} | {ms:.2f} |")
    comm = communication_overlap(spans)
    if comm[0] > 0:
        lines += ["", f"communication kernels {comm[0] / 1e3 / repeat:.2f} ms per call, of which "
                      f"{comm[1] / 1e3 / repeat:.2f} ms with no other kernel running (exposed)"]
    return "\n".join(lines + [""] + idle_gaps(spans, repeat, top))


def communication_overlap(spans):
    """(total, exposed) microseconds of NCCL kernels: exposed = time a communication kernel runs
    while no compute kernel does (compute waits on it or has nothing left to overlap it with).
    spans: (start_us, end_us, name) of every kernel, any streams."""
    comm = [(s, e) for s, e, n in spans if _category(n).startswith("communication")]
    busy = []  # union of the compute kernels' intervals, sorted and disjoint
    for s, e in sorted((s, e) for s, e, n in spans if not _category(n).startswith("communication")):
        if busy and s <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], e)
        else:
            busy.append([s, e])
    total = exposed = 0.0
    for s, e in comm:
        total += e - s
        covered = sum(max(0.0, min(e, be) - max(s, bs)) for bs, be in busy if bs < e and be > s)
        exposed += (e - s) - covered
    return total, exposed


def idle_gaps(spans, repeat: int = 1, top: int = 12, min_us: float = 20.0):
    """Where the GPU waits: every gap of at least min_us between the end of all earlier kernels and
    the start of the next one, charged to the kernel that starts after it (the work the host had not
    launched yet: a sync before it, or slow launching of it). spans: (start_us, end_us, name)."""
    spans = sorted(spans)
    gaps = defaultdict(lambda: [0.0, 0])
    total, n, busy_until = 0.0, 0, None
    for start, end, name in spans:
        if busy_until is not None and start - busy_until >= min_us:
            gaps[name][0] += (start - busy_until) / 1e3 / repeat
            gaps[name][1] += 1
            total += (start - busy_until) / 1e3 / repeat
            n += 1
        busy_until = end if busy_until is None else max(busy_until, end)
    by_cat = defaultdict(float)
    for name, (ms, _) in gaps.items():
        by_cat[_category(name)] += ms
    lines = [f"GPU idle between kernels: {total:.1f} ms per call in {n / repeat:.0f} gaps of >= {min_us:g} us",
             "| idle before a kernel of | ms |", "|---|---:|"]
    lines += [f"| {cat} | {ms:.2f} |" for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    lines += ["", f"top {top} kernels by idle time before them", "| kernel | gaps | idle ms |", "|---|---:|---:|"]
    for name, (ms, count) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {name[:90]} | {count // repeat} | {ms:.2f} |")
    return lines


class SyncSites:
    """Where host-device synchronisations happen, with who called them.

    Inside ``with SyncSites(cuda=True) as sites`` (CUDA's sync debugging on for the block; ``cuda=False``
    counts the warnings of whoever else turned it on) every synchronisation warning is counted by the Python
    frame that raised it (a torch function such as ``torch/cuda/__init__.py``) and the first ``depth`` frames
    outside torch that led to it, so the report names the code to change, not only torch's line.
    """

    def __init__(self, depth: int = 2, cuda: bool = False) -> None:
        import collections

        self.depth, self.cuda = depth, cuda
        self.where = collections.Counter()

    def __enter__(self) -> "SyncSites":
        import warnings

        if self.cuda:
            # Before catching: torch 2.11 warns from set_sync_debug_mode's own line, which is no sync of the code.
            torch.cuda.set_sync_debug_mode("warn")
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show  # restored by catch_warnings on exit
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        frames.reverse()  # innermost first
        # the frame the warning names, then the first frames outside torch that led to it
        names = [f"{_short(filename)}:{lineno}"]
        names += [f"{_short(f.filename)}:{f.lineno} ({f.name})" for f in frames
                  if not _in_torch(f.filename) and f.filename != __file__][: self.depth]
        self.where[" <- ".join(names)] += 1

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def report(self, label: str, top: int = 6) -> str:
        lines = [f"host-device synchronisations in {label}: {self.count}"]
        lines += [f"    {c} x {site}" for site, c in self.where.most_common(top)]
        return "\n".join(lines)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _in_torch(path: str) -> bool:
    """Whether a frame's file is part of the torch package (by its directory: a path merely containing
    "/torch/", such as a virtual environment at /opt/torch/.venv, is not)."""
    return os.path.abspath(path).startswith(_TORCH_DIR)


def _short(path: str) -> str:
    """A file name as the reports show it: from site-packages (or the repository) on."""
    for mark in ("site-packages/", "/visualrwkv/", "/benchmarks/", "/tests/"):
        if mark in path:
            return (mark.strip("/") + "/" if not mark.startswith("site") else "") + path.split(mark)[-1]
    return path


def count_syncs(fn: Callable[[], object], top: int = 6) -> str:
    """Run fn once with CUDA sync debugging on and report the host-device synchronisations it
    makes (each one drains the GPU's queue, which then idles while the host launches again)."""
    torch.cuda.synchronize()
    with SyncSites(cuda=True) as sites:
        fn()
    return sites.report("one call", top)


def wall_and_kernel_ms(step: Callable[[], object], iters: int = 30, profiled: int = 10):
    """(median wall ms of one call of step between CUDA events, host work included; GPU kernel ms per
    call from torch.profiler over ``profiled`` calls: its cost where the host runs ahead, as in a
    compiled training step). step must already be warm (compiled, autotuned)."""
    from torch.profiler import ProfilerActivity, profile

    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    kern = sum(ev.self_device_time_total for ev in prof.key_averages()) / 1e3 / profiled
    return sorted(times)[len(times) // 2], kern
