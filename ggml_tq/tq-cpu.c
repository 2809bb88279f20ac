// TurboQuant KV-cache types: CPU kernels. The scalar level is the reference (tq.c) itself; each SIMD
// level is a faster copy of it, chosen once at run time from what the processor supports:
//   x86-64:  level 2 AVX-512 (avx512f, with avx2 and fma), level 1 AVX2 (avx2 and fma), level 0 scalar;
//            the AVX2 and AVX-512 functions carry target attributes, so the file needs no -mavx flags.
//   aarch64: level 1 NEON (always present there), level 0 scalar.
// The SIMD copies cover the MSE types (tq2, tq3, tq4): the key dot product against the rotated query
// (block_tq_q), the V accumulation in the rotated domain and the inverse rotation of the
// accumulator. Their dot products and sums may differ from the reference by float32 accumulation
// error (other summation order, fused multiply-add); a row decoded with weight 1 and the inverse
// rotation are bit-identical (the same d * c products, a + b / a - b butterflies, multiplication by
// 0.125f and sign flips); tests/native/tq_simd_check.c checks every level against the reference.
// The _qjl types use the reference at every level. The calibrated key types (tq3c; tq2o, tq3o) have
// an AVX2 decoder (the AVX-512 level takes it too) that gives the reference's floats bit for bit.
// Quantization is the reference: it runs once per cached token and its bytes must equal the NumPy
// reference's.
// Then the flash-attention rows (tq_cpu_attn_rows, tq_cpu_flash_attn_ext_rows): one C path for all
// levels, decoding through the level's kernels.
#include "tq.h"
#include "tq-codebooks.h"

#include "ggml-impl.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#    define TQ_X86 1
#    include <immintrin.h>
#endif

// NEON path: AArch64 only (it uses A64 table lookups and vaddvq), little-endian (the centroid
// table is read as float bytes).
#if defined(__ARM_NEON) && defined(__aarch64__) && (!defined(__BYTE_ORDER__) || __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
#    define TQ_NEON 1
#    include <arm_neon.h>
#endif

// Levels: 0 scalar; x86: 1 AVX2, 2 AVX-512; aarch64: 1 NEON.
enum { TQ_SIMD_SCALAR = 0, TQ_SIMD_AVX2 = 1, TQ_SIMD_AVX512 = 2, TQ_SIMD_NEON = 1 };

// --- quantize: the reference -----------------------------------------------------------------------

// The reference (from_float of SET_ROWS and CPY); TQ_SCALE_SEARCH=0 or TQ_NORM_CORRECTION=0
// (tq_knobs) pick its measurement variant.
void tq_cpu_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k) {
    const tq_measurement_knobs * knobs = tq_knobs();
    if (knobs->quant.norm_correction && knobs->quant.scale_search) {
        quantize_tq(type, x, y, 1, k, NULL);
    } else {
        tq_quantize_row_with(type, x, y, k, &knobs->quant);
    }
}

#define TQ_CPU_QUANTIZE(name, type) \
    void tq_cpu_quantize_row_##name(const float * x, void * y, int64_t k) { tq_cpu_quantize_row(type, x, y, k); }

TQ_CPU_QUANTIZE(tq2, GGML_TYPE_TQ2)
TQ_CPU_QUANTIZE(tq3, GGML_TYPE_TQ3)
TQ_CPU_QUANTIZE(tq4, GGML_TYPE_TQ4)
TQ_CPU_QUANTIZE(tq2_qjl, GGML_TYPE_TQ2_QJL)
TQ_CPU_QUANTIZE(tq3_qjl, GGML_TYPE_TQ3_QJL)
TQ_CPU_QUANTIZE(tq4_qjl, GGML_TYPE_TQ4_QJL)
TQ_CPU_QUANTIZE(tq3c, GGML_TYPE_TQ3C)
TQ_CPU_QUANTIZE(tq2o, GGML_TYPE_TQ2O)
TQ_CPU_QUANTIZE(tq3o, GGML_TYPE_TQ3O)
void tq_cpu_quantize_row_tq_q(const float * x, void * y, int64_t k) { quantize_row_tq_q_ref(x, y, k); }
void tq_cpu_quantize_row_tq_qjl_q(const float * x, void * y, int64_t k) { quantize_row_tq_qjl_q_ref(x, y, k); }

// --- the scalar level: the reference ---------------------------------------------------------------

static float tq_vec_dot_scalar(enum ggml_type type, int n, const void * x, const block_tq_q * q) {
    return tq_vec_dot_ref(type, n, x, q);
}

// acc + r*n += scale * (row r at x + r*stride, decoded in the rotated domain), for r < count
static void tq_mad_rows_scalar(enum ggml_type type, int64_t n, float * acc, const char * x, size_t stride, int count, float scale) {
    for (int r = 0; r < count; ++r) {
        tq_mad_row_rotated_ref(type, n, acc + r*n, x + r*stride, scale);
    }
}

// --- tables shared by the SIMD levels ----------------------------------------------------------------

static inline const float * tq_type_centroids(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_TQ2: return tq_centroids_2;
        case GGML_TYPE_TQ3: return tq_centroids_3;
        default:            return tq_centroids_4;
    }
}

// The type's centroids in a 16-entry table, zero-padded (tq2 uses entries 0..3, tq3 0..7): one
// register for the AVX-512 permute, four for the NEON byte-table lookup.
static inline void tq_centroid_table16(enum ggml_type type, float * ctab) {
    const int ncent = type == GGML_TYPE_TQ2 ? 4 : type == GGML_TYPE_TQ3 ? 8 : 16;
    memset(ctab, 0, 16*sizeof(float));
    memcpy(ctab, tq_type_centroids(type), ncent*sizeof(float));
}

// --- AVX2 ----------------------------------------------------------------------------------------
#if defined(TQ_X86) && defined(__GNUC__)

// 16 indices of one quarter (elements 16g .. 16g+15) as bytes. The 2-bit plane holds them at
// shift 2g of bytes 0..15; the 1-bit plane at bit 2g of bytes 0..7 (elements 16g..16g+7) and at
// bit 2g+1 of the same bytes (elements 16g+8..16g+15).
__attribute__((target("avx2,fma")))
static inline __m128i tq_avx2_idx16(enum ggml_type type, const void * blocks, int64_t b, int g, float * d) {
    const __m128i m3 = _mm_set1_epi8(3);
    if (type == GGML_TYPE_TQ2) {
        const block_tq2 * x = (const block_tq2 *) blocks + b;
        *d = GGML_FP16_TO_FP32(x->d);
        const __m128i qs = _mm_loadu_si128((const __m128i *) x->qs);
        return _mm_and_si128(_mm_srl_epi16(qs, _mm_cvtsi32_si128(2*g)), m3);
    }
    if (type == GGML_TYPE_TQ3) {
        const block_tq3 * x = (const block_tq3 *) blocks + b;
        *d = GGML_FP16_TO_FP32(x->d);
        const __m128i qs = _mm_loadu_si128((const __m128i *) x->qs);
        const __m128i lo = _mm_and_si128(_mm_srl_epi16(qs, _mm_cvtsi32_si128(2*g)), m3);
        const __m128i qh8 = _mm_loadl_epi64((const __m128i *) x->qh);
        // bytes 0..7: qh >> 2g, bytes 8..15: qh >> (2g+1)
        const __m128i h0 = _mm_srl_epi16(qh8, _mm_cvtsi32_si128(2*g));
        const __m128i h1 = _mm_srl_epi16(qh8, _mm_cvtsi32_si128(2*g + 1));
        const __m128i hi = _mm_and_si128(_mm_unpacklo_epi64(h0, h1), _mm_set1_epi8(1));
        return _mm_or_si128(lo, _mm_slli_epi16(hi, 2));
    }
    // tq4: elements 16g..16g+15 are bytes (16g mod 32).., low nibble for g < 2
    const block_tq4 * x = (const block_tq4 *) blocks + b;
    *d = GGML_FP16_TO_FP32(x->d);
    const __m128i qs = _mm_loadu_si128((const __m128i *) (x->qs + 16*(g & 1)));
    const __m128i sh = g < 2 ? qs : _mm_srli_epi16(qs, 4);
    return _mm_and_si128(sh, _mm_set1_epi8(15));
}

// Centroid values of 8 byte indices: a register lookup (8 entries; 16 entries take two and a blend).
__attribute__((target("avx2,fma")))
static inline __m256 tq_avx2_lookup8(__m128i idx8, __m256 c_lo, __m256 c_hi, int wide) {
    const __m256i i32 = _mm256_cvtepu8_epi32(idx8);
    const __m256 v_lo = _mm256_permutevar8x32_ps(c_lo, i32);
    if (!wide) {
        return v_lo;
    }
    const __m256 v_hi = _mm256_permutevar8x32_ps(c_hi, i32);
    const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(i32, 28)); // bit 3 -> sign bit
    return _mm256_blendv_ps(v_lo, v_hi, sel);
}

__attribute__((target("avx2,fma")))
static float tq_vec_dot_mse_avx2(enum ggml_type type, int n, const void * x, const block_tq_q * q) {
    const float * c = tq_type_centroids(type);
    const int ncent = type == GGML_TYPE_TQ2 ? 4 : type == GGML_TYPE_TQ3 ? 8 : 16;
    float ctab[16] = {0};
    memcpy(ctab, c, ncent*sizeof(float));
    const __m256 c_lo = _mm256_loadu_ps(ctab);
    const __m256 c_hi = _mm256_loadu_ps(ctab + 8);
    const int wide = ncent == 16;
    __m256 total = _mm256_setzero_ps();
    for (int b = 0; b < n / QK_TQ; ++b) {
        __m256 acc0 = _mm256_setzero_ps();
        __m256 acc1 = _mm256_setzero_ps();
        float d = 0.0f;
        for (int g = 0; g < 4; ++g) {
            const __m128i idx = tq_avx2_idx16(type, x, b, g, &d);
            const __m256 v0 = tq_avx2_lookup8(idx, c_lo, c_hi, wide);
            const __m256 v1 = tq_avx2_lookup8(_mm_unpackhi_epi64(idx, idx), c_lo, c_hi, wide);
            acc0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(q[b].y + 16*g), acc0);
            acc1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(q[b].y + 16*g + 8), acc1);
        }
        total = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_add_ps(acc0, acc1), total);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma")))
static void tq_mad_rows_mse_avx2(enum ggml_type type, int64_t n, float * acc, const char * x, size_t stride, int count, float scale) {
    const float * c = tq_type_centroids(type);
    const int ncent = type == GGML_TYPE_TQ2 ? 4 : type == GGML_TYPE_TQ3 ? 8 : 16;
    float ctab[16] = {0};
    memcpy(ctab, c, ncent*sizeof(float));
    const __m256 c_lo = _mm256_loadu_ps(ctab);
    const __m256 c_hi = _mm256_loadu_ps(ctab + 8);
    const int wide = ncent == 16;
    for (int r = 0; r < count; ++r) {
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            float d = 0.0f;
            __m128i idx[4];
            for (int g = 0; g < 4; ++g) {
                idx[g] = tq_avx2_idx16(type, x + r*stride, b, g, &d);
            }
            const __m256 ds = _mm256_set1_ps(d * scale);
            float * a = acc + r*n + b*QK_TQ;
            for (int g = 0; g < 4; ++g) {
                const __m256 v0 = tq_avx2_lookup8(idx[g], c_lo, c_hi, wide);
                const __m256 v1 = tq_avx2_lookup8(_mm_unpackhi_epi64(idx[g], idx[g]), c_lo, c_hi, wide);
                _mm256_storeu_ps(a + 16*g,     _mm256_fmadd_ps(ds, v0, _mm256_loadu_ps(a + 16*g)));
                _mm256_storeu_ps(a + 16*g + 8, _mm256_fmadd_ps(ds, v1, _mm256_loadu_ps(a + 16*g + 8)));
            }
        }
    }
}

// The inverse rotation of an accumulator row: FWHT stages with h >= 8 are whole-register
// butterflies; h = 1, 2, 4 happen inside each register.
__attribute__((target("avx2,fma")))
static inline __m256 tq_avx2_fwht8(__m256 v) {
    const __m256 neg1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, (int) 0x80000000, 0, (int) 0x80000000, 0, (int) 0x80000000, 0, (int) 0x80000000));
    const __m256 neg2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, (int) 0x80000000, (int) 0x80000000, 0, 0, (int) 0x80000000, (int) 0x80000000));
    const __m256 neg4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, (int) 0x80000000, (int) 0x80000000, (int) 0x80000000, (int) 0x80000000));
    // h = 1: (a, b) -> (a + b, a - b) computed as swap(v) + (v with odd lanes negated)... written
    // as p + (q xor sign) with p = pairs' first element broadcast, q = second.
    __m256 p = _mm256_permute_ps(v, 0xA0);           // a a c c ...
    __m256 s = _mm256_permute_ps(v, 0xF5);           // b b d d ...
    v = _mm256_add_ps(p, _mm256_xor_ps(s, neg1));
    p = _mm256_permute_ps(v, 0x44);                  // x0 x1 x0 x1 | ...
    s = _mm256_permute_ps(v, 0xEE);                  // x2 x3 x2 x3 | ...
    v = _mm256_add_ps(p, _mm256_xor_ps(s, neg2));
    p = _mm256_permute2f128_ps(v, v, 0x00);
    s = _mm256_permute2f128_ps(v, v, 0x11);
    return _mm256_add_ps(p, _mm256_xor_ps(s, neg4));
}

__attribute__((target("avx2,fma")))
static void tq_unrotate_block_avx2(float * x) {
    const __m256 eighth = _mm256_set1_ps(0.125f);
    for (int r = TQ_ROTATION_ROUNDS - 1; r >= 0; --r) {
        __m256 v[8];
        for (int i = 0; i < 8; ++i) {
            v[i] = tq_avx2_fwht8(_mm256_loadu_ps(x + 8*i));
        }
        for (int h = 1; h < 8; h <<= 1) {
            for (int i = 0; i < 8; i += 2*h) {
                for (int j = i; j < i + h; ++j) {
                    const __m256 a = v[j];
                    const __m256 b = v[j + h];
                    v[j]     = _mm256_add_ps(a, b);
                    v[j + h] = _mm256_sub_ps(a, b);
                }
            }
        }
        const uint64_t signs = tq_rotation_signs[r];
        for (int i = 0; i < 8; ++i) {
            const uint32_t m = (uint32_t) (signs >> (8*i)) & 0xFF;
            const __m256i bits = _mm256_and_si256(_mm256_set1_epi32((int) m), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
            const __m256i flip = _mm256_slli_epi32(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()), 31);
            // flip has the sign bit where the sign bit is clear; we need it where set
            const __m256 sign = _mm256_xor_ps(_mm256_castsi256_ps(flip), _mm256_castsi256_ps(_mm256_set1_epi32((int) 0x80000000)));
            _mm256_storeu_ps(x + 8*i, _mm256_xor_ps(_mm256_mul_ps(v[i], eighth), sign));
        }
    }
}

// --- AVX-512 -------------------------------------------------------------------------------------
// The AVX2 path 16 lanes wide: one _mm512_permutexvar_ps looks up 16 centroids at once from the
// zero-padded 16-entry table (all three types); the indices come from the AVX2 helper above.
// Only AVX-512F instructions are used.
#define TQ_AVX512_TARGET __attribute__((target("avx512f,avx2,fma")))

TQ_AVX512_TARGET
static float tq_vec_dot_mse_avx512(enum ggml_type type, int n, const void * x, const block_tq_q * q) {
    float ctab[16];
    tq_centroid_table16(type, ctab);
    const __m512 c16 = _mm512_loadu_ps(ctab);
    __m512 total = _mm512_setzero_ps();
    for (int b = 0; b < n / QK_TQ; ++b) {
        __m512 acc = _mm512_setzero_ps();
        float d = 0.0f;
        for (int g = 0; g < 4; ++g) {
            const __m128i idx = tq_avx2_idx16(type, x, b, g, &d);
            const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(idx), c16);
            acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[b].y + 16*g), acc);
        }
        total = _mm512_fmadd_ps(_mm512_set1_ps(d), acc, total);
    }
    return _mm512_reduce_add_ps(total);
}

TQ_AVX512_TARGET
static void tq_mad_rows_mse_avx512(enum ggml_type type, int64_t n, float * acc, const char * x, size_t stride, int count, float scale) {
    float ctab[16];
    tq_centroid_table16(type, ctab);
    const __m512 c16 = _mm512_loadu_ps(ctab);
    for (int r = 0; r < count; ++r) {
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            float d = 0.0f;
            __m128i idx[4];
            for (int g = 0; g < 4; ++g) {
                idx[g] = tq_avx2_idx16(type, x + r*stride, b, g, &d);
            }
            const __m512 ds = _mm512_set1_ps(d * scale);
            float * a = acc + r*n + b*QK_TQ;
            for (int g = 0; g < 4; ++g) {
                const __m512 v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(idx[g]), c16);
                _mm512_storeu_ps(a + 16*g, _mm512_fmadd_ps(ds, v, _mm512_loadu_ps(a + 16*g)));
            }
        }
    }
}

// One FWHT stage inside a register: p holds each pair's first element, s its second (both
// broadcast over the pair); lanes in `minus` (the pairs' second halves) get p - s, the others p + s.
TQ_AVX512_TARGET
static inline __m512 tq_avx512_butterfly(__m512 p, __m512 s, __mmask16 minus) {
    return _mm512_mask_sub_ps(_mm512_add_ps(p, s), minus, p, s);
}

// FWHT stages h = 1, 2 (inside each 128-bit lane) and h = 4, 8 (across 128-bit lanes) of 16 values.
TQ_AVX512_TARGET
static inline __m512 tq_avx512_fwht16(__m512 v) {
    v = tq_avx512_butterfly(_mm512_permute_ps(v, 0xA0), _mm512_permute_ps(v, 0xF5), 0xAAAA);             // h = 1
    v = tq_avx512_butterfly(_mm512_permute_ps(v, 0x44), _mm512_permute_ps(v, 0xEE), 0xCCCC);             // h = 2
    v = tq_avx512_butterfly(_mm512_shuffle_f32x4(v, v, 0xA0), _mm512_shuffle_f32x4(v, v, 0xF5), 0xF0F0); // h = 4
    v = tq_avx512_butterfly(_mm512_shuffle_f32x4(v, v, 0x44), _mm512_shuffle_f32x4(v, v, 0xEE), 0xFF00); // h = 8
    return v;
}

TQ_AVX512_TARGET
static void tq_unrotate_block_avx512(float * x) {
    const __m512 eighth = _mm512_set1_ps(0.125f);
    const __m512i sign_bit = _mm512_set1_epi32((int) 0x80000000);
    for (int r = TQ_ROTATION_ROUNDS - 1; r >= 0; --r) {
        __m512 v[4];
        for (int i = 0; i < 4; ++i) {
            v[i] = tq_avx512_fwht16(_mm512_loadu_ps(x + 16*i));
        }
        // h = 16, 32: whole-register butterflies
        for (int h = 1; h < 4; h <<= 1) {
            for (int i = 0; i < 4; i += 2*h) {
                for (int j = i; j < i + h; ++j) {
                    const __m512 a = v[j];
                    const __m512 b = v[j + h];
                    v[j]     = _mm512_add_ps(a, b);
                    v[j + h] = _mm512_sub_ps(a, b);
                }
            }
        }
        const uint64_t signs = tq_rotation_signs[r];
        for (int i = 0; i < 4; ++i) {
            const __mmask16 neg = (__mmask16) (signs >> (16*i)); // elements 16i .. 16i+15
            const __m512i y = _mm512_castps_si512(_mm512_mul_ps(v[i], eighth));
            _mm512_storeu_ps(x + 16*i, _mm512_castsi512_ps(_mm512_mask_xor_epi32(y, neg, y, sign_bit)));
        }
    }
}

#endif // TQ_X86

// --- NEON (AArch64) ------------------------------------------------------------------------------
#if defined(TQ_NEON)

// 16 indices of one quarter (elements 16g .. 16g+15) as bytes: the same unpacking as
// tq_avx2_idx16 (vshlq by a negative count shifts right).
static inline uint8x16_t tq_neon_idx16(enum ggml_type type, const void * blocks, int64_t b, int g, float * d) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    if (type == GGML_TYPE_TQ2) {
        const block_tq2 * x = (const block_tq2 *) blocks + b;
        *d = GGML_FP16_TO_FP32(x->d);
        return vandq_u8(vshlq_u8(vld1q_u8(x->qs), vdupq_n_s8((int8_t) (-2*g))), m3);
    }
    if (type == GGML_TYPE_TQ3) {
        const block_tq3 * x = (const block_tq3 *) blocks + b;
        *d = GGML_FP16_TO_FP32(x->d);
        const uint8x16_t lo = vandq_u8(vshlq_u8(vld1q_u8(x->qs), vdupq_n_s8((int8_t) (-2*g))), m3);
        const uint8x8_t qh = vld1_u8(x->qh);
        // bytes 0..7: qh >> 2g, bytes 8..15: qh >> (2g+1)
        const uint8x16_t hi = vcombine_u8(vshl_u8(qh, vdup_n_s8((int8_t) (-2*g))), vshl_u8(qh, vdup_n_s8((int8_t) (-2*g - 1))));
        return vorrq_u8(lo, vshlq_n_u8(vandq_u8(hi, vdupq_n_u8(1)), 2));
    }
    // tq4: elements 16g..16g+15 are bytes (16g mod 32).., low nibble for g < 2
    const block_tq4 * x = (const block_tq4 *) blocks + b;
    *d = GGML_FP16_TO_FP32(x->d);
    const uint8x16_t qs = vld1q_u8(x->qs + 16*(g & 1));
    const uint8x16_t sh = g < 2 ? qs : vshrq_n_u8(qs, 4);
    return vandq_u8(sh, vdupq_n_u8(15));
}

// The 16-entry centroid table as 64 bytes, for vqtbl4q_u8.
static inline uint8x16x4_t tq_neon_table(enum ggml_type type) {
    float ctab[16];
    tq_centroid_table16(type, ctab);
    uint8x16x4_t tab;
    for (int k = 0; k < 4; ++k) {
        tab.val[k] = vld1q_u8((const uint8_t *) ctab + 16*k);
    }
    return tab;
}

// Centroid values of 16 byte indices, as 4 registers of 4 floats: index i of a 32-bit lane becomes
// the byte indices 4i, 4i+1, 4i+2, 4i+3 (i * 0x04040404 + 0x03020100) of its float in the table.
static inline void tq_neon_lookup16(uint8x16x4_t tab, uint8x16_t idx, float32x4_t * v) {
    const uint16x8_t i16[2] = { vmovl_u8(vget_low_u8(idx)), vmovl_u8(vget_high_u8(idx)) };
    for (int k = 0; k < 4; ++k) {
        const uint32x4_t i32 = vmovl_u16(k % 2 == 0 ? vget_low_u16(i16[k / 2]) : vget_high_u16(i16[k / 2]));
        const uint32x4_t bytes = vmlaq_n_u32(vdupq_n_u32(0x03020100u), i32, 0x04040404u);
        v[k] = vreinterpretq_f32_u8(vqtbl4q_u8(tab, vreinterpretq_u8_u32(bytes)));
    }
}

static float tq_vec_dot_mse_neon(enum ggml_type type, int n, const void * x, const block_tq_q * q) {
    const uint8x16x4_t tab = tq_neon_table(type);
    float32x4_t total = vdupq_n_f32(0.0f);
    for (int b = 0; b < n / QK_TQ; ++b) {
        float32x4_t acc[4];
        for (int k = 0; k < 4; ++k) {
            acc[k] = vdupq_n_f32(0.0f);
        }
        float d = 0.0f;
        for (int g = 0; g < 4; ++g) {
            float32x4_t v[4];
            tq_neon_lookup16(tab, tq_neon_idx16(type, x, b, g, &d), v);
            for (int k = 0; k < 4; ++k) {
                acc[k] = vfmaq_f32(acc[k], v[k], vld1q_f32(q[b].y + 16*g + 4*k));
            }
        }
        const float32x4_t s = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        total = vfmaq_n_f32(total, s, d);
    }
    return vaddvq_f32(total);
}

static void tq_mad_rows_mse_neon(enum ggml_type type, int64_t n, float * acc, const char * x, size_t stride, int count, float scale) {
    const uint8x16x4_t tab = tq_neon_table(type);
    for (int r = 0; r < count; ++r) {
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            float d = 0.0f;
            uint8x16_t idx[4];
            for (int g = 0; g < 4; ++g) {
                idx[g] = tq_neon_idx16(type, x + r*stride, b, g, &d);
            }
            const float ds = d * scale;
            for (int g = 0; g < 4; ++g) {
                float32x4_t v[4];
                tq_neon_lookup16(tab, idx[g], v);
                for (int k = 0; k < 4; ++k) {
                    float * a = acc + r*n + b*QK_TQ + 16*g + 4*k;
                    vst1q_f32(a, vfmaq_n_f32(vld1q_f32(a), v[k], ds));
                }
            }
        }
    }
}

// FWHT stages h = 1, 2 of 4 values: (x0, x1, x2, x3) -> (x0 + x1, x0 - x1, x2 + x3, x2 - x3), then
// (y0, y1, y2, y3) -> (y0 + y2, y1 + y3, y0 - y2, y1 - y3).
static inline float32x4_t tq_neon_fwht4(float32x4_t v) {
    const float32x4_t p = vtrn1q_f32(v, v); // x0 x0 x2 x2
    const float32x4_t s = vtrn2q_f32(v, v); // x1 x1 x3 x3
    v = vtrn1q_f32(vaddq_f32(p, s), vsubq_f32(p, s));
    const float32x2_t lo = vget_low_f32(v);
    const float32x2_t hi = vget_high_f32(v);
    return vcombine_f32(vadd_f32(lo, hi), vsub_f32(lo, hi));
}

static void tq_unrotate_block_neon(float * x) {
    static const uint32_t lane_bit[4] = { 1, 2, 4, 8 };
    const uint32x4_t bit = vld1q_u32(lane_bit);
    const uint32x4_t sign_bit = vdupq_n_u32(0x80000000u);
    const float32x4_t eighth = vdupq_n_f32(0.125f);
    for (int r = TQ_ROTATION_ROUNDS - 1; r >= 0; --r) {
        float32x4_t v[16];
        for (int i = 0; i < 16; ++i) {
            v[i] = tq_neon_fwht4(vld1q_f32(x + 4*i));
        }
        // h = 4 .. 32: whole-register butterflies
        for (int h = 1; h < 16; h <<= 1) {
            for (int i = 0; i < 16; i += 2*h) {
                for (int j = i; j < i + h; ++j) {
                    const float32x4_t a = v[j];
                    const float32x4_t b = v[j + h];
                    v[j]     = vaddq_f32(a, b);
                    v[j + h] = vsubq_f32(a, b);
                }
            }
        }
        const uint64_t signs = tq_rotation_signs[r];
        for (int i = 0; i < 16; ++i) {
            const uint32_t m = (uint32_t) (signs >> (4*i)) & 0xF; // elements 4i .. 4i+3
            const uint32x4_t neg = vandq_u32(vtstq_u32(vdupq_n_u32(m), bit), sign_bit);
            const uint32x4_t y = vreinterpretq_u32_f32(vmulq_f32(v[i], eighth));
            vst1q_f32(x + 4*i, vreinterpretq_f32_u32(veorq_u32(y, neg)));
        }
    }
}

#endif // TQ_NEON

// --- tq3c: calibrated key coefficients --------------------------------------------------------------
// A faster copy of dequantize_row_tq3c (the same g * centroid products): each position's index
// (at most 7 bits at a shift of at most 7) is read from a 16-bit window of the zero-padded bit
// stream, instead of bit by bit.

// Where position j's index starts in the stream (byte, shift), its mask and its codebook's place in
// one table of all codebooks (a 0-bit position reads the 0.0f at 254); built once from tq3c_profile.
// 32-bit fields: the AVX2 decoder loads eight of each into a register.
// The AVX2 decoder reads a group of eight positions from one 64-bit window of the block's own bytes (a
// group's bits and shift fit: at most 44 + 7 with the profile of tq-codebooks.h; a window that would
// run past the stream starts 8 bytes before its end instead; both asserted when the table is built)
// and picks the centroids of groups of at most 3 bits a position from registers. Why not a
// zero-padded copy of the block: the windows' loads across its stores stall store-to-load forwarding
// (measured: the decoder took 1.6x tq3's decode time with the copy, 1.4x without).
typedef struct {
    int32_t byte32[QK_TQ], shift32[QK_TQ], mask32[QK_TQ], base32[QK_TQ];
    float all[256];                    // codebook b at 2^b - 2 (b = 1..7), 0.0f at 254
    int32_t group_byte[QK_TQ/8];       // the first byte of group g's window (at most sizeof(qs) - 8)
    int64_t wshift64[QK_TQ], mask64[QK_TQ];   // position j's shift in its group's window, its mask
    int32_t group_small[QK_TQ/8];      // 1: every position of group g has at most 3 bits
    int32_t small_base[QK_TQ];         // where position j's codebook starts in small (<= 3 bits)
    float small[16];                   // the 3-, 2- and 1-bit codebooks at 0, 8, 12, then 0.0f at 14
} tq3c_positions;

static const float * const tq3c_codebooks[TQ3C_MAX_BITS + 1] = {
    NULL, tq_gauss_centroids_1, tq_gauss_centroids_2, tq_gauss_centroids_3, tq_gauss_centroids_4,
    tq_gauss_centroids_5, tq_gauss_centroids_6, tq_gauss_centroids_7,
};

static const tq3c_positions * tq3c_position_table(void) {
    // racing threads build the same table; the flag is published after it (release/acquire where the
    // compiler has the builtins; elsewhere x86's store order and volatile)
    static tq3c_positions t;
    static volatile int ready = 0;
#if defined(__GNUC__)
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
#else
    if (!ready) {
#endif
        int off = 0;
        for (int b = 1; b <= TQ3C_MAX_BITS; ++b) {
            memcpy(t.all + (1 << b) - 2, tq3c_codebooks[b], sizeof(float) << b);
        }
        t.all[254] = t.all[255] = 0.0f;
        for (int j = 0; j < QK_TQ; ++j) {
            const int bits = tq3c_profile[j];
            t.byte32[j] = off / 8;
            t.shift32[j] = off % 8;
            t.mask32[j] = (1 << bits) - 1;
            t.base32[j] = bits ? (1 << bits) - 2 : 254;
            off += bits;
        }
        for (int g = 0; g < QK_TQ/8; ++g) {
            const int last = (int) sizeof(((const block_tq3c *) 0)->qs) - 8;
            t.group_byte[g] = t.byte32[8*g] < last ? t.byte32[8*g] : last;
            t.group_small[g] = 1;
            for (int j = 8*g; j < 8*g + 8; ++j) {
                const int bits = tq3c_profile[j];
                t.wshift64[j] = 8*(t.byte32[j] - t.group_byte[g]) + t.shift32[j];
                t.mask64[j] = t.mask32[j];
                t.group_small[g] &= bits <= 3;
                t.small_base[j] = bits == 3 ? 0 : bits == 2 ? 8 : bits == 1 ? 12 : 14;
                assert(t.wshift64[j] >= 0 && t.wshift64[j] + bits <= 64);
            }
        }
        memcpy(t.small, tq_gauss_centroids_3, 8*sizeof(float));
        memcpy(t.small + 8, tq_gauss_centroids_2, 4*sizeof(float));
        memcpy(t.small + 12, tq_gauss_centroids_1, 2*sizeof(float));
        t.small[14] = t.small[15] = 0.0f;
#if defined(__GNUC__)
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
#else
        ready = 1;
#endif
    }
    return &t;
}

static inline void tq3c_decode_block(const tq3c_positions * t, const block_tq3c * blk, float * y) {
    if (blk->d & 0x8000) {   // a tq3 block (a few in a thousand): the reference
        dequantize_row_tq3c(blk, y, QK_TQ);
        return;
    }
    uint8_t qs[sizeof(blk->qs) + 1] = { 0 };
    memcpy(qs, blk->qs, sizeof(blk->qs));
    const float g = GGML_FP16_TO_FP32(blk->d);
    for (int j = 0; j < QK_TQ; ++j) {
        const uint32_t w = (uint32_t) qs[t->byte32[j]] | ((uint32_t) qs[t->byte32[j] + 1] << 8);
        y[j] = g * t->all[t->base32[j] + (int32_t) ((w >> t->shift32[j]) & (uint32_t) t->mask32[j])];
    }
}

static void tq3c_decode_rows_scalar(int64_t n, const void * x, size_t stride, int count, float * out) {
    const tq3c_positions * t = tq3c_position_table();
    for (int r = 0; r < count; ++r) {
        const block_tq3c * row = (const block_tq3c *) ((const char *) x + r*stride);
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            tq3c_decode_block(t, row + b, out + r*n + b*QK_TQ);
        }
    }
}

#if defined(TQ_X86) && defined(__GNUC__)
// Eight positions at a time: one 64-bit window of the block broadcast, shifted and masked per lane,
// the lanes packed to eight indices; the centroids picked from one 16-entry table in two registers
// where the group has at most 3 bits a position (40 of 64 positions), else gathered from the table of
// all codebooks; then the same g * c products (a 0-bit position: g * 0.0f, as in the reference).
__attribute__((target("avx2,fma")))
static void tq3c_decode_rows_avx2(int64_t n, const void * x, size_t stride, int count, float * out) {
    const tq3c_positions * t = tq3c_position_table();
    const __m256i pack = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 small_lo = _mm256_loadu_ps(t->small), small_hi = _mm256_loadu_ps(t->small + 8);
    for (int r = 0; r < count; ++r) {
        const block_tq3c * row = (const block_tq3c *) ((const char *) x + r*stride);
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            const block_tq3c * blk = row + b;
            float * y = out + r*n + b*QK_TQ;
            if (blk->d & 0x8000) {
                dequantize_row_tq3c(blk, y, QK_TQ);
                continue;
            }
            const __m256 g = _mm256_set1_ps(GGML_FP16_TO_FP32(blk->d));
            for (int j = 0; j < QK_TQ; j += 8) {
                uint64_t w;
                memcpy(&w, blk->qs + t->group_byte[j/8], sizeof(w));
                const __m256i wv = _mm256_set1_epi64x((long long) w);
                const __m256i lo = _mm256_and_si256(_mm256_srlv_epi64(wv, _mm256_loadu_si256((const __m256i *) (t->wshift64 + j))),
                                                    _mm256_loadu_si256((const __m256i *) (t->mask64 + j)));
                const __m256i hi = _mm256_and_si256(_mm256_srlv_epi64(wv, _mm256_loadu_si256((const __m256i *) (t->wshift64 + j + 4))),
                                                    _mm256_loadu_si256((const __m256i *) (t->mask64 + j + 4)));
                const __m256i idx = _mm256_permutevar8x32_epi32(_mm256_or_si256(lo, _mm256_slli_epi64(hi, 32)), pack);
                __m256 c;
                if (t->group_small[j/8]) {
                    // one 16-entry table: bit 3 of the position in it picks the upper half
                    const __m256i k = _mm256_add_epi32(idx, _mm256_loadu_si256((const __m256i *) (t->small_base + j)));
                    c = _mm256_blendv_ps(_mm256_permutevar8x32_ps(small_lo, k), _mm256_permutevar8x32_ps(small_hi, k),
                                         _mm256_castsi256_ps(_mm256_slli_epi32(k, 28)));
                } else {
                    c = _mm256_i32gather_ps(t->all, _mm256_add_epi32(idx, _mm256_loadu_si256((const __m256i *) (t->base32 + j))), 4);
                }
                _mm256_storeu_ps(y + j, _mm256_mul_ps(g, c));
            }
        }
    }
}
#endif

// --- tq2o, tq3o: outlier-split key coefficients ------------------------------------------------------
// A faster copy of tq_split_dequantize_row (the same d * centroid products): each index (at most 5 bits
// at a shift of at most 7) read from a 16-bit window of the block's index bits, copied with a zero byte
// after them so that the last window stays inside.

static inline void tq_split_decode_block(const tq_split_layout * l, const uint8_t * blk, float * y) {
    uint8_t qs[32] = { 0 };   // the largest split block's 28 index bytes and the window's zero byte
    memcpy(qs, blk + 2*sizeof(ggml_fp16_t), l->size - 2*sizeof(ggml_fp16_t));
    int off = 0;
    for (int g = 0; g < 2; ++g) {
        ggml_fp16_t d;
        memcpy(&d, blk + g*sizeof(d), sizeof(d));
        const float n = GGML_FP16_TO_FP32(d);
        const int bits = l->bits[g];
        const uint32_t mask = (1u << bits) - 1;
        const float * c = l->centroids[g];
        for (int j = g == 0 ? 0 : TQ_SPLIT_HI; j < (g == 0 ? TQ_SPLIT_HI : QK_TQ); ++j, off += bits) {
            const uint32_t w = (uint32_t) qs[off >> 3] | ((uint32_t) qs[(off >> 3) + 1] << 8);
            y[j] = n * c[(w >> (off & 7)) & mask];
        }
    }
}

static void tq_split_decode_rows_scalar(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out) {
    const tq_split_layout l = tq_split_layout_of(type);
    for (int r = 0; r < count; ++r) {
        const uint8_t * row = (const uint8_t *) x + r*stride;
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            tq_split_decode_block(&l, row + b*l.size, out + r*n + b*QK_TQ);
        }
    }
}

#if defined(TQ_X86) && defined(__GNUC__)
// The same 16-bit windows, eight at a time. Eight consecutive positions share a group (16 and 48 are
// multiples of 8), so their indices lie in at most 5 bytes: the eight take one 64-bit window of the
// block's own bytes, byte shuffles put each position's two window bytes in its 32-bit lane, and a
// per-lane shift and the group's mask leave the index. A window that would run past the block starts
// 8 bytes before its end instead (the shuffle reaches further into it; a byte past the window reads as
// zero, the scalar decoder's zero byte). Centroids come from registers: 2- and 3-bit codebooks from one,
// 4 bits from two and a blend, 5 bits from four and three blends (no gather, no table in memory).
typedef struct {
    int32_t window[QK_TQ/8];           // eight e's window: its first byte in the block (at most size - 8)
    uint8_t bytes[QK_TQ/8][32];        // eight e's shuffle: lane i = its window bytes k, k + 1 (0x80: zero)
    int32_t shift[QK_TQ/8][8];         // position 8e + i's index in lane i starts at this bit
    float   centroids[2][32];          // group g's codebook, zero-padded
} tq_split_windows;

// Both types' windows (tq2o at 0, tq3o at 1), built once from tq_split_layout_of.
static const tq_split_windows * tq_split_window_table(enum ggml_type type) {
    // racing threads build the same tables; the flag is published after them, as tq3c's
    static tq_split_windows t[2];
    static volatile int ready = 0;
    if (!__atomic_load_n(&ready, __ATOMIC_ACQUIRE)) {
        for (int k = 0; k < 2; ++k) {
            const tq_split_layout l = tq_split_layout_of(k == 0 ? GGML_TYPE_TQ2O : GGML_TYPE_TQ3O);
            const int qs0 = 2*sizeof(ggml_fp16_t);   // the index bits' first byte in the block
            // no memset: a racing builder must write only the values already there (the padding is static zeros)
            tq_split_windows * w = &t[k];
            for (int g = 0; g < 2; ++g) {
                memcpy(w->centroids[g], l.centroids[g], sizeof(float) << l.bits[g]);
            }
            int off = 0;
            for (int e = 0; e < QK_TQ/8; ++e) {
                const int bits = l.bits[8*e < TQ_SPLIT_HI ? 0 : 1];
                const int first = qs0 + off/8;
                const int window = first < (int) l.size - 8 ? first : (int) l.size - 8;
                w->window[e] = window;
                for (int i = 0; i < 8; ++i, off += bits) {
                    const int k0 = qs0 + off/8 - window;   // the lane's first byte in the window
                    assert(k0 >= 0 && 8*k0 + off%8 + bits <= 64);
                    w->bytes[e][4*i]     = (uint8_t) k0;
                    w->bytes[e][4*i + 1] = k0 + 1 < 8 ? (uint8_t) (k0 + 1) : 0x80;
                    w->bytes[e][4*i + 2] = w->bytes[e][4*i + 3] = 0x80;
                    w->shift[e][i] = off % 8;
                }
            }
            assert(off == 16*l.bits[0] + 48*l.bits[1]);
        }
        __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
    }
    return &t[type == GGML_TYPE_TQ3O];
}

// Centroids of eight indices of a `bits`-bit codebook held in c[0..3] (entries 8k .. 8k + 7 in c[k]):
// permutes take the index's low 3 bits; bits 3 and 4, moved to the sign bit, pick among them.
__attribute__((target("avx2,fma")))
static inline __m256 tq_avx2_lookup32(__m256i idx, const __m256 * c, int bits) {
    const __m256 v0 = _mm256_permutevar8x32_ps(c[0], idx);
    if (bits <= 3) {
        return v0;
    }
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    const __m256 v01 = _mm256_blendv_ps(v0, _mm256_permutevar8x32_ps(c[1], idx), bit3);
    if (bits == 4) {
        return v01;
    }
    const __m256 v23 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c[2], idx), _mm256_permutevar8x32_ps(c[3], idx), bit3);
    return _mm256_blendv_ps(v01, v23, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
}

// The indices of eight e of a block, as 32-bit lanes.
__attribute__((target("avx2,fma")))
static inline __m256i tq_split_avx2_idx8(const tq_split_windows * t, const uint8_t * blk, int e, __m256i mask) {
    uint64_t w;
    memcpy(&w, blk + t->window[e], sizeof(w));
    const __m256i lanes = _mm256_shuffle_epi8(_mm256_set1_epi64x((long long) w), _mm256_loadu_si256((const __m256i *) t->bytes[e]));
    return _mm256_and_si256(_mm256_srlv_epi32(lanes, _mm256_loadu_si256((const __m256i *) t->shift[e])), mask);
}

// bits_hi, bits_lo: the type's (constants where it is inlined, so the lookups lose their branches)
__attribute__((target("avx2,fma"), always_inline))
static inline void tq_split_decode_rows_avx2_bits(const tq_split_windows * t, size_t size, int bits_hi, int bits_lo,
                                                  int64_t n, const void * x, size_t stride, int count, float * out) {
    __m256 c_hi[4], c_lo[4];
    for (int k = 0; k < 4; ++k) {
        c_hi[k] = _mm256_loadu_ps(t->centroids[0] + 8*k);
        c_lo[k] = _mm256_loadu_ps(t->centroids[1] + 8*k);
    }
    const __m256i mask_hi = _mm256_set1_epi32((1 << bits_hi) - 1), mask_lo = _mm256_set1_epi32((1 << bits_lo) - 1);
    for (int r = 0; r < count; ++r) {
        const uint8_t * row = (const uint8_t *) x + r*stride;
        for (int64_t b = 0; b < n / QK_TQ; ++b) {
            const uint8_t * blk = row + b*size;
            float * y = out + r*n + b*QK_TQ;
            ggml_fp16_t d[2];
            memcpy(d, blk, sizeof(d));
            const __m256 n_hi = _mm256_set1_ps(GGML_FP16_TO_FP32(d[0])), n_lo = _mm256_set1_ps(GGML_FP16_TO_FP32(d[1]));
            for (int e = 0; e < TQ_SPLIT_HI/8; ++e) {
                const __m256 c = tq_avx2_lookup32(tq_split_avx2_idx8(t, blk, e, mask_hi), c_hi, bits_hi);
                _mm256_storeu_ps(y + 8*e, _mm256_mul_ps(n_hi, c));
            }
            for (int e = TQ_SPLIT_HI/8; e < QK_TQ/8; ++e) {
                const __m256 c = tq_avx2_lookup32(tq_split_avx2_idx8(t, blk, e, mask_lo), c_lo, bits_lo);
                _mm256_storeu_ps(y + 8*e, _mm256_mul_ps(n_lo, c));
            }
        }
    }
}

__attribute__((target("avx2,fma")))
static void tq_split_decode_rows_avx2(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out) {
    const tq_split_windows * t = tq_split_window_table(type);
    if (type == GGML_TYPE_TQ2O) {
        tq_split_decode_rows_avx2_bits(t, sizeof(block_tq2o), 4, 2, n, x, stride, count, out);
    } else {
        tq_split_decode_rows_avx2_bits(t, sizeof(block_tq3o), 5, 3, n, x, stride, count, out);
    }
}
#endif

// --- dispatch: one table of kernels per level, the level chosen once ---------------------------------

typedef struct {
    const char * name;
    // MSE types only (the _qjl types take the scalar level's, the reference)
    float (*vec_dot)(enum ggml_type type, int n, const void * x, const block_tq_q * q);
    void  (*mad_rows)(enum ggml_type type, int64_t n, float * acc, const char * x, size_t stride, int count, float scale);
    void  (*unrotate_block)(float * x);
    // calibrated keys: rows decoded to calibrated coefficients (tq3c; tq2o and tq3o)
    void  (*decode_tq3c)(int64_t n, const void * x, size_t stride, int count, float * out);
    void  (*decode_split)(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out);
} tq_simd_kernels;

static const tq_simd_kernels tq_levels[] = {
    { "scalar", tq_vec_dot_scalar, tq_mad_rows_scalar, tq_unrotate_block, tq3c_decode_rows_scalar, tq_split_decode_rows_scalar },
#if defined(TQ_X86) && defined(__GNUC__)
    { "avx2",   tq_vec_dot_mse_avx2,   tq_mad_rows_mse_avx2,   tq_unrotate_block_avx2,   tq3c_decode_rows_avx2,   tq_split_decode_rows_avx2 },
    { "avx512", tq_vec_dot_mse_avx512, tq_mad_rows_mse_avx512, tq_unrotate_block_avx512, tq3c_decode_rows_avx2,   tq_split_decode_rows_avx2 },
#elif defined(TQ_NEON)
    { "neon",   tq_vec_dot_mse_neon,   tq_mad_rows_mse_neon,   tq_unrotate_block_neon,   tq3c_decode_rows_scalar, tq_split_decode_rows_scalar },
#endif
};

static int tq_simd_supported(void) {
#if defined(TQ_X86) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return __builtin_cpu_supports("avx512f") ? TQ_SIMD_AVX512 : TQ_SIMD_AVX2;
    }
#elif defined(TQ_NEON)
    return TQ_SIMD_NEON;
#endif
    return TQ_SIMD_SCALAR;
}

// The cap that TQ_CPU_SIMD names (a name caps at its level number; NULL or a name this build does
// not know caps nothing).
static int tq_simd_cap(const char * name) {
    if (name == NULL)                return TQ_SIMD_AVX512;
    if (strcmp(name, "scalar") == 0) return TQ_SIMD_SCALAR;
    if (strcmp(name, "avx2") == 0)   return TQ_SIMD_AVX2;
    if (strcmp(name, "neon") == 0)   return TQ_SIMD_NEON;
    return TQ_SIMD_AVX512;
}

// The level in use; -1 until chosen. One int, written whole: threads that race to choose it choose
// the same level.
static volatile int tq_simd_level = -1;

int tq_cpu_set_simd_level(int level) {
    const int supported = tq_simd_supported();
    level = level < 0 ? 0 : level < supported ? level : supported;
    tq_simd_level = level;
    return level;
}

static const tq_simd_kernels * tq_kernels(void) {
    int level = tq_simd_level;
    if (level < 0) {
        level = tq_cpu_set_simd_level(tq_simd_cap(tq_knobs()->cpu_simd));
    }
    return &tq_levels[level];
}

// The kernels of a type: the level's for the MSE types, the reference for the _qjl types.
static const tq_simd_kernels * tq_kernels_for(enum ggml_type type) {
    return tq_is_qjl_type(type) ? &tq_levels[TQ_SIMD_SCALAR] : tq_kernels();
}

const char * tq_cpu_simd_name(void) {
    return tq_kernels()->name;
}

// --- entry points --------------------------------------------------------------------------------

#define TQ_VEC_DOT(name, type)                                                                          \
    void tq_cpu_vec_dot_##name(int n, float * s, size_t bs, const void * x, size_t bx, const void * y,  \
                               size_t by, int nrc) {                                                    \
        assert(nrc == 1);                                                                               \
        (void) bs; (void) bx; (void) by; (void) nrc;                                                    \
        *s = tq_kernels_for(type)->vec_dot(type, n, x, (const block_tq_q *) y);                         \
    }

TQ_VEC_DOT(tq2, GGML_TYPE_TQ2)
TQ_VEC_DOT(tq3, GGML_TYPE_TQ3)
TQ_VEC_DOT(tq4, GGML_TYPE_TQ4)
TQ_VEC_DOT(tq2_qjl, GGML_TYPE_TQ2_QJL)
TQ_VEC_DOT(tq3_qjl, GGML_TYPE_TQ3_QJL)
TQ_VEC_DOT(tq4_qjl, GGML_TYPE_TQ4_QJL)

void tq_cpu_decode_rows_tq3c(int64_t n, const void * x, size_t stride, int count, float * out) {
    tq_kernels()->decode_tq3c(n, x, stride, count, out);
}

void tq_cpu_decode_rows_calibrated(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out) {
    if (type == GGML_TYPE_TQ3C) {
        tq_cpu_decode_rows_tq3c(n, x, stride, count, out);
    } else {
        tq_kernels()->decode_split(type, n, x, stride, count, out);
    }
}

// The level's decoder, block by block, then one sum for every level: each level's blocks decode to
// the same floats, so each level returns the same bits.
static void tq_split_vec_dot(enum ggml_type type, int n, float * s, const void * x, const void * y) {
    assert(n % QK_TQ == 0);
    void (*decode)(enum ggml_type, int64_t, const void *, size_t, int, float *) = tq_kernels()->decode_split;
    const size_t size = tq_split_layout_of(type).size;
    const float * q = (const float *) y;
    float z[QK_TQ];
    float acc[8] = { 0 };
    for (int b = 0; b < n / QK_TQ; ++b) {
        decode(type, QK_TQ, (const uint8_t *) x + b*size, 0, 1, z);
        for (int j = 0; j < QK_TQ; j += 8) {
            for (int i = 0; i < 8; ++i) {
                acc[i] += z[j + i]*q[b*QK_TQ + j + i];
            }
        }
    }
    *s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void tq_cpu_vec_dot_tq2o(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc) {
    assert(nrc == 1);
    (void) bs; (void) bx; (void) by; (void) nrc;
    tq_split_vec_dot(GGML_TYPE_TQ2O, n, s, x, y);
}

void tq_cpu_vec_dot_tq3o(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc) {
    assert(nrc == 1);
    (void) bs; (void) bx; (void) by; (void) nrc;
    tq_split_vec_dot(GGML_TYPE_TQ3O, n, s, x, y);
}

void tq_cpu_vec_dot_tq3c(int n, float * s, size_t bs, const void * x, size_t bx, const void * y, size_t by, int nrc) {
    assert(nrc == 1 && n % QK_TQ == 0);
    (void) bs; (void) bx; (void) by; (void) nrc;
    const tq3c_positions * t = tq3c_position_table();
    const float * q = (const float *) y;
    float z[QK_TQ];
    float acc[8] = { 0 };
    for (int b = 0; b < n / QK_TQ; ++b) {
        tq3c_decode_block(t, (const block_tq3c *) x + b, z);
        for (int j = 0; j < QK_TQ; j += 8) {
            for (int l = 0; l < 8; ++l) {
                acc[l] += z[j + l]*q[b*QK_TQ + j + l];
            }
        }
    }
    *s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void tq_cpu_mad_rotated(enum ggml_type type, int64_t n, float * acc, const void * x, float scale) {
    tq_kernels_for(type)->mad_rows(type, n, acc, (const char *) x, 0, 1, scale);
}

void tq_cpu_decode_rows_rotated(enum ggml_type type, int64_t n, const void * x, size_t stride, int count, float * out) {
    memset(out, 0, count*n*sizeof(float));
    tq_kernels_for(type)->mad_rows(type, n, out, (const char *) x, stride, count, 1.0f);
}

// y = x rotated block by block (a float32 row joining the rotated domain)
static void tq_rotated_copy(float * y, const float * x, int64_t n) {
    memcpy(y, x, n*sizeof(float));
    for (int64_t b = 0; b < n / QK_TQ; ++b) {
        tq_rotate_block(y + b*QK_TQ);
    }
}

void tq_cpu_mad_f32_rotated(int64_t n, float * acc, const float * x, float * tmp, float scale) {
    tq_rotated_copy(tmp, x, n);
    for (int64_t j = 0; j < n; ++j) {
        acc[j] += scale * tmp[j];
    }
}

void tq_cpu_unrotate_row(float * x, int64_t n) {
    void (*unrotate_block)(float *) = tq_kernels()->unrotate_block;
    for (int64_t b = 0; b < n / QK_TQ; ++b) {
        unrotate_block(x + b*QK_TQ);
    }
}

// --- flash attention over several query rows at once ---------------------------------------------

// exp(x) for the softmax's x = s - max <= 0 (and NaN, which it keeps): 2^k e^r with k = round(x log2 e)
// and a degree-6 Taylor polynomial on |r| <= ln(2)/2 (relative error below 2e-7). Branch-free
// float32 and int32 operations only, so a loop of it is vectorised as written and gives the same
// bits at every SIMD width; a scalar expf per score cost more than the dot products.
static inline float tq_exp_nonpos(float x) {
    const float shift = 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer
    const float xc = x >= -87.0f ? x : -87.0f; // also NaN, so that the conversion below is defined
    const float t  = xc*1.44269504088896341f + shift;
    const float k  = t - shift;
    const float r  = (xc - k*0.693145751953125f) - k*1.42860682030941723e-6f;
    float p = 1.0f/720.0f;
    p = p*r + 1.0f/120.0f;
    p = p*r + 1.0f/24.0f;
    p = p*r + 1.0f/6.0f;
    p = p*r + 0.5f;
    p = p*r + 1.0f;
    p = p*r + 1.0f;
    const int32_t e = ((int32_t) k + 127) << 23;
    float two_k;
    memcpy(&two_k, &e, sizeof(two_k));
    return x >= -87.0f ? p*two_k : (x < -87.0f ? 0.0f : x);
}

// Sums kept as eight explicit partial sums, combined in this fixed order: the compiler turns their
// loops into SIMD without reassociating floats, so every SIMD level computes the same sums.
static inline float tq_sum8(const float * acc) {
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// p[t] = exp(p[t] - m) for t < n; returns their sum
static float tq_exp_sum_row(float * p, int n, float m) {
    for (int t = 0; t < n; ++t) {
        p[t] = tq_exp_nonpos(p[t] - m);
    }
    float acc[8] = { 0 };
    int t = 0;
    for (; t + 8 <= n; t += 8) {
        for (int l = 0; l < 8; ++l) {
            acc[l] += p[t + l];
        }
    }
    for (; t < n; ++t) {
        acc[0] += p[t];
    }
    return tq_sum8(acc);
}

// The tile's rows in the rotated domain: each live cell's coded row, decoded, but the exact float32
// row where the cell has one (and its coded row is not a NaN row, which must travel as it would in
// an f16 cache); zeros for the cells no row attends to.
// Calibrated keys (tq3c, tq2o, tq3o) have no rotated domain: their rows, the exact row and the
// queries are calibrated coefficients as they are.
static void tq_attn_decode_tile(enum ggml_type type, int64_t n, const char * rows, size_t stride, int64_t it, int nt,
                                const bool * live, int64_t exact_cell, const float * exact, float * out) {
    const bool calibrated = tq_is_calibrated_type(type);
    if (calibrated) {
        tq_cpu_decode_rows_calibrated(type, n, rows + it*stride, stride, nt, out);
    } else {
        tq_cpu_decode_rows_rotated(type, n, rows + it*stride, stride, nt, out);
    }
    for (int t = 0; t < nt; ++t) {
        if (!live[t]) {
            memset(out + t*n, 0, n*sizeof(float));
        } else if (it + t == exact_cell && !tq_row_is_nan(type, rows + (it + t)*stride, n)) {
            if (calibrated) {
                memcpy(out + t*n, exact, n*sizeof(float));
            } else {
                tq_rotated_copy(out + t*n, exact, n);
            }
        }
    }
}

// Whether a decoded row holds NaN or Inf: a block decodes to d times centroids below 1, so its first
// value is finite exactly when its norm d is (an exact row is finite: a non-finite input codes a
// NaN row, which the exact row defers to).
static inline bool tq_decoded_row_finite(const float * y, int64_t n) {
    bool finite = true;
    for (int64_t b = 0; b < n; b += QK_TQ) {
        finite &= isfinite(y[b]) != 0;
    }
    return finite;
}

bool tq_cpu_attn_rows_supported(enum ggml_type k_type, enum ggml_type v_type, int64_t dk, int64_t dv) {
    return tq_is_kv_type(k_type) && !tq_is_qjl_type(k_type) &&
           tq_is_kv_type(v_type) && !tq_is_qjl_type(v_type) && !tq_is_calibrated_type(v_type) &&
           dk % QK_TQ == 0 && dv % QK_TQ == 0 && dk <= TQ_ATTN_MAX_D && dv <= TQ_ATTN_MAX_D;
}

size_t tq_cpu_attn_rows_work_size(int64_t dk, int64_t dv) {
    enum { R = TQ_ATTN_MAX_ROWS, T = TQ_ATTN_TILE };
    return sizeof(float)*(R*dk + 2*T*dk + T*dv + R*T);
}

// The two products of a tile, in register blocks of 4 rows by 16 columns; every element is one
// sequential sum, whatever the number of rows. GCC and Clang get the blocks as vector types (the
// auto-vectoriser unrolls the short inner loops first and then vectorises nothing); the plain
// loops are for other compilers (and for -DTQ_NO_VECTOR_EXT, which checks them).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(TQ_NO_VECTOR_EXT)
typedef float tq_f32x16 __attribute__((vector_size(64)));
// macros, not functions: a function returning a 64-byte vector has another ABI with and without AVX-512
#define TQ_LOAD16(v, p)  memcpy(&(v), (p), sizeof(tq_f32x16))
#define TQ_STORE16(p, v) memcpy((p), &(v), sizeof(tq_f32x16))
#endif

// c[r][t] = sum_d a[r][d] b[d][t] for r < nr4 (a multiple of 4), t < TQ_ATTN_TILE
static void tq_tile_scores(float * c, const float * a, const float * b, int nr4, int64_t n) {
    enum { T = TQ_ATTN_TILE };
    for (int r = 0; r < nr4; r += 4) {
        for (int t0 = 0; t0 < T; t0 += 16) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(TQ_NO_VECTOR_EXT)
            const float * a0 = a + (r + 0)*n, * a1 = a + (r + 1)*n, * a2 = a + (r + 2)*n, * a3 = a + (r + 3)*n;
            tq_f32x16 c0 = { 0 }, c1 = { 0 }, c2 = { 0 }, c3 = { 0 };
            for (int64_t d = 0; d < n; ++d) {
                tq_f32x16 bd;
                TQ_LOAD16(bd, b + d*T + t0);
                c0 += a0[d]*bd;
                c1 += a1[d]*bd;
                c2 += a2[d]*bd;
                c3 += a3[d]*bd;
            }
            TQ_STORE16(c + (r + 0)*T + t0, c0);
            TQ_STORE16(c + (r + 1)*T + t0, c1);
            TQ_STORE16(c + (r + 2)*T + t0, c2);
            TQ_STORE16(c + (r + 3)*T + t0, c3);
#else
            for (int i = 0; i < 4; ++i) {
                float acc[16] = { 0 };
                for (int64_t d = 0; d < n; ++d) {
                    const float   ai = a[(r + i)*n + d];
                    const float * bd = b + d*T + t0;
                    for (int j = 0; j < 16; ++j) {
                        acc[j] += ai*bd[j];
                    }
                }
                memcpy(c + (r + i)*T + t0, acc, sizeof(acc));
            }
#endif
        }
    }
}

// out[r][j] += sum_t p[r][t] v[t][j] for r < nr4, t < nt, j < dv
static void tq_tile_values(float * out, const float * p, const float * v, int nr4, int nt, int64_t dv) {
    enum { T = TQ_ATTN_TILE };
    for (int r = 0; r < nr4; r += 4) {
        const float * p0 = p + (r + 0)*T, * p1 = p + (r + 1)*T, * p2 = p + (r + 2)*T, * p3 = p + (r + 3)*T;
        for (int64_t j0 = 0; j0 < dv; j0 += 16) {
            float * o0 = out + (r + 0)*dv + j0, * o1 = out + (r + 1)*dv + j0;
            float * o2 = out + (r + 2)*dv + j0, * o3 = out + (r + 3)*dv + j0;
#if (defined(__GNUC__) || defined(__clang__)) && !defined(TQ_NO_VECTOR_EXT)
            tq_f32x16 c0, c1, c2, c3;
            TQ_LOAD16(c0, o0);
            TQ_LOAD16(c1, o1);
            TQ_LOAD16(c2, o2);
            TQ_LOAD16(c3, o3);
            for (int t = 0; t < nt; ++t) {
                tq_f32x16 vt;
                TQ_LOAD16(vt, v + t*dv + j0);
                c0 += p0[t]*vt;
                c1 += p1[t]*vt;
                c2 += p2[t]*vt;
                c3 += p3[t]*vt;
            }
            TQ_STORE16(o0, c0);
            TQ_STORE16(o1, c1);
            TQ_STORE16(o2, c2);
            TQ_STORE16(o3, c3);
#else
            float acc[4][16];
            memcpy(acc[0], o0, sizeof(acc[0]));
            memcpy(acc[1], o1, sizeof(acc[1]));
            memcpy(acc[2], o2, sizeof(acc[2]));
            memcpy(acc[3], o3, sizeof(acc[3]));
            for (int t = 0; t < nt; ++t) {
                const float * vt = v + t*dv + j0;
                for (int j = 0; j < 16; ++j) {
                    acc[0][j] += p0[t]*vt[j];
                    acc[1][j] += p1[t]*vt[j];
                    acc[2][j] += p2[t]*vt[j];
                    acc[3][j] += p3[t]*vt[j];
                }
            }
            memcpy(o0, acc[0], sizeof(acc[0]));
            memcpy(o1, acc[1], sizeof(acc[1]));
            memcpy(o2, acc[2], sizeof(acc[2]));
            memcpy(o3, acc[3], sizeof(acc[3]));
#endif
        }
    }
}


// Which cells of the tile [it, it + nt) some row attends to (the others are masked out for every
// row); returns whether any is.
static bool tq_attn_live_cells(int nr, const ggml_fp16_t * const * mask, int64_t it, int nt, bool * live) {
    bool any = false;
    for (int t = 0; t < nt; ++t) {
        live[t] = false;
        for (int r = 0; r < nr && !live[t]; ++r) {
            live[t] = !mask || !mask[r] || GGML_FP16_TO_FP32(mask[r][it + t]) != -INFINITY;
        }
        any |= live[t];
    }
    return any;
}

// Row r's mask value of cell ic (times its ALiBi slope); -INFINITY: the row skips the cell.
static inline float tq_attn_mask_value(const ggml_fp16_t * const * mask, const float * slope, int r, int64_t ic) {
    return mask && mask[r] ? slope[r]*GGML_FP16_TO_FP32(mask[r][ic]) : 0.0f;
}

// p[r][t] = q_r . k_t for the tile's nt cells (kr: [T][dk]; kt: room for the transposed tile).
// Always the product of tiles, also for the few rows of a decoded token, so that a score is the
// same sum in the same order whether its token is batched alone or with others: an answer must
// not depend on how a server batches it. Dot products with 8 partial sums for one-token batches
// (faster: no transposition) rounded differently, and a last-bit difference in one layer's output
// can move the next layer's K/V codes across a quantizer boundary: a prompt's last token
// recomputed alone (llama-server's prompt cache) or batched next to another slot's decoded token
// changed greedy answers (tests/test_determinism.py).
static void tq_attn_scores(const tq_attn_kv * kv, int nr4, const float * qr, const float * kr, float * kt,
                           int nt, float * p) {
    enum { T = TQ_ATTN_TILE };
    const int64_t dk = kv->dk;
    for (int t0 = 0; t0 < T; t0 += 8) {
        for (int64_t d0 = 0; d0 < dk; d0 += 8) {
            for (int t = t0; t < t0 + 8; ++t) {
                for (int64_t d = d0; d < d0 + 8; ++d) {
                    kt[d*T + t] = t < nt ? kr[t*dk + d] : 0.0f;
                }
            }
        }
    }
    tq_tile_scores(p, qr, kt, nr4, dk);
}

// The scale and the mask, then one online-softmax step per row for the whole tile: p becomes the
// weights exp(s - M), M and S move on, out is rescaled to the new maximum. A masked cell's score is
// set to -INFINITY (never added to), so that a NaN score of a cell a row masks does not reach it.
static void tq_attn_softmax_tile(const tq_attn_kv * kv, int nr, int nr4, const ggml_fp16_t * const * mask,
                                 const float * slope, int64_t it, int nt, const bool * live, float * p,
                                 float * M, float * S, float * out) {
    enum { T = TQ_ATTN_TILE };
    const int64_t dv = kv->dv;
    for (int r = 0; r < nr4; ++r) {
        float * pr = p + r*T;
        if (r >= nr) {
            memset(pr, 0, T*sizeof(float));
            continue;
        }
        float smax = -INFINITY;
        for (int t = 0; t < nt; ++t) {
            const float mv = tq_attn_mask_value(mask, slope, r, it + t);
            const float s  = live[t] && mv != -INFINITY ? pr[t]*kv->scale + mv : -INFINITY;
            pr[t] = s;
            smax = s > smax ? s : smax;
        }
        for (int t = nt; t < T; ++t) {
            pr[t] = 0.0f;
        }
        if (smax == -INFINITY) {
            memset(pr, 0, nt*sizeof(float));
            continue;
        }
        const float m_new = smax > M[r] ? smax : M[r];
        const float ms    = M[r] == -INFINITY ? 0.0f : expf(M[r] - m_new);
        const float sum   = tq_exp_sum_row(pr, nt, m_new);
        if (ms != 1.0f) {
            for (int64_t j = 0; j < dv; ++j) {
                out[r*dv + j] *= ms;
            }
        }
        M[r] = m_new;
        S[r] = S[r]*ms + sum;
    }
}

// out[r] += sum_t p[r][t] v_t over the tile's cells. A cell whose V row is not finite (NaN or Inf,
// as an f16 cache would hold it) stays out of the tile product, where 0 * NaN would reach the rows
// that mask the cell, and is added alone to the rows that attend to it, as ops.cpp's per-cell loop
// does. vt: room for the tile's V rows; tmp: room for one.
static void tq_attn_values(const tq_attn_kv * kv, int nr, int nr4, const ggml_fp16_t * const * mask, const float * slope,
                           int64_t it, int nt, const bool * live, const float * p, float * vt, float * tmp, float * out) {
    enum { T = TQ_ATTN_TILE };
    const int64_t dv = kv->dv;
    bool nonfinite[T];
    tq_attn_decode_tile(kv->v_type, dv, kv->v, kv->v_stride, it, nt, live, kv->v_exact_cell, kv->v_exact, vt);
    bool any = false;
    for (int t = 0; t < nt; ++t) {
        nonfinite[t] = !tq_decoded_row_finite(vt + t*dv, dv);
        if (nonfinite[t]) {
            memset(vt + t*dv, 0, dv*sizeof(float));
            any = true;
        }
    }
    tq_tile_values(out, p, vt, nr4, nt, dv);
    for (int t = 0; any && t < nt; ++t) {
        if (!nonfinite[t]) {
            continue;
        }
        tq_cpu_decode_rows_rotated(kv->v_type, dv, kv->v + (it + t)*kv->v_stride, kv->v_stride, 1, tmp);
        for (int r = 0; r < nr; ++r) {
            if (tq_attn_mask_value(mask, slope, r, it + t) == -INFINITY) {
                continue;
            }
            for (int64_t j = 0; j < dv; ++j) {
                out[r*dv + j] += p[r*T + t]*tmp[j];
            }
        }
    }
}

void tq_cpu_attn_rows(const tq_attn_kv * kv, int nr, const float * const * q, const ggml_fp16_t * const * mask,
                      const float * slope, int64_t ic0, int64_t ic1, float * M, float * S, float * out, float * work) {
    enum { T = TQ_ATTN_TILE, R = TQ_ATTN_MAX_ROWS };
    const int64_t dk = kv->dk, dv = kv->dv;
    assert(nr >= 1 && nr <= R);
    const int nr4 = (nr + 3) & ~3;

    float * qr = work;           // [nr4][dk]  queries in the rotated domain, zero rows past nr
    float * kr = qr + R*dk;      // [T][dk]    the tile's keys (then room for one V row)
    float * kt = kr + T*dk;      // [dk][T]    the same, transposed
    float * vt = kt + dk*T;      // [T][dv]    the tile's values
    float * p  = vt + T*dv;      // [nr4][T]   scores, then weights

    for (int r = 0; r < nr4; ++r) {
        if (r < nr && tq_is_calibrated_type(kv->k_type)) {
            memcpy(qr + r*dk, q[r], dk*sizeof(float));
            M[r] = -INFINITY;
            S[r] = 0.0f;
        } else if (r < nr) {
            tq_rotated_copy(qr + r*dk, q[r], dk);
            M[r] = -INFINITY;
            S[r] = 0.0f;
        } else {
            memset(qr + r*dk, 0, dk*sizeof(float));
        }
        memset(out + r*dv, 0, dv*sizeof(float));
    }

    for (int64_t it = ic0; it < ic1; it += T) {
        const int nt = (int) (ic1 - it < T ? ic1 - it : T);
        bool live[T];
        if (!tq_attn_live_cells(nr, mask, it, nt, live)) {
            continue;
        }
        tq_attn_decode_tile(kv->k_type, dk, kv->k, kv->k_stride, it, nt, live, kv->k_exact_cell, kv->k_exact, kr);
        tq_attn_scores(kv, nr4, qr, kr, kt, nt, p);
        tq_attn_softmax_tile(kv, nr, nr4, mask, slope, it, nt, live, p, M, S, out);
        tq_attn_values(kv, nr, nr4, mask, slope, it, nt, live, p, vt, kr, out);
    }

    for (int r = 0; r < nr; ++r) {
        tq_cpu_unrotate_row(out + r*dv, dv);
    }
}

// --- the FLASH_ATTN_EXT op -------------------------------------------------------------------------
// What the op asks beyond the rows (ALiBi slopes, the op's sinks, the division by S and the output
// permutation) is what ops.cpp's per-row loop does (ggml_compute_forward_flash_attn_ext_f16_one_chunk),
// written again here for groups of rows: upstream does it inline, with no function to call.

// The op's parameters, read once per call.
typedef struct {
    const struct ggml_tensor * q, * k, * v, * mask, * sinks;
    const struct ggml_tensor * x_k, * x_v;  // exact rows of ggml_flash_attn_ext_add_exact_row: src[5], src[6]
    const int32_t * x_cell;                 //   and each stream's cell, src[7] (ggml.c checks their shapes)
    float scale, max_bias, m0, m1;
    uint32_t n_head_log2;
} tq_attn_op;

// Whether the TQ rows take the op: MSE types on both sides, float32 queries, no logit soft-capping.
static bool tq_attn_op_read(const struct ggml_tensor * dst, tq_attn_op * op) {
    op->q = dst->src[0]; op->k = dst->src[1]; op->v = dst->src[2]; op->mask = dst->src[3]; op->sinks = dst->src[4];
    float softcap;
    memcpy(&op->scale,    (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&op->max_bias, (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&softcap,      (const float *) dst->op_params + 2, sizeof(float));
    if (op->q->type != GGML_TYPE_F32 || softcap != 0.0f || !tq_knobs()->attn_rows ||
        !tq_cpu_attn_rows_supported(op->k->type, op->v->type, op->k->ne[0], op->v->ne[0])) {
        return false;
    }
    op->x_k = dst->src[5];
    op->x_v = dst->src[6];
    op->x_cell = dst->src[7] ? (const int32_t *) dst->src[7]->data : NULL;
    const uint32_t n_head = (uint32_t) op->q->ne[2];
    op->n_head_log2 = 1u << (uint32_t) floor(log2(n_head));
    op->m0 = powf(2.0f, -(op->max_bias       ) / op->n_head_log2);
    op->m1 = powf(2.0f, -(op->max_bias / 2.0f) / op->n_head_log2);
    return true;
}

// Query row r of the op: its token i1, head i2 and sequence i3.
typedef struct { int64_t i1, i2, i3; } tq_attn_qrow;

static tq_attn_qrow tq_attn_row(const tq_attn_op * op, int64_t r) {
    const int64_t ne1 = op->q->ne[1], ne2 = op->q->ne[2];
    tq_attn_qrow x;
    x.i3 = r/(ne2*ne1);
    x.i2 = (r - x.i3*ne2*ne1)/ne1;
    x.i1 = r - x.i3*ne2*ne1 - x.i2*ne1;
    return x;
}

// The K/V head (ik2, ik3) / (iv2, iv3) that query rows read, with its exact rows.
static void tq_attn_head(const tq_attn_op * op, int64_t ik2, int64_t ik3, int64_t iv2, int64_t iv3, tq_attn_kv * kv) {
    const struct ggml_tensor * k = op->k, * v = op->v;
    kv->k_type = k->type; kv->v_type = v->type; kv->dk = k->ne[0]; kv->dv = v->ne[0]; kv->scale = op->scale;
    kv->k = (const char *) k->data + ik2*k->nb[2] + ik3*k->nb[3]; kv->k_stride = k->nb[1];
    kv->v = (const char *) v->data + iv2*v->nb[2] + iv3*v->nb[3]; kv->v_stride = v->nb[1];
    kv->k_exact_cell = op->x_k && op->x_cell ? op->x_cell[ik3] : -1;
    kv->v_exact_cell = op->x_v && op->x_cell ? op->x_cell[iv3] : -1;
    kv->k_exact = kv->k_exact_cell >= 0 ? (const float *) ((const char *) op->x_k->data + ik3*op->x_k->nb[1]) + ik2*kv->dk : NULL;
    kv->v_exact = kv->v_exact_cell >= 0 ? (const float *) ((const char *) op->x_v->data + iv3*op->x_v->nb[1]) + iv2*kv->dv : NULL;
}

// Query rows ir, ir + 1, ... before ir1 (at most TQ_ATTN_MAX_ROWS) that read one K/V head: their
// query and mask rows, ALiBi slopes and the head. Returns their number.
static int tq_attn_group(const tq_attn_op * op, int64_t ir, int64_t ir1, const float ** qp, const ggml_fp16_t ** mp,
                         float * slope, tq_attn_kv * kv) {
    const struct ggml_tensor * q = op->q, * mask = op->mask;
    const int64_t rk2 = q->ne[2]/op->k->ne[2], rk3 = q->ne[3]/op->k->ne[3];
    const int64_t rv2 = q->ne[2]/op->v->ne[2], rv3 = q->ne[3]/op->v->ne[3];
    int64_t ik2 = -1, ik3 = -1, iv2 = -1, iv3 = -1;
    int nr = 0;
    for (; nr < TQ_ATTN_MAX_ROWS && ir + nr < ir1; ++nr) {
        const tq_attn_qrow x = tq_attn_row(op, ir + nr);
        if (nr > 0 && (x.i2/rk2 != ik2 || x.i3/rk3 != ik3 || x.i2/rv2 != iv2 || x.i3/rv3 != iv3)) {
            break;
        }
        ik2 = x.i2/rk2; ik3 = x.i3/rk3; iv2 = x.i2/rv2; iv3 = x.i3/rv3;
        const uint32_t h = (uint32_t) x.i2;
        slope[nr] = op->max_bias > 0.0f ? (h < op->n_head_log2 ? powf(op->m0, h + 1) : powf(op->m1, 2*(h - op->n_head_log2) + 1)) : 1.0f;
        qp[nr] = (const float *) ((const char *) q->data + x.i1*q->nb[1] + x.i2*q->nb[2] + x.i3*q->nb[3]);
        mp[nr] = mask ? (const ggml_fp16_t *) ((const char *) mask->data + x.i1*mask->nb[1] +
                                               (x.i2 % mask->ne[2])*mask->nb[2] + (x.i3 % mask->ne[3])*mask->nb[3]) : NULL;
    }
    tq_attn_head(op, ik2, ik3, iv2, iv3, kv);
    return nr;
}

// Query row `row` after its cells: the op's sinks (once, with the first chunk of cells), then M, S
// and the unnormalised output o to partials + row*partial_stride (ops.cpp reduces them), or o / S
// to dst, which is permute(0, 2, 1, 3) of the rows.
static void tq_attn_finish_row(const tq_attn_op * op, const struct ggml_tensor * dst, int64_t row, int64_t ic0,
                               float M, float S, float * o, float * partials, int64_t partial_stride) {
    const int64_t dv = op->v->ne[0];
    const tq_attn_qrow x = tq_attn_row(op, row);
    if (op->sinks && ic0 == 0) {
        const float s = ((const float *) op->sinks->data)[x.i2];
        float ms = 1.0f, vs = 1.0f;
        if (s > M) {
            ms = expf(M - s);
            M = s;
            for (int64_t j = 0; j < dv; ++j) {
                o[j] *= ms;
            }
        } else {
            vs = expf(s - M);
        }
        S = S*ms + vs;
    }
    if (partials) {
        float * part = partials + row*partial_stride;
        part[0] = M;
        part[1] = S;
        memcpy(part + 2, o, dv*sizeof(float));
        return;
    }
    const float s_inv = S == 0.0f ? 0.0f : 1.0f/S;
    for (int64_t j = 0; j < dv; ++j) {
        o[j] *= s_inv;
    }
    memcpy((char *) dst->data + (x.i3*dst->ne[2]*dst->ne[1] + x.i2 + x.i1*dst->ne[1])*dst->nb[1], o, dst->nb[1]);
}

// One thread's scratch: the rows' unnormalised outputs and tq_cpu_attn_rows' work, in whole cache lines.
static size_t tq_attn_thread_bytes(int64_t dk, int64_t dv) {
    const size_t bytes = sizeof(float)*TQ_ATTN_MAX_ROWS*dv + tq_cpu_attn_rows_work_size(dk, dv);
    return (bytes + 63) & ~(size_t) 63;
}

size_t tq_cpu_flash_attn_ext_work_size(const struct ggml_tensor * dst, int n_threads) {
    const struct ggml_tensor * k = dst->src[1], * v = dst->src[2];
    if (!tq_cpu_attn_rows_supported(k->type, v->type, k->ne[0], v->ne[0])) {
        return 0;
    }
    return (size_t) n_threads*tq_attn_thread_bytes(k->ne[0], v->ne[0]) + 64;
}

bool tq_cpu_flash_attn_ext_rows(const struct ggml_tensor * dst, void * wdata, size_t wsize, int ith, int nth,
                                int64_t ir0, int64_t ir1, int64_t ic0, int64_t ic1, float * partials, int64_t partial_stride) {
    tq_attn_op op;
    if (!tq_attn_op_read(dst, &op)) {
        return false;
    }
    const int64_t dk = op.k->ne[0], dv = op.v->ne[0];
    // thread ith's share of the end of the work buffer, whose start is ops.cpp's scratch
    const size_t per_thread = tq_attn_thread_bytes(dk, dv);
    if (wdata == NULL || wsize < (size_t) nth*per_thread + 64) {
        GGML_ABORT("FLASH_ATTN_EXT over a TQ cache: the work buffer has no room for the TQ tiles "
                   "(the graph plan must add tq_cpu_flash_attn_ext_work_size)");
    }
    const uintptr_t first = ((uintptr_t) wdata + wsize - (size_t) nth*per_thread) & ~(uintptr_t) 63;
    float * out  = (float *) (first + (size_t) ith*per_thread);
    float * work = out + TQ_ATTN_MAX_ROWS*dv;

    float M[TQ_ATTN_MAX_ROWS], S[TQ_ATTN_MAX_ROWS], slope[TQ_ATTN_MAX_ROWS];
    const float * qp[TQ_ATTN_MAX_ROWS];
    const ggml_fp16_t * mp[TQ_ATTN_MAX_ROWS];
    for (int64_t ir = ir0; ir < ir1; ) {
        tq_attn_kv kv;
        const int nr = tq_attn_group(&op, ir, ir1, qp, mp, slope, &kv);
        tq_cpu_attn_rows(&kv, nr, qp, mp, slope, ic0, ic1, M, S, out, work);
        for (int r = 0; r < nr; ++r) {
            tq_attn_finish_row(&op, dst, ir + r, ic0, M[r], S[r], out + r*dv, partials, partial_stride);
        }
        ir += nr;
    }
    return true;
}
