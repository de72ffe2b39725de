"""Generation engine: parity with naive re-computation, batching, prefix-state reuse, sampling and
the logits processor, UTF-8 streaming, stop rules, devices. Tiny random models on the CPU.

The helpers at the top (``tiny_model``, ``pixels``) are also used by the chat, server and demo tests.
"""
import os

import pytest
import torch

from visualrwkv.constants import IMAGE_TOKEN_INDEX
from visualrwkv.data.conversation import build_inference_ids, question_ids
from visualrwkv.errors import UserError
from visualrwkv.generation import (Engine, GenerationRequest, LogitsProcessor, Pipeline, SamplingParams,
                                   load_image, resolve_device, resolve_dtype)
from visualrwkv.generation.sampling import apply_penalties, apply_top_k, apply_top_p, sample_from_logits
from visualrwkv.generation.stream import TextAssembler, complete_utf8_length
from visualrwkv.models.visualrwkv import VisualRWKV
from visualrwkv.tokenizer import get_tokenizer
from utils import make_tiny_tower, random_rwkv6, rel

PHOTOS = "/work/shared/data/photos"
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "visualrwkv", "assets", "examples")


# ----------------------------------------------------------------------------- shared helpers
def tiny_model(tower: str, n_layer: int = 4, n_embd: int = 64, seed: int = 0, grid_size: int = -1) -> VisualRWKV:
    """A random VisualRWKV (4 layers: the image is scanned both ways) with the tiny CLIP tower."""
    from visualrwkv.models import vision

    vit = vision.load_vision_model(tower)
    rwkv = random_rwkv6(n_layer=n_layer, n_embd=n_embd, vocab_size=65536, seed=seed)
    torch.manual_seed(seed)
    m = VisualRWKV(rwkv, vit, vit.config.hidden_size, grid_size, vision.num_patches(vit.config)).eval()
    with torch.no_grad():
        m.proj.weight.normal_(0, 0.5)
    return m


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def example_image(name: str = "bluejay.jpg") -> str:
    return os.path.join(EXAMPLES, name)




@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return make_tiny_tower(str(tmp_path_factory.mktemp("tower")))


@pytest.fixture(scope="module")
def model(tower):
    return tiny_model(tower)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def emb(model):
    """Two images' projected tokens: (n_image_tokens, C) each."""
    with torch.no_grad():
        return [model.encode_images(pixels(s))[0] for s in (0, 1)]


def naive_greedy_inline(model, ids, image_embeds, n):
    """Independent of the engine: full forward over everything so far, argmax of the last position.
    Returns (tokens, probabilities of the tokens)."""
    ids = list(ids)
    toks, probs = [], []
    device = model.proj.weight.device
    for _ in range(n):
        e = None if image_embeds is None else image_embeds.unsqueeze(0)
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device), image_embeds=e,
                           return_logits=True).logits[0, -1].float()
        t = int(logits.argmax())
        toks.append(t)
        probs.append(float(logits.softmax(-1)[t]))
        ids.append(t)
        if t in (0, 261):
            break
    return toks, probs


def forced(script):
    """A logits hook that makes the model emit ``script`` token by token."""

    def hook(so_far, logits):
        out = torch.full_like(logits, float("-inf"))
        out[script[min(len(so_far), len(script) - 1)]] = 0.0
        return out

    return hook


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("cache_size", [0, 16])
def test_greedy_equals_naive_rerun_with_image(model, tok, emb, position, cache_size):
    ids = question_ids("What is shown in this picture?", tok, position)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    n = 10
    ref, ref_p = naive_greedy_inline(model, ids, emb[0], n)
    engine = Engine(model, tok, prefix_cache_size=cache_size)
    res = engine.generate([GenerationRequest(ids, emb[0], "img0", SamplingParams.greedy(n))])[0]
    assert res.token_ids == ref[: len(res.token_ids)]
    assert len(res.token_ids) == n or res.finish_reason == "stop"
    assert len(res.token_ids) >= 5  # the comparison covers real decoding steps
    assert res.token_probs == pytest.approx(ref_p[: len(res.token_ids)], rel=1e-4, abs=1e-7)
    assert res.prompt_tokens == len(ids) - 1 + model.n_image_tokens


def test_greedy_equals_naive_rerun_text_only(model, tok):
    ids = question_ids("Tell me a story about a fox.", tok, "first", has_image=False)
    ref, _ = naive_greedy_inline(model, ids, None, 8)
    res = Engine(model, tok).generate_one(ids, params=SamplingParams.greedy(8))
    assert res.token_ids == ref[: len(res.token_ids)] and len(res.token_ids) >= 5


def _mixed_requests(tok, emb):
    q = lambda text, pos, img=True: question_ids(text, tok, pos, has_image=img)  # noqa: E731
    return [
        GenerationRequest(q("What is this?", "first"), emb[0], "a", SamplingParams.greedy(5)),
        GenerationRequest(q("Describe the picture in detail, please.", "middle"), emb[1], "b",
                          SamplingParams.greedy(9)),
        GenerationRequest(q("A text-only question that is a good deal longer than the others are.", "first", False),
                          None, None, SamplingParams.greedy(14)),
        GenerationRequest(q("Colours?", "last"), emb[0], "a",
                          SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, presence_penalty=0.3,
                                         frequency_penalty=0.5, seed=7)),
        GenerationRequest(q("Hello", "first", False), None, None,
                          SamplingParams(max_new_tokens=11, temperature=1.0, top_k=20, seed=3)),
    ]


def test_batched_equals_one_by_one(model, tok, emb):
    reqs = _mixed_requests(tok, emb)
    alone = [Engine(model, tok, prefix_cache_size=0).generate([r])[0] for r in reqs]
    together = Engine(model, tok, prefix_cache_size=0, max_batch_size=8).generate(reqs)
    # Two slots: rows finish at different times and waiting requests join a running batch.
    continuous = Engine(model, tok, prefix_cache_size=16, max_batch_size=2).generate(reqs)
    for a, b, c in zip(alone, together, continuous):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.finish_reason == b.finish_reason == c.finish_reason
        assert b.token_probs == pytest.approx(a.token_probs, rel=1e-4, abs=1e-7)
        assert c.token_probs == pytest.approx(a.token_probs, rel=1e-4, abs=1e-7)
    assert [len(r.token_ids) for r in alone] == [5, 9, 14, 7, 11]


def test_batch_streams_each_row_separately(model, tok, emb):
    reqs = _mixed_requests(tok, emb)[:3]
    got = {0: "", 1: "", 2: ""}

    def on_text(i, delta):
        got[i] += delta

    res = Engine(model, tok).generate(reqs, on_text=on_text)
    assert [got[i] for i in range(3)] == [r.text for r in res]


def test_prefix_state_reuse_equals_recompute(model, tok, emb):
    engine = Engine(model, tok, prefix_cache_size=16)
    fresh = lambda ids, e: Engine(model, tok, prefix_cache_size=0).generate(  # noqa: E731
        [GenerationRequest(ids, e, None, SamplingParams.greedy(8))])[0]
    q1 = question_ids("What is this?", tok, "first")
    q2 = question_ids("What colour is the sky?", tok, "first")
    r1 = engine.generate([GenerationRequest(q1, emb[0], "img0", SamplingParams.greedy(8))])[0]
    assert r1.cached_tokens == 0
    # A second question about the same image continues from the stored state after the image.
    r2 = engine.generate([GenerationRequest(q2, emb[0], "img0", SamplingParams.greedy(8))])[0]
    assert r2.cached_tokens == q2.index(IMAGE_TOKEN_INDEX) + 1
    ref = fresh(q2, emb[0])
    assert r2.token_ids == ref.token_ids
    assert r2.token_probs == pytest.approx(ref.token_probs, rel=1e-4, abs=1e-7)
    # Another image with the same text must not hit that entry.
    r3 = engine.generate([GenerationRequest(q2, emb[1], "img1", SamplingParams.greedy(8))])[0]
    assert r3.cached_tokens == 0
    assert r3.token_ids == fresh(q2, emb[1]).token_ids

    # Multi-turn chat: the second turn's prompt extends the first prompt, whose state was kept.
    conv = [("human", "<image>\nWhat is it?")]
    ids1 = build_inference_ids(conv, tok, "first")
    a1 = engine.generate([GenerationRequest(ids1, emb[1], "img1", SamplingParams.greedy(6), cache_prompt=True)])[0]
    conv2 = conv + [("gpt", a1.text or "a bird"), ("human", "And what colour is it?")]
    ids2 = build_inference_ids(conv2, tok, "first")
    a2 = engine.generate([GenerationRequest(ids2, emb[1], "img1", SamplingParams.greedy(8))])[0]
    assert a2.cached_tokens == len(ids1)
    ref2 = fresh(ids2, emb[1])
    assert a2.token_ids == ref2.token_ids
    assert a2.token_probs == pytest.approx(ref2.token_probs, rel=1e-4, abs=1e-7)


def test_one_image_prefix_is_computed_once_per_batch(model, tok, emb):
    engine = Engine(model, tok, prefix_cache_size=16)
    reqs = [GenerationRequest(question_ids(q, tok, "first"), emb[0], "same", SamplingParams.greedy(4))
            for q in ("What is it?", "Where is it?", "Why?")]
    calls = []
    orig = model.prefill

    def counting(ids, **kw):
        calls.append(len(ids))
        return orig(ids, **kw)

    model.prefill = counting
    try:
        res = engine.generate(reqs)
    finally:
        del model.prefill
    assert calls == [1, 3]  # the shared image prefix once, then the three questions' rest together
    assert len(engine.cache) == 1
    for r, q in zip(res, reqs):
        assert r.token_ids == Engine(model, tok, prefix_cache_size=0).generate([q])[0].token_ids


# ----------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible(model, tok, emb):
    ids = question_ids("What is this?", tok, "first")
    run = lambda seed: Engine(model, tok).generate(  # noqa: E731
        [GenerationRequest(ids, emb[0], "x", SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed))])[0]
    a, b, c = run(123), run(123), run(124)
    assert a.token_ids == b.token_ids and a.seed == 123
    assert a.token_ids != c.token_ids
    d, e = run(None), run(None)
    assert d.seed is not None and d.seed != e.seed


def test_penalties_by_hand():
    V = 6
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=1.0, penalty_decay=0.996)
    lp = LogitsProcessor([p], V)
    zeros = torch.zeros(1, V)
    assert torch.equal(lp.process(zeros), zeros)  # nothing generated yet: no penalty
    for t in (2, 2, 3):
        lp.update(torch.tensor([t]))
    c2 = (1 * 0.996 + 1) * 0.996  # token 2 at steps 1 and 2, decayed once more at step 3
    c3 = 1.0
    want = torch.tensor([[0, 0, -(0.5 + c2 * 1.0), -(0.5 + c3 * 1.0), 0, 0]])
    assert torch.allclose(lp.process(zeros), want, atol=1e-6)
    # Pure function, batch of two rows with different settings.
    counts = torch.tensor([[0.0, 2.0, 0.5], [1.0, 0.0, 0.0]])
    occurred = counts > 0
    out = apply_penalties(torch.ones(2, 3), counts, occurred, torch.tensor([0.1, 1.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(out, torch.tensor([[1.0, 1 - 2.1, 1 - 0.6], [0.0, 1.0, 1.0]]))


def test_penalties_change_greedy_choices(model, tok, emb):
    A, B = tok.encode(" cat")[0], tok.encode(" dog")[0]

    def two_choices(b_logit):
        def hook(so_far, logits):
            out = torch.full_like(logits, -1e9)
            out[A], out[B] = 10.0, b_logit
            return out
        return hook

    ids = question_ids("Pet?", tok, "first", has_image=False)
    run = lambda hook, **kw: Engine(model, tok).generate(  # noqa: E731
        [GenerationRequest(ids, params=SamplingParams.greedy(4, **kw), logits_hook=hook)])[0].token_ids
    assert run(two_choices(9.0)) == [A, A, A, A]
    # presence 2: A(10) -> A=8 < B=9 -> B -> A=8 > B=7 stays A.
    assert run(two_choices(9.0), presence_penalty=2.0) == [A, B, A, A]
    # frequency 1 with decay 0.996: A, then A=9 > 8.5, then A=10-1.996 < 8.5 -> B, then A=10-1.988 > 7.5.
    assert run(two_choices(8.5), frequency_penalty=1.0) == [A, A, B, A]


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [1.0, 5.0, 3.0, 4.0]])
    out = apply_top_k(logits, torch.tensor([2, 0]))
    assert torch.isinf(out[0]).tolist() == [True, False, True, False]
    assert torch.equal(out[1], logits[1])  # k = 0: off
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    out = apply_top_p(probs.log(), torch.tensor([0.7, 0.5, 0.81, 1.0]))
    kept = (~torch.isinf(out)).tolist()
    assert kept[0] == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept[1] == [True, False, False, False]  # the first token already reaches 0.5
    assert kept[2] == [True, True, True, False]
    assert kept[3] == [True] * 4
    # The most likely token is always kept, even for a tiny top_p; the order of tokens does not matter.
    out = apply_top_p(torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([0.01]))
    assert (~torch.isinf(out)).tolist() == [[False, True, False]]


def test_banned_tokens_are_never_chosen():
    V = 8
    logits = torch.zeros(64, V)
    logits[:, 3] = 50.0  # overwhelmingly likely, but banned
    greedy = LogitsProcessor([SamplingParams.greedy(banned_tokens=[3])], V)
    assert greedy(logits[:1]).item() != 3
    sampled = LogitsProcessor([SamplingParams(temperature=1.0, banned_tokens=[3, 5], seed=i) for i in range(64)], V)
    toks = sampled(logits)
    assert not ({3, 5} & set(toks.tolist()))
    with pytest.raises(UserError):
        SamplingParams(banned_tokens=[70000]).validate()


def test_sampling_follows_the_distribution_and_temperature():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    toks = sample_from_logits(probs.log().expand(n, 4), u)
    freq = torch.bincount(toks, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03)
    # Masked (-inf) tokens are never drawn, whatever the uniform number.
    masked = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0]]).expand(3, 4)
    assert set(sample_from_logits(masked, torch.tensor([0.0, 0.5, 0.999999])).tolist()) <= {1, 3}
    # A low temperature concentrates the mass on the best token.
    lp = LogitsProcessor([SamplingParams(temperature=0.05, seed=i) for i in range(50)], 4)
    assert lp(probs.log().expand(50, 4)).tolist() == [3] * 50


# ----------------------------------------------------------------------------- text and stops
def test_complete_utf8_length():
    e = "é".encode()  # c3 a9
    smile = "😀".encode()  # f0 9f 98 80
    assert complete_utf8_length(b"ab") == 2
    assert complete_utf8_length(b"a" + e[:1]) == 1
    assert complete_utf8_length(b"a" + e) == 3
    assert complete_utf8_length(smile[:3]) == 0
    assert complete_utf8_length(smile) == 4
    assert complete_utf8_length(b"x\xa9") == 2  # a stray continuation byte is just invalid, not pending


def test_assembler_holds_back_partial_characters_and_stop_prefixes():
    a = TextAssembler(stop=["END"])
    pieces = [b" Caf", b"\xc3", b"\xa9", b" \xf0\x9f", b"\x98\x80", b" E", b"N", b"D more"]
    deltas = []
    for p in pieces:
        d, stopped = a.push(p)
        assert "\ufffd" not in d
        deltas.append(d)
    assert stopped and a.text == "Café 😀" and "".join(deltas) == a.text
    assert deltas[1] == ""  # half of é was held back


def test_utf8_streaming_never_splits_a_character(model, tok):
    byte = lambda b: b + 1  # noqa: E731  (World vocab: ids 1..256 are the single bytes 0..255)
    script = (tok.encode(" Hi") + tok.encode(" ") + [byte(0xC3), byte(0xA9)]  # é in two tokens
              + [byte(0xF0), byte(0x9F)] + [byte(0x98), byte(0x80)]  # 😀 in four
              + [byte(0xE4)] + [byte(0xB8), byte(0xAD)]  # 中 in three
              + tok.encode(" ok") + [261])
    pieces = []
    ids = question_ids("Say something.", tok, "first", has_image=False)
    res = Engine(model, tok).generate_one(ids, params=SamplingParams.greedy(40), on_text=pieces.append,
                                          logits_hook=forced(script))
    assert res.token_ids == script and res.finish_reason == "stop"
    assert res.text == "Hi é😀中 ok"
    assert all(p and "\ufffd" not in p for p in pieces)
    assert "".join(pieces) == res.text
    assert len(pieces) >= 4  # it did stream, piece by piece


@pytest.mark.parametrize("script_text,extra,stop,want,reason", [
    (" Hello", [11, 11, 4709], (), "Hello", "stop"),  # "\n" + "\n" across tokens
    (" Hello", [3329, 4709], (), "Hello", "stop"),  # "\n\n " is a token other than 261
    (" Hello", [0, 4709], (), "Hello", "stop"),  # end of text
    (" foo bar baz", [261], ("bar",), "foo", "stop"),  # a user stop string
    (" Hello there", [], (), "Hello there", "length"),
])
def test_stop_rules(model, tok, script_text, extra, stop, want, reason):
    script = tok.encode(script_text) + extra
    n_max = len(tok.encode(script_text)) if reason == "length" else 40
    pieces = []
    ids = question_ids("Hi", tok, "first", has_image=False)
    res = Engine(model, tok).generate_one(ids, params=SamplingParams.greedy(n_max, stop=stop),
                                          on_text=pieces.append, logits_hook=forced(script))
    assert res.text == want and res.finish_reason == reason
    assert "".join(pieces) == want  # the stream never shows text that the answer drops
    assert len(res.token_ids) <= len(script)


def test_zero_new_tokens(model, tok):
    res = Engine(model, tok).generate_one([1, 2, 3], params=SamplingParams.greedy(0))
    assert res.token_ids == [] and res.text == "" and res.finish_reason == "length"


def test_bad_requests_are_refused(model, tok, emb):
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="image_embeds"):
        engine.generate([GenerationRequest([1, IMAGE_TOKEN_INDEX, 2])])
    with pytest.raises(ValueError, match="at most one image"):
        engine.generate([GenerationRequest([IMAGE_TOKEN_INDEX, 1, IMAGE_TOKEN_INDEX], emb[0])])
    with pytest.raises(ValueError, match="must be"):
        engine.generate([GenerationRequest([1, IMAGE_TOKEN_INDEX], torch.zeros(3, 64))])
    with pytest.raises(UserError, match="top_p"):
        engine.generate([GenerationRequest([1, 2], params=SamplingParams(top_p=0.0))])


# ----------------------------------------------------------------------------- devices, pipeline
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="--device cuda was requested"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("tpu")


def test_dtype_resolution():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_bf16_generation_runs(tower, tok):
    m = tiny_model(tower).to(torch.bfloat16)
    with torch.no_grad():
        e = m.encode_images(pixels(0).to(torch.bfloat16))[0]
    ids = question_ids("What is this?", tok, "middle")
    res = Engine(m, tok).generate([GenerationRequest(ids, e, "k", SamplingParams.greedy(6))])[0]
    ref, _ = naive_greedy_inline(m, ids, e, 6)
    assert len(res.token_ids) >= 1 and all(0 <= t < 65536 for t in res.token_ids)
    # bf16 rounding differs between the parallel and the recurrent path; the first token comes
    # from the prefill and its logits must still agree with the full forward.
    assert res.token_ids[0] == ref[0]


def test_pipeline_images_prompts_and_errors(model, tower, tok, tmp_path):
    from visualrwkv.models.vision import load_image_processor

    pipe = Pipeline(model, load_image_processor(tower), image_position="first")
    img = example_image("pizza.jpg")
    res = pipe.ask(img, "What food is this?", SamplingParams.greedy(6))
    emb_, key = pipe.embed_image(img)
    ids = question_ids("What food is this?", tok, "first")
    direct = Engine(model, tok, prefix_cache_size=0).generate([GenerationRequest(ids, emb_, None,
                                                                                 SamplingParams.greedy(6))])[0]
    assert res.token_ids == direct.token_ids
    again = pipe.ask(img, "And the plate?", SamplingParams.greedy(6))
    assert again.cached_tokens > 0  # same image, 'first' position: the image prefix was reused
    assert pipe.embed_image(load_image(img))[1] == key  # same pixels, same key
    with pytest.raises(UserError, match="not found"):
        pipe.ask(str(tmp_path / "missing.jpg"), "Hi?")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(UserError, match="cannot read"):
        pipe.ask(str(bad), "Hi?")
    with pytest.raises(UserError, match="no image was given"):
        pipe.ask(None, "<image>\nWhat is this?")
    text_only = pipe.ask(None, "Hello there", SamplingParams.greedy(3))
    assert text_only.prompt_tokens == len(question_ids("Hello there", tok, "first", has_image=False))


def test_pipeline_load_errors(tower, tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        Pipeline.load(str(tmp_path / "nope.pth"), tower, device="cpu")
    rwkv_only = tmp_path / "rwkv.pth"
    torch.save(random_rwkv6(n_layer=1, n_embd=64).state_dict(), rwkv_only)
    with pytest.raises(UserError, match="not a VisualRWKV checkpoint"):
        Pipeline.load(str(rwkv_only), tower, device="cpu")
    with pytest.raises(UserError, match="image_position"):
        Pipeline.load(str(rwkv_only), tower, image_position="top", device="cpu")


def test_chunked_prefill_equals_one_pass(model, tok, emb):
    reqs = _mixed_requests(tok, emb)
    one_pass = Engine(model, tok, prefix_cache_size=0).generate(reqs)
    for cache in (0, 16):
        # 7 positions per call over 5 rows: every prompt is cut into single ids, the image never splits.
        pieces = Engine(model, tok, prefix_cache_size=cache, prefill_chunk_tokens=7).generate(reqs)
        for a, b in zip(one_pass, pieces):
            assert a.token_ids == b.token_ids
            assert b.token_probs == pytest.approx(a.token_probs, rel=1e-4, abs=1e-7)


class _EagerGraph:
    """Stands in for the CUDA-graph decoder on the CPU: same interface (static state buffers that
    are updated in place, a static logits buffer), eager computation."""

    def __init__(self, rwkv, batch_size):
        self.rwkv, self.batch_size = rwkv, batch_size
        self.static_state = rwkv.empty_state(batch_size)
        self.logits = torch.zeros(batch_size, rwkv.cfg.vocab_size)

    def load_state(self, state):
        assert state.batch_size == self.batch_size
        for name in ("att_shift", "wkv", "ffn_shift"):
            getattr(self.static_state, name).copy_(getattr(state, name))

    def step(self, tokens):
        logits, new = self.rwkv(tokens.view(-1, 1), state=self.static_state, last_only=True)
        self.load_state(new)
        self.logits.copy_(logits.float())
        return self.logits


class _EagerGraphCache:
    def __init__(self, rwkv):
        self.rwkv, self.made = rwkv, {}

    def get(self, batch_size):
        if batch_size not in self.made:
            self.made[batch_size] = _EagerGraph(self.rwkv, batch_size)
        return self.made[batch_size]


def test_graph_decoding_bookkeeping_equals_eager(model, tok, emb):
    """Rows padded to a power of two, state kept in the decoder's buffers and copied out when rows
    join or leave: same tokens as plain eager decoding (the CUDA graph itself is tested on a GPU)."""
    reqs = _mixed_requests(tok, emb)
    eager = Engine(model, tok, max_batch_size=3, cuda_graph=False).generate(reqs)
    engine = Engine(model, tok, max_batch_size=3, cuda_graph=False)
    engine.graphs = _EagerGraphCache(model.rwkv)
    graphed = engine.generate(reqs)
    assert set(engine.graphs.made) >= {2, 4}  # 3 rows ran padded to 4, then fewer
    for a, b in zip(eager, graphed):
        assert a.token_ids == b.token_ids
        assert b.token_probs == pytest.approx(a.token_probs, rel=1e-4, abs=1e-7)


def test_padded_prefill_runner_gives_the_same_answers(model, tok, emb):
    """The engine's prefill through a runner that pads every prompt to a bucket (what the GPU's
    prefill graphs do, run eagerly here) answers exactly as the plain prefill: with and without
    images, batched rows of different lengths, the prefix cache on."""
    from visualrwkv.generation.cuda_graph import pad_prompt

    calls = []

    def padded(embeds, state, valid, scan_perm):
        T = embeds.shape[1]
        calls.append(T)
        px, pv, pp = pad_prompt(embeds, valid, scan_perm, -(-T // 16) * 16 + 16)
        logits, st = model.rwkv(inputs_embeds=px, state=state, valid=pv, scan_perm=pp, last_only=True)
        return logits.float(), st

    reqs = _mixed_requests(tok, emb)
    plain = Engine(model, tok, prefix_cache_size=16, max_batch_size=3).generate(reqs)
    eng = Engine(model, tok, prefix_cache_size=16, max_batch_size=3)
    eng.prefill_graphs = padded
    padded_res = eng.generate(reqs)
    assert calls  # the runner was used
    for a, b in zip(plain, padded_res):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert b.token_probs == pytest.approx(a.token_probs, rel=1e-4, abs=1e-7)
