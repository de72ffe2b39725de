"""The OpenAI-compatible server, driven by the official ``openai`` client over loopback."""
import base64
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from visualrwkv.generation import Pipeline, SamplingParams
from visualrwkv.models.vision import load_image_processor
from visualrwkv.serve.server import create_app
from test_generation import example_image, tiny_model
from utils import make_tiny_tower

MODEL = "tiny-visualrwkv"




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tower = make_tiny_tower(str(tmp_path_factory.mktemp("tower")))
    return Pipeline(tiny_model(tower), load_image_processor(tower), image_position="middle")


@pytest.fixture(scope="module")
def server(pipe):
    s = RunningServer(create_app(pipe, MODEL, max_batch_size=4, max_queue=16))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()


def image_message(text: str, url: str):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_plain_completion_matches_the_pipeline(client, pipe):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello, who are you?"}],
                                       temperature=0, max_tokens=8)
    want = pipe.ask(None, "Hello, who are you?", SamplingParams.greedy(8))
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sea."}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_image_by_data_url(client, pipe):
    img = example_image("extreme_ironing.jpg")
    r = client.chat.completions.create(model=MODEL, messages=image_message("What is unusual here?", data_url(img)),
                                       temperature=0, max_tokens=8)
    want = pipe.ask(img, "What is unusual here?", SamplingParams.greedy(8))
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens  # the image tokens are counted


def test_sampling_parameters_are_honoured(client, server):
    msgs = [{"role": "user", "content": "Tell me about cats."}]
    a = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
    b = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
    c = client.chat.completions.create(model=MODEL, messages=msgs, temperature=1.0, top_p=0.9, seed=43, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    short = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    full = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12).choices[0]
    text = full.message.content
    stop = text.split()[1] if len(text.split()) > 1 else text[1:3]
    cut = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    # Every sampling field reaches the engine as given.
    worker = server.app.state.worker
    seen = []
    submit = worker.submit
    worker.submit = lambda req, loop=None: (seen.append(req.params), submit(req, loop))[1]
    try:
        client.chat.completions.create(model=MODEL, messages=msgs, temperature=0.7, top_p=0.8, max_tokens=5,
                                       presence_penalty=0.4, frequency_penalty=-0.3, seed=9, stop="zz",
                                       extra_body={"top_k": 12})
    finally:
        del worker.submit
    p = seen[0]
    assert (p.temperature, p.top_p, p.max_new_tokens, p.presence_penalty, p.frequency_penalty, p.seed, list(p.stop),
            p.top_k) == (0.7, 0.8, 5, 0.4, -0.3, 9, ["zz"], 12)


def _error(client_call):
    with pytest.raises(openai.APIStatusError) as e:
        client_call()
    body = e.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return e.value.status_code, body["error"]


def test_malformed_requests_get_4xx_and_the_server_survives(client, server):
    create = client.chat.completions.create
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (lambda: create(model=MODEL, messages=image_message("x", "data:image/png;base64,@@not base64@@")), 400,
         "invalid_base64"),
        (lambda: create(model=MODEL, messages=image_message("x", "data:image/png;base64," +
                                                            base64.b64encode(b"not an image").decode())), 400,
         "invalid_image"),
        (lambda: create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]), 400, "unsupported_content_type"),
        (lambda: create(model=MODEL, messages=image_message("x", "https://example.com/cat.jpg")), 400,
         "invalid_image_url"),
        (lambda: create(model=MODEL, messages=image_message("x", example_image())), 400, "invalid_image_url"),
        (lambda: create(model="gpt-4o", messages=user), 404, "model_not_found"),
        (lambda: create(model=MODEL, messages=[]), 400, None),
        (lambda: create(model=MODEL, messages=user, n=2), 400, None),
        (lambda: create(model=MODEL, messages=user, temperature=5), 400, None),
        (lambda: create(model=MODEL, messages=user, max_tokens=0), 400, None),
        (lambda: create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}]), 400, None),
        (lambda: create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400, None),
        (lambda: create(model=MODEL, messages=image_message("a", data_url(example_image())) +
                        image_message("b", data_url(example_image()))), 400, "too_many_images"),
        (lambda: create(model=MODEL, messages=[{"role": "user", "content": "<image>\nwhat"}]), 400, None),
    ]
    for call, status, code in cases:
        got_status, err = _error(call)
        assert got_status == status, err
        assert err["type"] == "invalid_request_error"
        if code:
            assert err["code"] == code, err
    raw = httpx.Client(base_url=server.url, timeout=30)
    for body in ["{not json", "[1, 2]", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                 json.dumps({"model": MODEL}), json.dumps({"model": MODEL, "messages": "hi"}),
                 json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"})]:
        r = raw.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]
    missing = raw.post("/v1/chat/completions", json={"model": MODEL})
    assert missing.json()["error"]["param"] == "messages"
    r = raw.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # Still serving.
    ok = client.chat.completions.create(model=MODEL, messages=user, temperature=0, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert raw.get("/health").json()["status"] == "ok"


def test_concurrent_requests_are_batched(client, server, pipe):
    questions = ["What is this?", "Where is the sun?", "Name a colour.", "Count to three."]
    results = {}

    def ask(q):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                                           max_tokens=24)
        results[q] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert server.app.state.worker.largest_batch > 1
    for q in questions:  # batching does not change anyone's answer
        assert results[q] == pipe.ask(None, q, SamplingParams.greedy(24)).text


def test_a_client_leaving_mid_stream_frees_its_slot(client, server):
    worker = server.app.state.worker
    before = worker.finished["cancelled"]
    with httpx.Client(base_url=server.url, timeout=30) as raw:
        with raw.stream("POST", "/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": "Talk."}], "stream": True,
                              "max_tokens": 4000, "temperature": 1.0, "seed": 1}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    deadline = time.time() + 30
    while worker.finished["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert worker.finished["cancelled"] == before + 1
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                        max_tokens=2)
    assert ok.usage.completion_tokens <= 2
    while worker.active and time.time() < deadline:
        time.sleep(0.05)
    assert worker.active == 0


def test_local_images_only_when_allowed(pipe):
    s = RunningServer(create_app(pipe, MODEL, allow_local_images=True))
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        img = example_image("pizza.jpg")
        r = c.chat.completions.create(model=MODEL, messages=image_message("Food?", img), temperature=0, max_tokens=5)
        assert r.choices[0].message.content == pipe.ask(img, "Food?", SamplingParams.greedy(5)).text
        status, err = _error(lambda: c.chat.completions.create(model=MODEL,
                                                               messages=image_message("x", "/no/such/file.jpg")))
        assert status == 400 and "not found" in err["message"]
    finally:
        s.stop()
