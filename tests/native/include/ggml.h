// Minimal stand-in for ggml.h: just what ggml_tq/tq.c and ggml_tq/tq-cpu.c use, so that
// tests/native/tq_simd_check.c can build them without llama.cpp (natively and cross-compiled).
// The TQ type ids are patches/0001's.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GGML_API

typedef uint16_t ggml_fp16_t;

enum ggml_type {
    GGML_TYPE_F32        = 0,
    GGML_TYPE_F16        = 1,
    GGML_TYPE_TQ2        = 43,
    GGML_TYPE_TQ3        = 44,
    GGML_TYPE_TQ4        = 45,
    GGML_TYPE_TQ2_QJL    = 46,
    GGML_TYPE_TQ3_QJL    = 47,
    GGML_TYPE_TQ4_QJL    = 48,
    GGML_TYPE_TQ_Q       = 49,
    GGML_TYPE_TQ_QJL_Q   = 50,
    GGML_TYPE_TQ3C       = 51,
    GGML_TYPE_TQ2O       = 52,
    GGML_TYPE_TQ3O       = 53,
    GGML_TYPE_COUNT      = 54,
};

#define GGML_MAX_DIMS      4
#define GGML_MAX_SRC       10
#define GGML_MAX_OP_PARAMS 64

// The members tq_cpu_flash_attn_ext_rows reads (not ggml's layout: the check does not call it).
struct ggml_tensor {
    enum ggml_type type;
    int64_t ne[GGML_MAX_DIMS];
    size_t  nb[GGML_MAX_DIMS];
    int32_t op_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)];
    struct ggml_tensor * src[GGML_MAX_SRC];
    void * data;
};

#ifdef __cplusplus
extern "C" {
#endif

_Noreturn void ggml_abort(const char * file, int line, const char * fmt, ...);
#define GGML_ABORT(...) ggml_abort(__FILE__, __LINE__, __VA_ARGS__)

const char * ggml_type_name(enum ggml_type type);
size_t ggml_type_size(enum ggml_type type);
size_t ggml_row_size(enum ggml_type type, int64_t ne);

#ifdef __cplusplus
}
#endif
