# The two calls after dev_combo.sh on the same warm H100 (2026-12-07, second session): the tree's kernel set to
# eight warps a CTA and two CTAs a multiprocessor (what c540268 made the default), rebuilt, benched, tested;
# then FLASH_ATTN_EXT perf at batch 1.
source .dev/dev_env.sh
sed -i -E 's/^#define TQ_MMA_WARPS 4 /#define TQ_MMA_WARPS 8 /; s/^#define TQ_MMA_MIN_CTAS 3 /#define TQ_MMA_MIN_CTAS 2 /' ggml_tq/tq-cuda-fattn-mma.cuh
TQ_CUDA_ARCH=90 python3 -m turboquant_llama build --cuda --upstream-tarball .dev/upstream.tar.xz --targets llama-bench,test-backend-ops   # 291 s, incremental
python3 -m turboquant_llama bench --gpu --types f16,tq3/tq2,tq4 --depths 0,32768 --reps 1 --n-gen 32 --out-dir $OUT/results
B=$TQ_CACHE_DIR/build-cuda/bin
$B/test-backend-ops -b CUDA0 -o FLASH_ATTN_EXT -p '=tq[234](,|$)'                        # test-backend-ops-fattn-8warps.log
# next call (stopped at 140 s by its timeout, after the 32K and 64K cases):
$B/test-backend-ops perf -b CUDA0 -o FLASH_ATTN_EXT -p 'hsk=128,hsv=128,nh=8,nr23=\[4,1\].*type_KV=tq|type_K=tq|type_K=f16'   # fattn-perf-8warps.log
