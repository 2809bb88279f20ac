// TurboQuant KV-cache types in ggml-cuda: which ops run on our kernels (tq-cuda.h) and how a ggml op
// becomes their arguments. Built into ggml-cuda (patches/0011); ggml-cuda.cu asks
// ggml_cuda_tq_op() of every op and routes those to ggml_cuda_tq_supports_op/_compute_forward.
//
// Flash attention takes two paths. Decoding (few query rows per K/V head) runs tq_cuda_fattn, which
// reads each coded cell once. A prompt (many query rows) decodes the TQ side(s) to f16 in the rotated
// domain (d * C[idx]: no inverse rotation per cached row), puts the exact sink rows in (rotated),
// and runs ggml-cuda's own f16 flash attention (the tensor-core kernels) on Q rotated in (TQ keys)
// and rotates its output back (TQ values): rotations cost one pass over the ubatch's rows, the
// cache is read once per ubatch, small beside the products of hundreds of rows.
#include "tq-ggml-cuda.cuh"

#include "convert.cuh"
#include "fattn.cuh"
#include "tq-cuda.h"
#include "tq.h"

// Query rows per K/V head up to which decoding reads the coded cache directly: the decode kernel
// reads each cell once per 8 rows, the prompt path writes the whole cache in f16 once.
static constexpr int64_t TQ_CUDA_DECODE_MAX_ROWS = 32;

static bool tq_cuda_kv(ggml_type t) {
    return tq_cuda_is_type((int) t);
}

// a TQ cache type or the query type of their CPU dot products
static bool tq_ggml_type(ggml_type t) {
    return tq_is_kv_type(t) || t == GGML_TYPE_TQ_Q || t == GGML_TYPE_TQ_QJL_Q;
}

bool ggml_cuda_tq_op(const ggml_tensor * op) {
    switch (op->op) {
        case GGML_OP_NONE:
        case GGML_OP_VIEW:
        case GGML_OP_RESHAPE:
        case GGML_OP_PERMUTE:
        case GGML_OP_TRANSPOSE:
            return false; // no data is touched: ggml-cuda's own handling holds for every type
        default:
            break;
    }
    if (tq_ggml_type(op->type)) {
        return true;
    }
    for (int i = 0; i < GGML_MAX_SRC; ++i) {
        if (op->src[i] && tq_ggml_type(op->src[i]->type)) {
            return true;
        }
    }
    return false;
}

static tq_cuda_tensor tq_cuda_tensor_of(const ggml_tensor * t) {
    tq_cuda_tensor r = {};
    if (t) {
        r.data = t->data;
        for (int i = 0; i < 4; ++i) {
            r.ne[i] = t->ne[i];
            r.nb[i] = t->nb[i];
        }
    }
    return r;
}

static unsigned tq_cuda_quantize_flags() {
    const tq_quantize_options & q = tq_knobs()->quant;
    return (q.norm_correction ? 0u : TQ_CUDA_NO_NORM_CORRECTION) | (q.scale_search ? 0u : TQ_CUDA_NO_SCALE_SEARCH);
}

// --- flash attention --------------------------------------------------------------------------------

static bool tq_fa_decodes(const ggml_tensor * dst) {
    const ggml_tensor * Q = dst->src[0];
    const ggml_tensor * K = dst->src[1];
    return Q->ne[1] * (Q->ne[2] / K->ne[2]) <= TQ_CUDA_DECODE_MAX_ROWS;
}

// dst as the prompt path hands it to ggml-cuda: K and V replaced by f16 tensors, Q by a contiguous
// f32 copy where the keys are TQ (data set later), no exact rows
struct tq_fa_f16_op {
    ggml_tensor op, q, k, v;

    explicit tq_fa_f16_op(const ggml_tensor * dst) : op(*dst), q(*dst->src[0]), k(*dst->src[1]), v(*dst->src[2]) {
        if (tq_cuda_kv(k.type)) {
            q.nb[0] = sizeof(float);
            for (int i = 1; i < GGML_MAX_DIMS; ++i) {
                q.nb[i] = q.nb[i - 1]*q.ne[i - 1];
            }
            q.view_src = nullptr;
            q.view_offs = 0;
            op.src[0] = &q;
        }
        for (ggml_tensor * t : { &k, &v }) {
            if (t->type != GGML_TYPE_F16) {
                t->type  = GGML_TYPE_F16;
                t->nb[0] = sizeof(half);
                for (int i = 1; i < GGML_MAX_DIMS; ++i) {
                    t->nb[i] = t->nb[i - 1]*t->ne[i - 1];
                }
                t->view_src = nullptr;
                t->view_offs = 0;
            }
        }
        op.src[1] = &k;
        op.src[2] = &v;
        op.src[5] = op.src[6] = op.src[7] = nullptr;
    }
};

static bool tq_fa_supported(int device, const ggml_tensor * dst) {
    const ggml_tensor * Q = dst->src[0];
    const ggml_tensor * K = dst->src[1];
    const ggml_tensor * V = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    const int cc = ggml_cuda_info().devices[device].cc;
    if (!cp_async_available(cc) || Q->type != GGML_TYPE_F32 || Q->nb[0] != sizeof(float) ||
        (mask && mask->type != GGML_TYPE_F16) || (dst->src[4] && dst->src[4]->type != GGML_TYPE_F32) ||
        !tq_cuda_fattn_supported((int) K->type, (int) V->type, K->ne[0], V->ne[0]) ||
        (!tq_cuda_kv(K->type) && K->nb[0] != ggml_type_size(K->type)) ||
        (!tq_cuda_kv(V->type) && V->nb[0] != ggml_type_size(V->type))) {
        return false;
    }
    if (tq_fa_decodes(dst)) {
        return true;
    }
    // the prompt path needs ggml-cuda's f16 kernel for this shape; its tensor-core kernel has
    // soft-capping only at head sizes 128 and 256 (other instances have no device code)
    float softcap;
    memcpy(&softcap, (const float *) dst->op_params + 2, sizeof(float));
    if (softcap != 0.0f && K->ne[0] != 128 && K->ne[0] != 256) {
        return false;
    }
    const tq_fa_f16_op f16(dst);
    return ggml_cuda_flash_attn_ext_supported(device, &f16.op);
}

static tq_cuda_fattn_args tq_fa_args(const ggml_tensor * dst) {
    const ggml_tensor * K = dst->src[1];
    const ggml_tensor * V = dst->src[2];
    tq_cuda_fattn_args a = {};
    a.q = tq_cuda_tensor_of(dst->src[0]);
    a.k = tq_cuda_tensor_of(K);
    a.v = tq_cuda_tensor_of(V);
    a.k_type = (int) K->type;
    a.v_type = (int) V->type;
    a.mask = tq_cuda_tensor_of(dst->src[3]);
    a.sinks = dst->src[4] ? (const float *) dst->src[4]->data : nullptr;
    const ggml_tensor * xk = dst->src[5], * xv = dst->src[6], * cell = dst->src[7];
    if (cell && ((xk && tq_cuda_kv(K->type)) || (xv && tq_cuda_kv(V->type)))) {
        if (xk && tq_cuda_kv(K->type)) {
            a.k_exact = (const float *) xk->data;
            a.k_exact_nb1 = xk->nb[1];
        }
        if (xv && tq_cuda_kv(V->type)) {
            a.v_exact = (const float *) xv->data;
            a.v_exact_nb1 = xv->nb[1];
        }
        a.exact_cell = (const int32_t *) cell->data;
    }
    a.dst = (float *) dst->data;
    memcpy(&a.scale,    (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&a.max_bias, (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&a.softcap,  (const float *) dst->op_params + 2, sizeof(float));
    return a;
}

static void tq_fa_decode(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const tq_cuda_fattn_args a = tq_fa_args(dst);
    const int n_sm = ggml_cuda_info().devices[ctx.device].nsm;
    const size_t work_size = tq_cuda_fattn_work_size(&a, n_sm);
    ggml_cuda_pool_alloc<char> work(ctx.pool(), std::max<size_t>(work_size, 1));
    CUDA_CHECK((cudaError_t) tq_cuda_fattn(&a, work.get(), work_size, n_sm, 0, ctx.stream()));
}

// one side of the prompt path: the cache's rows in f16 (TQ decoded in the rotated domain, exact rows
// rotated and put in; q8_0 converted)
static void tq_fa_side_to_f16(ggml_backend_cuda_context & ctx, const ggml_tensor * src, ggml_tensor * f16,
                              ggml_cuda_pool_alloc<half> & buf, const ggml_tensor * exact, const ggml_tensor * cell) {
    if (src->type == GGML_TYPE_F16) {
        return;
    }
    buf.alloc(ggml_nelements(src));
    f16->data = buf.get();
    if (tq_cuda_kv(src->type)) {
        const tq_cuda_tensor no_idx = {};
        CUDA_CHECK((cudaError_t) tq_cuda_get_rows((int) src->type, tq_cuda_tensor_of(src), no_idx, false, f16->data,
                                                  TQ_CUDA_TYPE_F16, f16->ne, f16->nb, true, ctx.stream()));
        if (exact && cell) {
            CUDA_CHECK((cudaError_t) tq_cuda_put_exact_rows(f16->data, f16->ne, f16->nb, (const float *) exact->data,
                                                            exact->nb[1], (const int32_t *) cell->data, true, ctx.stream()));
        }
    } else {
        const size_t ts = ggml_type_size(src->type);
        const int64_t bs = ggml_blck_size(src->type);
        ggml_get_to_fp16_nc_cuda(src->type)(src->data, (half *) f16->data, src->ne[0], src->ne[1], src->ne[2], src->ne[3],
                                            src->nb[1]/ts*bs, src->nb[2]/ts*bs, src->nb[3]/ts*bs, ctx.stream());
    }
}

static void tq_fa_prompt(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    tq_fa_f16_op f16(dst);
    ggml_cuda_pool_alloc<half> k_buf(ctx.pool()), v_buf(ctx.pool());
    ggml_cuda_pool_alloc<float> q_buf(ctx.pool());
    tq_fa_side_to_f16(ctx, dst->src[1], &f16.k, k_buf, dst->src[5], dst->src[7]);
    tq_fa_side_to_f16(ctx, dst->src[2], &f16.v, v_buf, dst->src[6], dst->src[7]);
    if (f16.op.src[0] == &f16.q) {   // TQ keys: Q into the keys' rotated domain
        q_buf.alloc(ggml_nelements(&f16.q));
        f16.q.data = q_buf.get();
        CUDA_CHECK((cudaError_t) tq_cuda_rotate_rows(tq_cuda_tensor_of(dst->src[0]), q_buf.get(), f16.q.nb, false, ctx.stream()));
    }
    ggml_cuda_flash_attn_ext(ctx, &f16.op);
    if (tq_cuda_kv(dst->src[2]->type)) {   // TQ values: the output back from their rotated domain
        CUDA_CHECK((cudaError_t) tq_cuda_rotate_rows(tq_cuda_tensor_of(dst), (float *) dst->data, dst->nb, true, ctx.stream()));
    }
}

// --- routing ----------------------------------------------------------------------------------------

bool ggml_cuda_tq_supports_op(int device, const ggml_tensor * op) {
    const ggml_tensor * src0 = op->src[0];
    switch (op->op) {
        case GGML_OP_SET_ROWS:
            return tq_cuda_set_rows_supported((int) op->type, (int) src0->type) && src0->nb[0] == ggml_type_size(src0->type) &&
                   (op->src[1]->type == GGML_TYPE_I64 || op->src[1]->type == GGML_TYPE_I32);
        case GGML_OP_GET_ROWS:
            return tq_cuda_kv(src0->type) && op->type == GGML_TYPE_F32 && op->src[1]->type == GGML_TYPE_I32;
        case GGML_OP_CPY: {
            const ggml_tensor * dst = op->src[1];
            if (tq_cuda_kv(dst->type) && src0->type == dst->type) {
                return ggml_is_contiguous(src0) && ggml_is_contiguous(dst);
            }
            if (tq_cuda_kv(dst->type)) {
                return tq_cuda_set_rows_supported((int) dst->type, (int) src0->type) && src0->nb[0] == ggml_type_size(src0->type) &&
                       ggml_are_same_shape(src0, dst);
            }
            return tq_cuda_kv(src0->type) && (dst->type == GGML_TYPE_F32 || dst->type == GGML_TYPE_F16) &&
                   dst->nb[0] == ggml_type_size(dst->type) && ggml_are_same_shape(src0, dst);
        }
        case GGML_OP_DUP:
        case GGML_OP_CONT:
            return tq_cuda_kv(src0->type) && op->type == src0->type && ggml_is_contiguous(src0) && ggml_is_contiguous(op);
        case GGML_OP_FLASH_ATTN_EXT:
            return tq_fa_supported(device, op);
        default:
            // products with a TQ operand (attention without flash attention) and the _qjl types stay on the CPU
            return false;
    }
}

static void tq_cuda_copy(ggml_backend_cuda_context & ctx, const ggml_tensor * src, ggml_tensor * dst) {
    const tq_cuda_tensor no_idx = {};
    if (src->type == dst->type) {
        CUDA_CHECK(cudaMemcpyAsync(dst->data, src->data, ggml_nbytes(src), cudaMemcpyDeviceToDevice, ctx.stream()));
    } else if (tq_cuda_kv(dst->type)) {
        CUDA_CHECK((cudaError_t) tq_cuda_set_rows((int) dst->type, tq_cuda_tensor_of(src), (int) src->type, no_idx, false,
                                                  dst->data, dst->nb, tq_cuda_quantize_flags(), ctx.stream()));
    } else {
        CUDA_CHECK((cudaError_t) tq_cuda_get_rows((int) src->type, tq_cuda_tensor_of(src), no_idx, false, dst->data,
                                                  (int) dst->type, dst->ne, dst->nb, false, ctx.stream()));
    }
}

void ggml_cuda_tq_compute_forward(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * src0 = dst->src[0];
    switch (dst->op) {
        case GGML_OP_SET_ROWS: {
            const ggml_tensor * idx = dst->src[1];
            CUDA_CHECK((cudaError_t) tq_cuda_set_rows((int) dst->type, tq_cuda_tensor_of(src0), (int) src0->type,
                                                      tq_cuda_tensor_of(idx), idx->type == GGML_TYPE_I32, dst->data, dst->nb,
                                                      tq_cuda_quantize_flags(), ctx.stream()));
        } break;
        case GGML_OP_GET_ROWS: {
            const ggml_tensor * idx = dst->src[1];
            CUDA_CHECK((cudaError_t) tq_cuda_get_rows((int) src0->type, tq_cuda_tensor_of(src0), tq_cuda_tensor_of(idx), true,
                                                      dst->data, TQ_CUDA_TYPE_F32, dst->ne, dst->nb, false, ctx.stream()));
        } break;
        case GGML_OP_CPY:
            tq_cuda_copy(ctx, src0, dst->src[1]);
            break;
        case GGML_OP_DUP:
        case GGML_OP_CONT:
            tq_cuda_copy(ctx, src0, dst);
            break;
        case GGML_OP_FLASH_ATTN_EXT:
            ggml_cuda_set_device(ctx.device);
            if (tq_fa_decodes(dst)) {
                tq_fa_decode(ctx, dst);
            } else {
                tq_fa_prompt(ctx, dst);
            }
            break;
        default:
            GGML_ABORT("%s: %s with a TQ type has no CUDA kernel (supports_op says so)", __func__, ggml_op_desc(dst));
    }
}

// --- fusion ----------------------------------------------------------------------------------------

static bool tq_cuda_is_set_rows_tq(int device, const ggml_tensor * t) {
    return t->op == GGML_OP_SET_ROWS && tq_cuda_kv(t->type) && (t->flags & GGML_TENSOR_FLAG_COMPUTE) &&
           ggml_cuda_tq_supports_op(device, t);
}

static bool tq_cuda_is_noop(const ggml_tensor * t) {
    return ggml_is_empty(t) || t->op == GGML_OP_NONE || t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE ||
           t->op == GGML_OP_PERMUTE || t->op == GGML_OP_TRANSPOSE;
}

// whether the bytes a and b (views or not) cover in their buffers overlap
static bool tq_cuda_bytes_overlap(const ggml_tensor * a, const ggml_tensor * b) {
    const char * a0 = (const char *) a->data;
    const char * b0 = (const char *) b->data;
    return a0 < b0 + ggml_nbytes(b) && b0 < a0 + ggml_nbytes(a);
}

int ggml_cuda_tq_try_fuse(ggml_backend_cuda_context & ctx, ggml_cgraph * cgraph, int i) {
    const ggml_tensor * k = cgraph->nodes[i];
    if (!tq_cuda_is_set_rows_tq(ctx.device, k)) {
        return 0;
    }
    // with concurrent streams (GGML_CUDA_GRAPH_OPT) the two rows may be on different streams: no fusion
    if (!ctx.stream_context().concurrent_events.empty()) {
        return 0;
    }
    // the next SET_ROWS into a TQ cache, past views only (llama's K then V of a layer)
    int j = i + 1;
    while (j < cgraph->n_nodes && j <= i + 3 && tq_cuda_is_noop(cgraph->nodes[j])) {
        ++j;
    }
    if (j >= cgraph->n_nodes || j > i + 3) {
        return 0;
    }
    const ggml_tensor * v = cgraph->nodes[j];
    if (!tq_cuda_is_set_rows_tq(ctx.device, v) || v->src[0]->type != k->src[0]->type || v->src[1]->type != k->src[1]->type) {
        return 0;
    }
    // V's rows are written before the views between run (they touch no data) and must not read or
    // write what K's launch writes
    if (tq_cuda_bytes_overlap(k, v) || tq_cuda_bytes_overlap(k, v->src[0]) || tq_cuda_bytes_overlap(k, v->src[1])) {
        return 0;
    }
    tq_cuda_set_rows_op ops[2];
    const ggml_tensor * nodes[2] = { k, v };
    for (int n = 0; n < 2; ++n) {
        const ggml_tensor * t = nodes[n];
        ops[n].dst_type = (int) t->type;
        ops[n].src = tq_cuda_tensor_of(t->src[0]);
        ops[n].src_type = (int) t->src[0]->type;
        ops[n].idx = tq_cuda_tensor_of(t->src[1]);
        ops[n].idx_i32 = t->src[1]->type == GGML_TYPE_I32;
        ops[n].dst = t->data;
        for (int d = 0; d < 4; ++d) {
            ops[n].dst_nb[d] = t->nb[d];
        }
    }
    CUDA_CHECK((cudaError_t) tq_cuda_set_rows_pair(ops, tq_cuda_quantize_flags(), ctx.stream()));
    return j - i;
}
