"""strategies.LaggedSigtermCheck: Lightning's per-step SIGTERM broadcast, decided `lag` steps later on every
rank at once, without reading a device tensor back each step."""
import os
import types

import pytest
import torch


# (rank that gets SIGTERM, before which step's check) -> the step every rank stops at (-1: none)
SCENARIOS = [(0, 3), (1, 1)]


def _worker(rank: int, store: str, out: str, backend: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from visualrwkv.train.strategies import LaggedSigtermCheck, install_lagged_sigterm_check

    import faulthandler

    faulthandler.dump_traceback_later(150, exit=True)  # a hung collective fails the test, with where it hung
    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stops = []
        for sigterm_rank, sigterm_at in SCENARIOS:  # one process group for all (NCCL's start is slow)
            trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=device),
                                            received_sigterm=False)

            class Loop:  # the part of Lightning's training epoch loop that the check replaces
                def _broadcast_sigterm_tensor(self):
                    raise AssertionError("Lightning's own check ran")

            loop = Loop()
            loop.trainer = trainer
            assert install_lagged_sigterm_check(types.SimpleNamespace(
                fit_loop=types.SimpleNamespace(epoch_loop=loop), world_size=2))
            check = loop._broadcast_sigterm_tensor  # what the loop now calls at each step's start
            assert isinstance(check, LaggedSigtermCheck) and check.lag == 2
            stopped = -1
            for step in range(8):
                if rank == sigterm_rank and step == sigterm_at:
                    trainer.received_sigterm = True  # what Lightning's signal handler sets
                try:
                    check()
                except SIGTERMException:
                    stopped = step
                    break
            stops.append(stopped)
            dist.barrier()
        with open(f"{out}.{rank}", "w") as f:
            f.write(" ".join(map(str, stops)))
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # no gloo teardown (see test_train_optim.py)


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")])])
def test_rank0_sigterm_stops_every_rank_lag_steps_later(tmp_path, backend):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "stops"), backend), nprocs=2)
    stops = [open(f"{tmp_path / 'stops'}.{r}").read().split() for r in range(2)]
    # SIGTERM seen by rank 0 before step 3's check: both ranks leave at step 3 + lag, together. Only rank 0's
    # flag is broadcast (as in Lightning): a SIGTERM on rank 1 alone stops nobody here.
    assert stops == [["5", "-1"], ["5", "-1"]]


def test_install_replaces_lightnings_check_only_in_multi_process_runs():
    from visualrwkv.train.strategies import LaggedSigtermCheck, install_lagged_sigterm_check

    class Loop:
        def _broadcast_sigterm_tensor(self):
            raise AssertionError("Lightning's own check")

    loop = Loop()
    trainer = types.SimpleNamespace(fit_loop=types.SimpleNamespace(epoch_loop=loop), world_size=1)
    assert not install_lagged_sigterm_check(trainer)  # one process: nothing to broadcast, nothing replaced
    assert "_broadcast_sigterm_tensor" not in loop.__dict__
    older = types.SimpleNamespace(fit_loop=types.SimpleNamespace(epoch_loop=object()), world_size=2)
    assert not install_lagged_sigterm_check(older)  # a Lightning without the check
    with pytest.raises(ValueError, match="lag 0"):
        LaggedSigtermCheck(loop, lag=0)
