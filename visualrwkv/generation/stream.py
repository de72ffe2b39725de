"""Turning generated tokens into text: UTF-8 safe streaming and the stop rules of SPEC §6.

World-tokenizer tokens are byte strings, and a multi-byte character may be split across tokens
(``"😀"`` is three tokens). ``TextAssembler`` therefore keeps the raw bytes and only ever hands
out complete characters.

The answer is "the decoded text up to the first ``"\\n\\n"`` (or user stop string), stripped".
The stream is kept consistent with that final answer: every delta handed out is a piece of the
final answer, and the deltas joined are exactly the final answer. To get there it holds back:

* an incomplete UTF-8 sequence at the end of the bytes;
* leading whitespace (the answer is stripped; after ``"Assistant:"`` the model writes a space);
* trailing whitespace (it may be stripped at the end, or be the start of ``"\\n\\n"``);
* a tail that could be the start of a user stop string.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from visualrwkv.constants import DOUBLE_NEWLINE_ID, EOT_ID

TURN_END = "\n\n"
STOP_TOKEN_IDS = (DOUBLE_NEWLINE_ID, EOT_ID)


def complete_utf8_length(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character.

    Only a *possibly still growing* character at the very end is cut off: a lead byte followed by
    fewer continuation bytes than it announces. Invalid bytes elsewhere count as complete (they
    decode to U+FFFD and more bytes cannot change that)."""
    n = len(data)
    # A character is at most 4 bytes, so its lead byte is among the last 4.
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:  # ASCII: everything up to here is complete
            return n
        if b >= 0xC0:  # a lead byte: how long is its character?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 1
            return n - back if back < need else n
        # 0x80..0xBF: a continuation byte, keep looking for the lead
    return n


class TextAssembler:
    """Per-row text state: bytes so far, stop detection, and the stream deltas.

    ``push(token_bytes)`` returns ``(delta, stopped)``; ``finish()`` returns the last delta.
    ``text`` is the final answer once stopped or finished."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stops: List[str] = [TURN_END] + [s for s in stop if s and s != TURN_END]
        self.buf = bytearray()
        self.emitted = ""  # what the stream has handed out so far (a prefix of the final answer)
        self.text: Optional[str] = None  # the final answer, set when stopped / finished
        self.stop_string: Optional[str] = None

    def _decoded(self, complete_only: bool) -> str:
        n = complete_utf8_length(self.buf) if complete_only else len(self.buf)
        return bytes(self.buf[:n]).decode("utf-8", errors="replace")

    def _first_stop(self, text: str) -> Tuple[int, Optional[str]]:
        best, which = -1, None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best < 0 or i < best):
                best, which = i, s
        return best, which

    def _held_tail(self, text: str) -> int:
        """How many trailing characters could still turn out to start a stop string (or be
        stripped): trailing whitespace, or a proper prefix of a user stop string."""
        hold = len(text) - len(text.rstrip())
        for s in self.stops[1:]:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def _delta(self, safe: str) -> str:
        if not safe.startswith(self.emitted):  # cannot happen with prefix-stable decoding; never emit junk
            return ""
        d = safe[len(self.emitted):]
        self.emitted = safe
        return d

    def push(self, data: bytes) -> Tuple[str, bool]:
        """Add one token's bytes. Returns (new complete text for the stream, whether a stop string appeared)."""
        self.buf += data
        text = self._decoded(complete_only=True)
        cut, which = self._first_stop(text)
        if cut >= 0:
            self.stop_string = which
            self.text = text[:cut].strip()
            return self._delta(self.text), True
        safe = text.lstrip()
        # Hold back a possible stop-string start, then any whitespace that this leaves at the end.
        safe = safe[: len(safe) - self._held_tail(safe)].rstrip()
        return self._delta(safe), False

    def finish(self) -> str:
        """End without a stop string (token 0 / 261, length limit, cancel): the final answer and
        the rest of the stream. A dangling partial character decodes to U+FFFD."""
        if self.text is None:
            text = self._decoded(complete_only=False)
            cut, which = self._first_stop(text)
            if cut >= 0:
                self.stop_string = which
                text = text[:cut]
            self.text = text.strip()
        return self._delta(self.text)
