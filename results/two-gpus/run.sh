#!/usr/bin/env bash
# TQ caches on two GPUs with llama.cpp's layer split (README, "Two GPUs"): not yet run, no two-GPU
# machine was available. On a machine with two CUDA GPUs, from the repository root, after
# `tq build --cuda` and `tq models fetch smollm2 qwen2.5-coder-0.5b`:
#
#     bash results/two-gpus/run.sh OUT
#
# (a) quality: `tq eval quality` as results/cuda-gpu.md ran it (WikiText-2, 20 chunks of 512 tokens,
#     tq3/tq2 and tq4 against the f16 cache's logits), on GPU 0 alone and split by layer over both;
#     the split run saves its own f16 logits (its base key names the split)
# (b) speed: `tq bench --gpu` (random-weight Llama-3.1-8B-shaped Q4_0, pp512 and tg32) at depths 0,
#     32K and 64K for f16, tq3/tq2 and tq4, on GPU 0 alone and split by layer over both
# (c) `-sm row` once, straight through llama-bench (tq refuses it: from the source, the pinned
#     ggml-cuda has no split buffer type), to record what llama.cpp itself says
# Everything goes under OUT: run.log (this script's output), kld-*/, bench-*, sm-row.log.
set -u
OUT=${1:?usage: bash results/two-gpus/run.sh OUT}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
TQ="python3 -m turboquant_llama.cli"

nvidia-smi -L
if [ "$(nvidia-smi -L | grep -c '^GPU')" -lt 2 ]; then
    echo "run.sh: fewer than two GPUs visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"; exit 1
fi
git rev-parse HEAD

one_gpu() { CUDA_VISIBLE_DEVICES=0 "$@"; }
two_gpus() { "$@" --split-mode layer; }

# (a) quality
for model in smollm2 qwen2.5-coder-0.5b; do
    one_gpu  $TQ eval quality --model $model --types tq3/tq2,tq4 --chunks 20 --ctx 512 --cuda --out-dir "$OUT/kld-1gpu"
    two_gpus $TQ eval quality --model $model --types tq3/tq2,tq4 --chunks 20 --ctx 512 --cuda --out-dir "$OUT/kld-2gpu"
done

# (b) speed (the attention-alone timing runs on one device either way: --no-attention)
bench="bench --gpu --types f16,tq3/tq2,tq4 --depths 0,32768,65536 --reps 1 --n-gen 32 --no-attention --out-dir $OUT"
one_gpu  $TQ $bench --tag gpu-1gpu
two_gpus $TQ $bench --tag gpu-2gpu-layer

# (c) -sm row
B=$(python3 -c "from turboquant_llama.build import bin_dir; print(bin_dir(True))")
M=$(python3 -c "from turboquant_llama import bench, random_gguf; print(random_gguf.cached(bench.GPU_MODEL))")
"$B/llama-bench" -m "$M" -ngl 99 -fa 1 -ctk tq3 -ctv tq2 -sm row -p 0 -n 16 -r 1 > "$OUT/sm-row.log" 2>&1
echo "llama-bench -sm row with tq3/tq2: exit $?"
grep -iE "split|error|failed" "$OUT/sm-row.log" | head -5
