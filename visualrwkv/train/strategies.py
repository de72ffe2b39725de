"""Lightning strategies as ``visualrwkv train --strategy ddp`` sets them up, and what the backward's
matmuls leave to the all-reduce kernels beside them."""
from __future__ import annotations

import collections
import contextlib
import inspect
import os
from typing import Dict

import torch
from lightning.pytorch.strategies import DDPStrategy


def nccl_env(high_priority: int, max_ctas: int) -> Dict[str, str]:
    """The environment that gives the NCCL process group --ddp_nccl_high_priority and --ddp_nccl_ctas.

    PyTorch's ProcessGroupNCCL reads TORCH_NCCL_HIGH_PRIORITY when the group is made; NCCL reads
    NCCL_MAX_CTAS when it makes its communicator (at the first collective). Unset flags leave the
    user's own environment alone.
    """
    env: Dict[str, str] = {}
    if high_priority:
        env["TORCH_NCCL_HIGH_PRIORITY"] = "1"
    if max_ctas:
        env["NCCL_MAX_CTAS"] = str(int(max_ctas))
    return env


def no_buffer_sync_kwargs() -> Dict[str, bool]:
    """DDP's keyword for "do not broadcast the buffers from rank 0 before every forward".

    torch >= 2.13 names it ``forward_sync_buffers`` (``broadcast_buffers`` still works there, with a
    FutureWarning in every run); older torch has only ``broadcast_buffers``.
    """
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class NCCLTunedDDPStrategy(DDPStrategy):
    """DDPStrategy whose process group is made with ``nccl_env`` in the environment.

    Each process (Lightning starts ranks > 0 by running the same command again) sets it just before
    the group is made, so the settings come from the command's flags, not from the shell.
    """

    def __init__(self, nccl_env: Dict[str, str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nccl_env = dict(nccl_env)

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            os.environ.update(self.nccl_env)
        super().setup_distributed()


class BackwardGemmCarveout:
    """The backward's matmuls target ``sms`` fewer SMs than the GPU has (``--ddp_gemm_sm_carveout``).

    cuBLAS's Hopper GEMMs are persistent: one block per SM, each working through several output tiles.
    Under DDP the gradient all-reduce kernels run beside the backward and hold SMs (``--ddp_nccl_ctas``
    of them); a persistent GEMM that finds fewer free SMs than blocks runs its last blocks as a second
    wave, up to twice its time (r63's DDP-4 profile: matmul kernels 174.8 ms per step against 135.8 on
    one GPU). PyTorch's cuBLASLt path honours an SM-count target (``torch._C._set_sm_carveout_experimental``),
    so between ``enter`` and ``exit`` matmuls go to cuBLASLt with that target; the forward, with no
    all-reduce beside it, keeps every SM and PyTorch's default library.
    """

    def __init__(self, sms: int) -> None:
        self.sms = int(sms)
        self._saved = None  # (BLAS backend, carveout) to restore; None outside enter/exit

    @staticmethod
    def supported() -> bool:
        return hasattr(torch._C, "_set_sm_carveout_experimental")

    def enter(self, device: torch.device) -> None:
        if not self.sms or device.type != "cuda" or self._saved is not None:
            return
        self._saved = (torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental())
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(self.sms)

    def exit(self) -> None:
        if self._saved is None:
            return
        backend, carveout = self._saved
        self._saved = None
        torch.backends.cuda.preferred_blas_library(backend)
        torch._C._set_sm_carveout_experimental(carveout)


class LaggedSigtermCheck:
    """Lightning's "did rank 0 get SIGTERM?" check without a host-device synchronisation per step.

    Lightning (>= 2.5.3) starts every training step of a multi-process run by broadcasting rank 0's SIGTERM
    flag and reading it with ``.item()``: on CUDA the host then waits for the GPU to finish the whole previous
    step, and the GPU waits in turn while the host launches the next step's first kernels. Measured on 2 and
    4 H100s (stage 2, 1.6B): 81-86 ms of host time between steps against 13 ms on one GPU, the GPU out of
    work at 35-60% of the step starts.

    Here step k broadcasts asynchronously (a side stream copies the result into pinned host memory behind an
    event) and decides on the broadcast of step k - lag, which finished long ago. Every rank decides on the
    same step's flag, so all stop together, ``lag`` steps later than Lightning would; as there, after a
    barrier, with ``SIGTERMException``. Shapes: each slot is a (1,) int32 tensor on the device and its (1,)
    pinned copy.
    """

    def __init__(self, loop, lag: int = 2) -> None:
        if lag < 1:
            raise ValueError(f"lag {lag}: at least 1 step")
        self.loop, self.lag = loop, int(lag)
        self.pending = collections.deque()  # (host-readable flag, CUDA event or gloo work), oldest first
        self.side = None

    def __call__(self) -> None:
        import torch.distributed as dist
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        trainer = self.loop.trainer
        device = trainer.strategy.root_device
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        if getattr(trainer, "received_sigterm", False):
            flag.fill_(1)  # a kernel, not a copy from pageable memory (which would synchronise)
        work = dist.broadcast(flag, src=0, async_op=True)
        if device.type == "cuda":
            if self.side is None:
                self.side = torch.cuda.Stream(device)
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            done = torch.cuda.Event()
            with torch.cuda.stream(self.side):
                work.wait()  # the side stream, not the step's, waits for the broadcast
                host.copy_(flag, non_blocking=True)
                done.record()
            flag.record_stream(self.side)  # the allocator keeps it until the side stream's copy has run
            self.pending.append((host, done))
        else:
            self.pending.append((flag, work))
        if len(self.pending) <= self.lag:
            return
        host, ready = self.pending.popleft()
        if isinstance(ready, torch.cuda.Event):
            if not ready.query():  # finished steps ago in practice; waiting here is the exception
                ready.synchronize()
        else:
            ready.wait()
        if int(host[0]) == 1:
            with contextlib.suppress(Exception):
                dist.barrier()  # as Lightning: no rank leaves while another is still in a collective
            raise SIGTERMException()


def install_lagged_sigterm_check(trainer, lag: int = 2) -> bool:
    """Replace the training loop's per-step SIGTERM broadcast by ``LaggedSigtermCheck`` (multi-process runs
    of a Lightning that has it). True when installed; a Lightning without the check is left as it is."""
    import torch.distributed as dist

    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if not callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
        return False
    if not (dist.is_available() and dist.is_initialized() and trainer.world_size > 1):
        return False
    if not isinstance(loop.__dict__.get("_broadcast_sigterm_tensor"), LaggedSigtermCheck):
        loop._broadcast_sigterm_tensor = LaggedSigtermCheck(loop, lag)
    return True
