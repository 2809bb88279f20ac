# where the tensor-core kernel's cycles go at 32K cells (new3 = the worktree's kernel), in one call:
# stall reasons per issued instruction, pipe utilization, instruction mix, shared-memory bank conflicts,
# the hottest SASS lines (source counters) and the kernel's SASS (cuobjdump), then the harness timings
set -u
s=$(date +%s)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 $NCU --clock-control none --kernel-name-base demangled -k regex:"new4_tq::tq_fattn_mma" --launch-skip 1 --launch-count 1 \
    --section ComputeWorkloadAnalysis --section InstructionStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    --section WarpStateStats --section SourceCounters \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,smsp__inst_executed.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum \
    .dev/h/h 32768 > $OUT/ncu-src.txt 2>&1
echo "ncu rc=$? in $(( $(date +%s) - s )) s"
grep -E "stalled_.*ratio|pipe_.*pct|inst_executed.sum|bank_conflicts|wavefronts" $OUT/ncu-src.txt | awk '{print $NF, $1}' | sort -g -r | head -40
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump | head -1)
$CUOBJ -sass -fun '_ZN7new4_tq19tq_fattn_mma_kernelILi128ELi44ELi43EEEvNS_15tq_fattn_paramsENS_14tq_cuda_tablesE' .dev/h/new4.o > $OUT/mma-tq3-tq2.sass 2>&1
echo "SASS lines: $(wc -l < $OUT/mma-tq3-tq2.sass)"; grep -oE '^\s+/\*[0-9a-f]+\*/\s+[A-Z0-9.]+' $OUT/mma-tq3-tq2.sass | awk '{print $2}' | sed 's/\..*//' | sort | uniq -c | sort -rn | head -25
echo "all in $(( $(date +%s) - s )) s"
