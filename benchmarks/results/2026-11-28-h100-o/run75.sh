#!/usr/bin/env bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
git log --oneline -1
timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider tests/test_train_sigterm.py -rs 2>&1 | tail -5
