"""Vision towers: a ``transformers`` CLIP or SigLIP vision model, chosen from the tower's own config,
with the image processor from the same place (SPEC §4). Always frozen in VisualRWKV."""
from __future__ import annotations

import json
import os
from typing import Tuple

import torch

from visualrwkv.errors import UserError

SUPPORTED = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}


def _is_local(name: str) -> bool:
    return os.path.isdir(name)


def vision_config(name_or_path: str):
    """The tower's vision config (a CLIPVisionConfig / SiglipVisionConfig), from a folder or the hub."""
    import transformers

    if not name_or_path:
        raise UserError("--vision_tower_name is required (a hub name such as openai/clip-vit-large-patch14-336 "
                        "or a local folder)")
    if _is_local(name_or_path) and not os.path.exists(os.path.join(name_or_path, "config.json")):
        raise UserError(f"vision tower folder {name_or_path} has no config.json")
    try:
        cfg = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=_is_local(name_or_path))
    except Exception as e:
        raise UserError(f"cannot load the vision tower config from {name_or_path!r}: {str(e).splitlines()[0]} "
                        "(with no internet access, pass a local folder)") from None
    kind = getattr(cfg, "model_type", "")
    if kind not in SUPPORTED:
        raise UserError(f"{name_or_path}: unsupported vision tower type {kind!r}; supported: CLIP and SigLIP")
    if kind in ("clip", "siglip"):  # a full CLIP/SigLIP config: keep its vision half
        cfg = cfg.vision_config
    return cfg


def build_vision_model(cfg):
    """An untrained tower of the given config (weights come from a checkpoint's ``vit.*``)."""
    import transformers

    cls = getattr(transformers, SUPPORTED[cfg.model_type])
    return cls(cfg)


def load_vision_model(name_or_path: str):
    """A tower with its pretrained weights (stage-1 start)."""
    import transformers

    cfg = vision_config(name_or_path)
    cls = getattr(transformers, SUPPORTED[cfg.model_type])
    if _is_local(name_or_path):
        files = os.listdir(name_or_path)
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise UserError(f"vision tower folder {name_or_path} has no weights (*.safetensors or *.bin)")
    try:
        return cls.from_pretrained(name_or_path, local_files_only=_is_local(name_or_path))
    except Exception as e:
        raise UserError(f"cannot load the vision tower weights from {name_or_path!r}: {str(e).splitlines()[0]}") from None


def load_image_processor(name_or_path: str):
    """The tower's own image processor (resize, centre crop, normalise)."""
    import transformers

    if _is_local(name_or_path) and not os.path.exists(os.path.join(name_or_path, "preprocessor_config.json")):
        raise UserError(f"vision tower folder {name_or_path} has no preprocessor_config.json (image processor)")
    local = _is_local(name_or_path)
    kind = vision_config(name_or_path).model_type
    cls = _processor_class(kind)
    try:
        return cls.from_pretrained(name_or_path, local_files_only=local)
    except Exception as e:
        raise UserError(f"cannot load the image processor from {name_or_path!r}: {str(e).splitlines()[0]}") from None


def _processor_class(kind: str):
    """The tower's processor class. transformers 5 names the torchvision implementation
    ``CLIPImageProcessor`` and the PIL/numpy one ``CLIPImageProcessorPil`` (same settings, same
    output); without torchvision take the PIL one directly instead of a warning-and-fallback."""
    import importlib.util

    import transformers

    base = "SiglipImageProcessor" if kind.startswith("siglip") else "CLIPImageProcessor"
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, base + "Pil"):
        return getattr(transformers, base + "Pil")
    return getattr(transformers, base)


def num_patches(cfg) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def has_cls_token(cfg) -> bool:
    """CLIP puts a CLS token first; SigLIP has none (its features are patches only)."""
    return cfg.model_type.startswith("clip")


def tower_summary(cfg) -> Tuple[int, int]:
    """(hidden size Dv, patches P)."""
    return cfg.hidden_size, num_patches(cfg)


def image_features(vit, pixel_values: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1 + P, Dv), CLS first. For SigLIP (no CLS), the mean patch stands in
    for the CLS slot so the grid pooling's layout (patches, then one global token) is kept."""
    dtype = next(vit.parameters()).dtype
    out = vit(pixel_values=pixel_values.to(dtype)).last_hidden_state
    if not has_cls_token(vit.config):
        out = torch.cat([out.mean(dim=1, keepdim=True), out], dim=1)
    return out


def save_tower_folder(vit, processor, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    vit.save_pretrained(folder)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "visualrwkv_tower.json"), "w") as f:
        json.dump({"saved_by": "visualrwkv"}, f)
