// HEAD's kernels (old/: copies of HEAD's ggml_tq headers) in namespace old_tq, so that their template
// kernels get other names than new.cu's (the same mangled names in two objects would share one host stub).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <stdint.h>
#include <cstring>
#include <type_traits>
#include "old/tq-blocks.h"
#include "old/tq-codebooks.h"
#include "old/tq-cuda.h"
namespace old_tq {
#include "old/tq-cuda.cuh"
#define PFX old
#include "kernels.inc"
}
