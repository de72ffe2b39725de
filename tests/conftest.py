import os
import sys

# tests/utils.py is imported as a plain module by the tests.
sys.path.insert(0, os.path.dirname(__file__))
# The official rwkv package reads these at import time; the reference runs in plain PyTorch.
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
