# device machine: the project importable, gguf from a carried wheel, one cache dir
export TQ_CACHE_DIR=/root/tqcache
mkdir -p $TQ_CACHE_DIR
export PATH=/usr/local/cuda/bin:$PATH
python3 -c 'import gguf' 2>/dev/null || python3 -m pip install -q --no-index --no-deps .dev/whl/gguf-*.whl > /dev/null 2>&1
python3 -c 'import turboquant_llama' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1
