// TurboQuant KV-cache types on CUDA: device functions per type and the templated kernels
// (the design of llama.cpp's fattn-vec: a small decode function per type, one kernel).
// The bytes and the exact arithmetic are tq-blocks.h's; the host entry points are in tq-cuda.cu.
//
// Bit-exact quantization and decoding need IEEE float32 as tq-blocks.h writes it (no fused
// multiply-add, denormals kept): every such operation below is tq_fadd/tq_fmul/... (inline PTX, so
// that ggml-cuda's -use_fast_math changes none of them), the double sums are __dadd_rn in the
// reference's order. The attention kernel's own arithmetic (scores, softmax) is float32 to a bound,
// not bit-exact, and may be built with fast math. The check builds both ways.
#pragma once

#include "tq-blocks.h"
#include "tq-codebooks.h" // TQ_ROTATION_ROUNDS; its tables reach the kernels through tq_cuda_tables
#include "tq-cuda.h"

#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <stdint.h>
#include <type_traits>

#define TQ_CUDA_FULL_MASK 0xffffffffu

enum {
    TQK_F16  = 1,
    TQK_Q8_0 = 8,
    TQK_TQ2  = 43,
    TQK_TQ3  = 44,
    TQK_TQ4  = 45,
};

// The constants of tq-codebooks.h, passed by value as a kernel parameter (constant bank): no
// per-device initialisation, nothing to copy before a graph is captured.
struct tq_cuda_tables {
    float c[3][16];       // centroids of 2, 3, 4 bits (bits - 2)
    float b[3][15];       // boundaries
    uint32_t signs[TQ_ROTATION_ROUNDS][2];   // low and high word of tq_rotation_signs[r]
    float grid[TQ_SCALE_GRID_N];
};

// --- per-type facts ------------------------------------------------------------------------------

template <int T> struct tq_kv_type;
template <> struct tq_kv_type<TQK_F16>  { static constexpr int qk = 1;  static constexpr int bytes = 2;  static constexpr bool tq = false; static constexpr int bits = 0; };
template <> struct tq_kv_type<TQK_Q8_0> { static constexpr int qk = 32; static constexpr int bytes = 34; static constexpr bool tq = false; static constexpr int bits = 0; };
template <> struct tq_kv_type<TQK_TQ2>  { static constexpr int qk = 64; static constexpr int bytes = sizeof(block_tq2); static constexpr bool tq = true;  static constexpr int bits = 2; };
template <> struct tq_kv_type<TQK_TQ3>  { static constexpr int qk = 64; static constexpr int bytes = sizeof(block_tq3); static constexpr bool tq = true;  static constexpr int bits = 3; };
template <> struct tq_kv_type<TQK_TQ4>  { static constexpr int qk = 64; static constexpr int bytes = sizeof(block_tq4); static constexpr bool tq = true;  static constexpr int bits = 4; };

// The bytes of one block of the b-bit TQ type, for the kernels templated on the bit width.
template <int BITS> __host__ __device__ constexpr int tq_bits_block_bytes() {
    static_assert(BITS >= 2 && BITS <= 4, "TQ blocks have 2, 3 or 4 bits a value");
    return BITS == 2 ? (int) sizeof(block_tq2) : BITS == 3 ? (int) sizeof(block_tq3) : (int) sizeof(block_tq4);
}

template <int T, int D> __host__ __device__ constexpr int tq_row_bytes() { return D / tq_kv_type<T>::qk * tq_kv_type<T>::bytes; }

static __device__ __forceinline__ float tq_h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// IEEE float32 operations exactly as written, whatever the build's flags: ggml-cuda compiles with
// -use_fast_math (-ftz=true, approximate division, contraction), which would flush the reference's
// denormals (tq-blocks.h keeps them) and change its roundings. Inline PTX without .ftz is not
// rewritten by those flags; negation flips the sign bit (neg.ftz would flush too).
static __device__ __forceinline__ float tq_fadd(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
static __device__ __forceinline__ float tq_fsub(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
static __device__ __forceinline__ float tq_fmul(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
static __device__ __forceinline__ float tq_fdiv(float a, float b) { float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
static __device__ __forceinline__ float tq_fneg(float a) { return __uint_as_float(__float_as_uint(a) ^ 0x80000000u); }
static __device__ __forceinline__ int tq_fgt(float a, float b) {
    int r;
    asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\tselp.s32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
    return r;
}
static __device__ __forceinline__ float tq_d2f(double x) { float r; asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x)); return r; }
static __device__ __forceinline__ double tq_f2d(float x) { double r; asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x)); return r; }
static __device__ __forceinline__ uint16_t tq_f2h(float x) { uint16_t r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }

// --- the rotation on one warp: lane holds x[lane] (x0) and x[lane + 32] (x1) of a 64-block --------
// N blocks at once: their shuffles are independent, so a warp rotating several blocks waits on one
// chain of shuffles instead of N.

// Unnormalised FWHT, butterflies h = 1, 2, ..., 32 as tq_fwht64 (each pair's (a + b, a - b) is the
// same IEEE operation whichever lane computes it, so the result is bit-identical).
template <int N>
static __device__ __forceinline__ void tq_fwht64_warp(float (&x0)[N], float (&x1)[N]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int h = 1; h < 32; h <<= 1) {
        float o0[N], o1[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
            o0[i] = __shfl_xor_sync(TQ_CUDA_FULL_MASK, x0[i], h);
            o1[i] = __shfl_xor_sync(TQ_CUDA_FULL_MASK, x1[i], h);
        }
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (lane & h) {
                x0[i] = tq_fsub(o0[i], x0[i]);
                x1[i] = tq_fsub(o1[i], x1[i]);
            } else {
                x0[i] = tq_fadd(x0[i], o0[i]);
                x1[i] = tq_fadd(x1[i], o1[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float a = x0[i], b = x1[i];
        x0[i] = tq_fadd(a, b);
        x1[i] = tq_fsub(a, b);
    }
}

template <int N>
static __device__ __forceinline__ void tq_signs_warp(const tq_cuda_tables & t, int r, float (&x0)[N], float (&x1)[N]) {
    const int lane = threadIdx.x & 31;
    const bool n0 = (t.signs[r][0] >> lane) & 1, n1 = (t.signs[r][1] >> lane) & 1;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (n0) x0[i] = tq_fneg(x0[i]);
        if (n1) x1[i] = tq_fneg(x1[i]);
    }
}

template <int N>
static __device__ __forceinline__ void tq_eighth_warp(float (&x0)[N], float (&x1)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        x0[i] = tq_fmul(x0[i], 0.125f);
        x1[i] = tq_fmul(x1[i], 0.125f);
    }
}

template <int N>
static __device__ __forceinline__ void tq_rotate_warp(const tq_cuda_tables & t, float (&x0)[N], float (&x1)[N]) {
#pragma unroll
    for (int r = 0; r < TQ_ROTATION_ROUNDS; ++r) {
        tq_signs_warp<N>(t, r, x0, x1);
        tq_fwht64_warp<N>(x0, x1);
        tq_eighth_warp<N>(x0, x1);
    }
}

template <int N>
static __device__ __forceinline__ void tq_unrotate_warp(const tq_cuda_tables & t, float (&x0)[N], float (&x1)[N]) {
#pragma unroll
    for (int r = TQ_ROTATION_ROUNDS - 1; r >= 0; --r) {
        tq_fwht64_warp<N>(x0, x1);
        tq_eighth_warp<N>(x0, x1);
        tq_signs_warp<N>(t, r, x0, x1);
    }
}

static __device__ __forceinline__ void tq_rotate_warp(const tq_cuda_tables & t, float & x0, float & x1) {
    float a[1] = { x0 }, b[1] = { x1 };
    tq_rotate_warp<1>(t, a, b);
    x0 = a[0];
    x1 = b[0];
}

static __device__ __forceinline__ void tq_unrotate_warp(const tq_cuda_tables & t, float & x0, float & x1) {
    float a[1] = { x0 }, b[1] = { x1 };
    tq_unrotate_warp<1>(t, a, b);
    x0 = a[0];
    x1 = b[0];
}

// Rotate (or unrotate) n floats of shared memory, blocks of 64, by the warps of the CTA, two blocks
// at a time; warp0: the warp that takes the first pair (callers with several calls spread them).
static __device__ __forceinline__ void tq_rotate_smem(const tq_cuda_tables & t, float * x, int n, bool inverse, int warp0 = 0) {
    const int lane = threadIdx.x & 31, nwarps = blockDim.x / 32;
    const int warp = (threadIdx.x / 32 + nwarps - warp0 % nwarps) % nwarps;
    const int nb = n / QK_TQ;
    for (int b = 2*warp; b < nb; b += 2*nwarps) {
        const bool two = b + 1 < nb;
        float x0[2] = { x[b*QK_TQ + lane], two ? x[(b + 1)*QK_TQ + lane] : 0.0f };
        float x1[2] = { x[b*QK_TQ + lane + 32], two ? x[(b + 1)*QK_TQ + lane + 32] : 0.0f };
        if (inverse) {
            tq_unrotate_warp<2>(t, x0, x1);
        } else {
            tq_rotate_warp<2>(t, x0, x1);
        }
        x[b*QK_TQ + lane] = x0[0];
        x[b*QK_TQ + lane + 32] = x1[0];
        if (two) {
            x[(b + 1)*QK_TQ + lane] = x0[1];
            x[(b + 1)*QK_TQ + lane + 32] = x1[1];
        }
    }
}

// --- quantize one 64-block on one warp (tq-blocks.h steps 1-4, MSE types) -------------------------

// number of boundaries b[k] (k < 2^bits - 1, ascending) with v > b[k]
template <int BITS>
static __device__ __forceinline__ int tq_cell_count(float v, const float * b) {
    int n = 0;
#pragma unroll
    for (int k = 0; k < (1 << BITS) - 1; ++k) {
        n += tq_fgt(v, b[k]);
    }
    return n;
}

template <int BITS>
static __device__ __forceinline__ void tq_scaled_boundaries(const tq_cuda_tables & t, int m, float * sb) {
#pragma unroll
    for (int k = 0; k < (1 << BITS) - 1; ++k) {
        sb[k] = tq_fmul(t.grid[m], t.b[BITS - 2][k]);
    }
}

// A warp's shared scratch for one block: the squares of step 1, the unit vector, and the cells of
// every scale (rows of 68 bytes: the ten scales' lanes read one byte each from ten different banks)
struct tq_quant_scratch {
    double sq[QK_TQ];
    float  u[QK_TQ];
    uint8_t idx[TQ_SCALE_GRID_N][68];
};

// x0, x1: this lane's values x[lane], x[lane + 32]; c: the centroids in shared memory. Writes the
// block (bytes identical to tq_quantize_row in tq.c). Steps 1-4 of tq-blocks.h stay together, in
// their order, so that each double sum can be read against the reference's.
// A decoding step quantizes one token (a few blocks, one warp each), so a block's latency is what
// counts: the double sums must stay sequential (the reference's order), so everything they add is
// computed first by all lanes at once and the sums are then bare chains of additions.
template <int BITS>
static __device__ __forceinline__ void tq_quantize_block_warp(const tq_cuda_tables & t, const float * c, tq_quant_scratch & w,
                                                              float x0, float x1, uint8_t * blk, unsigned flags) {
    constexpr int BB = tq_bits_block_bytes<BITS>();
    const int lane = threadIdx.x & 31;

    // step 1: s = sum_j (double) x_j^2 in order j = 0..63 (every lane computes the same sum); the
    // rotation of step 2 does not need it and runs beside the chain
    w.sq[lane] = __dmul_rn(tq_f2d(x0), tq_f2d(x0));
    w.sq[lane + 32] = __dmul_rn(tq_f2d(x1), tq_f2d(x1));
    __syncwarp();
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < QK_TQ; ++j) {
        s = __dadd_rn(s, w.sq[j]);
    }
    tq_rotate_warp(t, x0, x1);
    const bool finite = isfinite(s);
    const float n = finite ? tq_d2f(__dsqrt_rn(s)) : 0.0f;
    if (!finite || (__float_as_uint(n) & 0x7fffffffu) == 0) {   // n == 0, denormal n is not zero
        for (int i = lane; i < BB; i += 32) {
            blk[i] = 0;
        }
        __syncwarp();
        if (lane == 0 && !finite) {
            *(uint16_t *) blk = 0x7E00;
        }
        return;
    }

    // step 2: divide by the norm
    const float u0 = tq_fdiv(x0, n), u1 = tq_fdiv(x1, n);

    // step 3: every lane finds the cells of its two values at every scale; then lane m < n_scales
    // sums scale m's dot and lane 16 + m its cs, each in the reference's order
    const bool search = !(flags & (TQ_CUDA_NO_NORM_CORRECTION | TQ_CUDA_NO_SCALE_SEARCH));
    const int n_scales = search ? TQ_SCALE_GRID_N : 1;
    w.u[lane] = u0;
    w.u[lane + 32] = u1;
    float sb[15];
#pragma unroll
    for (int m = 0; m < TQ_SCALE_GRID_N; ++m) {
        if (m < n_scales) {
            tq_scaled_boundaries<BITS>(t, m, sb);
            w.idx[m][lane] = (uint8_t) tq_cell_count<BITS>(u0, sb);
            w.idx[m][lane + 32] = (uint8_t) tq_cell_count<BITS>(u1, sb);
        }
    }
    __syncwarp();
    const int m = lane & 15;
    const bool dot_lane = lane < 16;
    double acc = 0.0;
    if (m < n_scales) {
#pragma unroll
        for (int j = 0; j < QK_TQ; ++j) {
            const double cv = tq_f2d(c[w.idx[m][j]]);
            acc = __dadd_rn(acc, __dmul_rn(dot_lane ? tq_f2d(w.u[j]) : cv, cv));
        }
    }
    const double cs = __shfl_down_sync(TQ_CUDA_FULL_MASK, acc, 16);   // lane m: its scale's cs
    const double score = __ddiv_rn(acc, __dsqrt_rn(cs));
    int best_m = 0;
    double best = -INFINITY;
    for (int i = 0; i < n_scales; ++i) {
        const double si = __shfl_sync(TQ_CUDA_FULL_MASK, score, i);
        if (si > best) {
            best = si;
            best_m = i;
        }
    }
    const double cs_best = __shfl_sync(TQ_CUDA_FULL_MASK, cs, best_m);
    const int i0 = w.idx[best_m][lane], i1 = w.idx[best_m][lane + 32];
    __syncwarp();   // the scratch is read before the warp's next block writes it

    // step 4: the norm (corrected), fp16 round to nearest even
    const float d = (flags & TQ_CUDA_NO_NORM_CORRECTION) ? n
                  : tq_d2f(__ddiv_rn(tq_f2d(n), __dsqrt_rn(cs_best)));

    // bit planes
    if (BITS == 4) {
        blk[2 + lane] = (uint8_t) ((i0 & 15) | ((i1 & 15) << 4));
    } else {
        const uint64_t p0 = (uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i0 & 1) | ((uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i1 & 1) << 32);
        const uint64_t p1 = (uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i0 & 2) | ((uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i1 & 2) << 32);
        const uint64_t p2 = (uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i0 & 4) | ((uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i1 & 4) << 32);
        if (lane < 16) {
            uint32_t q = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int j = lane + 16*k;
                q |= (uint32_t) (((p0 >> j) & 1) | (((p1 >> j) & 1) << 1)) << (2*k);
            }
            blk[2 + lane] = (uint8_t) q;
        } else if (BITS == 3 && lane < 24) {
            const int i = lane - 16;
            uint32_t q = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                q |= (uint32_t) ((p2 >> (i + 8*k)) & 1) << k;
            }
            blk[18 + i] = (uint8_t) q;
        }
    }
    if (lane == 0) {
        *(uint16_t *) blk = tq_f2h(d);
    }
}

// --- decoding: four values of a row per call ------------------------------------------------------
//
// A row's values are read in quads: quad qd of a TQ row is the values b*64 + i + 16k (k = 0..3) of
// block b = qd / 16, i = qd % 16, the four that share byte i of the 2-bit plane (and one byte of
// the 1-bit plane, two of the 4-bit plane); quad qd of f16 and q8_0 rows is 4qd .. 4qd + 3. The
// query is stored in the same order, so a quad of it is one 16-byte load.

template <int T>
static __device__ __forceinline__ int tq_quad_dim(int qd, int k) {
    if (tq_kv_type<T>::tq) {
        return (qd >> 4)*QK_TQ + (qd & 15) + 16*k;
    }
    return 4*qd + k;
}

// v[k] = value k of quad qd of the row at `row` (shared memory, 4-byte aligned); lut: the type's
// centroids in shared memory (TQ types). TQ values are d * C[idx] as tq_dequantize_row_rotated_ref.
template <int T, bool SCALED = true>
static __device__ __forceinline__ void tq_decode_quad(const uint8_t * row, int qd, const float * lut, float v[4]) {
    if (T == TQK_F16) {
        const uint2 w = *(const uint2 *) (row + 8*qd);
        const float2 a = __half22float2(*(const __half2 *) &w.x);
        const float2 b = __half22float2(*(const __half2 *) &w.y);
        v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
    } else if (T == TQK_Q8_0) {
        const int j = 4*qd;
        const uint8_t * blk = row + (j / 32)*34;
        const float d = tq_h2f(*(const uint16_t *) blk);
        const uint16_t w0 = *(const uint16_t *) (blk + 2 + (j % 32));
        const uint16_t w1 = *(const uint16_t *) (blk + 4 + (j % 32));
        v[0] = d * (float) (int8_t) (w0 & 0xff);
        v[1] = d * (float) (int8_t) (w0 >> 8);
        v[2] = d * (float) (int8_t) (w1 & 0xff);
        v[3] = d * (float) (int8_t) (w1 >> 8);
    } else {
        constexpr int BB = tq_kv_type<T>::bytes;
        const int i = qd & 15;
        const uint8_t * blk = row + (qd >> 4)*BB;
        // unscaled (SCALED false): C[idx], the block's norm applied once per block by the caller
        const float d = SCALED ? tq_h2f(*(const uint16_t *) blk) : 1.0f;
        if (T == TQK_TQ2) {
            const uint32_t q = blk[2 + i];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                v[k] = tq_fmul(d, lut[(q >> (2*k)) & 3]);
            }
        } else if (T == TQK_TQ3) {
            const uint32_t q = blk[2 + i];
            const uint32_t h = (uint32_t) blk[18 + (i & 7)] >> (i >> 3);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                v[k] = tq_fmul(d, lut[((q >> (2*k)) & 3) | (((h >> (2*k)) & 1) << 2)]);
            }
        } else {
            const uint32_t lo = blk[2 + i], hi = blk[2 + i + 16];
            v[0] = tq_fmul(d, lut[lo & 15]);
            v[1] = tq_fmul(d, lut[hi & 15]);
            v[2] = tq_fmul(d, lut[lo >> 4]);
            v[3] = tq_fmul(d, lut[hi >> 4]);
        }
    }
}

// Whether a coded row has a NaN block (tq_row_is_nan): such a row keeps its NaN over an exact row.
template <int T, int D>
static __device__ __forceinline__ bool tq_row_is_nan_dev(const uint8_t * row) {
    if (!tq_kv_type<T>::tq) {
        return false;
    }
    bool nan = false;
    for (int b = 0; b < D / QK_TQ; ++b) {
        const uint16_t d = (uint16_t) row[b*tq_kv_type<T>::bytes] | ((uint16_t) row[b*tq_kv_type<T>::bytes + 1] << 8);
        nan |= (d & 0x7C00) == 0x7C00 && (d & 0x03FF) != 0;
    }
    return nan;
}

// --- flash attention while decoding ---------------------------------------------------------------

struct tq_fattn_params {
    const char * q; size_t nbq1, nbq2, nbq3;
    const char * k; size_t nbk1, nbk2, nbk3;
    const char * v; size_t nbv1, nbv2, nbv3;
    const char * mask; size_t nbm1, nbm2, nbm3; int ne_m2, ne_m3;
    const float * sinks;
    const float * k_exact; size_t nbxk1;
    const float * v_exact; size_t nbxv1;
    const int32_t * exact_cell;
    float * dst;
    float * part;             // [dst row][split][2 + D]: M, S, unnormalised output (rotated domain)
    int n_q, n_head, n_head_kv, n_kv, gqa;
    int n_split, split_cells; // cells per split: a multiple of the tile
    int copy_unit;            // 8, 4 or 2: the widest aligned unit of both caches' rows; 16 (mma kernel): rows granules apart
    bool mask_async;          // the mask rows and strides are 16-byte aligned (the mma kernel copies them so)
    float scale, softcap, max_bias, m0, m1;
    uint32_t n_head_log2;
};

#define TQ_FA_THREADS 256
#define TQ_FA_TILE    64

// shared-memory row stride of a tile: an odd number of 4-byte words (8-byte units for f16, read
// 8 bytes at a time), so that 32 lanes reading the same offset of 32 rows hit 32 banks
template <int T, int D> __host__ __device__ constexpr int tq_smem_stride() {
    return T == TQK_F16 ? 8*((tq_row_bytes<T, D>() / 8) | 1) : 4*(((tq_row_bytes<T, D>() + 3) / 4) | 1);
}

static __host__ __device__ constexpr int a16(int n) { return (n + 15) & ~15; }   // every part 16-byte aligned

template <int D, int KT, int VT, int NR>
struct tq_fattn_smem {
    static constexpr int CG  = 4*TQ_FA_THREADS / D;          // cell groups of the V loop
    static constexpr int TPC = TQ_FA_THREADS / TQ_FA_TILE;   // threads per cell of the K loop
    static constexpr int SK  = tq_smem_stride<KT, D>();
    static constexpr int SV  = tq_smem_stride<VT, D>();
    static constexpr int off_q    = 0;                                  // float [NR][D] (quad order)
    static constexpr int off_o    = a16(off_q + 4*NR*D);                // float [CG][NR][D]
    static constexpr int off_part = a16(off_o + 4*CG*NR*D);             // float [TPC][NR][TILE]
    static constexpr int off_p    = a16(off_part + 4*TPC*NR*TQ_FA_TILE);// float [NR][TILE]
    static constexpr int off_mb   = a16(off_p + 4*NR*TQ_FA_TILE);       // uint32 [NR][2]
    static constexpr int off_row  = a16(off_mb + 8*NR);                 // float M, S, ms, slope [NR]
    static constexpr int off_lut  = a16(off_row + 4*4*NR);              // float [2][16]
    static constexpr int off_x    = a16(off_lut + 4*32);                // float [2][D] exact rows
    static constexpr int off_kt   = a16(off_x + 4*2*D);
    static constexpr int off_vt   = a16(off_kt + 2*SK*TQ_FA_TILE);      // two tiles: one read, one loading
    static constexpr int size     = a16(off_vt + 2*SV*TQ_FA_TILE);
};

// n_rows rows of a cache into shared memory: asynchronous copies of 4 or 8 bytes (waited for with
// __pipeline_wait_prior), plain 2-byte loads and stores where the rows are only 2-byte aligned
template <int UNIT>
static __device__ __forceinline__ void tq_copy_tile(uint8_t * smem, int sstride, const char * g, size_t gstride,
                                                    int row_bytes, int n_rows) {
    const int units = row_bytes / UNIT;
    for (int w = threadIdx.x; w < units*n_rows; w += blockDim.x) {
        const int r = w / units, c = w - r*units;
        if (UNIT == 2) {
            *(uint16_t *) (smem + r*sstride + c*UNIT) = *(const uint16_t *) (g + r*gstride + c*UNIT);
        } else {
            __pipeline_memcpy_async(smem + r*sstride + c*UNIT, g + r*gstride + c*UNIT, UNIT);
        }
    }
}

// The factor of an output row's unnormalised sum: head iq2's sink joins the softmax (a score
// with no value), then 1/S; a row that saw no cell (S = 0) gives zeros.
static __device__ __forceinline__ float tq_fa_output_factor(const tq_fattn_params & p, int iq2, float M, float S) {
    float ms = 1.0f;
    if (p.sinks) {
        const float sk = p.sinks[iq2];
        if (sk > M) {
            ms = expf(M - sk);
            S = S*ms + 1.0f;
        } else {
            S = S + expf(sk - M);
        }
    }
    return S == 0.0f ? 0.0f : ms / S;
}

// The end of both decoding kernels: rows [r0, r0 + nr) of a CTA's result, s_o [nr][D] unnormalised (in
// the values' rotated domain where they are TQ), M and S per row. With splits the partials go to p.part
// for the combine kernel; alone, the sinks and 1/S, the rotation back and the output rows. Every
// thread of the CTA calls it (barriers).
template <int D>
static __device__ __forceinline__ void tq_fa_store_rows(const tq_fattn_params & p, const tq_cuda_tables & tab, bool v_tq,
                                                        int nr, int r0, int ik2, int ik3, int split,
                                                        float * s_o, const float * s_M, const float * s_S) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32, nw = blockDim.x / 32;
    const int rows = p.gqa*p.n_q, live = max(0, min(nr, rows - r0));
    if (p.n_split > 1) {
        for (int e = tid; e < live*(D + 2); e += blockDim.x) {
            const int r = e / (D + 2), j = e % (D + 2), rr = r0 + r;
            const int iq1 = rr / p.gqa, iq2 = ik2*p.gqa + rr % p.gqa;
            const size_t drow = ((size_t) ik3*p.n_q + iq1)*p.n_head + iq2;
            p.part[(drow*p.n_split + split)*(D + 2) + j] = j == 0 ? s_M[r] : j == 1 ? s_S[r] : s_o[r*D + j - 2];
        }
        return;
    }
    for (int r = warp; r < nr; r += nw) {
        const int rr = r0 + r;
        if (rr >= rows) continue;
        const float f = tq_fa_output_factor(p, ik2*p.gqa + rr % p.gqa, s_M[r], s_S[r]);
        for (int j = lane; j < D; j += 32) s_o[r*D + j] *= f;
    }
    __syncthreads();
    if (v_tq) {
        tq_rotate_smem(tab, s_o, live*D, true);
        __syncthreads();
    }
    for (int e = tid; e < live*D; e += blockDim.x) {
        const int r = e / D, j = e % D, rr = r0 + r;
        const int iq1 = rr / p.gqa, iq2 = ik2*p.gqa + rr % p.gqa;
        p.dst[(((size_t) ik3*p.n_q + iq1)*p.n_head + iq2)*D + j] = s_o[e];
    }
}

// One CTA: the query rows [chunk*NR, chunk*NR + NR) of the rows that read K/V head (ik2, ik3) (row r:
// token r / gqa, head ik2*gqa + r % gqa), over the cells of split blockIdx.z.
// One function of ~330 lines on purpose: its phases (set-up, the tile loop with its cp.async double
// buffer, scores, softmax, V accumulation, the finish) share the shared-memory layout tq_fattn_smem
// and the per-row state in registers; split into functions they would pass a dozen references and
// offsets each. The phases are marked below; the kernel is to be redone with tensor-core products
// (results/cuda-gpu.md), which changes this structure anyway.
template <int D, int KT, int VT, int NR>
__global__ void __launch_bounds__(TQ_FA_THREADS)
tq_fattn_vec_kernel(const tq_fattn_params p, const __grid_constant__ tq_cuda_tables tab) {
    typedef tq_fattn_smem<D, KT, VT, NR> L;
    constexpr int T = TQ_FA_TILE, NQD = D / 4, CG = L::CG;
    constexpr bool K_TQ = tq_kv_type<KT>::tq, V_TQ = tq_kv_type<VT>::tq;
    constexpr int KB = tq_row_bytes<KT, D>(), VB = tq_row_bytes<VT, D>();

    extern __shared__ __align__(16) uint8_t smem[];
    float * s_q    = (float *) (smem + L::off_q);
    float * s_o    = (float *) (smem + L::off_o);
    float * s_part = (float *) (smem + L::off_part);
    float * s_p    = (float *) (smem + L::off_p);
    uint32_t * s_mb = (uint32_t *) (smem + L::off_mb);
    float * s_M = (float *) (smem + L::off_row), * s_S = s_M + NR, * s_ms = s_S + NR, * s_slope = s_ms + NR;
    float * s_lutk = (float *) (smem + L::off_lut), * s_lutv = s_lutk + 16;
    float * s_xk = (float *) (smem + L::off_x), * s_xv = s_xk + D;
    uint8_t * s_kt = smem + L::off_kt, * s_vt = smem + L::off_vt;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
    const int ik2 = blockIdx.x % p.n_head_kv, ik3 = blockIdx.x / p.n_head_kv;
    const int rows = p.gqa*p.n_q;
    const int r0 = blockIdx.y*NR;
    const int split = blockIdx.z;
    const int c0 = split*p.split_cells;
    const int c1 = min(p.n_kv, c0 + p.split_cells);

    const char * kbase = p.k + ik2*p.nbk2 + ik3*p.nbk3;
    const char * vbase = p.v + ik2*p.nbv2 + ik3*p.nbv3;

    // --- set-up: centroids, queries (rotated for TQ keys, in quad order), per-row state ---------
    if (tid < 16) {
        s_lutk[tid] = K_TQ ? tab.c[tq_kv_type<KT>::bits - 2][tid & ((1 << tq_kv_type<KT>::bits) - 1)] : 0.0f;
        s_lutv[tid] = V_TQ ? tab.c[tq_kv_type<VT>::bits - 2][tid & ((1 << tq_kv_type<VT>::bits) - 1)] : 0.0f;
    }
    for (int e = tid; e < NR*D; e += TQ_FA_THREADS) {
        const int r = e / D, j = e % D, rr = r0 + r;
        float x = 0.0f;
        if (rr < rows) {
            const int iq1 = rr / p.gqa, iq2 = ik2*p.gqa + rr % p.gqa;
            x = ((const float *) (p.q + iq1*p.nbq1 + iq2*p.nbq2 + ik3*p.nbq3))[j];
        }
        s_o[e] = x;
    }
    if (tid < NR) {
        const int rr = r0 + tid;
        const int h = rr < rows ? ik2*p.gqa + rr % p.gqa : 0;
        s_M[tid] = -INFINITY;
        s_S[tid] = 0.0f;
        s_slope[tid] = p.max_bias > 0.0f ? (h < (int) p.n_head_log2 ? powf(p.m0, h + 1) : powf(p.m1, 2*(h - (int) p.n_head_log2) + 1)) : 1.0f;
    }
    // the exact sink row: used for its cell on each TQ side whose coded row there is not a NaN row
    int xk_cell = -1, xv_cell = -1;
    if (p.exact_cell) {
        const int ce = p.exact_cell[ik3];
        if (ce >= c0 && ce < c1) {
            if (K_TQ && p.k_exact && !tq_row_is_nan_dev<KT, D>((const uint8_t *) (kbase + (size_t) ce*p.nbk1))) {
                xk_cell = ce;
            }
            if (V_TQ && p.v_exact && !tq_row_is_nan_dev<VT, D>((const uint8_t *) (vbase + (size_t) ce*p.nbv1))) {
                xv_cell = ce;
            }
        }
    }
    if (xk_cell >= 0) {
        for (int j = tid; j < D; j += TQ_FA_THREADS) s_xk[j] = p.k_exact[ik3*(p.nbxk1/4) + ik2*D + j];
    }
    if (xv_cell >= 0) {
        for (int j = tid; j < D; j += TQ_FA_THREADS) s_xv[j] = p.v_exact[ik3*(p.nbxv1/4) + ik2*D + j];
    }
    __syncthreads();
    if (K_TQ) {
        tq_rotate_smem(tab, s_o, NR*D, false);
    }
    if (xk_cell >= 0) tq_rotate_smem(tab, s_xk, D, false);
    if (xv_cell >= 0) tq_rotate_smem(tab, s_xv, D, false);
    __syncthreads();
    for (int e = tid; e < NR*D; e += TQ_FA_THREADS) {
        const int r = e / D, qd = (e % D) / 4, k = e % 4;
        s_q[e] = s_o[r*D + tq_quad_dim<KT>(qd, k)];
    }
    // the exact rows in quad order too (s_o is free again after the barrier)
    __syncthreads();
    if (xk_cell >= 0) {
        for (int j = tid; j < D; j += TQ_FA_THREADS) s_o[j] = s_xk[tq_quad_dim<KT>(j / 4, j % 4)];
        __syncthreads();
        for (int j = tid; j < D; j += TQ_FA_THREADS) s_xk[j] = s_o[j];
    }
    if (xv_cell >= 0) {
        __syncthreads();
        for (int j = tid; j < D; j += TQ_FA_THREADS) s_o[j] = s_xv[tq_quad_dim<VT>(j / 4, j % 4)];
        __syncthreads();
        for (int j = tid; j < D; j += TQ_FA_THREADS) s_xv[j] = s_o[j];
    }

    // V accumulators: quad vq of the row, cells t = vg, vg + CG, ... of each tile
    const int vq = tid % NQD, vg = tid / NQD;
    float acc[NR][4];
#pragma unroll
    for (int r = 0; r < NR; ++r) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[r][k] = 0.0f;
    }

    // tile it goes to buffer b while the tile before it is read from the other one
    auto load_tile = [&](int it_load, int b) {
        const int n = min(T, c1 - it_load);
        uint8_t * kd = s_kt + b*L::SK*T, * vd = s_vt + b*L::SV*T;
        const char * kg = kbase + (size_t) it_load*p.nbk1, * vg_ = vbase + (size_t) it_load*p.nbv1;
        if (p.copy_unit == 8) {
            tq_copy_tile<8>(kd, L::SK, kg, p.nbk1, KB, n);
            tq_copy_tile<8>(vd, L::SV, vg_, p.nbv1, VB, n);
        } else if (p.copy_unit == 4) {
            tq_copy_tile<4>(kd, L::SK, kg, p.nbk1, KB, n);
            tq_copy_tile<4>(vd, L::SV, vg_, p.nbv1, VB, n);
        } else {
            tq_copy_tile<2>(kd, L::SK, kg, p.nbk1, KB, n);
            tq_copy_tile<2>(vd, L::SV, vg_, p.nbv1, VB, n);
        }
        __pipeline_commit();
    };
    load_tile(c0, 0);

    for (int it = c0, buf = 0; it < c1; it += T, buf ^= 1) {
        const int nt = min(T, c1 - it);
        __syncthreads(); // the tile before this one is consumed: its buffer may be loaded again
        if (it + T < c1) {
            load_tile(it + T, buf ^ 1);
            __pipeline_wait_prior(1);
        } else {
            __pipeline_wait_prior(0);
        }
        __syncthreads();
        const uint8_t * s_kt_cur = s_kt + buf*L::SK*T;
        const uint8_t * s_vt_cur = s_vt + buf*L::SV*T;

        // K: thread (cell t, part h) sums the quads h, h + TPC, ... of q . k for every row; TQ
        // blocks as d * sum C[idx] q (the norm once per block)
        {
            constexpr int TPC = L::TPC;
            const int t = tid % T, h = tid / T;
            float part[NR];
#pragma unroll
            for (int r = 0; r < NR; ++r) part[r] = 0.0f;
            if (t < nt) {
                const uint8_t * krow = s_kt_cur + t*L::SK;
                if (it + t == xk_cell) {
                    for (int qd = h; qd < NQD; qd += TPC) {
                        const float4 x = *(const float4 *) (s_xk + 4*qd);
#pragma unroll
                        for (int r = 0; r < NR; ++r) {
                            const float4 q = *(const float4 *) (s_q + r*D + 4*qd);
                            part[r] = fmaf(x.x, q.x, fmaf(x.y, q.y, fmaf(x.z, q.z, fmaf(x.w, q.w, part[r]))));
                        }
                    }
                } else if (K_TQ) {
#pragma unroll
                    for (int b = 0; b < D / QK_TQ; ++b) {
                        const float d = tq_h2f(*(const uint16_t *) (krow + b*tq_kv_type<KT>::bytes));
                        float sb[NR];
#pragma unroll
                        for (int r = 0; r < NR; ++r) sb[r] = 0.0f;
#pragma unroll
                        for (int qd = 16*b + h; qd < 16*b + 16; qd += TPC) {
                            float kv[4];
                            tq_decode_quad<KT, false>(krow, qd, s_lutk, kv);
#pragma unroll
                            for (int r = 0; r < NR; ++r) {
                                const float4 q = *(const float4 *) (s_q + r*D + 4*qd);
                                sb[r] = fmaf(kv[0], q.x, fmaf(kv[1], q.y, fmaf(kv[2], q.z, fmaf(kv[3], q.w, sb[r]))));
                            }
                        }
#pragma unroll
                        for (int r = 0; r < NR; ++r) part[r] = fmaf(d, sb[r], part[r]);
                    }
                } else {
#pragma unroll 4
                    for (int qd = h; qd < NQD; qd += TPC) {
                        float kv[4];
                        tq_decode_quad<KT>(krow, qd, s_lutk, kv);
#pragma unroll
                        for (int r = 0; r < NR; ++r) {
                            const float4 q = *(const float4 *) (s_q + r*D + 4*qd);
                            part[r] = fmaf(kv[0], q.x, fmaf(kv[1], q.y, fmaf(kv[2], q.z, fmaf(kv[3], q.w, part[r]))));
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < NR; ++r) s_part[(h*NR + r)*T + t] = part[r];
        }
        __syncthreads();

        // scores (scale, soft-cap, mask with the ALiBi slope; masked cells marked dead in s_mb) and
        // one online-softmax step per row, a warp per row: lanes hold cells lane and lane + 32
        for (int r = warp; r < NR; r += TQ_FA_THREADS / 32) {
            const int rr = r0 + r;
            float sc[2];
            bool dead[2];
            const __half * mp = nullptr;
            if (p.mask && rr < rows) {
                const int iq1 = rr / p.gqa, iq2 = ik2*p.gqa + rr % p.gqa;
                mp = (const __half *) (p.mask + iq1*p.nbm1 + (iq2 % p.ne_m2)*p.nbm2 + (ik3 % p.ne_m3)*p.nbm3);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int t = lane + 32*i;
                sc[i] = -INFINITY;
                dead[i] = !(t < nt && rr < rows);
                if (!dead[i]) {
                    const float mv = mp ? s_slope[r]*__half2float(mp[it + t]) : 0.0f;
                    if (mv == -INFINITY) {
                        dead[i] = true;
                    } else {
                        float x = s_part[r*T + t];
#pragma unroll
                        for (int h = 1; h < L::TPC; ++h) x += s_part[(h*NR + r)*T + t];
                        x *= p.scale;
                        if (p.softcap != 0.0f) {
                            x = p.softcap*tanhf(x);
                        }
                        sc[i] = x + mv;
                    }
                }
            }
            const uint32_t dead0 = __ballot_sync(TQ_CUDA_FULL_MASK, dead[0]);
            const uint32_t dead1 = __ballot_sync(TQ_CUDA_FULL_MASK, dead[1]);
            if (lane == 0) {
                s_mb[2*r] = dead0;
                s_mb[2*r + 1] = dead1;
            }
            if ((dead0 & dead1) == TQ_CUDA_FULL_MASK) {
                s_p[r*T + lane] = 0.0f;
                s_p[r*T + lane + 32] = 0.0f;
                if (lane == 0) s_ms[r] = 1.0f;
                continue;
            }
            float mx = fmaxf(sc[0], sc[1]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(TQ_CUDA_FULL_MASK, mx, o));
            const float M_old = s_M[r];
            // fmaxf skips a NaN score; exp(NaN - M) then carries it into S and the output, as the
            // CPU's per-cell path does for a NaN key row that a row attends to
            const float M_new = fmaxf(M_old, mx);
            const float pa = dead[0] ? 0.0f : expf(sc[0] - M_new), pb = dead[1] ? 0.0f : expf(sc[1] - M_new);
            s_p[r*T + lane] = pa;
            s_p[r*T + lane + 32] = pb;
            float sum = pa + pb;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(TQ_CUDA_FULL_MASK, sum, o);
            __syncwarp(); // every lane has read s_M[r] before lane 0 writes it
            if (lane == 0) {
                const float ms = M_old == -INFINITY ? 0.0f : expf(M_old - M_new);
                s_ms[r] = ms;
                s_M[r] = M_new;
                s_S[r] = s_S[r]*ms + sum;
            }
        }
        __syncthreads();

        // V: acc += p v in the rotated domain (TQ) over this thread's cells; a masked cell is skipped
        // for its row (so a NaN row reaches only the rows that attend to it)
        uint32_t any_dead = 0;
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            any_dead |= s_mb[2*r] | s_mb[2*r + 1];
            const float ms = s_ms[r];
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[r][k] *= ms;
        }
        for (int t = vg; t < nt; t += CG) {
            float vv[4];
            if (it + t == xv_cell) {
                const float4 x = *(const float4 *) (s_xv + 4*vq);
                vv[0] = x.x; vv[1] = x.y; vv[2] = x.z; vv[3] = x.w;
            } else {
                tq_decode_quad<VT>(s_vt_cur + t*L::SV, vq, s_lutv, vv);
            }
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                if (any_dead && ((s_mb[2*r + t/32] >> (t & 31)) & 1)) {
                    continue;
                }
                const float pr = s_p[r*T + t];
#pragma unroll
                for (int k = 0; k < 4; ++k) acc[r][k] = fmaf(pr, vv[k], acc[r][k]);
            }
        }
    }

    // --- the cell groups' sums, in natural order --------------------------------------------------
    __syncthreads();
#pragma unroll
    for (int r = 0; r < NR; ++r) {
#pragma unroll
        for (int k = 0; k < 4; ++k) s_o[(vg*NR + r)*D + tq_quad_dim<VT>(vq, k)] = acc[r][k];
    }
    __syncthreads();
    for (int e = tid; e < NR*D; e += TQ_FA_THREADS) {
        float o = s_o[e];
        for (int g = 1; g < CG; ++g) o += s_o[g*NR*D + e];
        s_o[e] = o;
    }
    __syncthreads();

    tq_fa_store_rows<D>(p, tab, V_TQ, NR, r0, ik2, ik3, split, s_o, s_M, s_S);
}

// The splits of one output row: weights exp(M_s - M), the sinks, 1/S, and the rotation back.
// Every split's M and S arrive in one round of loads and the partials in rounds of eight: at 32K cells
// a row has 32 splits, and loads issued one after another would make the kernel a chain of round
// trips. The sums are added in split order, as one thread reading them one by one would.
template <int D, bool V_TQ>
__global__ void __launch_bounds__(TQ_FA_THREADS)
tq_fattn_combine_kernel(const tq_fattn_params p, const __grid_constant__ tq_cuda_tables tab) {
    __shared__ float s_o[D];
    __shared__ float s_w[1024];
    __shared__ float s_s[1024];
    __shared__ float s_m[TQ_FA_THREADS / 32];
    const size_t drow = blockIdx.x;
    const int iq2 = (int) (drow % p.n_head), tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
    const int ns = p.n_split;
    const float * part = p.part + drow*ns*(D + 2);

    float M = -INFINITY;
    for (int s = tid; s < ns; s += blockDim.x) {
        const float Ms = part[s*(D + 2)];
        s_w[s] = Ms;
        s_s[s] = part[s*(D + 2) + 1];
        M = fmaxf(M, Ms);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(TQ_CUDA_FULL_MASK, M, o));
    if (lane == 0) s_m[warp] = M;
    __syncthreads();
    M = s_m[0];
    for (int w = 1; w < (int) blockDim.x / 32; ++w) M = fmaxf(M, s_m[w]);
    for (int s = tid; s < ns; s += blockDim.x) {
        // M_s = -inf: the split saw no cell (S_s = 0), or only NaN scores (S_s NaN), which must carry on
        const float Ms = s_w[s];
        s_w[s] = Ms == -INFINITY ? (s_s[s] == 0.0f ? 0.0f : NAN) : expf(Ms - M);
    }
    __syncthreads();
    float S = 0.0f;
    for (int s = 0; s < ns; ++s) S += s_w[s]*s_s[s];
    const float f = tq_fa_output_factor(p, iq2, M, S);
    for (int j = tid; j < D; j += blockDim.x) {
        float o = 0.0f;
        for (int s0 = 0; s0 < ns; s0 += 8) {
            float x[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) x[k] = s0 + k < ns ? part[(s0 + k)*(D + 2) + 2 + j] : 0.0f;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float w = s0 + k < ns ? s_w[s0 + k] : 0.0f;
                if (w != 0.0f) o = fmaf(w, x[k], o);
            }
        }
        s_o[j] = o*f;
    }
    __syncthreads();
    if (V_TQ) {
        tq_rotate_smem(tab, s_o, D, true);
        __syncthreads();
    }
    for (int j = tid; j < D; j += blockDim.x) p.dst[drow*D + j] = s_o[j];
}

// --- quantize, dequantize and rotate rows: one warp per 64-block ----------------------------------

#define TQ_ROWS_THREADS 128

struct tq_rows_params {
    const char * src; int64_t ne0, ne1, ne2, ne3; size_t nb1, nb2, nb3;   // the rows read
    const char * idx; int64_t ne_i1, ne_i2; size_t nb_i0, nb_i1, nb_i2;   // NULL: row i1 itself
    char * dst; size_t dnb1, dnb2, dnb3;
    int64_t n1, n2, n3;      // the rows of the output (set_rows: src's; get_rows: dst's)
    unsigned flags;
    bool rotated;
    bool flat;               // the grid: flat over every block, else x over (block, i1), y = i2, z = i3
};

template <typename idx_t>
static __device__ __forceinline__ int64_t tq_row_index(const tq_rows_params & p, int64_t i1, int64_t i2, int64_t i3) {
    if (!p.idx) {
        return i1;
    }
    // i2, i3 and the index tensor's dims below 2^32 (tq_rows_grid): 32-bit remainders, not 64-bit ones
    return (int64_t) *(const idx_t *) (p.idx + i1*p.nb_i0 + ((uint32_t) i2 % (uint32_t) p.ne_i1)*p.nb_i1 +
                                       ((uint32_t) i3 % (uint32_t) p.ne_i2)*p.nb_i2);
}

// block b of row (i1, i2, i3) of the n1 x n2 x n3 rows of ne0 values, the warp's of CTA cta; false past the end.
// Why the 3D grid: a warp's work is a few dozen instructions, and the flat grid's three 64-bit divisions and
// remainders cost hundreds; its x takes (block, i1) in 32 bits, y and z are i2 and i3 (tq_rows_grid).
static __device__ __forceinline__ bool tq_warp_block(const tq_rows_params & p, int64_t & b, int64_t & i1, int64_t & i2, int64_t & i3,
                                                     int64_t cta = blockIdx.x) {
    const int64_t nb = p.ne0 / QK_TQ;
    if (p.flat) {
        int64_t w = (cta*blockDim.x + threadIdx.x) / 32;
        if (w >= nb*p.n1*p.n2*p.n3) {
            return false;
        }
        b = w % nb; w /= nb;
        i1 = w % p.n1; w /= p.n1;
        i2 = w % p.n2;
        i3 = w / p.n2;
        return true;
    }
    const uint32_t w = (uint32_t) cta*(blockDim.x / 32) + threadIdx.x / 32, nb32 = (uint32_t) nb;
    if (w >= nb32*(uint32_t) p.n1) {
        return false;
    }
    const uint32_t r = w / nb32;
    b = w - r*nb32;
    i1 = r;
    i2 = blockIdx.y;
    i3 = blockIdx.z;
    return true;
}

// every thread of the CTA loads the codebook of BITS into shared memory; then the warp's block, if any
template <int BITS>
static __device__ __forceinline__ bool tq_rows_kernel_start(const tq_cuda_tables & tab, float * s_c, const tq_rows_params & p,
                                                            int64_t & b, int64_t & i1, int64_t & i2, int64_t & i3,
                                                            int64_t cta = blockIdx.x) {
    if (threadIdx.x < 16) {
        s_c[threadIdx.x] = tab.c[BITS - 2][threadIdx.x];
    }
    __syncthreads();
    return tq_warp_block(p, b, i1, i2, i3, cta);
}

// SET_ROWS / CPY: src row (i1, i2, i3) -> dst row (idx or i1, i2, i3), the blocks of CTA cta
template <int BITS, typename src_t, typename idx_t>
static __device__ __forceinline__ void tq_set_rows_cta(const tq_rows_params & p, const tq_cuda_tables & tab, int64_t cta) {
    constexpr int BB = tq_bits_block_bytes<BITS>();
    __shared__ float s_c[16];
    __shared__ tq_quant_scratch s_w[TQ_ROWS_THREADS/32];
    int64_t b, i1, i2, i3;
    if (!tq_rows_kernel_start<BITS>(tab, s_c, p, b, i1, i2, i3, cta)) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const src_t * x = (const src_t *) (p.src + i1*p.nb1 + i2*p.nb2 + i3*p.nb3) + b*QK_TQ;
    float x0, x1;
    if (std::is_same<src_t, float>::value) {
        x0 = (float) x[lane];
        x1 = (float) x[lane + 32];
    } else {
        x0 = __half2float(*(const __half *) &x[lane]);
        x1 = __half2float(*(const __half *) &x[lane + 32]);
    }
    const int64_t row = tq_row_index<idx_t>(p, i1, i2, i3);
    uint8_t * blk = (uint8_t *) (p.dst + row*p.dnb1 + i2*p.dnb2 + i3*p.dnb3) + b*BB;
    tq_quantize_block_warp<BITS>(tab, s_c, s_w[threadIdx.x / 32], x0, x1, blk, p.flags);
}

template <int BITS, typename src_t, typename idx_t>
__global__ void __launch_bounds__(TQ_ROWS_THREADS)
tq_set_rows_kernel(const tq_rows_params p, const __grid_constant__ tq_cuda_tables tab) {
    tq_set_rows_cta<BITS, src_t, idx_t>(p, tab, blockIdx.x);
}

// Two SET_ROWS in one launch (a decoding step's K and V rows: one token's quantizer chain is the whole
// cost of a launch, so two launches cost twice one): CTAs [0, ctas0) take p0's blocks, the others p1's.
template <int BITS0, int BITS1, typename src_t, typename idx_t>
__global__ void __launch_bounds__(TQ_ROWS_THREADS)
tq_set_rows_pair_kernel(const tq_rows_params p0, const tq_rows_params p1, const unsigned ctas0,
                        const __grid_constant__ tq_cuda_tables tab) {
    if (blockIdx.x < ctas0) {
        tq_set_rows_cta<BITS0, src_t, idx_t>(p0, tab, blockIdx.x);
    } else {
        tq_set_rows_cta<BITS1, src_t, idx_t>(p1, tab, blockIdx.x - ctas0);
    }
}

// GET_ROWS / dequantize: dst row (i1, i2, i3) <- src row (idx or i1, i2, i3), normal or rotated domain
template <int BITS, typename dst_t, typename idx_t>
__global__ void __launch_bounds__(TQ_ROWS_THREADS)
tq_get_rows_kernel(const tq_rows_params p, const __grid_constant__ tq_cuda_tables tab) {
    constexpr int BB = tq_bits_block_bytes<BITS>();
    __shared__ float s_c[16];
    int64_t b, i1, i2, i3;
    if (!tq_rows_kernel_start<BITS>(tab, s_c, p, b, i1, i2, i3)) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const int64_t row = tq_row_index<idx_t>(p, i1, i2, i3);
    const uint8_t * blk = (const uint8_t *) (p.src + row*p.nb1 + i2*p.nb2 + i3*p.nb3) + b*BB;
    const float d = tq_h2f((uint16_t) blk[0] | ((uint16_t) blk[1] << 8));
    int i0, i1v;
    if (BITS == 4) {
        i0 = blk[2 + lane] & 15;
        i1v = blk[2 + lane] >> 4;
    } else {
        i0  = (blk[2 + (lane & 15)] >> (2*(lane >> 4))) & 3;
        i1v = (blk[2 + (lane & 15)] >> (2*((lane + 32) >> 4))) & 3;
        if (BITS == 3) {
            i0  |= ((blk[18 + (lane & 7)] >> (lane >> 3)) & 1) << 2;
            i1v |= ((blk[18 + (lane & 7)] >> ((lane + 32) >> 3)) & 1) << 2;
        }
    }
    float x0 = tq_fmul(d, s_c[i0]), x1 = tq_fmul(d, s_c[i1v]);
    if (!p.rotated) {
        tq_unrotate_warp(tab, x0, x1);
    }
    dst_t * y = (dst_t *) (p.dst + i1*p.dnb1 + i2*p.dnb2 + i3*p.dnb3) + b*QK_TQ;
    if (std::is_same<dst_t, float>::value) {
        ((float *) y)[lane] = x0;
        ((float *) y)[lane + 32] = x1;
    } else {
        ((uint16_t *) y)[lane] = tq_f2h(x0);
        ((uint16_t *) y)[lane + 32] = tq_f2h(x1);
    }
}

// GET_ROWS in the rotated domain without indices (the prompt path's cache to f16): d * C[idx] needs no
// lane of another value, so a thread takes 8 consecutive values of a block (8 threads a block) and stores
// them at once; a warp of the kernel above takes one block and its chain of dependent loads, which left
// the copy latency-bound at a quarter of the memory bandwidth. Same values as tq_get_rows_kernel's.
// Grid: x over (block, i1) x 8 threads, y = i2, z = i3 (tq_rows_grid's 3D case); dst rows 16-byte aligned.
template <int BITS, typename dst_t>
__global__ void __launch_bounds__(TQ_ROWS_THREADS)
tq_get_rows_rotated_kernel(const tq_rows_params p, const __grid_constant__ tq_cuda_tables tab) {
    constexpr int BB = tq_bits_block_bytes<BITS>();
    __shared__ float s_c[16];
    if (threadIdx.x < 16) {
        s_c[threadIdx.x] = tab.c[BITS - 2][threadIdx.x];
    }
    __syncthreads();
    const uint32_t nb = (uint32_t) (p.ne0 / QK_TQ);
    const uint32_t t = blockIdx.x*blockDim.x + threadIdx.x, w = t / 8, j0 = 8*(t % 8);
    if (w >= nb*(uint32_t) p.n1) {
        return;
    }
    const uint32_t i1 = w / nb, b = w - i1*nb, i2 = blockIdx.y, i3 = blockIdx.z;
    // blocks start at even offsets (rows and block sizes are even): 16-bit loads
    const uint16_t * blk = (const uint16_t *) (p.src + i1*p.nb1 + i2*p.nb2 + i3*p.nb3 + b*BB);
    const float d = tq_h2f(blk[0]);
    int idx[8];
    if (BITS == 4) {
        // value j: low nibble of byte 2 + j (j < 32), high nibble of byte 2 + j - 32
        const uint32_t o = 1 + (j0 & 31)/2, sh = j0 < 32 ? 0 : 4;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t u = blk[o + k];
            idx[2*k]     = (u >> sh) & 15;
            idx[2*k + 1] = (u >> (8 + sh)) & 15;
        }
    } else {
        // value j: bits 2*(j >> 4) of byte 2 + (j & 15); 3 bits: bit (j >> 3) of byte 18 + (j & 7) above them
        const uint32_t o = 1 + (j0 & 15)/2, sh = 2*(j0 >> 4);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t u = blk[o + k];
            idx[2*k]     = (u >> sh) & 3;
            idx[2*k + 1] = (u >> (8 + sh)) & 3;
        }
        if (BITS == 3) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const uint32_t u = blk[9 + k];
                idx[2*k]     |= ((u >> (j0 >> 3)) & 1) << 2;
                idx[2*k + 1] |= ((u >> (8 + (j0 >> 3))) & 1) << 2;
            }
        }
    }
    dst_t * y = (dst_t *) (p.dst + i1*p.dnb1 + i2*p.dnb2 + i3*p.dnb3) + b*QK_TQ + j0;
    if (std::is_same<dst_t, float>::value) {
        float4 v0, v1;
        v0.x = tq_fmul(d, s_c[idx[0]]); v0.y = tq_fmul(d, s_c[idx[1]]); v0.z = tq_fmul(d, s_c[idx[2]]); v0.w = tq_fmul(d, s_c[idx[3]]);
        v1.x = tq_fmul(d, s_c[idx[4]]); v1.y = tq_fmul(d, s_c[idx[5]]); v1.z = tq_fmul(d, s_c[idx[6]]); v1.w = tq_fmul(d, s_c[idx[7]]);
        ((float4 *) y)[0] = v0;
        ((float4 *) y)[1] = v1;
    } else {
        uint4 v;
        uint32_t h[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) h[k] = tq_f2h(tq_fmul(d, s_c[idx[k]]));
        v.x = h[0] | (h[1] << 16); v.y = h[2] | (h[3] << 16); v.z = h[4] | (h[5] << 16); v.w = h[6] | (h[7] << 16);
        *(uint4 *) y = v;
    }
}

// rows of float32 rotated (or rotated back), block by block: src row (i1, i2, i3) to dst row (i1, i2, i3)
// (in place where src and dst are the same rows)
static __global__ void __launch_bounds__(TQ_ROWS_THREADS)
tq_rotate_rows_kernel(const tq_rows_params p, const __grid_constant__ tq_cuda_tables tab) {
    int64_t b, i1, i2, i3;
    if (!tq_warp_block(p, b, i1, i2, i3)) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const float * x = (const float *) (p.src + i1*p.nb1 + i2*p.nb2 + i3*p.nb3) + b*QK_TQ;
    float x0 = x[lane], x1 = x[lane + 32];
    if (p.rotated) {
        tq_unrotate_warp(tab, x0, x1);
    } else {
        tq_rotate_warp(tab, x0, x1);
    }
    float * y = (float *) (p.dst + i1*p.dnb1 + i2*p.dnb2 + i3*p.dnb3) + b*QK_TQ;
    y[lane] = x0;
    y[lane + 32] = x1;
}

// The prompt path's exact sink: rows decoded to f16 ([D, n_kv, n_head_kv, n_stream]) take, in cell
// exact_cell[s] of stream s, the exact float32 row (D values of head h at exact + s*nbx1 + h*D),
// rotated where the rows were decoded in the rotated domain, rounded to f16, unless the decoded row
// holds a NaN (its coded row was a NaN row: NaN travels as in an f16 cache, as on the CPU). One CTA
// per (head, stream); D <= 64 * warps.
static __global__ void __launch_bounds__(TQ_ROWS_THREADS)
tq_put_exact_rows_kernel(__half * kv, int64_t D, int64_t n_kv, size_t nb1, size_t nb2, size_t nb3,
                         const float * exact, size_t nbx1, const int32_t * exact_cell, bool rotated,
                         const __grid_constant__ tq_cuda_tables tab) {
    const int64_t h = blockIdx.x, s = blockIdx.y;
    const int32_t c = exact_cell[s];
    if (c < 0 || c >= n_kv) {
        return;
    }
    __half * row = (__half *) ((char *) kv + c*nb1 + h*nb2 + s*nb3);
    bool nan = false;
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
        nan |= __hisnan(row[j]);
    }
    if (__syncthreads_or(nan)) {
        return;
    }
    const float * x = (const float *) ((const char *) exact + s*nbx1) + h*D;
    const int lane = threadIdx.x & 31;
    for (int64_t b = threadIdx.x / 32; b < D / QK_TQ; b += blockDim.x / 32) {
        float x0 = x[b*QK_TQ + lane], x1 = x[b*QK_TQ + lane + 32];
        if (rotated) {
            tq_rotate_warp(tab, x0, x1);
        }
        row[b*QK_TQ + lane] = __float2half(x0);
        row[b*QK_TQ + lane + 32] = __float2half(x1);
    }
}

#include "tq-cuda-fattn-mma.cuh"
