# session 22, two calls on one H200: ncu (full set + per-SASS source counters) of main's tq3/tq2 decode kernel at
# 64K cells; the rebased transposed-score patch (t5: the harness built from ../2026-12-07f/mma-transposed-on-main.diff):
# full check, then timings against main alternated. As run: call 1 was the whole script with the first kernel
# regex ('tq_fattn_mma_kernel<128, 44, 43>', which matched nothing: ncu's demangled names read '<(int)128, ...>'),
# call 2 the ncu part alone with the regex below (the `exit 0`).
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
M=.dev/bin/m22/tq_cuda_check
timeout 200 $NCU --kernel-name-base demangled -k 'regex:tq_fattn_mma_kernel<[^>]*128[^>]*44[^>]*43>' --launch-skip 4 --launch-count 1 \
  --set full --import-source no -o $OUT/m64 $M --time-only --cells 65536 > $OUT/ncu-run.txt 2>&1
echo "ncu rc=$? at $(el) s"; tail -3 $OUT/ncu-run.txt
if [ -f $OUT/m64.ncu-rep ]; then
  $NCU -i $OUT/m64.ncu-rep --page details > $OUT/m64-details.txt 2>&1
  $NCU -i $OUT/m64.ncu-rep --page source --print-source sass --csv > $OUT/m64-sass.csv 2>&1
  $NCU -i $OUT/m64.ncu-rep --page raw --csv > $OUT/m64-raw.csv 2>&1
  ls -la $OUT; grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|DRAM Throughput" $OUT/m64-details.txt | head -12
fi
echo "at $(el) s"
exit 0; timeout 150 .dev/bin/t5 --time > $OUT/t5-full.txt 2>&1
echo "t5 full rc=$? $(grep -E 'passed' $OUT/t5-full.txt | tail -1) at $(el) s"
grep -E "FAIL" $OUT/t5-full.txt | head -8
timing() {
  timeout 60 $1 --quick --time > $OUT/time-$2.txt 2>&1
  echo "$2 rc=$? at $(el) s"
  grep -E '^\| (tq3/tq2|tq4/tq4|tq3/tq3|tq2/tq2)' $OUT/time-$2.txt | grep -v vector | grep -v forced | awk -F'|' '{printf "%s %s %s:%s| ", $2,$3,$4,$6}'; echo
}
timing $M main-1
timing .dev/bin/t5 t5-1
timing $M main-2
timing .dev/bin/t5 t5-2
echo "all $(el) s"
