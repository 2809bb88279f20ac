# call 1 (fresh machine, <= 590 s): llama.cpp CUDA build in the background; meanwhile old (main) and new
# tq_cuda_check (checks + --time, alternated), memcheck and racecheck of new, the random model
set -u
source .dev/dev_env.sh
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
setsid bash -c 'source .dev/dev_env.sh; s=$(date +%s); TQ_CUDA_ARCH=90 tq build --cuda --upstream-tarball .dev/upstream.tar.xz --targets llama-bench,test-backend-ops > /tmp/build.log 2>&1; echo "build rc=$? in $(( $(date +%s) - s )) s" > /tmp/build.done' > /dev/null 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import turboquant_llama, gguf; print("py ok")'
i=0
for v in old new old new; do i=$((i+1))
  b=.dev/bin/$v
  timeout 150 $b/tq_cuda_check --time > $OUT/check-$v-$i.txt 2>&1; echo "$v rc=$? $(tail -1 $OUT/check-$v-$i.txt) at $(el) s"
  sed -n '/^| K\/V/,/^$/p' $OUT/check-$v-$i.txt | grep -E 'tq3/tq2|f16/f16' | sed "s/^/$v /"
done
grep -E "FAIL|worst" $OUT/check-new-2.txt | head -20
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 .dev/bin/new/tq_cuda_check --quick --rows 512 > $OUT/memcheck.log 2>&1; echo "memcheck exit $? at $(el) s"; tail -2 $OUT/memcheck.log
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 3 .dev/bin/new/tq_cuda_check --quick --rows 512 > $OUT/racecheck.log 2>&1; echo "racecheck exit $? at $(el) s"; tail -2 $OUT/racecheck.log
timeout 200 python3 -c "from turboquant_llama import random_gguf, bench; print(random_gguf.cached(bench.GPU_MODEL))" 2>&1 | tail -1; echo "model at $(el) s"
while [ ! -f /tmp/build.done ] && [ $(el) -lt 585 ]; do sleep 3; done
cat /tmp/build.done 2>/dev/null || { echo "build not done at $(el) s"; tail -2 /tmp/build.log; }
