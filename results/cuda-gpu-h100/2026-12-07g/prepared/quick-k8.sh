# the int8-key branch in less device time than check-and-time-k8.sh (session 23, ~700 s of budget left):
# the quick check of both builds (k8: two CTAs a multiprocessor, k8c3: three), then one timing each against
# main's kernels (.dev/bin/g2) in CUDA graphs
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
for b in k8 k8c3; do
  timeout 90 .dev/bin/$b/tq_cuda_check --quick > $OUT/$b-quick.txt 2>&1
  echo "$b quick rc=$? $(grep -E 'passed' $OUT/$b-quick.txt | tail -1) at $(el) s"; grep -E "FAIL" $OUT/$b-quick.txt | head -5
done
for b in g2 k8 k8c3; do
  timeout 100 .dev/bin/$b/tq_cuda_check --time-only > $OUT/time-$b.txt 2>&1
  echo "$b time rc=$? at $(el) s"
  grep -E '^\| (tq3/tq2|tq4/tq4|tq3/tq3|tq2/tq2)' $OUT/time-$b.txt | grep -v vector | awk -F'|' '{printf "%s %s %s %s:%s| ", $2,$3,$4,$5,$6}'; echo
done
echo "all $(el) s"
