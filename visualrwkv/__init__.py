"""VisualRWKV: LLaVA-style visual language models on RWKV-6 "Finch"."""
__version__ = "0.1.0"
