#!/usr/bin/env bash
# nvidia-h100-x1: norm_gate as custom ops (no graph break) + fla chunk tables from host ints; GPU tests; stage-2 profile; A/B vs dd9f611 (.base2).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
tar xJf .kcache/kcache.tar.xz
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-420 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py $S2"
BASE="env PYTHONPATH=/tmp/site:$PWD/.base2 python3 .base2/benchmarks/bench_train_gpu.py $S2"
PYTHONPATH=/tmp/site:$PWD timeout 110 python3 -m pytest -v -m gpu tests/test_norm_gate.py tests/test_wkv6.py -p no:cacheprovider 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error|assert" > $OUT/gpu_test.txt
r 160 prof.txt $NEW --steps 12 --warmup 3 --profile --profile_top 45
r 120 ab.txt $BASE --steps 20 --warmup 3
r 90 ab.txt $NEW --steps 20 --warmup 3
r 90 ab.txt $NEW --steps 20 --warmup 3 --fused_norm_gate 0
r 70 ab.txt $BASE --steps 20 --warmup 3
cat $OUT/gpu_test.txt; grep -E "^#|^ +2 |^\| [A-Za-z][^|]*\| [0-9.]+ \| [0-9.]+%|wall|synchron|x /|OOM|Error" $OUT/prof.txt $OUT/ab.txt | cut -c1-250
