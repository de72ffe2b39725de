"""The engine on a GPU: fp32 parity with naive re-computation (CUDA graphs on), graphs vs eager,
bf16 / fp16 pipelines and the chat command. Skipped without CUDA."""
import pytest
import torch

from visualrwkv.data.conversation import question_ids
from visualrwkv.generation import Engine, GenerationRequest, Pipeline, SamplingParams
from visualrwkv.tokenizer import get_tokenizer
from test_generation import _mixed_requests, example_image, naive_greedy_inline, pixels, tiny_model
from utils import make_tiny_tower

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return make_tiny_tower(str(tmp_path_factory.mktemp("tower")))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model32(tower):
    return tiny_model(tower).cuda()


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_fp32_gpu_greedy_equals_naive(model32, tok, position):
    with torch.no_grad():
        emb = model32.encode_images(pixels(0).cuda())[0]
    ids = question_ids("What is shown in this picture?", tok, position)
    ref, _ = naive_greedy_inline(model32, ids, emb, 10)
    engine = Engine(model32, tok)
    assert engine.graphs is not None  # CUDA graphs are on by default on a GPU
    res = engine.generate([GenerationRequest(ids, emb, "k", SamplingParams.greedy(10))])[0]
    assert res.token_ids == ref[: len(res.token_ids)] and len(res.token_ids) >= 5


def test_graphs_equal_eager_with_rows_joining_and_leaving(model32, tok):
    with torch.no_grad():
        emb = [model32.encode_images(pixels(s).cuda())[0] for s in (0, 1)]
    reqs = _mixed_requests(tok, emb)
    eager = Engine(model32, tok, max_batch_size=3, cuda_graph=False).generate(reqs)
    graphed = Engine(model32, tok, max_batch_size=3, cuda_graph=True).generate(reqs)
    for a, b in zip(eager, graphed):
        assert a.token_ids == b.token_ids
        assert b.token_probs == pytest.approx(a.token_probs, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_pipeline_and_chat(tower, tok, tmp_path, dtype, capsys):
    from visualrwkv import cli

    ckpt = str(tmp_path / "tiny.pth")
    torch.save(tiny_model(tower).state_dict(), ckpt)
    pipe = Pipeline.load(ckpt, tower, image_position="middle", device="cuda", dtype=dtype)
    assert pipe.model.proj.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    img = example_image("bluejay.jpg")
    res = pipe.ask(img, "What bird is this?", SamplingParams.greedy(8))
    emb, _ = pipe.embed_image(img)
    ids = question_ids("What bird is this?", tok, "middle")
    ref, _ = naive_greedy_inline(pipe.model, ids, emb, 1)
    assert res.token_ids[0] == ref[0]  # the prefill's logits agree with the full forward
    assert 1 <= len(res.token_ids) <= 8
    sampled = [pipe.ask(img, "Describe it.", SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3))
               for _ in range(2)]
    assert sampled[0].token_ids == sampled[1].token_ids
    rc = cli.main(["chat", "--model_path", ckpt, "--vision_tower_name", tower, "--device", "cuda", "--dtype", dtype,
                   "--image", img, "--prompt", "What bird is this?", "--greedy", "--max_new_tokens", "8"])
    assert rc == 0 and capsys.readouterr().out == res.text + "\n"
