"""The generation engine: prompt ids + image embeddings in, tokens and text out (SPEC §6, §9).

It knows only ids, embeddings and recurrent states; turning images and conversations into those
is the pipeline's job (``visualrwkv.generation.pipeline``).

How one request runs:

1. **Prefill** the prompt (image spliced at its ``-200`` placeholder) in one parallel pass with
   the bidirectional image scan (``VisualRWKV.prefill``). This yields the logits of the first
   answer token and the recurrent state after the prompt. Prompts of a batch may differ in length
   and in whether they hold an image.
2. **Decode** token by token with ``VisualRWKV.step``: O(1) time and memory per token, whatever
   the context length. Because the image lies entirely inside the prompt, this gives the same
   tokens as re-running the whole sequence for every new token (the original's O(T) per token).
3. **Stop** on token 261 (``"\\n\\n"``) or 0, on ``"\\n\\n"`` (or a user stop string) in the decoded
   text, or at ``max_new_tokens``. The answer is the text before the first ``"\\n\\n"``, stripped.

Batches are *continuous*: ``DecodeBatch.add`` prefills new requests and appends their rows to the
running batch; every ``step`` decodes all rows at once; a finished row leaves at once. The
server's worker and ``Engine.generate`` both drive a ``DecodeBatch``.

Prefix cache: when a prompt holds an image and names an ``image_key``, the state right after the
image placeholder is stored (``PrefixStateCache``) and later prompts that share that prefix (same
image, same text before it) continue from it instead of recomputing the image. (Evaluation over
many distinct images gains nothing from it and may pass ``prefix_cache_size=0``.)

Memory: long prompts are prefilled in pieces (``prefill_chunk_tokens``), the state carrying over;
decoding holds only the fixed-size state per row. On a GPU, decoding steps, short prefills (padded
to a length bucket) and the vision tower replay captured CUDA graphs
(``visualrwkv.generation.cuda_graph``), since each is many small kernels; ``compile=True`` also
fuses the decoding step's elementwise work with torch.compile.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from visualrwkv.constants import IMAGE_TOKEN_INDEX
from visualrwkv.generation.cache import PrefixStateCache
from visualrwkv.generation.sampling import LogitsProcessor, SamplingParams
from visualrwkv.generation.stream import STOP_TOKEN_IDS, TextAssembler
from visualrwkv.models.rwkv6 import RWKVState

log = logging.getLogger(__name__)

# (generated ids so far, next-token logits (V,) float32) -> new logits (V,). Applied before the
# penalties; used for constrained decoding and to force tokens in tests.
LogitsHook = Callable[[List[int], torch.Tensor], torch.Tensor]


@dataclass
class GenerationRequest:
    """One prompt to answer.

    prompt_ids: token ids with at most one ``-200`` image placeholder (``build_inference_ids``).
    image_embeds: (n_image_tokens, C) projected image tokens (``VisualRWKV.encode_images``) when
        the prompt has a placeholder.
    image_key: a name for the image (e.g. a hash of its pixels) so its prefix state can be reused.
    on_text: called with each new piece of the answer (complete characters only).
    cache_prompt: also keep the state after the whole prompt (multi-turn chat extends it).
    """

    prompt_ids: Sequence[int]
    image_embeds: Optional[torch.Tensor] = None
    image_key: Optional[str] = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Optional[Callable[[str], None]] = None
    logits_hook: Optional[LogitsHook] = None
    cache_prompt: bool = False
    tag: Any = None  # free for the caller (the server keeps its request handle here)


@dataclass
class GenerationResult:
    text: str  # the answer: decoded text before the first "\n\n" / stop string, stripped
    token_ids: List[int]  # every generated token, including the one that ended generation
    token_probs: List[float]  # the model's probability of each generated token (softmax of raw logits)
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int  # positions the model read for the prompt (image tokens included)
    cached_tokens: int = 0  # prompt ids taken from the prefix cache instead of being computed
    seed: Optional[int] = None  # the seed that sampling used (None for greedy)
    stop_string: Optional[str] = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_prob(self) -> float:
        """Mean probability of the generated tokens (the eval's confidence); 0.0 for none."""
        return sum(self.token_probs) / len(self.token_probs) if self.token_probs else 0.0


class _Row:
    """A request being decoded."""

    def __init__(self, request: GenerationRequest, params: SamplingParams):
        self.request = request
        self.params = params
        self.text = TextAssembler(params.stop)
        self.token_ids: List[int] = []
        self.probs: List[float] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.cancelled = False
        self.finish_reason: Optional[str] = None

    def emit(self, delta: str) -> None:
        if not delta or self.request.on_text is None:
            return
        try:
            self.request.on_text(delta)
        except Exception:  # a broken consumer (closed connection ...) ends its own row only
            log.exception("on_text callback failed; cancelling that request")
            self.cancelled = True

    def result(self) -> GenerationResult:
        return GenerationResult(self.text.text or "", self.token_ids, self.probs, self.finish_reason or "stop",
                                self.prompt_tokens, self.cached_tokens,
                                None if self.params.is_greedy else self.params.seed, self.text.stop_string)


class Engine:
    """Batched generation over a ``VisualRWKV`` model.

    >>> engine = Engine(model)
    >>> [res] = engine.generate([GenerationRequest(ids, image_embeds=emb, params=SamplingParams.greedy(64))])
    >>> res.text, res.token_ids, res.mean_prob, res.finish_reason
    """

    def __init__(self, model, tokenizer=None, prefix_cache_size: int = 16, max_batch_size: int = 32,
                 backend: str = "auto", prefill_chunk_tokens: int = 16384, cuda_graph: Optional[bool] = None,
                 compile: bool = False):
        """prefill_chunk_tokens: long prompts are prefilled in pieces of about this many positions
        per call (summed over the rows), which bounds activation memory; the state carries across
        pieces, and a piece never splits the image (the placeholder is one id until it is spliced).
        cuda_graph: decode, prefill short prompts and run the vision tower through captured CUDA
        graphs (default: on when the model is on a GPU).
        compile: also torch.compile the decoding step inside its graph (fused elementwise work:
        fewer kernels per token; the first step of each batch size compiles, about a minute)."""
        from visualrwkv.tokenizer import get_tokenizer

        self.model = model.eval()
        self.tokenizer = tokenizer or get_tokenizer()
        self.cache = PrefixStateCache(prefix_cache_size)
        self.max_batch_size = max(1, int(max_batch_size))
        self.backend = backend
        self.vocab_size = model.rwkv.cfg.vocab_size
        self.prefill_chunk_tokens = max(1, int(prefill_chunk_tokens))
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        self.graphs = None
        self.prefill_graphs = None
        self.tower_graphs = None
        if cuda_graph:
            from visualrwkv.generation.cuda_graph import DecoderCache, GraphedTower, PrefillGraphs

            # One captured decoder per power-of-two batch size (rows are padded up to it).
            self.graphs = DecoderCache(model.rwkv, max_graphs=8, compile=compile)
            # Short prompts (launch-bound) replay a graph per padded length; long ones run eagerly.
            self.prefill_graphs = PrefillGraphs(model.rwkv, backend=backend)
            if model.vit is not None:
                self.tower_graphs = GraphedTower(model)

    @property
    def device(self) -> torch.device:
        return self.model.proj.weight.device

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's ``encode_images`` (n, 3, H, W) -> (n, n_image_tokens, C), through a CUDA graph
        when graphs are on."""
        if self.tower_graphs is not None:
            try:
                return self.tower_graphs(pixel_values)
            except Exception as e:  # capture can fail (memory, unsupported op): run the tower eagerly
                log.warning("CUDA graph capture of the vision tower failed (%s); running it without graphs", e)
                self.tower_graphs = None
        return self.model.encode_images(pixel_values)

    # ------------------------------------------------------------------------------ checking
    def check_request(self, req: GenerationRequest) -> None:
        """Raise ``ValueError`` for a request the model cannot run (before it joins a batch)."""
        ids = list(req.prompt_ids)
        if not ids:
            raise ValueError("empty prompt")
        bad = [t for t in ids if t != IMAGE_TOKEN_INDEX and not (0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"prompt ids outside the vocabulary: {bad[:5]}")
        n_ph = ids.count(IMAGE_TOKEN_INDEX)
        if n_ph > 1:
            raise ValueError("a prompt takes at most one image placeholder")
        if n_ph and req.image_embeds is None:
            raise ValueError("the prompt has an image placeholder but no image_embeds were given")
        if req.image_embeds is not None:
            emb = req.image_embeds
            want = (self.model.n_image_tokens, self.model.rwkv.cfg.n_embd)
            if emb.dim() == 3 and emb.shape[0] == 1:
                emb = emb[0]
            if tuple(emb.shape) != want:
                raise ValueError(f"image_embeds must be {want}, got {tuple(req.image_embeds.shape)}")
        req.params.validate(self.vocab_size)

    def prompt_length(self, prompt_ids: Sequence[int]) -> int:
        """Positions the model reads for a prompt: the placeholder expands to the image tokens."""
        n = len(prompt_ids)
        return n + self.model.n_image_tokens - 1 if IMAGE_TOKEN_INDEX in prompt_ids else n

    # ------------------------------------------------------------------------------ prefill
    def _embeds(self, reqs: Sequence[GenerationRequest]) -> Optional[torch.Tensor]:
        """Stack the image embeddings of these requests: (n, n_image_tokens, C), or None."""
        embs = [r.image_embeds.reshape(self.model.n_image_tokens, -1) for r in reqs]
        return torch.stack(embs).to(self.device) if embs else None

    @torch.no_grad()
    def prefill(self, rows: Sequence[_Row]) -> Tuple[torch.Tensor, RWKVState]:
        """Run the prompts of these rows; returns (next-token logits (B, V) float32, state (B rows)).

        With the prefix cache on, each row first takes the longest cached prefix of its prompt. A row
        whose image is not covered by that gets its image prefix (ids up to and including the
        placeholder) computed and cached, deduplicated across rows with the same image and text
        before it. Then the rest of every prompt runs in one batched pass from those states."""
        model, cache = self.model, self.cache
        reqs = [r.request for r in rows]
        ids = [list(r.prompt_ids) for r in reqs]
        B = len(rows)
        start = [0] * B  # prompt ids already covered by the state in `states`
        states: List[Optional[RWKVState]] = [None] * B
        for b, r in enumerate(reqs):
            rows[b].prompt_tokens = self.prompt_length(ids[b])
            if cache.max_entries > 0:
                start[b], states[b] = cache.lookup(r.image_key, ids[b])
                rows[b].cached_tokens = start[b]

        # Image prefixes that the cache did not cover: compute once per (image, text before it).
        if cache.max_entries > 0:
            groups: Dict[Tuple[str, Tuple[int, ...]], List[int]] = {}
            for b, r in enumerate(reqs):
                if IMAGE_TOKEN_INDEX in ids[b] and r.image_key is not None:
                    p = ids[b].index(IMAGE_TOKEN_INDEX)
                    if start[b] <= p and p + 1 < len(ids[b]):
                        groups.setdefault((r.image_key, tuple(ids[b][: p + 1])), []).append(b)
            if groups:
                keys = list(groups)
                st = model.rwkv.empty_state(len(keys), device=self.device)
                self._prefill_chunked([reqs[groups[k][0]] for k in keys], [list(k[1]) for k in keys], st)
                for i, k in enumerate(keys):
                    one = st.select(i)
                    cache.store(k[0], k[1], one)
                    for b in groups[k]:
                        start[b], states[b] = len(k[1]), one

        # The rest of every prompt, batched, each row from its own state (zeros = nothing before).
        rest = [ids[b][start[b]:] for b in range(B)]
        empty = model.rwkv.empty_state(1, device=self.device)
        state = RWKVState.cat([s if s is not None else empty for s in states])
        logits = self._prefill_chunked(reqs, rest, state)
        for b, r in enumerate(reqs):
            if r.cache_prompt:
                cache.store(r.image_key, ids[b], state.select(b))
        return logits, state

    def _prefill_chunked(self, reqs: Sequence[GenerationRequest], rest: List[List[int]],
                         state: RWKVState) -> torch.Tensor:
        """Prefill ``rest[b]`` for every row from ``state`` (B rows, updated in place), in pieces of
        at most ``chunk`` ids per row. Returns the logits after each row's last id (B, V) float32."""
        B = len(rest)
        chunk = max(1, self.prefill_chunk_tokens // B)
        logits = torch.zeros(B, self.vocab_size, device=self.device)
        n_pieces = max((len(r) + chunk - 1) // chunk for r in rest)
        for k in range(n_pieces):
            rows = [b for b in range(B) if len(rest[b]) > k * chunk]
            pieces = [rest[b][k * chunk:(k + 1) * chunk] for b in rows]
            with_img = [b for b, piece in zip(rows, pieces) if IMAGE_TOKEN_INDEX in piece]
            sub = state if len(rows) == B else state.select(rows)
            lg, st = self.model.prefill(pieces, image_embeds=self._embeds([reqs[b] for b in with_img]), state=sub,
                                        backend=self.backend, runner=self.prefill_graphs)
            idx = torch.as_tensor(rows, device=self.device)
            logits.index_copy_(0, idx, lg)
            state.att_shift.index_copy_(1, idx, st.att_shift)
            state.wkv.index_copy_(1, idx, st.wkv)
            state.ffn_shift.index_copy_(1, idx, st.ffn_shift)
        return logits

    # ------------------------------------------------------------------------------ driving
    def new_batch(self) -> "DecodeBatch":
        return DecodeBatch(self)

    def generate(self, requests: Sequence[GenerationRequest],
                 on_text: Optional[Callable[[int, str], None]] = None) -> List[GenerationResult]:
        """Answer every request; at most ``max_batch_size`` decode together and a finished row's
        slot goes to the next waiting request. ``on_text(i, delta)`` streams request i's answer.
        Results are in request order."""
        reqs = list(requests)
        for r in reqs:
            self.check_request(r)
        if on_text is not None:
            reqs = [replace(r, on_text=_both(r.on_text, i, on_text)) for i, r in enumerate(reqs)]
        order = {id(r): i for i, r in enumerate(reqs)}
        results: List[Optional[GenerationResult]] = [None] * len(reqs)
        pending = deque(reqs)
        batch = self.new_batch()
        while pending or len(batch):
            free = self.max_batch_size - len(batch)
            if pending and free > 0:
                new = [pending.popleft() for _ in range(min(free, len(pending)))]
                for req, res in batch.add(new):
                    results[order[id(req)]] = res
            for req, res in batch.step():
                results[order[id(req)]] = res
        return results  # type: ignore[return-value]

    def generate_one(self, prompt_ids: Sequence[int], image_embeds: Optional[torch.Tensor] = None,
                     params: Optional[SamplingParams] = None, on_text: Optional[Callable[[str], None]] = None,
                     **kw) -> GenerationResult:
        req = GenerationRequest(list(prompt_ids), image_embeds, params=params or SamplingParams(), on_text=on_text, **kw)
        return self.generate([req])[0]


def _both(own: Optional[Callable[[str], None]], i: int, shared: Callable[[int, str], None]):
    def emit(delta: str) -> None:
        if own is not None:
            own(delta)
        shared(i, delta)

    return emit


class DecodeBatch:
    """Rows being decoded together: their state (B rows), next-token logits (B, V) and sampling
    state. ``add`` prefills and appends requests, ``step`` emits one token per row and returns the
    rows that finished, ``cancel`` marks a request to be dropped at the next step.

    With CUDA graphs the live state sits in the captured decoder's buffers (rows padded up to a
    power of two) between steps and is copied out only when rows join or leave. An engine (and its
    batches) is driven by one thread at a time.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: List[_Row] = []
        self.state: Optional[RWKVState] = None
        self.logits: Optional[torch.Tensor] = None
        self.processor = LogitsProcessor([], engine.vocab_size, engine.device)
        self._dec = None  # the GraphedDecoder holding this batch's state, if any

    def _sync_state(self) -> None:
        """Take the state out of the graph's buffers (before the set of rows changes)."""
        dec, self._dec = self._dec, None
        if dec is not None and getattr(dec, "owner", None) is self:
            B = len(self.rows)
            st = dec.static_state
            self.state = RWKVState(st.att_shift[:, :B].clone(), st.wkv[:, :B].clone(), st.ffn_shift[:, :B].clone())
            dec.owner = None

    def _graph_step(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """One decoding step through a captured CUDA graph; None when graphs are unavailable."""
        B = len(self.rows)
        if self._dec is None:
            bucket = 1 << (B - 1).bit_length()  # next power of two: few graphs serve every batch size
            try:
                dec = self.engine.graphs.get(bucket)
            except Exception as e:  # capture can fail (memory, unsupported op): fall back to eager steps
                log.warning("CUDA graph capture failed (%s); decoding without graphs", e)
                self.engine.graphs = None
                return None
            prev = getattr(dec, "owner", None)
            if prev is not None and prev is not self:
                prev._sync_state()  # another batch of this engine used the decoder: hand its state back
            state = self.state
            if bucket > B:
                pad = self.engine.model.rwkv.empty_state(bucket - B, device=self.engine.device)
                state = RWKVState.cat([state, pad])
            dec.load_state(state)
            dec.owner = self
            self._dec, self.state = dec, None
        if bucket_pad := self._dec.batch_size - B:
            tokens = torch.cat([tokens, tokens.new_zeros(bucket_pad)])
        return self._dec.step(tokens)[:B].clone()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, requests: Sequence[GenerationRequest]) -> List[Tuple[GenerationRequest, GenerationResult]]:
        """Prefill ``requests`` and append them. Requests with ``max_new_tokens == 0`` finish at once
        (returned). Raises if the prefill fails; the running rows are untouched then."""
        done, new = [], []
        for req in requests:
            self.engine.check_request(req)
            row = _Row(req, req.params.with_seed())
            if row.params.max_new_tokens == 0:
                row.finish_reason = "length"
                row.prompt_tokens = self.engine.prompt_length(req.prompt_ids)
                row.text.finish()
                done.append((req, row.result()))
            else:
                new.append(row)
        if not new:
            return done
        logits, state = self.engine.prefill(new)
        self._sync_state()
        self.processor.extend([r.params for r in new])
        self.rows.extend(new)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        self.state = state if self.state is None else RWKVState.cat([self.state, state])
        return done

    def cancel(self, request: GenerationRequest) -> None:
        for row in self.rows:
            if row.request is request:
                row.cancelled = True

    def _keep(self, keep: List[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self._sync_state()
        self.rows = [self.rows[i] for i in keep]
        self.processor.select(keep)
        if keep:
            idx = torch.as_tensor(keep, device=self.logits.device)
            self.logits = self.logits.index_select(0, idx)
            self.state = self.state.select(keep)
        else:
            self.logits, self.state = None, None

    @torch.no_grad()
    def step(self) -> List[Tuple[GenerationRequest, GenerationResult]]:
        """Choose one token for every row, stream its text, retire finished rows, and run the model
        one step for the rest. Returns the (request, result) pairs that finished."""
        finished: List[Tuple[GenerationRequest, GenerationResult]] = []
        # Requests cancelled since the last step leave without another token.
        live = []
        for i, row in enumerate(self.rows):
            if row.cancelled:
                row.finish_reason = "cancelled"
                row.text.finish()
                finished.append((row.request, row.result()))
            else:
                live.append(i)
        self._keep(live)
        if not self.rows:
            return finished

        raw = self.logits  # (B, V) float32: the model's own next-token logits
        logits = raw
        if any(r.request.logits_hook is not None for r in self.rows):
            logits = raw.clone()
            for b, row in enumerate(self.rows):
                if row.request.logits_hook is not None:
                    logits[b] = row.request.logits_hook(list(row.token_ids), logits[b])
        tokens = self.processor(logits)  # (B,) long: penalties, bans, greedy / sampling
        probs = raw.softmax(dim=1).gather(1, tokens.unsqueeze(1)).squeeze(1)

        tok_list, prob_list = tokens.tolist(), probs.tolist()
        tokenizer = self.engine.tokenizer
        keep = []
        for b, row in enumerate(self.rows):
            t = tok_list[b]
            row.token_ids.append(t)
            row.probs.append(prob_list[b])
            delta, stopped = row.text.push(tokenizer.token_bytes(t))
            if t in STOP_TOKEN_IDS or stopped:
                row.finish_reason = "stop"
            elif len(row.token_ids) >= row.params.max_new_tokens:
                row.finish_reason = "length"
            if row.finish_reason is not None:
                delta += row.text.finish()
            row.emit(delta)
            if row.finish_reason is not None:
                finished.append((row.request, row.result()))
            else:
                keep.append(b)
        self._keep(keep)
        if self.rows:
            # O(1) per token: feed the chosen tokens and carry the recurrent state.
            idx = torch.as_tensor(keep, device=tokens.device)
            nxt = tokens.index_select(0, idx)
            logits = self._graph_step(nxt) if self.engine.graphs is not None else None
            if logits is None:
                logits, self.state = self.engine.model.step(nxt, self.state, backend=self.engine.backend)
            self.logits = logits
        return finished
