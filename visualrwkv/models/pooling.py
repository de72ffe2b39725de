"""Grid pooling of vision features (SPEC §4). Output order: patch tokens first, CLS token last."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"the tower has {num_patches} patches, which is not a square grid")
    return side


def num_image_tokens(grid_size: int, num_patches: int = 576) -> int:
    """Number of image tokens the projector emits for one image (CLS included)."""
    if grid_size == -1:
        return num_patches + 1
    if grid_size == 0:
        return 1
    if grid_size == 1:
        return 2
    if grid_size < -1:
        raise ValueError(f"--grid_size must be -1, 0, 1 or >= 2; got {grid_size}")
    side = _side(num_patches)
    if grid_size > side:
        raise ValueError(f"--grid_size {grid_size} is larger than the patch grid ({side} x {side})")
    stride = side // grid_size
    return (side // stride) ** 2 + 1


def grid_pool(features: torch.Tensor, grid_size: int) -> torch.Tensor:
    """features: (B, 1 + P, D) = CLS then P patches -> (B, n_tokens, D), patches first, CLS last."""
    cls, patches = features[:, :1], features[:, 1:]
    if grid_size == -1:
        return torch.cat([patches, cls], dim=1)
    if grid_size == 0:
        return cls
    if grid_size == 1:
        return torch.cat([patches.mean(dim=1, keepdim=True), cls], dim=1)
    B, P, D = patches.shape
    side = _side(P)
    num_image_tokens(grid_size, P)  # validates grid_size
    stride = side // grid_size
    grid = patches.reshape(B, side, side, D).permute(0, 3, 1, 2)  # (B, D, side, side)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride, padding=0)  # (B, D, s', s')
    pooled = pooled.permute(0, 2, 3, 1).reshape(B, -1, D)
    return torch.cat([pooled, cls], dim=1)
