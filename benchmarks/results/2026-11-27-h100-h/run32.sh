#!/usr/bin/env bash
# Session 8 (nvidia-h100-x4): stage 2 through Lightning with --master_weights 1 and coordinate-descent tuning: 1 GPU,
# DDP 2, DDP 4; DDP 4 with fp32 weights (the old path) for comparison; GPU test of the master-weight optimizer (with
# its failure shown). Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/ddp.txt
timeout 60 python3 -m pytest -q -x tests/test_master_weights.py -p no:cacheprovider 2>&1 | grep -E "^E |passed|failed" | head -20 > $OUT/gpu_test.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --inductor coordinate_descent_tuning=1"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
r() { local t=$1; shift; echo "## $*" >> $OUT/ddp.txt; timeout $t "$@" 2>&1 | f | cut -c1-300 >> $OUT/ddp.txt; }
r 90 python3 benchmarks/bench_train_gpu.py $S2 $M
r 110 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2
r 120 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 4
r 130 python3 benchmarks/bench_train_gpu.py $S2 --devices 4
cat $OUT/gpu_test.txt; grep -E "^##|^ +2 |OOM|Error|H100|H200" $OUT/ddp.txt | cut -c1-260
