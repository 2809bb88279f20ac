# one call on a fresh machine, <= 590 s: build in the background; harness A/B (new3 = branch copy loop,
# new4 = lanes copy), CUDA check + memcheck, ncu of new4; then test-backend-ops and a short bench
set -u
source .dev/dev_env.sh
s=$(date +%s)
left() { echo $(( 548 - ($(date +%s) - s) )); }
setsid bash -c 'source .dev/dev_env.sh; s=$(date +%s); TQ_CUDA_ARCH=90 tq build --cuda --upstream-tarball .dev/upstream.tar.xz --targets llama-bench,test-backend-ops > /tmp/build.log 2>&1; echo "build rc=$? in $(( $(date +%s) - s )) s" > /tmp/build.done' > /dev/null 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
(cd .dev/h && bash build.sh) > $OUT/hbuild.log 2>&1; echo "harness built rc=$? at $(( $(date +%s) - s )) s"
timeout 100 .dev/h/h 256 32768 65536 > $OUT/harness.txt 2>&1; echo "harness rc=$?"
grep -E "MISMATCH|timing" $OUT/harness.txt | head -30; grep -c " ok" $OUT/harness.txt
mkdir -p $OUT/tqc
TQ_SANITIZE=0 OUT=$OUT/tqc timeout 120 sh tests/native/tq_cuda_run.sh .dev/tqc2c 90 | tail -25
echo "check done at $(( $(date +%s) - s )) s"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 .dev/tqc2c/tq_cuda_check --quick --rows 512 > $OUT/tqc/sanitizer-memcheck.log 2>&1; echo "memcheck exit $? at $(( $(date +%s) - s )) s"; tail -2 $OUT/tqc/sanitizer-memcheck.log
timeout 90 bash .dev/dev_ncu.sh 2>&1 | head -70
echo "ncu done at $(( $(date +%s) - s )) s"
while [ ! -f /tmp/build.done ] && [ $(left) -gt 100 ]; do sleep 3; done
cat /tmp/build.done 2>/dev/null || { echo "build not done"; tail -5 /tmp/build.log; exit 0; }
B=$TQ_CACHE_DIR/build-cuda/bin
timeout $(( $(left) / 3 )) $B/test-backend-ops -b CUDA0 -o SET_ROWS,GET_ROWS,CPY,FLASH_ATTN_EXT -p '=tq[234](_qjl)?(,|$)' > $OUT/test-backend-ops.log 2>&1
echo "test-backend-ops rc=$? $(grep -c 'OK' $OUT/test-backend-ops.log) OK, $(grep -c FAIL $OUT/test-backend-ops.log) FAIL; $(tail -2 $OUT/test-backend-ops.log | tr '\n' ' ') at $(( $(date +%s) - s )) s"
grep FAIL $OUT/test-backend-ops.log | head -5
timeout $(( $(left) - 5 )) python3 -m turboquant_llama bench --gpu --types f16,tq3/tq2 --depths 32768 --reps 1 --n-gen 32 --out-dir $OUT/results 2>&1 | tail -20
echo "all in $(( $(date +%s) - s )) s"
