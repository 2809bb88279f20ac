# call 2 (warm): the carried llama build (PDL): test-backend-ops of the TQ ops on CUDA0; random Llama-3.1-8B-shaped GGUF, llama-bench with our kernels' PDL off (TQ_CUDA_PDL=0) and on
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
source .dev/s/dev_env.sh
B=$TQ_CACHE_DIR/build-cuda/bin
[ -x $B/llama-bench ] || { mkdir -p $B; tar xJf .dev/llama-pdl.tar.xz -C $B; }
export LD_LIBRARY_PATH=$B:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
ldd $B/test-backend-ops | grep -i "not found"
timeout 150 $B/test-backend-ops -b CUDA0 -o FLASH_ATTN_EXT -p '=tq[234](,|$)' > $OUT/tbo-fattn.log 2>&1
echo "FLASH_ATTN_EXT rc=$? $(grep -c 'OK' $OUT/tbo-fattn.log) OK, $(grep -c FAIL $OUT/tbo-fattn.log) FAIL; $(tail -1 $OUT/tbo-fattn.log) at $(el) s"
grep FAIL $OUT/tbo-fattn.log | head -5; tail -3 $OUT/tbo-fattn.log
timeout 60 $B/test-backend-ops -b CUDA0 -o SET_ROWS,GET_ROWS,CPY -p '=tq[234](_qjl)?(,|$)' > $OUT/tbo-rows.log 2>&1
echo "SET_ROWS,GET_ROWS,CPY rc=$? $(grep -c 'OK' $OUT/tbo-rows.log) OK, $(grep -c FAIL $OUT/tbo-rows.log) FAIL at $(el) s"
M=$(python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1)
echo "model $M at $(el) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
lb() { $B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -o md "$@" 2>&1 | grep -E 'tg' | awk -F'|' '{print $(NF-3), $(NF-2), $(NF-1)}'; }
{
for i in 1 2; do
echo "## depth 0, tg32 -r 3, round $i (K V test t/s)"
for kv in "f16 f16" "tq3 tq2" "tq4 tq4"; do set -- $kv
TQ_CUDA_PDL=0 lb -n 32 -r 3 -ctk $1 -ctv $2 | sed 's/^/tq-pdl-off: /'
lb -n 32 -r 3 -ctk $1 -ctv $2 | sed 's/^/tq-pdl-on:  /'
done
echo "at $(el) s"
done
echo "## depth 32768, tg32 -r 2"
for kv in "f16 f16" "tq3 tq2"; do set -- $kv
TQ_CUDA_PDL=0 lb -n 32 -r 2 -d 32768 -ctk $1 -ctv $2 | sed 's/^/tq-pdl-off: /'
lb -n 32 -r 2 -d 32768 -ctk $1 -ctv $2 | sed 's/^/tq-pdl-on:  /'
done
} 2>&1 | tee $OUT/bench-pdl.txt
echo "all $(el) s"
