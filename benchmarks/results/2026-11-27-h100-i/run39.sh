#!/usr/bin/env bash
# Ninth session (nvidia-h100-x1): the Triton master-weight AdamW kernel's rounding variants against the torch
# reference, bit for bit, and the CLI run with the best one; the master-weight GPU tests. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout -k 5 260 python3 -m pytest -v -s --tb=short -p no:cacheprovider .devrun/gpu_mw_probe3.py tests/test_master_weights.py < /dev/null > $OUT/gpu_test.txt 2>&1
echo "rc $?" >> $OUT/gpu_test.txt
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "passed|failed|^E |PROBE|PASSED|FAILED|rc " $OUT/gpu_test.txt | head -80
