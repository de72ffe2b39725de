"""WorldTokenizer (Rust backend and pure-Python fallback) against the reference TRIE_TOKENIZER
of the ``rwkv`` package (SPEC §3): identical ids on every kind of text; decode never raises."""
import json
import os
import random

import pytest

from visualrwkv.tokenizer import VOCAB_SIZE, WorldTokenizer, _vocab_path

DATA = "/work/shared/data/llava_sample/dummy.json"


@pytest.fixture(scope="module")
def ref():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def tok():
    t = WorldTokenizer()
    assert t.backend == "rust"  # pyrwkv-tokenizer is a base dependency
    return t


@pytest.fixture(scope="module")
def py_tok():
    return WorldTokenizer(backend="python")


def _same(ref, tok, texts, python=True):
    for s in texts:
        expected = ref.encode(s)
        assert tok.encode(s) == expected, repr(s[:200])
        if python:
            assert tok.encode_python(s) == expected, repr(s[:200])


def test_vocab_files_identical():
    """Our vocab, the reference's and the Rust package's have the same entries (line endings differ)."""
    import pyrwkv_tokenizer
    import rwkv

    ours = _vocab_path().read_bytes().splitlines()
    theirs = open(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"), "rb").read().splitlines()
    rust = open(os.path.join(os.path.dirname(pyrwkv_tokenizer.__file__), "rwkv_vocab_v20230424.txt"),
                "rb").read().splitlines()
    assert len(ours) == 65529 and ours == theirs == rust
    assert len(WorldTokenizer().idx2token) == 65529


ENGLISH = ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "User: hi\n\nAssistant: hello\n\n",
           "It's a well-known fact: don't split contractions (or do?)", "  leading and trailing  ", "A" * 1000]
CHINESE = ["你好，世界！", "这是一个测试。我们用中文写一段话，看看分词是否一致。", "图片里有什么？请用一个词回答。",
           "混合 English 和中文 text 123。"]
EMOJI = ["😀🎉👍🏽", "👨‍👩‍👧‍👦 family", "🇨🇳🇺🇸 flags", "❤️‍🔥", "a😀b😀c" * 20]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
        "<div class=\"x\">&nbsp;</div>", "SELECT * FROM t WHERE a = 'b';", "λx. x → ∀y ∈ ℝ"]
CRLF = ["line one\r\nline two\r\n\r\nline four", "\r\n" * 50, "a\rb\r\rc", "\r\n\r\n\n\r"]
SPACES = [" " * n for n in (1, 2, 3, 15, 16, 17, 31, 32, 33, 64, 100, 128, 129, 300)] + \
         ["x" + " " * 200 + "y", "\t" * 40, " \t \t\n \n" * 20, "\u3000" * 10, "\xa0" * 7]


@pytest.mark.parametrize("texts", [ENGLISH, CHINESE, EMOJI, CODE, CRLF, SPACES],
                         ids=["english", "chinese", "emoji", "code", "crlf", "spaces"])
def test_fixed_texts(ref, tok, texts):
    _same(ref, tok, texts)


def test_edge_cases(ref, tok):
    assert tok.encode("") == [] and tok.encode_python("") == []
    _same(ref, tok, ["\x00", "\x00\x01\x02", "\ufeffBOM", "\u2028\u2029", "\U0010ffff", "\ud7ff\ue000"])


def test_random_unicode_fuzz(ref, tok):
    rng = random.Random(1234)
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF),
              (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    texts = []
    for _ in range(400):
        n = rng.randint(0, 60)
        texts.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n)))
    _same(ref, tok, texts)


def test_token_boundary_fuzz(ref, tok):
    """Concatenations of vocab entries: the hardest case for a greedy longest match."""
    rng = random.Random(99)
    entries = list(tok.idx2token.values())
    texts = []
    for _ in range(400):
        raw = b"".join(rng.choice(entries) for _ in range(rng.randint(1, 25)))
        texts.append(raw.decode("utf-8", errors="ignore"))
    _same(ref, tok, texts)


def test_every_sample_text(ref, tok):
    records = json.load(open(DATA))
    texts = [turn["value"] for rec in records for turn in rec["conversations"]]
    assert len(texts) == 2000
    _same(ref, tok, texts, python=False)
    # The Python fallback on the distinct texts (it is slower).
    _same(ref, tok, sorted(set(texts))[:300])
    # Long text in one call (a few hundred KB).
    big = "\n\n".join(texts)
    assert tok.encode(big) == ref.encode(big)


def test_decode_never_raises(tok):
    for i in range(VOCAB_SIZE):
        tok.decode([i])
        tok.decode_bytes([i])
    assert tok.decode([0]) == "" and tok.decode([65530, 65535]) == ""
    assert tok.decode([-1, -200, 70000]) == ""  # out of range: nothing
    rng = random.Random(5)
    for _ in range(200):  # random sequences, most of them invalid UTF-8 in the middle of characters
        tok.decode([rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 50))])
    assert tok.decode(range(VOCAB_SIZE))  # everything at once


def test_round_trip(tok):
    for s in ENGLISH + CHINESE + EMOJI + CODE + CRLF + SPACES:
        assert tok.decode(tok.encode(s)) == s
