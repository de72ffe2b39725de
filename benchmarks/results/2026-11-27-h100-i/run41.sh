#!/usr/bin/env bash
# Ninth session (nvidia-h100-x1): the master-weight GPU tests with the bit-exact kernel (r39/r40 found the rounding),
# incl. the CLI run vs fp32 weights. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
tar xJf .kcache/kcache9.tar.xz
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout -k 5 170 python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_master_weights.py "tests/test_train.py::test_master_weights_follow_fp32_weights_under_bf16" < /dev/null > $OUT/gpu_test.txt 2>&1
echo "rc $?" >> $OUT/gpu_test.txt
grep -E "passed|failed|^E |PASSED|FAILED|rc " $OUT/gpu_test.txt | head -40
