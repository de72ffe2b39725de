"""The CUDA-graph decoder equals eager decoding (GPU only; skipped on a CPU machine)."""
import pytest
import torch

from utils import random_rwkv6, rel


def test_graphed_decoder_refuses_cpu_models():
    from visualrwkv.generation.cuda_graph import GraphedDecoder

    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedDecoder(random_rwkv6(n_layer=1, n_embd=64), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_decoding_equals_eager(batch):
    from visualrwkv.generation.cuda_graph import GraphedDecoder

    model = random_rwkv6(n_layer=3, n_embd=128).cuda().eval()
    ids = torch.randint(0, 65536, (batch, 12), device="cuda")
    with torch.no_grad():
        logits, st = model(ids[:, :5], last_only=True)
        dec = GraphedDecoder(model, batch)
        dec.load_state(st)
        for t in range(5, 12):
            eager, st = model(ids[:, t:t + 1], state=st, last_only=True)
            graphed = dec.step(ids[:, t])
            assert rel(graphed, eager.float()) < 1e-5
        assert rel(dec.state().wkv, st.wkv) < 1e-5


@pytest.mark.parametrize("compile", [False, True])
def test_inplace_decode_step_equals_forward(compile):
    """The step the graphs capture (state updated in place; compiled once, shared by all layers)
    equals the model's forward with a carried state, token by token."""
    from torch._dynamo.utils import counters

    from visualrwkv.generation.cuda_graph import decode_step_

    torch._dynamo.reset()
    counters.clear()
    model = random_rwkv6(n_layer=5, n_embd=64, vocab_size=256).eval()
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            _, st = model(ids[:, :4])
            mine = st.clone()
            for t in range(4, 9):
                ref, st = model(ids[:, t:t + 1], state=st, last_only=True)
                out = decode_step_(model, ids[:, t:t + 1], mine, compile=compile)
                assert rel(out, ref) <= 1e-5
            for a, b in ((mine.att_shift, st.att_shift), (mine.wkv, st.wkv), (mine.ffn_shift, st.ffn_shift)):
                assert rel(a, b) <= 1e-5
        if compile:
            assert counters["stats"]["calls_captured"] > 0
            assert counters["stats"]["unique_graphs"] == 1  # one graph for every layer and step
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("with_scan", [False, True])
def test_padded_prefill_equals_unpadded(with_scan):
    """What the prefill graphs run: a prompt right-padded to a length bucket gives the same last
    logits and state as the prompt itself (rows of different lengths, from a non-zero state)."""
    from visualrwkv.generation.cuda_graph import pad_prompt

    model = random_rwkv6(n_layer=4, n_embd=64, vocab_size=256).eval()
    g = torch.Generator().manual_seed(2)
    B, T, C = 2, 21, 64
    x = torch.randn(B, T, C, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 15:] = False  # the second row is shorter
    perm = None
    if with_scan:
        perm = torch.arange(T).repeat(B, 1)
        perm[:, 3:10] = torch.arange(9, 2, -1)  # a reversed "image" segment
    with torch.no_grad():
        _, st0 = model(torch.randint(0, 256, (B, 5), generator=g))
        ref, ref_st = model(inputs_embeds=x, state=st0, valid=valid, scan_perm=perm, last_only=True)
        px, pv, pp = pad_prompt(x, valid, perm, 64)
        assert px.shape == (B, 64, C) and not pv[:, T:].any()
        out, st = model(inputs_embeds=px, state=st0, valid=pv, scan_perm=pp, last_only=True)
    assert rel(out, ref) <= 1e-5
    for a, b in ((st.att_shift, ref_st.att_shift), (st.wkv, ref_st.wkv), (st.ffn_shift, ref_st.ffn_shift)):
        assert rel(a, b) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_graphed_decoder_equals_eager():
    from visualrwkv.generation.cuda_graph import GraphedDecoder

    model = random_rwkv6(n_layer=3, n_embd=128).cuda().eval()
    ids = torch.randint(0, 65536, (2, 10), device="cuda")
    with torch.no_grad():
        _, st = model(ids[:, :4], last_only=True)
        dec = GraphedDecoder(model, 2, compile=True)
        dec.load_state(st)
        for t in range(4, 10):
            eager, st = model(ids[:, t:t + 1], state=st, last_only=True)
            assert rel(dec.step(ids[:, t]), eager.float()) < 1e-4
        assert rel(dec.state().wkv, st.wkv) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_graphs_equal_eager_prefill():
    from visualrwkv.generation.cuda_graph import PrefillGraphs

    model = random_rwkv6(n_layer=3, n_embd=128).cuda().eval()
    graphs = PrefillGraphs(model, bucket=16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for T in (21, 30, 21):  # the third call replays the first call's graph
            x = torch.randn(2, T, 128, device="cuda", generator=g)
            perm = torch.arange(T, device="cuda").repeat(2, 1)
            perm[:, 2:9] = torch.arange(8, 1, -1, device="cuda")
            st0 = model.empty_state(2)
            st0.wkv.normal_(generator=g)
            ref, ref_st = model(inputs_embeds=x, state=st0, scan_perm=perm, last_only=True)
            out, st = graphs(x, st0, None, perm)
            assert rel(out, ref.float()) < 1e-4 and rel(st.wkv, ref_st.wkv) < 1e-4
            assert rel(st.att_shift, ref_st.att_shift) < 1e-4 and rel(st.ffn_shift, ref_st.ffn_shift) < 1e-4
    assert not graphs.disabled and len(graphs._graphs) == 1  # 21 and 30 share the 32 bucket
