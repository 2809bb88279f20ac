// The few ggml functions that ggml_tq/tq.c and ggml_tq/tq-cpu.c call (see include/ggml.h).
#include "ggml.h"
#include "tq.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "%s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

const char * ggml_type_name(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:      return "f32";
        case GGML_TYPE_F16:      return "f16";
        case GGML_TYPE_TQ2:      return "tq2";
        case GGML_TYPE_TQ3:      return "tq3";
        case GGML_TYPE_TQ4:      return "tq4";
        case GGML_TYPE_TQ2_QJL:  return "tq2_qjl";
        case GGML_TYPE_TQ3_QJL:  return "tq3_qjl";
        case GGML_TYPE_TQ4_QJL:  return "tq4_qjl";
        case GGML_TYPE_TQ_Q:     return "tq_q";
        case GGML_TYPE_TQ_QJL_Q: return "tq_qjl_q";
        case GGML_TYPE_TQ3C:     return "tq3c";
        case GGML_TYPE_TQ2O:     return "tq2o";
        case GGML_TYPE_TQ3O:     return "tq3o";
        default:                 return "NONE";
    }
}

size_t ggml_type_size(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:      return sizeof(float);
        case GGML_TYPE_F16:      return sizeof(ggml_fp16_t);
        case GGML_TYPE_TQ2:      return sizeof(block_tq2);
        case GGML_TYPE_TQ3:      return sizeof(block_tq3);
        case GGML_TYPE_TQ4:      return sizeof(block_tq4);
        case GGML_TYPE_TQ2_QJL:  return sizeof(block_tq2_qjl);
        case GGML_TYPE_TQ3_QJL:  return sizeof(block_tq3_qjl);
        case GGML_TYPE_TQ4_QJL:  return sizeof(block_tq4_qjl);
        case GGML_TYPE_TQ_Q:     return sizeof(block_tq_q);
        case GGML_TYPE_TQ_QJL_Q: return sizeof(block_tq_qjl_q);
        case GGML_TYPE_TQ3C:     return sizeof(block_tq3c);
        case GGML_TYPE_TQ2O:     return sizeof(block_tq2o);
        case GGML_TYPE_TQ3O:     return sizeof(block_tq3o);
        default: GGML_ABORT("ggml_type_size: unknown type %d", (int) type);
    }
}

static int64_t ggml_blck_size(enum ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 ? 1 : QK_TQ;
}

size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    if (ne % ggml_blck_size(type) != 0) {
        GGML_ABORT("ggml_row_size: %lld is not a multiple of %s's block size", (long long) ne, ggml_type_name(type));
    }
    return ggml_type_size(type) * (size_t) (ne / ggml_blck_size(type));
}
