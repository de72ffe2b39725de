#!/usr/bin/env bash
# Next session (nvidia-h100-x1, ~9.5 min): maa_mix GPU test + kernel bench; stage 2 default (no read-back: host splice
# numbers) vs --host_numbers 0 vs --fused_mix 1 vs expandable segments (stage 1: run27.sh). Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
S1="--stages 1 --micro_bsz 16 --text_min 30 --text_len 100 --ragged"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-420 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m pytest -v -m gpu tests/test_maa_mix.py -p no:cacheprovider 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|Error|^E " > $OUT/gpu_test.txt
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/bench_maa_mix.py --tokens 4096,11800 --configs "rows=16x64x4;rows=32x64x8;fwd=16x64x8;cols=64x64x4" > $OUT/maa_mix.txt 2>&1
r 75 ab.txt $NEW $S2 --steps 3 --warmup 2          # warms the machine, not compared
r 80 ab.txt $NEW $S2 --steps 20 --warmup 3 --profile --profile_top 15
r 65 ab.txt $NEW $S2 --steps 20 --warmup 3 --host_numbers 0
r 90 ab.txt $NEW $S2 --steps 20 --warmup 3 --fused_mix 1 --profile --profile_top 15
r 65 ab.txt $NEW $S2 --steps 20 --warmup 3 --alloc expandable_segments:True
cat $OUT/gpu_test.txt $OUT/maa_mix.txt; grep -E "^##|^ +[12] |OOM|Error" $OUT/ab.txt | cut -c1-250
