# per-kernel GPU time of decoding in llama-bench's CUDA graphs (nsys, or ncu without cache flushes), f16/f16
# against tq3/tq2 at depths 0 and 4096, main's build (.dev/llama-w.tar.xz)
set -u
source "$(dirname "$0")/dev_env.sh"
use_llama_build .dev/llama-w.tar.xz
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none} at $(el) s"
M=$(python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1)
echo "model $M at $(el) s"
for d in 0 4096; do
for kv in "f16 f16" "tq3 tq2"; do set -- $kv
  tag=$1-$2-d$d
  if [ -n "${NSYS:-}" ]; then
    timeout 150 $NSYS profile -t cuda --cuda-graph-trace=node -o $OUT/$tag -f true \
      $B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -n 32 -r 2 -d $d -ctk $1 -ctv $2 -o md > $OUT/$tag-bench.txt 2>&1
    echo "$tag rc=$? $(grep tg32 $OUT/$tag-bench.txt | awk -F'|' '{print $(NF-1)}') at $(el) s"
    $NSYS stats --report cuda_gpu_kern_sum --format csv -o $OUT/$tag $OUT/$tag.nsys-rep > /dev/null 2>&1
    rm -f $OUT/$tag.nsys-rep $OUT/$tag.sqlite
    head -12 $OUT/${tag}_cuda_gpu_kern_sum.csv | cut -c1-160
  else
    NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
    timeout 200 $NCU --cache-control none --clock-control none --metrics gpu__time_duration.sum --csv --launch-skip 3000 --launch-count 400 \
      $B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -n 16 -r 1 -d $d -ctk $1 -ctv $2 > $OUT/ncu-$tag.csv 2>/dev/null
    python3 results/cuda-gpu-h100/2026-12-06c/ncu_sum.py $OUT/ncu-$tag.csv
  fi
done
done
echo "all $(el) s"
echo "all $(el) s"
