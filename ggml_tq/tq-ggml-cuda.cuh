// TurboQuant KV-cache types in ggml-cuda (tq-ggml-cuda.cu): the calls ggml-cuda.cu makes.
#pragma once

#include "common.cuh"

// Whether op reads or writes a TQ type (a view of one aside): ggml-cuda then asks the two below.
bool ggml_cuda_tq_op(const ggml_tensor * op);
bool ggml_cuda_tq_supports_op(int device, const ggml_tensor * op);
void ggml_cuda_tq_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
// Fusion in the graph loop: a layer's K and V SET_ROWS into TQ caches (nodes i and i + 1..3, views
// between) as one launch. Returns the number of nodes taken after i (0: nothing fused).
int ggml_cuda_tq_try_fuse(ggml_backend_cuda_context & ctx, ggml_cgraph * cgraph, int i);
