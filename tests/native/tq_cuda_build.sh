#!/bin/sh
# Build the CUDA check (tests/native/tq_cuda_check.cu) with the C reference and the CPU kernels,
# without llama.cpp. Usage: tests/native/tq_cuda_build.sh OUT_DIR [SM] (SM: 90 for H100/H200).
# TQ_CUDA_FLAGS adds nvcc flags for the kernels: "-use_fast_math" builds them as ggml-cuda does.
# tq-cuda.o is rebuilt only when ggml_tq/tq-cuda.* changed (it holds every attention kernel: minutes).
set -eu
out=${1:?usage: $0 OUT_DIR [SM]}
sm=${2:-90}
root=$(cd "$(dirname "$0")/../.." && pwd)
inc="-I$root/tests/native/include -I$root/ggml_tq"
mkdir -p "$out"
cc=${CC:-cc}
# ccache keeps the minutes-long kernel build of unchanged sources (CI builds in a fresh clone: paths
# are taken relative to the clone)
nvcc="nvcc"
if command -v ccache >/dev/null 2>&1; then
    nvcc="ccache nvcc"
    export CCACHE_BASEDIR="$root"
fi
$cc -O2 -ffp-contract=off $inc -c "$root/ggml_tq/tq.c" -o "$out/tq.o"
$cc -O2 $inc -c "$root/ggml_tq/tq-cpu.c" -o "$out/tq-cpu.o"
$cc -O2 $inc -c "$root/tests/native/ggml_stub.c" -o "$out/ggml_stub.o"
if [ ! -f "$out/tq-cuda.o" ] || [ -n "$(find "$root/ggml_tq" -name 'tq-cuda*' -newer "$out/tq-cuda.o")" ]; then
    $nvcc -O3 -std=c++17 -arch=sm_$sm ${TQ_CUDA_FLAGS:-} -Xptxas -v -I"$root/ggml_tq" -c "$root/ggml_tq/tq-cuda.cu" -o "$out/tq-cuda.o" 2> "$out/ptxas.txt"
fi
nvcc -O2 -std=c++17 -arch=sm_$sm $inc "$root/tests/native/tq_cuda_check.cu" \
    "$out/tq-cuda.o" "$out/tq.o" "$out/tq-cpu.o" "$out/ggml_stub.o" -lm -o "$out/tq_cuda_check"
