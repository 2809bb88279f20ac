# final tree (granules for rows >= 64 bytes, new check cases): full check, memcheck + racecheck (quick), timings
# against main's kernel (b2) alternated
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
timeout 150 .dev/bin/w --time > $OUT/check-full.txt 2>&1
echo "full rc=$? $(grep -E 'passed' $OUT/check-full.txt | tail -1) at $(el) s"
grep -E "FAIL" $OUT/check-full.txt | head -8
timing() {
  timeout 60 $1 --quick --time > $OUT/time-$2.txt 2>&1
  echo "$2 rc=$? $(grep -E 'passed' $OUT/time-$2.txt | tail -1) at $(el) s"
  grep -E '^\| (tq3/tq2|tq4/tq4|tq3/tq3|tq2/tq2)' $OUT/time-$2.txt | grep -v vector | grep -v forced | awk -F'|' '{printf "%s %s %s:%s| ", $2,$3,$4,$6}'; echo
}
timing .dev/bin/w new-1
timing .dev/bin/b2/tq_cuda_check main-1
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 .dev/bin/w --quick --rows 512 > $OUT/memcheck.log 2>&1; echo "memcheck exit $? at $(el) s"; tail -2 $OUT/memcheck.log
timing .dev/bin/w new-2
timing .dev/bin/b2/tq_cuda_check main-2
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 3 .dev/bin/w --quick --rows 512 > $OUT/racecheck.log 2>&1; echo "racecheck exit $? at $(el) s"; tail -2 $OUT/racecheck.log
echo "all $(el) s"
