"""The RWKV "World" tokenizer (vocab ``rwkv_vocab_v20230424``, 65,529 tokens, ids 1..65529).

Encoding is a greedy longest match over the UTF-8 bytes of the text. The fast path is the Rust
``pyrwkv-tokenizer`` (same ids as the reference ``TRIE_TOKENIZER`` of the ``rwkv`` package); a
pure-Python longest match over the shipped vocab file is the fallback and the cross-check.
Decoding works on bytes and never raises: ids without a vocab entry (0 and 65530..65535)
decode to nothing, and invalid UTF-8 is replaced.
"""
from __future__ import annotations

import ast
import functools
from importlib import resources
from typing import Dict, Iterable, List, Sequence

VOCAB_FILE = "rwkv_vocab_v20230424.txt"
VOCAB_SIZE = 65536  # the model's embedding rows; the vocab file fills ids 1..65529
EOT_ID = 0  # end of text, also the padding id
DOUBLE_NEWLINE_ID = 261  # "\n\n"


def _vocab_path():
    return resources.files("visualrwkv").joinpath("assets", VOCAB_FILE)


@functools.lru_cache(maxsize=1)
def _load_vocab() -> Dict[int, bytes]:
    idx2token: Dict[int, bytes] = {}
    with _vocab_path().open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            idx = int(line[: line.index(" ")])
            tok = ast.literal_eval(line[line.index(" "): line.rindex(" ")].strip())
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if len(tok) != int(line[line.rindex(" "):]):
                raise ValueError(f"corrupt vocab line for id {idx}")
            idx2token[idx] = tok
    return idx2token


class WorldTokenizer:
    """``encode(text) -> ids``, ``decode(ids) -> text``, ``decode_bytes(ids) -> bytes``."""

    vocab_size = VOCAB_SIZE
    eot_id = EOT_ID

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "rust", "python"):
            raise ValueError("tokenizer backend must be 'auto', 'rust' or 'python'")
        self.idx2token = _load_vocab()
        # Token bytes by id, as a list for fast decoding; ids without an entry decode to b"".
        self._table: List[bytes] = [b""] * VOCAB_SIZE
        for i, tok in self.idx2token.items():
            self._table[i] = tok
        self._rust = None
        if backend in ("auto", "rust"):
            try:
                import pyrwkv_tokenizer

                self._rust = pyrwkv_tokenizer.RWKVTokenizer()
            except ImportError:
                if backend == "rust":
                    raise
        self.backend = "rust" if self._rust is not None else "python"
        self._token2idx = None
        self._max_len = max(len(t) for t in self.idx2token.values())

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        if not text:
            return []
        if self._rust is not None:
            return list(self._rust.encode(text))
        return self.encode_python(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def encode_python(self, text: str) -> List[int]:
        """Greedy longest match over the UTF-8 bytes (the reference algorithm, slower)."""
        if self._token2idx is None:
            self._token2idx = {tok: i for i, tok in self.idx2token.items()}
        data = text.encode("utf-8")
        out: List[int] = []
        i, n = 0, len(data)
        t2i, maxlen = self._token2idx, self._max_len
        while i < n:
            for j in range(min(n, i + maxlen), i, -1):
                tid = t2i.get(data[i:j])
                if tid is not None:
                    out.append(tid)
                    i = j
                    break
            else:  # every single byte is in the vocab, so this cannot happen with a sound vocab
                raise ValueError(f"byte {data[i]} has no token")
        return out

    # -- decoding ---------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._table
        return b"".join(table[i] if 0 <= i < VOCAB_SIZE else b"" for i in (int(x) for x in ids))

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._table[i] if 0 <= i < VOCAB_SIZE else b""


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> WorldTokenizer:
    """The shared tokenizer instance (loading the vocab takes a moment)."""
    return WorldTokenizer()
