#!/usr/bin/env bash
# Session 15: a second call confirming r72 (1 GPU, DDP 2, DDP 4 with the lagged SIGTERM check), and
# bench_overlap.py --gpus 2 (its side-by-side rows, never completed on a GPU before the ranks agreed on counts).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl .whl/pytest*.whl .whl/pluggy*.whl .whl/iniconfig*.whl .whl/pygments*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do [ -f $k ] && tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/ddp.txt
python3 -c "import lightning, torch; print('lightning', lightning.__version__, 'torch', torch.__version__)" >> $OUT/ddp.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --wkv_keep 1"
END=$((SECONDS + 540))
i=0
r() {
  local t=$1; shift; i=$((i + 1)); local left=$((END - SECONDS)); [ $left -lt $t ] && t=$left
  [ $t -lt 20 ] && { echo "## skipped (no time): $*" >> $OUT/ddp.txt; return; }
  echo "## [box $t s, at $SECONDS s] $*" >> $OUT/ddp.txt
  timeout -k 5 $t "$@" < /dev/null > /tmp/log$i 2>&1; echo "## rc $? after $SECONDS s" >> $OUT/ddp.txt
  pkill -9 -f compile_worker; pkill -9 -f bench_train_gpu
  grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess|NCCL INFO" /tmp/log$i | cut -c1-700 >> $OUT/ddp.txt
}
r 110 python3 benchmarks/bench_train_gpu.py $S2 $M
r 130 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2
r 140 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 4
r 90 python3 benchmarks/bench_overlap.py --gpus 2
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "^##|^\| |^# |^ +[0-9]+ |step, mean|synchronisations| x |OOM|Error|passed|failed|lightning " $OUT/ddp.txt | cut -c1-700
