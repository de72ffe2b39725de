"""VisualRWKV: splicing, the bidirectional scan, recurrent consistency, batch invariance, loss, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from visualrwkv.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from visualrwkv.errors import UserError
from visualrwkv.models.visualrwkv import VisualRWKV
from utils import random_rwkv6, rel, make_tiny_tower


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return make_tiny_tower(str(tmp_path_factory.mktemp("tower")))


def _model(tower, grid_size=-1, seed=0):
    from visualrwkv.models import vision

    vit = vision.load_vision_model(tower)
    rwkv = random_rwkv6(n_layer=4, n_embd=64, vocab_size=65536, seed=seed)
    torch.manual_seed(seed)
    m = VisualRWKV(rwkv, vit, vit.config.hidden_size, grid_size, vision.num_patches(vit.config)).eval()
    with torch.no_grad():
        m.proj.weight.normal_(0, 0.5)
    return m


def _pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _naive_forward(model, ids, pixels):
    """Direct re-implementation for one row: splice, then a plain loop over layers that flips the
    image segment (without CLS) in odd layers."""
    rw = model.rwkv
    x = rw.emb(torch.tensor([max(i, 0) for i in ids]))
    seg = None
    if IMAGE_TOKEN_INDEX in ids:
        p = ids.index(IMAGE_TOKEN_INDEX)
        img = model.encode_images(pixels)[0]
        x = torch.cat([x[:p], img, x[p + 1:]])
        seg = (p, p + img.shape[0] - 1)
    x = x.unsqueeze(0)
    for i, blk in enumerate(rw.blocks):
        if seg and i % 2 == 1:
            x = torch.cat([x[:, :seg[0]], x[:, seg[0]:seg[1]].flip(1), x[:, seg[1]:]], 1)
        x, _ = blk(x, None, backend="reference")
        if seg and i % 2 == 1:
            x = torch.cat([x[:, :seg[0]], x[:, seg[0]:seg[1]].flip(1), x[:, seg[1]:]], 1)
    return rw.head(rw.ln_out(x))[0]


def _row(pos, n_text=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 65530, (n_text,), generator=g).tolist()
    if pos is None:
        return t
    return t[:pos] + [IMAGE_TOKEN_INDEX] + t[pos:]


@pytest.mark.parametrize("grid", [-1, 2, 1, 0])
@pytest.mark.parametrize("pos", [0, 4, 9])
def test_scan_equals_plain_loop(tower, grid, pos):
    model = _model(tower, grid)
    ids = _row(pos)
    px = _pixels(1)
    with torch.no_grad():
        out = model(torch.tensor([ids]), pixel_values=px, return_logits=True).logits[0]
        ref = _naive_forward(model, ids, px)
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-5


def test_scan_changes_the_result(tower):
    # Guard against a scan that silently does nothing: without the reversal the logits differ.
    model = _model(tower)
    ids = _row(3)
    with torch.no_grad():
        mm = model.build_inputs(torch.tensor([ids]), image_embeds=model.encode_images(_pixels(1)))
        a, _ = model.rwkv(inputs_embeds=mm.embeds, scan_perm=mm.scan_perm)
        b, _ = model.rwkv(inputs_embeds=mm.embeds)
    assert rel(a, b) > 1e-3


@pytest.mark.parametrize("pos", [0, 5, 9])
def test_prefill_then_decode_equals_full_forward(tower, pos):
    model = _model(tower)
    prompt = _row(pos)
    cont = _row(None, n_text=6, seed=7)
    px = _pixels(1)
    with torch.no_grad():
        full = model(torch.tensor([prompt + cont]), pixel_values=px, return_logits=True).logits[0]
        logits, state = model.prefill([prompt], pixel_values=px)
        outs = [logits[0]]
        for t in cont:
            logits, state = model.step(torch.tensor([t]), state)
            outs.append(logits[0])
    n_img = model.n_image_tokens
    start = len(prompt) - 1 + n_img - 1  # position of the last prompt token in the spliced sequence
    assert rel(torch.stack(outs), full[start:]) <= 1e-5


def test_batch_invariance(tower):
    model = _model(tower)
    rows = [_row(0, 5, 1), _row(None, 12, 2), _row(7, 11, 3), _row(2, 3, 4)]
    labels = []
    for r in rows:
        lab = [t if t != IMAGE_TOKEN_INDEX else IGNORE_INDEX for t in r]
        lab[0] = IGNORE_INDEX
        labels.append(lab)
    px = _pixels(3, seed=5)
    img_of = {0: 0, 2: 1, 3: 2}
    T = max(map(len, rows))
    ids = torch.zeros(4, T, dtype=torch.long)
    lab = torch.full((4, T), IGNORE_INDEX)
    for b, (r, l) in enumerate(zip(rows, labels)):
        ids[b, :len(r)], lab[b, :len(l)] = torch.tensor(r), torch.tensor(l)
    lengths = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        batch = model(ids, labels=lab, pixel_values=px, lengths=lengths, return_logits=True)
        per_row_losses = []
        for b, r in enumerate(rows):
            pv = px[img_of[b]:img_of[b] + 1] if b in img_of else None
            alone = model(torch.tensor([r]), labels=torch.tensor([labels[b]]), pixel_values=pv, return_logits=True)
            n = alone.logits.shape[1]
            assert rel(batch.logits[b, :n], alone.logits[0]) <= 1e-5
            per_row_losses.append(alone.loss)
    # batch loss = mean over rows of each row's mean token loss
    assert torch.allclose(batch.loss, torch.stack(per_row_losses).mean(), rtol=1e-5)


def test_loss_is_per_sample_mean_then_batch_mean(tower):
    model = _model(tower)
    ids = torch.tensor([_row(None, 8, 1), _row(None, 8, 2)])
    lab = ids.clone()
    lab[0, :6] = IGNORE_INDEX  # row 0: 2 supervised targets, row 1: 7
    lab[1, 0] = IGNORE_INDEX
    with torch.no_grad():
        out = model(ids, labels=lab, return_logits=True)
        lg = out.logits
        l0 = F.cross_entropy(lg[0, 5:7], ids[0, 6:8])
        l1 = F.cross_entropy(lg[1, 0:7], ids[1, 1:8])
    assert torch.allclose(out.loss, (l0 + l1) / 2, rtol=1e-5)
    assert out.n_tokens == 9


def test_l2wrap_adds_gradient_on_max_logit(tower):
    model = _model(tower).train()
    ids = torch.tensor([_row(None, 6, 1)])
    lab = ids.clone()
    g = {}
    for flag in (True, False):
        model.zero_grad()
        model.l2wrap = flag
        model(ids, labels=lab).loss.backward()
        g[flag] = model.rwkv.head.weight.grad.clone()
    assert not torch.equal(g[True], g[False])
    assert rel(g[True], g[False]) < 1e-2  # a small regulariser


def test_several_images_in_a_row_are_refused(tower):
    model = _model(tower)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, IMAGE_TOKEN_INDEX]])
    with pytest.raises(UserError, match="more than one <image>"):
        model(ids, pixel_values=_pixels(2))


def test_checkpoint_roundtrip_and_strict_errors(tower, tmp_path):
    model = _model(tower)
    path = str(tmp_path / "visual.pth")
    torch.save(model.state_dict(), path)
    assert {k.split(".")[0] for k in model.state_dict()} == {"rwkv", "proj", "vit"}
    loaded = VisualRWKV.from_checkpoint(path, tower).eval()
    ids = torch.tensor([_row(2)])
    with torch.no_grad():
        a = model(ids, pixel_values=_pixels(1), return_logits=True).logits
        b = loaded(ids, pixel_values=_pixels(1), return_logits=True).logits
    assert torch.equal(a, b)
    sd = dict(model.state_dict())
    for mutate, pattern in [
        (lambda d: d.__setitem__("proj.weight", torch.zeros(64, 7)), r"proj\.weight is \(64, 7\)"),
        (lambda d: d.pop("rwkv.blocks.3.ffn.key.weight"), r"missing keys: rwkv\.blocks\.3\.ffn\.key\.weight"),
        (lambda d: d.__setitem__("vit.vision_model.extra.weight", torch.zeros(1)),
         r"unexpected keys: vit\.vision_model\.extra\.weight"),
    ]:
        d = dict(sd)
        mutate(d)
        torch.save(d, path)
        with pytest.raises(UserError, match=pattern):
            VisualRWKV.from_checkpoint(path, tower)


def test_stage1_start_has_a_fresh_projector(tower, tmp_path):
    rwkv = random_rwkv6(n_layer=2, n_embd=64, vocab_size=65536)
    path = str(tmp_path / "rwkv.pth")
    torch.save(rwkv.state_dict(), path)
    m = VisualRWKV.from_rwkv(path, tower, grid_size=2)
    assert m.proj.weight.shape == (64, 32)
    assert m.n_image_tokens == 5
    assert torch.equal(m.rwkv.head.weight, rwkv.head.weight)


def test_packed_training_forward_equals_padded(tower):
    """pack=True (no compute on padding, per-sequence restarts) gives the same loss and gradients."""
    model = _model(tower).train()
    model.l2wrap = False
    rows = [_row(0, 5, 1), _row(None, 12, 2), _row(7, 11, 3)]
    T = max(map(len, rows))
    ids = torch.zeros(3, T, dtype=torch.long)
    lab = torch.full((3, T), IGNORE_INDEX)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        lab[b, 1:len(r)] = torch.tensor([t if t != IMAGE_TOKEN_INDEX else IGNORE_INDEX for t in r[1:]])
    lengths = torch.tensor([len(r) for r in rows])
    px = _pixels(2, seed=9)
    grads = {}
    # "host": packed, with the splicing's numbers computed beforehand (as the Lightning module does)
    for pack in (False, True, "host"):
        model.zero_grad()
        numbers = model.splice_numbers(ids, lengths, None, lab) if pack == "host" else None
        out = model(ids, labels=lab, pixel_values=px, lengths=lengths, pack=bool(pack), splice_numbers=numbers)
        out.loss.backward()
        grads[pack] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(grads["host"][0], grads[True][0])
    assert all(torch.equal(grads["host"][1][n], g) for n, g in grads[True][1].items())
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-5)
    assert grads[True][1].keys() == grads[False][1].keys()
    for n in grads[False][1]:
        assert rel(grads[True][1][n], grads[False][1][n]) <= 1e-4, n


def test_supervised_count_is_known_before_splicing(tower):
    """build_inputs counts the next-token targets on the host with its other numbers (the packed loss
    picks them without a read-back): it must equal the count over the spliced, shifted labels, with
    the image first, inside or absent, a supervised first position, garbage labels past a row's length
    and an empty row."""
    model = _model(tower)
    g = torch.Generator().manual_seed(3)
    n = model.n_image_tokens
    for trial in range(12):
        rows = [_row(0, 6, trial), _row(3, 10, trial + 1), _row(None, 8, trial + 2), _row(10, 10, trial + 3), []]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        lab = torch.randint(0, 50, (len(rows), T), generator=g)  # past a row's length: not ignored
        lab[torch.rand(len(rows), T, generator=g) < 0.4] = IGNORE_INDEX
        for b, r in enumerate(rows):
            if r:
                ids[b, :len(r)] = torch.tensor(r)
        lab[ids == IMAGE_TOKEN_INDEX] = torch.where(torch.rand(()) < 0.5, IGNORE_INDEX, 7)  # either way
        lengths = torch.tensor([len(r) for r in rows])
        emb = torch.randn(3, n, model.rwkv.cfg.n_embd)
        mm = model.build_inputs(ids, lengths, emb, labels=lab)
        target = torch.cat([mm.labels[:, 1:], mm.labels.new_full((len(rows), 1), IGNORE_INDEX)], dim=1)
        assert mm.n_supervised == int((target != IGNORE_INDEX).sum()), trial
        assert mm.lengths_host == mm.lengths.tolist()
        # The same numbers computed beforehand (the Lightning module's CPU batch) splice identically.
        pre = model.build_inputs(ids, lengths, emb, labels=lab, numbers=model.splice_numbers(ids, lengths, None, lab))
        assert (pre.n_real, pre.n_supervised, pre.lengths_host) == (mm.n_real, mm.n_supervised, mm.lengths_host)
        assert torch.equal(pre.embeds, mm.embeds) and torch.equal(pre.labels, mm.labels)
    with pytest.raises(ValueError, match="splice numbers for 2 rows"):
        model.build_inputs(ids, lengths, emb, labels=lab, numbers=[0] * 8)
    assert model.build_inputs(ids, lengths, emb).n_supervised == -1


def test_tower_keys_use_the_released_layout(tower, tmp_path):
    """Released files (transformers 4) name the tower vit.vision_model.*; we write and read that,
    and still read files whose tower keys lack the vision_model level."""
    model = _model(tower)
    sd = model.state_dict()
    assert "vit.vision_model.embeddings.patch_embedding.weight" in sd
    assert not any(k.startswith("vit.") and not k.startswith("vit.vision_model.") for k in sd)
    flat = {(k.replace("vit.vision_model.", "vit.") if k.startswith("vit.") else k): v for k, v in sd.items()}
    path = str(tmp_path / "flat.pth")
    torch.save(flat, path)
    loaded = VisualRWKV.from_checkpoint(path, tower)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    model.load_state_dict(sd, strict=True)  # round trip through the module's own hooks


def test_compiled_frozen_tower_gives_the_same_image_tokens(tower):
    # --compile_vit of the GPU benchmark: the frozen tower compiled in place, keys and outputs unchanged.
    from visualrwkv.train.model import compile_frozen_tower

    m = _model(tower).eval()
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    keys = list(m.state_dict())
    with torch.no_grad():
        ref = m.encode_images(px)
        assert compile_frozen_tower(m)
        out = m.encode_images(px)
        two = m.encode_images(px[:2])  # another image count: dynamic, no error
    assert list(m.state_dict()) == keys
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5) and torch.allclose(two, ref[:2], atol=1e-5, rtol=1e-5)
    m.freeze_vit = False
    assert not compile_frozen_tower(m)  # a trainable tower stays eager
