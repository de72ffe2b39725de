"""The RWKV-6 language model: official-package parity, recurrent consistency, strict loading."""
import os

import pytest
import torch

from visualrwkv.checkpoint import (config_from_state_dict, detect_rwkv_version, load_rwkv6,
                                   load_state_dict_file, save_state_dict_file)
from visualrwkv.errors import UserError
from utils import random_rwkv6, rel


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_rwkv6(n_layer=3, n_embd=128, vocab_size=65536, seed=0)
    path = str(tmp_path_factory.mktemp("ckpt") / "rwkv6.pth")
    torch.save(model.state_dict(), path)
    return path, model


def test_logits_and_state_match_official_rwkv_package(ckpt):
    path, _ = ckpt
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    RWKV = pytest.importorskip("rwkv.model", reason="the official rwkv package (dev extra) is needed").RWKV

    ref = RWKV(path, "cpu fp32")
    ids = torch.randint(0, 65536, (50,), generator=torch.Generator().manual_seed(5)).tolist()
    ref_logits, ref_state = ref.forward(ids, None, full_output=True)  # (50, V), 3 tensors per layer
    model = load_rwkv6(path)
    with torch.no_grad():
        logits, state = model(torch.tensor([ids]))
    assert rel(logits[0], ref_logits) <= 1e-4
    for i in range(3):
        assert rel(state.att_shift[i, 0], ref_state[3 * i]) <= 1e-4
        assert rel(state.wkv[i, 0], ref_state[3 * i + 1]) <= 1e-4
        assert rel(state.ffn_shift[i, 0], ref_state[3 * i + 2]) <= 1e-4


@pytest.mark.parametrize("T", [1, 7, 33])
def test_full_equals_chunks_equals_token_by_token(ckpt, T):
    model = ckpt[1].eval()
    ids = torch.randint(0, 65536, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        full, s_full = model(ids)
        cut = T // 2
        a, s = model(ids[:, :cut]) if cut else (full[:, :0], None)
        b, s2 = model(ids[:, cut:], state=s)
        assert rel(torch.cat([a, b], 1), full) <= 1e-5
        assert rel(s2.wkv, s_full.wkv) <= 1e-5 and rel(s2.att_shift, s_full.att_shift) <= 1e-5
        s = None
        steps = []
        for t in range(T):
            lg, s = model(ids[:, t:t + 1], state=s)
            steps.append(lg)
        assert rel(torch.cat(steps, 1), full) <= 1e-5
        assert rel(s.wkv, s_full.wkv) <= 1e-5 and rel(s.ffn_shift, s_full.ffn_shift) <= 1e-5


def test_embeddings_input_and_reference_backend(ckpt):
    model = ckpt[1].eval()
    ids = torch.randint(0, 65536, (1, 20))
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(inputs_embeds=model.emb(ids), backend="reference")
    assert rel(b, a) <= 1e-5


def test_right_padding_keeps_each_rows_state(ckpt):
    model = ckpt[1].eval()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randint(0, 65536, (1, 11), generator=g), torch.randint(0, 65536, (1, 6), generator=g)
    batch = torch.zeros(2, 11, dtype=torch.long)
    batch[0], batch[1, :6] = x1[0], x2[0]
    valid = torch.arange(11)[None] < torch.tensor([[11], [6]])
    with torch.no_grad():
        lb, sb = model(batch, valid=valid, last_only=True)
        l1, s1 = model(x1, last_only=True)
        l2, s2 = model(x2, last_only=True)
    assert rel(lb[1], l2[0]) <= 1e-5 and rel(lb[0], l1[0]) <= 1e-5
    assert rel(sb.select(1).wkv, s2.wkv) <= 1e-5 and rel(sb.select(1).att_shift, s2.att_shift) <= 1e-5


def test_dimensions_come_from_the_checkpoint(ckpt):
    cfg = config_from_state_dict(ckpt[1].state_dict())
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.dim_ffn) == (3, 128, 65536, 64, 448)
    assert (cfg.maa_rank, cfg.decay_rank) == (32, 64)


@pytest.mark.parametrize("fmt,dtype", [(".pth", torch.bfloat16), (".safetensors", torch.float16),
                                       (".safetensors", torch.float32)])
def test_formats_and_dtypes(ckpt, tmp_path, fmt, dtype):
    model = ckpt[1]
    path = str(tmp_path / ("m" + fmt))
    save_state_dict_file({k: v.to(dtype) for k, v in model.state_dict().items()}, path)
    loaded = load_rwkv6(path)  # converted to fp32
    assert loaded.head.weight.dtype == torch.float32
    assert torch.equal(loaded.head.weight, model.head.weight.to(dtype).float())


def test_visualrwkv_file_is_accepted_for_its_language_model(ckpt, tmp_path):
    sd = {"rwkv." + k: v for k, v in ckpt[1].state_dict().items()}
    sd["proj.weight"] = torch.zeros(128, 32)
    sd["vit.vision_model.post_layernorm.weight"] = torch.zeros(32)
    path = str(tmp_path / "visual.pth")
    torch.save(sd, path)
    assert torch.equal(load_rwkv6(path).emb.weight, ckpt[1].emb.weight)


def _save(tmp_path, sd, name="bad.pth"):
    path = str(tmp_path / name)
    torch.save(sd, path)
    return path


def test_missing_key_is_named(ckpt, tmp_path):
    sd = dict(ckpt[1].state_dict())
    del sd["blocks.1.att.gate.weight"]
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.att\.gate\.weight"):
        load_rwkv6(_save(tmp_path, sd))


def test_unexpected_key_is_named(ckpt, tmp_path):
    sd = dict(ckpt[1].state_dict())
    sd["blocks.0.att.extra"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"unexpected keys: blocks\.0\.att\.extra"):
        load_rwkv6(_save(tmp_path, sd))


def test_wrong_shape_is_named(ckpt, tmp_path):
    sd = dict(ckpt[1].state_dict())
    sd["blocks.2.ffn.value.weight"] = torch.zeros(128, 400)
    with pytest.raises(UserError, match=r"blocks\.2\.ffn\.value\.weight is \(128, 400\), expected \(128, 448\)"):
        load_rwkv6(_save(tmp_path, sd))


def test_other_rwkv_versions_are_recognised(tmp_path):
    v5 = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.time_mix_k": torch.zeros(1, 1, 8),
          "blocks.0.att.ln_x.weight": torch.zeros(8), "blocks.0.att.gate.weight": torch.zeros(8, 8)}
    v7 = {"emb.weight": torch.zeros(10, 8), "blocks.0.att.x_r": torch.zeros(1, 1, 8), "blocks.0.att.w0": torch.zeros(1, 1, 8)}
    assert detect_rwkv_version(v5) == "RWKV-5 (x052)"
    with pytest.raises(UserError, match="RWKV-5"):
        load_rwkv6(_save(tmp_path, v5))
    with pytest.raises(UserError, match="RWKV-7"):
        load_rwkv6(_save(tmp_path, v7, "v7.pth"))


def test_unreadable_files_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_state_dict_file(str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable"):
        load_state_dict_file(str(junk))


def test_involution_gather_matches_gather_with_its_gradient():
    """The odd layers' scan permutation: forward and gradient equal torch's gather (whose backward
    is a scatter-add), on rows with image segments of odd lengths at different places."""
    from visualrwkv.models.rwkv6 import involution_gather

    B, T, C = 3, 29, 8
    perm = torch.arange(T).repeat(B, 1)
    for b, (p, n) in enumerate([(2, 7), (0, 12), (11, 18)]):
        perm[b, p:p + n] = torch.arange(p + n - 1, p - 1, -1)
    idx = perm.unsqueeze(-1).expand(B, T, C)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    probe = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (lambda t: t.gather(1, idx), lambda t: involution_gather(t, idx)):
        xi = x.clone().requires_grad_(True)
        y = fn(fn(xi) * probe)  # there and back, as an odd layer does
        y.sum().backward()
        grads.append((y.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert not torch.equal(grads[1][1], probe)  # the permutation really moved the gradient


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_blocks_match_eager_on_gpu():
    model = random_rwkv6(n_layer=2, n_embd=128).cuda()
    ids = torch.randint(0, 65536, (2, 40), device="cuda")
    with torch.no_grad():
        a, _ = model(ids)
        model.compile_blocks()
        b, _ = model(ids)
    assert rel(b, a) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"wkv_custom_op": True}, {"wkv_custom_op": True, "wkv_keep_states": True}],
                         ids=["graph-break", "custom-op", "custom-op-kept-states"])
def test_compiled_blocks_train_like_eager_on_gpu(options):
    """Training path of --compile 1: packed sequences (cu_seqlens) through the compiled blocks, the
    log-decay traced into the graph and fla's kernel called opaquely (behind a graph break, or as custom
    ops, with or without the chunk states kept for backward): outputs and every parameter's gradient
    equal the eager blocks'."""
    import copy

    torch._dynamo.reset()
    eager = random_rwkv6(n_layer=2, n_embd=128).cuda().train()
    comp = copy.deepcopy(eager).compile_blocks(**options)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 100, 163], device="cuda")  # three sequences of odd lengths in one row
    x = torch.randn(1, 163, 128, device="cuda", generator=gen)
    probe = torch.randn(1, 163, 128, device="cuda", generator=gen)
    outs = []
    for m in (eager, comp):
        h, _ = m.forward_hidden(x, need_state=False, cu_seqlens=cu)
        (h * probe).sum().backward()
        outs.append(h.detach())
    try:
        assert rel(outs[1], outs[0]) <= 1e-4
        for (name, pe), pc in zip(eager.named_parameters(), comp.parameters()):
            if pe.grad is not None:
                assert rel(pc.grad, pe.grad) <= 1e-3, name
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_blocks_share_one_graph_and_match_eager(fused):
    """compile_blocks on the CPU: prefill and T=1 decoding equal eager, and the layers share their
    graphs (a per-layer compile would make startup grow with depth: 24 compiles for a 1.6B model).
    fused: with the training options (fused ln_x + gate, fused time mix; their CPU fallbacks run here)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_rwkv6(n_layer=6, n_embd=64, vocab_size=256).eval()
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, st = model(ids)
        ref1, _ = model(ids[:, :1], state=st)
        model.compile_blocks(fused_norm_gate=fused, fused_mix=fused)
        out, st2 = model(ids)
        out1, _ = model(ids[:, :1], state=st2)
    try:
        assert counters["stats"]["calls_captured"] > 0  # dynamo really traced the blocks
        assert counters["stats"]["unique_graphs"] < model.cfg.n_layer
        assert rel(out, ref) <= 1e-5 and rel(out1, ref1) <= 1e-5
    finally:
        torch._dynamo.reset()
