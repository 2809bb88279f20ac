# build L2 (PDL per kernel class by TQ_CUDA_PDL mask: 1 rows, 2 attention, 4 combine; TQ_CUDA_WINDOWS=0: no granule
# copies): test-backend-ops of the TQ ops (windows on), then llama-bench configurations alternated
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
source .dev/s/dev_env.sh
B=$TQ_CACHE_DIR/build-cuda/bin
rm -rf $B; mkdir -p $B; tar xJf .dev/llama-pdl2.tar.xz -C $B
export LD_LIBRARY_PATH=$B:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
timeout 150 $B/test-backend-ops -b CUDA0 -o FLASH_ATTN_EXT -p '=tq[234](,|$)' > $OUT/tbo-fattn.log 2>&1
echo "FLASH_ATTN_EXT rc=$? $(grep -c 'OK' $OUT/tbo-fattn.log) OK, $(grep -c FAIL $OUT/tbo-fattn.log) FAIL at $(el) s"
grep FAIL $OUT/tbo-fattn.log | head -5
timeout 60 $B/test-backend-ops -b CUDA0 -o SET_ROWS,GET_ROWS,CPY -p '=tq[234](_qjl)?(,|$)' > $OUT/tbo-rows.log 2>&1
echo "SET_ROWS,GET_ROWS,CPY rc=$? $(grep -c 'OK' $OUT/tbo-rows.log) OK, $(grep -c FAIL $OUT/tbo-rows.log) FAIL at $(el) s"
M=$(python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1)
echo "model $M at $(el) s"
lb() { $B/llama-bench -m $M -ngl 99 -fa 1 -p 0 -o md "$@" 2>&1 | grep -E 'tg' | awk -F'|' '{print $(NF-1)}'; }
run() {  # tag, env, args
  local tag=$1 e=$2; shift 2
  echo "$tag $( (export $e; lb "$@") )"
}
{
for i in 1 2; do
echo "## depth 0, tg32 -r 3, round $i"
run "f16/f16            " X=1 -n 32 -r 3 -ctk f16 -ctv f16
for cfg in "A TQ_CUDA_PDL=0 TQ_CUDA_WINDOWS=0" "B TQ_CUDA_PDL=0" "C TQ_CUDA_PDL=1" "D TQ_CUDA_PDL=4" "E TQ_CUDA_PDL=2" "F TQ_CUDA_PDL=7"; do
  set -- $cfg; t=$1; shift
  run "tq3/tq2 $t" "$*" -n 32 -r 3 -ctk tq3 -ctv tq2
done
run "tq4/tq4 A" "TQ_CUDA_PDL=0 TQ_CUDA_WINDOWS=0" -n 32 -r 3 -ctk tq4 -ctv tq4
run "tq4/tq4 B" "TQ_CUDA_PDL=0" -n 32 -r 3 -ctk tq4 -ctv tq4
echo "at $(el) s"
done
echo "## depth 32768, tg32 -r 2"
run "f16/f16            " X=1 -n 32 -r 2 -d 32768 -ctk f16 -ctv f16
for cfg in "A TQ_CUDA_PDL=0 TQ_CUDA_WINDOWS=0" "B TQ_CUDA_PDL=0" "C TQ_CUDA_PDL=1" "D TQ_CUDA_PDL=4" "E TQ_CUDA_PDL=2" "F TQ_CUDA_PDL=7"; do
  set -- $cfg; t=$1; shift
  run "tq3/tq2 $t" "$*" -n 32 -r 2 -d 32768 -ctk tq3 -ctv tq2
done
run "tq4/tq4 A" "TQ_CUDA_PDL=0 TQ_CUDA_WINDOWS=0" -n 32 -r 2 -d 32768 -ctk tq4 -ctv tq4
run "tq4/tq4 B" "TQ_CUDA_PDL=0" -n 32 -r 2 -d 32768 -ctk tq4 -ctv tq4
echo "at $(el) s"
} 2>&1 | tee $OUT/bench-pdl2.txt
echo "all $(el) s"
