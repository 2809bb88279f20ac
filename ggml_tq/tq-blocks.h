// TurboQuant KV-cache block layouts: the one place that defines the bytes.
// The NumPy reference (pytools/layout.py) writes the same bytes; tests compare them.
//
// Every type quantizes blocks of QK_TQ = 64 consecutive values of a cache row. 64 divides every
// head size llama.cpp models use with power-of-two heads (64, 128, 256), so a block never crosses
// a head and the rotation stays inside one head.
//
// Quantizing one block x[64] (float32 arithmetic, no fused multiply-add, in this order):
//   1. s = sum_j (double) x_j * x_j, accumulated in double from j = 0 to 63; n = (float) sqrt(s).
//      If s is not finite (NaN or Inf in x): d = 0x7E00 (fp16 NaN), all other bytes 0; the block decodes to NaN,
//      as a NaN would travel through an f16 cache. If n == 0: every byte 0 (decodes to zeros).
//   2. y = rotate(x) (below), then u_j = y_j / n (float32 division). Denormals are kept (no
//      flush to zero).
//   3. MSE index: idx_j = number of boundaries B_k (tq-codebooks.h, dimension 64) with u_j > B_k,
//      so a value exactly on a boundary takes the lower cell.
//      MSE types with norm correction and scale search (both on in the reference; only the
//      measurement variants of tq_quantize_row_with, tq.h, turn them off): the decoder restores the
//      norm, so what counts is the angle between u and the centroid vector C[idx]. For each scale
//      s_m of TQ_SCALE_GRID in order (1 first), idx_m,j = number of boundaries with
//      u_j > (float)(s_m * B_k); score_m = dot_m / sqrt(cs_m) with dot_m = sum_j (double) u_j * C[idx_m,j]
//      and cs_m = sum_j (double) C[idx_m,j]^2 (double, j ascending). idx = the idx_m of the first
//      largest score. (At d = 64 this lowers the norm-corrected MSE by 9% at 3 bits, 21% at 4 bits.)
//   4. MSE types (tq2, tq3, tq4): with norm correction (default), cn = sqrt(sum_j (double) C[idx_j]^2),
//      d = fp16((float)((double) n / cn)); without, d = fp16(n). fp16 rounding is round-to-nearest-even
//      from float32.
//      QJL types (tqN_qjl): the MSE part has N-1 bits, d = fp16(n); r_j = u_j - C[idx_j] (float32);
//      gamma = ||r|| = (float) sqrt(sum_j (double) r_j^2); g = min(255, rint(gamma * 256)) (float32,
//      round half to even); p_i = sum_j S[i][j] * r_j (float32, j ascending) for i < TQ_QJL_M; sign
//      bit i = (p_i >= 0).
//
// rotate(x): TQ_ROTATION_ROUNDS = 3 rounds of a randomized Walsh-Hadamard transform with
// independent signs. Round r (r = 0, 1, 2): negate x_j where bit j of tq_rotation_signs[r] is set;
// apply the unnormalised FWHT (butterflies with h = 1, 2, 4, 8, 16, 32: for each pair (i, i + h)
// inside a block of 2h, (a, b) -> (a + b, a - b)); multiply by 0.125f. The inverse runs the rounds
// in reverse order: FWHT, times 0.125f, then the signs. One round maps a one-hot row (an outlier
// channel) to a flat +-1/8 row; two map it onto a lattice of multiples of 1/32; both are far from
// the coordinate law the codebook assumes (up to 2x and 1.4x the theoretical MSE on such rows),
// three stay within 3% of it (results/rotation-rounds.md).
//
// Decoding in the rotated domain (what attention uses): y~_j = d * C[idx_j] for MSE types, and for
// QJL types y~_j = d * (C[idx_j] + (g / 256) * sqrt(pi/2) / TQ_QJL_M * sum_i S[i][j] * (+1 or -1)).
// The decoded row is inverse_rotate(y~).
//
// Bit packing (element j = 0..63 of the block):
//   2-bit plane qs[16]: byte (j % 16), bits 2*(j / 16) .. 2*(j / 16) + 1.
//   1-bit plane qh[8]:  byte (j % 8), bit (j / 8).
//   4-bit plane qs[32]: byte (j % 32), low nibble for j < 32, high nibble for j >= 32.
//   A 3-bit index is qs-plane | (qh-plane << 2). QJL sign i (i < 56): byte i / 8, bit i % 8 of signs.
#pragma once

#include <stdint.h>

#define QK_TQ 64
#define TQ_QJL_M 56
// step 3's scales (float32 constants), 1 first so that ties keep the plain nearest centroids
#define TQ_SCALE_GRID_N 10
#define TQ_SCALE_GRID { 1.0f, 0.8f, 0.85f, 0.9f, 0.95f, 1.05f, 1.1f, 1.15f, 1.2f, 1.25f }

#ifndef TQ_HALF_T
#define TQ_HALF_T uint16_t
#endif

typedef struct {
    TQ_HALF_T d;        // norm (corrected) as fp16
    uint8_t   qs[16];   // 2-bit indices
} block_tq2;            // 18 bytes: 2.25 bits per value

typedef struct {
    TQ_HALF_T d;
    uint8_t   qs[16];   // low 2 bits of the indices
    uint8_t   qh[8];    // high bit
} block_tq3;            // 26 bytes: 3.25 bits per value

typedef struct {
    TQ_HALF_T d;
    uint8_t   qs[32];   // 4-bit indices
} block_tq4;            // 34 bytes: 4.25 bits per value

typedef struct {
    TQ_HALF_T d;        // plain norm (no correction: the sketch needs the true scale)
    uint8_t   qh[8];    // 1-bit MSE indices
    uint8_t   signs[7]; // QJL signs of S r
    uint8_t   gamma;    // ||r|| in units of 1/256
} block_tq2_qjl;        // 18 bytes: 2.25 bits per value

typedef struct {
    TQ_HALF_T d;
    uint8_t   qs[16];   // 2-bit MSE indices
    uint8_t   signs[7];
    uint8_t   gamma;
} block_tq3_qjl;        // 26 bytes: 3.25 bits per value

typedef struct {
    TQ_HALF_T d;
    uint8_t   qs[16];   // 3-bit MSE indices: low 2 bits
    uint8_t   qh[8];    //                    high bit
    uint8_t   signs[7];
    uint8_t   gamma;
} block_tq4_qjl;        // 34 bytes: 4.25 bits per value

// tq3c, a calibrated key type (K only). A block holds 64 coefficients z of keys transformed per
// layer and KV head by the graph (llama's cache, from the model's `tq calibrate --tq3c` file) so
// that each has unit variance over the calibration text (pytools/tq3c.py says how), coded with the
// fixed profile tq3c_profile (tq-codebooks.h: position j takes tq3c_profile[j] bits, 192
// in all) and the b-bit Lloyd-Max codebooks of N(0, 1) tq_gauss_centroids_b / tq_gauss_boundaries_b:
//   1. s = sum_j (double) z_j * z_j, j = 0..63 in order; if s is not finite: g = 0x7E00 (fp16 NaN),
//      all index bits 0. Else g = fp16((float) sqrt(s / 64)) (round to nearest even); if g is zero,
//      every byte 0.
//   2. u_j = z_j / g (float32, g converted from fp16).
//   3. idx_j = number of boundaries B of tq3c_profile[j] bits with u_j > B (no index for 0 bits).
//   4. qs: a bit stream, LSB first within each byte: idx_j's bits (low to high) at bit offset
//      sum_{i<j} tq3c_profile[i].
//   5. Where g is finite and not zero: zc = this block decoded, t = the tq3 block of the same 64
//      values (quantize_row_tq3_ref), z3 = t decoded (dequantize_row_tq3); e_c = sum_j w_j * (double)
//      (zc_j - z_j)^2 and e_3 likewise with z3 (float32 differences, squared and weighted in double,
//      j = 0..63 in order), w_j = 4^tq3c_profile[j] (what the profile says a position is worth: bits
//      go by log4 of it). If e_3 < e_c the block is t with the sign bit of its norm set (d | 0x8000).
//      Why: attention concentrates on a few keys, and those (secondary sinks) are the ones the
//      calibration did not see; 0-2 bits on most coefficients clip them, tq3 does not
//      (results/tq3c-cache.md).
// Decoding: a block whose gain has the sign bit set is that tq3 block (sign cleared) decoded;
// otherwise z~_j = g * C_b[idx_j] (float32; g * 0.0f for a position of 0 bits).
typedef struct {
    TQ_HALF_T d;        // gain: the block's rms, fp16
    uint8_t   qs[24];   // 192 index bits
} block_tq3c;           // 26 bytes: 3.25 bits per value

// tq2o, tq3o: the outlier split of TurboQuant (its 2.5- and 3.5-bit settings) as
// calibrated key types (K only). A block holds 64 key coefficients z transformed per layer and KV
// head by the graph as tq3c's are, with the orthogonal W of the model's `tq calibrate --split` file
// (pytools/tq_split.py): positions 0..15 are a quarter of the head's channels, those with the most
// E[k^2] E[q^2] over the calibration text (the outliers), 16..63 the rest, each group already turned
// by its own fixed Haar rotation. So each group is one TurboQuant_mse vector of its own dimension m
// (16 and 48) at its own bits (tq2o: 4 and 2, tq3o: 5 and 3), coded with the Lloyd-Max codebooks of
// a coordinate of a uniform point on the sphere in R^m (tq-codebooks.h, tq_split_*):
//   for the group g = 0 (positions 0..15) and g = 1 (16..63):
//   1. s = sum_j (double) z_j * z_j over the group's positions in order; if s is not finite:
//      d[g] = 0x7E00 (fp16 NaN), the group's index bits 0. n = (float) sqrt(s); if n == 0: d[g] = 0,
//      the group's index bits 0.
//   2. u_j = z_j / n (float32); idx_j = number of boundaries B of the group's codebook with u_j > B.
//   3. c = sum_j (double) C[idx_j]^2 over the group in order; d[g] = fp16(n / (float) sqrt(c))
//      (float32 division; fp16 round to nearest even): the norm corrected to the reconstruction's.
//   4. qs: a bit stream, LSB first within each byte, idx_j's bits (low to high) at bit offset
//      j * bits_hi for j < 16, 16 * bits_hi + (j - 16) * bits_lo after.
// Decoding: z~_j = d[g] * C[idx_j] (float32).
#define TQ_SPLIT_HI 16  // positions 0..15 of a tq2o/tq3o block: the outlier group

typedef struct {
    TQ_HALF_T d[2];     // the norms of the outlier group and of the rest
    uint8_t   qs[20];   // 16 x 4 + 48 x 2 index bits
} block_tq2o;           // 24 bytes: 3.0 bits per value (2.5 bits of indices)

typedef struct {
    TQ_HALF_T d[2];
    uint8_t   qs[28];   // 16 x 5 + 48 x 3 index bits
} block_tq3o;           // 32 bytes: 4.0 bits per value (3.5 bits of indices)

// The query side of a TQ key dot product: the query rotated once per row (block_tq_q), plus its
// QJL projections for the _qjl types (block_tq_qjl_q, fp16 so that it fits the 4 bytes per value
// that the CPU flash-attention scratch gives the converted query).
typedef struct {
    float y[QK_TQ];
} block_tq_q;           // 256 bytes

typedef struct {
    TQ_HALF_T y[QK_TQ];
    TQ_HALF_T sy[TQ_QJL_M];
    TQ_HALF_T pad[QK_TQ - TQ_QJL_M];
} block_tq_qjl_q;       // 256 bytes

#ifdef __cplusplus
static_assert(sizeof(block_tq2) == 18, "block_tq2 size");
static_assert(sizeof(block_tq3) == 26, "block_tq3 size");
static_assert(sizeof(block_tq4) == 34, "block_tq4 size");
static_assert(sizeof(block_tq3c) == 26, "block_tq3c size");
static_assert(sizeof(block_tq2o) == 24, "block_tq2o size");
static_assert(sizeof(block_tq3o) == 32, "block_tq3o size");
static_assert(sizeof(block_tq2_qjl) == 18, "block_tq2_qjl size");
static_assert(sizeof(block_tq3_qjl) == 26, "block_tq3_qjl size");
static_assert(sizeof(block_tq4_qjl) == 34, "block_tq4_qjl size");
static_assert(sizeof(block_tq_q) == 256, "block_tq_q size");
static_assert(sizeof(block_tq_qjl_q) == 256, "block_tq_qjl_q size");
#else
_Static_assert(sizeof(block_tq2) == 18, "block_tq2 size");
_Static_assert(sizeof(block_tq3) == 26, "block_tq3 size");
_Static_assert(sizeof(block_tq4) == 34, "block_tq4 size");
_Static_assert(sizeof(block_tq3c) == 26, "block_tq3c size");
_Static_assert(sizeof(block_tq2o) == 24, "block_tq2o size");
_Static_assert(sizeof(block_tq3o) == 32, "block_tq3o size");
_Static_assert(sizeof(block_tq2_qjl) == 18, "block_tq2_qjl size");
_Static_assert(sizeof(block_tq3_qjl) == 26, "block_tq3_qjl size");
_Static_assert(sizeof(block_tq4_qjl) == 34, "block_tq4_qjl size");
_Static_assert(sizeof(block_tq_q) == 256, "block_tq_q size");
_Static_assert(sizeof(block_tq_qjl_q) == 256, "block_tq_qjl_q size");
#endif
