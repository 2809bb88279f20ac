# per-kernel GPU time of decode steps (ncu) and the cost of the protected q8_0 layers (llama-bench)
# run from the repository root on the GPU machine after `TQ_CUDA_ARCH=90 tq build --cuda --targets llama-bench,test-backend-ops`
# (TQ_CACHE_DIR: that build's cache; ncu_sum.py beside this file)
export TQ_CACHE_DIR=${TQ_CACHE_DIR:-$HOME/.cache/turboquant-llama}
OUT=${OUT:-.}   # where the ncu CSVs go (the device tool sets it)
B=$TQ_CACHE_DIR/build-cuda/bin
M=$(python3 -c "from turboquant_llama import random_gguf; print(random_gguf.cached('llama-3.1-8b'))")
echo "model $M"
start=$(date +%s)
for kv in "f16 f16 1" "tq3 tq2 1" "tq3 tq2 0"; do set -- $kv
  $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $1 -ctv $2 -p 0 -n 32 -d 0,32768 -r 1 --tq-protect-layers $3 -o md 2>&1 | grep -E "tg32" 
done
echo "bench in $(( $(date +%s) - start )) s"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for kv in "f16 f16" "tq3 tq2"; do set -- $kv
  $NCU --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip 3000 --launch-count 400 \
    $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $1 -ctv $2 -p 0 -n 16 -r 1 > $OUT/ncu0-$1-$2.csv 2>/dev/null
  python3 results/cuda-gpu-h100/2026-12-06c/ncu_sum.py $OUT/ncu0-$1-$2.csv
done
echo "all in $(( $(date +%s) - start )) s"
