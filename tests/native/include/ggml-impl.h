// Minimal stand-in for ggml-impl.h (see ggml.h here): IEEE binary16 <-> binary32 conversions,
// float -> half rounding to nearest, ties to even, as ggml's.
#pragma once

#include "ggml.h"

#include <math.h>
#include <string.h>

static inline float ggml_stub_fp16_to_fp32(ggml_fp16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    const uint32_t e = (h >> 10) & 0x1f;
    const uint32_t m = h & 0x3ff;
    uint32_t bits;
    if (e == 0x1f) {                    // Inf, NaN
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {                // zero, subnormal: m * 2^-24, exact
        const float v = (float) m * 0x1p-24f;
        return sign ? -v : v;
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static inline ggml_fp16_t ggml_stub_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (ggml_fp16_t) (sign | 0x7e00);                       // NaN
    }
    if (a >= 0x477ff000u) {
        return (ggml_fp16_t) (sign | 0x7c00);                       // Inf, or rounds to >= 65520
    }
    if (a < 0x38800000u) {                                          // below 2^-14: subnormal or zero
        float v;
        memcpy(&v, &a, sizeof(v));
        return (ggml_fp16_t) (sign | (uint32_t) rintf(v * 0x1p24f)); // exact scaling, then ties to even
    }
    uint32_t h = (a >> 13) - (112u << 10);                          // rebias the exponent, truncate
    const uint32_t rem = a & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) {
        h += 1;                                                     // a carry moves into the exponent
    }
    return (ggml_fp16_t) (sign | h);
}

#define GGML_FP16_TO_FP32(x) ggml_stub_fp16_to_fp32(x)
#define GGML_FP32_TO_FP16(x) ggml_stub_fp32_to_fp16(x)
