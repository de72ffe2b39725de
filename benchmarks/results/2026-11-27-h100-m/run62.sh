#!/usr/bin/env bash
# nvidia-h100-x1, fresh machine and no carried caches: compile and cache (triton + inductor) the stage-2 graphs of
# 1 GPU and of DDP (--ddp 1: the DDP-wrapped step on one GPU, graphs split at the 100 MB / 25 MB buckets, as
# --devices 2 / 4 build them), and bring the new cache back for the 4-GPU call. Same-call rows: 1 GPU vs DDP on 1 GPU.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla_core*.whl .whl/flash_linear*.whl .whl/einops*.whl .whl/pyrwkv*.whl || exit 1
for k in .kcache/kcache*.tar.xz; do [ -f $k ] && tar xJf $k; done
touch /tmp/marker
export TRITON_CACHE_DIR=$PWD/.kernel_cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.kernel_cache/inductor PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/warm.txt
python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)" >> $OUT/warm.txt 2>&1
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged --grad_cp 0 --compile 1 --act_budget 0.5 --lightning --steps 20 --warmup 3"
M="--master_weights 1 --wkv_keep 1"
END=$((SECONDS + 560))
i=0
r() {
  local t=$1; shift; i=$((i + 1)); local left=$((END - SECONDS)); [ $left -lt $t ] && t=$left
  [ $t -lt 20 ] && { echo "## skipped (no time): $*" >> $OUT/warm.txt; return; }
  echo "## [box $t s, at $SECONDS s] $*" >> $OUT/warm.txt
  timeout -k 5 $t "$@" < /dev/null > /tmp/log$i 2>&1; echo "## rc $? after $SECONDS s" >> $OUT/warm.txt
  pkill -9 -f compile_worker; pkill -9 -f bench_train_gpu
  grep -v -E "Warning|warn\(|warn_once|^\s*$|litlogger|Tip|^E11|AUTOTUNE|SingleProcess" /tmp/log$i | cut -c1-300 >> $OUT/warm.txt
}
r 260 python3 benchmarks/bench_train_gpu.py $S2 $M
r 240 python3 benchmarks/bench_train_gpu.py $S2 $M --ddp 1 --ddp_bucket_mb 100
r 200 python3 benchmarks/bench_train_gpu.py $S2 $M --ddp 1 --ddp_bucket_mb 25
find .kernel_cache -newer /tmp/marker -type f | tar cJf $OUT/kcache_new.tar.xz -T - 2>/dev/null
du -sh .kernel_cache/* $OUT/kcache_new.tar.xz >> $OUT/warm.txt
grep -E "^##|^ +[0-9]+ |OOM|Error|H100|H200|rc " $OUT/warm.txt | cut -c1-260
