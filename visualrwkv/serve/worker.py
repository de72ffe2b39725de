"""A background worker that batches concurrent requests (continuous batching).

Callers ``submit`` a ``GenerationRequest`` and get a ``Handle`` that yields the answer's text
pieces and then the result. One thread owns the model: it takes waiting requests into the running
``DecodeBatch`` whenever a slot is free (their prompts are prefilled together), decodes one token
for every row per step, and hands each finished row's result back at once. So N concurrent chats
cost about one batched decode step per token instead of N separate ones, and at most
``max_batch_size`` requests are decoded while up to ``max_queue`` more wait.

Failures stay local: a request whose prefill raises gets an error event, the others go on; if a
decoding step itself fails, the rows of that batch get the error and the worker starts afresh.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from typing import AsyncIterator, Iterator, List, Optional, Tuple

from visualrwkv.generation.engine import Engine, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

Event = Tuple[str, object]  # ("text", str) | ("done", GenerationResult) | ("error", Exception)


class Busy(Exception):
    """The wait queue is full."""


class Handle:
    """The caller's side of one submitted request. Events arrive through a thread-safe queue, or an
    asyncio queue when the handle was created for an event loop (the HTTP server)."""

    def __init__(self, worker: "BatchWorker", request: GenerationRequest,
                 loop: Optional[asyncio.AbstractEventLoop] = None):
        self.worker = worker
        self.request = request
        self.cancelled = False
        self._loop = loop
        self._aq: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None
        self._q: "queue.Queue[Event]" = queue.Queue()

    def put(self, event: Event) -> None:
        """Called from the worker thread."""
        if self._loop is None:
            self._q.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._aq.put_nowait, event)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating for this request (e.g. the client went away)."""
        self.cancelled = True

    # -- consuming ---------------------------------------------------------------------------
    def events(self, timeout: Optional[float] = None) -> Iterator[Event]:
        """Blocking: ("text", delta)... then ("done", result) or ("error", exception)."""
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev[0] != "text":
                return

    async def aevents(self) -> AsyncIterator[Event]:
        while True:
            ev = await self._aq.get()
            yield ev
            if ev[0] != "text":
                return

    def result(self, timeout: Optional[float] = None) -> GenerationResult:
        for kind, val in self.events(timeout):
            if kind == "error":
                raise val  # type: ignore[misc]
            if kind == "done":
                return val  # type: ignore[return-value]
        raise RuntimeError("no result")  # pragma: no cover

    async def aresult(self) -> GenerationResult:
        async for kind, val in self.aevents():
            if kind == "error":
                raise val  # type: ignore[misc]
            if kind == "done":
                return val  # type: ignore[return-value]
        raise RuntimeError("no result")  # pragma: no cover


class BatchWorker:
    def __init__(self, engine: Engine, max_batch_size: int = 8, max_queue: int = 64):
        self.engine = engine
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue = max(1, int(max_queue))
        self._queue: "queue.Queue[Optional[Handle]]" = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.largest_batch = 0  # the most rows decoded together so far (for tests and logs)
        self.steps = 0
        self.active = 0  # rows in the running batch
        self.finished = collections.Counter()  # finish reasons so far ("stop", "length", "cancelled", "error")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "BatchWorker":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="visualrwkv-batch-worker", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._queue.put(None)  # wake the thread if it waits for work
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting --------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, loop: Optional[asyncio.AbstractEventLoop] = None) -> Handle:
        """Queue a request. Raises ``ValueError`` for a request the model cannot run and ``Busy``
        when the wait queue is full."""
        self.engine.check_request(request)
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self.max_queue} requests are already waiting")
        handle = Handle(self, request, loop)
        request.on_text = lambda delta: handle.put(("text", delta))
        request.tag = handle
        self._queue.put(handle)
        return handle

    # -- the worker thread -------------------------------------------------------------------
    def _admit(self, batch, handles: List[Handle]) -> None:
        try:
            done = batch.add([h.request for h in handles])
        except Exception as e:
            if len(handles) > 1:  # find the bad one: admit them one by one
                for h in handles:
                    self._admit(batch, [h])
                return
            log.warning("request failed in prefill: %s", e)
            self.finished["error"] += 1
            handles[0].put(("error", e))
            return
        for req, res in done:
            self._done(req, res)

    def _done(self, req: GenerationRequest, res: GenerationResult) -> None:
        self.finished[res.finish_reason] += 1
        req.tag.put(("done", res))

    def _run(self) -> None:
        batch = self.engine.new_batch()
        while not self._stop.is_set():
            new: List[Handle] = []
            try:
                if not len(batch):  # idle: wait for work
                    h = self._queue.get(timeout=0.5)
                    if h is not None:
                        new.append(h)
                while len(batch) + len(new) < self.max_batch_size:  # take what else is waiting
                    h = self._queue.get_nowait()
                    if h is not None:
                        new.append(h)
            except queue.Empty:
                pass
            if self._stop.is_set():
                break
            for h in [h for h in new if h.cancelled]:
                self._done(h.request, GenerationResult("", [], [], "cancelled", 0))
            new = [h for h in new if not h.cancelled]
            if new:
                self._admit(batch, new)
            self.active = len(batch)
            if not len(batch):
                continue
            for row in batch.rows:
                if row.request.tag is not None and row.request.tag.cancelled:
                    batch.cancel(row.request)
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                finished = batch.step()
                self.steps += 1
            except Exception as e:  # a failing step must not kill the server: fail this batch only
                log.exception("decoding step failed")
                for row in batch.rows:
                    self.finished["error"] += 1
                    row.request.tag.put(("error", e))
                batch = self.engine.new_batch()
                self.active = 0
                continue
            self.active = len(batch)
            for req, res in finished:
                self._done(req, res)
        # Shutting down: tell everyone still waiting.
        err = RuntimeError("the server is shutting down")
        for row in batch.rows:
            row.request.tag.put(("error", err))
        while True:
            try:
                h = self._queue.get_nowait()
            except queue.Empty:
                break
            if h is not None:
                h.put(("error", err))
