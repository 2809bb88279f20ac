# harness (warm): p2 (PDL all + windows + new cases) full check; kernel timings p2 with PDL off against b2 (main's kernel)
set -u
s=$(date +%s); el() { echo $(( $(date +%s) - s )); }
export PATH=/usr/local/cuda/bin:$PATH
timeout 150 .dev/bin/p2 --time > $OUT/check-p2-full.txt 2>&1
echo "p2 full rc=$? $(grep -E 'passed' $OUT/check-p2-full.txt | tail -1) at $(el) s"
grep -E "FAIL" $OUT/check-p2-full.txt | head -8
timing() {  # binary, tag, env
  env $3 timeout 60 $1 --quick --time > $OUT/time-$2.txt 2>&1
  echo "$2 rc=$? $(grep -E 'passed' $OUT/time-$2.txt | tail -1) at $(el) s"
  grep -E '^\| (tq3/tq2|tq4/tq4|tq3/tq3|tq2/tq2)' $OUT/time-$2.txt | grep -v vector | awk -F'|' '{print $2,$3,$4,$5,$6,$9,$10}' | sed "s/^/$2 /"
}
timing .dev/bin/b2/tq_cuda_check main-1 X=1
timing .dev/bin/p2 win-1 TQ_CUDA_PDL=0
timing .dev/bin/b2/tq_cuda_check main-2 X=1
timing .dev/bin/p2 win-2 TQ_CUDA_PDL=0
timing .dev/bin/p2 winpdl-1 X=1
echo "all $(el) s"
