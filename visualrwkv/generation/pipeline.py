"""From files, images and conversations to engine requests: the layer that chat, the demo, the
server and evaluation share.

    pipe = Pipeline.load("VisualRWKV-v060-1B6.pth", "openai/clip-vit-large-patch14-336", device="cuda")
    res = pipe.ask("photo.jpg", "What is in the picture?", SamplingParams.greedy(128))
    print(res.text, res.mean_prob)

The prompt is built by the data pipeline's ``build_inference_ids`` (SPEC §5-6): the same format
as in training and evaluation, with the model's ``image_position``.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from visualrwkv.constants import DEFAULT_IMAGE_TOKEN
from visualrwkv.errors import UserError
from visualrwkv.generation.engine import Engine, GenerationRequest, GenerationResult
from visualrwkv.generation.sampling import SamplingParams

ImageLike = Union[str, os.PathLike, bytes, "PIL.Image.Image"]  # noqa: F821
Conversation = Sequence[Tuple[str, str]]  # [(role 'human' | 'gpt', text), ...]

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs; real photos are far below this


# ----------------------------------------------------------------------------------------------
def resolve_device(name: Optional[str] = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Asking for CUDA on a
    machine without it is a ``UserError`` with the reason, not a traceback."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "gpu":
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise UserError(f"--device {name} was requested but {why}; use --device cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"bad --device {name!r}; use cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return dev
    raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``auto``/None: float32 on the CPU, bfloat16 on a GPU. fp16 is refused on the CPU (PyTorch's
    CPU half-precision kernels are slow or missing)."""
    from visualrwkv.checkpoint import parse_dtype

    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(name)
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use fp32 (or bf16) on the CPU")
    return dtype


def load_image(source: ImageLike, what: str = "image"):
    """A PIL image in RGB from a path, raw bytes or a PIL image. Unreadable input -> ``UserError``."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            if isinstance(source, (bytes, bytearray)):
                img = Image.open(io.BytesIO(source))
                name = what
            else:
                path = os.fspath(source)
                name = path
                if not os.path.exists(path):
                    raise UserError(f"{what} not found: {path}")
                if os.path.isdir(path):
                    raise UserError(f"{what} {path} is a folder, not an image file")
                img = Image.open(path)
            img.load()
        except UserError:
            raise
        except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBomb...)
            raise UserError(f"cannot read {name if not isinstance(source, (bytes, bytearray)) else what}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return img.convert("RGB") if img.mode != "RGB" else img


def add_image_placeholder(conversation: Conversation) -> List[Tuple[str, str]]:
    """Put ``<image>`` in the first human turn (if no turn has it yet); the data pipeline then
    moves it where the model's ``image_position`` wants it."""
    conv = [(r, t) for r, t in conversation]
    if any(DEFAULT_IMAGE_TOKEN in t for _, t in conv):
        return conv
    for i, (role, text) in enumerate(conv):
        if role == "human":
            conv[i] = (role, DEFAULT_IMAGE_TOKEN + "\n" + text)
            return conv
    raise UserError("the conversation has no user turn to attach the image to")


class Pipeline:
    """A loaded model with its image processor, tokenizer, prompt format and engine."""

    def __init__(self, model, image_processor, tokenizer=None, image_position: str = "middle",
                 prefix_cache_size: int = 16, image_cache_size: int = 8, max_batch_size: int = 32,
                 backend: str = "auto", compile: bool = False):
        from visualrwkv.data.conversation import check_image_position

        check_image_position(image_position)
        self.engine = Engine(model, tokenizer, prefix_cache_size=prefix_cache_size, max_batch_size=max_batch_size,
                             backend=backend, compile=compile)
        self.model = self.engine.model
        self.tokenizer = self.engine.tokenizer
        self.image_processor = image_processor
        self.image_position = image_position
        self._image_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._image_cache_size = image_cache_size
        self._vision_lock = threading.Lock()  # one vision-tower run at a time (server threads)

    @classmethod
    def load(cls, model_path: str, vision_tower_name: str, grid_size: int = -1, image_position: str = "middle",
             device: Optional[str] = "auto", dtype: Optional[str] = None, **kw) -> "Pipeline":
        """Load a VisualRWKV checkpoint (strictly) and its tower's image processor."""
        from visualrwkv.data.conversation import check_image_position
        from visualrwkv.models.vision import load_image_processor
        from visualrwkv.models.visualrwkv import VisualRWKV

        check_image_position(image_position)  # fail before the (slow) load
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if not model_path:
            raise UserError("--model_path is required (a VisualRWKV .pth or .safetensors file)")
        if not os.path.isfile(model_path):
            raise UserError(f"model file not found: {model_path}" if not os.path.isdir(model_path)
                            else f"--model_path {model_path} is a folder; pass the .pth / .safetensors file")
        processor = load_image_processor(vision_tower_name)
        model = VisualRWKV.from_checkpoint(model_path, vision_tower_name, grid_size=grid_size, dtype=dt, device=dev)
        return cls(model, processor, image_position=image_position, **kw)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # ------------------------------------------------------------------------------ images
    def pixel_values(self, image: ImageLike) -> torch.Tensor:
        """The tower's preprocessing (resize, centre crop, normalise): (1, 3, H, W) float32."""
        img = load_image(image)
        return self.image_processor(images=img, return_tensors="pt")["pixel_values"]

    def embed_image(self, image: ImageLike) -> Tuple[torch.Tensor, str]:
        """Projected image tokens (n_image_tokens, C) and a key for them (a hash of the pixels the
        model sees). The last few images are cached, so asking again skips the vision tower."""
        px = self.pixel_values(image)
        key = hashlib.sha1(px.numpy().tobytes() + str(tuple(px.shape)).encode()).hexdigest()
        with self._vision_lock:
            emb = self._image_cache.get(key)
            if emb is None:
                with torch.no_grad():
                    w = self.model.proj.weight
                    emb = self.engine.encode_images(px.to(w.device, w.dtype))[0]
                self._image_cache[key] = emb
                while len(self._image_cache) > self._image_cache_size:
                    self._image_cache.popitem(last=False)
            self._image_cache.move_to_end(key)
        return emb, key

    # ------------------------------------------------------------------------------ prompts
    def prompt_ids(self, conversation: Conversation, has_image: bool) -> List[int]:
        """``[(role, text), ...]`` -> prompt ids, exactly as training formats the turns (with the
        model's image position), ending with the open ``"Assistant:"`` turn."""
        from visualrwkv.data.conversation import build_inference_ids

        conv = add_image_placeholder(conversation) if has_image else [(r, t) for r, t in conversation]
        if not has_image and any(DEFAULT_IMAGE_TOKEN in t for _, t in conv):
            raise UserError(f"the text contains {DEFAULT_IMAGE_TOKEN} but no image was given")
        return build_inference_ids(conv, self.tokenizer, self.image_position, has_image=has_image)

    def request(self, conversation: Conversation, image: Optional[ImageLike] = None,
                params: Optional[SamplingParams] = None, on_text: Optional[Callable[[str], None]] = None,
                cache_prompt: bool = False, image_embeds: Optional[Tuple[torch.Tensor, str]] = None,
                **kw) -> GenerationRequest:
        """An engine request for a conversation about an optional image. ``image_embeds`` may pass a
        precomputed ``embed_image`` result."""
        if image_embeds is None and image is not None:
            image_embeds = self.embed_image(image)
        ids = self.prompt_ids(conversation, has_image=image_embeds is not None)
        emb, key = image_embeds if image_embeds is not None else (None, None)
        return GenerationRequest(ids, emb, key, params or SamplingParams(), on_text=on_text,
                                 cache_prompt=cache_prompt, **kw)

    def ask(self, image: Optional[ImageLike], question: str, params: Optional[SamplingParams] = None,
            on_text: Optional[Callable[[str], None]] = None) -> GenerationResult:
        """One question about one image (``image=None`` for text only)."""
        req = self.request([("human", question)], image, params, on_text)
        return self.engine.generate([req])[0]

    def generate(self, requests: Sequence[GenerationRequest], on_text=None) -> List[GenerationResult]:
        return self.engine.generate(requests, on_text)
