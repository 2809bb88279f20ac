# sourced by the calls beside it on the device machine: the project importable, gguf from a carried wheel, one
# cache dir; el: seconds since the call started; use_llama_build TAR: a carried llama.cpp build as the project's
# CUDA build (B: its bin/)
export TQ_CACHE_DIR=/root/tqcache
mkdir -p $TQ_CACHE_DIR
export PATH=/usr/local/cuda/bin:$PATH
python3 -c 'import gguf' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .dev/whl/gguf-*.whl > /dev/null 2>&1
python3 -c 'import turboquant_llama' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1
s=$(date +%s)
el() { echo $(( $(date +%s) - s )); }
use_llama_build() {
    B=$TQ_CACHE_DIR/build-cuda/bin
    rm -rf $B; mkdir -p $B; tar xJf "$1" -C $B
    export LD_LIBRARY_PATH=$B:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv,noheader
}
