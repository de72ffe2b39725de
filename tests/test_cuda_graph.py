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
