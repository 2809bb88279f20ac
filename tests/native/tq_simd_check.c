// Every SIMD level of the TQ CPU kernels (ggml_tq/tq-cpu.c) against the scalar reference (ggml_tq/tq.c),
// without llama.cpp: built with ggml_tq/tq.c and the ggml stand-ins in this folder, natively and
// cross-compiled for aarch64 (run under qemu-aarch64); tests/test_simd_native.py drives it.
//
//   quantize:      the CPU quantizer (SET_ROWS, CPY) writes the reference's bytes (it is the reference:
//                  no level has a copy of it), as does tq_quantize_row_with the product's options
//   vec_dot:       each SIMD level within 2 n eps sum |k_j q_j| of the exact dot product and of the
//                  reference (the bound of tests/test_parity_c.py); the scalar level and the _qjl
//                  types are the reference, bit for bit
//   decode:        one row mad_rotated into a zero accumulator with weight 1, and all rows through
//                  tq_cpu_decode_rows_rotated, equal the reference decode (tq_dequantize_row_rotated_ref)
//                  at every level
//   mad_rotated:   sum_r w_r * row_r accumulated in the rotated domain and rotated back once: the
//                  scalar level is the reference (tq_mad_row_rotated_ref, tq_unrotate_block) bit for
//                  bit; each SIMD level within (rows + 16) eps sqrt(64) max_j sum_r |w_r k_rj| of the
//                  float64 sum of the decoded rows and of the reference
//   unrotate:      each SIMD level's tq_cpu_unrotate_row bit-identical to tq_unrotate_block (finite
//                  inputs, denormals, signed zeros); a NaN spreads over its block only
//   attn_rows:     a row's output does not depend on its group (rows computed 64 at a time and in
//                  small groups are bit-identical); a NaN or Inf K/V row reaches only the rows that
//                  attend to its cell: the others are bit-identical to a run without it, as with f16
//   flash_attn op: tq_cpu_flash_attn_ext_rows keeps to its share of the op's work buffer, and dst does
//                  not depend on how the rows are split between threads
//   tq3c, split:   each level's decoder of the calibrated key types (tq3c; tq2o, tq3o) gives the
//                  reference's floats bit for bit (the split: also on random bytes with extreme norms,
//                  every index value, and a row that ends at an unreadable page); each level's split
//                  vec_dot gives the scalar level's bits
//
// The data come from splitmix64 with exact arithmetic only (no libm), so every platform sees the
// same rows; the "reference checksum" line hashes what the scalar reference in tq.c (built with
// -ffp-contract=off) produced from them, which must match across architectures.
//
// Usage: tq_simd_check [--expect LEVEL_NAME]... ; prints "N passed, M failed", exits 1 on failure.
#include "tq.h"

#include "ggml-impl.h" // GGML_FP16_TO_FP32

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__)
#    include <sys/mman.h>
#    include <unistd.h>
#endif

#define N_ROW 256   // values per row: 4 blocks
#define N_ROWS 48   // rows per (type, kind)
#define MAX_LEVELS 8

static const float EPS32 = 0x1p-23f;

static int n_pass = 0;
static int n_fail = 0;

static void check(int ok, const char * fmt, ...) {
    if (ok) {
        ++n_pass;
        return;
    }
    ++n_fail;
    if (n_fail <= 40) {
        va_list ap;
        va_start(ap, fmt);
        fputs("FAIL ", stdout);
        vprintf(fmt, ap);
        fputc('\n', stdout);
        va_end(ap);
    }
}

// --- data ----------------------------------------------------------------------------------------

static uint64_t rng_state;

// Sections whose results are hashed start from their own seed: a section before them that draws per
// SIMD level (3 levels on an AVX-512 x86, 2 on aarch64) must not change the data they hash
static void seed_section(uint64_t section) {
    rng_state = 0x5451534944ULL + section;
}

static uint64_t splitmix64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double uniform(void) {   // [0, 1), exact
    return (double) (splitmix64() >> 11) * 0x1p-53;
}

static double gauss(void) {     // Irwin-Hall(12) - 6: close to N(0, 1), only exact additions
    double s = 0.0;
    for (int i = 0; i < 12; ++i) {
        s += uniform();
    }
    return s - 6.0;
}

static const char * KINDS[] = { "gaussian", "heavy_tailed", "outlier_channels", "one_hot", "zeros", "tiny", "huge" };
#define N_KINDS ((int) (sizeof(KINDS) / sizeof(KINDS[0])))

static void make_row(int kind, float * x, int n) {
    for (int j = 0; j < n; ++j) {
        switch (kind) {
            case 0: x[j] = (float) gauss(); break;
            case 1: x[j] = (float) (gauss() / (0.02 + uniform())); break;
            case 2: x[j] = (float) gauss(); break;
            case 3: x[j] = 0.0f; break;
            case 4: x[j] = 0.0f; break;
            case 5: x[j] = (float) (gauss() * 1e-20); break;
            default: x[j] = (float) (gauss() * 2e3); break;  // block norms ~1.6e4: inside fp16's range
        }
    }
    if (kind == 2) {            // what real K caches look like: a few huge channels
        const int ch[4] = { 3, 70, 131, 200 };
        for (int i = 0; i < 4; ++i) {
            x[ch[i] % n] *= 40.0f;
        }
    }
    if (kind == 3) {
        x[splitmix64() % (uint64_t) n] = (float) (0.5 + 4.5 * uniform());
    }
}

// FNV-1a over what the scalar reference produced.
static uint64_t checksum = 0xcbf29ce484222325ULL;

static void hash_bytes(const void * p, size_t n) {
    const uint8_t * b = (const uint8_t *) p;
    for (size_t i = 0; i < n; ++i) {
        checksum = (checksum ^ b[i]) * 0x100000001b3ULL;
    }
}

// --- the kernels under test ----------------------------------------------------------------------

static const enum ggml_type TYPES[] = {
    GGML_TYPE_TQ2, GGML_TYPE_TQ3, GGML_TYPE_TQ4, GGML_TYPE_TQ2_QJL, GGML_TYPE_TQ3_QJL, GGML_TYPE_TQ4_QJL,
};
#define N_TYPES ((int) (sizeof(TYPES) / sizeof(TYPES[0])))

static float cpu_vec_dot(enum ggml_type type, int n, const void * x, const void * q) {
    float s = 0.0f;
    switch (type) {
        case GGML_TYPE_TQ2:     tq_cpu_vec_dot_tq2(n, &s, 0, x, 0, q, 0, 1); break;
        case GGML_TYPE_TQ3:     tq_cpu_vec_dot_tq3(n, &s, 0, x, 0, q, 0, 1); break;
        case GGML_TYPE_TQ4:     tq_cpu_vec_dot_tq4(n, &s, 0, x, 0, q, 0, 1); break;
        case GGML_TYPE_TQ2_QJL: tq_cpu_vec_dot_tq2_qjl(n, &s, 0, x, 0, q, 0, 1); break;
        case GGML_TYPE_TQ3_QJL: tq_cpu_vec_dot_tq3_qjl(n, &s, 0, x, 0, q, 0, 1); break;
        default:                tq_cpu_vec_dot_tq4_qjl(n, &s, 0, x, 0, q, 0, 1); break;
    }
    return s;
}

static int n_levels;
static const char * level_names[MAX_LEVELS];

static void set_level(int level) {
    const int got = tq_cpu_set_simd_level(level);
    if (got != level) {
        fprintf(stderr, "tq_cpu_set_simd_level(%d) gave %d\n", level, got);
        exit(2);
    }
}

// One (type, kind): N_ROWS rows of N_ROW values.
static void check_type_kind(enum ggml_type type, int kind) {
    const char * tname = ggml_type_name(type);
    const char * kname = KINDS[kind];
    const int qjl = tq_is_qjl_type(type);
    const size_t rs = ggml_row_size(type, N_ROW);

    static float x[N_ROWS][N_ROW], q[N_ROWS][N_ROW], krot[N_ROWS][N_ROW], qrot[N_ROWS][N_ROW], w[N_ROWS], dref[N_ROWS];
    static uint8_t ref[N_ROWS * sizeof(block_tq_q) * (N_ROW / QK_TQ)], buf[sizeof(ref)];
    static uint8_t qbuf[N_ROWS][sizeof(block_tq_q) * (N_ROW / QK_TQ)];

    for (int r = 0; r < N_ROWS; ++r) {
        make_row(kind, x[r], N_ROW);
        make_row(0, q[r], N_ROW);
        w[r] = (float) uniform();
    }

    // quantize: the reference bytes; the CPU quantizer and the product's options write the same
    quantize_tq(type, &x[0][0], ref, N_ROWS, N_ROW, NULL);
    hash_bytes(ref, N_ROWS * rs);
    for (int r = 0; r < N_ROWS; ++r) {
        tq_cpu_quantize_row(type, x[r], buf + r*rs, N_ROW);
    }
    check(memcmp(ref, buf, N_ROWS * rs) == 0, "quantize %s %s: the CPU quantizer's bytes differ from the reference", tname, kname);
    const tq_quantize_options product = { true, true };
    for (int r = 0; r < N_ROWS; ++r) {
        tq_quantize_row_with(type, x[r], buf + r*rs, N_ROW, &product);
    }
    check(memcmp(ref, buf, N_ROWS * rs) == 0, "quantize %s %s: tq_quantize_row_with {true, true} differs from the reference", tname, kname);

    // vec_dot
    for (int r = 0; r < N_ROWS; ++r) {
        tq_dequantize_row_rotated_ref(type, ref + r*rs, krot[r], N_ROW);
        if (qjl) {
            quantize_row_tq_qjl_q_ref(q[r], (block_tq_qjl_q *) qbuf[r], N_ROW);
            const block_tq_qjl_q * qb = (const block_tq_qjl_q *) qbuf[r];
            for (int j = 0; j < N_ROW; ++j) {
                qrot[r][j] = GGML_FP16_TO_FP32(qb[j / QK_TQ].y[j % QK_TQ]);
            }
        } else {
            quantize_row_tq_q_ref(q[r], (block_tq_q *) qbuf[r], N_ROW);
            memcpy(qrot[r], qbuf[r], sizeof(qrot[r]));
        }
        dref[r] = tq_vec_dot_ref(type, N_ROW, ref + r*rs, qbuf[r]);
        hash_bytes(&dref[r], sizeof(dref[r]));
    }
    // the scalar level (and the _qjl types, at the top level): the reference itself
    set_level(qjl ? n_levels - 1 : 0);
    int same = 1;
    for (int r = 0; r < N_ROWS; ++r) {
        const float got = cpu_vec_dot(type, N_ROW, ref + r*rs, qbuf[r]);
        same &= memcmp(&got, &dref[r], sizeof(float)) == 0;
    }
    check(same, "vec_dot %s %s %s: not the reference's bits", level_names[qjl ? n_levels - 1 : 0], tname, kname);
    for (int level = 1; level < n_levels && !qjl; ++level) {
        set_level(level);
        int ok = 1;
        double worst = 0.0;
        for (int r = 0; r < N_ROWS; ++r) {
            const float got = cpu_vec_dot(type, N_ROW, ref + r*rs, qbuf[r]);
            double exact = 0.0, mag = 0.0;
            for (int j = 0; j < N_ROW; ++j) {
                exact += (double) krot[r][j] * (double) qrot[r][j];
                mag += fabs((double) krot[r][j] * (double) qrot[r][j]);
            }
            const double bound = 2.0 * N_ROW * EPS32 * mag + 1e-30;
            const double e0 = fabs((double) got - exact);
            const double e1 = fabs((double) got - (double) dref[r]);
            ok &= e0 <= bound && e1 <= bound;
            worst = fmax(worst, fmax(e0, e1) / bound);
        }
        check(ok, "vec_dot %s %s %s: outside the float32 bound (worst error / bound %.3g)", level_names[level], tname, kname, worst);
    }

    // one row into a zero accumulator with weight 1: fl(d * c[idx]) (one rounding at every level),
    // equal to the reference decode: catches index and table errors that the bounds above would not.
    // The _qjl types take the reference at every level: checked once, at the top level.
    const int first_level = qjl ? n_levels - 1 : 0;
    float dec[N_ROW];
    for (int level = first_level; level < n_levels; ++level) {
        set_level(level);
        int first = -1;
        for (int r = 0; r < N_ROWS && first < 0; ++r) {
            memset(dec, 0, sizeof(dec));
            tq_cpu_mad_rotated(type, N_ROW, dec, ref + r*rs, 1.0f);
            for (int j = 0; j < N_ROW && first < 0; ++j) {
                if (!(dec[j] == krot[r][j])) {
                    first = r*N_ROW + j;
                }
            }
        }
        check(first < 0, "decode %s %s %s: one row's mad_rotated differs from the reference decode (first at row %d, value %d)",
              level_names[level], tname, kname, first / N_ROW, first % N_ROW);
    }

    // all rows at once (tq_cpu_decode_rows_rotated, the attention tiles' decoder): the same values
    static float decs[N_ROWS*N_ROW];
    for (int level = first_level; level < n_levels; ++level) {
        set_level(level);
        memset(decs, 0xff, sizeof(decs)); // NaN everywhere: every value must be written
        tq_cpu_decode_rows_rotated(type, N_ROW, ref, rs, N_ROWS, decs);
        int first = -1;
        for (int i = 0; i < N_ROWS*N_ROW && first < 0; ++i) {
            if (!(decs[i] == krot[i / N_ROW][i % N_ROW])) {
                first = i;
            }
        }
        check(first < 0, "decode_rows %s %s %s: differs from the reference decode (first at row %d, value %d)",
              level_names[level], tname, kname, first / N_ROW, first % N_ROW);
    }

    // V accumulation in the rotated domain, rotated back once
    static double vref[N_ROW], vmag[N_ROW];
    memset(vref, 0, sizeof(vref));
    memset(vmag, 0, sizeof(vmag));
    for (int r = 0; r < N_ROWS; ++r) {
        memcpy(dec, krot[r], sizeof(dec));
        for (int b = 0; b < N_ROW / QK_TQ; ++b) {
            tq_unrotate_block(dec + b*QK_TQ);
        }
        hash_bytes(dec, sizeof(dec));
        for (int j = 0; j < N_ROW; ++j) {
            vref[j] += (double) w[r] * (double) dec[j];
            vmag[j] += fabs((double) w[r] * (double) krot[r][j]);
        }
    }
    double magmax = 0.0;
    for (int j = 0; j < N_ROW; ++j) {
        magmax = fmax(magmax, vmag[j]);
    }
    const double vbound = (N_ROWS + 16) * EPS32 * sqrt((double) QK_TQ) * magmax + 1e-30;
    float aref[N_ROW], acc[N_ROW];
    memset(aref, 0, sizeof(aref));
    for (int r = 0; r < N_ROWS; ++r) {
        tq_mad_row_rotated_ref(type, N_ROW, aref, ref + r*rs, w[r]);
    }
    for (int b = 0; b < N_ROW / QK_TQ; ++b) {
        tq_unrotate_block(aref + b*QK_TQ);
    }
    for (int level = first_level; level < n_levels; ++level) {
        set_level(level);
        memset(acc, 0, sizeof(acc));
        for (int r = 0; r < N_ROWS; ++r) {
            tq_cpu_mad_rotated(type, N_ROW, acc, ref + r*rs, w[r]);
        }
        tq_cpu_unrotate_row(acc, N_ROW);
        if (level == 0 || qjl) {    // the reference's own arithmetic
            check(memcmp(acc, aref, sizeof(acc)) == 0, "mad_rotated+unrotate %s %s %s: not the reference's bits",
                  level_names[level], tname, kname);
            continue;
        }
        int ok = 1;
        double worst = 0.0;
        for (int j = 0; j < N_ROW; ++j) {
            const double e0 = fabs((double) acc[j] - vref[j]);
            const double e1 = fabs((double) acc[j] - (double) aref[j]);
            ok &= e0 <= vbound && e1 <= vbound;
            worst = fmax(worst, fmax(e0, e1) / vbound);
        }
        check(ok, "mad_rotated+unrotate %s %s %s: outside the float32 bound (worst error / bound %.3g)", level_names[level], tname, kname, worst);
    }
}

// The inverse rotation alone: bit-identical at every level.
static void check_unrotate(void) {
    enum { NB = 5, N = NB * QK_TQ };
    seed_section(1);
    static const char * names[] = { "gaussian", "denormal", "huge", "signed_zeros", "mixed" };
    for (int t = 0; t < 5; ++t) {
        float x[N], want[N], y[N];
        for (int j = 0; j < N; ++j) {
            const double g = gauss();
            switch (t) {
                case 0: x[j] = (float) g; break;
                case 1: x[j] = (float) (g * 1e-39); break;                   // subnormal floats
                case 2: x[j] = (float) (g * 1e35); break;
                case 3: x[j] = (splitmix64() & 1) ? -0.0f : 0.0f; break;
                default: {
                    const uint64_t c = splitmix64() % 5;
                    x[j] = c == 0 ? -0.0f : c == 1 ? (float) (g * 1e-40) : c == 2 ? (float) (g * 1e20) : (float) g;
                } break;
            }
        }
        memcpy(want, x, sizeof(x));
        for (int b = 0; b < NB; ++b) {
            tq_unrotate_block(want + b*QK_TQ);
        }
        hash_bytes(want, sizeof(want));
        for (int level = 1; level < n_levels; ++level) {   // level 0 is tq_unrotate_block
            set_level(level);
            memcpy(y, x, sizeof(x));
            tq_cpu_unrotate_row(y, N);
            int first = -1;
            for (int j = 0; j < N && first < 0; ++j) {
                if (memcmp(&y[j], &want[j], sizeof(float)) != 0) {
                    first = j;
                }
            }
            check(first < 0, "unrotate %s %s: not bit-identical to tq_unrotate_block (first at %d: %a vs %a)",
                  level_names[level], names[t], first, first < 0 ? 0.0 : (double) y[first], first < 0 ? 0.0 : (double) want[first]);
        }
    }
    // a NaN spreads over its own block only
    for (int level = 0; level < n_levels; ++level) {
        set_level(level);
        float y[2 * QK_TQ];
        for (int j = 0; j < 2 * QK_TQ; ++j) {
            y[j] = (float) gauss();
        }
        y[17] = NAN;
        tq_cpu_unrotate_row(y, 2 * QK_TQ);
        int ok = 1;
        for (int j = 0; j < 2 * QK_TQ; ++j) {
            ok &= j < QK_TQ ? isnan(y[j]) != 0 : isfinite(y[j]) != 0;
        }
        check(ok, "unrotate %s nan: a NaN must spread over its block and no further", level_names[level]);
    }
}

// The attention tiles (tq_cpu_attn_rows) group query rows that read one K/V head; how many rows a
// group holds follows how rows are split between threads. Each row's result must not depend on
// its group: rows computed 64 at a time, and in groups of 1, 2, 3, 5 and 7, are bit-identical, with
// a causal mask over 150 cells (three tiles, the last one partial) and an exact row at cell 0.
static void check_attn_rows_grouping(void) {
    enum { D = 128, NC = 150, NQ = 64 };
    static float x[D], q[NQ][D], out_all[NQ*D], out_grp[NQ*D], exact_k[D], exact_v[D];
    static ggml_fp16_t mask[NQ][NC];
    static char kbuf[NC*sizeof(block_tq3)*(D/QK_TQ)], vbuf[NC*sizeof(block_tq2)*(D/QK_TQ)];
    const size_t kb = sizeof(block_tq3)*(D/QK_TQ), vb = sizeof(block_tq2)*(D/QK_TQ);
    for (int c = 0; c < NC; ++c) {
        make_row(0, x, D);
        tq_cpu_quantize_row(GGML_TYPE_TQ3, x, kbuf + c*kb, D);
        make_row(2, x, D);
        tq_cpu_quantize_row(GGML_TYPE_TQ2, x, vbuf + c*vb, D);
    }
    make_row(0, exact_k, D);
    make_row(0, exact_v, D);
    const float * qp[NQ];
    const ggml_fp16_t * mp[NQ];
    float slope[NQ], M[NQ], S[NQ];
    for (int r = 0; r < NQ; ++r) {
        make_row(0, q[r], D);
        qp[r] = q[r];
        mp[r] = mask[r];
        slope[r] = 1.0f;
        for (int c = 0; c < NC; ++c) {      // row r sees the cells up to 80 + r
            mask[r][c] = c <= 80 + r ? 0 : 0xFC00; // 0, -inf
        }
    }
    float * work = malloc(tq_cpu_attn_rows_work_size(D, D));
    float * out = malloc(sizeof(float)*TQ_ATTN_MAX_ROWS*D);
    const int sizes[] = { 1, 2, 3, 5, 7 };
    tq_attn_kv kv = { .k_type = GGML_TYPE_TQ3, .v_type = GGML_TYPE_TQ2, .dk = D, .dv = D, .k = kbuf, .k_stride = kb,
                      .v = vbuf, .v_stride = vb, .scale = 0.088f, .k_exact_cell = 0, .k_exact = exact_k,
                      .v_exact_cell = 0, .v_exact = exact_v };
    tq_cpu_attn_rows(&kv, NQ, qp, mp, slope, 0, NC, M, S, out, work);
    memcpy(out_all, out, sizeof(out_all));
    for (int r0 = 0, g = 0; r0 < NQ; ++g) {
        const int n = sizes[g % 5] < NQ - r0 ? sizes[g % 5] : NQ - r0;
        tq_cpu_attn_rows(&kv, n, qp + r0, mp + r0, slope + r0, 0, NC, M + r0, S + r0, out, work);
        memcpy(out_grp + r0*D, out, sizeof(float)*n*D);
        r0 += n;
    }
    check(memcmp(out_all, out_grp, sizeof(out_all)) == 0, "attn_rows: a row's output depends on the size of its group");
    free(work);
    free(out);
}

// A non-finite K/V row (a NaN input, or a norm beyond fp16's range) at cell 5 reaches only the query
// rows that attend to cell 5, as in an f16 cache: the rows whose mask hides it (a window that has
// moved past it) are bit-identical to a run where cell 5 holds an ordinary row, at every level; the
// rows that attend to it come out non-finite.
static void check_attn_nan_containment(void) {
    enum { D = 128, NC = 150, NQ = 12, BAD = 5, NV = 4 };
    static const char * what[NV] = { "NaN K and V", "NaN V", "NaN K", "Inf V" };
    const size_t kb = sizeof(block_tq3)*(D/QK_TQ), vb = sizeof(block_tq2)*(D/QK_TQ);
    static char kbuf[2][NC*sizeof(block_tq3)*(D/QK_TQ)], vbuf[2][NC*sizeof(block_tq2)*(D/QK_TQ)];
    static float x[D], q[NQ][D], exact_k[D], exact_v[D], out[2][TQ_ATTN_MAX_ROWS*D];
    static ggml_fp16_t mask[NQ][NC];
    for (int c = 0; c < NC; ++c) {
        make_row(0, x, D);
        tq_cpu_quantize_row(GGML_TYPE_TQ3, x, kbuf[0] + c*kb, D);
        make_row(2, x, D);
        tq_cpu_quantize_row(GGML_TYPE_TQ2, x, vbuf[0] + c*vb, D);
    }
    make_row(0, exact_k, D);
    make_row(0, exact_v, D);
    const float * qp[NQ];
    const ggml_fp16_t * mp[NQ];
    float slope[NQ], M[2][NQ], S[2][NQ];
    for (int r = 0; r < NQ; ++r) {
        make_row(0, q[r], D);
        qp[r] = q[r];
        mp[r] = mask[r];
        slope[r] = 1.0f;
        const int lo = r < NQ/2 ? BAD + 1 : 0;  // the first half hides cells 0 .. BAD
        for (int c = 0; c < NC; ++c) {
            mask[r][c] = c >= lo && c <= 80 + r ? 0 : 0xFC00; // 0, -inf
        }
    }
    float * work = malloc(tq_cpu_attn_rows_work_size(D, D));
    for (int v = 0; v < NV; ++v) {
        memcpy(kbuf[1], kbuf[0], sizeof(kbuf[0]));
        memcpy(vbuf[1], vbuf[0], sizeof(vbuf[0]));
        make_row(0, x, D);
        x[70] = NAN;
        if (v == 0 || v == 2) {
            tq_cpu_quantize_row(GGML_TYPE_TQ3, x, kbuf[1] + BAD*kb, D);
        }
        if (v == 0 || v == 1) {
            tq_cpu_quantize_row(GGML_TYPE_TQ2, x, vbuf[1] + BAD*vb, D);
        }
        if (v == 3) {
            make_row(6, x, D);
            for (int j = 0; j < D; ++j) {
                x[j] *= 10.0f;  // block norms ~1.6e5: Inf in fp16
            }
            tq_cpu_quantize_row(GGML_TYPE_TQ2, x, vbuf[1] + BAD*vb, D);
        }
        for (int level = 0; level < n_levels; ++level) {
            set_level(level);
            for (int run = 0; run < 2; ++run) {
                tq_attn_kv kv = { .k_type = GGML_TYPE_TQ3, .v_type = GGML_TYPE_TQ2, .dk = D, .dv = D, .k = kbuf[run],
                                  .k_stride = kb, .v = vbuf[run], .v_stride = vb, .scale = 0.088f, .k_exact_cell = 0,
                                  .k_exact = exact_k, .v_exact_cell = 0, .v_exact = exact_v };
                tq_cpu_attn_rows(&kv, NQ, qp, mp, slope, 0, NC, M[run], S[run], out[run], work);
            }
            int hidden_same = 1, seen_bad = 1;
            for (int r = 0; r < NQ; ++r) {
                if (r < NQ/2) {
                    hidden_same &= memcmp(out[0] + r*D, out[1] + r*D, D*sizeof(float)) == 0 &&
                                   memcmp(&M[0][r], &M[1][r], sizeof(float)) == 0 && memcmp(&S[0][r], &S[1][r], sizeof(float)) == 0;
                    continue;
                }
                int finite = 1;
                for (int j = 0; j < D; ++j) {
                    finite &= isfinite(out[1][r*D + j]) != 0;
                }
                seen_bad &= !finite;
            }
            check(hidden_same, "attn_rows %s %s: a row that masks the cell is not what it is without it",
                  level_names[level], what[v]);
            check(seen_bad, "attn_rows %s %s: a row that attends to the cell comes out finite", level_names[level], what[v]);
        }
    }
    free(work);
}

// The FLASH_ATTN_EXT op over TQ rows (tq_cpu_flash_attn_ext_rows), as ops.cpp calls it: 6 query heads
// over 2 K/V heads, 5 tokens, a causal mask, the rows split between 3 threads. Each thread works in
// its share of the end of the op's work buffer and leaves the start (ops.cpp's scratch) alone, and
// dst is the same whichever way the rows are split. The last token alone (an op of one token, as
// when it is decoded, or recomputed alone from llama-server's prompt cache) gets the same output,
// bit for bit, as among the 5.
static void check_flash_attn_op(void) {
    enum { D = 64, NC = 90, NT = 5, NH = 6, NHKV = 2, SCRATCH = 4096 };
    const size_t kb = sizeof(block_tq3)*(D/QK_TQ), vb = sizeof(block_tq2)*(D/QK_TQ);
    static char kbuf[NHKV*NC*sizeof(block_tq3)*(D/QK_TQ)], vbuf[NHKV*NC*sizeof(block_tq2)*(D/QK_TQ)];
    static float qd[NT*NH*D], out1[NT*NH*D], out3[NT*NH*D], x[D];
    static ggml_fp16_t mask[NT][NC];
    for (int c = 0; c < NHKV*NC; ++c) {
        make_row(0, x, D);
        tq_cpu_quantize_row(GGML_TYPE_TQ3, x, kbuf + c*kb, D);
        make_row(2, x, D);
        tq_cpu_quantize_row(GGML_TYPE_TQ2, x, vbuf + c*vb, D);
    }
    for (int i = 0; i < NT*NH; ++i) {
        make_row(0, qd + i*D, D);
    }
    for (int t = 0; t < NT; ++t) {
        for (int c = 0; c < NC; ++c) {
            mask[t][c] = c <= NC - NT + t ? 0 : 0xFC00;
        }
    }
    // ggml's layouts: q [D, NT, NH], k/v [D, NC, NHKV], mask [NC, NT], dst [D, NH, NT] (permuted)
    struct ggml_tensor q = { GGML_TYPE_F32, { D, NT, NH, 1 }, { 4, 4*D, 4*D*NT, 4*D*NT*NH }, { 0 }, { 0 }, qd };
    struct ggml_tensor k = { GGML_TYPE_TQ3, { D, NC, NHKV, 1 }, { kb, kb, kb*NC, kb*NC*NHKV }, { 0 }, { 0 }, kbuf };
    struct ggml_tensor v = { GGML_TYPE_TQ2, { D, NC, NHKV, 1 }, { vb, vb, vb*NC, vb*NC*NHKV }, { 0 }, { 0 }, vbuf };
    struct ggml_tensor m = { GGML_TYPE_F16, { NC, NT, 1, 1 }, { 2, 2*NC, 2*NC*NT, 2*NC*NT }, { 0 }, { 0 }, mask };
    struct ggml_tensor dst = { GGML_TYPE_F32, { D, NH, NT, 1 }, { 4, 4*D, 4*D*NH, 4*D*NH*NT }, { 0 }, { 0 }, NULL };
    dst.src[0] = &q; dst.src[1] = &k; dst.src[2] = &v; dst.src[3] = &m;
    const float params[3] = { 0.125f, 0.0f, 0.0f }; // scale, max_bias, softcap
    memcpy(dst.op_params, params, sizeof(params));

    const int nr = NT*NH;
    for (int nth = 1; nth <= 3; nth += 2) {
        const size_t wsize = SCRATCH + tq_cpu_flash_attn_ext_work_size(&dst, nth) + 24; // 24: an unaligned end
        unsigned char * wdata = malloc(wsize);
        memset(wdata, 0x5A, SCRATCH);
        dst.data = nth == 1 ? out1 : out3;
        int handled = 1;
        for (int ith = 0; ith < nth; ++ith) {   // thread ith takes every nth-th chunk of 4 rows
            for (int ir0 = 4*ith; ir0 < nr; ir0 += 4*nth) {
                handled &= tq_cpu_flash_attn_ext_rows(&dst, wdata, wsize, ith, nth, ir0, ir0 + 4 < nr ? ir0 + 4 : nr, 0, NC, NULL, 0);
            }
        }
        int kept = 1;
        for (int i = 0; i < SCRATCH; ++i) {
            kept &= wdata[i] == 0x5A;
        }
        check(handled, "flash_attn op (%d threads): the TQ rows declined an op they take", nth);
        check(kept, "flash_attn op (%d threads): the TQ rows wrote into the scratch before their share", nth);
        free(wdata);
    }
    check(memcmp(out1, out3, sizeof(out1)) == 0, "flash_attn op: dst depends on how the rows are split between threads");

    static float q1d[NH*D], out_last[NH*D];
    for (int h = 0; h < NH; ++h) {
        memcpy(q1d + h*D, qd + ((NT - 1) + h*NT)*D, D*sizeof(float));
    }
    struct ggml_tensor q1 = { GGML_TYPE_F32, { D, 1, NH, 1 }, { 4, 4*D, 4*D, 4*D*NH }, { 0 }, { 0 }, q1d };
    struct ggml_tensor m1 = { GGML_TYPE_F16, { NC, 1, 1, 1 }, { 2, 2*NC, 2*NC, 2*NC }, { 0 }, { 0 }, mask[NT - 1] };
    struct ggml_tensor dst1 = { GGML_TYPE_F32, { D, NH, 1, 1 }, { 4, 4*D, 4*D*NH, 4*D*NH }, { 0 }, { 0 }, out_last };
    dst1.src[0] = &q1; dst1.src[1] = &k; dst1.src[2] = &v; dst1.src[3] = &m1;
    memcpy(dst1.op_params, params, sizeof(params));
    const size_t wsize1 = SCRATCH + tq_cpu_flash_attn_ext_work_size(&dst1, 1);
    unsigned char * wdata1 = malloc(wsize1);
    check(tq_cpu_flash_attn_ext_rows(&dst1, wdata1, wsize1, 0, 1, 0, NH, 0, NC, NULL, 0),
          "flash_attn op (one token): the TQ rows declined an op they take");
    free(wdata1);
    check(memcmp(out_last, out1 + (NT - 1)*NH*D, sizeof(out_last)) == 0,
          "flash_attn op: a token alone gets another output than among the batch's tokens");
    int finite = 1;
    for (int i = 0; i < NT*NH*D; ++i) {
        finite &= isfinite(out1[i]) != 0;
    }
    check(finite, "flash_attn op: dst is not finite");
}

// tq3c: each level's tile decoder (tq_cpu_decode_rows_tq3c) gives the reference's floats bit for bit,
// over coefficients of every kind (the outlier channels make some blocks tq3 blocks, step 5 of
// tq-blocks.h), a NaN block and a zero block included
static void check_tq3c_decode(void) {
    static float z[N_ROWS*N_ROW], ref[N_ROWS*N_ROW], dec[N_ROWS*N_ROW];
    static block_tq3c blocks[N_ROWS*N_ROW/QK_TQ];
    const size_t rs = (N_ROW/QK_TQ)*sizeof(block_tq3c);
    seed_section(2);
    for (int r = 0; r < N_ROWS; ++r) {
        make_row(r % N_KINDS, z + r*N_ROW, N_ROW);
        for (int j = 0; j < N_ROW; ++j) {   // a calibrated-looking spectrum: falling variance
            z[r*N_ROW + j] *= (float) (1.0 / (1.0 + (j % QK_TQ)/8.0));
        }
    }
    z[5*N_ROW + 7] = NAN;
    quantize_row_tq3c_ref(z, blocks, N_ROWS*N_ROW);
    dequantize_row_tq3c(blocks, ref, N_ROWS*N_ROW);
    hash_bytes(blocks, sizeof(blocks));
    int n_tq3 = 0;
    for (int b = 0; b < N_ROWS*N_ROW/QK_TQ; ++b) {
        n_tq3 += (blocks[b].d & 0x8000) != 0;
    }
    check(n_tq3 > 0, "tq3c: no block of the test rows is a tq3 block (step 5 untested)");
    for (int level = 0; level < n_levels; ++level) {
        set_level(level);
        memset(dec, 0xff, sizeof(dec));
        tq_cpu_decode_rows_tq3c(N_ROW, blocks, rs, N_ROWS, dec);
        int first = -1;
        for (int i = 0; i < N_ROWS*N_ROW && first < 0; ++i) {
            if (memcmp(&dec[i], &ref[i], sizeof(float)) != 0) {
                first = i;
            }
        }
        check(first < 0, "decode_rows %s tq3c: differs from the reference decode (first at row %d, value %d)",
              level_names[level], first / N_ROW, first % N_ROW);
    }
}

// Index j of a split block, bit by bit as the reference reads it (for the test's own coverage check).
static uint32_t split_index(const tq_split_layout * l, const uint8_t * blk, int j) {
    const int off = j < TQ_SPLIT_HI ? j*l->bits[0] : TQ_SPLIT_HI*l->bits[0] + (j - TQ_SPLIT_HI)*l->bits[1];
    const int bits = l->bits[j < TQ_SPLIT_HI ? 0 : 1];
    uint32_t idx = 0;
    for (int i = 0; i < bits; ++i) {
        idx |= (uint32_t) ((blk[4 + (off + i)/8] >> ((off + i) % 8)) & 1u) << i;
    }
    return idx;
}

// tq2o, tq3o: each level's tile decoder (tq_cpu_decode_rows_calibrated) gives the reference's floats
// (tq_split_dequantize_row) bit for bit, and each level's vec_dot the scalar level's bits, on blocks
// the quantizer wrote from rows of every kind (a NaN group and zero groups included) and on blocks of
// random bytes with extreme norms (zeros of both signs, NaN, infinities, the largest and subnormal
// fp16), which hold every index value of both groups; rows are read with a stride (other bytes in
// between), and a row that ends where an unreadable page starts checks that no level reads past a block.
static void check_split_decode(void) {
    enum { NB = N_ROW/QK_TQ, GAP = 40 };
    static const ggml_fp16_t norms[] = { 0x0000, 0x8000, 0x7E00, 0x7C00, 0xFC00, 0x7BFF, 0xFBFF, 0x0001, 0x83FF, 0x3C00 };
    const int n_norms = (int) (sizeof(norms)/sizeof(norms[0]));
    const enum ggml_type types[2] = { GGML_TYPE_TQ2O, GGML_TYPE_TQ3O };
    static float z[N_ROWS*N_ROW], q[N_ROW], ref[N_ROWS*N_ROW], dec[N_ROWS*N_ROW];
    static uint8_t rows[N_ROWS*(NB*sizeof(block_tq3o) + GAP)];
    seed_section(3);
    for (int t = 0; t < 2; ++t) {
        const enum ggml_type type = types[t];
        const char * tname = ggml_type_name(type);
        const tq_split_layout l = tq_split_layout_of(type);
        const size_t rs = NB*l.size, stride = rs + GAP;
        for (int i = 0; i < (int) sizeof(rows); ++i) {
            rows[i] = (uint8_t) splitmix64();   // the gaps hold bytes no decoder may use
        }
        for (int r = 0; r < N_ROWS; ++r) {
            uint8_t * row = rows + r*stride;
            if (r % 2 == 0) {                   // the quantizer's blocks
                make_row((r/2) % N_KINDS, z + r*N_ROW, N_ROW);
                if (r == 2) {
                    z[r*N_ROW + 70] = NAN;      // block 1's outlier group
                }
                tq_split_quantize_row(type, z + r*N_ROW, row, N_ROW);
                hash_bytes(row, rs);
                continue;
            }
            for (int b = 0; b < NB; ++b) {      // random bytes, the norms from the list or random
                uint8_t * blk = row + b*l.size;
                for (int g = 0; g < 2; ++g) {
                    const uint64_t c = splitmix64() % (uint64_t) (2*n_norms);
                    const ggml_fp16_t d = c < (uint64_t) n_norms ? norms[c] : (ggml_fp16_t) splitmix64();
                    memcpy(blk + g*sizeof(d), &d, sizeof(d));
                }
            }
            if (r == 1) {                       // every index bit set: the largest index everywhere
                for (int b = 0; b < NB; ++b) {
                    memset(row + b*l.size + 4, 0xFF, l.size - 4);
                }
            }
        }
        int seen[2][32] = { { 0 } };
        for (int r = 0; r < N_ROWS; ++r) {
            tq_split_dequantize_row(type, rows + r*stride, ref + r*N_ROW, N_ROW);
            for (int b = 0; b < NB; ++b) {
                for (int j = 0; j < QK_TQ; ++j) {
                    seen[j < TQ_SPLIT_HI ? 0 : 1][split_index(&l, rows + r*stride + b*l.size, j)] = 1;
                }
            }
        }
        int all = 1;
        for (int g = 0; g < 2; ++g) {
            for (int i = 0; i < (1 << l.bits[g]); ++i) {
                all &= seen[g][i];
            }
        }
        check(all, "split %s: the test blocks miss an index value", tname);

        make_row(0, q, N_ROW);
        float dot_scalar[N_ROWS];
        for (int level = 0; level < n_levels; ++level) {
            set_level(level);
            memset(dec, 0xff, sizeof(dec));
            tq_cpu_decode_rows_calibrated(type, N_ROW, rows, stride, N_ROWS, dec);
            int first = -1;
            for (int i = 0; i < N_ROWS*N_ROW && first < 0; ++i) {
                if (memcmp(&dec[i], &ref[i], sizeof(float)) != 0) {
                    first = i;
                }
            }
            check(first < 0, "decode_rows %s %s: differs from the reference decode (first at row %d, value %d: %a vs %a)",
                  level_names[level], tname, first / N_ROW, first % N_ROW,
                  first < 0 ? 0.0 : (double) dec[first], first < 0 ? 0.0 : (double) ref[first]);
            int same = 1;
            for (int r = 0; r < N_ROWS; ++r) {
                float s = 0.0f;
                if (type == GGML_TYPE_TQ2O) {
                    tq_cpu_vec_dot_tq2o(N_ROW, &s, 0, rows + r*stride, 0, q, 0, 1);
                } else {
                    tq_cpu_vec_dot_tq3o(N_ROW, &s, 0, rows + r*stride, 0, q, 0, 1);
                }
                if (level == 0) {
                    dot_scalar[r] = s;
                }
                same &= memcmp(&s, &dot_scalar[r], sizeof(float)) == 0;
            }
            check(same, "vec_dot %s %s: not the scalar level's bits", level_names[level], tname);
        }

#if defined(__unix__)
        // the last row of random bytes again, its end at an unreadable page
        const size_t page = (size_t) sysconf(_SC_PAGESIZE);
        uint8_t * map = mmap(NULL, 2*page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map == MAP_FAILED || mprotect(map + page, page, PROT_NONE) != 0) {
            check(0, "split %s: no guard page (mmap)", tname);
            continue;
        }
        uint8_t * edge = map + page - rs;
        memcpy(edge, rows + (N_ROWS - 1)*stride, rs);
        for (int level = 0; level < n_levels; ++level) {
            set_level(level);
            tq_cpu_decode_rows_calibrated(type, N_ROW, edge, rs, 1, dec);
            check(memcmp(dec, ref + (N_ROWS - 1)*N_ROW, N_ROW*sizeof(float)) == 0,
                  "decode_rows %s %s: the row before a guard page differs from the reference decode", level_names[level], tname);
        }
        munmap(map, 2*page);
#endif
    }
}

int main(int argc, char ** argv) {
    const char * expect[8];
    int n_expect = 0;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--expect") == 0 && i + 1 < argc && n_expect < 8) {
            expect[n_expect++] = argv[++i];
        } else {
            fprintf(stderr, "usage: %s [--expect LEVEL_NAME]...\n", argv[0]);
            return 2;
        }
    }

    n_levels = tq_cpu_set_simd_level(MAX_LEVELS - 1) + 1;
    printf("simd levels:");
    for (int level = 0; level < n_levels; ++level) {
        set_level(level);
        level_names[level] = tq_cpu_simd_name();
        printf(" %d=%s", level, level_names[level]);
    }
    printf("\n");
    for (int i = 0; i < n_expect; ++i) {
        int found = 0;
        for (int level = 0; level < n_levels; ++level) {
            found |= strcmp(level_names[level], expect[i]) == 0;
        }
        check(found, "expected SIMD level %s is not available here", expect[i]);
    }

    rng_state = 0x5451534944ULL;
    for (int t = 0; t < N_TYPES; ++t) {
        for (int kind = 0; kind < N_KINDS; ++kind) {
            check_type_kind(TYPES[t], kind);
        }
    }
    check_unrotate();
    check_attn_rows_grouping();
    check_attn_nan_containment();
    check_flash_attn_op();
    check_tq3c_decode();
    check_split_decode();

    printf("reference checksum: %016llx\n", (unsigned long long) checksum);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
