#!/usr/bin/env bash
# Ninth session (nvidia-h100-x1): probe 4 (the master's last differences). Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout -k 5 100 python3 -m pytest -q -s --tb=short -p no:cacheprovider .devrun/gpu_mw_probe4.py 2>&1 | grep -E "PROBE|passed|failed|Error" 
