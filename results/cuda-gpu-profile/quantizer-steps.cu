// dev-only: where the quantizer's time goes (clock64 between the steps of a copy of tq_quantize_block_warp)
#include "tq-cuda.cuh"
#include "tq-codebooks.h"
#include <cstdio>
#include <cstring>
#include <vector>
template <int BITS>
static __device__ __forceinline__ void qprof_block(const tq_cuda_tables & t, const float * c,
                                                              float x0, float x1, uint8_t * blk, unsigned flags, long long * ts) {
    long long t0 = clock64();
    constexpr int BB = BITS == 2 ? 18 : BITS == 3 ? 26 : 34;
    const int lane = threadIdx.x & 31;

    // step 1: s = sum_j (double) x_j^2 in order j = 0..63 (every lane computes the same sum)
    double s = 0.0;
#pragma unroll
    for (int j = 0; j < QK_TQ; ++j) {
        const float v = __shfl_sync(TQ_CUDA_FULL_MASK, j < 32 ? x0 : x1, j & 31);
        s = __dadd_rn(s, __dmul_rn(tq_f2d(v), tq_f2d(v)));
    }
    long long t1 = clock64();
    const bool finite = isfinite(s);
    const float n = finite ? tq_d2f(__dsqrt_rn(s)) : 0.0f;
    if (!finite || (__float_as_uint(n) & 0x7fffffffu) == 0) {   // n == 0, denormal n is not zero
        for (int i = lane; i < BB; i += 32) {
            blk[i] = 0;
        }
        __syncwarp();
        if (lane == 0 && !finite) {
            *(uint16_t *) blk = 0x7E00;
        }
        return;
    }

    // step 2: rotate, divide by the norm
    tq_rotate_warp(t, x0, x1);
    const float u0 = tq_fdiv(x0, n), u1 = tq_fdiv(x1, n);

    long long t2 = clock64();
    // step 3: lane m < n_scales scores scale m of the grid (sums in the reference's order)
    const bool search = !(flags & (TQ_CUDA_NO_NORM_CORRECTION | TQ_CUDA_NO_SCALE_SEARCH));
    const int n_scales = search ? TQ_SCALE_GRID_N : 1;
    const int m = lane < n_scales ? lane : 0;
    float sb[15];
    tq_scaled_boundaries<BITS>(t, m, sb);
    double dot = 0.0, cs = 0.0;
#pragma unroll
    for (int j = 0; j < QK_TQ; ++j) {
        const float uj = __shfl_sync(TQ_CUDA_FULL_MASK, j < 32 ? u0 : u1, j & 31);
        const float cv = c[tq_cell_count<BITS>(uj, sb)];
        dot = __dadd_rn(dot, __dmul_rn(tq_f2d(uj), tq_f2d(cv)));
        cs  = __dadd_rn(cs,  __dmul_rn(tq_f2d(cv), tq_f2d(cv)));
    }
    long long t3 = clock64();
    const double score = __ddiv_rn(dot, __dsqrt_rn(cs));
    int best_m = 0;
    double best = -INFINITY;
    for (int i = 0; i < n_scales; ++i) {
        const double si = __shfl_sync(TQ_CUDA_FULL_MASK, score, i);
        if (si > best) {
            best = si;
            best_m = i;
        }
    }
    long long t4 = clock64();
    const double cs_best = __shfl_sync(TQ_CUDA_FULL_MASK, cs, best_m);
    tq_scaled_boundaries<BITS>(t, best_m, sb);
    const int i0 = tq_cell_count<BITS>(u0, sb), i1 = tq_cell_count<BITS>(u1, sb);

    // step 4: the norm (corrected), fp16 round to nearest even
    const float d = (flags & TQ_CUDA_NO_NORM_CORRECTION) ? n
                  : tq_d2f(__ddiv_rn(tq_f2d(n), __dsqrt_rn(cs_best)));

    long long t5 = clock64();
    // bit planes
    if (BITS == 4) {
        blk[2 + lane] = (uint8_t) ((i0 & 15) | ((i1 & 15) << 4));
    } else {
        const uint64_t p0 = (uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i0 & 1) | ((uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i1 & 1) << 32);
        const uint64_t p1 = (uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i0 & 2) | ((uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i1 & 2) << 32);
        const uint64_t p2 = (uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i0 & 4) | ((uint64_t) __ballot_sync(TQ_CUDA_FULL_MASK, i1 & 4) << 32);
        if (lane < 16) {
            uint32_t q = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int j = lane + 16*k;
                q |= (uint32_t) (((p0 >> j) & 1) | (((p1 >> j) & 1) << 1)) << (2*k);
            }
            blk[2 + lane] = (uint8_t) q;
        } else if (BITS == 3 && lane < 24) {
            const int i = lane - 16;
            uint32_t q = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                q |= (uint32_t) ((p2 >> (i + 8*k)) & 1) << k;
            }
            blk[18 + i] = (uint8_t) q;
        }
    }
    if (lane == 0) {
        *(uint16_t *) blk = tq_f2h(d);
    }
    long long t6 = clock64();
    if (lane == 0) { ts[0] = t1 - t0; ts[1] = t2 - t1; ts[2] = t3 - t2; ts[3] = t4 - t3; ts[4] = t5 - t4; ts[5] = t6 - t5; }
}

template <int BITS>
__global__ void qprof_kernel(const float * x, uint8_t * out, const tq_cuda_tables tab, long long * ts) {
    __shared__ float s_c[16];
    if (threadIdx.x < 16) s_c[threadIdx.x] = tab.c[BITS - 2][threadIdx.x];
    __syncthreads();
    const int w = (blockIdx.x*blockDim.x + threadIdx.x) / 32, lane = threadIdx.x & 31;
    const float * xb = x + w*64;
    long long t = clock64();
    qprof_block<BITS>(tab, s_c, xb[lane], xb[lane + 32], out + w*34, 0, ts + w*8);
    if (lane == 0) ts[w*8 + 6] = clock64() - t;
}
int main() {
    tq_cuda_tables tab; memset(&tab, 0, sizeof(tab));
    const float * c[3] = { tq_centroids_2, tq_centroids_3, tq_centroids_4 };
    const float * b[3] = { tq_boundaries_2, tq_boundaries_3, tq_boundaries_4 };
    for (int i = 0; i < 3; ++i) { memcpy(tab.c[i], c[i], sizeof(float) << (i + 2)); memcpy(tab.b[i], b[i], sizeof(float)*((1 << (i + 2)) - 1)); }
    for (int r = 0; r < TQ_ROTATION_ROUNDS; ++r) { tab.signs[r][0] = (uint32_t) tq_rotation_signs[r]; tab.signs[r][1] = (uint32_t) (tq_rotation_signs[r] >> 32); }
    const float grid[TQ_SCALE_GRID_N] = TQ_SCALE_GRID; memcpy(tab.grid, grid, sizeof(grid));
    const int nb = 16;
    std::vector<float> hx(nb*64); for (size_t i = 0; i < hx.size(); ++i) hx[i] = sinf(i*0.37f)*3.0f;
    float * dx; uint8_t * dout; long long * dts;
    cudaMalloc(&dx, hx.size()*4); cudaMalloc(&dout, nb*34); cudaMalloc(&dts, nb*8*8);
    cudaMemcpy(dx, hx.data(), hx.size()*4, cudaMemcpyHostToDevice);
    for (int rep = 0; rep < 3; ++rep) {
        qprof_kernel<3><<<nb/4, 128>>>(dx, dout, tab, dts);
        cudaDeviceSynchronize();
    }
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    cudaEventRecord(e0); for (int i = 0; i < 100; ++i) qprof_kernel<3><<<nb/4, 128>>>(dx, dout, tab, dts); cudaEventRecord(e1); cudaEventSynchronize(e1);
    float ms; cudaEventElapsedTime(&ms, e0, e1);
    std::vector<long long> ts(nb*8); cudaMemcpy(ts.data(), dts, ts.size()*8, cudaMemcpyDeviceToHost);
    const char * names[7] = { "step1 sum x^2", "rotate+divide", "step3 sums (10 scales)", "score ddiv/dsqrt", "argmax+boundaries+cells", "norm+bit planes", "whole block" };
    printf("tq3 quantize, 16 blocks (one token, 8 heads x 128), cycles per warp (block 0 / mean):\n");
    for (int k = 0; k < 7; ++k) { double m = 0; for (int w = 0; w < nb; ++w) m += ts[w*8 + k]; printf("  %-26s %8lld %10.0f\n", names[k], ts[k], m/nb); }
    printf("kernel back to back: %.2f us per launch\n", ms*1e3/100);
    printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
