#!/usr/bin/env bash
# nvidia-h100-x1: fla GPU tests (primed chunk tables never sync; sync-free exact) and stage 2 through Lightning (train's defaults).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
tar xJf .kcache/kcache.tar.xz
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
timeout 230 python3 -m pytest -v -m gpu tests/test_wkv6.py -p no:cacheprovider 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error|assert" > $OUT/gpu_test.txt
echo "## lightning" > $OUT/lt.txt; timeout 170 python3 benchmarks/bench_train_gpu.py $S2 --steps 15 --warmup 3 --lightning 2>&1 | f | cut -c1-300 >> $OUT/lt.txt
cat $OUT/gpu_test.txt; grep -E "^#|^ +2 |OOM|Error" $OUT/lt.txt
