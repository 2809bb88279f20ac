// TurboQuant KV-cache types: the scalar reference, whose results depend on nothing but its inputs
// (no environment, no global state). Compiled with -ffp-contract=off so that its bytes equal the
// NumPy reference's (pytools/layout.py); the arithmetic order is tq-blocks.h's. It is also the CPU
// backend's scalar level (tq-cpu.c).
#include "tq.h"
#include "tq-codebooks.h"

#include "ggml-impl.h"

#include <assert.h>
#include <stddef.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const float * tq_centroids(int bits) {
    switch (bits) {
        case 1: return tq_centroids_1;
        case 2: return tq_centroids_2;
        case 3: return tq_centroids_3;
        default: return tq_centroids_4;
    }
}

static const float * tq_boundaries(int bits) {
    switch (bits) {
        case 1: return tq_boundaries_1;
        case 2: return tq_boundaries_2;
        case 3: return tq_boundaries_3;
        default: return tq_boundaries_4;
    }
}

// --- measurement knobs: the environment, read here and nowhere else ---------------------------------

static bool tq_env_off(const char * name) {
    const char * env = getenv(name);
    return env != NULL && atoi(env) == 0;
}

// Read once and published whole; threads that race here compute the same values.
#if defined(__GNUC__)
#    define TQ_LOAD_ACQUIRE(p)     __atomic_load_n((p), __ATOMIC_ACQUIRE)
#    define TQ_STORE_RELEASE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#else // MSVC: volatile accesses are acquire / release
#    define TQ_LOAD_ACQUIRE(p)     (*(volatile int *) (p))
#    define TQ_STORE_RELEASE(p, v) (*(volatile int *) (p) = (v))
#endif

const tq_measurement_knobs * tq_knobs(void) {
    static tq_measurement_knobs knobs;
    static int ready = 0;
    if (!TQ_LOAD_ACQUIRE(&ready)) {
        tq_measurement_knobs k;
        k.quant.norm_correction = !tq_env_off("TQ_NORM_CORRECTION");
        k.quant.scale_search    = !tq_env_off("TQ_SCALE_SEARCH");
        k.attn_rows             = !tq_env_off("TQ_ATTN_ROWS");
        k.cpu_simd              = getenv("TQ_CPU_SIMD");
        knobs = k;
        TQ_STORE_RELEASE(&ready, 1);
    }
    return &knobs;
}

bool tq_is_kv_type(enum ggml_type type) {
    return (type >= GGML_TYPE_TQ2 && type <= GGML_TYPE_TQ4_QJL) || tq_is_calibrated_type(type);
}

bool tq_is_calibrated_type(enum ggml_type type) {
    return type == GGML_TYPE_TQ3C || tq_is_split_type(type);
}

bool tq_is_split_type(enum ggml_type type) {
    return type == GGML_TYPE_TQ2O || type == GGML_TYPE_TQ3O;
}

bool tq_is_qjl_type(enum ggml_type type) {
    return type >= GGML_TYPE_TQ2_QJL && type <= GGML_TYPE_TQ4_QJL;
}

bool tq_row_is_nan(enum ggml_type type, const void * x, int64_t n) {
    const size_t bsz = ggml_type_size(type);
    for (int64_t b = 0; b < n / QK_TQ; ++b) {
        // every block starts with its fp16 norm (a split block with its two groups' norms)
        for (int g = 0; g < (tq_is_split_type(type) ? 2 : 1); ++g) {
            uint16_t d;
            memcpy(&d, (const char *) x + b*bsz + g*sizeof(d), sizeof(d));
            if ((d & 0x7C00) == 0x7C00 && (d & 0x03FF) != 0) {
                return true;
            }
        }
    }
    return false;
}

// --- rotation ------------------------------------------------------------------------------------

static void tq_fwht64(float * x) {
    for (int h = 1; h < QK_TQ; h <<= 1) {
        for (int i = 0; i < QK_TQ; i += 2*h) {
            for (int j = i; j < i + h; ++j) {
                const float a = x[j];
                const float b = x[j + h];
                x[j]     = a + b;
                x[j + h] = a - b;
            }
        }
    }
}

static void tq_apply_signs(float * x, uint64_t signs) {
    for (int j = 0; j < QK_TQ; ++j) {
        if ((signs >> j) & 1) {
            x[j] = -x[j];
        }
    }
}

void tq_rotate_block(float * x) {
    for (int r = 0; r < TQ_ROTATION_ROUNDS; ++r) {
        tq_apply_signs(x, tq_rotation_signs[r]);
        tq_fwht64(x);
        for (int j = 0; j < QK_TQ; ++j) {
            x[j] *= 0.125f;
        }
    }
}

void tq_unrotate_block(float * x) {
    for (int r = TQ_ROTATION_ROUNDS - 1; r >= 0; --r) {
        tq_fwht64(x);
        for (int j = 0; j < QK_TQ; ++j) {
            x[j] *= 0.125f;
        }
        tq_apply_signs(x, tq_rotation_signs[r]);
    }
}

// --- bit planes ----------------------------------------------------------------------------------

static void tq_pack2(const uint8_t * idx, uint8_t * qs) {
    for (int i = 0; i < 16; ++i) {
        qs[i] = (uint8_t) ((idx[i] & 3) | ((idx[i + 16] & 3) << 2) | ((idx[i + 32] & 3) << 4) | ((idx[i + 48] & 3) << 6));
    }
}

static void tq_pack1(const uint8_t * idx, int shift, uint8_t * qh) {
    for (int i = 0; i < 8; ++i) {
        uint8_t b = 0;
        for (int k = 0; k < 8; ++k) {
            b |= (uint8_t) (((idx[i + 8*k] >> shift) & 1) << k);
        }
        qh[i] = b;
    }
}

static void tq_pack4(const uint8_t * idx, uint8_t * qs) {
    for (int i = 0; i < 32; ++i) {
        qs[i] = (uint8_t) ((idx[i] & 15) | ((idx[i + 32] & 15) << 4));
    }
}

static inline int tq_get2(const uint8_t * qs, int j) { return (qs[j % 16] >> (2*(j / 16))) & 3; }
static inline int tq_get1(const uint8_t * qh, int j) { return (qh[j % 8] >> (j / 8)) & 1; }
static inline int tq_get4(const uint8_t * qs, int j) { return j < 32 ? qs[j] & 15 : qs[j - 32] >> 4; }

// --- one block -----------------------------------------------------------------------------------

// The number of the 2^bits - 1 ascending boundaries b[k] with v > b[k] (NaN: 0): bisection in
// bits fixed steps, without branches (the search below runs it 640 times a block)
static inline int tq_cell(float v, const float * b, int bits) {
    int pos = 0;
    for (int step = 1 << (bits - 1); step > 0; step >>= 1) {
        pos += (v > b[pos + step - 1]) ? step : 0;
    }
    return pos;
}

// Steps 1-3 of tq-blocks.h. Returns 0 for a zero block, -1 for a non-finite one, 1 otherwise;
// u receives the rotated unit vector and idx the MSE indices.
static int tq_quantize_block_mse(const float * x, int bits, float * n_out, float * u, uint8_t * idx) {
    double s = 0.0;
    for (int j = 0; j < QK_TQ; ++j) {
        s += (double) x[j] * (double) x[j];
    }
    if (!isfinite(s)) {
        return -1;
    }
    const float n = (float) sqrt(s);
    *n_out = n;
    if (n == 0.0f) {
        return 0;
    }
    memcpy(u, x, QK_TQ*sizeof(float));
    tq_rotate_block(u);
    const float * bnd = tq_boundaries(bits);
    for (int j = 0; j < QK_TQ; ++j) {
        u[j] = u[j] / n;
        idx[j] = (uint8_t) tq_cell(u[j], bnd, bits);
    }
    return 1;
}

// Step 3's scale search: the indices whose centroid vector is closest in angle to u.
static void tq_search_scale(const float * u, int bits, uint8_t * idx) {
    static const float grid[TQ_SCALE_GRID_N] = TQ_SCALE_GRID;
    const float * bnd = tq_boundaries(bits);
    const float * c = tq_centroids(bits);
    const int nb = (1 << bits) - 1;
    double best = -INFINITY;
    uint8_t cand[QK_TQ];
    for (int m = 0; m < TQ_SCALE_GRID_N; ++m) {
        float sb[15];
        for (int k = 0; k < nb; ++k) {
            sb[k] = grid[m] * bnd[k];
        }
        double dot = 0.0, cs = 0.0;
        for (int j = 0; j < QK_TQ; ++j) {
            const int i = tq_cell(u[j], sb, bits);
            cand[j] = (uint8_t) i;
            dot += (double) u[j] * (double) c[i];
            cs  += (double) c[i] * (double) c[i];
        }
        const double score = dot / sqrt(cs);
        if (score > best) {
            best = score;
            memcpy(idx, cand, QK_TQ);
        }
    }
}

static ggml_fp16_t tq_mse_scale(float n, int bits, const uint8_t * idx, bool norm_correction) {
    if (!norm_correction) {
        return GGML_FP32_TO_FP16(n);
    }
    const float * c = tq_centroids(bits);
    double cs = 0.0;
    for (int j = 0; j < QK_TQ; ++j) {
        cs += (double) c[idx[j]] * (double) c[idx[j]];
    }
    return GGML_FP32_TO_FP16((float) ((double) n / sqrt(cs)));
}

static const ggml_fp16_t TQ_FP16_NAN = 0x7E00;

// The QJL part: signs of S r and gamma = ||r|| in units of 1/256.
static void tq_qjl_sketch(const float * u, const uint8_t * idx, int mse_bits, uint8_t * signs, uint8_t * gamma) {
    const float * c = tq_centroids(mse_bits);
    float r[QK_TQ];
    double rs = 0.0;
    for (int j = 0; j < QK_TQ; ++j) {
        r[j] = u[j] - c[idx[j]];
        rs += (double) r[j] * (double) r[j];
    }
    const float g = rintf((float) sqrt(rs) * 256.0f);
    *gamma = (uint8_t) (g > 255.0f ? 255.0f : g);
    memset(signs, 0, 7);
    for (int i = 0; i < TQ_QJL_M; ++i) {
        float p = 0.0f;
        for (int j = 0; j < QK_TQ; ++j) {
            p += tq_qjl_matrix[i*QK_TQ + j] * r[j];
        }
        if (p >= 0.0f) {
            signs[i / 8] |= (uint8_t) (1 << (i % 8));
        }
    }
}

// --- where the parts of each block type live ------------------------------------------------------

#define TQ_NONE ((size_t) -1)

typedef struct {
    int    mse_bits;
    size_t size;
    size_t qs;     // 2-bit plane (mse_bits 2, 3) or 4-bit plane (mse_bits 4)
    size_t qh;     // 1-bit plane: the index itself (mse_bits 1) or its high bit (mse_bits 3)
    size_t signs;  // QJL types only
    size_t gamma;
} tq_block_layout;

#define TQ_LAYOUT_MSE(T, bits, QS, QH) { bits, sizeof(T), QS, QH, TQ_NONE, TQ_NONE }
#define TQ_LAYOUT_QJL(T, bits, QS, QH) { bits, sizeof(T), QS, QH, offsetof(T, signs), offsetof(T, gamma) }

static tq_block_layout tq_layout(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_TQ2:     { const tq_block_layout l = TQ_LAYOUT_MSE(block_tq2, 2, offsetof(block_tq2, qs), TQ_NONE); return l; }
        case GGML_TYPE_TQ3:     { const tq_block_layout l = TQ_LAYOUT_MSE(block_tq3, 3, offsetof(block_tq3, qs), offsetof(block_tq3, qh)); return l; }
        case GGML_TYPE_TQ4:     { const tq_block_layout l = TQ_LAYOUT_MSE(block_tq4, 4, offsetof(block_tq4, qs), TQ_NONE); return l; }
        case GGML_TYPE_TQ2_QJL: { const tq_block_layout l = TQ_LAYOUT_QJL(block_tq2_qjl, 1, TQ_NONE, offsetof(block_tq2_qjl, qh)); return l; }
        case GGML_TYPE_TQ3_QJL: { const tq_block_layout l = TQ_LAYOUT_QJL(block_tq3_qjl, 2, offsetof(block_tq3_qjl, qs), TQ_NONE); return l; }
        case GGML_TYPE_TQ4_QJL: { const tq_block_layout l = TQ_LAYOUT_QJL(block_tq4_qjl, 3, offsetof(block_tq4_qjl, qs), offsetof(block_tq4_qjl, qh)); return l; }
        default: GGML_ABORT("%s is not a TurboQuant cache type", ggml_type_name(type));
    }
}

// --- quantize rows -------------------------------------------------------------------------------

void tq_quantize_row_with(enum ggml_type type, const float * x, void * y, int64_t k, const tq_quantize_options * opt) {
    assert(k % QK_TQ == 0);
    if (type == GGML_TYPE_TQ3C) {
        quantize_row_tq3c_ref(x, (block_tq3c *) y, k);   // no scale search or norm correction to turn off
        return;
    }
    if (tq_is_split_type(type)) {
        tq_split_quantize_row(type, x, y, k);             // likewise
        return;
    }
    const tq_block_layout l = tq_layout(type);
    float u[QK_TQ]; uint8_t idx[QK_TQ]; float n;
    for (int64_t b = 0; b < k / QK_TQ; ++b, x += QK_TQ) {
        uint8_t * blk = (uint8_t *) y + b*l.size;
        ggml_fp16_t * d = (ggml_fp16_t *) blk; // d is the first member of every block
        memset(blk, 0, l.size);
        const int st = tq_quantize_block_mse(x, l.mse_bits, &n, u, idx);
        if (st < 0) { *d = TQ_FP16_NAN; continue; }
        if (st == 0) { continue; }
        if (l.signs == TQ_NONE && opt->norm_correction && opt->scale_search) {
            tq_search_scale(u, l.mse_bits, idx);
        }
        if (l.qs != TQ_NONE) {
            if (l.mse_bits == 4) { tq_pack4(idx, blk + l.qs); } else { tq_pack2(idx, blk + l.qs); }
        }
        if (l.qh != TQ_NONE) {
            tq_pack1(idx, l.mse_bits == 1 ? 0 : 2, blk + l.qh);
        }
        if (l.signs != TQ_NONE) {
            tq_qjl_sketch(u, idx, l.mse_bits, blk + l.signs, blk + l.gamma);
            *d = GGML_FP32_TO_FP16(n);
        } else {
            *d = tq_mse_scale(n, l.mse_bits, idx, opt->norm_correction);
        }
    }
}

static const tq_quantize_options tq_product = { true, true };

static void tq_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k) {
    tq_quantize_row_with(type, x, y, k, &tq_product);
}

void quantize_row_tq2_ref(const float * x, block_tq2 * y, int64_t k) { tq_quantize_row(GGML_TYPE_TQ2, x, y, k); }
void quantize_row_tq3_ref(const float * x, block_tq3 * y, int64_t k) { tq_quantize_row(GGML_TYPE_TQ3, x, y, k); }
void quantize_row_tq4_ref(const float * x, block_tq4 * y, int64_t k) { tq_quantize_row(GGML_TYPE_TQ4, x, y, k); }
void quantize_row_tq2_qjl_ref(const float * x, block_tq2_qjl * y, int64_t k) { tq_quantize_row(GGML_TYPE_TQ2_QJL, x, y, k); }
void quantize_row_tq3_qjl_ref(const float * x, block_tq3_qjl * y, int64_t k) { tq_quantize_row(GGML_TYPE_TQ3_QJL, x, y, k); }
void quantize_row_tq4_qjl_ref(const float * x, block_tq4_qjl * y, int64_t k) { tq_quantize_row(GGML_TYPE_TQ4_QJL, x, y, k); }

void quantize_row_tq_q_ref(const float * x, block_tq_q * y, int64_t k) {
    assert(k % QK_TQ == 0);
    for (int64_t b = 0; b < k / QK_TQ; ++b, x += QK_TQ) {
        memcpy(y[b].y, x, sizeof(y[b].y));
        tq_rotate_block(y[b].y);
    }
}

void quantize_row_tq_qjl_q_ref(const float * x, block_tq_qjl_q * y, int64_t k) {
    assert(k % QK_TQ == 0);
    float q[QK_TQ];
    for (int64_t b = 0; b < k / QK_TQ; ++b, x += QK_TQ) {
        memcpy(q, x, sizeof(q));
        tq_rotate_block(q);
        for (int j = 0; j < QK_TQ; ++j) {
            y[b].y[j] = GGML_FP32_TO_FP16(q[j]);
        }
        for (int i = 0; i < TQ_QJL_M; ++i) {
            float p = 0.0f;
            for (int j = 0; j < QK_TQ; ++j) {
                p += tq_qjl_matrix[i*QK_TQ + j] * q[j];
            }
            y[b].sy[i] = GGML_FP32_TO_FP16(p);
        }
        memset(y[b].pad, 0, sizeof(y[b].pad));
    }
}

size_t quantize_tq(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                   const float * imatrix) {
    (void) imatrix;
    const size_t row_size = ggml_row_size(type, n_per_row);
    for (int64_t r = 0; r < nrows; ++r) {
        const float * x = src + r*n_per_row;
        void * y = (char *) dst + r*row_size;
        tq_quantize_row(type, x, y, n_per_row);
    }
    return nrows*row_size;
}

// --- decode --------------------------------------------------------------------------------------

// One block of any TQ cache type: its scale, MSE indices and QJL part.
typedef struct {
    float d;
    int mse_bits;
    uint8_t idx[QK_TQ];
    const uint8_t * signs;  // QJL (NULL for MSE types)
    float gamma;
} tq_block_view;

static void tq_view(enum ggml_type type, const void * blocks, int64_t b, tq_block_view * v) {
    const tq_block_layout l = tq_layout(type);
    const uint8_t * blk = (const uint8_t *) blocks + b*l.size;
    const uint8_t * qs = l.qs != TQ_NONE ? blk + l.qs : NULL;
    const uint8_t * qh = l.qh != TQ_NONE ? blk + l.qh : NULL;
    v->d = GGML_FP16_TO_FP32(*(const ggml_fp16_t *) blk);
    v->mse_bits = l.mse_bits;
    for (int j = 0; j < QK_TQ; ++j) {
        switch (l.mse_bits) {
            case 1:  v->idx[j] = (uint8_t) tq_get1(qh, j); break;
            case 2:  v->idx[j] = (uint8_t) tq_get2(qs, j); break;
            case 3:  v->idx[j] = (uint8_t) (tq_get2(qs, j) | (tq_get1(qh, j) << 2)); break;
            default: v->idx[j] = (uint8_t) tq_get4(qs, j); break;
        }
    }
    v->signs = l.signs != TQ_NONE ? blk + l.signs : NULL;
    v->gamma = l.signs != TQ_NONE ? blk[l.gamma] / 256.0f : 0.0f;
}

// One block in the rotated domain, without the norm: c[idx_j] (+ the QJL reconstruction).
static void tq_decode_block_unit(const tq_block_view * v, float * y) {
    const float * c = tq_centroids(v->mse_bits);
    for (int j = 0; j < QK_TQ; ++j) {
        y[j] = c[v->idx[j]];
    }
    if (v->signs) {
        const float scale = v->gamma * TQ_SQRT_HALF_PI / TQ_QJL_M;
        for (int j = 0; j < QK_TQ; ++j) {
            float t = 0.0f;
            for (int i = 0; i < TQ_QJL_M; ++i) {
                const float s = (v->signs[i / 8] >> (i % 8)) & 1 ? 1.0f : -1.0f;
                t += tq_qjl_matrix[i*QK_TQ + j] * s;
            }
            y[j] += scale * t;
        }
    }
}

void tq_dequantize_row_rotated_ref(enum ggml_type type, const void * x, float * y, int64_t k) {
    assert(k % QK_TQ == 0);
    tq_block_view v;
    for (int64_t b = 0; b < k / QK_TQ; ++b, y += QK_TQ) {
        tq_view(type, x, b, &v);
        tq_decode_block_unit(&v, y);
        for (int j = 0; j < QK_TQ; ++j) {
            y[j] = v.d * y[j];
        }
    }
}

void tq_mad_row_rotated_ref(enum ggml_type type, int64_t n, float * acc, const void * x, float scale) {
    assert(n % QK_TQ == 0);
    tq_block_view v;
    float u[QK_TQ];
    for (int64_t b = 0; b < n / QK_TQ; ++b, acc += QK_TQ) {
        tq_view(type, x, b, &v);
        tq_decode_block_unit(&v, u);
        const float ds = v.d * scale;
        for (int j = 0; j < QK_TQ; ++j) {
            acc[j] += ds * u[j];
        }
    }
}

static void tq_dequantize_row(enum ggml_type type, const void * x, float * y, int64_t k) {
    tq_dequantize_row_rotated_ref(type, x, y, k);
    for (int64_t b = 0; b < k / QK_TQ; ++b) {
        tq_unrotate_block(y + b*QK_TQ);
    }
}

void dequantize_row_tq2(const block_tq2 * x, float * y, int64_t k) { tq_dequantize_row(GGML_TYPE_TQ2, x, y, k); }
void dequantize_row_tq3(const block_tq3 * x, float * y, int64_t k) { tq_dequantize_row(GGML_TYPE_TQ3, x, y, k); }
void dequantize_row_tq4(const block_tq4 * x, float * y, int64_t k) { tq_dequantize_row(GGML_TYPE_TQ4, x, y, k); }
void dequantize_row_tq2_qjl(const block_tq2_qjl * x, float * y, int64_t k) { tq_dequantize_row(GGML_TYPE_TQ2_QJL, x, y, k); }
void dequantize_row_tq3_qjl(const block_tq3_qjl * x, float * y, int64_t k) { tq_dequantize_row(GGML_TYPE_TQ3_QJL, x, y, k); }
void dequantize_row_tq4_qjl(const block_tq4_qjl * x, float * y, int64_t k) { tq_dequantize_row(GGML_TYPE_TQ4_QJL, x, y, k); }

void dequantize_row_tq_q(const block_tq_q * x, float * y, int64_t k) {
    for (int64_t b = 0; b < k / QK_TQ; ++b, y += QK_TQ) {
        memcpy(y, x[b].y, sizeof(x[b].y));
        tq_unrotate_block(y);
    }
}

void dequantize_row_tq_qjl_q(const block_tq_qjl_q * x, float * y, int64_t k) {
    for (int64_t b = 0; b < k / QK_TQ; ++b, y += QK_TQ) {
        for (int j = 0; j < QK_TQ; ++j) {
            y[j] = GGML_FP16_TO_FP32(x[b].y[j]);
        }
        tq_unrotate_block(y);
    }
}

// --- dot product ---------------------------------------------------------------------------------

float tq_vec_dot_ref(enum ggml_type type, int64_t n, const void * x, const void * q) {
    assert(n % QK_TQ == 0);
    float sum = 0.0f;
    tq_block_view v;
    for (int64_t b = 0; b < n / QK_TQ; ++b) {
        tq_view(type, x, b, &v);
        const float * c = tq_centroids(v.mse_bits);
        float s = 0.0f;
        if (v.signs) {
            const block_tq_qjl_q * qb = (const block_tq_qjl_q *) q + b;
            for (int j = 0; j < QK_TQ; ++j) {
                s += c[v.idx[j]] * GGML_FP16_TO_FP32(qb->y[j]);
            }
            float t = 0.0f;
            for (int i = 0; i < TQ_QJL_M; ++i) {
                const float sy = GGML_FP16_TO_FP32(qb->sy[i]);
                t += (v.signs[i / 8] >> (i % 8)) & 1 ? sy : -sy;
            }
            s += v.gamma * TQ_SQRT_HALF_PI / TQ_QJL_M * t;
        } else {
            const block_tq_q * qb = (const block_tq_q *) q + b;
            for (int j = 0; j < QK_TQ; ++j) {
                s += c[v.idx[j]] * qb->y[j];
            }
        }
        sum += v.d * s;
    }
    return sum;
}

// --- tq3c (tq-blocks.h) -----------------------------------------------------------------------

static const float * const tq_gauss_centroids[TQ3C_MAX_BITS + 1] = {
    NULL, tq_gauss_centroids_1, tq_gauss_centroids_2, tq_gauss_centroids_3, tq_gauss_centroids_4,
    tq_gauss_centroids_5, tq_gauss_centroids_6, tq_gauss_centroids_7,
};
static const float * const tq_gauss_boundaries[TQ3C_MAX_BITS + 1] = {
    NULL, tq_gauss_boundaries_1, tq_gauss_boundaries_2, tq_gauss_boundaries_3, tq_gauss_boundaries_4,
    tq_gauss_boundaries_5, tq_gauss_boundaries_6, tq_gauss_boundaries_7,
};

// step 5 of tq-blocks.h: the block as tq3 where that is closer to z by the profile's weights
static void tq3c_or_tq3(const float * z, block_tq3c * blk) {
    static_assert(sizeof(block_tq3) == sizeof(block_tq3c), "a tq3c block holds a tq3 block");
    float zc[QK_TQ], z3[QK_TQ];
    block_tq3 t;
    dequantize_row_tq3c(blk, zc, QK_TQ);
    quantize_row_tq3_ref(z, &t, QK_TQ);
    dequantize_row_tq3(&t, z3, QK_TQ);
    double ec = 0.0, e3 = 0.0;
    for (int j = 0; j < QK_TQ; ++j) {
        const double w = (double) (1u << (2*tq3c_profile[j]));
        const double dc = (double) (zc[j] - z[j]);
        const double d3 = (double) (z3[j] - z[j]);
        ec += w * (dc * dc);
        e3 += w * (d3 * d3);
    }
    if (e3 < ec) {
        memcpy(blk, &t, sizeof(t));
        blk->d = (ggml_fp16_t) (t.d | 0x8000);
    }
}

void quantize_row_tq3c_ref(const float * x, block_tq3c * y, int64_t k) {
    assert(k % QK_TQ == 0);
    for (int64_t b = 0; b < k / QK_TQ; ++b) {
        const float * z = x + b*QK_TQ;
        block_tq3c * blk = y + b;
        memset(blk, 0, sizeof(*blk));
        double s = 0.0;
        for (int j = 0; j < QK_TQ; ++j) {
            s += (double) z[j] * (double) z[j];
        }
        if (!isfinite(s)) {
            blk->d = TQ_FP16_NAN;
            continue;
        }
        blk->d = GGML_FP32_TO_FP16((float) sqrt(s / QK_TQ));
        const float g = GGML_FP16_TO_FP32(blk->d);
        if (g == 0.0f) {
            blk->d = 0;   // -0 too: every byte 0
            continue;
        }
        int off = 0;
        for (int j = 0; j < QK_TQ; ++j) {
            const int bits = tq3c_profile[j];
            if (bits == 0) {
                continue;
            }
            const float u = z[j] / g;
            const float * bd = tq_gauss_boundaries[bits];
            uint32_t idx = 0;
            for (int i = 0; i < (1 << bits) - 1; ++i) {
                idx += u > bd[i];
            }
            for (int i = 0; i < bits; ++i, ++off) {
                blk->qs[off / 8] |= (uint8_t) (((idx >> i) & 1u) << (off % 8));
            }
        }
        if (isfinite(g)) {
            tq3c_or_tq3(z, blk);
        }
    }
}

void dequantize_row_tq3c(const block_tq3c * x, float * y, int64_t k) {
    assert(k % QK_TQ == 0);
    for (int64_t b = 0; b < k / QK_TQ; ++b) {
        const block_tq3c * blk = x + b;
        if (blk->d & 0x8000) {   // a tq3 block (tq-blocks.h, tq3c step 5)
            block_tq3 t;
            memcpy(&t, blk, sizeof(t));
            t.d = (ggml_fp16_t) (t.d & 0x7FFF);
            dequantize_row_tq3(&t, y + b*QK_TQ, QK_TQ);
            continue;
        }
        const float g = GGML_FP16_TO_FP32(blk->d);
        int off = 0;
        for (int j = 0; j < QK_TQ; ++j) {
            const int bits = tq3c_profile[j];
            uint32_t idx = 0;
            for (int i = 0; i < bits; ++i, ++off) {
                idx |= (uint32_t) ((blk->qs[off / 8] >> (off % 8)) & 1u) << i;
            }
            y[b*QK_TQ + j] = g * (bits == 0 ? 0.0f : tq_gauss_centroids[bits][idx]);
        }
    }
}

// --- tq2o, tq3o: the outlier split (tq-blocks.h) ------------------------------------------------

tq_split_layout tq_split_layout_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_TQ2O: {
            const tq_split_layout l = { sizeof(block_tq2o), { 4, 2 }, { tq_split_centroids_16_4, tq_split_centroids_48_2 },
                                        { tq_split_boundaries_16_4, tq_split_boundaries_48_2 } };
            return l;
        }
        case GGML_TYPE_TQ3O: {
            const tq_split_layout l = { sizeof(block_tq3o), { 5, 3 }, { tq_split_centroids_16_5, tq_split_centroids_48_3 },
                                        { tq_split_boundaries_16_5, tq_split_boundaries_48_3 } };
            return l;
        }
        default: GGML_ABORT("%s is not an outlier-split type", ggml_type_name(type));
    }
}

// bit offset of position j's index in qs
static inline int tq_split_offset(const tq_split_layout * l, int j) {
    return j < TQ_SPLIT_HI ? j*l->bits[0] : TQ_SPLIT_HI*l->bits[0] + (j - TQ_SPLIT_HI)*l->bits[1];
}

void tq_split_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k) {
    assert(k % QK_TQ == 0);
    const tq_split_layout l = tq_split_layout_of(type);
    for (int64_t b = 0; b < k / QK_TQ; ++b) {
        const float * z = x + b*QK_TQ;
        uint8_t * blk = (uint8_t *) y + b*l.size;
        memset(blk, 0, l.size);
        uint8_t * qs = blk + 2*sizeof(ggml_fp16_t);
        for (int g = 0; g < 2; ++g) {
            const int j0 = g == 0 ? 0 : TQ_SPLIT_HI, j1 = g == 0 ? TQ_SPLIT_HI : QK_TQ;
            ggml_fp16_t d = 0;
            double s = 0.0;
            for (int j = j0; j < j1; ++j) {
                s += (double) z[j] * (double) z[j];
            }
            const float n = (float) sqrt(s);
            if (!isfinite(s)) {
                d = TQ_FP16_NAN;
            } else if (n != 0.0f) {
                double c = 0.0;
                for (int j = j0; j < j1; ++j) {
                    const float u = z[j] / n;
                    uint32_t idx = 0;
                    for (int i = 0; i < (1 << l.bits[g]) - 1; ++i) {
                        idx += u > l.boundaries[g][i];
                    }
                    c += (double) l.centroids[g][idx] * (double) l.centroids[g][idx];
                    const int off = tq_split_offset(&l, j);
                    for (int i = 0; i < l.bits[g]; ++i) {
                        qs[(off + i) / 8] |= (uint8_t) (((idx >> i) & 1u) << ((off + i) % 8));
                    }
                }
                d = GGML_FP32_TO_FP16(n / (float) sqrt(c));
            }
            memcpy(blk + g*sizeof(d), &d, sizeof(d));
        }
    }
}

void tq_split_dequantize_row(enum ggml_type type, const void * x, float * y, int64_t k) {
    assert(k % QK_TQ == 0);
    const tq_split_layout l = tq_split_layout_of(type);
    for (int64_t b = 0; b < k / QK_TQ; ++b) {
        const uint8_t * blk = (const uint8_t *) x + b*l.size;
        const uint8_t * qs = blk + 2*sizeof(ggml_fp16_t);
        for (int g = 0; g < 2; ++g) {
            ggml_fp16_t d;
            memcpy(&d, blk + g*sizeof(d), sizeof(d));
            const float n = GGML_FP16_TO_FP32(d);
            const int j0 = g == 0 ? 0 : TQ_SPLIT_HI, j1 = g == 0 ? TQ_SPLIT_HI : QK_TQ;
            for (int j = j0; j < j1; ++j) {
                const int off = tq_split_offset(&l, j);
                uint32_t idx = 0;
                for (int i = 0; i < l.bits[g]; ++i) {
                    idx |= (uint32_t) ((qs[(off + i) / 8] >> ((off + i) % 8)) & 1u) << i;
                }
                y[b*QK_TQ + j] = n * l.centroids[g][idx];
            }
        }
    }
}

void quantize_row_tq2o_ref(const float * x, block_tq2o * y, int64_t k) { tq_split_quantize_row(GGML_TYPE_TQ2O, x, y, k); }
void quantize_row_tq3o_ref(const float * x, block_tq3o * y, int64_t k) { tq_split_quantize_row(GGML_TYPE_TQ3O, x, y, k); }
void dequantize_row_tq2o(const block_tq2o * x, float * y, int64_t k) { tq_split_dequantize_row(GGML_TYPE_TQ2O, x, y, k); }
void dequantize_row_tq3o(const block_tq3o * x, float * y, int64_t k) { tq_split_dequantize_row(GGML_TYPE_TQ3O, x, y, k); }
