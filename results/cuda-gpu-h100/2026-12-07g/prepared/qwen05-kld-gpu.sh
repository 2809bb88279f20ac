# Qwen2.5-Coder-0.5B KL divergence with the caches on the GPU (issue 14, item 4): run after the ten parts of the
# GGUF reached this warm machine (qwen05-part.sh, one call each, carrying .dev/q/qwen05.gguf.partNN) and with the
# llama.cpp build carried (.dev/llama-*.tar.xz, named in LLAMA_TAR)
set -u
source "$(dirname "$0")/dev_env.sh"
use_llama_build ${LLAMA_TAR:-.dev/llama-w.tar.xz}
mkdir -p $TQ_CACHE_DIR/models
G=$TQ_CACHE_DIR/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
cat .dev/q/qwen05.gguf.part* > $G
echo "$(sha256sum $G | cut -c1-64) (want 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32) at $(el) s"
timeout 500 tq eval quality --model qwen2.5-coder-0.5b --cuda --types tq3/tq2,tq4,tq3,q8_0 --out-dir $OUT/quality 2>&1 | tail -25
echo "all $(el) s"
