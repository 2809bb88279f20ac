#!/bin/sh
# On a GPU machine: build the CUDA check if the carried binary does not run there, then check,
# time, and run compute-sanitizer's memcheck and racecheck on a short check. Logs go to $OUT (or
# ./tq-cuda-out). Usage: tests/native/tq_cuda_run.sh BIN_DIR [SM]; TQ_SANITIZE=0 skips the sanitizers,
# TQ_TIME=0 the timings.
set -u
bin=${1:?usage: $0 BIN_DIR [SM]}
sm=${2:-90}
out=${OUT:-./tq-cuda-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
"$bin/tq_cuda_check" --help >/dev/null 2>&1
if [ $? -ne 2 ]; then   # the usage message's exit code: the binary loads here
    echo "carried binary does not start here: rebuilding"
    cp -r "$bin" /tmp/tqbin && bin=/tmp/tqbin && rm -f "$bin/tq_cuda_check"
    "$(dirname "$0")/tq_cuda_build.sh" "$bin" "$sm" || exit 1
fi
status=0
time_arg=--time
[ "${TQ_TIME:-1}" = 0 ] && time_arg=
"$bin/tq_cuda_check" $time_arg > "$out/check.log" 2>&1 || status=1
grep -E "FAIL|passed|worst|differ$" "$out/check.log" | grep -v " 0 of " | head -80
sed -n '/^device-to-device/,$p' "$out/check.log"
if [ "${TQ_SANITIZE:-1}" != 0 ] && command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
        timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 "$bin/tq_cuda_check" --quick --rows 512 > "$out/sanitizer-$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR\|Error' "$out/sanitizer-$tool.log") error lines)"
        tail -3 "$out/sanitizer-$tool.log"
    done
fi
exit $status
