"""Sampling parameters and the logits processor (SPEC §6).

Everything here works on a batch of rows, each with its own parameters, so one decoding step of a
batch that mixes greedy and sampled requests (the server) is a handful of tensor operations.

Order of operations on the next-token logits of a row (V = vocab size):

1. presence / frequency penalties, as in the original ChatRWKV demo: every token that occurred in
   the generated text gets ``presence + count * frequency`` subtracted; after each step every
   count is multiplied by ``penalty_decay`` (0.996) and the chosen token's count grows by 1;
2. banned tokens -> -inf;
3. greedy rows (``temperature == 0``) take the argmax here;
4. sampled rows: divide by the temperature, keep the ``top_k`` largest (0 = all), keep the
   smallest set of most likely tokens whose probability reaches ``top_p`` (1.0 = all), sample.

Sampling uses one ``torch.Generator`` per row seeded from the row's ``seed``, so a seeded request
gives the same tokens whether it runs alone or inside any batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import torch

from visualrwkv.errors import UserError

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` means greedy decoding (the benchmark setting). ``stop`` lists extra stop
    strings; the SPEC §6 rules (token 261 or 0, or ``"\\n\\n"`` in the text) always apply.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996
    banned_tokens: Sequence[int] = ()
    stop: Sequence[str] = ()
    seed: Optional[int] = None

    @classmethod
    def greedy(cls, max_new_tokens: int = 256, **kw) -> "SamplingParams":
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, **kw)

    @classmethod
    def chat(cls, **kw) -> "SamplingParams":
        """ChatRWKV's chat defaults: temperature 1.0, top-p 0.3, frequency penalty 1.0 (decay 0.996)."""
        base = dict(temperature=1.0, top_p=0.3, presence_penalty=0.0, frequency_penalty=1.0)
        base.update(kw)
        return cls(**base)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int = 65536) -> "SamplingParams":
        """Raise ``UserError`` for values that make no sense; return self."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0):  # also catches NaN
            raise UserError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0 < self.penalty_decay <= 1):
            raise UserError(f"penalty_decay must be in (0, 1], got {self.penalty_decay!r}")
        for t in self.banned_tokens:
            if not (0 <= int(t) < vocab_size):
                raise UserError(f"banned token {t} is outside the vocabulary (0..{vocab_size - 1})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise UserError(f"stop strings must be non-empty strings, got {s!r}")
        return self

    def with_seed(self) -> "SamplingParams":
        """A copy with a concrete seed (a random one when none was given), so the run can be replayed."""
        if self.seed is not None:
            return self
        return replace(self, seed=int.from_bytes(os.urandom(8), "little") >> 1)


# ---------------------------------------------------------------------------------------------
# Pure functions on logits (B, V); each is unit-tested on its own.
def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, occurred: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits, counts: (B, V) float; occurred: (B, V) bool; presence, frequency: (B,).
    Returns ``logits - occurred * (presence + counts * frequency)``."""
    pen = presence.unsqueeze(1) + counts * frequency.unsqueeze(1)
    return logits - pen * occurred.to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k[b]`` largest logits (0 = keep all); the rest become -inf.
    Ties with the k-th value are kept. logits (B, V); top_k (B,) long."""
    k = top_k.clamp(min=0, max=logits.shape[1])
    if int(k.max()) == 0:
        return logits
    kmax = int(k.max())
    top = logits.topk(kmax, dim=1).values  # (B, kmax), descending
    kth = top.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))  # (B, 1): the k-th largest value
    drop = (logits < kth) & (k > 0).unsqueeze(1)
    return logits.masked_fill(drop, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches
    ``top_p[b]`` (1.0 = keep all; the most likely token is always kept). logits (B, V); top_p (B,)."""
    if bool((top_p >= 1).all()):
        return logits
    sorted_logits, order = logits.sort(dim=1, descending=True)
    probs = sorted_logits.float().softmax(dim=1)
    before = probs.cumsum(dim=1) - probs  # mass of the strictly more likely tokens
    drop_sorted = (before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def sample_from_logits(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row b takes the first token whose cumulative probability exceeds
    ``uniform[b] * total``. logits (B, V) with -inf on excluded tokens; uniform (B,) in [0, 1)."""
    probs = logits.float().softmax(dim=1)
    cdf = probs.cumsum(dim=1)
    target = (uniform.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first index with cdf > target
    idx = idx.clamp(max=logits.shape[1] - 1)
    # Rounding can land on a token of probability 0 at the very end of the CDF: take the argmax then.
    bad = probs.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0
    return torch.where(bad, probs.argmax(dim=1), idx)


# ---------------------------------------------------------------------------------------------
@dataclass
class _RowSettings:
    params: SamplingParams
    generator: Optional[torch.Generator] = field(default=None, repr=False)


class LogitsProcessor:
    """Per-row sampling state of a decoding batch: occurrence counts for the penalties, banned
    tokens, temperature / top-k / top-p, and one random generator per row.

    Rows can be removed (``select``) and appended (``extend``) as requests finish and arrive, which
    is what continuous batching needs. ``counts``/``occurred`` are dense (B, V) tensors on the
    logits' device, the same size as the logits themselves.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device=None):
        self.vocab_size = vocab_size
        self.device = torch.device(device or "cpu")
        self.rows: List[_RowSettings] = []
        B = 0
        self.counts = torch.zeros(B, vocab_size, device=self.device)
        self.occurred = torch.zeros(B, vocab_size, dtype=torch.bool, device=self.device)
        self.banned = torch.zeros(B, vocab_size, dtype=torch.bool, device=self.device)
        self._refresh()
        self.extend(params)

    def __len__(self) -> int:
        return len(self.rows)

    # -- bookkeeping -------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Rebuild the (B,) parameter tensors from the rows' settings."""
        dev, ps = self.device, [r.params for r in self.rows]
        self.temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=dev)
        self.top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev)
        self.top_k = torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev)
        self.presence = torch.tensor([p.presence_penalty for p in ps], dtype=torch.float32, device=dev)
        self.frequency = torch.tensor([p.frequency_penalty for p in ps], dtype=torch.float32, device=dev)
        self.decay = torch.tensor([p.penalty_decay for p in ps], dtype=torch.float32, device=dev)
        self.greedy = torch.tensor([p.is_greedy for p in ps], dtype=torch.bool, device=dev)
        self.any_penalty = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in ps)
        self.any_banned = any(len(p.banned_tokens) for p in ps)

    def extend(self, params: Sequence[SamplingParams]) -> None:
        """Append rows (fresh counts; generators seeded from each row's seed)."""
        if not params:
            return
        new_banned = torch.zeros(len(params), self.vocab_size, dtype=torch.bool, device=self.device)
        for b, p in enumerate(params):
            p.validate(self.vocab_size)
            gen = None
            if not p.is_greedy:
                gen = torch.Generator(device="cpu")  # uniforms are drawn on the CPU: same on any device
                gen.manual_seed(p.with_seed().seed)
            self.rows.append(_RowSettings(p, gen))
            if p.banned_tokens:
                new_banned[b, torch.as_tensor(list(p.banned_tokens), dtype=torch.long)] = True
        n = len(params)
        self.counts = torch.cat([self.counts, torch.zeros(n, self.vocab_size, device=self.device)])
        self.occurred = torch.cat([self.occurred, torch.zeros(n, self.vocab_size, dtype=torch.bool, device=self.device)])
        self.banned = torch.cat([self.banned, new_banned])
        self._refresh()

    def select(self, keep: Sequence[int]) -> None:
        """Keep only these rows (positions in the current batch), in this order."""
        idx = torch.as_tensor(list(keep), dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.counts = self.counts.index_select(0, idx)
        self.occurred = self.occurred.index_select(0, idx)
        self.banned = self.banned.index_select(0, idx)
        self._refresh()

    # -- the processing itself ---------------------------------------------------------------
    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and bans (steps 1-2). logits (B, V) float32 -> (B, V)."""
        if self.any_penalty:
            logits = apply_penalties(logits, self.counts, self.occurred, self.presence, self.frequency)
        if self.any_banned:
            logits = logits.masked_fill(self.banned, NEG_INF)
        return logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick one token per row from processed logits (steps 3-4). Returns (B,) long."""
        greedy_tok = logits.argmax(dim=1)
        if bool(self.greedy.all()):
            return greedy_tok
        t = torch.where(self.greedy, torch.ones_like(self.temperature), self.temperature)
        x = logits / t.unsqueeze(1)
        x = apply_top_k(x, torch.where(self.greedy, torch.zeros_like(self.top_k), self.top_k))
        x = apply_top_p(x, torch.where(self.greedy, torch.ones_like(self.top_p), self.top_p))
        # One uniform per sampled row from that row's own generator (greedy rows draw nothing).
        u = torch.zeros(len(self.rows))
        for b, row in enumerate(self.rows):
            if row.generator is not None:
                u[b] = torch.rand((), generator=row.generator)
        sampled = sample_from_logits(x, u)
        return torch.where(self.greedy, greedy_tok, sampled)

    def update(self, tokens: torch.Tensor) -> None:
        """After a step: decay every count, then count the chosen tokens. tokens (B,) long."""
        if not self.any_penalty:
            return  # counts only matter for rows with a penalty; skip the (B, V) work otherwise
        self.counts.mul_(self.decay.unsqueeze(1))
        rows = torch.arange(tokens.shape[0], device=self.device)
        self.counts[rows, tokens] += 1.0
        self.occurred[rows, tokens] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Process and choose in one call; updates the counts. Returns (B,) tokens."""
        tok = self.choose(self.process(logits))
        self.update(tok)
        return tok
