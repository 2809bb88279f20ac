// The CUDA kernels of ggml_tq/tq-cuda.cu against the C reference (ggml_tq/tq.c) and the CPU attention
// path (ggml_tq/tq-cpu.c), built without llama.cpp (tests/native/include, ggml_stub.c), then timed.
//
//   quantize:   tq_cuda_set_rows (f32 and f16 rows, I64 and I32 row indices) writes the bytes of
//               quantize_row_tqN_ref for tq2/tq3/tq4 on every block: random, outlier-heavy,
//               NaN/Inf/zero/denormal/huge rows. One differing byte fails. tq_cuda_set_rows_pair
//               (a layer's K and V in one launch) writes the same bytes for every pair of types.
//   dequantize: tq_cuda_get_rows to f32 equals dequantize_row_tqN (normal domain) and
//               tq_dequantize_row_rotated_ref (rotated) bit for bit, to f16 their values rounded to
//               nearest even, through indices and (rotated: the prompt path's copy, 8 threads a block)
//               without them; tq_cuda_rotate_rows equals tq_rotate_block / tq_unrotate_block.
//   attention:  tq_cuda_fattn against a float64 softmax(q.k) v over the decoded rows (the exact
//               sink row in its cell, NaN rows, masks, ALiBi, soft-cap, sinks), within a bound from
//               float32 rounding, and against tq_cpu_attn_rows (tq-cpu.c) for the TQ pairs.
//   timing:     (--time) device-to-device copy bandwidth, then tq_cuda_fattn at Llama-3.1-8B's shape
//               (32 q heads, 8 KV heads, d 128) for KV 4K/32K/64K, f16/f16 of the same design
//               beside the TQ pairs; quantize and dequantize throughput.
//
// Usage: tq_cuda_check [--quick] [--time] [--rows N]; prints "N passed, M failed", exits 1 on failure.
#define _Noreturn [[noreturn]]
#include "tq.h"
#include "ggml-impl.h"
#include "tq-cuda.h"
#include "tq-cuda.cuh"   // the tensor-core kernel's fragment decoders, checked one by one below

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <iterator>
#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(2); } } while (0)
#define CKI(x) CK((cudaError_t) (x))

static int n_pass = 0, n_fail = 0;

static void check(bool ok, const char * fmt, ...) {
    if (ok) { ++n_pass; return; }
    ++n_fail;
    if (n_fail <= 60) {
        va_list ap; va_start(ap, fmt);
        fputs("FAIL ", stdout); vprintf(fmt, ap); fputc('\n', stdout);
        va_end(ap);
    }
}

// --- data ---------------------------------------------------------------------------------------------

static uint64_t rng_state = 0x1234567;
static uint64_t splitmix64() {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static double uniform() { return (double) (splitmix64() >> 11) * 0x1p-53; }
static double gauss() {
    const double u1 = uniform() + 0x1p-60, u2 = uniform();
    return sqrt(-2.0*log(u1))*cos(6.283185307179586*u2);
}

static const char * KINDS[] = {
    "gaussian", "block_scales", "outlier_channel", "few_outliers", "one_hot", "zeros", "nan", "inf",
    "denormal", "huge", "uniform", "constant", "half_zero", "small_integers", "heavy_tailed", "neg_zero_tiny",
};
enum { N_KINDS = sizeof(KINDS) / sizeof(KINDS[0]) };

// one 64-value block of the given kind
static void make_block(int kind, float * x) {
    const double bs = pow(10.0, -6.0 + 12.0*uniform());
    for (int j = 0; j < 64; ++j) {
        switch (kind) {
            case 1:  x[j] = (float) (gauss()*bs); break;
            case 4: case 5: x[j] = 0.0f; break;
            case 8:  x[j] = (float) (gauss()*1e-41); break;             // float32 denormals
            case 9:  x[j] = (float) (gauss()*3e37); break;              // the FWHT can overflow
            case 10: x[j] = (float) (2.0*uniform() - 1.0); break;
            case 11: x[j] = 0.75f; break;
            case 13: x[j] = (float) ((int) (7.0*uniform()) - 3); break;  // exact sums, ties
            case 14: x[j] = (float) (gauss()/(0.02 + uniform())); break;
            case 15: x[j] = (j & 1) ? -0.0f : (float) (gauss()*1e-30); break;
            default: x[j] = (float) gauss(); break;
        }
    }
    if (kind == 2) x[splitmix64() % 64] *= 1000.0f;
    if (kind == 3) for (int i = 0; i < 3; ++i) x[splitmix64() % 64] *= 100.0f;
    if (kind == 4) x[splitmix64() % 64] = (float) (0.5 + 4.5*uniform());
    if (kind == 6) x[splitmix64() % 64] = NAN;
    if (kind == 7) x[splitmix64() % 64] = (splitmix64() & 1) ? INFINITY : -INFINITY;
    if (kind == 12) for (int j = 0; j < 32; ++j) x[j] = 0.0f;
}

static const int TQ_TYPES[3] = { TQ_CUDA_TYPE_TQ2, TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ4 };
static const char * tname(int t) {
    switch (t) {
        case TQ_CUDA_TYPE_F16: return "f16"; case TQ_CUDA_TYPE_Q8_0: return "q8_0";
        case TQ_CUDA_TYPE_TQ2: return "tq2"; case TQ_CUDA_TYPE_TQ3: return "tq3"; case TQ_CUDA_TYPE_TQ4: return "tq4";
        default: return "?";
    }
}
static size_t row_bytes(int t, int64_t n) {
    switch (t) {
        case TQ_CUDA_TYPE_F16: return 2*n;
        case TQ_CUDA_TYPE_Q8_0: return n/32*34;
        case TQ_CUDA_TYPE_TQ2: return n/64*18;
        case TQ_CUDA_TYPE_TQ3: return n/64*26;
        default: return n/64*34;
    }
}

static void ref_quantize(int t, const float * x, void * y, int64_t n) {
    switch (t) {
        case TQ_CUDA_TYPE_TQ2: quantize_row_tq2_ref(x, (block_tq2 *) y, n); break;
        case TQ_CUDA_TYPE_TQ3: quantize_row_tq3_ref(x, (block_tq3 *) y, n); break;
        default:               quantize_row_tq4_ref(x, (block_tq4 *) y, n); break;
    }
}
static void ref_dequantize(int t, const void * x, float * y, int64_t n) {
    switch (t) {
        case TQ_CUDA_TYPE_TQ2: dequantize_row_tq2((const block_tq2 *) x, y, n); break;
        case TQ_CUDA_TYPE_TQ3: dequantize_row_tq3((const block_tq3 *) x, y, n); break;
        default:               dequantize_row_tq4((const block_tq4 *) x, y, n); break;
    }
}

// the quantizer variants of tq_quantize_row_with and the flags that ask the kernels for the same
struct quant_variant {
    const char * name;
    tq_quantize_options opt;
    unsigned flags;
};
static const quant_variant VARIANTS[3] = {
    { "product", { true, true }, 0u },
    { "scale search off", { true, false }, TQ_CUDA_NO_SCALE_SEARCH },
    { "norm correction off", { false, false }, TQ_CUDA_NO_NORM_CORRECTION },
};

static tq_cuda_tensor tensor(const void * data, int64_t n0, int64_t n1, int64_t n2, int64_t n3,
                             size_t b0, size_t b1, size_t b2, size_t b3) {
    tq_cuda_tensor t;
    t.data = data;
    t.ne[0] = n0; t.ne[1] = n1; t.ne[2] = n2; t.ne[3] = n3;
    t.nb[0] = b0; t.nb[1] = b1; t.nb[2] = b2; t.nb[3] = b3;
    return t;
}

static bool same_float(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, 4); memcpy(&y, &b, 4);
    return x == y || (std::isnan(a) && std::isnan(b));
}
static bool same_half(uint16_t a, uint16_t b) {
    const bool na = (a & 0x7c00) == 0x7c00 && (a & 0x3ff), nb = (b & 0x7c00) == 0x7c00 && (b & 0x3ff);
    return a == b || (na && nb);
}

// --- 1, 2: quantize and dequantize ---------------------------------------------------------------------

static void check_rows(int64_t n_rows) {
    const int64_t N = 128;                       // two blocks a row
    const int64_t nb = N / 64;
    std::vector<float> x(n_rows*N);
    std::vector<int> kind(n_rows*nb);
    for (int64_t b = 0; b < n_rows*nb; ++b) {
        kind[b] = (int) (b % N_KINDS);
        make_block(kind[b], &x[b*64]);
    }
    // the f16 source: the same values rounded, and the reference quantizes their float32 values
    std::vector<uint16_t> xh(n_rows*N);
    std::vector<float> xhf(n_rows*N);
    for (int64_t i = 0; i < n_rows*N; ++i) {
        xh[i] = GGML_FP32_TO_FP16(x[i]);
        xhf[i] = GGML_FP16_TO_FP32(xh[i]);
    }
    // destination rows: a permutation (set_rows scatters)
    std::vector<int64_t> perm(n_rows);
    for (int64_t i = 0; i < n_rows; ++i) perm[i] = i;
    for (int64_t i = n_rows - 1; i > 0; --i) std::swap(perm[i], perm[splitmix64() % (uint64_t) (i + 1)]);
    std::vector<int32_t> perm32(perm.begin(), perm.end());

    float * d_x; uint16_t * d_xh; int64_t * d_perm; int32_t * d_perm32; uint8_t * d_q;
    CK(cudaMalloc(&d_x, x.size()*4));
    CK(cudaMalloc(&d_xh, xh.size()*2));
    CK(cudaMalloc(&d_perm, n_rows*8));
    CK(cudaMalloc(&d_perm32, n_rows*4));
    CK(cudaMalloc(&d_q, n_rows*row_bytes(TQ_CUDA_TYPE_TQ4, N)));
    CK(cudaMemcpy(d_x, x.data(), x.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_xh, xh.data(), xh.size()*2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_perm, perm.data(), n_rows*8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_perm32, perm32.data(), n_rows*4, cudaMemcpyHostToDevice));
    printf("quantize: %lld rows of %lld values (%lld blocks, %d kinds)\n",
           (long long) n_rows, (long long) N, (long long) (n_rows*nb), (int) N_KINDS);

    for (int t : TQ_TYPES) {
        const size_t rb = row_bytes(t, N), bb = rb / nb;
        std::vector<uint8_t> ref(n_rows*rb), got(n_rows*rb), refh(n_rows*rb);
        const size_t dnb[4] = { bb, rb, rb*n_rows, rb*n_rows };
        for (const quant_variant & qv : VARIANTS) {
            // the variants on fewer rows: they share every step but one with the product
            const int64_t nr = qv.flags ? std::min<int64_t>(n_rows, 16384) : n_rows;
            for (int64_t r = 0; r < nr; ++r) {
                if (qv.flags) {
                    tq_quantize_row_with((enum ggml_type) t, &x[r*N], &ref[perm[r]*rb], N, &qv.opt);
                    tq_quantize_row_with((enum ggml_type) t, &xhf[r*N], &refh[r*rb], N, &qv.opt);
                } else {
                    ref_quantize(t, &x[r*N], &ref[perm[r]*rb], N);
                    ref_quantize(t, &xhf[r*N], &refh[r*rb], N);
                }
            }
            for (int src = 0; src < 2; ++src) {
                CK(cudaMemset(d_q, 0xA5, n_rows*rb));  // poison: every byte must be written
                if (src == 0) {
                    // nr source rows scattered through perm (the rows past nr are not written)
                    CKI(tq_cuda_set_rows(t, tensor(d_x, N, nr, 1, 1, 4, N*4, N*4*nr, N*4*nr), TQ_CUDA_TYPE_F32,
                                         tensor(d_perm, nr, 1, 1, 1, 8, 8*nr, 8*nr, 8*nr), false, d_q, dnb, qv.flags, nullptr));
                } else {
                    CKI(tq_cuda_set_rows(t, tensor(d_xh, N, nr, 1, 1, 2, N*2, N*2*nr, N*2*nr), TQ_CUDA_TYPE_F16,
                                         tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0), true, d_q, dnb, qv.flags, nullptr));
                }
                CK(cudaDeviceSynchronize());
                CK(cudaMemcpy(got.data(), d_q, n_rows*rb, cudaMemcpyDeviceToHost));
                const std::vector<uint8_t> & want = src == 0 ? ref : refh;
                std::vector<int64_t> bad(N_KINDS, 0);
                int64_t n_bad = 0;
                for (int64_t r = 0; r < nr; ++r) {
                    const int64_t dr = src == 0 ? perm[r] : r;
                    for (int64_t b = 0; b < nb; ++b) {
                        if (memcmp(&want[dr*rb + b*bb], &got[dr*rb + b*bb], bb) != 0) {
                            ++bad[kind[r*nb + b]];
                            if (++n_bad <= 3) {
                                printf("  %s %s %s row %lld block %lld (%s): want", tname(t), src ? "f16" : "f32", qv.name, (long long) r, (long long) b, KINDS[kind[r*nb + b]]);
                                for (size_t i = 0; i < bb; ++i) printf(" %02x", want[dr*rb + b*bb + i]);
                                printf("\n  got ");
                                for (size_t i = 0; i < bb; ++i) printf(" %02x", got[dr*rb + b*bb + i]);
                                printf("\n");
                            }
                        }
                    }
                }
                for (int k = 0; k < N_KINDS; ++k) {
                    check(bad[k] == 0, "quantize %s from %s (%s), %s blocks: %lld differ from the reference", tname(t),
                          src ? "f16" : "f32", qv.name, KINDS[k], (long long) bad[k]);
                }
                printf("  quantize %-4s from %s (%s): %lld of %lld blocks differ\n", tname(t), src ? "f16" : "f32", qv.name,
                       (long long) n_bad, (long long) (nr*nb));
            }
        }
        // the product's bytes again (the last variant overwrote them)
        for (int64_t r = 0; r < n_rows; ++r) ref_quantize(t, &x[r*N], &ref[perm[r]*rb], N);

        // dequantize the reference bytes (GPU rows = ref rows gathered through perm32: dst row r <- src row perm[r])
        CK(cudaMemcpy(d_q, ref.data(), n_rows*rb, cudaMemcpyHostToDevice));
        std::vector<float> want_n(n_rows*N), want_r(n_rows*N), got_f(n_rows*N);
        std::vector<uint16_t> got_h(n_rows*N);
        for (int64_t r = 0; r < n_rows; ++r) {
            ref_dequantize(t, &ref[perm[r]*rb], &want_n[r*N], N);
            tq_dequantize_row_rotated_ref((enum ggml_type) t, &ref[perm[r]*rb], &want_r[r*N], N);
        }
        float * d_f; uint16_t * d_h;
        CK(cudaMalloc(&d_f, n_rows*N*4));
        CK(cudaMalloc(&d_h, n_rows*N*2));
        const int64_t dne[4] = { N, n_rows, 1, 1 };
        const size_t fnb[4] = { 4, (size_t) N*4, (size_t) N*4*n_rows, (size_t) N*4*n_rows };
        const size_t hnb[4] = { 2, (size_t) N*2, (size_t) N*2*n_rows, (size_t) N*2*n_rows };
        const tq_cuda_tensor qsrc = tensor(d_q, N, n_rows, 1, 1, bb, rb, rb*n_rows, rb*n_rows);
        const tq_cuda_tensor gidx = tensor(d_perm32, n_rows, 1, 1, 1, 4, 4*n_rows, 4*n_rows, 4*n_rows);
        // without indices, rows in a 3D shape (n_rows/4, 4): dst row r = src row r (the prompt path's copy)
        std::vector<float> want_r0(n_rows*N);
        for (int64_t r = 0; r < n_rows; ++r) tq_dequantize_row_rotated_ref((enum ggml_type) t, &ref[r*rb], &want_r0[r*N], N);
        const int64_t n4 = n_rows / 4;
        const int64_t dne3[4] = { N, n4, 4, 1 };
        const size_t fnb3[4] = { 4, (size_t) N*4, (size_t) N*4*n4, (size_t) N*4*n_rows };
        const size_t hnb3[4] = { 2, (size_t) N*2, (size_t) N*2*n4, (size_t) N*2*n_rows };
        const tq_cuda_tensor qsrc3 = tensor(d_q, N, n4, 4, 1, bb, rb, rb*n4, rb*n_rows);
        const tq_cuda_tensor no_idx = tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0);
        // f32 normal, f32 rotated, f16 normal (through indices); f32 and f16 rotated without them
        for (int mode = 0; mode < 5; ++mode) {
            int64_t n_bad = 0;
            if (mode >= 3) {
                void * d = mode == 3 ? (void *) d_f : (void *) d_h;
                const size_t vb = mode == 3 ? 4 : 2;
                CK(cudaMemset(d, 0xA5, n_rows*N*vb));
                CKI(tq_cuda_get_rows(t, qsrc3, no_idx, true, d, mode == 3 ? TQ_CUDA_TYPE_F32 : TQ_CUDA_TYPE_F16, dne3,
                                     mode == 3 ? fnb3 : hnb3, true, nullptr));
                CK(cudaDeviceSynchronize());
                if (mode == 3) {
                    CK(cudaMemcpy(got_f.data(), d_f, n_rows*N*4, cudaMemcpyDeviceToHost));
                    for (int64_t i = 0; i < n_rows*N; ++i) n_bad += !same_float(want_r0[i], got_f[i]);
                } else {
                    CK(cudaMemcpy(got_h.data(), d_h, n_rows*N*2, cudaMemcpyDeviceToHost));
                    for (int64_t i = 0; i < n_rows*N; ++i) n_bad += !same_half(GGML_FP32_TO_FP16(want_r0[i]), got_h[i]);
                }
            } else if (mode < 2) {
                CK(cudaMemset(d_f, 0xA5, n_rows*N*4));
                CKI(tq_cuda_get_rows(t, qsrc, gidx, true, d_f, TQ_CUDA_TYPE_F32, dne, fnb, mode == 1, nullptr));
                CK(cudaDeviceSynchronize());
                CK(cudaMemcpy(got_f.data(), d_f, n_rows*N*4, cudaMemcpyDeviceToHost));
                const std::vector<float> & w = mode == 0 ? want_n : want_r;
                for (int64_t i = 0; i < n_rows*N; ++i) n_bad += !same_float(w[i], got_f[i]);
            } else {
                CK(cudaMemset(d_h, 0xA5, n_rows*N*2));
                CKI(tq_cuda_get_rows(t, qsrc, gidx, true, d_h, TQ_CUDA_TYPE_F16, dne, hnb, false, nullptr));
                CK(cudaDeviceSynchronize());
                CK(cudaMemcpy(got_h.data(), d_h, n_rows*N*2, cudaMemcpyDeviceToHost));
                for (int64_t i = 0; i < n_rows*N; ++i) n_bad += !same_half(GGML_FP32_TO_FP16(want_n[i]), got_h[i]);
            }
            const char * mname[5] = { "f32", "f32 rotated", "f16", "f32 rot. 3D", "f16 rot. 3D" };
            check(n_bad == 0, "dequantize %s to %s: %lld values differ from the reference", tname(t), mname[mode], (long long) n_bad);
            printf("  dequantize %-4s to %-11s: %lld of %lld values differ\n", tname(t), mname[mode], (long long) n_bad, (long long) (n_rows*N));
        }
        CK(cudaFree(d_f));
        CK(cudaFree(d_h));
    }

    // rotation of float32 rows in place, both ways
    {
        const int64_t n = std::min<int64_t>(n_rows, 8192);
        std::vector<float> y(x.begin(), x.begin() + n*N), got(n*N);
        for (float & v : y) if (!std::isfinite(v)) v = 1.0f;
        float * d_y;
        CK(cudaMalloc(&d_y, n*N*4));
        for (int inv = 0; inv < 2; ++inv) {
            std::vector<float> want(y);
            for (int64_t b = 0; b < n*nb; ++b) {
                if (inv) tq_unrotate_block(&want[b*64]); else tq_rotate_block(&want[b*64]);
            }
            CK(cudaMemcpy(d_y, y.data(), n*N*4, cudaMemcpyHostToDevice));
            const size_t ynb[4] = { 4, (size_t) N*4, (size_t) N*4*n, (size_t) N*4*n };
            CKI(tq_cuda_rotate_rows(tensor(d_y, N, n, 1, 1, 4, N*4, N*4*n, N*4*n), d_y, ynb, inv != 0, nullptr));
            CK(cudaMemcpy(got.data(), d_y, n*N*4, cudaMemcpyDeviceToHost));
            int64_t n_bad = 0;
            for (int64_t i = 0; i < n*N; ++i) n_bad += !same_float(want[i], got[i]);
            check(n_bad == 0, "tq_cuda_rotate_rows %s: %lld values differ", inv ? "inverse" : "forward", (long long) n_bad);
        }
        CK(cudaFree(d_y));
    }
    CK(cudaFree(d_x)); CK(cudaFree(d_xh)); CK(cudaFree(d_perm)); CK(cudaFree(d_perm32)); CK(cudaFree(d_q));
}

// --- 3: attention --------------------------------------------------------------------------------------

static void quantize_any(int t, const float * x, uint8_t * y, int64_t n) {
    if (t == TQ_CUDA_TYPE_F16) {
        for (int64_t j = 0; j < n; ++j) ((uint16_t *) y)[j] = GGML_FP32_TO_FP16(x[j]);
    } else if (t == TQ_CUDA_TYPE_Q8_0) {
        for (int64_t b = 0; b < n/32; ++b) {
            float amax = 0.0f;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, fabsf(x[b*32 + j]));
            const float d = amax / 127.0f, id = d != 0.0f ? 1.0f/d : 0.0f;
            const uint16_t dh = GGML_FP32_TO_FP16(d);
            memcpy(y + b*34, &dh, 2);
            for (int j = 0; j < 32; ++j) ((int8_t *) (y + b*34 + 2))[j] = (int8_t) lrintf(x[b*32 + j]*id);
        }
    } else {
        ref_quantize(t, x, y, n);
    }
}
static void decode_any(int t, const uint8_t * y, float * x, int64_t n) {
    if (t == TQ_CUDA_TYPE_F16) {
        for (int64_t j = 0; j < n; ++j) x[j] = GGML_FP16_TO_FP32(((const uint16_t *) y)[j]);
    } else if (t == TQ_CUDA_TYPE_Q8_0) {
        for (int64_t b = 0; b < n/32; ++b) {
            uint16_t dh; memcpy(&dh, y + b*34, 2);
            const float d = GGML_FP16_TO_FP32(dh);
            for (int j = 0; j < 32; ++j) x[b*32 + j] = d*(float) ((const int8_t *) (y + b*34 + 2))[j];
        }
    } else {
        ref_dequantize(t, y, x, n);
    }
}

// --- 1b: two SET_ROWS in one launch (a decoding step's K and V) ------------------------------------

// tq_cuda_set_rows_pair writes both ops' bytes as the reference does, for every pair of types, from
// f32 rows through I64 indices and from f16 rows without indices; the K and V sources are other rows
static void check_set_rows_pair(int64_t n_rows) {
    const int64_t N = 128, nb = N / 64;
    std::vector<float> x(2*n_rows*N);
    for (int64_t b = 0; b < 2*n_rows*nb; ++b) make_block((int) (b % N_KINDS), &x[b*64]);
    std::vector<uint16_t> xh(x.size());
    std::vector<float> xhf(x.size());
    for (size_t i = 0; i < x.size(); ++i) { xh[i] = GGML_FP32_TO_FP16(x[i]); xhf[i] = GGML_FP16_TO_FP32(xh[i]); }
    std::vector<int64_t> perm(n_rows);
    for (int64_t i = 0; i < n_rows; ++i) perm[i] = i;
    for (int64_t i = n_rows - 1; i > 0; --i) std::swap(perm[i], perm[splitmix64() % (uint64_t) (i + 1)]);
    float * d_x; uint16_t * d_xh; int64_t * d_perm; uint8_t * d_q[2];
    CK(cudaMalloc(&d_x, x.size()*4));
    CK(cudaMalloc(&d_xh, xh.size()*2));
    CK(cudaMalloc(&d_perm, n_rows*8));
    for (int o = 0; o < 2; ++o) CK(cudaMalloc(&d_q[o], n_rows*row_bytes(TQ_CUDA_TYPE_TQ4, N)));
    CK(cudaMemcpy(d_x, x.data(), x.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_xh, xh.data(), xh.size()*2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_perm, perm.data(), n_rows*8, cudaMemcpyHostToDevice));
    int64_t n_bad = 0, n_blocks = 0;
    for (int t0 : TQ_TYPES) {
        for (int t1 : TQ_TYPES) {
            const int ts[2] = { t0, t1 };
            for (int src = 0; src < 2; ++src) {
                tq_cuda_set_rows_op ops[2];
                std::vector<uint8_t> want[2];
                for (int o = 0; o < 2; ++o) {
                    const size_t rb = row_bytes(ts[o], N), bb = rb / nb;
                    // op o reads rows [o*n_rows, (o + 1)*n_rows)
                    const float * xs = (src == 0 ? x.data() : xhf.data()) + o*n_rows*N;
                    want[o].resize(n_rows*rb);
                    for (int64_t r = 0; r < n_rows; ++r) ref_quantize(ts[o], xs + r*N, &want[o][(src == 0 ? perm[r] : r)*rb], N);
                    ops[o].dst_type = ts[o];
                    if (src == 0) {
                        ops[o].src = tensor(d_x + o*n_rows*N, N, n_rows, 1, 1, 4, N*4, N*4*n_rows, N*4*n_rows);
                        ops[o].src_type = TQ_CUDA_TYPE_F32;
                        ops[o].idx = tensor(d_perm, n_rows, 1, 1, 1, 8, 8*n_rows, 8*n_rows, 8*n_rows);
                        ops[o].idx_i32 = false;
                    } else {
                        ops[o].src = tensor(d_xh + o*n_rows*N, N, n_rows, 1, 1, 2, N*2, N*2*n_rows, N*2*n_rows);
                        ops[o].src_type = TQ_CUDA_TYPE_F16;
                        ops[o].idx = tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0);
                        ops[o].idx_i32 = true;
                    }
                    ops[o].dst = d_q[o];
                    const size_t dnb[4] = { bb, rb, rb*n_rows, rb*n_rows };
                    memcpy(ops[o].dst_nb, dnb, sizeof(dnb));
                    CK(cudaMemset(d_q[o], 0xA5, n_rows*rb));
                }
                CKI(tq_cuda_set_rows_pair(ops, 0, nullptr));
                CK(cudaDeviceSynchronize());
                for (int o = 0; o < 2; ++o) {
                    const size_t rb = row_bytes(ts[o], N), bb = rb / nb;
                    std::vector<uint8_t> got(n_rows*rb);
                    CK(cudaMemcpy(got.data(), d_q[o], got.size(), cudaMemcpyDeviceToHost));
                    for (int64_t b = 0; b < n_rows*nb; ++b) {
                        n_bad += memcmp(&got[b*bb], &want[o][b*bb], bb) != 0;
                    }
                    n_blocks += n_rows*nb;
                }
            }
        }
    }
    // mixed source types are refused, and write nothing
    tq_cuda_set_rows_op mixed[2];
    memset(mixed, 0, sizeof(mixed));
    mixed[0].dst_type = mixed[1].dst_type = TQ_CUDA_TYPE_TQ3;
    mixed[0].src_type = TQ_CUDA_TYPE_F32; mixed[1].src_type = TQ_CUDA_TYPE_F16;
    check(tq_cuda_set_rows_pair(mixed, 0, nullptr) != 0, "set_rows_pair: mixed source types are refused");
    check(n_bad == 0, "set_rows_pair: %lld of %lld blocks differ from the reference", (long long) n_bad, (long long) n_blocks);
    printf("  set_rows_pair (9 type pairs, f32 + I64 indices, f16 without): %lld of %lld blocks differ\n", (long long) n_bad, (long long) n_blocks);
    CK(cudaFree(d_x)); CK(cudaFree(d_xh)); CK(cudaFree(d_perm)); CK(cudaFree(d_q[0])); CK(cudaFree(d_q[1]));
}

// --- 2b: the tensor-core kernel's fragment decoders ---------------------------------------------------
//
// Each lane of a warp decodes its part of a block as mma fragments (tq-cuda-fattn-mma.cuh): the K
// fragments (16 dims of one cell) and the V fragments (8 dims of two cells). Put back at the dims
// tq_mma_k_dim / tq_mma_v_dim name, they must be the f16 centroids of the block's indices, for
// blocks whose bit planes start 4-byte aligned and not.

template <int BITS, bool ALIGNED>
__global__ void frag_decode_kernel(const uint8_t * blk_a, const uint8_t * blk_b, const tq_cuda_tables tab,
                                   uint16_t * k_out, uint16_t * va_out, uint16_t * vb_out) {
    const int lane = threadIdx.x, g = lane >> 2, c = lane & 3;
    const tq_h16_lut<BITS> u = tq_make_h16_lut<BITS>(tab);
    uint32_t r[8];
    tq_mma_k_frag<BITS, ALIGNED>(u, blk_a, c, r);
    if (g == 0) {
        for (int i = 0; i < 8; ++i) {
            k_out[tq_mma_k_dim<BITS>(i, c, 0)] = (uint16_t) (r[i] & 0xffff);
            k_out[tq_mma_k_dim<BITS>(i, c, 1)] = (uint16_t) (r[i] >> 16);
        }
    }
    tq_mma_v_frag<BITS>(u, blk_a, blk_b, g, r);
    if (c == 0) {
        for (int t = 0; t < 8; ++t) {
            va_out[tq_mma_v_dim(t, g)] = (uint16_t) (r[t] & 0xffff);
            vb_out[tq_mma_v_dim(t, g)] = (uint16_t) (r[t] >> 16);
        }
    }
}

static void check_fragments() {
    tq_cuda_tables tab;
    memset(&tab, 0, sizeof(tab));
    memcpy(tab.c[0], tq_centroids_2, sizeof(tq_centroids_2));
    memcpy(tab.c[1], tq_centroids_3, sizeof(tq_centroids_3));
    memcpy(tab.c[2], tq_centroids_4, sizeof(tq_centroids_4));
    uint8_t * d_blk; uint16_t * d_out;
    CK(cudaMalloc(&d_blk, 256)); CK(cudaMalloc(&d_out, 3*64*2));
    int bad = 0, n = 0;
    std::vector<float> x(64), want(64);
    for (int t : TQ_TYPES) {
        const size_t bb = row_bytes(t, 64);
        for (int trial = 0; trial < 64; ++trial) {
            uint8_t blk[2][64];
            for (int k = 0; k < 2; ++k) {
                for (float & v : x) v = (float) gauss();
                quantize_any(t, x.data(), blk[k], 64);
                blk[k][0] = 0x00; blk[k][1] = 0x3C;   // d = 1: the reference decodes to the centroids
            }
            for (int aligned = 0; aligned < 2; ++aligned) {
                // block at offset 0 (bit planes at 2 mod 4) or 2 (at 0 mod 4) of a 4-byte aligned buffer
                const int off = aligned ? 2 : 0;
                CK(cudaMemcpy(d_blk + off, blk[0], bb, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(d_blk + 128 + off, blk[1], bb, cudaMemcpyHostToDevice));
                const uint8_t * a = d_blk + off, * b = d_blk + 128 + off;
                uint16_t * ko = d_out, * vao = d_out + 64, * vbo = d_out + 128;
#define FRAG(B) (aligned ? frag_decode_kernel<B, true><<<1, 32>>>(a, b, tab, ko, vao, vbo) : frag_decode_kernel<B, false><<<1, 32>>>(a, b, tab, ko, vao, vbo))
                if (t == TQ_CUDA_TYPE_TQ2) FRAG(2); else if (t == TQ_CUDA_TYPE_TQ3) FRAG(3); else FRAG(4);
#undef FRAG
                CK(cudaGetLastError());
                uint16_t got[3][64];
                CK(cudaMemcpy(got, d_out, sizeof(got), cudaMemcpyDeviceToHost));
                for (int side = 0; side < 3; ++side) {
                    tq_dequantize_row_rotated_ref((enum ggml_type) t, blk[side == 2 ? 1 : 0], want.data(), 64);
                    for (int j = 0; j < 64; ++j) {
                        ++n;
                        if (got[side][j] != GGML_FP32_TO_FP16(want[j])) {
                            if (++bad <= 5) printf("  fragment %s %s side %d dim %d: %04x, want %04x\n", tname(t), aligned ? "aligned" : "unaligned",
                                                   side, j, got[side][j], GGML_FP32_TO_FP16(want[j]));
                        }
                    }
                }
            }
        }
    }
    CK(cudaFree(d_blk)); CK(cudaFree(d_out));
    check(bad == 0, "tensor-core fragment decoders: %d of %d values differ from the f16 centroids", bad, n);
    printf("fragments: %d values, %d differ\n", n, bad);
}

struct fa_case {
    int kt, vt, D, n_q, n_head, n_head_kv, n_kv, n_seq;
    int mask;          // 0 none, 1 causal with holes, 2 causal + finite values (ALiBi distances), 3 per-seq masks
    float max_bias, softcap;
    bool sinks, exact, nan_row;
    int n_split;       // 0: the library's choice
    int kernel = TQ_CUDA_FA_AUTO;   // TQ_CUDA_FA_VECTOR forces the float32 kernel on a TQ pair
};

// whether a case runs the tensor-core kernel (f16 centroids, f16 hi + lo queries, f16 weights)
static bool fa_case_mma(const fa_case & c) {
    return c.kernel != TQ_CUDA_FA_VECTOR && tq_cuda_fattn_mma_supported(c.kt, c.vt, c.D);
}

static std::string case_name(const fa_case & c) {
    char b[256];
    snprintf(b, sizeof(b), "%s/%s D%d q%d h%d/%d kv%d s%d mask%d%s%s%s%s%s split%d", tname(c.kt), tname(c.vt), c.D, c.n_q,
             c.n_head, c.n_head_kv, c.n_kv, c.n_seq, c.mask, c.max_bias > 0 ? " alibi" : "", c.softcap > 0 ? " softcap" : "",
             c.sinks ? " sinks" : "", c.exact ? " exact" : "", c.nan_row ? " nanrow" : "", c.n_split);
    if (c.kernel == TQ_CUDA_FA_VECTOR) return std::string(b) + " vector";
    return b;
}

static double max_err_tq_vs_ref = 0.0, max_err_cpu = 0.0;

static void check_fa(const fa_case & c, int n_sm) {
    const int D = c.D, gqa = c.n_head / c.n_head_kv;
    const int n_q_pad = (c.n_q + 7) / 8 * 8;
    const size_t kr = row_bytes(c.kt, D), vr = row_bytes(c.vt, D);
    // cache layout as llama.cpp's: [D, n_kv, n_head_kv, n_seq] with a cell's heads side by side
    const size_t knb1 = kr*c.n_head_kv, vnb1 = vr*c.n_head_kv;
    std::vector<uint8_t> K(knb1*c.n_kv*c.n_seq), V(vnb1*c.n_kv*c.n_seq);
    std::vector<float> Kd((size_t) D*c.n_kv*c.n_head_kv*c.n_seq), Vd(Kd.size());   // decoded, [seq][cell][head][D]
    std::vector<float> Kx((size_t) D*c.n_head_kv*c.n_seq), Vx(Kx.size());          // exact rows [seq][head*D]
    std::vector<int32_t> xcell(c.n_seq);
    std::vector<float> row(D);
    for (int s = 0; s < c.n_seq; ++s) {
        xcell[s] = c.exact ? (s % 2 == 0 ? 0 : c.n_kv / 3) : -1;
        for (int cell = 0; cell < c.n_kv; ++cell) {
            for (int h = 0; h < c.n_head_kv; ++h) {
                const size_t i = ((size_t) s*c.n_kv + cell)*c.n_head_kv + h;
                for (int j = 0; j < D; ++j) row[j] = (float) (gauss() + (j % 7 == 0 ? 3.0 : 0.0) + (cell == 0 ? 4.0 : 0.0));
                if (c.nan_row && cell == c.n_kv / 2 && h == 0) row[5] = NAN;
                quantize_any(c.kt, row.data(), &K[((size_t) s*c.n_kv + cell)*knb1 + h*kr], D);
                if (cell == xcell[s]) std::copy(row.begin(), row.end(), &Kx[((size_t) s*c.n_head_kv + h)*D]);
                for (int j = 0; j < D; ++j) row[j] = (float) gauss();
                if (c.nan_row && cell == c.n_kv / 2 + 1 && h == 0) row[9] = NAN;
                quantize_any(c.vt, row.data(), &V[((size_t) s*c.n_kv + cell)*vnb1 + h*vr], D);
                if (cell == xcell[s]) std::copy(row.begin(), row.end(), &Vx[((size_t) s*c.n_head_kv + h)*D]);
                decode_any(c.kt, &K[((size_t) s*c.n_kv + cell)*knb1 + h*kr], &Kd[i*D], D);
                decode_any(c.vt, &V[((size_t) s*c.n_kv + cell)*vnb1 + h*vr], &Vd[i*D], D);
            }
        }
    }
    std::vector<float> Q((size_t) D*c.n_q*c.n_head*c.n_seq);
    for (float & v : Q) v = (float) gauss();
    const int mne3 = c.mask == 3 ? c.n_seq : 1;
    std::vector<uint16_t> M((size_t) c.n_kv*n_q_pad*mne3);
    for (int s = 0; s < mne3; ++s) {
        for (int i = 0; i < n_q_pad; ++i) {
            for (int cell = 0; cell < c.n_kv; ++cell) {
                const int last = c.n_kv - c.n_q + i - (c.mask == 3 ? s*3 : 0);
                float m = cell <= last ? 0.0f : -INFINITY;
                if (m == 0.0f && cell % 13 == 5 && i % 2 == 1) m = -INFINITY;           // holes, different per row
                if (c.mask == 2 && m == 0.0f) m = -(float) ((last - cell) % 17) * 0.25f;
                if (c.nan_row && (cell == c.n_kv / 2 || cell == c.n_kv / 2 + 1) && i == 0) m = -INFINITY; // row 0 sees neither NaN row
                M[((size_t) s*n_q_pad + i)*c.n_kv + cell] = GGML_FP32_TO_FP16(m);
            }
        }
    }
    std::vector<float> sinks(c.n_head);
    for (float & v : sinks) v = (float) (gauss()*2.0);
    const float scale = 1.0f / sqrtf((float) D);

    // device
    float * d_q, * d_dst, * d_sinks, * d_xk, * d_xv; uint8_t * d_k, * d_v; uint16_t * d_m; int32_t * d_cell; void * d_work = nullptr;
    const size_t n_out = (size_t) D*c.n_head*c.n_q*c.n_seq;
    CK(cudaMalloc(&d_q, Q.size()*4)); CK(cudaMalloc(&d_dst, n_out*4)); CK(cudaMalloc(&d_sinks, sinks.size()*4));
    CK(cudaMalloc(&d_xk, Kx.size()*4)); CK(cudaMalloc(&d_xv, Vx.size()*4));
    CK(cudaMalloc(&d_k, K.size())); CK(cudaMalloc(&d_v, V.size())); CK(cudaMalloc(&d_m, M.size()*2)); CK(cudaMalloc(&d_cell, 4*c.n_seq));
    CK(cudaMemcpy(d_q, Q.data(), Q.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_sinks, sinks.data(), sinks.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_xk, Kx.data(), Kx.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_xv, Vx.data(), Vx.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_k, K.data(), K.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_v, V.data(), V.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_m, M.data(), M.size()*2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_cell, xcell.data(), 4*c.n_seq, cudaMemcpyHostToDevice));

    tq_cuda_fattn_args a;
    memset(&a, 0, sizeof(a));
    a.q = tensor(d_q, D, c.n_q, c.n_head, c.n_seq, 4, 4*D, 4*D*c.n_q, 4*D*c.n_q*c.n_head);
    a.k = tensor(d_k, D, c.n_kv, c.n_head_kv, c.n_seq, 0, knb1, kr, knb1*c.n_kv);
    a.v = tensor(d_v, D, c.n_kv, c.n_head_kv, c.n_seq, 0, vnb1, vr, vnb1*c.n_kv);
    a.k_type = c.kt; a.v_type = c.vt;
    if (c.mask) a.mask = tensor(d_m, c.n_kv, n_q_pad, 1, mne3, 2, 2*c.n_kv, 2*c.n_kv*n_q_pad, 2*c.n_kv*n_q_pad);
    a.sinks = c.sinks ? d_sinks : nullptr;
    if (c.exact) {
        a.k_exact = d_xk; a.k_exact_nb1 = 4*D*c.n_head_kv;
        a.v_exact = d_xv; a.v_exact_nb1 = 4*D*c.n_head_kv;
        a.exact_cell = d_cell;
    }
    a.dst = d_dst; a.scale = scale; a.max_bias = c.max_bias; a.softcap = c.softcap;
    a.kernel = c.kernel;
    size_t ws = 0;
    {
        // the work size for a forced split: plan with the same n_split (the library sizes it from n_sm otherwise)
        ws = sizeof(float)*n_out/D*(D + 2)*(size_t) std::max(1024, 1);
        if (c.n_split == 0) ws = tq_cuda_fattn_work_size(&a, n_sm);
        if (ws) CK(cudaMalloc(&d_work, ws));
    }
    CK(cudaMemset(d_dst, 0xFF, n_out*4));   // poison (NaN): every value must be written
    const int err = tq_cuda_fattn(&a, d_work, ws, n_sm, c.n_split, nullptr);
    check(err == 0, "%s: tq_cuda_fattn returned %d", case_name(c).c_str(), err);
    CK(cudaDeviceSynchronize());
    std::vector<float> out(n_out);
    CK(cudaMemcpy(out.data(), d_dst, n_out*4, cudaMemcpyDeviceToHost));

    // float64 reference over the decoded rows
    const uint32_t n_head_log2 = 1u << (uint32_t) floor(log2((double) c.n_head));
    const float m0 = powf(2.0f, -(c.max_bias) / n_head_log2), m1 = powf(2.0f, -(c.max_bias / 2.0f) / n_head_log2);
    const bool k_tq = tq_cuda_is_type(c.kt), v_tq = tq_cuda_is_type(c.vt);
    const float eps = FLT_EPSILON / 2;
    // the tensor-core kernel rounds the centroids to f16 (unit roundoff 2^-11) on both sides; its
    // queries are f16 hi + lo pairs (2^-22), its weights p*d_v f16 (2^-11)
    const bool mma = fa_case_mma(c);
    const double eps_c = mma ? 0x1p-11 + 0x1p-22 : 0.0, eps_v = mma ? 0x1p-11 + 0x1p-11 : 0.0;
    std::vector<double> row_tol((size_t) c.n_seq*c.n_head*c.n_q, 0.0);
    double worst = 0.0, worst_cpu = 0.0;
    int bad_rows = 0, bad_cpu = 0, nan_mismatch = 0;
    std::vector<double> s(c.n_kv), o(D);
    std::vector<float> cpu_out((size_t) TQ_ATTN_MAX_ROWS*D), cpu_work(tq_cpu_attn_rows_work_size(D, D) / 4 + 64);
    const bool cpu_ok = k_tq && v_tq && c.softcap == 0.0f && gqa*c.n_q <= TQ_ATTN_MAX_ROWS;
    for (int sq = 0; sq < c.n_seq; ++sq) {
        for (int h = 0; h < c.n_head; ++h) {
            const int hk = h / gqa;
            const float slope = c.max_bias > 0.0f ? (h < (int) n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - (int) n_head_log2) + 1)) : 1.0f;
            for (int iq = 0; iq < c.n_q; ++iq) {
                const float * q = &Q[(((size_t) sq*c.n_head + h)*c.n_q + iq)*D];
                const uint16_t * mrow = c.mask ? &M[(((size_t) (sq % mne3))*n_q_pad + iq)*c.n_kv] : nullptr;
                double mx = -INFINITY, sabs = 0.0, vmax = 0.0;
                for (int cell = 0; cell < c.n_kv; ++cell) {
                    const size_t i = ((size_t) sq*c.n_kv + cell)*c.n_head_kv + hk;
                    const float mv = mrow ? slope*GGML_FP16_TO_FP32(mrow[cell]) : 0.0f;
                    if (mv == -INFINITY) { s[cell] = -INFINITY; continue; }
                    const float * k = &Kd[i*D];
                    if (c.exact && cell == xcell[sq] && k_tq && !tq_row_is_nan((enum ggml_type) c.kt, &K[((size_t) sq*c.n_kv + cell)*knb1 + hk*kr], D)) {
                        k = &Kx[((size_t) sq*c.n_head_kv + hk)*D];
                    }
                    double dot = 0.0, dabs = 0.0;
                    for (int j = 0; j < D; ++j) { dot += (double) q[j]*k[j]; dabs += fabs((double) q[j]*k[j]); }
                    double sc = dot*scale;
                    if (c.softcap != 0.0f) sc = c.softcap*tanh(sc/c.softcap);
                    s[cell] = sc + mv;
                    sabs = std::max(sabs, dabs*scale);
                    if (!std::isnan(s[cell])) mx = std::max(mx, s[cell]);
                }
                double S = 0.0;
                std::fill(o.begin(), o.end(), 0.0);
                for (int cell = 0; cell < c.n_kv; ++cell) {
                    if (s[cell] == -INFINITY) continue;
                    const double pr = exp(s[cell] - mx);
                    S += pr;
                    const size_t i = ((size_t) sq*c.n_kv + cell)*c.n_head_kv + hk;
                    const float * v = &Vd[i*D];
                    if (c.exact && cell == xcell[sq] && v_tq && !tq_row_is_nan((enum ggml_type) c.vt, &V[((size_t) sq*c.n_kv + cell)*vnb1 + hk*vr], D)) {
                        v = &Vx[((size_t) sq*c.n_head_kv + hk)*D];
                    }
                    for (int j = 0; j < D; ++j) { o[j] += pr*v[j]; vmax = std::max(vmax, fabs((double) v[j])); }
                }
                if (c.sinks) S += exp(sinks[h] - mx);   // mx >= sink or not: the same sum
                if (c.sinks && mx == -INFINITY) S = 1.0;
                const float * g = &out[(((size_t) sq*c.n_q + iq)*c.n_head + h)*D];
                // bound: each score within eps*D*sum|q k|*scale (float32 dot products; the soft-cap's
                // tanh shrinks it), the weights move by twice that relatively; the value sums in float32
                // over the tiles, splits and the rotation back add (log2(n_kv) + 64 + 16) eps of max|v|
                const double es = (eps*(D + 4) + eps_c)*sabs + 4*eps*(fabs(mx) + 1.0);
                const double tol = vmax*(2.0*es + eps_v + (log2((double) c.n_kv) + 80.0)*eps) + 1e-30;
                row_tol[((size_t) sq*c.n_head + h)*c.n_q + iq] = tol;
                bool ref_nan = false, got_nan = false;
                double err = 0.0;
                for (int j = 0; j < D; ++j) {
                    const double r = S == 0.0 ? 0.0 : o[j]/S;
                    ref_nan |= std::isnan(r);
                    got_nan |= std::isnan(g[j]);
                    if (!std::isnan(r) && !std::isnan(g[j])) err = std::max(err, fabs(g[j] - r));
                }
                if (ref_nan != got_nan) {
                    ++nan_mismatch;
                } else if (!(err <= tol)) {
                    if (++bad_rows <= 3) printf("  %s: seq %d head %d q %d: max err %.3g > bound %.3g\n", case_name(c).c_str(), sq, h, iq, err, tol);
                }
                worst = std::max(worst, err / tol);
            }
        }
        // the CPU attention path (tq-cpu.c) for one K/V head's rows at a time
        if (!cpu_ok) continue;
        for (int hk = 0; hk < c.n_head_kv; ++hk) {
            const int nr = gqa*c.n_q;
            std::vector<const float *> qp(nr);
            std::vector<const ggml_fp16_t *> mp(nr);
            std::vector<float> sl(nr), Mr(nr), Sr(nr);
            for (int r = 0; r < nr; ++r) {
                const int iq = r / gqa, h = hk*gqa + r % gqa;
                qp[r] = &Q[(((size_t) sq*c.n_head + h)*c.n_q + iq)*D];
                mp[r] = c.mask ? &M[(((size_t) (sq % mne3))*n_q_pad + iq)*c.n_kv] : nullptr;
                sl[r] = c.max_bias > 0.0f ? (h < (int) n_head_log2 ? powf(m0, h + 1) : powf(m1, 2*(h - (int) n_head_log2) + 1)) : 1.0f;
            }
            tq_attn_kv kv;
            memset(&kv, 0, sizeof(kv));
            kv.k_type = (enum ggml_type) c.kt; kv.v_type = (enum ggml_type) c.vt; kv.dk = D; kv.dv = D;
            kv.k = (const char *) &K[(size_t) sq*c.n_kv*knb1 + hk*kr]; kv.k_stride = knb1;
            kv.v = (const char *) &V[(size_t) sq*c.n_kv*vnb1 + hk*vr]; kv.v_stride = vnb1;
            kv.scale = scale;
            kv.k_exact_cell = c.exact ? xcell[sq] : -1; kv.v_exact_cell = kv.k_exact_cell;
            kv.k_exact = c.exact ? &Kx[((size_t) sq*c.n_head_kv + hk)*D] : nullptr;
            kv.v_exact = c.exact ? &Vx[((size_t) sq*c.n_head_kv + hk)*D] : nullptr;
            tq_cpu_attn_rows(&kv, nr, qp.data(), mp.data(), sl.data(), 0, c.n_kv, Mr.data(), Sr.data(), cpu_out.data(), cpu_work.data());
            for (int r = 0; r < nr; ++r) {
                const int iq = r / gqa, h = hk*gqa + r % gqa;
                float Sv = Sr[r], ms = 1.0f;
                if (c.sinks) {
                    const float sk = sinks[h];
                    if (sk > Mr[r]) { ms = expf(Mr[r] - sk); Sv = Sv*ms + 1.0f; } else { Sv += expf(sk - Mr[r]); }
                }
                const float f = Sv == 0.0f ? 0.0f : ms/Sv;
                const float * g = &out[(((size_t) sq*c.n_q + iq)*c.n_head + h)*D];
                double err = 0.0, vmax = 1e-30;
                bool cn = false, gn = false;
                for (int j = 0; j < D; ++j) {
                    const float cv = cpu_out[(size_t) r*D + j]*f;
                    cn |= std::isnan(cv); gn |= std::isnan(g[j]);
                    if (!std::isnan(cv) && !std::isnan(g[j])) { err = std::max(err, (double) fabsf(g[j] - cv)); vmax = std::max(vmax, (double) fabsf(cv)); }
                }
                // the CPU's row path skips a NaN score where a row sees nothing else in a tile: NaN rows are compared with the reference only
                if (cn || gn) continue;
                // the float32 kernel is within 2e-4 of max|out| of the CPU path; the tensor-core one
                // within its bound against the float64 reference on top of that
                const double rel = err / (vmax + (mma ? row_tol[((size_t) sq*c.n_head + h)*c.n_q + iq]/2e-4 : 0.0));
                worst_cpu = std::max(worst_cpu, rel);
                if (!(rel <= 2e-4)) {
                    if (++bad_cpu <= 3) printf("  %s: CPU path, seq %d head %d q %d: max err %.3g of max |out| %.3g\n", case_name(c).c_str(), sq, h, iq, err, vmax);
                }
            }
        }
    }
    check(nan_mismatch == 0, "%s: %d rows NaN in one of GPU/reference only", case_name(c).c_str(), nan_mismatch);
    check(bad_rows == 0, "%s: %d rows beyond the float32 bound (worst %.2f of it)", case_name(c).c_str(), bad_rows, worst);
    if (cpu_ok) check(bad_cpu == 0, "%s: %d rows differ from tq_cpu_attn_rows by more than 2e-4 of max|out|", case_name(c).c_str(), bad_cpu);
    max_err_tq_vs_ref = std::max(max_err_tq_vs_ref, worst);
    max_err_cpu = std::max(max_err_cpu, worst_cpu);
    printf("  fa %-60s worst %.3f of bound%s\n", case_name(c).c_str(), worst,
           cpu_ok ? (std::string(", vs CPU path ") + std::to_string(worst_cpu)).c_str() : "");

    CK(cudaFree(d_q)); CK(cudaFree(d_dst)); CK(cudaFree(d_sinks)); CK(cudaFree(d_xk)); CK(cudaFree(d_xv));
    CK(cudaFree(d_k)); CK(cudaFree(d_v)); CK(cudaFree(d_m)); CK(cudaFree(d_cell));
    if (d_work) CK(cudaFree(d_work));
}

static void check_attention(int n_sm, bool quick) {
    const int KV[5] = { TQ_CUDA_TYPE_TQ2, TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ4, TQ_CUDA_TYPE_F16, TQ_CUDA_TYPE_Q8_0 };
    std::vector<fa_case> cases;
    // every pair at every head size: GQA 4, one token, causal mask, exact row, auto split
    for (int D : { 64, 128, 256 }) {
        for (int kt : KV) {
            for (int vt : KV) {
                if (!tq_cuda_fattn_supported(kt, vt, D, D)) continue;
                cases.push_back({ kt, vt, D, 1, 8, 2, 700, 1, 1, 0.0f, 0.0f, false, true, false, 0 });
            }
        }
    }
    // batches 1..8, GQA 1/4/7/8, several streams, features one at a time
    const int P[3][2] = { { TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ2 }, { TQ_CUDA_TYPE_TQ4, TQ_CUDA_TYPE_TQ4 }, { TQ_CUDA_TYPE_F16, TQ_CUDA_TYPE_TQ3 } };
    for (auto & pr : P) {
        for (int n_q : { 1, 2, 3, 8 }) {
            for (int g : { 1, 4, 7, 8 }) {
                cases.push_back({ pr[0], pr[1], 128, n_q, 2*g, 2, 1000 + 37*n_q, 2, 3, 0.0f, 0.0f, false, true, false, 0 });
            }
        }
        cases.push_back({ pr[0], pr[1], 128, 2, 8, 2, 513, 1, 2, 8.0f, 0.0f, false, false, false, 0 });   // ALiBi
        cases.push_back({ pr[0], pr[1], 128, 2, 8, 2, 513, 1, 1, 0.0f, 30.0f, false, true, false, 0 });  // soft-cap
        cases.push_back({ pr[0], pr[1], 64, 4, 4, 4, 300, 1, 1, 0.0f, 0.0f, true, true, false, 0 });     // sinks
        cases.push_back({ pr[0], pr[1], 256, 1, 16, 2, 2000, 1, 0, 0.0f, 0.0f, false, false, false, 0 }); // no mask
        cases.push_back({ pr[0], pr[1], 128, 2, 4, 1, 777, 1, 1, 0.0f, 0.0f, false, true, true, 0 });    // NaN K and V rows
        cases.push_back({ pr[0], pr[1], 128, 1, 32, 8, 4096, 1, 1, 0.0f, 0.0f, false, true, false, 1 });  // one split
        cases.push_back({ pr[0], pr[1], 128, 1, 32, 8, 4096, 1, 1, 0.0f, 0.0f, false, true, false, 64 }); // one tile a split
        cases.push_back({ pr[0], pr[1], 128, 1, 4, 1, 33000, 1, 1, 0.0f, 0.0f, true, true, false, 0 });   // long
    }
    // 4 and 8 K/V heads: row strides of whole 16-byte granules, so the tensor-core kernel copies granules (a
    // head's rows 0, 4, 8 or 12 bytes into theirs): every TQ pair, NaN rows, several streams, ALiBi, D 64
    for (int kt : TQ_TYPES) {
        for (int vt : TQ_TYPES) {
            cases.push_back({ kt, vt, 128, 2, 16, 4, 1000, 2, 3, 0.0f, 0.0f, false, true, true, 0 });
        }
    }
    cases.push_back({ TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ2, 64, 1, 32, 8, 1500, 1, 2, 8.0f, 0.0f, false, true, false, 0 });
    cases.push_back({ TQ_CUDA_TYPE_TQ4, TQ_CUDA_TYPE_TQ2, 128, 3, 32, 8, 600, 2, 1, 0.0f, 0.0f, false, true, true, 0 });
    cases.push_back({ TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ2, 128, 12, 8, 2, 300, 1, 1, 0.0f, 0.0f, false, true, false, 0 }); // > 8 rows a head
    cases.push_back({ TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ2, 128, 33, 8, 1, 700, 1, 1, 0.0f, 0.0f, false, true, false, 0 }); // 264 rows, 33 CTAs a head
    // the float32 kernel on TQ pairs (the tensor-core kernel takes them at head sizes 64 and 128)
    for (int D : { 64, 128 }) {
        cases.push_back({ TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ2, D, 2, 8, 2, 1000, 2, 3, 0.0f, 0.0f, true, true, true, 0, TQ_CUDA_FA_VECTOR });
        cases.push_back({ TQ_CUDA_TYPE_TQ4, TQ_CUDA_TYPE_TQ4, D, 1, 8, 2, 700, 1, 1, 0.0f, 30.0f, false, true, false, 0, TQ_CUDA_FA_VECTOR });
    }
    cases.push_back({ TQ_CUDA_TYPE_TQ2, TQ_CUDA_TYPE_TQ3, 64, 1, 2, 2, 5, 1, 1, 0.0f, 0.0f, false, true, false, 0 });     // fewer cells than a tile
    cases.push_back({ TQ_CUDA_TYPE_Q8_0, TQ_CUDA_TYPE_TQ4, 256, 3, 6, 2, 900, 2, 2, 4.0f, 0.0f, true, true, true, 3 });
    printf("attention: %zu cases\n", cases.size());
    size_t i = 0;
    for (const fa_case & c : cases) {
        if (quick && (i++ % 4) != 0) continue;
        check_fa(c, n_sm);
    }
    printf("attention: worst error %.3f of the float32 bound; worst relative difference to the CPU path %.3g\n", max_err_tq_vs_ref, max_err_cpu);
}

// --- 4: timing -----------------------------------------------------------------------------------------

__global__ void fill_f16(__half * y, const float * x, size_t n) {
    for (size_t i = blockIdx.x*(size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x*blockDim.x) y[i] = __float2half_rn(x[i]);
}
__global__ void fill_gauss(float * x, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x*(size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x*blockDim.x) {
        uint64_t z = seed + i*0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30))*0xBF58476D1CE4E5B9ULL; z = (z ^ (z >> 27))*0x94D049BB133111EBULL; z ^= z >> 31;
        const float u1 = ((z >> 40) + 1.0f)*0x1p-24f, u2 = (z & 0xffffff)*0x1p-24f;
        x[i] = sqrtf(-2.0f*logf(u1))*cospif(2.0f*u2);
    }
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size()/2];
}

static double copy_bandwidth() {
    const size_t n = (size_t) 1 << 30;
    void * a, * b;
    CK(cudaMalloc(&a, n)); CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    std::vector<float> ts;
    for (int i = 0; i < 13; ++i) {
        CK(cudaEventRecord(e0));
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 3) ts.push_back(ms);
    }
    CK(cudaFree(a)); CK(cudaFree(b));
    const double bw = 2.0*n / (median(ts)*1e-3);
    printf("device-to-device copy: %.0f GB/s (1 GiB read + 1 GiB written, median of 10)\n", bw*1e-9);
    return bw;
}

// time_attention's cache lengths: all, or the one of --cells (with --time-only, a profiler's run of one length)
static const int TIMED_CELLS[] = { 256, 1024, 4096, 32768, 65536 };
static int64_t time_cells_only = 0;

static void time_attention(int n_sm, double copy_bw) {
    const int D = 128, n_head = 32, n_head_kv = 8;
    const int pairs[][2] = {
        { TQ_CUDA_TYPE_F16, TQ_CUDA_TYPE_F16 }, { TQ_CUDA_TYPE_TQ4, TQ_CUDA_TYPE_TQ4 }, { TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ3 },
        { TQ_CUDA_TYPE_TQ3, TQ_CUDA_TYPE_TQ2 }, { TQ_CUDA_TYPE_TQ2, TQ_CUDA_TYPE_TQ2 }, { TQ_CUDA_TYPE_Q8_0, TQ_CUDA_TYPE_TQ4 },
    };
    printf("\nflash attention, decode, Llama-3.1-8B shape (32 q heads, 8 KV heads, d 128, exact sink row on for TQ):\n");
    printf("| K/V | n_q | KV | splits | us | KV MB | KV GB/s | of copy | vs f16 |\n|---|---|---|---|---|---|---|---|---|\n");
    float * d_x; __half * d_h;
    const size_t max_vals = (size_t) 65536*n_head_kv*D;
    CK(cudaMalloc(&d_x, max_vals*4));
    CK(cudaMalloc(&d_h, max_vals*2));
    fill_gauss<<<1024, 256>>>(d_x, max_vals, 42);
    fill_f16<<<1024, 256>>>(d_h, d_x, max_vals);
    CK(cudaGetLastError());
    float * d_q, * d_dst, * d_xk, * d_xv; uint16_t * d_m; int32_t * d_cell;
    CK(cudaMalloc(&d_q, 8*n_head*D*4)); CK(cudaMalloc(&d_dst, 8*n_head*D*4));
    CK(cudaMalloc(&d_xk, n_head_kv*D*4)); CK(cudaMalloc(&d_xv, n_head_kv*D*4));
    CK(cudaMalloc(&d_m, 65536*8*2)); CK(cudaMalloc(&d_cell, 4));
    fill_gauss<<<64, 256>>>(d_q, 8*n_head*D, 7);
    fill_gauss<<<8, 128>>>(d_xk, n_head_kv*D, 8);
    fill_gauss<<<8, 128>>>(d_xv, n_head_kv*D, 9);
    CK(cudaMemset(d_m, 0, 65536*8*2));
    CK(cudaMemset(d_cell, 0, 4));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));

    for (int n_kv : TIMED_CELLS) {
        if (time_cells_only && n_kv != time_cells_only) continue;
        for (int n_q : { 1, 4 }) {
            if (n_q > 1 && n_kv != 32768) continue;
            float f16_us = 0.0f;
            for (auto & pr : pairs) {
                const int kt = pr[0], vt = pr[1];
                const size_t kr = row_bytes(kt, D), vr = row_bytes(vt, D);
                const size_t kbytes = kr*n_head_kv*n_kv, vbytes = vr*n_head_kv*n_kv;
                // enough copies of the cache that the set read in turn is far past the L2 (50 MB)
                const int copies = (int) std::min<size_t>(64, std::max<size_t>(2, (size_t) 512e6 / (kbytes + vbytes)));
                std::vector<uint8_t *> ks(copies), vs(copies);
                for (int i = 0; i < copies; ++i) {
                    CK(cudaMalloc(&ks[i], kbytes)); CK(cudaMalloc(&vs[i], vbytes));
                }
                for (int side = 0; side < 2; ++side) {
                    const int t = side ? vt : kt;
                    uint8_t * dst0 = side ? vs[0] : ks[0];
                    const size_t rb = side ? vr : kr;
                    const float * src = d_x + (side ? 1 : 0)*(size_t) 0;
                    if (t == TQ_CUDA_TYPE_F16) {
                        CK(cudaMemcpy(dst0, d_h, (size_t) n_kv*n_head_kv*D*2, cudaMemcpyDeviceToDevice));
                    } else if (t == TQ_CUDA_TYPE_Q8_0) {
                        std::vector<float> hx((size_t) n_kv*n_head_kv*D);
                        CK(cudaMemcpy(hx.data(), src, hx.size()*4, cudaMemcpyDeviceToHost));
                        std::vector<uint8_t> hq(rb*n_head_kv*n_kv);
                        for (size_t r = 0; r < (size_t) n_kv*n_head_kv; ++r) quantize_any(t, &hx[r*D], &hq[r*rb], D);
                        CK(cudaMemcpy(dst0, hq.data(), hq.size(), cudaMemcpyHostToDevice));
                    } else {
                        const size_t dnb[4] = { rb/(D/64), rb, rb*n_kv*n_head_kv, rb*n_kv*n_head_kv };
                        CKI(tq_cuda_set_rows(t, tensor(src, D, (int64_t) n_kv*n_head_kv, 1, 1, 4, 4*D, 4*D*(size_t) n_kv*n_head_kv, 4*D*(size_t) n_kv*n_head_kv),
                                             TQ_CUDA_TYPE_F32, tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0), false, dst0, dnb, 0, nullptr));
                    }
                    for (int i = 1; i < copies; ++i) {
                        CK(cudaMemcpy(side ? vs[i] : ks[i], dst0, side ? vbytes : kbytes, cudaMemcpyDeviceToDevice));
                    }
                }
                tq_cuda_fattn_args a;
                memset(&a, 0, sizeof(a));
                a.q = tensor(d_q, D, n_q, n_head, 1, 4, 4*D, 4*D*n_q, 4*D*n_q*n_head);
                a.k_type = kt; a.v_type = vt;
                a.mask = tensor(d_m, n_kv, n_q, 1, 1, 2, 2*n_kv, 2*n_kv*n_q, 2*n_kv*n_q);
                const bool tq_any = tq_cuda_is_type(kt) || tq_cuda_is_type(vt);
                if (tq_any) {
                    a.k_exact = d_xk; a.k_exact_nb1 = 4*D*n_head_kv; a.v_exact = d_xv; a.v_exact_nb1 = 4*D*n_head_kv; a.exact_cell = d_cell;
                }
                a.dst = d_dst; a.scale = 0.088f;
                const std::vector<int> splits = n_kv >= 32768 && n_q == 1 ? std::vector<int>{ 0, 16, 32, 64, 128 } : std::vector<int>{ 0 };
                const bool has_mma = tq_cuda_fattn_mma_supported(kt, vt, D);
                for (int kern = 0; kern < (has_mma ? 2 : 1); ++kern)
                for (int ns : splits) {
                    a.kernel = kern ? TQ_CUDA_FA_VECTOR : TQ_CUDA_FA_AUTO;
                    if (kern && ns) continue;
                    a.k = tensor(ks[0], D, n_kv, n_head_kv, 1, 0, kr*n_head_kv, kr, kr*n_head_kv*n_kv);
                    a.v = tensor(vs[0], D, n_kv, n_head_kv, 1, 0, vr*n_head_kv, vr, vr*n_head_kv*n_kv);
                    size_t ws = sizeof(float)*n_q*n_head*(size_t) 1024*(D + 2);
                    void * d_work; CK(cudaMalloc(&d_work, ws));
                    int used_split = 0;
                    {
                        // what the plan gives (for the table): work size / row size / n_rows
                        const size_t w0 = tq_cuda_fattn_work_size(&a, n_sm);
                        used_split = ns ? ns : (w0 ? (int) (w0 / (sizeof(float)*n_q*n_head*(D + 2))) : 1);
                    }
                    std::vector<float> ts;
                    const int reps = 20, per = std::max(4, copies);
                    for (int rep = 0; rep < reps + 2; ++rep) {
                        CK(cudaEventRecord(e0));
                        for (int i = 0; i < per; ++i) {
                            const int c = i % copies;
                            a.k.data = ks[c]; a.v.data = vs[c];
                            const int err = tq_cuda_fattn(&a, d_work, ws, n_sm, ns, nullptr);
                            if (err) { fprintf(stderr, "tq_cuda_fattn: %d\n", err); exit(2); }
                        }
                        CK(cudaEventRecord(e1));
                        CK(cudaEventSynchronize(e1));
                        float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
                        if (rep >= 2) ts.push_back(ms*1e3f/per);
                    }
                    CK(cudaGetLastError());
                    const float us = median(ts);
                    if (kt == TQ_CUDA_TYPE_F16 && ns == 0) f16_us = us;
                    const double gbs = (kbytes + vbytes) / (us*1e-6) * 1e-9;
                    printf("| %s/%s%s | %d | %d | %d%s | %.1f | %.1f | %.0f | %.0f%% | %.2fx |\n", tname(kt), tname(vt),
                           has_mma ? (kern ? " vector" : " mma") : "", n_q, n_kv, used_split,
                           ns ? " (forced)" : "", us, (kbytes + vbytes)*1e-6, gbs, 100.0*gbs*1e9/copy_bw, f16_us > 0 ? f16_us/us : 0.0);
                    CK(cudaFree(d_work));
                }
                for (int i = 0; i < copies; ++i) { CK(cudaFree(ks[i])); CK(cudaFree(vs[i])); }
            }
        }
    }

    // quantize (SET_ROWS) and dequantize (GET_ROWS) throughput
    printf("\nquantize / dequantize, rows of 1024 values (8 heads x 128):\n| op | type | rows | us | GB/s (f32 or f16 side) |\n|---|---|---|---|---|\n");
    for (int t : TQ_TYPES) {
        for (int64_t rows : { (int64_t) 1, (int64_t) 512, (int64_t) 32768 }) {
            const int64_t N = 1024;
            const size_t rb = row_bytes(t, N);
            uint8_t * d_q;
            CK(cudaMalloc(&d_q, rb*rows));
            const size_t dnb[4] = { rb/(N/64), rb, rb*rows, rb*rows };
            const int64_t dne[4] = { N, rows, 1, 1 };
            const size_t fnb[4] = { 4, (size_t) 4*N, (size_t) 4*N*rows, (size_t) 4*N*rows };
            // the prompt path's copy of the cache to f16, rotated: rows of 8 heads x 128 as K/V cells
            // ([128, rows, 8]); op 3 into a destination 2 bytes off 16-byte alignment (one warp a block)
            const int64_t dne_c[4] = { 128, rows, 8, 1 };
            const size_t hnb_c[4] = { 2, 256, (size_t) 256*rows, (size_t) 256*rows*8 };
            const tq_cuda_tensor src_c = tensor(d_q, 128, rows, 8, 1, rb/(N/64), rb, rb/8, rb*rows);
            for (int op = 0; op < 4; ++op) {
                std::vector<float> ts;
                for (int rep = 0; rep < 23; ++rep) {
                    CK(cudaEventRecord(e0));
                    for (int i = 0; i < 10; ++i) {
                        if (op == 0) {
                            CKI(tq_cuda_set_rows(t, tensor(d_x, N, rows, 1, 1, 4, 4*N, 4*N*rows, 4*N*rows), TQ_CUDA_TYPE_F32,
                                                 tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0), false, d_q, dnb, 0, nullptr));
                        } else if (op == 1) {
                            CKI(tq_cuda_get_rows(t, tensor(d_q, N, rows, 1, 1, rb/(N/64), rb, rb*rows, rb*rows), tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0),
                                                 false, d_x + (size_t) N*rows, TQ_CUDA_TYPE_F32, dne, fnb, false, nullptr));
                        } else {
                            CKI(tq_cuda_get_rows(t, src_c, tensor(nullptr, 0, 0, 0, 0, 0, 0, 0, 0), false,
                                                 (char *) (d_x + (size_t) N*rows) + (op == 3 ? 2 : 0), TQ_CUDA_TYPE_F16, dne_c, hnb_c, true, nullptr));
                        }
                    }
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
                    if (rep >= 3) ts.push_back(ms*1e2f);
                }
                const float us = median(ts);
                const char * opname[4] = { "set_rows (quantize)", "get_rows (dequantize)", "get_rows rotated f16, 8 threads a block",
                                            "get_rows rotated f16, a warp a block" };
                printf("| %s | %s | %lld | %.2f | %.0f |\n", opname[op], tname(t), (long long) rows, us,
                       (op >= 2 ? 2.0 : 4.0)*N*rows/(us*1e-6)*1e-9);
            }
            CK(cudaFree(d_q));
        }
    }
}

int main(int argc, char ** argv) {
    bool quick = false, timing = false, time_only = false;
    int64_t rows = 131072;
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--time")) timing = true;
        else if (!strcmp(argv[i], "--time-only")) timing = time_only = true;
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) rows = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--cells") && i + 1 < argc) time_cells_only = atoll(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--quick] [--time | --time-only] [--cells 256|1024|4096|32768|65536] [--rows N]\n"
                            "  --time-only: the attention timings without the checks (for a profiler: ncu -k regex:... %s --time-only --cells N)\n",
                    argv[0], argv[0]);
            return 2;
        }
    }
    if (time_cells_only && std::find(std::begin(TIMED_CELLS), std::end(TIMED_CELLS), time_cells_only) == std::end(TIMED_CELLS)) {
        fprintf(stderr, "--cells: one of the timed lengths");
        for (int n : TIMED_CELLS) fprintf(stderr, "%s %d", n == TIMED_CELLS[0] ? "" : ",", n);
        fprintf(stderr, "\n");
        return 2;
    }
    int dev = 0, n_sm = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    printf("device: %s, %d SMs, L2 %d MB\n", prop.name, n_sm, prop.l2CacheSize >> 20);

    if (!time_only) {
        check_rows(quick ? std::min<int64_t>(rows, 16384) : rows);
        check_set_rows_pair(quick ? 1024 : 8192);
        check_fragments();
        check_attention(n_sm, quick);
    }
    if (timing) {
        const double bw = copy_bandwidth();
        time_attention(n_sm, bw);
    }
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
