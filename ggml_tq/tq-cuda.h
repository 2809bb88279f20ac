// TurboQuant KV-cache types on CUDA: the C API that the ggml-cuda patches call.
// Kernels: tq-cuda.cuh (device functions per type, the templated kernels); host side: tq-cuda.cu.
//
// Types are ggml type ids (patches/0001): GGML_TYPE_F16 = 1, GGML_TYPE_Q8_0 = 8, GGML_TYPE_TQ2 = 43,
// GGML_TYPE_TQ3 = 44, GGML_TYPE_TQ4 = 45. The _qjl types (46-48) have no CUDA kernels: they stay
// CPU-only, and every *_supported function below says no for them.
//
// Tensors are described like ggml's: ne[] element counts, nb[] byte strides (nb[0] is the element
// or block size). Every function returns 0 (cudaSuccess) or a cudaError_t value; a shape or type it
// does not handle gives cudaErrorInvalidValue before anything is launched. All work is queued on
// `stream` (a cudaStream_t; NULL for the default stream); nothing synchronises, nothing allocates,
// so every call may be captured in a CUDA graph.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TQ_CUDA_TYPE_F32  0
#define TQ_CUDA_TYPE_F16  1
#define TQ_CUDA_TYPE_Q8_0 8
#define TQ_CUDA_TYPE_TQ2  43
#define TQ_CUDA_TYPE_TQ3  44
#define TQ_CUDA_TYPE_TQ4  45

// Quantizer switches (tq.h: tq_norm_correction_enabled(), tq_scale_search_enabled()); the caller
// reads the environment on the host and passes what it found.
#define TQ_CUDA_NO_NORM_CORRECTION 1u
#define TQ_CUDA_NO_SCALE_SEARCH    2u

typedef struct {
    const void * data;
    int64_t ne[4];
    size_t  nb[4];
} tq_cuda_tensor;

bool tq_cuda_is_type(int type); // tq2, tq3, tq4

// SET_ROWS and CPY into a TQ cache (GGML_OP_SET_ROWS, GGML_OP_CPY f32/f16 -> tq):
// row (i01, i02, i03) of src (f32 or f16, ne00 a multiple of 64) is quantized into row
// i1 = idx[i01, i02 % idx.ne[1], i03 % idx.ne[2]] (idx I64 or I32) of dst, at
// dst + i1*dst_nb[1] + i02*dst_nb[2] + i03*dst_nb[3]. idx.data NULL: i1 = i01 (a copy).
// Bytes are identical to quantize_row_tqN_ref (tq.c) for every input, NaN/Inf/zero/denormal included.
bool tq_cuda_set_rows_supported(int dst_type, int src_type);
int  tq_cuda_set_rows(int dst_type, tq_cuda_tensor src, int src_type, tq_cuda_tensor idx, bool idx_i32,
                      void * dst, const size_t dst_nb[4], unsigned flags, void * stream);

// Two SET_ROWS into TQ caches in one launch (a decoding step's K and V: one token's quantizer chain is
// the whole cost of a launch), each op as tq_cuda_set_rows; the same bytes as two calls. Both ops have
// the same src type and index type (else cudaErrorInvalidValue and nothing is written).
typedef struct {
    int dst_type;
    tq_cuda_tensor src;
    int src_type;
    tq_cuda_tensor idx;
    bool idx_i32;
    void * dst;
    size_t dst_nb[4];
} tq_cuda_set_rows_op;
int tq_cuda_set_rows_pair(const tq_cuda_set_rows_op ops[2], unsigned flags, void * stream);

// GET_ROWS and conversions out of a TQ cache (GGML_OP_GET_ROWS, CPY tq -> f32/f16, to_fp16/to_fp32):
// dst row (i1, i2, i3) = src row (i01 = idx[i1, i2 % idx.ne[1], i3 % idx.ne[2]] or i1 where idx.data
// is NULL, i2, i3) decoded; dst (f32 or f16) has ne = (src.ne[0], n1, n2, n3) and strides dst_nb.
// rotated: the rows stay in the rotated domain (d * C[idx], tq_dequantize_row_rotated_ref), which is
// what a prompt path that rotates Q in and the output out uses; else dequantize_row_tqN.
// Values are identical to the C reference (f16: its float32 values rounded to nearest even).
int tq_cuda_get_rows(int src_type, tq_cuda_tensor src, tq_cuda_tensor idx, bool idx_i32,
                     void * dst, int dst_type, const int64_t dst_ne[4], const size_t dst_nb[4],
                     bool rotated, void * stream);

// Rotate f32 rows of 64-value blocks (tq_rotate_block) or back (tq_unrotate_block): row (i1, i2, i3)
// of src (ne[0] a multiple of 64, nb[0] = 4) to the same row of dst (strides dst_nb; dst may be src
// itself, in place). The prompt path's Q in and output out.
int tq_cuda_rotate_rows(tq_cuda_tensor src, float * dst, const size_t dst_nb[4], bool inverse, void * stream);

// The exact sink for a prompt path that decodes K or V to f16 ([D, n_kv, n_head_kv, n_stream], strides
// nb) and runs an f16 attention kernel: cell exact_cell[s] of stream s takes the float32 exact row of
// ggml_flash_attn_ext_add_exact_row (row s at exact + s*exact_nb1, head h at h*D), rotated where the
// rows were decoded in the rotated domain (rotated), rounded to f16, unless the decoded row holds a
// NaN (its coded row was a NaN row), as the CPU kernel does. D: 64, 128, 256.
int tq_cuda_put_exact_rows(void * kv_f16, const int64_t ne[4], const size_t nb[4], const float * exact, size_t exact_nb1,
                           const int32_t * exact_cell, bool rotated, void * stream);

// Flash attention while decoding (GGML_OP_FLASH_ATTN_EXT with few query rows; any number works,
// but rows beyond 8 per K/V head re-read the cache). K and V: f16, q8_0, tq2, tq3, tq4 with at least
// one of them TQ (f16/f16 is there as the baseline of the same design); head sizes 64, 128, 256 (DK == DV).
typedef struct {
    tq_cuda_tensor q;      // f32 [D, n_q, n_head, n_seq]
    tq_cuda_tensor k;      // [D, n_kv, n_head_kv, n_seq]
    tq_cuda_tensor v;      // [D, n_kv, n_head_kv, n_seq]
    int k_type, v_type;
    tq_cuda_tensor mask;   // f16 [n_kv, >= n_q, ne2, ne3] broadcast over heads/seqs, or data NULL
    const float * sinks;   // f32 [n_head] (ggml_flash_attn_ext_add_sinks) or NULL
    // ggml_flash_attn_ext_add_exact_row: f32 rows [D*n_head_kv, n_seq] (stride nb1 bytes) that
    // replace cell exact_cell[seq] of the TQ side(s), unless that cell's coded row is a NaN row
    const float * k_exact; size_t k_exact_nb1;
    const float * v_exact; size_t v_exact_nb1;
    const int32_t * exact_cell;
    float * dst;           // f32 [D, n_head, n_q, n_seq], contiguous (ggml's permuted FA output)
    float scale, max_bias, softcap;
    int kernel;            // TQ_CUDA_FA_AUTO (0); the others force one kernel (checks and timings)
} tq_cuda_fattn_args;

// Decoding attention has two kernels: TQ keys with TQ values at head sizes 64 and 128 run their
// products on tensor cores; the other pairs (f16 or q8_0 on one side, head size 256) run on CUDA
// cores in float32.
#define TQ_CUDA_FA_AUTO   0
#define TQ_CUDA_FA_VECTOR 1
#define TQ_CUDA_FA_MMA    2
bool   tq_cuda_fattn_mma_supported(int k_type, int v_type, int64_t d);

bool   tq_cuda_fattn_supported(int k_type, int v_type, int64_t dk, int64_t dv);
// Scratch for the split-KV partial results; n_sm: the device's multiprocessor count.
size_t tq_cuda_fattn_work_size(const tq_cuda_fattn_args * args, int n_sm);
// n_split: 0 picks the number of KV splits from n_sm; > 0 forces it (tests, tuning).
int    tq_cuda_fattn(const tq_cuda_fattn_args * args, void * work, size_t work_size, int n_sm, int n_split,
                     void * stream);

#ifdef __cplusplus
}
#endif
