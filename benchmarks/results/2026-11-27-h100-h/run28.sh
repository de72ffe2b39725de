#!/usr/bin/env bash
# Session 8 (nvidia-h100-x1): host time per step + cProfile of the host (is stage 2 launch-bound?), fused mix with the
# 16x64x4 row tile, stage 1 compiled vs eager. Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5"
S1="--stages 1 --micro_bsz 16 --text_min 30 --text_len 100 --ragged"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1 o=$2; shift 2; echo "## $*" >> $OUT/$o; timeout $t "$@" 2>&1 | f | cut -c1-300 >> $OUT/$o; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
PYTHONPATH=/tmp/site:$PWD timeout 60 python3 benchmarks/bench_maa_mix.py --tokens 15816 > $OUT/maa_mix.txt 2>&1
r 100 ab.txt $NEW $S2 --steps 20 --warmup 3 --host_profile 3
r 90 ab.txt $NEW $S2 --steps 20 --warmup 3 --fused_mix 1
r 110 s1.txt $NEW $S1 --steps 10 --warmup 3 --compile 1
r 70 s1.txt $NEW $S1 --steps 10 --warmup 2 --compile 0
r 60 s1.txt $NEW $S1 --steps 10 --warmup 3 --compile 1
cat $OUT/maa_mix.txt | grep -v Warn; grep -E "^##|^ +[12] |OOM|Error|host time" $OUT/ab.txt $OUT/s1.txt | cut -c1-250
