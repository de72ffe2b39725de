"""Tiny model presets for the quickstart and the tests (no download, CPU friendly).

* :func:`make_tiny_vision_tower` writes a randomly initialised ``transformers.CLIPVisionModel``
  and its ``CLIPImageProcessor`` settings into a folder, so that both
  ``CLIPVisionModel.from_pretrained(folder)`` and ``CLIPImageProcessor.from_pretrained(folder)``
  work offline, exactly like a hub name such as ``openai/clip-vit-large-patch14-336`` would.
  Pass the folder as ``--vision_tower_name``.
* :data:`TINY_RWKV` is the size of the small RWKV-6 language model trained by the quickstart.

Image processor and torchvision: in transformers 5.x the name ``CLIPImageProcessor`` means the
torchvision backend; without torchvision, ``transformers.CLIPImageProcessor`` (and
``.from_pretrained``) falls back, with a one-time warning, to ``CLIPImageProcessorPil`` -- the
PIL/numpy implementation, same settings and same results. ``AutoImageProcessor.from_pretrained(
folder, backend="pil")`` gives that class without the warning. In transformers 4.x
``CLIPImageProcessor`` is itself the PIL/numpy ("slow") class and ``use_fast=False`` selects it.
:func:`clip_image_processor_class` returns the class that needs no torchvision in either version.
The saved ``preprocessor_config.json`` names ``"image_processor_type": "CLIPImageProcessor"``,
the same as the OpenAI CLIP folders, so any of these loaders reads it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

# Size of the small RWKV-6 ("x060") language model of the quickstart, as the original train.py
# flags (SPEC §7) name them.
# - n_embd = 128: two heads of the fixed head size 64 (n_embd must be a multiple of 64); small
#   enough that a CPU trains it in minutes, wide enough to carry the image features (the tiny
#   vision tower below is 192 wide, the projector maps 192 -> 128).
# - n_layer = 4: an even number, so the image is scanned forwards in layers 0 and 2 and
#   backwards in layers 1 and 3 (SPEC §4 bidirectional scan) -- both directions are exercised.
# - dim_ffn = int(3.5 * 128) // 32 * 32 = 448, the rule of SPEC §2.
# - vocab_size = 65536: the real RWKV World tokenizer is used, so embedding and head are
#   65536 x 128 each (8.4M parameters apiece, most of the ~18M total; the 4 blocks are ~1.1M).
TINY_RWKV = dict(
    n_layer=4,
    n_embd=128,
    dim_att=128,
    dim_ffn=448,
    head_size_a=64,
    vocab_size=65536,
)

# CLIP's normalisation constants (the same as openai/clip-vit-large-patch14-336).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_image_processor_class():
    """The CLIP image processor class that works without torchvision (see the module docstring)."""
    try:
        from transformers import CLIPImageProcessorPil  # transformers >= 5: the PIL backend

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL/numpy implementation
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def make_tiny_vision_tower(folder: Union[str, os.PathLike], image_size: int = 64, patch_size: int = 8,
                           hidden_size: int = 192, layers: int = 2, heads: int = 4,
                           intermediate_size: int = 0, seed: int = 0,
                           image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD) -> Path:
    """Write a random CLIP vision tower and its image processor into folder; returns the folder.

    The tower sees image_size x image_size pixels in patch_size patches, so its last_hidden_state
    has shape (B, 1 + (image_size // patch_size) ** 2, hidden_size): 65 tokens of width 192 with
    the defaults. intermediate_size defaults to 4 * hidden_size. The weights depend only on seed
    (the global torch random state is saved and restored around the initialisation). The processor
    resizes the shortest side to image_size (bicubic), centre-crops image_size x image_size and
    normalises with image_mean and image_std (default: CLIP's), so it also accepts photos of any size.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of heads {heads}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_channels=3,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",  # as in OpenAI CLIP
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    model.eval()
    model.save_pretrained(folder)  # config.json + model.safetensors

    processor = clip_image_processor_class()(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # PIL bicubic, as CLIP
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=True,
    )
    processor.save_pretrained(folder)  # preprocessor_config.json
    return folder


def make_tiny_clip_for_tests(folder: Union[str, os.PathLike], seed: int = 0) -> Path:
    """A very small tower for unit tests: 32 px images, 8 px patches (16 + 1 tokens), width 32, 2 layers."""
    return make_tiny_vision_tower(folder, image_size=32, patch_size=8, hidden_size=32, layers=2,
                                  heads=2, intermediate_size=64, seed=seed)
