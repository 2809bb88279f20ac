# harness, most needed first: the last variant's full checks; --quick --time of each; sanitizers; timings again
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
V="$*"
last=${V##* }
timeout 200 .dev/bin/$last/tq_cuda_check > $OUT/check-$last-full.txt 2>&1
echo "$last full rc=$? $(grep -E 'passed' $OUT/check-$last-full.txt | tail -1) at $(el) s"
grep -E "FAIL|worst" $OUT/check-$last-full.txt | head -12
timing() {
  timeout 100 .dev/bin/$1/tq_cuda_check --quick --time > $OUT/check-$1-$2.txt 2>&1
  echo "$1 rc=$? $(grep -E 'passed' $OUT/check-$1-$2.txt | tail -1) at $(el) s"
  grep -E '^\| (tq3/tq2|tq4/tq4|f16/f16|tq2/tq2|tq3/tq3)' $OUT/check-$1-$2.txt | grep -v vector | awk -F'|' '{print $2,$3,$4,$5,$6,$9,$10}' | sed "s/^/$1 /"
}
for v in $V; do timing $v 1; done
if command -v compute-sanitizer >/dev/null; then
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 3 .dev/bin/$last/tq_cuda_check --quick --rows 512 > $OUT/memcheck.log 2>&1; echo "memcheck exit $? at $(el) s"; tail -2 $OUT/memcheck.log
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 3 .dev/bin/$last/tq_cuda_check --quick --rows 512 > $OUT/racecheck.log 2>&1; echo "racecheck exit $? at $(el) s"; tail -2 $OUT/racecheck.log
fi
for v in $V; do timing $v 2; done
echo "all $(el) s"
