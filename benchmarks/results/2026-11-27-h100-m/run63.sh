#!/usr/bin/env bash
# nvidia-h100-x4: the scaling row with 100 MB all-reduce buckets (train's default since r60) beside 25 MB:
# 1 GPU, DDP 2 and DDP 4 with 100 MB buckets, then DDP 4 with 25 MB (r59: 1.78x / 3.45x with 25 MB). Stage 2, Lightning, --master_weights 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/ddp.txt
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --wkv_keep 1"
END=$((SECONDS + 585))
i=0
r() {  # r BOX cmd...: run boxed by min(BOX, time left), log to a file, append the filtered log
  local t=$1; shift; i=$((i + 1)); local left=$((END - SECONDS)); [ $left -lt $t ] && t=$left
  [ $t -lt 20 ] && { echo "## skipped (no time): $*" >> $OUT/ddp.txt; return; }
  echo "## [box $t s, at $SECONDS s] $*" >> $OUT/ddp.txt
  timeout -k 5 $t "$@" < /dev/null > /tmp/log$i 2>&1; echo "## rc $? after $SECONDS s" >> $OUT/ddp.txt
  pkill -9 -f compile_worker; pkill -9 -f bench_train_gpu
  grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess" /tmp/log$i | cut -c1-300 >> $OUT/ddp.txt
}
# The carried cache (r62, nvidia-h100-x1) holds the 1-GPU and the DDP graphs; DDP 4 with 100 MB buckets also profiles one step after the timed ones.
r 170 python3 benchmarks/bench_train_gpu.py $S2 $M
r 170 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 4 --ddp_bucket_mb 100 --profile
CUDA_VISIBLE_DEVICES=0,1 r 140 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 2 --ddp_bucket_mb 100
r 140 python3 benchmarks/bench_train_gpu.py $S2 $M --devices 4 --ddp_bucket_mb 25
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
grep -E "^##|passed|failed|^ +[0-9]+ |OOM|Error|H100|H200|near the end" $OUT/ddp.txt | cut -c1-260
