#!/usr/bin/env bash
# nvidia-h100-x1: fused ln_x + gate — GPU tests (fixed bf16 bound), kernel time per config, stage-2 profiles fused 1 vs 0.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
tar xJf .kcache/kcache.tar.xz
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-420 >> $OUT/$o; }
timeout 100 python3 -m pytest -v -m gpu tests/test_norm_gate.py -p no:cacheprovider 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error|assert" > $OUT/gpu_test.txt
r 70 gn.txt python3 benchmarks/bench_groupnorm.py --tokens 4096,11800 --fused_configs 32x8,16x4,16x8,64x8
r 170 prof.txt python3 benchmarks/bench_train_gpu.py $S2 --steps 12 --warmup 3 --fused_norm_gate 1 --profile --profile_top 40
r 150 prof.txt python3 benchmarks/bench_train_gpu.py $S2 --steps 12 --warmup 3 --fused_norm_gate 0 --profile --profile_top 40
r 90 prof.txt python3 benchmarks/bench_train_gpu.py $S2 --steps 20 --warmup 3 --fused_norm_gate 1
cat $OUT/gpu_test.txt $OUT/gn.txt; grep -E "^#|^ +2 |^\| [a-z]|OOM|Error|wall" $OUT/prof.txt | cut -c1-200
