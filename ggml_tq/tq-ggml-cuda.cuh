// TurboQuant KV-cache types in ggml-cuda (tq-ggml-cuda.cu): the three calls ggml-cuda.cu makes.
#pragma once

#include "common.cuh"

// Whether op reads or writes a TQ type (a view of one aside): ggml-cuda then asks the two below.
bool ggml_cuda_tq_op(const ggml_tensor * op);
bool ggml_cuda_tq_supports_op(int device, const ggml_tensor * op);
void ggml_cuda_tq_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
