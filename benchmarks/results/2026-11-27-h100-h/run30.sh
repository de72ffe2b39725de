#!/usr/bin/env bash
# Session 8 (nvidia-h100-x1): one profiled stage-2 step with the full kernel list (where the 79 ms of fused
# elementwise work goes). Carry [".whl", ".kcache", ".devrun"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1"
f() { grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess"; }
NEW="env PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_train_gpu.py"
timeout 150 $NEW $S2 --act_budget 0.5 --steps 5 --warmup 3 --profile --profile_top 150 2>&1 | f > $OUT/prof.txt
grep -E "^ +[12] |OOM|Error" $OUT/prof.txt
