"""``visualrwkv serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    visualrwkv serve --model_path M.pth --vision_tower_name openai/clip-vit-large-patch14-336 --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="M", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}])

Endpoints: ``POST /v1/chat/completions`` (plain or streamed by server-sent events in OpenAI's
chunk format), ``GET /v1/models``, ``GET /health``.

Messages map onto the training format (SPEC §5): ``user`` -> human turns, ``assistant`` -> gpt
turns; ``system``/``developer`` text is put in front of the next user message (the format has no
system slot). At most one image per conversation (the model takes one), given as a base64 data
URL; local file paths only with ``--allow_local_images``; remote URLs are not fetched.

Honoured: temperature, top_p, max_tokens / max_completion_tokens, stop, presence_penalty,
frequency_penalty, seed, stream, stream_options.include_usage, and the extension ``top_k``.
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
for anything the client can fix; no request can take the server down.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visualrwkv.errors import UserError
from visualrwkv.generation.engine import GenerationRequest
from visualrwkv.generation.sampling import SamplingParams

log = logging.getLogger("visualrwkv.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body (a base64 photo is a few MB at most)
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.S)


class ApiError(Exception):
    """A request the client must fix (or a busy server): becomes an OpenAI-style error response."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Request parsing (plain functions, so they are easy to test and reuse)
def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"'{name}' must be a number", param=name)
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(f"'{name}' must be in {rng}, got {v}", param=name)
    return float(v)


def _int(body: dict, name: str, default, lo: int, hi: int):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer", param=name)
    if not lo <= v <= hi:
        raise ApiError(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)
    return v


def decode_image_url(url: Any, allow_local_images: bool) -> bytes:
    """The bytes of an ``image_url``: a base64 data URL, or (when allowed) a local file path or
    ``file://`` URL."""
    if not isinstance(url, str) or not url:
        raise ApiError("image_url.url must be a non-empty string", param="messages")
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if not m or ";base64" not in m.group("params").lower():
            raise ApiError("image data URLs must be base64: data:image/png;base64,...", param="messages",
                           code="invalid_image_url")
        payload = re.sub(r"\s+", "", m.group("data"))
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("the image data URL does not hold valid base64", param="messages",
                           code="invalid_base64") from None
        if not data:
            raise ApiError("the image data URL is empty", param="messages", code="invalid_image_url")
        return data
    if url.startswith(("http://", "https://")):
        raise ApiError("this server does not fetch remote images; send the image as a base64 data URL "
                       "(data:image/jpeg;base64,...)", param="messages", code="invalid_image_url")
    path = url[len("file://"):] if url.startswith("file://") else url
    if not allow_local_images:
        raise ApiError("local image paths are disabled; send a base64 data URL, or start the server with "
                       "--allow_local_images", param="messages", code="invalid_image_url")
    if not os.path.isfile(path):
        raise ApiError(f"image file not found: {path}", param="messages", code="invalid_image_url")
    with open(path, "rb") as f:
        return f.read()


def _message_text_and_image(msg: dict, i: int, allow_local_images: bool) -> Tuple[str, Optional[bytes]]:
    content = msg.get("content")
    role = msg.get("role")
    if content is None:
        if role == "assistant":
            return "", None
        raise ApiError(f"messages[{i}].content is missing", param=f"messages[{i}].content")
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ApiError(f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content")
    texts: List[str] = []
    image: Optional[bytes] = None
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict):
            raise ApiError(f"{where} must be an object", param=where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(f"{where}.text must be a string", param=where)
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise ApiError(f"{where}: images are only accepted in user messages", param=where)
            if image is not None:
                raise ApiError("VisualRWKV takes one image per conversation; this request has more",
                               param=where, code="too_many_images")
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            image = decode_image_url(url, allow_local_images)
        else:
            raise ApiError(f"{where}: unsupported content part type {kind!r} (supported: 'text', 'image_url')",
                           param=where, code="unsupported_content_type")
    return "\n".join(texts), image


def parse_messages(messages: Any, allow_local_images: bool = False) -> Tuple[List[Tuple[str, str]], Optional[bytes]]:
    """OpenAI messages -> ([(role 'human'|'gpt', text), ...], image bytes or None). The image's
    message gets the ``<image>`` placeholder; the data pipeline moves it by image position."""
    from visualrwkv.constants import DEFAULT_IMAGE_TOKEN

    if messages is None:
        raise ApiError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    conv: List[Tuple[str, str]] = []
    system: List[str] = []
    image: Optional[bytes] = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                           param=f"messages[{i}].role")
        text, img = _message_text_and_image(msg, i, allow_local_images)
        if DEFAULT_IMAGE_TOKEN in text:
            raise ApiError(f"messages[{i}] contains the reserved text {DEFAULT_IMAGE_TOKEN}; send images as "
                           "image_url parts", param=f"messages[{i}].content")
        if role in ("system", "developer"):
            if text.strip():
                system.append(text.strip())
            continue
        if role == "user":
            if system:  # no system slot in the training format: prepend to this user message
                text = "\n".join(system + [text])
                system = []
            if img is not None:
                if image is not None:
                    raise ApiError("VisualRWKV takes one image per conversation; this request has more",
                                   param=f"messages[{i}]", code="too_many_images")
                image = img
                text = DEFAULT_IMAGE_TOKEN + "\n" + text
            conv.append(("human", text))
        elif text.strip():  # assistant; an empty one would break the turn format
            conv.append(("gpt", text))
    if not conv or conv[-1][0] != "human":
        raise ApiError("the last message must come from the user", param="messages")
    return conv, image


@dataclass
class ChatRequest:
    model: str
    conversation: List[Tuple[str, str]]
    image: Optional[bytes]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_chat_request(body: Any, served_model: str, allow_local_images: bool = False,
                       default_max_tokens: int = 256, max_tokens_limit: int = 4096) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise ApiError("'model' is required", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise ApiError("'model' must be a string", param="model")
    if model != served_model:
        raise ApiError(f"the model {model!r} does not exist; this server serves {served_model!r}", status=404,
                       param="model", code="model_not_found")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError("only n = 1 is supported", param="n")
    if body.get("logprobs"):
        raise ApiError("logprobs are not supported", param="logprobs")
    if body.get("tools"):
        raise ApiError("tools are not supported", param="tools")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options")
    stop = body.get("stop")
    if stop is None:
        stops: List[str] = []
    elif isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise ApiError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    max_tokens = _int(body, "max_completion_tokens", None, 1, max_tokens_limit)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", default_max_tokens, 1, max_tokens_limit)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError("'seed' must be an integer", param="seed")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0, 0, 1 << 20),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stop=stops,
        seed=None if seed is None else seed & ((1 << 63) - 1),
    )
    conv, image = parse_messages(body.get("messages"), allow_local_images)
    return ChatRequest(model, conv, image, params, stream, bool(opts.get("include_usage", False)))


# ---------------------------------------------------------------------------------------------
def create_app(pipe, model_name: str, allow_local_images: bool = False, max_batch_size: int = 8,
               max_queue: int = 64, default_max_tokens: int = 256, max_tokens_limit: int = 4096):
    """The FastAPI app around a loaded ``Pipeline``. Its batch worker starts now and stops when
    the app shuts down (``app.state.worker``)."""
    from contextlib import asynccontextmanager

    from visualrwkv.serve.worker import BatchWorker, Busy

    worker = BatchWorker(pipe.engine, max_batch_size=max_batch_size, max_queue=max_queue).start()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.close()

    app = FastAPI(title="VisualRWKV", lifespan=lifespan)
    app.state.worker = worker
    app.state.pipeline = pipe

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error_response(ApiError(str(exc.detail), status=exc.status_code,
                                       code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(str(exc), status=400))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.exception("internal error")
        return error_response(ApiError("internal server error", status=500, type_="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok" if worker.alive else "worker stopped"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "visualrwkv"}]}

    def build_request(chat: ChatRequest) -> GenerationRequest:
        """Image -> embeddings (vision tower) and conversation -> ids; runs in a thread."""
        emb = None
        if chat.image is not None:
            try:
                emb = pipe.embed_image(chat.image)
            except UserError as e:
                raise ApiError(f"image_url: {e}", param="messages", code="invalid_image") from None
        try:
            return pipe.request(chat.conversation, params=chat.params, image_embeds=emb)
        except UserError as e:
            raise ApiError(str(e), param="messages") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(f"request body larger than {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        chat = parse_chat_request(body, model_name, allow_local_images, default_max_tokens, max_tokens_limit)
        gen_req = await asyncio.to_thread(build_request, chat)
        try:
            handle = worker.submit(gen_req, loop=asyncio.get_running_loop())
        except Busy as e:
            raise ApiError(f"the server is busy ({e}); retry later", status=429, type_="rate_limit_error",
                           code="server_busy") from None
        except (ValueError, UserError) as e:
            raise ApiError(str(e)) from None
        cid = "chatcmpl-" + uuid.uuid4().hex
        now = int(time.time())

        def usage(res) -> Dict[str, int]:
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                    "total_tokens": res.prompt_tokens + res.completion_tokens}

        if not chat.stream:
            try:
                res = await handle.aresult()
            except asyncio.CancelledError:
                handle.cancel()
                raise
            except Exception as e:
                log.exception("generation failed")
                raise ApiError(f"generation failed: {e}", status=500, type_="server_error") from None
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                 "logprobs": None, "finish_reason": _finish(res.finish_reason)}],
                    "usage": usage(res)}

        def chunk(delta: dict, finish: Optional[str] = None) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            finished = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for kind, val in handle.aevents():
                    if kind == "text":
                        yield chunk({"content": val})
                    elif kind == "done":
                        finished = True
                        yield chunk({}, _finish(val.finish_reason))
                        if chat.include_usage:
                            obj = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                   "choices": [], "usage": usage(val)}
                            yield f"data: {json.dumps(obj)}\n\n"
                    else:
                        finished = True
                        log.error("generation failed: %s", val)
                        err = ApiError(f"generation failed: {val}", status=500, type_="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away: free the batch slot
                    handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from visualrwkv.generation.chat import add_model_args

    p = argparse.ArgumentParser(
        prog="visualrwkv serve",
        description="OpenAI-compatible HTTP API: POST /v1/chat/completions (text + image_url data URLs, "
                    "streaming), GET /v1/models.",
        epilog="example:\n  visualrwkv serve --model_path VisualRWKV-v060-1B6-v1.0-20240612.pth "
               "--vision_tower_name openai/clip-vit-large-patch14-336 --port 8000\n"
               "then point an OpenAI client at http://127.0.0.1:8000/v1 (any api_key).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all; default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--model_name", default=None, help="model id clients send (default: the checkpoint file's stem)")
    g.add_argument("--allow_local_images", action="store_true",
                   help="accept image_url values that are file paths on this machine (off by default)")
    g.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together (default 8)")
    g.add_argument("--max_queue", type=int, default=64, help="requests that may wait; more get 429 (default 64)")
    g.add_argument("--max_tokens", type=int, default=256, help="default max_tokens of a request (default 256)")
    g.add_argument("--max_tokens_limit", type=int, default=4096, help="largest max_tokens accepted (default 4096)")
    g.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    if args.max_batch_size < 1 or args.max_queue < 1 or args.max_tokens < 1:
        raise UserError("--max_batch_size, --max_queue and --max_tokens must be >= 1")
    import uvicorn

    from visualrwkv.generation.chat import load_pipeline_from_args

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = load_pipeline_from_args(args, max_batch_size=args.max_batch_size)
    name = args.model_name or os.path.splitext(os.path.basename(args.model_path))[0]
    app = create_app(pipe, name, allow_local_images=args.allow_local_images, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, default_max_tokens=args.max_tokens,
                     max_tokens_limit=args.max_tokens_limit)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (device {pipe.device})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
