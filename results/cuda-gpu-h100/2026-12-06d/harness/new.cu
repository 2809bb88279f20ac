// The worktree's kernels (ggml_tq/) in namespace new_tq (see old.cu).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <stdint.h>
#include <cstring>
#include <type_traits>
#include "../../ggml_tq/tq-blocks.h"
#include "../../ggml_tq/tq-codebooks.h"
#include "../../ggml_tq/tq-cuda.h"
#ifndef HNS
#define HNS new_tq
#define PFX new
#endif
namespace HNS {
#include "../../ggml_tq/tq-cuda.cuh"
#include "kernels.inc"
}
