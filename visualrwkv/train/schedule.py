"""Deterministic sample order, learning-rate / weight-decay schedule and optimizer groups (SPEC §7).

Sample order (as the original ``MyDataset``)::

    n records, p = largest prime p < n with p % 3 == 2
    global sample number   s = real_epoch * samples_per_epoch + idx * world_size + rank
                           (samples_per_epoch = epoch_steps * micro_bsz * world_size,
                            idx = 0 .. epoch_steps * micro_bsz - 1 on every rank)
    k = s**3 mod p         (a permutation of 0..p-1 because p % 3 == 2)
    record = records[k]             while s < p   (first pass: the list as given)
             records[n - 1 - k]     when s >= p   (later passes: the reversed list)

The original indexes a reversed copy of the list with k (``list_data_dict_reverse[k]``), which is
``records[n - 1 - k]``; note that this is NOT ``records[-k]`` (that would be ``records[n - k]``).

Learning rate at an optimizer step whose accumulation window starts at micro-step ``m`` of this run
(as the original ``train_callback``, but applied to every parameter group, SPEC §9)::

    real_step   = m + epoch_begin * epoch_steps
    decay_total = (epoch_begin + epoch_count) * epoch_steps
    progress    = clamp((real_step - warmup_steps + 1) / (decay_total - warmup_steps), 0, 1)
    lr          = lr_final + (lr_init - lr_final) * 0.5 * (1 + cos(pi * progress))
                  (lr_init when lr_final == lr_init)
    lr         *= 0.1 + 0.9 * real_step / warmup_steps      while real_step < warmup_steps
    wd          = weight_decay * (weight_decay_final / weight_decay) ** progress
                  when weight_decay_final > 0 (geometric interpolation, the original's
                  exp(log(wd_final / wd) * progress)), else weight_decay

``m`` counts micro-batches (``epoch * epoch_steps + batch_in_epoch``): with ``epoch_steps`` a
multiple of ``accumulate_grad_batches`` it equals the original's ``global_step * accumulate``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, List, Sequence, Set, Tuple

import torch
from torch.utils.data import Sampler

from visualrwkv.errors import UserError


# ---------------------------------------------------------------------------------------------
# sample order
# ---------------------------------------------------------------------------------------------
def _is_prime(x: int) -> bool:
    if x < 2:
        return False
    if x % 2 == 0:
        return x == 2
    i = 3
    while i * i <= x:
        if x % i == 0:
            return False
        i += 2
    return True


def magic_prime(n: int) -> int:
    """Largest prime p < n with p % 3 == 2 (so that s -> s**3 mod p is a permutation)."""
    if n < 3:
        raise UserError(f"the data has {n} usable record(s); the deterministic sample order needs at least 3")
    p = n - 1
    while p >= 2:
        if p % 3 == 2 and _is_prime(p):
            return p
        p -= 1
    raise AssertionError("unreachable: 2 is such a prime")


def record_index(s: int, n: int, p: int) -> int:
    """Record read by global sample number s (see the module docstring)."""
    k = pow(s, 3, p)
    return k if s < p else n - 1 - k


def sample_number(real_epoch: int, idx: int, rank: int, world_size: int, samples_per_epoch: int) -> int:
    """Global sample number of the idx-th sample of a rank in a mini-epoch."""
    return real_epoch * samples_per_epoch + idx * world_size + rank


def records_read(n: int, s_begin: int, s_end: int) -> Set[int]:
    """Record indices read by global samples s_begin <= s < s_end (at most 2p distinct values)."""
    p = magic_prime(n)
    out: Set[int] = set()
    # First pass (s < p): records[k]. A stretch of p consecutive s covers every k.
    a, b = s_begin, min(s_end, p)
    if b - a >= p:
        out.update(range(p))
    else:
        out.update(pow(s, 3, p) for s in range(a, b))
    # Later passes (s >= p): records[n - 1 - k].
    a, b = max(s_begin, p), s_end
    if b > a:
        if b - a >= p:
            out.update(n - 1 - k for k in range(p))
        else:
            out.update(n - 1 - pow(s, 3, p) for s in range(a, b))
    return out


class TrainSampler(Sampler[int]):
    """Yields record indices for one rank, one mini-epoch per ``iter()``.

    The position (mini-epoch of this run, micro-batch within it) is owned by the training
    callback, which advances it as batches are *trained* (not as they are loaded, which runs ahead
    with workers) and saves/restores it with the training state. ``iter()`` starts at that position,
    so a run resumed in the middle of a mini-epoch reads exactly the samples it had not trained yet.
    ``len()`` is always the full mini-epoch (Lightning counts the batches already done itself).
    """

    def __init__(self, n_records: int, epoch_steps: int, micro_bsz: int, epoch_begin: int = 0,
                 world_size: int = 1, rank: int = 0):
        self.n = int(n_records)
        self.p = magic_prime(self.n)
        self.epoch_steps = int(epoch_steps)
        self.micro_bsz = int(micro_bsz)
        self.epoch_begin = int(epoch_begin)
        self.set_world(world_size, rank)
        self.epoch = 0  # mini-epoch of this run (0-based); real epoch = epoch_begin + epoch
        self.batch = 0  # next micro-batch of that mini-epoch to train

    def set_world(self, world_size: int, rank: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.world_size, self.rank = int(world_size), int(rank)
        self.samples_per_epoch = self.epoch_steps * self.micro_bsz * self.world_size

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = int(epoch), int(batch)

    def __len__(self) -> int:
        return self.epoch_steps * self.micro_bsz

    def indices(self, epoch: int, start_batch: int = 0) -> Iterator[int]:
        real_epoch = self.epoch_begin + epoch
        for idx in range(start_batch * self.micro_bsz, self.epoch_steps * self.micro_bsz):
            s = sample_number(real_epoch, idx, self.rank, self.world_size, self.samples_per_epoch)
            yield record_index(s, self.n, self.p)

    def __iter__(self) -> Iterator[int]:
        return self.indices(self.epoch, self.batch)


# ---------------------------------------------------------------------------------------------
# learning rate and weight decay
# ---------------------------------------------------------------------------------------------
def schedule_at(micro_step: int, *, lr_init: float, lr_final: float, warmup_steps: int, epoch_begin: int,
                epoch_count: int, epoch_steps: int, weight_decay: float = 0.0,
                weight_decay_final: float = -1.0) -> Tuple[float, float, float]:
    """(lr, weight decay, progress) for the optimizer step whose window starts at micro_step."""
    real_step = micro_step + epoch_begin * epoch_steps
    w = warmup_steps
    decay_total = (epoch_begin + epoch_count) * epoch_steps
    denom = decay_total - w
    progress = (real_step - w + 1) / denom if denom > 0 else 0.0
    progress = min(1.0, max(0.0, progress))
    if lr_final == lr_init or epoch_count == 0:
        lr = lr_init
    else:
        cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        lr = lr_final + (lr_init - lr_final) * cosine
    if real_step < w:
        lr = lr * (0.1 + 0.9 * real_step / w)
    if weight_decay_final > 0 and weight_decay > 0:
        wd = weight_decay * math.exp(math.log(weight_decay_final / weight_decay) * progress)
    else:
        wd = weight_decay
    return lr, wd, progress


def nontrivial_dims(shape: Sequence[int]) -> int:
    return sum(1 for d in shape if d != 1)


def param_groups(named_params: Iterable[Tuple[str, torch.nn.Parameter]], weight_decay: float
                 ) -> Tuple[List[Dict], List[List[str]]]:
    """AdamW groups over the trainable parameters: with weight_decay > 0, parameters with at least
    two dimensions of size > 1 (matrices, LoRAs, time_faaaa) decay and the rest (LayerNorms,
    (1,1,C) mixing vectors) do not; with weight_decay == 0 one group without decay.
    Returns (groups, names per group); empty groups are left out."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if weight_decay > 0 and nontrivial_dims(p.shape) >= 2:
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    groups, names = [], []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
        names.append(decay_names)
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
        names.append(no_decay_names)
    return groups, names
