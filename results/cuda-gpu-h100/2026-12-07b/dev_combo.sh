# one call (<= 590 s) on a fresh machine: the harness (old = main, new3 = 4 warps + FAST, new4 = 8 warps + FAST) decides
# the kernel's warps (8 when new4 is >= 2% faster than new3 at 32K and 64K with combine, and not slower at 256);
# reported only; the llama.cpp CUDA build of the tree as it is starts first (background); meanwhile the 8-warp check and
# memcheck (.dev/tqc8c), the random model, ncu of new4; then a short bench (f16, tq3/tq2, tq4 at depths 0 and 32K) and test-backend-ops CUDA0 with the time left.
# Carry: .dev/dev_combo.sh .dev/dev_env.sh .dev/dev_ncu.sh .dev/upstream.tar.xz .dev/h .dev/tqc8c
set -u
source .dev/dev_env.sh
s=$(date +%s)
left() { echo $(( 578 - ($(date +%s) - s) )); }
setsid bash -c 'source .dev/dev_env.sh; s=$(date +%s); TQ_CUDA_ARCH=90 tq build --cuda --upstream-tarball .dev/upstream.tar.xz --targets llama-bench,test-backend-ops > /tmp/build.log 2>&1; echo "build rc=$? in $(( $(date +%s) - s )) s" > /tmp/build.done' > /dev/null 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
(cd .dev/h && bash build.sh) > $OUT/hbuild.log 2>&1; echo "harness built rc=$? at $(( $(date +%s) - s )) s"
timeout 100 .dev/h/h 256 4096 32768 65536 > $OUT/harness.txt 2>&1; echo "harness rc=$? at $(( $(date +%s) - s )) s"
grep -E "MISMATCH|timing" $OUT/harness.txt | grep -v "^vec" | head -30; grep -c " ok" $OUT/harness.txt
r() { grep -E "^mma n_kv +$1 timing: $2 plan 2/SM" $OUT/harness.txt | sed -E 's/.*\(([0-9.]+)x old\).*/\1/' | head -1; }
W8=$(awk -v a=$(r 32768 new3) -v b=$(r 32768 new4) -v c=$(r 65536 new3) -v d=$(r 65536 new4) -v e=$(r 256 new3) -v f=$(r 256 new4) \
     'BEGIN { print (b != "" && b < a - 0.02 && d < c - 0.02 && f <= e + 0.02) ? 1 : 0 }')
FAST=$(awk -v a=$(r 32768 new3) -v c=$(r 65536 new3) 'BEGIN { print (a != "" && a + c < 2.0) ? 1 : 0 }')
echo "harness says: 8 warps better: $W8; FAST not slower than main: $FAST (the build keeps the tree's defaults)"
mkdir -p $OUT/tqc
TQ_SANITIZE=0 OUT=$OUT/tqc timeout 120 sh tests/native/tq_cuda_run.sh .dev/tqc8c 90 | tail -6
echo "check done at $(( $(date +%s) - s )) s"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 .dev/tqc8c/tq_cuda_check --quick --rows 512 > $OUT/tqc/sanitizer-memcheck.log 2>&1; echo "memcheck exit $? at $(( $(date +%s) - s )) s"; tail -2 $OUT/tqc/sanitizer-memcheck.log
timeout 200 python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1; echo "model at $(( $(date +%s) - s )) s"
timeout 80 bash .dev/dev_ncu.sh > $OUT/ncu-summary.txt 2>&1; head -30 $OUT/ncu-summary.txt
while [ ! -f /tmp/build.done ] && [ $(left) -gt 100 ]; do sleep 3; done
cat /tmp/build.done 2>/dev/null || { echo "build not done at $(( $(date +%s) - s )) s"; tail -3 /tmp/build.log; exit 0; }
B=$TQ_CACHE_DIR/build-cuda/bin
timeout $(( $(left) - 70 )) python3 -m turboquant_llama bench --gpu --types f16,q8_0,tq3/tq2,tq4 --depths 0,32768 --reps 1 --n-gen 32 --out-dir $OUT/results 2>&1 | tail -14
echo "bench at $(( $(date +%s) - s )) s"
timeout $(( $(left) - 2 )) $B/test-backend-ops -b CUDA0 -o SET_ROWS,GET_ROWS,CPY,FLASH_ATTN_EXT -p '=tq[234](_qjl)?(,|$)' > $OUT/test-backend-ops.log 2>&1
echo "test-backend-ops rc=$? $(grep -c 'OK' $OUT/test-backend-ops.log) OK, $(grep -c FAIL $OUT/test-backend-ops.log) FAIL; $(tail -2 $OUT/test-backend-ops.log | tr '\n' ' ') at $(( $(date +%s) - s )) s"
grep FAIL $OUT/test-backend-ops.log | head -5
echo "all in $(( $(date +%s) - s )) s"
