// Every SIMD level of the TQ CPU kernels (ggml_tq/tq-cpu.c) against the scalar level, without
// llama.cpp: built with ggml_tq/tq.c and the ggml stand-ins in this folder, natively and
// cross-compiled for aarch64 (run under qemu-aarch64); tests/test_simd_native.py drives it.
//
//   quantize:      tq_cpu_quantize_row bytes identical at every level (and to quantize_tq)
//   vec_dot:       within 2 n eps sum |k_j q_j| of the exact dot product and of the scalar level
//                  (the bound of tests/test_parity_c.py); the _qjl types (reference at every level)
//                  identical
//   decode:        one row mad_rotated into a zero accumulator with weight 1, and all rows through
//                  tq_cpu_decode_rows_rotated, equal the reference decode (tq_dequantize_row_rotated_ref)
//                  at every level
//   mad_rotated:   sum_r w_r * row_r accumulated in the rotated domain and rotated back once, within
//                  (rows + 16) eps sqrt(64) max_j sum_r |w_r k_rj| of the float64 sum of the decoded
//                  rows, and of the scalar level
//   unrotate:      tq_cpu_unrotate_row bit-identical to tq_unrotate_block (finite inputs, denormals,
//                  signed zeros); a NaN spreads over its block only
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

    static float x[N_ROWS][N_ROW], q[N_ROWS][N_ROW], krot[N_ROWS][N_ROW], qrot[N_ROWS][N_ROW], w[N_ROWS];
    static uint8_t ref[N_ROWS * sizeof(block_tq_q) * (N_ROW / QK_TQ)], buf[sizeof(ref)];
    static uint8_t qbuf[N_ROWS][sizeof(block_tq_q) * (N_ROW / QK_TQ)];

    for (int r = 0; r < N_ROWS; ++r) {
        make_row(kind, x[r], N_ROW);
        make_row(0, q[r], N_ROW);
        w[r] = (float) uniform();
    }

    // quantize: the reference bytes, then every level's
    quantize_tq(type, &x[0][0], ref, N_ROWS, N_ROW, NULL);
    hash_bytes(ref, N_ROWS * rs);
    for (int level = 0; level < n_levels; ++level) {
        set_level(level);
        for (int r = 0; r < N_ROWS; ++r) {
            tq_cpu_quantize_row(type, x[r], buf + r*rs, N_ROW);
        }
        check(memcmp(ref, buf, N_ROWS * rs) == 0, "quantize %s %s %s: bytes differ from the reference", level_names[level], tname, kname);
    }

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
        const float dref = tq_vec_dot_ref(type, N_ROW, ref + r*rs, qbuf[r]);
        hash_bytes(&dref, sizeof(dref));
    }
    float got[MAX_LEVELS][N_ROWS];
    for (int level = 0; level < n_levels; ++level) {
        set_level(level);
        for (int r = 0; r < N_ROWS; ++r) {
            got[level][r] = cpu_vec_dot(type, N_ROW, ref + r*rs, qbuf[r]);
        }
    }
    for (int level = 0; level < n_levels; ++level) {
        int ok = 1;
        double worst = 0.0;
        for (int r = 0; r < N_ROWS; ++r) {
            if (qjl) {      // the reference at every level
                ok &= memcmp(&got[level][r], &got[0][r], sizeof(float)) == 0;
                continue;
            }
            double exact = 0.0, mag = 0.0;
            for (int j = 0; j < N_ROW; ++j) {
                exact += (double) krot[r][j] * (double) qrot[r][j];
                mag += fabs((double) krot[r][j] * (double) qrot[r][j]);
            }
            const double bound = 2.0 * N_ROW * EPS32 * mag + 1e-30;
            const double e0 = fabs((double) got[level][r] - exact);
            const double e1 = fabs((double) got[level][r] - (double) got[0][r]);
            ok &= e0 <= bound && e1 <= bound;
            worst = fmax(worst, fmax(e0, e1) / bound);
        }
        check(ok, "vec_dot %s %s %s: outside the float32 bound (worst error / bound %.3g)", level_names[level], tname, kname, worst);
    }

    // one row into a zero accumulator with weight 1: fl(d * c[idx]) (one rounding at every level),
    // equal to the reference decode: catches index and table errors that the bounds above would not
    float dec[N_ROW];
    for (int level = 0; level < n_levels; ++level) {
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
    for (int level = 0; level < n_levels; ++level) {
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
    float acc[MAX_LEVELS][N_ROW];
    for (int level = 0; level < n_levels; ++level) {
        set_level(level);
        memset(acc[level], 0, sizeof(acc[level]));
        for (int r = 0; r < N_ROWS; ++r) {
            tq_cpu_mad_rotated(type, N_ROW, acc[level], ref + r*rs, w[r]);
        }
        tq_cpu_unrotate_row(acc[level], N_ROW);
        int ok = 1;
        double worst = 0.0;
        for (int j = 0; j < N_ROW; ++j) {
            const double e0 = fabs((double) acc[level][j] - vref[j]);
            const double e1 = fabs((double) acc[level][j] - (double) acc[0][j]);
            ok &= e0 <= vbound && e1 <= vbound;
            worst = fmax(worst, fmax(e0, e1) / vbound);
        }
        check(ok, "mad_rotated+unrotate %s %s %s: outside the float32 bound (worst error / bound %.3g)", level_names[level], tname, kname, worst);
    }
}

// The inverse rotation alone: bit-identical at every level.
static void check_unrotate(void) {
    enum { NB = 5, N = NB * QK_TQ };
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
        for (int level = 0; level < n_levels; ++level) {
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
// its group: rows computed 64 at a time, and in groups of 1, 2, 3, 5 and 7, are bit-identical,
// for both ways of computing scores (dot products while decoding, tile products in prompts), with a
// causal mask over 150 cells (three tiles, the last one partial) and an exact row at cell 0.
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
    for (int dots = 0; dots < 2; ++dots) {
        tq_attn_kv kv = { GGML_TYPE_TQ3, GGML_TYPE_TQ2, D, D, kbuf, kb, vbuf, vb, 0.088f, dots != 0, 0, exact_k, 0, exact_v };
        tq_cpu_attn_rows(&kv, NQ, qp, mp, slope, 0, NC, M, S, out, work);
        memcpy(out_all, out, sizeof(out_all));
        for (int r0 = 0, g = 0; r0 < NQ; ++g) {
            const int n = sizes[g % 5] < NQ - r0 ? sizes[g % 5] : NQ - r0;
            tq_cpu_attn_rows(&kv, n, qp + r0, mp + r0, slope + r0, 0, NC, M + r0, S + r0, out, work);
            memcpy(out_grp + r0*D, out, sizeof(float)*n*D);
            r0 += n;
        }
        check(memcmp(out_all, out_grp, sizeof(out_all)) == 0,
              "attn_rows (%s): a row's output depends on the size of its group", dots ? "dot products" : "tile products");
    }
    free(work);
    free(out);
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

    printf("reference checksum: %016llx\n", (unsigned long long) checksum);
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
