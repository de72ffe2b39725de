#!/usr/bin/env bash
# Twelfth session (nvidia-h100-x2): r59 (4 x H100) gave 1 GPU 310.9 ms = 25.73 samples/s, DDP 2 348.9 ms = 1.78x,
# DDP 4 360.9 ms = 3.45x. What costs DDP its ~38 ms a step: rank 0's profile of one DDP-2 step (NCCL time and the
# part no compute overlaps), then DDP 2 with 100 MB buckets (4x fewer all-reduces), and the 1 GPU baseline.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/ddp.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --wkv_keep 1"
END=$((SECONDS + 430))
i=0
r() {  # r BOX cmd...: run boxed by min(BOX, time left), log to a file, append the filtered log
  local t=$1; shift; i=$((i + 1)); local left=$((END - SECONDS)); [ $left -lt $t ] && t=$left
  [ $t -lt 20 ] && { echo "## skipped (no time): $*" >> $OUT/ddp.txt; return; }
  echo "## [box $t s, at $SECONDS s] $*" >> $OUT/ddp.txt
  timeout -k 5 $t "$@" < /dev/null > /tmp/log$i 2>&1; echo "## rc $? after $SECONDS s" >> $OUT/ddp.txt
  pkill -9 -f compile_worker; pkill -9 -f bench_train_gpu; cp /tmp/log$i $OUT/log$i.txt
  grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess" /tmp/log$i | cut -c1-300 >> $OUT/ddp.txt
}
r 190 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 --profile --profile_top 25
r 150 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 --ddp_bucket_mb 100
r 110 python3 benchmarks/bench_train_gpu.py $S2 $M
grep -E "^##|^ +[0-9]+ |OOM|Error|H100|H200|NCCL|nccl|overlap" $OUT/ddp.txt | cut -c1-260
