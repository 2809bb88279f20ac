# one call on a fresh machine (<= 400 s): ddfe0eb's kernel (.dev/bin/new) against the 2-bit V pair loads
# (.dev/bin/v2): checks + --time alternated, then memcheck and racecheck of v2
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
i=0
for v in new v2 new v2; do i=$((i+1))
  timeout 120 .dev/bin/$v/tq_cuda_check --time > $OUT/check-$v-$i.txt 2>&1; echo "$v rc=$? $(tail -1 $OUT/check-$v-$i.txt) at $(el) s"
  grep -E '^\| (tq3/tq2|tq2/tq2|tq4/tq4) mma \| 1 \| [0-9]+ \| [0-9]+ \|' $OUT/check-$v-$i.txt | awk -F'|' '{printf "%s %s %s; ", $2, $4, $6}' | sed "s/^/$v /"; echo
done
grep -E "FAIL" $OUT/check-v2-2.txt | head -10
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 .dev/bin/v2/tq_cuda_check --quick --rows 512 > $OUT/memcheck-v2.log 2>&1; echo "memcheck exit $? at $(el) s"; tail -1 $OUT/memcheck-v2.log
timeout 80 compute-sanitizer --tool racecheck --error-exitcode 3 .dev/bin/v2/tq_cuda_check --quick --rows 512 > $OUT/racecheck-v2.log 2>&1; echo "racecheck exit $? at $(el) s"; tail -1 $OUT/racecheck-v2.log
