#!/usr/bin/env bash
# Ninth session (nvidia-h100-x1): probe 2 again (r37's 100 s box cut it with no output: fla's autotuning of the
# tiny model's new shapes), verbose, longer box. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
timeout -k 5 280 python3 -m pytest -v -s --tb=short -p no:cacheprovider .devrun/gpu_mw_probe2.py "tests/test_master_weights.py::test_bf16_linear_weights_same_loss_and_gradients_under_autocast" < /dev/null > $OUT/gpu_test.txt 2>&1
echo "rc $?" >> $OUT/gpu_test.txt
grep -E "passed|failed|^E |PROBE|PASSED|FAILED|rc " $OUT/gpu_test.txt | head -80
