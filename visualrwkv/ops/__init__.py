"""Kernels: one signature per operator, several explicitly chosen backends."""
from .wkv6 import BACKENDS, fla_available, resolve_backend, wkv6, wkv6_chunked, wkv6_reference, wkv6_step

__all__ = ["BACKENDS", "fla_available", "resolve_backend", "wkv6", "wkv6_chunked", "wkv6_reference", "wkv6_step"]
