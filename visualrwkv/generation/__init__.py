"""Inference: an engine that prefills image + prompt in one parallel pass (with the bidirectional
image scan) and then decodes recurrently at O(1) per token; sampling, streaming, prefix-state
caching, batching; and the pipeline that chat, the demo, the server and evaluation share.

    from visualrwkv.generation import Pipeline, SamplingParams
    pipe = Pipeline.load(model_path, vision_tower_name, device="cpu")
    print(pipe.ask("photo.jpg", "What is this?", SamplingParams.greedy(64)).text)
"""
from visualrwkv.generation.engine import DecodeBatch, Engine, GenerationRequest, GenerationResult
from visualrwkv.generation.pipeline import Pipeline, load_image, resolve_device, resolve_dtype
from visualrwkv.generation.sampling import LogitsProcessor, SamplingParams

__all__ = ["DecodeBatch", "Engine", "GenerationRequest", "GenerationResult", "LogitsProcessor", "Pipeline",
           "SamplingParams", "load_image", "resolve_device", "resolve_dtype"]
