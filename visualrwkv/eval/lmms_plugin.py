"""VisualRWKV as an ``lmms-eval`` model, so its tasks run on this model:

    pip install 'visualrwkv[lmms]'
    lmms-eval --model visualrwkv \\
        --model_args model_path=VisualRWKV-v060-1B6-v1.0-20240612.pth,vision_tower_name=openai/clip-vit-large-patch14-336 \\
        --tasks mme,pope --batch_size 32 --output_path ./logs/

``model_args`` (all but the first two optional): ``model_path``, ``vision_tower_name``,
``grid_size`` (-1), ``image_position`` (middle), ``device`` (auto), ``dtype`` (auto),
``batch_size`` (16), ``max_new_tokens`` (used when a task sets none; 128), ``model_id``.

How lmms-eval finds the model: the package declares the entry point
``[project.entry-points."lmms_eval.models"] visualrwkv = "visualrwkv.eval.lmms_plugin:VisualRWKVLmms"``.
Recent lmms-eval versions call an entry point's object with no arguments and expect a
``ModelManifest``; ``VisualRWKVLmms()`` without arguments therefore returns the manifest that
points back to this class (see ``__new__``). For versions without entry-point discovery,
``python -m visualrwkv.eval.lmms_plugin <lmms-eval arguments>`` registers the model and runs
lmms-eval's command line.

The base class follows lmms-eval's ``lmms`` API (``lmms_eval/api/model.py``): requests are
``Instance`` objects whose ``args`` are

* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` -> the answer
  text. Decoded with the batched engine of ``visualrwkv eval`` (``answer_jobs``); ``until`` become
  stop strings, ``temperature`` > 0 (or ``do_sample``) samples with ``top_p``, otherwise greedy.
* ``loglikelihood``: ``(context, doc_to_target, doc_to_visual, doc_id, task, split)`` ->
  ``(log P(continuation | prompt), continuation is the greedy choice)``. The continuation is
  scored as the beginning of the assistant's answer (after ``"Assistant:"`` and its space), in
  the training format, without the end-of-answer ``"\\n\\n"``.

lmms-eval stays optional: without it this module still imports (with a small stand-in base class),
which is what the tests use.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visualrwkv.errors import UserError

log = logging.getLogger(__name__)

MODEL_NAME = "visualrwkv"
CLASS_PATH = "visualrwkv.eval.lmms_plugin.VisualRWKVLmms"

try:  # lmms-eval is optional: guard the base class import
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL = True
except ImportError:
    HAVE_LMMS_EVAL = False

    class _NoCacheHook:
        """Stand-in for lmms-eval's CacheHook(None): caching is off."""

        def add_partial(self, attr, req, res) -> None:
            pass

    class _LmmsBase:  # type: ignore[no-redef]
        """The parts of lmms-eval's ``lmms`` base class that the plugin relies on."""

        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook = _NoCacheHook()
            self.task_dict: Dict[str, Any] = {}

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        def set_cache_hook(self, cache_hook) -> None:
            self.cache_hook = cache_hook


def manifest():
    """lmms-eval's ``ModelManifest`` for this model (None when this lmms-eval has no manifests)."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError:
        return None
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"lmms-eval model_args: {name} must be an integer, got {value!r}") from None


def _batch_size(value: Any, default: int) -> int:
    """lmms-eval's --batch_size: a number, or "auto" / "auto:N" (then ``default``)."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return default
    n = _as_int(value, "batch_size")
    if n < 1:
        raise UserError(f"batch_size must be at least 1, got {value!r}")
    return n


class VisualRWKVLmms(_LmmsBase):
    """lmms-eval model: a VisualRWKV checkpoint with its vision tower."""

    is_simple = True

    def __new__(cls, *args, **kwargs):
        # Entry-point discovery of recent lmms-eval versions calls the entry point's object with no
        # arguments and wants a ModelManifest back. A real construction always passes model_path.
        if not args and not kwargs:
            m = manifest()
            if m is not None:
                return m
        return super().__new__(cls)

    def __init__(self, model_path: Optional[str] = None, vision_tower_name: Optional[str] = None,
                 grid_size: Any = -1, image_position: str = "middle", device: Optional[str] = "auto",
                 dtype: Optional[str] = "auto", batch_size: Any = 16, max_new_tokens: Any = 128,
                 model_id: Optional[str] = None, pipeline=None, **kwargs) -> None:
        """``pipeline``: an already loaded ``visualrwkv.generation.Pipeline`` (instead of model_path)."""
        super().__init__()
        for key in kwargs:  # lmms-eval passes a few generic options (e.g. device_map) that do not apply
            log.warning("visualrwkv lmms-eval model: ignoring unknown model_args %s=%r", key, kwargs[key])
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise UserError("the VisualRWKV lmms-eval model runs in one process; for several GPUs run one "
                            "lmms-eval per GPU, or use 'visualrwkv eval --num_chunks N --chunk_idx K'")
        if pipeline is None:
            if not model_path or not vision_tower_name:
                raise UserError("lmms-eval --model_args needs model_path=<VisualRWKV .pth> and "
                                "vision_tower_name=<CLIP tower>")
            from visualrwkv.generation.pipeline import Pipeline

            bs = _batch_size(batch_size, 16)
            # Same choice as 'visualrwkv eval': the prefix state is shared only when the image comes first.
            pipeline = Pipeline.load(model_path, vision_tower_name, grid_size=_as_int(grid_size, "grid_size"),
                                     image_position=image_position, device=device or "auto", dtype=dtype,
                                     prefix_cache_size=16 if image_position == "first" else 0, max_batch_size=bs)
        self.pipe = pipeline
        self._batch_size = _batch_size(batch_size, pipeline.engine.max_batch_size)
        self.default_max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
        self.model_id = model_id or (os.path.splitext(os.path.basename(model_path))[0] if model_path else MODEL_NAME)
        self._warned: set = set()

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.pipe.device

    @property
    def model(self):
        return self.pipe.model

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    # ------------------------------------------------------------------ request helpers
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _visual(self, doc_to_visual, doc_id, task, split):
        """The request's image (a PIL image) or None. VisualRWKV reads one image per prompt."""
        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return None
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        visuals = [v for v in visuals if v is not None]
        if not visuals:
            return None
        from PIL import Image

        first = visuals[0]
        if not isinstance(first, Image.Image):
            raise UserError(f"task {task!r}: VisualRWKV reads images, got {type(first).__name__} "
                            f"(video and audio tasks are not supported)")
        if len(visuals) > 1:
            self._warn_once(f"multi:{task}", f"task {task!r} gives several images per question; VisualRWKV reads "
                                             f"one image per prompt, so only the first is used")
        return first

    def _params(self, gen_kwargs: Optional[Dict[str, Any]], task: str):
        """lmms-eval generation kwargs -> SamplingParams."""
        from visualrwkv.generation.sampling import SamplingParams

        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)):
            raise UserError(f"task {task!r}: gen_kwargs['until'] must be a string or a list, "
                            f"got {type(until).__name__}")
        stop = tuple(s for s in until if isinstance(s, str) and s)
        max_new = kw.get("max_new_tokens")
        max_new = self.default_max_new_tokens if max_new is None else _as_int(max_new, "max_new_tokens")
        if int(kw.get("num_beams", 1) or 1) > 1:
            self._warn_once(f"beams:{task}", f"task {task!r} asks for beam search; VisualRWKV decodes greedily")
        temperature = float(kw.get("temperature", 0) or 0)
        if kw.get("do_sample") and temperature <= 0:
            temperature = 1.0
        if temperature > 0:
            top_p = kw.get("top_p")
            return SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                  top_p=float(top_p) if top_p else 1.0, stop=stop).validate()
        return SamplingParams.greedy(max_new, stop=stop).validate()

    # ------------------------------------------------------------------ the lmms API
    def generate_until(self, requests) -> List[str]:
        """Answer every request (batched); results in request order."""
        from visualrwkv.eval.run import Job, answer_jobs, group_by_image

        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            context = context[0] if isinstance(context, (list, tuple)) else context
            # The image is fetched when its job is about to run (lmms-eval data sets decode on access).
            image = (lambda d=doc_to_visual, i=doc_id, t=task, s=split: self._visual(d, i, t, s))
            jobs.append(Job((i, context, gen_kwargs), str(context).replace("<image>", "").strip(), image,
                            self._params(gen_kwargs, task), name=f"{task} doc {doc_id}"))
        out: List[Optional[str]] = [None] * len(jobs)
        progress = _progress(len(jobs), self.rank)
        try:
            # num_workers=0: images are fetched on this thread (data set access may not be thread safe).
            for job, result in answer_jobs(self.pipe, group_by_image(jobs), self.batch_size, num_workers=0):
                i, context, gen_kwargs = job.tag
                out[i] = result.text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), result.text)
                progress.update(1)
        finally:
            progress.close()
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        """log P(continuation | prompt) and whether greedy decoding would produce the continuation.
        Requests with the same prompt and image share one prefill."""
        pipe, model = self.pipe, self.pipe.model
        out: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        prepared = []
        for i, req in enumerate(requests):
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            context = context[0] if isinstance(context, (list, tuple)) else context
            if isinstance(doc_to_target, str):
                target = doc_to_target
            else:
                target = doc_to_target(self.task_dict[task][split][doc_id])
            prepared.append((i, str(context).replace("<image>", "").strip(), str(target), doc_to_visual, doc_id,
                             task, split))
        progress = _progress(len(prepared), self.rank)
        last_key, last = None, None  # (prompt, image) of the previous request -> its prefill
        try:
            for i, context, target, doc_to_visual, doc_id, task, split in prepared:
                image = self._visual(doc_to_visual, doc_id, task, split)
                emb = pipe.embed_image(image) if image is not None else None
                key = (context, emb[1] if emb is not None else None)
                if key != last_key:
                    ids = pipe.prompt_ids([("human", context)], has_image=emb is not None)
                    last = model.prefill([ids], image_embeds=None if emb is None else emb[0].unsqueeze(0),
                                         backend=pipe.engine.backend)
                    last_key = key
                logits0, state = last
                out[i] = continuation_logprob(model, logits0, state, self._continuation_ids(target),
                                              pipe.engine.backend)
                self.cache_hook.add_partial("loglikelihood", (context, target), out[i])
                progress.update(1)
        finally:
            progress.close()
        return out  # type: ignore[return-value]

    def _continuation_ids(self, target: str) -> List[int]:
        """The answer's tokens as training tokenizes ``"Assistant: " + answer``: the first three
        tokens are ``Assistant:`` and the answer starts with its space."""
        target = target.lstrip()
        return self.tokenizer.encode(" " + target) if target else []

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("VisualRWKV's lmms-eval model answers single-round tasks only "
                                  "(generate_until and loglikelihood)")


def continuation_logprob(model, logits0, state, cont: Sequence[int], backend: str = "auto") -> Tuple[float, bool]:
    """Sum of log-probabilities of ``cont`` after a prompt whose last logits are ``logits0`` (1, V)
    and whose recurrent state is ``state``; and whether every token is the argmax."""
    import torch

    if not cont:
        return 0.0, True
    with torch.no_grad():
        logits = logits0.float()
        if len(cont) > 1:
            # The state is not modified in place by the forward; the prefill can serve other continuations.
            ids = torch.tensor([list(cont[:-1])], device=logits0.device)
            rest, _ = model.rwkv(ids, state=state.clone(), backend=backend)
            logits = torch.cat([logits, rest[0].float()], dim=0)  # (len(cont), V)
        logp = logits.log_softmax(-1)
        target = torch.tensor(list(cont), device=logits.device)
        total = float(logp.gather(1, target.unsqueeze(1)).sum())
        greedy = bool((logits.argmax(-1) == target).all())
    return total, greedy


def _progress(total: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, disable=rank != 0, desc="VisualRWKV responding", unit="req", file=sys.stderr)


def register() -> bool:
    """Make ``--model visualrwkv`` known to the installed lmms-eval, whatever its registry style.
    Returns whether any registry took it."""
    done = False
    try:  # recent versions: the manifest registry
        from lmms_eval.models import MODEL_REGISTRY_V2

        MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
        done = True
    except Exception:  # noqa: BLE001 - each style is tried in turn
        pass
    try:  # versions with a name -> class table; a dotted value is imported as is
        from lmms_eval import models as lmms_models

        table = getattr(lmms_models, "AVAILABLE_MODELS", None)
        if isinstance(table, dict):
            table[MODEL_NAME] = CLASS_PATH
            done = True
    except Exception:  # noqa: BLE001
        pass
    try:  # the decorator registry
        from lmms_eval.api.registry import MODEL_REGISTRY, register_model

        if MODEL_NAME not in MODEL_REGISTRY:
            register_model(MODEL_NAME)(VisualRWKVLmms)
        done = True
    except Exception:  # noqa: BLE001
        pass
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m visualrwkv.eval.lmms_plugin <lmms-eval arguments>``: lmms-eval with this model registered."""
    if not HAVE_LMMS_EVAL:
        print("lmms-eval is not installed: pip install 'visualrwkv[lmms]'", file=sys.stderr)
        return 2
    if not register():
        print("could not register the model with this lmms-eval version", file=sys.stderr)
        return 2
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
