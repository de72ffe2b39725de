"""The Gradio demo, run headless and driven through ``gradio_client`` over loopback."""
import os

import pytest
import torch

from visualrwkv.generation import Pipeline, SamplingParams
from visualrwkv.models.vision import load_image_processor
from visualrwkv.serve.demo import build_demo, example_images
from visualrwkv.serve.worker import BatchWorker
from test_generation import tiny_model
from test_serve import free_port
from utils import make_tiny_tower




@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tower = make_tiny_tower(str(tmp_path_factory.mktemp("tower")))
    return Pipeline(tiny_model(tower), load_image_processor(tower), image_position="middle")


@pytest.fixture(scope="module")
def demo_url(pipe):
    worker = BatchWorker(pipe.engine, max_batch_size=4).start()
    demo = build_demo(pipe, worker, title="VisualRWKV test")
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    worker.close()


def test_example_photos_ship_with_the_package():
    ex = example_images()
    assert len(ex) >= 2
    for path, question in ex:
        assert os.path.getsize(path) <= 100_000 and question.endswith(("?", "."))


def test_answer_through_gradio_client(demo_url, pipe):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    img = example_images()[0][0]
    args = (handle_file(img), "What is in the picture?", 0.0, 1.0, 0, 0.0, 0.0, 8, -1)
    answer, status = client.predict(*args, api_name="/answer")
    want = pipe.ask(img, "What is in the picture?", SamplingParams.greedy(8))
    assert answer == want.text
    assert "tokens in" in status and f"finish: {want.finish_reason}" in status
    # Streaming: the job yields growing prefixes of the answer.
    job = client.submit(*args, api_name="/answer")
    job.result()
    outs = [o[0] for o in job.outputs()]
    assert outs[-1] == want.text and len(outs) >= 2
    assert all(want.text.startswith(o) for o in outs)


def test_bad_input_shows_an_error_and_the_demo_keeps_working(demo_url):
    from gradio_client import Client

    client = Client(demo_url, verbose=False)
    with pytest.raises(Exception, match="please type a question"):
        client.predict(None, "   ", 1.0, 0.3, 0, 0.0, 1.0, 8, -1, api_name="/answer")
    answer, status = client.predict(None, "Hello?", 1.0, 0.3, 0, 0.0, 1.0, 4, 5, api_name="/answer")
    again, _ = client.predict(None, "Hello?", 1.0, 0.3, 0, 0.0, 1.0, 4, 5, api_name="/answer")
    assert answer == again  # a fixed seed replays
    assert "finish:" in status
