# a llama.cpp build made here (LLAMA_TAR: .dev/llama-k8.tar.xz, the int8-key branch cuda-k-int8; .dev/llama-w.tar.xz, main's kernels): test-backend-ops of the TQ ops on CUDA0; llama-bench f16, q8_0, tq3/tq2, tq4/tq4 at depths 0, 32K, 64K
set -u
source "$(dirname "$0")/dev_env.sh"
use_llama_build ${LLAMA_TAR:-.dev/llama-k8.tar.xz}
timeout 150 $B/test-backend-ops -b CUDA0 -o FLASH_ATTN_EXT -p '=tq[234](,|$)' > $OUT/tbo-fattn.log 2>&1
echo "FLASH_ATTN_EXT rc=$? $(grep -c 'OK' $OUT/tbo-fattn.log) OK, $(grep -c FAIL $OUT/tbo-fattn.log) FAIL at $(el) s"
grep FAIL $OUT/tbo-fattn.log | head -5
timeout 60 $B/test-backend-ops -b CUDA0 -o SET_ROWS,GET_ROWS,CPY -p '=tq[234](_qjl)?(,|$)' > $OUT/tbo-rows.log 2>&1
echo "SET_ROWS,GET_ROWS,CPY rc=$? $(grep -c 'OK' $OUT/tbo-rows.log) OK, $(grep -c FAIL $OUT/tbo-rows.log) FAIL at $(el) s"
M=$(python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1)
echo "model $M at $(el) s"
lb() { $B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -o md "$@" 2>&1 | grep -E 'tg' | awk -F'|' '{print $(NF-1)}'; }
{
for i in 1 2; do
echo "## depth 0, tg32 -r 3, round $i"
for kv in "f16 f16" "q8_0 q8_0" "tq3 tq2" "tq4 tq4"; do set -- $kv; echo "$1/$2 $(lb -n 32 -r 3 -ctk $1 -ctv $2)"; done
done
echo "## depth 32768, tg32 -r 2"
for kv in "f16 f16" "tq3 tq2" "tq4 tq4"; do set -- $kv; echo "$1/$2 $(lb -n 32 -r 2 -d 32768 -ctk $1 -ctv $2)"; done
echo "## depth 65536, tg32 -r 1"
for kv in "f16 f16" "tq3 tq2" "tq4 tq4"; do set -- $kv; echo "$1/$2 $(lb -n 32 -r 1 -d 65536 -ctk $1 -ctv $2)"; done
} 2>&1 | tee $OUT/bench.txt
echo "all $(el) s"
