"""A small LRU cache of recurrent states after prompt prefixes.

RWKV's whole past is a fixed-size state, so "the prompt so far" can be stored and continued from.
An entry is ``(image_key, prefix ids) -> state (batch 1)``; a new prompt reuses the *longest*
stored prefix of its ids whose image matches, and only the rest is prefilled. Typical hits:

* several questions about one image with ``--image_position first``: the prefix ``"User: " <image>``
  is shared, so the image (and the scan over it) is computed once;
* multi-turn chat with ``first`` or ``last``: the next turn's prompt extends the previous prompt.

With ``middle`` the text before the image holds every human turn (SPEC §5), so a new question
changes the prefix and the image must be scanned again; only the vision tower's output (cached by
the pipeline) is reused then.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

from visualrwkv.constants import IMAGE_TOKEN_INDEX
from visualrwkv.models.rwkv6 import RWKVState


class PrefixStateCache:
    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: "OrderedDict[Tuple[Optional[str], Tuple[int, ...]], RWKVState]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(image_key: Optional[str], ids: Sequence[int]):
        # A prefix without the image does not depend on which image follows: key it with None.
        return (image_key if IMAGE_TOKEN_INDEX in ids else None, tuple(ids))

    def lookup(self, image_key: Optional[str], ids: Sequence[int]) -> Tuple[int, Optional[RWKVState]]:
        """The longest stored proper prefix of ``ids`` (at least one token is left to prefill, whose
        logits start decoding). Returns (prefix length, state) or (0, None)."""
        if self.max_entries <= 0:
            return 0, None
        ids = tuple(ids)
        has_img = IMAGE_TOKEN_INDEX in ids
        best_key, best_len = None, 0
        for key in self._entries:
            k_img, k_ids = key
            n = len(k_ids)
            if n <= best_len or n >= len(ids) or ids[:n] != k_ids:
                continue
            if k_img is not None and (not has_img or k_img != image_key or image_key is None):
                continue
            best_key, best_len = key, n
        if best_key is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self._entries.move_to_end(best_key)
        return best_len, self._entries[best_key]

    def store(self, image_key: Optional[str], ids: Sequence[int], state: RWKVState) -> None:
        """Keep a batch-1 state after ``ids``. A prefix holding the image needs an ``image_key``
        (without one, nothing is stored: the image could not be recognised again)."""
        if self.max_entries <= 0 or (IMAGE_TOKEN_INDEX in ids and image_key is None):
            return
        key = self._key(image_key, ids)
        self._entries[key] = state.clone()
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
