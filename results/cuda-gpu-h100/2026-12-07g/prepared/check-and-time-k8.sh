# the int8-key branch (cuda-k-int8: int8 scores for 2- and 3-bit keys + one mask row; harness .dev/bin/k8, and
# .dev/bin/k8c3 built with -DTQ_MMA_MIN_CTAS=3 where carried): full check, memcheck (quick), then attention timings
# in CUDA graphs against main's kernels (.dev/bin/g2), alternated
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
K=.dev/bin/k8/tq_cuda_check
timeout 150 $K > $OUT/k8-full.txt 2>&1
echo "k8 full rc=$? $(grep -E 'passed' $OUT/k8-full.txt | tail -1) at $(el) s"; grep -E "FAIL|fragments:|attention: worst" $OUT/k8-full.txt | head -12
timing() {
  timeout 100 $1 --time-only > $OUT/time-$2.txt 2>&1
  echo "$2 rc=$? at $(el) s"
  grep -E '^\| (tq3/tq2|tq4/tq4|tq3/tq3|tq2/tq2)' $OUT/time-$2.txt | grep -v vector | awk -F'|' '{printf "%s %s %s %s:%s| ", $2,$3,$4,$5,$6}'; echo
}
for i in 1 2; do
  timing .dev/bin/g2/tq_cuda_check main-$i
  timing $K k8-$i
  [ -x .dev/bin/k8c3/tq_cuda_check ] && timing .dev/bin/k8c3/tq_cuda_check k8c3-$i
done
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 $K --quick --rows 512 > $OUT/memcheck.log 2>&1; echo "memcheck exit $? at $(el) s"; tail -2 $OUT/memcheck.log
echo "all $(el) s"
