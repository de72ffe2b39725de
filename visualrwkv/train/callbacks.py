"""The training callback: schedule, sample position, logs, weight files and the resumable state.

Per micro-batch (``on_train_batch_start``) the learning rate and weight decay of the step are set
on every parameter group (``schedule.schedule_at``). Per micro-batch end the loss is added to
device-side sums (no host synchronisation) and the sample position advances; after each optimizer
step the step's loss (mean over its micro-batches, and over processes) and the lr go to the loggers
and the progress bar, with tokens/s and samples/s measured over the last ``--log_every_n_steps``
steps. At the end of a mini-epoch: one line in ``train_log.txt`` (as the original:
``epoch loss perplexity lr datetime run_epoch``), ``rwkv-<epoch>.pth`` when due, and ``last.ckpt``.

Resuming: ``last.ckpt`` is a Lightning checkpoint (weights that learn, optimizer, loop counters)
plus this callback's state: the sample position (mini-epoch, micro-batch), the partial loss sums of
the mini-epoch, and the random-number state of every process. A run resumed from it reads the same
samples with the same learning rates as a run that was never stopped.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import time
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import numpy as np
import torch

from visualrwkv.checkpoint import save_state_dict_file
from visualrwkv.train.schedule import TrainSampler, schedule_at

LAST_CKPT = "last.ckpt"
LOG_NAME = "train_log.txt"


def weights_path(proj_dir: str, epoch: int) -> str:
    return os.path.join(proj_dir, f"rwkv-{epoch}.pth")


# ---------------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    """This process's random state, in plain types (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_objects(obj: Any) -> List[Any]:
    """The object of every process, in rank order (just [obj] without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: List[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


# ---------------------------------------------------------------------------------------------
class TrainCallback(pl.Callback):
    def __init__(self, cfg, resume_path: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.resume_path = resume_path
        self.sampler: Optional[TrainSampler] = None  # bind() sets these once the data is prepared
        self.dataset = None
        self.data_info: Dict[str, Any] = {}
        self.log_path = os.path.join(cfg.proj_dir, LOG_NAME)
        self.last_path = os.path.join(cfg.proj_dir, LAST_CKPT)
        self.lr = cfg.lr_init
        self.wd = cfg.weight_decay
        self._loaded: Optional[Dict[str, Any]] = None
        self._snapshot: Optional[Dict[str, Any]] = None
        self._reset_epoch_sums()
        self._win_sum: Optional[torch.Tensor] = None
        self._win_n = 0
        self._rate_tokens = 0
        self._rate_samples = 0
        self._rate_t = None
        self.tokens_per_s = 0.0
        self.samples_per_s = 0.0
        self.epoch_losses: List[float] = []  # mean loss of each finished mini-epoch of this run
        self._log_file = None
        self._stopped_early = False

    def bind(self, sampler: TrainSampler, dataset=None, data_info: Optional[Dict[str, Any]] = None) -> None:
        """The Trainer (and so this callback) exists before the data: attach the data here."""
        self.sampler = sampler
        self.dataset = dataset
        self.data_info = data_info or {}

    def _reset_epoch_sums(self) -> None:
        self._ep_sum: Optional[torch.Tensor] = None  # device tensor: sum of micro-batch losses
        self._ep_n = 0  # micro-batches in the sum (host)
        self._carry_sum, self._carry_n = 0.0, 0  # from a resumed state (rank 0 only)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        if self._snapshot is not None:
            return self._snapshot
        return {"epoch": self.sampler.epoch, "batch": self.sampler.batch}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        # Before Lightning creates the data iterator (it does so before on_train_start).
        self.sampler.set_position(state_dict["epoch"], state_dict["batch"])

    def _take_snapshot(self, trainer: "pl.Trainer", done: bool) -> None:
        """Collect the state every process contributes (collective calls: all ranks run this)."""
        total = self._epoch_totals(trainer)
        self._snapshot = {
            "epoch": self.sampler.epoch, "batch": self.sampler.batch, "global_step": int(trainer.global_step),
            "loss_sum": total[0], "loss_n": total[1], "done": bool(done),
            "rng": _gather_objects(_rng_state()), "world_size": int(trainer.world_size),
            "n_records": int(self.sampler.n), "config": self.cfg.flags(),
        }

    def save_state(self, trainer: "pl.Trainer", done: bool = False) -> None:
        self._take_snapshot(trainer, done)
        try:
            trainer.save_checkpoint(self.last_path, weights_only=False)
        finally:
            self._snapshot = None

    # ------------------------------------------------------------------------------ helpers
    def _epoch_totals(self, trainer: "pl.Trainer"):
        """(sum of micro-batch losses, micro-batches) of the current mini-epoch over all processes."""
        device = trainer.strategy.root_device
        s = self._ep_sum.double() if self._ep_sum is not None else torch.zeros((), dtype=torch.float64, device=device)
        t = torch.stack([s + self._carry_sum, torch.tensor(float(self._ep_n + self._carry_n), dtype=torch.float64,
                                                           device=s.device)])
        t = trainer.strategy.reduce(t, reduce_op="sum")
        return float(t[0]), float(t[1])

    def _write_log(self, trainer: "pl.Trainer", text: str) -> None:
        if not trainer.is_global_zero:
            return
        if self._log_file is None:
            os.makedirs(self.cfg.proj_dir, exist_ok=True)
            self._log_file = open(self.log_path, "a", encoding="utf-8")
        self._log_file.write(text if text.endswith("\n") else text + "\n")
        self._log_file.flush()

    def _opt_step_done(self) -> bool:
        b = self.sampler.batch  # micro-batches of this mini-epoch already trained (this one included)
        return b % self.cfg.accumulate_grad_batches == 0 or b == self.cfg.epoch_steps

    # ------------------------------------------------------------------------------ hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.sampler.set_world(trainer.world_size, trainer.global_rank)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        now = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        if self._loaded is not None:
            st = self._loaded
            if trainer.is_global_zero:  # the saved sums are already totals over all processes
                self._carry_sum, self._carry_n = float(st.get("loss_sum", 0.0)), int(st.get("loss_n", 0))
            rngs = st.get("rng") or []
            if rngs:
                _set_rng_state(rngs[trainer.global_rank] if len(rngs) == trainer.world_size else rngs[0])
            self._write_log(trainer, f"RESUMED {now} from {self.resume_path} at mini-epoch "
                                     f"{self.cfg.epoch_begin + st['epoch']} micro-batch {st['batch']} "
                                     f"(optimizer step {st.get('global_step', trainer.global_step)})")
        else:
            self._write_log(trainer, f"NEW RUN {now}\n{self.cfg.flags()}")
        info = self.data_info
        if info:
            self._write_log(trainer, "data: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        self._rate_t = time.perf_counter()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        cfg = self.cfg
        acc = cfg.accumulate_grad_batches
        # First micro-step of this optimizer step's accumulation window, counted over the run.
        micro = self.sampler.epoch * cfg.epoch_steps + (self.sampler.batch // acc) * acc
        self.lr, self.wd, _ = schedule_at(micro, lr_init=cfg.lr_init, lr_final=cfg.lr_final,
                                          warmup_steps=cfg.warmup_steps, epoch_begin=cfg.epoch_begin,
                                          epoch_count=cfg.epoch_count, epoch_steps=cfg.epoch_steps,
                                          weight_decay=cfg.weight_decay, weight_decay_final=cfg.weight_decay_final)
        opt = trainer.optimizers[0]
        decay = getattr(pl_module, "group_is_decay", None) or [g["weight_decay"] > 0 for g in opt.param_groups]
        for group, is_decay in zip(opt.param_groups, decay):
            group["lr"] = self.lr  # every group (the original skipped groups with weight decay)
            if is_decay:
                group["weight_decay"] = self.wd

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        cfg = self.cfg
        loss = getattr(pl_module, "last_loss", None)
        if loss is not None:
            loss = loss.double()  # float64 sums: a resumed mini-epoch adds up exactly like an uninterrupted one
            self._ep_sum = loss if self._ep_sum is None else self._ep_sum + loss
            self._ep_n += 1
            self._win_sum = loss if self._win_sum is None else self._win_sum + loss
            self._win_n += 1
        self._rate_tokens += getattr(pl_module, "batch_tokens", 0)
        self._rate_samples += getattr(pl_module, "batch_samples", 0)
        self.sampler.batch += 1
        if not self._opt_step_done():
            return
        # ---- one optimizer step done
        step = trainer.global_step
        if step % cfg.log_every_n_steps == 0 or self._rate_t is None:
            now = time.perf_counter()
            dt = max(now - (self._rate_t or now), 1e-9)
            # Counted on this process; the other processes see the same amount on average.
            self.tokens_per_s = self._rate_tokens * trainer.world_size / dt
            self.samples_per_s = self._rate_samples * trainer.world_size / dt
            self._rate_tokens = self._rate_samples = 0
            self._rate_t = now
        if self._win_sum is not None:
            win = self._win_sum / self._win_n
        else:  # a step of empty micro-batches only
            win = torch.zeros((), device=trainer.strategy.root_device)
        self._win_sum, self._win_n = None, 0
        sync = trainer.world_size > 1
        pl_module.log("loss", win, on_step=True, on_epoch=False, prog_bar=True, logger=True, sync_dist=sync,
                      batch_size=1)
        pl_module.log_dict({"lr": self.lr, "tokens_per_s": self.tokens_per_s, "samples_per_s": self.samples_per_s},
                           on_step=True, on_epoch=False, prog_bar=True, logger=True, batch_size=1)
        pl_module.log_dict({"weight_decay": float(self.wd), "epoch": float(cfg.epoch_begin + self.sampler.epoch)},
                           on_step=True, on_epoch=False, prog_bar=False, logger=True, batch_size=1)
        if self.sampler.batch == cfg.epoch_steps:
            return  # the mini-epoch end saves the state
        stop = cfg.max_steps > 0 and step >= cfg.max_steps
        periodic = cfg.save_state_every_steps > 0 and step % cfg.save_state_every_steps == 0
        if stop or periodic:
            self.save_state(trainer)
        if stop:
            self._stopped_early = True

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        cfg = self.cfg
        if self.sampler.batch < cfg.epoch_steps:
            return  # stopped inside the mini-epoch (--max_steps): the state was saved at that step
        run_epoch = self.sampler.epoch
        epoch = cfg.epoch_begin + run_epoch
        total, n = self._epoch_totals(trainer)
        mean = total / max(n, 1.0)
        self.epoch_losses.append(mean)
        ppl = math.exp(mean) if mean < 700 else float("inf")
        self._write_log(trainer, f"{epoch} {mean:.6f} {ppl:.4f} {self.lr:.8f} {datetime.datetime.now()} {run_epoch}")
        last = run_epoch == cfg.epoch_count - 1 or (cfg.max_steps > 0 and trainer.global_step >= cfg.max_steps)
        if (cfg.epoch_save > 0 and run_epoch % cfg.epoch_save == 0) or last:
            sd = pl_module.full_state_dict()  # collective for sharded strategies: every rank calls it
            if sd is not None:
                save_state_dict_file(sd, weights_path(cfg.proj_dir, epoch))
        self.sampler.set_position(run_epoch + 1, 0)
        self._reset_epoch_sums()
        self.save_state(trainer, done=run_epoch + 1 >= cfg.epoch_count)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        cfg = self.cfg
        if self.dataset is not None and hasattr(self.dataset, "stats"):
            st = self.dataset.stats
            # Counted on this process (records read here); 0 skipped is the normal case.
            if st.get("n_skipped", 0) or st.get("n_dropped", 0):
                self._write_log(trainer, f"skipped while reading (rank {trainer.global_rank}): "
                                         f"{st.get('n_skipped', 0)} unreadable, {st.get('n_dropped', 0)} too long")
        if self._stopped_early or self.sampler.epoch < cfg.epoch_count:
            self._write_log(trainer, f"STOPPED at optimizer step {trainer.global_step} (mini-epoch "
                                     f"{cfg.epoch_begin + self.sampler.epoch}, micro-batch {self.sampler.batch}); "
                                     f"state in {self.last_path}: run the same command again to continue")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
