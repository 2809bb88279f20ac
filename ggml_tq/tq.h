// TurboQuant KV-cache types for ggml: the functions the patched ggml calls.
// Block layouts and the exact quantization arithmetic: tq-blocks.h.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TQ_HALF_T ggml_fp16_t
#include "tq-blocks.h"

#ifdef __cplusplus
extern "C" {
#endif

// --- scalar reference (ggml-base): everything else is tested against these ---------------------
// Its results depend on nothing but its inputs (no environment, no global state).

// One block of 64 in place: the randomized Hadamard rotation and its inverse.
GGML_API void tq_rotate_block(float * x);
GGML_API void tq_unrotate_block(float * x);

GGML_API void quantize_row_tq2_ref(const float * x, block_tq2 * y, int64_t k);
GGML_API void quantize_row_tq3_ref(const float * x, block_tq3 * y, int64_t k);
GGML_API void quantize_row_tq4_ref(const float * x, block_tq4 * y, int64_t k);
GGML_API void quantize_row_tq2_qjl_ref(const float * x, block_tq2_qjl * y, int64_t k);
GGML_API void quantize_row_tq3_qjl_ref(const float * x, block_tq3_qjl * y, int64_t k);
GGML_API void quantize_row_tq4_qjl_ref(const float * x, block_tq4_qjl * y, int64_t k);
GGML_API void quantize_row_tq_q_ref(const float * x, block_tq_q * y, int64_t k);
GGML_API void quantize_row_tq_qjl_q_ref(const float * x, block_tq_qjl_q * y, int64_t k);

GGML_API void dequantize_row_tq2(const block_tq2 * x, float * y, int64_t k);
GGML_API void dequantize_row_tq3(const block_tq3 * x, float * y, int64_t k);
GGML_API void dequantize_row_tq4(const block_tq4 * x, float * y, int64_t k);
GGML_API void dequantize_row_tq2_qjl(const block_tq2_qjl * x, float * y, int64_t k);
GGML_API void dequantize_row_tq3_qjl(const block_tq3_qjl * x, float * y, int64_t k);
GGML_API void dequantize_row_tq4_qjl(const block_tq4_qjl * x, float * y, int64_t k);
GGML_API void dequantize_row_tq_q(const block_tq_q * x, float * y, int64_t k);
GGML_API void dequantize_row_tq_qjl_q(const block_tq_qjl_q * x, float * y, int64_t k);

// tq3c blocks (tq-blocks.h): calibrated key coefficients, k a multiple of 64
GGML_API void quantize_row_tq3c_ref(const float * x, block_tq3c * y, int64_t k);
GGML_API void dequantize_row_tq3c(const block_tq3c * x, float * y, int64_t k);

// tq2o / tq3o blocks (tq-blocks.h): outlier-split key coefficients, k a multiple of 64
GGML_API void quantize_row_tq2o_ref(const float * x, block_tq2o * y, int64_t k);
GGML_API void quantize_row_tq3o_ref(const float * x, block_tq3o * y, int64_t k);
GGML_API void dequantize_row_tq2o(const block_tq2o * x, float * y, int64_t k);
GGML_API void dequantize_row_tq3o(const block_tq3o * x, float * y, int64_t k);
// The bytes, bits and codebooks of a split type's two groups (positions 0..TQ_SPLIT_HI-1, then the rest)
typedef struct {
    size_t size;            // bytes a block
    int bits[2];
    const float * centroids[2];
    const float * boundaries[2];
} tq_split_layout;
GGML_API tq_split_layout tq_split_layout_of(enum ggml_type type);
GGML_API void tq_split_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k);
GGML_API void tq_split_dequantize_row(enum ggml_type type, const void * x, float * y, int64_t k);

// The quantizer with step 3's scale search or step 4's norm correction off (tq-blocks.h): variants
// kept for measurements (results/ rows marked "search off"), reached through the measurement knobs
// (tq_knobs below, in the CPU quantizer) and pytools/ggml_lib.py. {true, true} is quantize_row_*_ref. The
// scale search needs norm correction; the _qjl types have neither.
typedef struct {
    bool norm_correction;
    bool scale_search;
} tq_quantize_options;
GGML_API void tq_quantize_row_with(enum ggml_type type, const float * x, void * y, int64_t k, const tq_quantize_options * opt);

// ggml_quantize_chunk entry point for all TQ cache types (imatrix is not used: TurboQuant needs
// no calibration).
GGML_API size_t quantize_tq(enum ggml_type type, const float * src, void * dst, int64_t nrows,
                            int64_t n_per_row, const float * imatrix);

// Decode a row into the rotated domain (no inverse rotation): what attention accumulates.
GGML_API void tq_dequantize_row_rotated_ref(enum ggml_type type, const void * x, float * y, int64_t k);

// acc[0..n) += scale * (row decoded in the rotated domain), as (d * scale) * (the block's unit
// values): the V accumulation of flash attention; with scale 1 into zeros, the values above.
GGML_API void tq_mad_row_rotated_ref(enum ggml_type type, int64_t n, float * acc, const void * x, float scale);

// Dot product of a TQ key row with a query row already converted by quantize_row_tq_q_ref
// (or quantize_row_tq_qjl_q_ref for the _qjl types).
GGML_API float tq_vec_dot_ref(enum ggml_type type, int64_t n, const void * x, const void * q);

GGML_API bool tq_is_kv_type(enum ggml_type type);    // tq2 .. tq4_qjl, tq3c, tq2o, tq3o
// tq3c, tq2o, tq3o: the cache holds calibrated key coefficients (the graph transforms keys and queries with the
// model's calibration file), not rotated blocks: attention neither rotates the query nor the keys
GGML_API bool tq_is_calibrated_type(enum ggml_type type);
GGML_API bool tq_is_split_type(enum ggml_type type);      // tq2o, tq3o
GGML_API bool tq_is_qjl_type(enum ggml_type type);   // tq2_qjl .. tq4_qjl
// Whether a coded row holds a NaN block (NaN or Inf in its input, step 1 of tq-blocks.h): the exact
// sink row of the CPU flash-attention kernel defers to such a row, so NaN travels as in an f16 cache.
GGML_API bool tq_row_is_nan(enum ggml_type type, const void * x, int64_t n);

// --- measurement knobs (ggml-base) ----------------------------------------------------------------
// The environment, read once by tq_knobs() and nowhere else: switches that exist to measure the
// product against its variants (results/ records which were set); unset, they are the product. The
// reference above never reads them.
//   TQ_NORM_CORRECTION=0, TQ_SCALE_SEARCH=0  the backends' quantizers (SET_ROWS, CPY) call
//                                          tq_quantize_row_with these options off
//   TQ_ATTN_ROWS=0                          the CPU leaves TQ attention to ops.cpp's per-cell loop
//   TQ_CPU_SIMD=scalar|avx2|avx512|neon     caps the CPU kernels' SIMD level
typedef struct {
    tq_quantize_options quant;
    bool attn_rows;
    const char * cpu_simd;   // NULL: no cap
} tq_measurement_knobs;
GGML_API const tq_measurement_knobs * tq_knobs(void);

// --- CPU kernels (ggml-cpu): the reference and faster copies of it, chosen at run time -----------
// Exported from the CPU backend library so that the parity tests can call each SIMD path.
#ifndef TQ_CPU_API
#    include "ggml-backend.h"
#    define TQ_CPU_API GGML_BACKEND_API
#endif

TQ_CPU_API void tq_cpu_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq2(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq3(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq4(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq2_qjl(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq3_qjl(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq4_qjl(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq3c(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq2o(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq3o(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq_q(const float * x, void * y, int64_t k);
TQ_CPU_API void tq_cpu_quantize_row_tq_qjl_q(const float * x, void * y, int64_t k);

TQ_CPU_API void tq_cpu_vec_dot_tq2(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
TQ_CPU_API void tq_cpu_vec_dot_tq3(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
TQ_CPU_API void tq_cpu_vec_dot_tq4(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
TQ_CPU_API void tq_cpu_vec_dot_tq2_qjl(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
TQ_CPU_API void tq_cpu_vec_dot_tq3_qjl(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
TQ_CPU_API void tq_cpu_vec_dot_tq4_qjl(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
// tq3c keys against a float32 query already in the calibrated coefficients (vec_dot_type F32)
TQ_CPU_API void tq_cpu_vec_dot_tq3c(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
// out[r*n .. r*n + n) = tq3c row r (at x + r*stride) decoded: the values of dequantize_row_tq3c
TQ_CPU_API void tq_cpu_decode_rows_tq3c(int64_t n, const void * x, size_t stride, int count, float * out);
// tq2o / tq3o keys against a float32 query already in the calibrated coefficients (vec_dot_type F32)
TQ_CPU_API void tq_cpu_vec_dot_tq2o(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
TQ_CPU_API void tq_cpu_vec_dot_tq3o(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc);
// out[r*n .. r*n + n) = row r of a calibrated key type (tq3c, tq2o, tq3o) decoded: the reference's values
TQ_CPU_API void tq_cpu_decode_rows_calibrated(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out);

// Flash attention, V side: acc[0..n) += scale * (row decoded in the rotated domain); after the
// last row, tq_cpu_unrotate_row(acc, n) brings the accumulator back once per query row.
TQ_CPU_API void tq_cpu_mad_rotated(enum ggml_type type, int64_t n, float * acc, const void * x, float scale);
TQ_CPU_API void tq_cpu_unrotate_row(float * x, int64_t n);
// out[r*n .. r*n + n) = row r (at x + r*stride) decoded in the rotated domain, for r < count: the
// same values as tq_cpu_mad_rotated with scale 1 into a zeroed row, without the per-row set-up.
TQ_CPU_API void tq_cpu_decode_rows_rotated(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out);
// acc[0..n) += scale * rotate(x): a float32 row (the exact row of ggml_flash_attn_ext_add_exact_row)
// joins the rotated-domain accumulator; tmp holds n floats.
TQ_CPU_API void tq_cpu_mad_f32_rotated(int64_t n, float * acc, const float * x, float * tmp, float scale);

// Flash attention for several query rows that share one K/V head (a GQA group while decoding, a
// run of tokens of one head in a prompt): each cell's K and V rows are decoded once for all rows,
// and the rows go through the cells a tile at a time in the rotated domain. MSE types only.
#define TQ_ATTN_MAX_ROWS 64
#define TQ_ATTN_MAX_D    256
#define TQ_ATTN_TILE     64
typedef struct {
    enum ggml_type k_type, v_type;
    int64_t dk, dv;
    const char * k; size_t k_stride;   // the head's row of cell ic: k + ic*k_stride
    const char * v; size_t v_stride;
    float scale;                       // applied to q.k before the mask
    int64_t k_exact_cell; const float * k_exact; // ggml_flash_attn_ext_add_exact_row (-1: none)
    int64_t v_exact_cell; const float * v_exact;
} tq_attn_kv;
TQ_CPU_API bool tq_cpu_attn_rows_supported(enum ggml_type k_type, enum ggml_type v_type, int64_t dk, int64_t dv);
// Rows r < nr (nr <= TQ_ATTN_MAX_ROWS): query q[r] (float32, not rotated), mask row mask[r] (NULL:
// none; cell ic's value is mask[r][ic], times slope[r]) over the cells [ic0, ic1). Returns each row's
// running maximum M[r], sum S[r] and out[r*dv ..] = sum of exp(s - M) v, not divided by S; out has
// room for nr rounded up to a multiple of 4 rows, work for tq_cpu_attn_rows_work_size(dk, dv) bytes.
TQ_CPU_API size_t tq_cpu_attn_rows_work_size(int64_t dk, int64_t dv);
TQ_CPU_API void tq_cpu_attn_rows(const tq_attn_kv * kv, int nr, const float * const * q, const ggml_fp16_t * const * mask,
                                 const float * slope, int64_t ic0, int64_t ic1, float * M, float * S, float * out,
                                 float * work);

// The CPU flash-attention op (GGML_OP_FLASH_ATTN_EXT, its exact rows included) for the query rows
// [ir0, ir1) over the cells [ic0, ic1) through tq_cpu_attn_rows: writes dst, or M, S and the
// unnormalised output of each row to partials + row*partial_stride when partials is not NULL.
// Returns false, touching nothing, where it does not apply (QJL types, soft-capped logits, ...).
// Thread ith of nth uses its share of the last tq_cpu_flash_attn_ext_work_size(dst, nth) bytes of
// the op's work buffer (wdata, wsize: the graph plan's, which adds that size to ops.cpp's own).
TQ_CPU_API size_t tq_cpu_flash_attn_ext_work_size(const struct ggml_tensor * dst, int n_threads);
TQ_CPU_API bool tq_cpu_flash_attn_ext_rows(const struct ggml_tensor * dst, void * wdata, size_t wsize, int ith, int nth,
                                           int64_t ir0, int64_t ir1, int64_t ic0, int64_t ic1,
                                           float * partials, int64_t partial_stride);

// Which SIMD level the CPU kernels use on this machine: "avx512", "avx2" or "scalar" (the
// reference) on x86-64, "neon" or "scalar" on aarch64; TQ_CPU_SIMD caps it (a name caps at its
// level number below).
TQ_CPU_API const char * tq_cpu_simd_name(void);
// Cap the SIMD level at run time: 0 scalar; x86-64: 1 AVX2, 2 AVX-512; aarch64: 1 NEON. Levels
// above what the processor supports give the highest supported one. Returns the level in use.
TQ_CPU_API int tq_cpu_set_simd_level(int level);

#ifdef __cplusplus
}
#endif
