#!/usr/bin/env bash
# All GPU measurements of the project, each a benchmark script that prints a table (with its
# baseline in the same process); logs go to $OUT (or ./gpu_logs). From the repository root:
#   bash benchmarks/gpu_suite.sh train     # stage 1 / stage 2 steps, 1.6B shape, eager and compiled
#   bash benchmarks/gpu_suite.sh infer     # generation (compiled decoding, then plain), prefill graphs vs eager, profiles, memory vs Llama, eval
#   bash benchmarks/gpu_suite.sh ddp       # stage 1 / stage 2 through Lightning on 1 GPU and DDP on all GPUs (eager, compiled)
#   bash benchmarks/gpu_suite.sh all
# Needs torch with CUDA and fla (pip install '.[gpu]'). The first use of every fla / inductor kernel
# compiles and autotunes it (minutes on a fresh machine); the Triton and inductor caches are kept in
# $VRWKV_KERNEL_CACHE (default ./.kernel_cache), so a second run starts warm.
set -u
OUT=${OUT:-gpu_logs}
WHAT=${1:-all}
mkdir -p "$OUT"
CACHE=${VRWKV_KERNEL_CACHE:-$PWD/.kernel_cache}
mkdir -p "$CACHE"
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS CMD...: a time-boxed step whose output goes to the console and $OUT/NAME.txt
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee "$OUT/$name.txt" | tail -n 25
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
S1="--stages 1 --micro_bsz 16 --text_min 30 --text_len 100 --ragged"     # LLaVA-pretrain lengths
S2="--stages 2 --micro_bsz 8 --text_min 100 --text_len 1400 --ragged"    # mix665k-like lengths
if [ "$WHAT" = train ] || [ "$WHAT" = all ]; then
  run train_stage1 240 python3 benchmarks/bench_train_gpu.py $S1 --steps 5 --warmup 2
  run train_stage1_compiled 240 python3 benchmarks/bench_train_gpu.py $S1 --steps 5 --warmup 2 --compile 1
  run train_stage2 200 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 1 --steps 3 --warmup 2
  run train_stage2_compiled 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 1 --steps 3 --warmup 2 --compile 1
  # the recommended one-GPU setting (profiled: kernel time by category, host syncs), and the longest batch with it
  run train_stage2_compiled_b05 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1 --act_budget 0.5 --profile
  # baseline of the row above: fla's own state pass, which reads the chunk count back from the GPU per layer
  run train_stage2_compiled_b05_fla_sync 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1 --act_budget 0.5 --fla_sync_free 0
  # the frozen tower left eager (baseline of the compiled tower, the default), and ln_x + gate by inductor's
  # GroupNorm (baseline of the fused Triton kernels, the default; their kernel-level A/B is bench_groupnorm.py)
  run train_stage2_compiled_b05_eager_vit 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1 --act_budget 0.5 --compile_vit 0
  run train_stage2_compiled_b05_inductor_groupnorm 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1 --act_budget 0.5 --fused_norm_gate 0
  # baseline of --wkv_op 1 (the default): a graph break around fla's WKV kernels in every layer
  run train_stage2_compiled_b05_wkv_graph_break 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1 --act_budget 0.5 --wkv_op 0
  run groupnorm 120 python3 benchmarks/bench_groupnorm.py --tokens 4096,11800
  # the time mixing's interpolations: bmm + inductor's kernels vs ops/maa_mix.py's fused kernels, and the step with them
  run maa_mix 120 python3 benchmarks/bench_maa_mix.py --tokens 4096,11800
  run train_stage2_compiled_b05_fused_mix 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1 --act_budget 0.5 --fused_mix 1
  # beside the train_stage2_compiled_b05 row above: bf16 linear weights with fp32 masters (the fastest one-GPU
  # setting, train --master_weights 1), then with inductor's kernel tuning (train --tune_kernels 1)
  run train_stage2_compiled_b05_master 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 10 --warmup 3 --compile 1 --act_budget 0.5 --master_weights 1
  run train_stage2_compiled_b05_master_tuned 400 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 10 --warmup 3 --compile 1 --act_budget 0.5 --master_weights 1 --inductor coordinate_descent_tuning=1
  # the text lengths of the original's sample records, 8 distinct batches
  run train_stage2_compiled_b05_reallen 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 8 --warmup 3 --compile 1 --act_budget 0.5 --batches 8 --lengths_from benchmarks/data/llava_sample_lengths.json
  run train_stage2_compiled_b05_longest 240 python3 benchmarks/bench_train_gpu.py --stages 2 --micro_bsz 8 --text_len 1400 --grad_cp 0 --steps 2 --warmup 1 --compile 1 --act_budget 0.5
  run train_stage2_compiled_nocp 240 python3 benchmarks/bench_train_gpu.py $S2 --grad_cp 0 --steps 3 --warmup 2 --compile 1
fi
if [ "$WHAT" = infer ] || [ "$WHAT" = all ]; then
  # --compile: the decoding step compiled inside its CUDA graph; the plain run right after is its baseline
  run generate_compiled 300 python3 benchmarks/bench_generate.py --device cuda --compile --batch_sizes 1,64 --contexts none --naive_tokens 2 --text_tokens 40 --profile
  run generate 150 python3 benchmarks/bench_generate.py --device cuda --batch_sizes 1,64 --contexts none --naive_tokens 2 --text_tokens 40
  run memory 150 python3 benchmarks/bench_memory_gpu.py --contexts 1024 8192 24576 --new_tokens 32
  run eval 90 python3 benchmarks/bench_eval.py --device cuda --shape 1.6b --batch_sizes 1,64
fi
if { [ "$WHAT" = ddp ] || [ "$WHAT" = all ]; } && [ "$NGPU" -ge 2 ]; then
  run train_stage1_lightning_1gpu 200 python3 benchmarks/bench_train_gpu.py --lightning $S1 --steps 5 --warmup 2
  run train_stage1_ddp$NGPU 240 python3 benchmarks/bench_train_gpu.py --lightning --devices "$NGPU" $S1 --steps 5 --warmup 2
  run train_stage2_lightning_1gpu 200 python3 benchmarks/bench_train_gpu.py --lightning $S2 --grad_cp 1 --steps 3 --warmup 2
  run train_stage2_ddp$NGPU 240 python3 benchmarks/bench_train_gpu.py --lightning --devices "$NGPU" $S2 --grad_cp 1 --steps 3 --warmup 2
  run train_stage2_lightning_1gpu_compiled 200 python3 benchmarks/bench_train_gpu.py --lightning $S2 --grad_cp 0 --act_budget 0.5 --steps 3 --warmup 2 --compile 1
  run train_stage2_ddp${NGPU}_compiled 240 python3 benchmarks/bench_train_gpu.py --lightning --devices "$NGPU" $S2 --grad_cp 0 --act_budget 0.5 --steps 3 --warmup 2 --compile 1
  # master weights with kernel tuning on 1 GPU and on all (bf16 gradients, so a bf16 all-reduce)
  M="--grad_cp 0 --act_budget 0.5 --compile 1 --master_weights 1 --inductor coordinate_descent_tuning=1"
  run train_stage2_lightning_1gpu_master_tuned 400 python3 benchmarks/bench_train_gpu.py --lightning $S2 $M --steps 10 --warmup 3
  run train_stage2_ddp${NGPU}_master_tuned 400 python3 benchmarks/bench_train_gpu.py --lightning --devices "$NGPU" $S2 $M --steps 10 --warmup 3
fi
