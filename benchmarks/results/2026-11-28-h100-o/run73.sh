#!/usr/bin/env bash
# Session 15: the NCCL case of tests/test_train_sigterm.py (r72's 60 s box was too short for two NCCL starts;
# now one process group), plus the DDP GPU tests beside it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -k 5 200 python3 -m pytest -q -p no:cacheprovider tests/test_train_sigterm.py tests/test_train_optim.py -k "sigterm or with_nccl" -rs --durations=5 2>&1 | tail -25
