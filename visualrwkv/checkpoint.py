"""Reading and writing checkpoints: official RWKV ``.pth`` files, VisualRWKV files and safetensors.

Every dimension comes from the tensors' shapes. Loading is strict: a wrong file ends in one
``UserError`` that names the missing, unexpected or mis-shaped keys (and the RWKV version when
the file is an RWKV-4/5/7 model rather than x060).

    visualrwkv convert --input model.pth --output model.safetensors [--dtype bf16]
    visualrwkv convert --input model.pth --info
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Mapping, Optional

import torch

from visualrwkv.errors import UserError
from visualrwkv.layers.rwkv6 import RWKV6Config

StateDict = Dict[str, torch.Tensor]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------
def load_state_dict_file(path: str) -> StateDict:
    """Load a ``.pth`` (safely: tensors only, memory-mapped) or ``.safetensors`` file on the CPU."""
    if not path:
        raise UserError("no checkpoint path given")
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; expected a .pth or .safetensors file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is a base dependency
            raise UserError("reading .safetensors needs the 'safetensors' package") from e
        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files written with the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]  # a Lightning or training-state file
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a plain weight dictionary (name -> tensor)")
    return dict(sd)


def save_state_dict_file(sd: Mapping[str, torch.Tensor], path: str) -> None:
    """Write weights as ``.pth`` (torch.save) or ``.safetensors`` by the file name."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, tmp)
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


# ----------------------------------------------------------------------------------------------
def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def language_model_part(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The RWKV part of a file: keys under ``rwkv.`` for a VisualRWKV file, else the whole file."""
    if any(k.startswith("rwkv.") for k in sd):
        return strip_prefix(sd, "rwkv.")
    return dict(sd)


def detect_rwkv_version(sd: Mapping[str, torch.Tensor]) -> str:
    """'x060' for RWKV-6; otherwise a name for what the keys look like."""
    keys = set(sd)
    if "blocks.0.att.time_maa_x" in keys or any(k.endswith("att.time_maa_w1") for k in keys):
        return "x060"
    if any(re.search(r"att\.(x_r|w0|a0|v0|k_k)$", k) for k in keys):
        return "RWKV-7 (x070)"
    if any(k.endswith("att.time_mix_k") for k in keys):
        if any(k.endswith("att.ln_x.weight") for k in keys):
            return "RWKV-5 (x052)" if any(k.endswith("att.gate.weight") for k in keys) else "RWKV-5 (x050)"
        return "RWKV-4"
    if "emb.weight" not in keys:
        return "not an RWKV model"
    return "an unknown RWKV variant"


def config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> RWKV6Config:
    """Read every RWKV-6 dimension off the tensors' shapes."""
    version = detect_rwkv_version(sd)
    if version != "x060":
        raise UserError(f"{source} is {version}, not an RWKV-6 (x060) model; VisualRWKV-6 needs an x060 file")
    try:
        V, C = sd["emb.weight"].shape
        n_layer = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
        H, N = sd["blocks.0.att.time_faaaa"].shape
        F = sd["blocks.0.ffn.key.weight"].shape[0]
        R = sd["blocks.0.att.time_maa_w2"].shape[1]
        D = sd["blocks.0.att.time_decay_w1"].shape[1]
    except KeyError as e:
        raise UserError(f"{source} is missing {e.args[0]!r}, needed to read the model's dimensions") from None
    if H * N != C:
        raise UserError(f"{source}: time_faaaa is {H}x{N} but the width is {C}")
    return RWKV6Config(n_layer=n_layer, n_embd=C, vocab_size=V, head_size=N, dim_ffn=F, maa_rank=R, decay_rank=D)


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                     source: str = "checkpoint", prefix: str = "") -> None:
    """Strict comparison of key sets and shapes; raises one UserError that names every problem."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [(k, tuple(given[k].shape), tuple(expected[k].shape)) for k in expected
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def show(items: List[str]) -> str:
        head = ", ".join(prefix + k for k in items[:8])
        return head + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if shapes:
        parts.append("wrong shapes: " + ", ".join(f"{prefix}{k} is {g}, expected {e}" for k, g, e in shapes[:8]))
    raise UserError(f"{source} does not match the model: " + "; ".join(parts))


def load_rwkv6(path_or_sd, dtype: Optional[torch.dtype] = torch.float32, device="cpu"):
    """Build an RWKV-6 model from an official x060 file (or the ``rwkv.`` part of a VisualRWKV file)."""
    from visualrwkv.models.rwkv6 import RWKV6

    source = path_or_sd if isinstance(path_or_sd, str) else "state dict"
    sd = load_state_dict_file(path_or_sd) if isinstance(path_or_sd, str) else dict(path_or_sd)
    sd = language_model_part(sd)
    cfg = config_from_state_dict(sd, source)
    with torch.device("meta"):
        model = RWKV6(cfg)
    check_state_dict(model.state_dict(), sd, source)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device)


# ----------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="visualrwkv convert",
        description="Inspect a checkpoint or convert it between .pth and .safetensors (and dtypes).",
        epilog="example: visualrwkv convert --input RWKV-x060-World-1B6.pth --output rwkv6-1b6.safetensors --dtype bf16",
    )
    p.add_argument("--input", required=True)
    p.add_argument("--output")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--info", action="store_true", help="print the detected model and its dimensions")
    a = p.parse_args(argv)
    sd = load_state_dict_file(a.input)
    lm = language_model_part(sd)
    kind = "VisualRWKV" if len(lm) != len(sd) else "RWKV"
    version = detect_rwkv_version(lm)
    print(f"{a.input}: {kind} file, language model {version}, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.1f}M parameters, dtypes {sorted({str(v.dtype) for v in sd.values()})}")
    if version == "x060":
        print(f"  {config_from_state_dict(lm, a.input)}")
    if a.output:
        if a.dtype:
            dt = parse_dtype(a.dtype)
            sd = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in sd.items()}
        save_state_dict_file(sd, a.output)
        print(f"wrote {a.output}")
    return 0
