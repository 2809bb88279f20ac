# next session's first call (~550 s on a fresh machine): where depth 0's 0.7 ms a token over f16 goes.
# Build (llama-bench, llama-completion, test-backend-ops); then for f16/f16 and tq3/tq2 at depth 0:
# (1) llama-bench tg32 -r 3 with and without CUDA graphs (GGML_CUDA_DISABLE_GRAPHS=1): if TQ's time does not move
#     while f16's does, TQ decoding does not run as a CUDA graph;
# (2) the scheduler's graph splits and CUDA-graph messages of a short llama-completion run (-lv 4);
# (3) ncu kernel durations of 400 consecutive decode kernels (as results/cuda-gpu-h100/2026-12-06c/prof.sh).
# Carry: .dev/dev_depth0.sh .dev/dev_env.sh .dev/upstream.tar.xz
set -u
source .dev/dev_env.sh
s=$(date +%s)
TQ_CUDA_ARCH=90 tq build --cuda --upstream-tarball .dev/upstream.tar.xz --targets llama-bench,llama-completion,test-backend-ops > $OUT/build.log 2>&1 &
M=$(python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1)
wait; echo "build rc=$? model $M at $(( $(date +%s) - s )) s"; tail -2 $OUT/build.log
B=$TQ_CACHE_DIR/build-cuda/bin
for kv in "f16 f16" "tq3 tq2"; do set -- $kv
  for g in 0 1; do
    GGML_CUDA_DISABLE_GRAPHS=$g $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $1 -ctv $2 -p 0 -n 32 -r 3 -o md 2>&1 | grep tg32 | sed "s/^/graphs-off=$g /"
  done
  timeout 60 $B/llama-completion -m $M -ngl 99 -fa on -ctk $1 -ctv $2 -p "hello" -n 8 -no-cnv -lv 4 > $OUT/completion-$1-$2.log 2>&1
  echo "$1/$2: $(grep -c 'CUDA graph' $OUT/completion-$1-$2.log) CUDA-graph lines; $(grep -m1 'graph splits' $OUT/completion-$1-$2.log)"
  grep -E "disabling CUDA graphs|warmup reset" $OUT/completion-$1-$2.log | sort | uniq -c | head -5
done
echo "bench at $(( $(date +%s) - s )) s"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for kv in "f16 f16" "tq3 tq2"; do set -- $kv
  timeout 60 $NCU --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip 3000 --launch-count 400 \
    $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $1 -ctv $2 -p 0 -n 16 -r 1 > $OUT/ncu0-$1-$2.csv 2>/dev/null
  python3 results/cuda-gpu-h100/2026-12-06c/ncu_sum.py $OUT/ncu0-$1-$2.csv | head -14
done
echo "all in $(( $(date +%s) - s )) s"
