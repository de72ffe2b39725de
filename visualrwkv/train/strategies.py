"""Lightning strategies as ``visualrwkv train --strategy ddp`` sets them up."""
from __future__ import annotations

import os
from typing import Dict

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
