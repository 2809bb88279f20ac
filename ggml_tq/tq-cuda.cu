// TurboQuant KV-cache types on CUDA: host entry points (tq-cuda.h) over the kernels of tq-cuda.cuh.
// Build: nvcc -O3 -arch=sm_XX; ggml-cuda's -use_fast_math is fine (the bit-exact parts are inline
// PTX, tq-cuda.cuh; tests/native/tq_cuda_build.sh with TQ_CUDA_FLAGS=-use_fast_math checks it).
#include "tq-cuda.h"
#include "tq-cuda.cuh"
#include "tq-codebooks.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

static tq_cuda_tables tq_cuda_make_tables() {
    tq_cuda_tables t;
    memset(&t, 0, sizeof(t));
    const float * c[3] = { tq_centroids_2, tq_centroids_3, tq_centroids_4 };
    const float * b[3] = { tq_boundaries_2, tq_boundaries_3, tq_boundaries_4 };
    for (int i = 0; i < 3; ++i) {
        memcpy(t.c[i], c[i], sizeof(float) << (i + 2));
        memcpy(t.b[i], b[i], sizeof(float)*((1 << (i + 2)) - 1));
    }
    for (int r = 0; r < TQ_ROTATION_ROUNDS; ++r) {
        t.signs[r][0] = (uint32_t) tq_rotation_signs[r];
        t.signs[r][1] = (uint32_t) (tq_rotation_signs[r] >> 32);
    }
    const float grid[TQ_SCALE_GRID_N] = TQ_SCALE_GRID;
    memcpy(t.grid, grid, sizeof(grid));
    return t;
}

static const tq_cuda_tables & tq_cuda_tables_host() {
    static const tq_cuda_tables t = tq_cuda_make_tables();
    return t;
}

static int tq_bits(int type) {
    switch (type) {
        case TQ_CUDA_TYPE_TQ2: return 2;
        case TQ_CUDA_TYPE_TQ3: return 3;
        case TQ_CUDA_TYPE_TQ4: return 4;
        default: return 0;
    }
}

bool tq_cuda_is_type(int type) {
    return tq_bits(type) != 0;
}

static int tq_launch_status() {
    return (int) cudaGetLastError();
}

// the rows of src (through idx where it has data) and of dst, n[1..3] rows of dst in each dimension
static tq_rows_params tq_rows_params_of(const tq_cuda_tensor & src, const tq_cuda_tensor & idx, void * dst,
                                        const size_t dst_nb[4], const int64_t n[4]) {
    tq_rows_params p;
    memset(&p, 0, sizeof(p));
    p.src = (const char *) src.data;
    p.ne0 = src.ne[0]; p.ne1 = src.ne[1]; p.ne2 = src.ne[2]; p.ne3 = src.ne[3];
    p.nb1 = src.nb[1]; p.nb2 = src.nb[2]; p.nb3 = src.nb[3];
    p.idx = (const char *) idx.data;
    p.ne_i1 = std::max<int64_t>(1, idx.ne[1]); p.ne_i2 = std::max<int64_t>(1, idx.ne[2]);
    p.nb_i0 = idx.nb[0]; p.nb_i1 = idx.nb[1]; p.nb_i2 = idx.nb[2];
    p.dst = (char *) dst; p.dnb1 = dst_nb[1]; p.dnb2 = dst_nb[2]; p.dnb3 = dst_nb[3];
    p.n1 = n[1]; p.n2 = n[2]; p.n3 = n[3];
    return p;
}

// --- set_rows / cpy --------------------------------------------------------------------------------

bool tq_cuda_set_rows_supported(int dst_type, int src_type) {
    return tq_cuda_is_type(dst_type) && (src_type == TQ_CUDA_TYPE_F32 || src_type == TQ_CUDA_TYPE_F16);
}

template <int BITS>
static void tq_launch_set_rows(const tq_rows_params & p, int src_type, bool idx_i32, dim3 grid, cudaStream_t st) {
    const tq_cuda_tables & t = tq_cuda_tables_host();
    if (src_type == TQ_CUDA_TYPE_F32) {
        if (idx_i32) tq_set_rows_kernel<BITS, float, int32_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
        else         tq_set_rows_kernel<BITS, float, int64_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
    } else {
        if (idx_i32) tq_set_rows_kernel<BITS, uint16_t, int32_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
        else         tq_set_rows_kernel<BITS, uint16_t, int64_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
    }
}

// The grid of a rows kernel (one warp a block, tq_warp_block) over p's nb x n1 x n2 x n3 blocks: x over
// (block, i1), y = i2, z = i3 where they fit (32-bit indices, grid y/z limits), else flat; sets p.flat.
static dim3 tq_rows_grid(tq_rows_params & p) {
    const int64_t wpc = TQ_ROWS_THREADS / 32, nb = p.ne0 / QK_TQ;
    p.flat = nb*p.n1 > INT32_MAX - wpc || p.n2 > 65535 || p.n3 > 65535 || p.ne_i1 > UINT32_MAX || p.ne_i2 > UINT32_MAX;
    if (p.flat) {
        return dim3((unsigned) ((nb*p.n1*p.n2*p.n3 + wpc - 1) / wpc));
    }
    return dim3((unsigned) ((nb*p.n1 + wpc - 1) / wpc), (unsigned) p.n2, (unsigned) p.n3);
}

int tq_cuda_set_rows(int dst_type, tq_cuda_tensor src, int src_type, tq_cuda_tensor idx, bool idx_i32,
                     void * dst, const size_t dst_nb[4], unsigned flags, void * stream) {
    if (!tq_cuda_set_rows_supported(dst_type, src_type) || src.ne[0] % QK_TQ != 0) {
        return (int) cudaErrorInvalidValue;
    }
    tq_rows_params p = tq_rows_params_of(src, idx, dst, dst_nb, src.ne);
    p.flags = flags;
    const int64_t n_blocks = src.ne[0] / QK_TQ * src.ne[1] * src.ne[2] * src.ne[3];
    if (n_blocks == 0) {
        return 0;
    }
    const dim3 grid = tq_rows_grid(p);
    cudaStream_t st = (cudaStream_t) stream;
    switch (tq_bits(dst_type)) {
        case 2: tq_launch_set_rows<2>(p, src_type, idx_i32, grid, st); break;
        case 3: tq_launch_set_rows<3>(p, src_type, idx_i32, grid, st); break;
        default: tq_launch_set_rows<4>(p, src_type, idx_i32, grid, st); break;
    }
    return tq_launch_status();
}

template <int BITS0, int BITS1>
static void tq_launch_set_rows_pair(const tq_rows_params & p0, const tq_rows_params & p1, unsigned ctas0, int src_type,
                                    bool idx_i32, dim3 grid, cudaStream_t st) {
    const tq_cuda_tables & t = tq_cuda_tables_host();
    if (src_type == TQ_CUDA_TYPE_F32) {
        if (idx_i32) tq_set_rows_pair_kernel<BITS0, BITS1, float, int32_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p0, p1, ctas0, t);
        else         tq_set_rows_pair_kernel<BITS0, BITS1, float, int64_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p0, p1, ctas0, t);
    } else {
        if (idx_i32) tq_set_rows_pair_kernel<BITS0, BITS1, uint16_t, int32_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p0, p1, ctas0, t);
        else         tq_set_rows_pair_kernel<BITS0, BITS1, uint16_t, int64_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p0, p1, ctas0, t);
    }
}

template <int BITS0>
static void tq_launch_set_rows_pair_b1(int bits1, const tq_rows_params & p0, const tq_rows_params & p1, unsigned ctas0,
                                       int src_type, bool idx_i32, dim3 grid, cudaStream_t st) {
    switch (bits1) {
        case 2: tq_launch_set_rows_pair<BITS0, 2>(p0, p1, ctas0, src_type, idx_i32, grid, st); break;
        case 3: tq_launch_set_rows_pair<BITS0, 3>(p0, p1, ctas0, src_type, idx_i32, grid, st); break;
        default: tq_launch_set_rows_pair<BITS0, 4>(p0, p1, ctas0, src_type, idx_i32, grid, st); break;
    }
}

int tq_cuda_set_rows_pair(const tq_cuda_set_rows_op ops[2], unsigned flags, void * stream) {
    if (ops[0].src_type != ops[1].src_type || ops[0].idx_i32 != ops[1].idx_i32) {
        return (int) cudaErrorInvalidValue;
    }
    tq_rows_params p[2];
    int64_t n_blocks[2];
    for (int i = 0; i < 2; ++i) {
        const tq_cuda_set_rows_op & o = ops[i];
        if (!tq_cuda_set_rows_supported(o.dst_type, o.src_type) || o.src.ne[0] % QK_TQ != 0) {
            return (int) cudaErrorInvalidValue;
        }
        p[i] = tq_rows_params_of(o.src, o.idx, o.dst, o.dst_nb, o.src.ne);
        p[i].flags = flags;
        n_blocks[i] = o.src.ne[0] / QK_TQ * o.src.ne[1] * o.src.ne[2] * o.src.ne[3];
    }
    if (n_blocks[0] + n_blocks[1] == 0) {
        return 0;
    }
    // one grid: the CTAs of op 0, then op 1's along x; y and z shared, so both flat where they differ
    dim3 g0 = tq_rows_grid(p[0]), g1 = tq_rows_grid(p[1]);
    if (p[0].flat != p[1].flat || g0.y != g1.y || g0.z != g1.z) {
        p[0].flat = p[1].flat = true;
        const int64_t wpc = TQ_ROWS_THREADS / 32;
        g0 = dim3((unsigned) ((n_blocks[0] + wpc - 1) / wpc));
        g1 = dim3((unsigned) ((n_blocks[1] + wpc - 1) / wpc));
    }
    const unsigned ctas0 = g0.x;
    const dim3 grid(g0.x + g1.x, g0.y, g0.z);
    cudaStream_t st = (cudaStream_t) stream;
    const int b1 = tq_bits(ops[1].dst_type);
    switch (tq_bits(ops[0].dst_type)) {
        case 2: tq_launch_set_rows_pair_b1<2>(b1, p[0], p[1], ctas0, ops[0].src_type, ops[0].idx_i32, grid, st); break;
        case 3: tq_launch_set_rows_pair_b1<3>(b1, p[0], p[1], ctas0, ops[0].src_type, ops[0].idx_i32, grid, st); break;
        default: tq_launch_set_rows_pair_b1<4>(b1, p[0], p[1], ctas0, ops[0].src_type, ops[0].idx_i32, grid, st); break;
    }
    return tq_launch_status();
}

// --- get_rows / dequantize -------------------------------------------------------------------------

template <int BITS>
static void tq_launch_get_rows(const tq_rows_params & p, int dst_type, bool idx_i32, dim3 grid, cudaStream_t st) {
    const tq_cuda_tables & t = tq_cuda_tables_host();
    if (dst_type == TQ_CUDA_TYPE_F32) {
        if (idx_i32) tq_get_rows_kernel<BITS, float, int32_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
        else         tq_get_rows_kernel<BITS, float, int64_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
    } else {
        if (idx_i32) tq_get_rows_kernel<BITS, __half, int32_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
        else         tq_get_rows_kernel<BITS, __half, int64_t><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
    }
}

template <int BITS>
static void tq_launch_get_rows_rotated(const tq_rows_params & p, int dst_type, dim3 grid, cudaStream_t st, const tq_cuda_tables & t) {
    if (dst_type == TQ_CUDA_TYPE_F32) {
        tq_get_rows_rotated_kernel<BITS, float><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
    } else {
        tq_get_rows_rotated_kernel<BITS, __half><<<grid, TQ_ROWS_THREADS, 0, st>>>(p, t);
    }
}

int tq_cuda_get_rows(int src_type, tq_cuda_tensor src, tq_cuda_tensor idx, bool idx_i32,
                     void * dst, int dst_type, const int64_t dst_ne[4], const size_t dst_nb[4],
                     bool rotated, void * stream) {
    if (!tq_cuda_is_type(src_type) || (dst_type != TQ_CUDA_TYPE_F32 && dst_type != TQ_CUDA_TYPE_F16) ||
        src.ne[0] % QK_TQ != 0 || dst_ne[0] != src.ne[0]) {
        return (int) cudaErrorInvalidValue;
    }
    tq_rows_params p = tq_rows_params_of(src, idx, dst, dst_nb, dst_ne);
    p.rotated = rotated;
    const int64_t n_blocks = dst_ne[0] / QK_TQ * dst_ne[1] * dst_ne[2] * dst_ne[3];
    if (n_blocks == 0) {
        return 0;
    }
    dim3 grid = tq_rows_grid(p);
    cudaStream_t st = (cudaStream_t) stream;
    const size_t vb = dst_type == TQ_CUDA_TYPE_F32 ? 4 : 2;
    if (rotated && !idx.data && !p.flat && (uintptr_t) dst % 16 == 0 && (dst_nb[1] | dst_nb[2] | dst_nb[3]) % 16 == 0 &&
        (src.nb[1] | src.nb[2] | src.nb[3] | (uintptr_t) src.data) % 2 == 0 && dst_nb[0] == vb &&
        src.ne[0] / QK_TQ * dst_ne[1] * 8 < INT32_MAX) {
        // 8 threads a block (tq_get_rows_rotated_kernel)
        grid.x = (unsigned) ((src.ne[0] / QK_TQ * dst_ne[1] * 8 + TQ_ROWS_THREADS - 1) / TQ_ROWS_THREADS);
        const tq_cuda_tables & t = tq_cuda_tables_host();
        switch (tq_bits(src_type)) {
            case 2: tq_launch_get_rows_rotated<2>(p, dst_type, grid, st, t); break;
            case 3: tq_launch_get_rows_rotated<3>(p, dst_type, grid, st, t); break;
            default: tq_launch_get_rows_rotated<4>(p, dst_type, grid, st, t); break;
        }
        return tq_launch_status();
    }
    switch (tq_bits(src_type)) {
        case 2: tq_launch_get_rows<2>(p, dst_type, idx_i32, grid, st); break;
        case 3: tq_launch_get_rows<3>(p, dst_type, idx_i32, grid, st); break;
        default: tq_launch_get_rows<4>(p, dst_type, idx_i32, grid, st); break;
    }
    return tq_launch_status();
}

int tq_cuda_rotate_rows(tq_cuda_tensor src, float * dst, const size_t dst_nb[4], bool inverse, void * stream) {
    if (src.ne[0] % QK_TQ != 0 || src.nb[0] != sizeof(float)) {
        return (int) cudaErrorInvalidValue;
    }
    const tq_cuda_tensor no_idx = {};
    tq_rows_params p = tq_rows_params_of(src, no_idx, dst, dst_nb, src.ne);
    p.rotated = inverse;
    const int64_t n_blocks = src.ne[0] / QK_TQ * src.ne[1] * src.ne[2] * src.ne[3];
    if (n_blocks == 0) {
        return 0;
    }
    const dim3 grid = tq_rows_grid(p);
    tq_rotate_rows_kernel<<<grid, TQ_ROWS_THREADS, 0, (cudaStream_t) stream>>>(p, tq_cuda_tables_host());
    return tq_launch_status();
}

int tq_cuda_put_exact_rows(void * kv_f16, const int64_t ne[4], const size_t nb[4], const float * exact, size_t exact_nb1,
                           const int32_t * exact_cell, bool rotated, void * stream) {
    if (ne[0] % QK_TQ != 0 || ne[0] > QK_TQ*(TQ_ROWS_THREADS/32)) {
        return (int) cudaErrorInvalidValue;
    }
    if (ne[2] == 0 || ne[3] == 0) {
        return 0;
    }
    const dim3 grid((unsigned) ne[2], (unsigned) ne[3]);
    tq_put_exact_rows_kernel<<<grid, TQ_ROWS_THREADS, 0, (cudaStream_t) stream>>>((__half *) kv_f16, ne[0], ne[1], nb[1], nb[2], nb[3],
                                                                                   exact, exact_nb1, exact_cell, rotated, tq_cuda_tables_host());
    return tq_launch_status();
}

// --- flash attention -------------------------------------------------------------------------------

static bool tq_fa_kv_type(int t) {
    return t == TQ_CUDA_TYPE_F16 || t == TQ_CUDA_TYPE_Q8_0 || tq_cuda_is_type(t);
}

bool tq_cuda_fattn_supported(int k_type, int v_type, int64_t dk, int64_t dv) {
    if (!tq_fa_kv_type(k_type) || !tq_fa_kv_type(v_type)) {
        return false;
    }
    // the TQ pairs, TQ mixed with f16/q8_0, and f16/f16 (the baseline of the same design)
    const bool any_tq = tq_cuda_is_type(k_type) || tq_cuda_is_type(v_type);
    if (!any_tq && !(k_type == TQ_CUDA_TYPE_F16 && v_type == TQ_CUDA_TYPE_F16)) {
        return false;
    }
    return dk == dv && (dk == 64 || dk == 128 || dk == 256);
}

static int tq_fa_rows_per_cta(int rows) {
    return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
}

bool tq_cuda_fattn_mma_supported(int k_type, int v_type, int64_t d) {
    return tq_cuda_is_type(k_type) && tq_cuda_is_type(v_type) && (d == 64 || d == 128);
}

static bool tq_fa_uses_mma(const tq_cuda_fattn_args * a) {
    if (a->kernel == TQ_CUDA_FA_VECTOR) {
        return false;
    }
    return tq_cuda_fattn_mma_supported(a->k_type, a->v_type, a->k.ne[0]);
}

struct tq_fa_plan {
    bool mma;
    int nr, chunks, n_split, split_cells;
    size_t work;
};

static tq_fa_plan tq_fa_make_plan(const tq_cuda_fattn_args * a, int n_sm, int n_split) {
    tq_fa_plan pl;
    const int64_t n_q = a->q.ne[1], n_head = a->q.ne[2], n_seq = a->q.ne[3];
    const int64_t n_head_kv = a->k.ne[2], n_kv = a->k.ne[1];
    const int rows = (int) (n_head / n_head_kv * n_q);
    pl.mma = tq_fa_uses_mma(a);
    pl.nr = pl.mma ? TQ_MMA_ROWS : tq_fa_rows_per_cta(rows);
    pl.chunks = (rows + pl.nr - 1) / pl.nr;
    // a split's cells: whole tiles of the vector kernel, whole CTA steps (TQ_MMA_WARPS x 32 cells) of the mma kernel
    const int64_t tile = pl.mma ? TQ_MMA_WARPS*TQ_MMA_CELLS : TQ_FA_TILE;
    const int64_t ctas = n_head_kv*n_seq*pl.chunks;
    const int64_t tiles = (n_kv + tile - 1) / tile;
    if (n_split <= 0) {
        // vector kernel: about four CTAs of 256 threads per multiprocessor (two waves at the usual
        // three resident), each over at least two tiles; mma kernel: two CTAs of TQ_MMA_WARPS warps
        // per multiprocessor (one wave; more splits repeat each CTA's set-up and lengthen the combine),
        // each over two CTA steps at least (results/cuda-gpu-h100.md: 32 splits at 32K cells and GQA 4)
        const int64_t want = ((pl.mma ? 2 : 4)*(int64_t) std::max(n_sm, 1) + ctas - 1) / ctas;
        n_split = (int) std::max<int64_t>(1, std::min<int64_t>(want, tiles / 2));
    }
    n_split = std::min(n_split, 1024); // the combine kernel's weights fit its shared memory
    const int64_t tiles_per_split = std::max<int64_t>(1, (tiles + n_split - 1) / n_split);
    pl.split_cells = (int) (tiles_per_split*tile);
    pl.n_split = (int) std::max<int64_t>(1, (n_kv + pl.split_cells - 1) / pl.split_cells);
    pl.work = pl.n_split > 1 ? sizeof(float)*(size_t) (n_q*n_head*n_seq)*pl.n_split*(a->k.ne[0] + 2) : 0;
    return pl;
}

size_t tq_cuda_fattn_work_size(const tq_cuda_fattn_args * a, int n_sm) {
    return tq_fa_make_plan(a, n_sm, 0).work;
}

template <int D, int KT, int VT, int NR>
static void tq_fa_launch(const tq_fattn_params & p, dim3 grid, cudaStream_t st) {
    typedef tq_fattn_smem<D, KT, VT, NR> L;
    if (L::size > 48*1024) {
        cudaFuncSetAttribute(tq_fattn_vec_kernel<D, KT, VT, NR>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::size);
    }
    tq_fattn_vec_kernel<D, KT, VT, NR><<<grid, TQ_FA_THREADS, L::size, st>>>(p, tq_cuda_tables_host());
}

template <int D, int KT, int VT>
static void tq_fa_launch_nr(const tq_fattn_params & p, int nr, dim3 grid, cudaStream_t st) {
    switch (nr) {
        case 1: tq_fa_launch<D, KT, VT, 1>(p, grid, st); break;
        case 2: tq_fa_launch<D, KT, VT, 2>(p, grid, st); break;
        case 4: tq_fa_launch<D, KT, VT, 4>(p, grid, st); break;
        default: tq_fa_launch<D, KT, VT, 8>(p, grid, st); break;
    }
}

template <int D, int KT>
static void tq_fa_launch_v(const tq_fattn_params & p, int v_type, int nr, dim3 grid, cudaStream_t st) {
    const bool k_tq = tq_cuda_is_type(KT);
    switch (v_type) {
        case TQ_CUDA_TYPE_TQ2: tq_fa_launch_nr<D, KT, TQK_TQ2>(p, nr, grid, st); break;
        case TQ_CUDA_TYPE_TQ3: tq_fa_launch_nr<D, KT, TQK_TQ3>(p, nr, grid, st); break;
        case TQ_CUDA_TYPE_TQ4: tq_fa_launch_nr<D, KT, TQK_TQ4>(p, nr, grid, st); break;
        case TQ_CUDA_TYPE_F16: tq_fa_launch_nr<D, KT, TQK_F16>(p, nr, grid, st); break;
        default:
            if (k_tq) {
                tq_fa_launch_nr<D, KT, TQK_Q8_0>(p, nr, grid, st);
            }
            break;
    }
}

// the pairs tq_cuda_fattn_supported accepts; f16 or q8_0 keys only with TQ values (f16/f16 aside)
template <int D>
static void tq_fa_launch_k(const tq_fattn_params & p, int k_type, int v_type, int nr, dim3 grid, cudaStream_t st) {
    switch (k_type) {
        case TQ_CUDA_TYPE_TQ2: tq_fa_launch_v<D, TQK_TQ2>(p, v_type, nr, grid, st); break;
        case TQ_CUDA_TYPE_TQ3: tq_fa_launch_v<D, TQK_TQ3>(p, v_type, nr, grid, st); break;
        case TQ_CUDA_TYPE_TQ4: tq_fa_launch_v<D, TQK_TQ4>(p, v_type, nr, grid, st); break;
        case TQ_CUDA_TYPE_F16:
            switch (v_type) {
                case TQ_CUDA_TYPE_TQ2: tq_fa_launch_nr<D, TQK_F16, TQK_TQ2>(p, nr, grid, st); break;
                case TQ_CUDA_TYPE_TQ3: tq_fa_launch_nr<D, TQK_F16, TQK_TQ3>(p, nr, grid, st); break;
                case TQ_CUDA_TYPE_TQ4: tq_fa_launch_nr<D, TQK_F16, TQK_TQ4>(p, nr, grid, st); break;
                default:               tq_fa_launch_nr<D, TQK_F16, TQK_F16>(p, nr, grid, st); break;
            }
            break;
        default:
            switch (v_type) {
                case TQ_CUDA_TYPE_TQ2: tq_fa_launch_nr<D, TQK_Q8_0, TQK_TQ2>(p, nr, grid, st); break;
                case TQ_CUDA_TYPE_TQ3: tq_fa_launch_nr<D, TQK_Q8_0, TQK_TQ3>(p, nr, grid, st); break;
                default:               tq_fa_launch_nr<D, TQK_Q8_0, TQK_TQ4>(p, nr, grid, st); break;
            }
            break;
    }
}

static size_t tq_kv_row_bytes(int type, int64_t d) {
    switch (type) {
        case TQ_CUDA_TYPE_F16:  return 2*d;
        case TQ_CUDA_TYPE_Q8_0: return d/32*34;
        case TQ_CUDA_TYPE_TQ2:  return d/64*18;
        case TQ_CUDA_TYPE_TQ3:  return d/64*26;
        default:                return d/64*34;
    }
}

// the widest unit (8, 4, 2 bytes) in which both caches' rows can be copied to shared memory
static int tq_fa_copy_unit(const tq_cuda_fattn_args * a) {
    const int64_t d = a->k.ne[0];
    int unit = a->k_type == TQ_CUDA_TYPE_F16 && a->v_type == TQ_CUDA_TYPE_F16 ? 8 : 4;
    const uintptr_t bits = (uintptr_t) a->k.data | (uintptr_t) a->v.data |
        a->k.nb[1] | a->k.nb[2] | a->k.nb[3] | a->v.nb[1] | a->v.nb[2] | a->v.nb[3] |
        tq_kv_row_bytes(a->k_type, d) | tq_kv_row_bytes(a->v_type, d);
    while (unit > 2 && (bits % unit) != 0) {
        unit /= 2;
    }
    return unit;
}

template <int D, int KT, int VT>
static void tq_fa_mma_launch(const tq_fattn_params & p, dim3 grid, cudaStream_t st) {
    typedef tq_mma_smem<D, KT, VT> L;
    if (L::size > 48*1024) {
        cudaFuncSetAttribute(tq_fattn_mma_kernel<D, KT, VT>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::size);
    }
    tq_fattn_mma_kernel<D, KT, VT><<<grid, 32*TQ_MMA_WARPS, L::size, st>>>(p, tq_cuda_tables_host());
}

template <int D, int KT>
static void tq_fa_mma_launch_v(const tq_fattn_params & p, int v_type, dim3 grid, cudaStream_t st) {
    switch (v_type) {
        case TQ_CUDA_TYPE_TQ2: tq_fa_mma_launch<D, KT, TQK_TQ2>(p, grid, st); break;
        case TQ_CUDA_TYPE_TQ3: tq_fa_mma_launch<D, KT, TQK_TQ3>(p, grid, st); break;
        default:               tq_fa_mma_launch<D, KT, TQK_TQ4>(p, grid, st); break;
    }
}

template <int D>
static void tq_fa_mma_launch_k(const tq_fattn_params & p, int k_type, int v_type, dim3 grid, cudaStream_t st) {
    switch (k_type) {
        case TQ_CUDA_TYPE_TQ2: tq_fa_mma_launch_v<D, TQK_TQ2>(p, v_type, grid, st); break;
        case TQ_CUDA_TYPE_TQ3: tq_fa_mma_launch_v<D, TQK_TQ3>(p, v_type, grid, st); break;
        default:               tq_fa_mma_launch_v<D, TQK_TQ4>(p, v_type, grid, st); break;
    }
}

int tq_cuda_fattn(const tq_cuda_fattn_args * a, void * work, size_t work_size, int n_sm, int n_split, void * stream) {
    const int64_t D = a->k.ne[0];
    if (!tq_cuda_fattn_supported(a->k_type, a->v_type, a->k.ne[0], a->v.ne[0]) || a->q.ne[0] != D ||
        a->q.nb[0] != sizeof(float) || a->k.ne[2] <= 0 || a->q.ne[2] % a->k.ne[2] != 0 ||
        a->v.ne[2] != a->k.ne[2] || a->v.ne[1] != a->k.ne[1] || a->k.ne[3] != a->q.ne[3] || a->v.ne[3] != a->q.ne[3] ||
        (a->mask.data && (a->mask.ne[0] < a->k.ne[1] || a->mask.ne[1] < a->q.ne[1])) ||
        (a->exact_cell && !a->k_exact && !a->v_exact) ||
        (a->kernel == TQ_CUDA_FA_MMA && !tq_cuda_fattn_mma_supported(a->k_type, a->v_type, D))) {
        return (int) cudaErrorInvalidValue;
    }
    const tq_fa_plan pl = tq_fa_make_plan(a, n_sm, n_split);
    if (pl.n_split > 1 && (work == nullptr || work_size < pl.work)) {
        return (int) cudaErrorInvalidValue;
    }
    if (a->k.ne[1] == 0 || a->q.ne[1] == 0) {
        return 0;
    }

    tq_fattn_params p;
    memset(&p, 0, sizeof(p));
    p.q = (const char *) a->q.data; p.nbq1 = a->q.nb[1]; p.nbq2 = a->q.nb[2]; p.nbq3 = a->q.nb[3];
    p.k = (const char *) a->k.data; p.nbk1 = a->k.nb[1]; p.nbk2 = a->k.nb[2]; p.nbk3 = a->k.nb[3];
    p.v = (const char *) a->v.data; p.nbv1 = a->v.nb[1]; p.nbv2 = a->v.nb[2]; p.nbv3 = a->v.nb[3];
    p.mask = (const char *) a->mask.data;
    p.nbm1 = a->mask.nb[1]; p.nbm2 = a->mask.nb[2]; p.nbm3 = a->mask.nb[3];
    p.ne_m2 = (int) std::max<int64_t>(1, a->mask.ne[2]); p.ne_m3 = (int) std::max<int64_t>(1, a->mask.ne[3]);
    p.sinks = a->sinks;
    p.k_exact = a->k_exact; p.nbxk1 = a->k_exact_nb1;
    p.v_exact = a->v_exact; p.nbxv1 = a->v_exact_nb1;
    p.exact_cell = a->exact_cell;
    p.dst = a->dst;
    p.part = (float *) work;
    p.n_q = (int) a->q.ne[1]; p.n_head = (int) a->q.ne[2]; p.n_head_kv = (int) a->k.ne[2]; p.n_kv = (int) a->k.ne[1];
    p.gqa = p.n_head / p.n_head_kv;
    p.n_split = pl.n_split; p.split_cells = pl.split_cells;
    p.copy_unit = tq_fa_copy_unit(a);
    if (pl.mma && p.copy_unit >= 4 && (p.nbk1 | p.nbv1 | (uintptr_t) p.k | (uintptr_t) p.v) % 16 == 0) {
        p.copy_unit = 16;   // rows 16-byte granules apart: the mma kernel may copy a long row's granules
    }
    p.mask_async = p.mask && (((uintptr_t) p.mask | p.nbm1 | p.nbm2 | p.nbm3) % 16) == 0;
    // as ggml's CPU kernel: with soft-capping the scale is divided by the cap, s = cap*tanh(s*scale)
    p.softcap = a->softcap;
    p.scale = a->softcap != 0.0f ? a->scale / a->softcap : a->scale;
    p.max_bias = a->max_bias;
    p.n_head_log2 = 1u << (uint32_t) floorf(log2f((float) p.n_head));
    p.m0 = powf(2.0f, -(a->max_bias) / p.n_head_log2);
    p.m1 = powf(2.0f, -(a->max_bias / 2.0f) / p.n_head_log2);

    const dim3 grid((unsigned) (a->k.ne[2]*a->k.ne[3]), (unsigned) pl.chunks, (unsigned) pl.n_split);
    cudaStream_t st = (cudaStream_t) stream;
    if (pl.mma) {
        if (D == 64) {
            tq_fa_mma_launch_k<64>(p, a->k_type, a->v_type, grid, st);
        } else {
            tq_fa_mma_launch_k<128>(p, a->k_type, a->v_type, grid, st);
        }
    } else {
        switch (D) {
            case 64:  tq_fa_launch_k<64>(p, a->k_type, a->v_type, pl.nr, grid, st); break;
            case 128: tq_fa_launch_k<128>(p, a->k_type, a->v_type, pl.nr, grid, st); break;
            default:  tq_fa_launch_k<256>(p, a->k_type, a->v_type, pl.nr, grid, st); break;
        }
    }
    int err = tq_launch_status();
    if (err != 0 || pl.n_split == 1) {
        return err;
    }
    const dim3 cgrid((unsigned) (a->q.ne[1]*a->q.ne[2]*a->q.ne[3]));
    const bool v_tq = tq_cuda_is_type(a->v_type);
    const tq_cuda_tables & t = tq_cuda_tables_host();
    switch (D) {
        case 64:  if (v_tq) tq_fattn_combine_kernel<64, true><<<cgrid, TQ_FA_THREADS, 0, st>>>(p, t);
                  else      tq_fattn_combine_kernel<64, false><<<cgrid, TQ_FA_THREADS, 0, st>>>(p, t); break;
        case 128: if (v_tq) tq_fattn_combine_kernel<128, true><<<cgrid, TQ_FA_THREADS, 0, st>>>(p, t);
                  else      tq_fattn_combine_kernel<128, false><<<cgrid, TQ_FA_THREADS, 0, st>>>(p, t); break;
        default:  if (v_tq) tq_fattn_combine_kernel<256, true><<<cgrid, TQ_FA_THREADS, 0, st>>>(p, t);
                  else      tq_fattn_combine_kernel<256, false><<<cgrid, TQ_FA_THREADS, 0, st>>>(p, t); break;
    }
    return tq_launch_status();
}
