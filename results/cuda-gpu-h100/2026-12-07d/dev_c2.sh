# call 2 (warm, <= 590 s): finish the build, test-backend-ops of the TQ types on CUDA0, then where depth 0's
# time goes (llama-bench tg32 -r 3, one run: K/V each f16 or TQ; TQ parts off one at a time; graph reuse off)
set -u
source .dev/dev_env.sh
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
while [ ! -f /tmp/build.done ] && [ $(el) -lt 300 ]; do sleep 3; done
cat /tmp/build.done 2>/dev/null || { echo "build not done at $(el) s"; tail -2 /tmp/build.log; exit 1; }
B=$TQ_CACHE_DIR/build-cuda/bin
M=$(python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1)
timeout 200 $B/test-backend-ops -b CUDA0 -o FLASH_ATTN_EXT -p '=tq[234](,|$)' > $OUT/tbo-fattn.log 2>&1
echo "FLASH_ATTN_EXT rc=$? $(grep -c 'OK' $OUT/tbo-fattn.log) OK, $(grep -c FAIL $OUT/tbo-fattn.log) FAIL; $(tail -1 $OUT/tbo-fattn.log) at $(el) s"
grep FAIL $OUT/tbo-fattn.log | head -5
timeout 60 $B/test-backend-ops -b CUDA0 -o SET_ROWS,GET_ROWS,CPY -p '=tq[234](_qjl)?(,|$)' > $OUT/tbo-rows.log 2>&1
echo "SET_ROWS,GET_ROWS,CPY rc=$? $(grep -c 'OK' $OUT/tbo-rows.log) OK, $(grep -c FAIL $OUT/tbo-rows.log) FAIL at $(el) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
lb() { $B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -n 32 -r 3 -o md "$@" 2>&1 | grep -E 'tg32' | awk -F'|' '{print $(NF-3), $(NF-2), $(NF-1)}'; }
{
echo "## depth 0, tg32 -r 3 (K V: t/s)"
lb -ctk f16,tq3 -ctv f16,tq2 | sed 's/^/default: /'
lb -ctk q8_0 -ctv q8_0 | sed 's/^/default: /'
lb -ctk tq3 -ctv tq2 --no-tq-exact-sink | sed 's/^/exact sink off: /'
lb -ctk tq3 -ctv tq2 --tq-protect-layers 0 | sed 's/^/protect 0: /'
LLAMA_GRAPH_REUSE_DISABLE=1 lb -ctk f16,tq3 -ctv f16,tq2 | grep -E 'f16 +f16|tq3 +tq2' | sed 's/^/graph reuse off: /'
lb -ctk f16,tq3 -ctv f16,tq2 | sed 's/^/default again: /'
echo "## depth 32768, tg32 -r 2"
$B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -n 32 -r 2 -d 32768 -o md -ctk f16,tq3 -ctv f16,tq2 2>&1 | grep -E 'tg32' | awk -F'|' '{print $(NF-3), $(NF-2), $(NF-1)}'
} 2>&1 | tee $OUT/depth0.txt
echo "all in $(el) s"
