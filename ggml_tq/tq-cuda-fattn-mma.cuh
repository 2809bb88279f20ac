// Decoding attention over a TQ/TQ cache on tensor cores (included by tq-cuda.cuh).
//
// Why: decoding reads 3-5x fewer bytes from a TQ cache than from f16, so its attention can only be
// faster than f16's if the products cost less than the bytes take to arrive. On CUDA cores (the
// vector kernel in tq-cuda.cuh) every value costs a centroid lookup and one FMA per query row, and
// the kernel is bound by instructions at a few percent of the memory bandwidth. Here the products
// run on tensor cores (mma.sync m16n8k16, f16 inputs, f32 sums) and a value costs only its decode:
// the f16 centroids of its index, picked from registers by byte permutes (prmt), no memory lookup.
//
// Layout (flash-attention 2 style, one warp = one stream of 32-cell steps with its own softmax):
//   scores  S[row][cell] = Q[row] . K[cell]:  A = Q (16 rows: rows 0-7 the f16 high parts of up to
//           8 query rows, rows 8-15 their low parts, so q ~ hi + lo to 2^-22), B = K^T (the f16
//           centroids of a cell's indices), one n-tile = 8 cells. The block norm d_k multiplies
//           the block's sum afterwards (f32).
//   output  O^T[dim][row] += V^T[dim][cell] P^T[cell][row]: A = V^T (f16 centroids, one m-tile =
//           16 dims), B = P*d_v rounded to f16 (taken from the score fragments of the same lanes:
//           no shuffle), n = the 8 query rows. The output as the product's M side keeps 16 dims x 8
//           rows in 4 registers a lane, half of what rows as M with their hi/lo halves took, so more
//           warps fit a multiprocessor.
// The dims inside a 64-block are taken in the order that the bit planes give them to a lane
// (tq_mma_k_dim / tq_mma_v_dim); the queries are laid out in the same order, the output put back.
//
// Arithmetic against the float32 kernels: the centroids are rounded to f16 (unit roundoff 2^-11, far
// below the 3-bit code's own error), queries to hi + lo f16 parts (2^-22), P*d_v to f16 (2^-11, as
// the centroids: hi + lo parts there took twice the value products and a quarter of a step's
// instructions); sums in f32.
// NaN rows and masks behave as in the vector kernel: a masked cell adds exactly 0 (never 0 * NaN).
#pragma once

// Eight warps a CTA and two CTAs a multiprocessor (<= 128 registers a thread): four warps a scheduler
// hide the cell loop's fixed-latency chains that two could not (results/cuda-gpu-h100.md, 2026-12-07)
#define TQ_MMA_WARPS 8
#define TQ_MMA_MIN_CTAS 2
#define TQ_MMA_CELLS 32    // cells per warp step
#define TQ_MMA_ROWS  8     // query rows per CTA

static __device__ __forceinline__ uint32_t tq_prmt(uint32_t a, uint32_t b, uint32_t s) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
}

static __device__ __forceinline__ void tq_mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    // not volatile: the compiler may interleave independent products with the decoding around them
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// f16 hi + lo parts of x, x ~ hi + lo
static __device__ __forceinline__ void tq_split_f16(float x, __half & hi, __half & lo) {
    hi = __float2half_rn(x);
    lo = __float2half_rn(x - __half2float(hi));
}

// f16 of a (low half) and b (high half), each rounded to nearest: one cvt.rn.f16x2.f32
static __device__ __forceinline__ uint32_t tq_f2h2(float a, float b) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
    return r;
}

static __device__ __forceinline__ uint32_t tq_h2u(__half a, __half b) {
    return (uint32_t) __half_as_ushort(a) | ((uint32_t) __half_as_ushort(b) << 16);
}

// The low and high bytes of the type's f16 centroids, four to a register: prmt picks four of
// eight bytes by the four index nibbles of a selector.
template <int BITS>
struct tq_h16_lut {
    uint32_t l[BITS == 4 ? 4 : 2], h[BITS == 4 ? 4 : 2];
    uint32_t f[2];   // BITS 2: the four f16 centroids whole, two to a register (prmt picks a pair in one)
};

template <int BITS>
static __device__ __forceinline__ tq_h16_lut<BITS> tq_make_h16_lut(const tq_cuda_tables & t) {
    tq_h16_lut<BITS> u;
    constexpr int N = 1 << BITS, W = BITS == 4 ? 4 : 2;
#pragma unroll
    for (int w = 0; w < W; ++w) {
        u.l[w] = 0;
        u.h[w] = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int i = 4*w + k;
            const uint16_t c = i < N ? __half_as_ushort(__float2half_rn(t.c[BITS - 2][i])) : 0;
            u.l[w] |= (uint32_t) (c & 0xff) << (8*k);
            u.h[w] |= (uint32_t) (c >> 8) << (8*k);
        }
    }
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        u.f[w] = BITS == 2 ? (uint32_t) __half_as_ushort(__float2half_rn(t.c[0][2*w]))
                           | (uint32_t) __half_as_ushort(__float2half_rn(t.c[0][2*w + 1])) << 16 : 0u;
    }
    return u;
}

// lo/hi bytes of the centroids of the four indices in the low 16 bits of sel (nibble k: index k)
template <int BITS>
static __device__ __forceinline__ void tq_lut_bytes(const tq_h16_lut<BITS> & u, uint32_t sel, uint32_t & lo, uint32_t & hi) {
    if constexpr (BITS < 4) {
        lo = tq_prmt(u.l[0], u.l[1], sel);
        hi = tq_prmt(u.h[0], u.h[1], sel);
    } else {
        // a nibble with bit 3 set would mean sign replication to prmt: look up 0-7 and 8-15, then pick
        const uint32_t s7 = sel & 0x7777u;
        const uint32_t m = tq_prmt(0u, 0xffffffffu, (sel & 0x8888u) >> 1);
        lo = (tq_prmt(u.l[2], u.l[3], s7) & m) | (tq_prmt(u.l[0], u.l[1], s7) & ~m);
        hi = (tq_prmt(u.h[2], u.h[3], s7) & m) | (tq_prmt(u.h[0], u.h[1], s7) & ~m);
    }
}

// four centroids as two half2: K pairs indices (0, 1) and (2, 3), V pairs (0, 2) and (1, 3)
template <int BITS, bool KPAIR>
static __device__ __forceinline__ void tq_lut4(const tq_h16_lut<BITS> & u, uint32_t sel, uint32_t & r0, uint32_t & r1) {
    uint32_t lo, hi;
    tq_lut_bytes<BITS>(u, sel, lo, hi);
    r0 = tq_prmt(lo, hi, KPAIR ? 0x5140u : 0x6240u);
    r1 = tq_prmt(lo, hi, KPAIR ? 0x7362u : 0x7351u);
}

static __device__ __forceinline__ uint32_t tq_mad_lo(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t r;
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// 2-bit V (tq_decode_planes<2, false>'s registers, the same values): field i of each byte of w, as a
// byte x, becomes the selector nibbles (2x, 2x + 1) that pick centroid x's two bytes from f, one prmt
// a half2 where the byte planes take two. Why: prmt, shifts and masks share one half-rate integer
// pipe; the multiply-add (x*0x22 + 0x10101010) and the selector's upper half (a high half) run on
// the FMA pipe.
static __device__ __forceinline__ void tq_decode_v2_pairs(const uint32_t f[2], uint32_t w, uint32_t r[8]) {
    constexpr int lo_reg[4] = { 0, 4, 1, 5 }, hi_reg[4] = { 2, 6, 3, 7 };
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t x = (w >> 2*i) & 0x03030303u;
        const uint32_t sel = tq_mad_lo(x, 0x22u, 0x10101010u);
        r[lo_reg[i]] = tq_prmt(f[0], f[1], sel);                        // bytes 0, 1 of x
        r[hi_reg[i]] = tq_prmt(f[0], f[1], __umulhi(sel, 0x10000u));   // bytes 2, 3 of x
    }
}

// eight index nibbles of a word of 2-bit fields (+ high bits of 3-bit indices) -> 8 half2
template <int BITS, bool KPAIR>
static __device__ __forceinline__ void tq_decode_planes(const tq_h16_lut<BITS> & u, uint32_t w, uint32_t hw, uint32_t r[8]) {
    uint32_t even = w & 0x33333333u, odd = (w >> 2) & 0x33333333u;
    if (BITS == 3) {
        even |= (hw << 2) & 0x44444444u;
        odd  |= hw & 0x44444444u;
    }
    tq_lut4<BITS, KPAIR>(u, even, r[0], r[1]);
    tq_lut4<BITS, KPAIR>(u, even >> 16, r[2], r[3]);
    tq_lut4<BITS, KPAIR>(u, odd, r[4], r[5]);
    tq_lut4<BITS, KPAIR>(u, odd >> 16, r[6], r[7]);
}

// 4 bytes at a 2-byte aligned shared-memory address (ALIGNED: 4-byte aligned)
template <bool ALIGNED>
static __device__ __forceinline__ uint32_t tq_lds32(const uint8_t * p) {
    if (ALIGNED) {
        return *(const uint32_t *) p;
    }
    return (uint32_t) *(const uint16_t *) p | ((uint32_t) *(const uint16_t *) (p + 2) << 16);
}

// Which dim of a 64-block register r (0-7), half e of a K lane with c = lane % 4 holds; which dim
// n-tile r of a block covers at slot n (V).
template <int BITS>
static __host__ __device__ constexpr int tq_mma_k_dim(int r, int c, int e) {
    return BITS == 4 ? 8*c + r + 32*e : 4*c + (r & 3) + 16*(r >> 2) + 32*e;
}
static __host__ __device__ constexpr int tq_mma_v_dim(int r, int n) {
    return n + 8*(r >> 1) + 32*(r & 1);
}

// B fragments of the score product for block `blk` (its bytes in shared memory) of one cell:
// k-step s of the block takes r[2s] (k = 2c, 2c+1) and r[2s + 1] (k = 2c+8, 2c+9)
template <int BITS, bool ALIGNED>
static __device__ __forceinline__ void tq_mma_k_frag(const tq_h16_lut<BITS> & u, const uint8_t * blk, int c, uint32_t r[8]) {
    if constexpr (BITS == 4) {
        const uint32_t w0 = tq_lds32<ALIGNED>(blk + 2 + 8*c), w1 = tq_lds32<ALIGNED>(blk + 6 + 8*c);
        tq_lut4<4, true>(u, w0, r[0], r[1]);
        tq_lut4<4, true>(u, w0 >> 16, r[2], r[3]);
        tq_lut4<4, true>(u, w1, r[4], r[5]);
        tq_lut4<4, true>(u, w1 >> 16, r[6], r[7]);
    } else {
        const uint32_t w = tq_lds32<ALIGNED>(blk + 2 + 4*c);
        const uint32_t hw = BITS == 3 ? tq_lds32<ALIGNED>(blk + 18 + 4*(c & 1)) >> (c >> 1) : 0u;
        tq_decode_planes<BITS, true>(u, w, hw, r);
    }
}

// B fragments of the value product for block offset `bo` of the cells x0, x1 (k = 2c, 2c+1: r0)
// and x2, x3 (k = 2c+8, 2c+9: r1); n-tile t of the block takes r0[t], r1[t]
template <int BITS>
static __device__ __forceinline__ void tq_mma_v_words(const uint8_t * a, const uint8_t * b, int g, uint32_t & w, uint32_t & w2, uint32_t & hw) {
    if (BITS == 4) {
        w  = (uint32_t) a[2 + g]      | (uint32_t) b[2 + g] << 8      | (uint32_t) a[2 + g + 8] << 16  | (uint32_t) b[2 + g + 8] << 24;
        w2 = (uint32_t) a[2 + g + 16] | (uint32_t) b[2 + g + 16] << 8 | (uint32_t) a[2 + g + 24] << 16 | (uint32_t) b[2 + g + 24] << 24;
        hw = 0;
    } else {
        w  = (uint32_t) a[2 + g] | (uint32_t) b[2 + g] << 8 | (uint32_t) a[2 + g + 8] << 16 | (uint32_t) b[2 + g + 8] << 24;
        w2 = 0;
        if (BITS == 3) {
            const uint32_t x = (uint32_t) a[18 + g] | (uint32_t) b[18 + g] << 8;
            hw = x | (x << 15);
        } else {
            hw = 0;
        }
    }
}

template <int BITS>
static __device__ __forceinline__ void tq_mma_v_frag(const tq_h16_lut<BITS> & u, const uint8_t * a, const uint8_t * b, int g, uint32_t r[8]) {
    uint32_t w, w2, hw;
    tq_mma_v_words<BITS>(a, b, g, w, w2, hw);
    if constexpr (BITS == 4) {
        tq_lut4<4, false>(u, w, r[0], r[1]);
        tq_lut4<4, false>(u, w >> 16, r[2], r[3]);
        tq_lut4<4, false>(u, w2, r[4], r[5]);
        tq_lut4<4, false>(u, w2 >> 16, r[6], r[7]);
    } else if constexpr (BITS == 2) {
        tq_decode_v2_pairs(u.f, w, r);
    } else {
        tq_decode_planes<BITS, false>(u, w, hw, r);
    }
}

// Rows of at least 64 bytes (tq4 at D = 128) are copied as the 16-byte granules that hold them where the
// cache's row strides allow (tq_warp_copy_windows: a 68-byte row in 5 copies instead of 17); shorter rows
// in 4-byte units, whose copies cost less than the granules' extra bytes (harness, H100: tq4/tq4 0.94x-0.96x
// the time at 32K-64K cells, tq3/tq3 1.00x, tq3/tq2 1.01x-1.02x, tq2/tq2 1.03x-1.05x with granules for all;
// results/cuda-gpu-h100.md, session 21).
template <int RB>
static __host__ __device__ constexpr bool tq_row_windows() {
    return RB >= 64;
}

// A tile's row stride: for a row copied in granules, the granules that a row starting 4-byte aligned (at
// most 12 bytes into its first) touches; else its 4-byte words. An odd number either way, so that the eight
// rows a lane group reads at one offset fall in distinct banks.
template <int RB>
static __host__ __device__ constexpr int tq_tile_stride() {
    return tq_row_windows<RB>() ? (((12 + RB + 15) / 16) | 1)*16 : 4*(((RB + 3) / 4) | 1);
}

template <int D, int KT, int VT>
struct tq_mma_smem {
    static constexpr int SK = tq_tile_stride<tq_row_bytes<KT, D>()>();
    static constexpr int SV = tq_tile_stride<tq_row_bytes<VT, D>()>();
    static constexpr int warp_tiles = 2*TQ_MMA_CELLS*(SK + SV);            // double buffer
    static constexpr int off_qf    = 0;                                      // uint4 [D/16][32] Q fragments
    static constexpr int off_q     = a16(off_qf + 16*(D/16)*32);            // float [8][D] queries, then combine
    static constexpr int off_x     = a16(off_q + 4*TQ_MMA_ROWS*D);          // float [2][D] exact rows (rotated)
    static constexpr int off_row   = a16(off_x + 4*2*D);                    // float xs, slope, qscale [8]
    static constexpr int SM        = 80;                                     // mask row stride: rows g hit distinct banks
    static constexpr int off_mask  = a16(off_row + 4*3*TQ_MMA_ROWS);        // half [warp][2][8][SM/2] each step's mask rows
    static constexpr int off_tiles = a16(off_mask + TQ_MMA_WARPS*2*TQ_MMA_ROWS*SM);
    static constexpr int combine   = 4*TQ_MMA_WARPS*TQ_MMA_ROWS*(D + 4);    // O, M, S, pe, weight per warp
    static constexpr int size      = a16(off_tiles + (TQ_MMA_WARPS*warp_tiles > combine ? TQ_MMA_WARPS*warp_tiles : combine));
};

// n rows (<= TQ_MMA_CELLS) of ROW_BYTES from g (stride gstride) to smem (stride sstride) by one warp, in
// UNIT-byte copies (2: plain loads, else cp.async). A row of at most 32 units goes whole in a pass of
// 32 / units rows: each lane keeps its row and unit and steps both addresses by a constant, where a
// lane walking the units of the tile would divide its unit index by the row's units every copy (a
// fifth of a decode step's instructions at D = 128).
template <int UNIT, int ROW_BYTES>
static __device__ __forceinline__ void tq_warp_copy_rows(uint8_t * smem, int sstride, const char * g, size_t gstride, int n) {
    constexpr int units = ROW_BYTES / UNIT;
    const int lane = threadIdx.x & 31;
    auto copy = [&](uint8_t * d, const char * s) {
        if constexpr (UNIT == 2) {
            *(uint16_t *) d = *(const uint16_t *) s;
        } else {
            __pipeline_memcpy_async(d, s, UNIT);
        }
    };
    if constexpr (units <= 32) {
        constexpr int rpp = 32 / units;
        const int r = lane / units, c = lane - r*units;
        if (r < rpp) {
            uint8_t * d = smem + r*sstride + c*UNIT;
            const char * s = g + r*gstride + c*UNIT;
            for (int rr = r; rr < n; rr += rpp) {
                copy(d, s);
                d += rpp*sstride;
                s += rpp*gstride;
            }
        }
    } else {
        for (int w = lane; w < units*n; w += 32) {
            const int r = w / units, c = w - r*units;
            copy(smem + r*sstride + c*UNIT, g + r*gstride + c*UNIT);
        }
    }
}

// n rows (<= TQ_MMA_CELLS) by one warp in 16-byte copies of the granules that hold each row's first `need`
// bytes, from g (16-byte aligned, stride gstride, a multiple of 16) to smem (stride W). Only granules that
// hold the row's bytes are read, so nothing past the cache's last granule.
template <int W>
static __device__ __forceinline__ void tq_warp_copy_windows(uint8_t * smem, const char * g, size_t gstride, int n, int need) {
    constexpr int units = W / 16, rpp = 32 / units;
    const int lane = threadIdx.x & 31;
    const int r = lane / units, c = lane - r*units;
    if (r < rpp && 16*c < need) {
        uint8_t * d = smem + r*W + 16*c;
        const char * s = g + r*gstride + 16*c;
        for (int rr = r; rr < n; rr += rpp) {
            __pipeline_memcpy_async(d, s, 16);
            d += rpp*W;
            s += rpp*gstride;
        }
    }
}

// One CTA: query rows [blockIdx.y*8, +8) of the rows that read K/V head (ik2, ik3), over the
// cells of split blockIdx.z; warp w takes the steps of 32 cells w, w + TQ_MMA_WARPS, ... and keeps its own
// softmax; the warps are combined at the end. Phases as in tq_fattn_vec_kernel.
template <int D, int KT, int VT>
__global__ void __launch_bounds__(32*TQ_MMA_WARPS, TQ_MMA_MIN_CTAS)
tq_fattn_mma_kernel(const tq_fattn_params p, const __grid_constant__ tq_cuda_tables tab) {
    typedef tq_mma_smem<D, KT, VT> L;
    constexpr int KBITS = tq_kv_type<KT>::bits, VBITS = tq_kv_type<VT>::bits;
    constexpr int KBB = tq_kv_type<KT>::bytes, VBB = tq_kv_type<VT>::bytes;
    constexpr int KB = tq_row_bytes<KT, D>(), VB = tq_row_bytes<VT, D>();
    constexpr int NB = D / QK_TQ, CW = TQ_MMA_CELLS, NT = 32*TQ_MMA_WARPS;
    constexpr int NK = CW / 8;        // score n-tiles per step
    constexpr int NV = D / 8;         // output n-tiles

    extern __shared__ __align__(16) uint8_t smem[];
    uint4 * s_qf = (uint4 *) (smem + L::off_qf);
    float * s_q  = (float *) (smem + L::off_q);
    float * s_xk = (float *) (smem + L::off_x), * s_xv = s_xk + D;
    float * s_xs = (float *) (smem + L::off_row), * s_slope = s_xs + TQ_MMA_ROWS, * s_qs = s_slope + TQ_MMA_ROWS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid / 32;
    const int g = lane >> 2, c = lane & 3;
    const int ik2 = blockIdx.x % p.n_head_kv, ik3 = blockIdx.x / p.n_head_kv;
    const int rows = p.gqa*p.n_q, r0 = blockIdx.y*TQ_MMA_ROWS;
    const int c0 = blockIdx.z*p.split_cells, c1 = min(p.n_kv, c0 + p.split_cells);
    const char * kbase = p.k + ik2*p.nbk2 + ik3*p.nbk3;
    const char * vbase = p.v + ik2*p.nbv2 + ik3*p.nbv3;

    const int rr_g = r0 + g;
    const bool row_ok = rr_g < rows;
    const __half * mrow = nullptr;
    if (p.mask) {   // a dead row reads row r0's mask (its scores are -inf anyway)
        const int rm = row_ok ? rr_g : r0;
        const int iq1 = rm / p.gqa, iq2 = ik2*p.gqa + rm % p.gqa;
        mrow = (const __half *) (p.mask + iq1*p.nbm1 + (iq2 % p.ne_m2)*p.nbm2 + (ik3 % p.ne_m3)*p.nbm3);
    }
    // the mask rows of a whole step come with its K/V tiles (16-byte copies) where the mask is so aligned
    const bool mask_async = mrow && p.mask_async;
    uint8_t * s_mt = smem + L::off_mask + warp*2*TQ_MMA_ROWS*L::SM;
    uint8_t * s_kt = smem + L::off_tiles + warp*L::warp_tiles;
    uint8_t * s_vt = s_kt + 2*CW*L::SK;
    // granules for the long rows where the strides allow (p.copy_unit 16); a row then starts at its offset in
    // its granule, the same for all of a head's rows (0, 4, 8 or 12 bytes)
    const bool kwin = tq_row_windows<KB>() && p.copy_unit == 16, vwin = tq_row_windows<VB>() && p.copy_unit == 16;
    const int koff = kwin ? (int) ((uintptr_t) kbase & 15) : 0;
    const int voff = vwin ? (int) ((uintptr_t) vbase & 15) : 0;
    auto load_step = [&](int cs, int buf) {
        const int n = max(0, min(CW, c1 - cs));
        uint8_t * kd = s_kt + buf*CW*L::SK, * vd = s_vt + buf*CW*L::SV;
        const char * kg = kbase + (size_t) cs*p.nbk1, * vg = vbase + (size_t) cs*p.nbv1;
        if (kwin) {
            tq_warp_copy_windows<L::SK>(kd, kg - koff, p.nbk1, n, koff + KB);
        } else if (p.copy_unit >= 4) {
            tq_warp_copy_rows<4, KB>(kd, L::SK, kg, p.nbk1, n);
        } else {
            tq_warp_copy_rows<2, KB>(kd, L::SK, kg, p.nbk1, n);
        }
        if (vwin) {
            tq_warp_copy_windows<L::SV>(vd, vg - voff, p.nbv1, n, voff + VB);
        } else if (p.copy_unit >= 4) {
            tq_warp_copy_rows<4, VB>(vd, L::SV, vg, p.nbv1, n);
        } else {
            tq_warp_copy_rows<2, VB>(vd, L::SV, vg, p.nbv1, n);
        }
        if (mask_async && n == CW) {
            // lane (g, c): 16 bytes of row g's mask, cells cs + 8c .. + 7
            __pipeline_memcpy_async(s_mt + buf*TQ_MMA_ROWS*L::SM + g*L::SM + 16*c, (const char *) (mrow + cs + 8*c), 16);
        }
        __pipeline_commit();
    };

    const int step0 = c0 + warp*CW, stride = TQ_MMA_WARPS*CW;
    if (step0 < c1) load_step(step0, 0);   // its latency hides behind the set-up

    // --- set-up: queries rotated, scaled by a power of two per row, as f16 hi/lo fragments ---------
    // two rounds of loads: the exact cell beside the queries, then its exact rows beside its coded rows'
    // NaN test
    static_assert(D <= NT, "one exact value a thread");
    // the queries' loads all issued before any store: a store to shared memory between them would keep the
    // compiler from moving the next load above it (it cannot tell the two apart), one round trip each
    static_assert(TQ_MMA_ROWS*D % NT == 0, "whole query values a thread");
    constexpr int QPT = TQ_MMA_ROWS*D / NT;
    const int ce = p.exact_cell ? p.exact_cell[ik3] : -1;
    float qv[QPT];
#pragma unroll
    for (int i = 0; i < QPT; ++i) {
        const int e = tid + i*NT, r = e / D, j = e % D, rr = r0 + r;
        qv[i] = 0.0f;
        if (rr < rows) {
            const int iq1 = rr / p.gqa, iq2 = ik2*p.gqa + rr % p.gqa;
            qv[i] = __ldg((const float *) (p.q + iq1*p.nbq1 + iq2*p.nbq2 + ik3*p.nbq3) + j);
        }
    }
#pragma unroll
    for (int i = 0; i < QPT; ++i) s_q[tid + i*NT] = qv[i];
    int xk_cell = -1, xv_cell = -1;
    float xk = 0.0f, xv = 0.0f;
    if (ce >= c0 && ce < c1) {
        if (tid < D) {
            if (p.k_exact) xk = p.k_exact[ik3*(p.nbxk1/4) + ik2*D + tid];
            if (p.v_exact) xv = p.v_exact[ik3*(p.nbxv1/4) + ik2*D + tid];
        }
        if (p.k_exact && !tq_row_is_nan_dev<KT, D>((const uint8_t *) (kbase + (size_t) ce*p.nbk1))) xk_cell = ce;
        if (p.v_exact && !tq_row_is_nan_dev<VT, D>((const uint8_t *) (vbase + (size_t) ce*p.nbv1))) xv_cell = ce;
    }
    if (tid < D) {
        s_xk[tid] = xk_cell >= 0 ? xk : 0.0f;
        s_xv[tid] = xv_cell >= 0 ? xv : 0.0f;
    }
    if (tid < TQ_MMA_ROWS) {
        const int rr = r0 + tid;
        const int h = rr < rows ? ik2*p.gqa + rr % p.gqa : 0;
        s_slope[tid] = p.max_bias > 0.0f ? (h < (int) p.n_head_log2 ? powf(p.m0, h + 1) : powf(p.m1, 2*(h - (int) p.n_head_log2) + 1)) : 1.0f;
    }
    __syncthreads();
    // only the live rows (the others stay zero); the exact rows (zero where absent) beside them
    const int live = max(0, min(TQ_MMA_ROWS, rows - r0));
    tq_rotate_smem(tab, s_q, live*D, false);
    if (xk_cell >= 0 || xv_cell >= 0) tq_rotate_smem(tab, s_xk, 2*D, false, (live*D/QK_TQ + 1)/2);
    __syncthreads();
    // per row: the exact key's score (f32) and 2^-e with max|q| 2^-e in [2^13, 2^14) (f16 range)
    for (int r = warp; r < TQ_MMA_ROWS; r += TQ_MMA_WARPS) {
        float mx = 0.0f, xs = 0.0f;
        for (int j = lane; j < D; j += 32) {
            mx = fmaxf(mx, fabsf(s_q[r*D + j]));
            xs = fmaf(s_q[r*D + j], s_xk[j], xs);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            mx = fmaxf(mx, __shfl_xor_sync(TQ_CUDA_FULL_MASK, mx, o));
            xs += __shfl_xor_sync(TQ_CUDA_FULL_MASK, xs, o);
        }
        if (lane == 0) {
            int ex = 0;
            if (mx > 0.0f && isfinite(mx)) frexpf(mx, &ex);   // mx in [2^(ex-1), 2^ex)
            s_xs[r] = xs;
            s_qs[r] = ldexpf(1.0f, ex - 14);                 // q = (q 2^(14-ex)) 2^(ex-14)
        }
    }
    __syncthreads();
    for (int e = tid; e < (D/16)*32; e += NT) {
        const int s = e / 32, l = e % 32, gg = l >> 2, cc = l & 3, b = s / 4, si = s % 4;
        const float f = 1.0f / s_qs[gg];
        const float * q = s_q + gg*D + b*QK_TQ;
        float x[4];
        x[0] = q[tq_mma_k_dim<KBITS>(2*si, cc, 0)]*f;
        x[1] = q[tq_mma_k_dim<KBITS>(2*si, cc, 1)]*f;
        x[2] = q[tq_mma_k_dim<KBITS>(2*si + 1, cc, 0)]*f;
        x[3] = q[tq_mma_k_dim<KBITS>(2*si + 1, cc, 1)]*f;
        __half hi[4], lo[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) tq_split_f16(x[k], hi[k], lo[k]);
        s_qf[e] = make_uint4(tq_h2u(hi[0], hi[1]), tq_h2u(lo[0], lo[1]), tq_h2u(hi[2], hi[3]), tq_h2u(lo[2], lo[3]));
    }

    const tq_h16_lut<KBITS> lutk = tq_make_h16_lut<KBITS>(tab);
    const tq_h16_lut<VBITS> lutv = tq_make_h16_lut<VBITS>(tab);
    __syncthreads();
    const float slope = s_slope[g], qscale = s_qs[g]*p.scale, xscore = s_xs[g]*p.scale;

    // per-warp state: M, S, pe of row g of the lane's group of four; O: m-tile i = 4b + t (t < 4) of
    // the transposed output, dims tq_mma_v_dim(t, g) (c0, c1) and tq_mma_v_dim(t + 4, g) (c2, c3) of
    // block b, rows 2c (c0, c2) and 2c + 1 (c1, c3)
    float M = -INFINITY, S = 0.0f, pe = 0.0f;
    float O[NV/2][4];
#pragma unroll
    for (int t = 0; t < NV/2; ++t) O[t][0] = O[t][1] = O[t][2] = O[t][3] = 0.0f;

    for (int cs = step0, buf = 0; cs < c1; cs += stride, buf ^= 1) {
        if (cs + stride < c1) {
            load_step(cs + stride, buf ^ 1);
            __pipeline_wait_prior(1);
        } else {
            __pipeline_wait_prior(0);
        }
        __syncwarp();
        const uint8_t * kt = s_kt + buf*CW*L::SK + koff, * vt = s_vt + buf*CW*L::SV + voff;

        // the mask of this step's cells for row g: from shared memory, or loaded first so that its latency
        // hides behind the products
        float mk[NK][2];
        if (mask_async && cs + CW <= c1) {
            const uint8_t * mt = s_mt + buf*TQ_MMA_ROWS*L::SM + g*L::SM;
#pragma unroll
            for (int j = 0; j < NK; ++j) {
                const float2 m2 = __half22float2(*(const __half2 *) (mt + 2*(8*j + 2*c)));
                mk[j][0] = m2.x;
                mk[j][1] = m2.y;
            }
        } else if (mrow && cs + CW <= c1) {   // uniform: every lane has a row (dead rows row 0's)
#pragma unroll
            for (int j = 0; j < NK; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) mk[j][e] = __half2float(mrow[cs + 8*j + 2*c + e]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < NK; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int cell = cs + 8*j + 2*c + e;
                    mk[j][e] = mrow && cell < c1 ? __half2float(mrow[cell]) : 0.0f;
                }
            }
        }

        // scores of cells 8j + 2c + e (j < NK, e < 2) for row g
        float sc[NK][2];
#pragma unroll
        for (int j = 0; j < NK; ++j) sc[j][0] = sc[j][1] = 0.0f;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            uint32_t qa[4][4];
#pragma unroll
            for (int si = 0; si < 4; ++si) {
                const uint4 f = s_qf[(4*b + si)*32 + lane];
                qa[si][0] = f.x; qa[si][1] = f.y; qa[si][2] = f.z; qa[si][3] = f.w;
            }
            // all n-tiles decoded first, then the products as NK independent chains
            uint32_t kb[NK][8];
            float acc[NK][4];
#pragma unroll
            for (int j = 0; j < NK; ++j) {
                const uint8_t * blk = kt + (8*j + g)*L::SK + b*KBB;
                if (((b*KBB + 2) & 3) == 0) tq_mma_k_frag<KBITS, true>(lutk, blk, c, kb[j]);
                else                        tq_mma_k_frag<KBITS, false>(lutk, blk, c, kb[j]);
                acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
            }
#pragma unroll
            for (int si = 0; si < 4; ++si) {
#pragma unroll
                for (int j = 0; j < NK; ++j) tq_mma16816(acc[j], qa[si], kb[j][2*si], kb[j][2*si + 1]);
            }
#pragma unroll
            for (int j = 0; j < NK; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float dk = tq_h2f(*(const uint16_t *) (kt + (8*j + 2*c + e)*L::SK + b*KBB));
                    sc[j][e] = fmaf(dk, acc[j][e] + acc[j][e + 2], sc[j][e]);
                }
            }
        }

        // scale, soft-cap, mask, exact key; dead cells (masked, past the split, other rows) -inf. A step
        // inside the split that holds neither exact cell (all but one or two of a warp's steps), with
        // no soft-capping, skips those per-cell tests: the same arithmetic in fewer instructions
        const bool edge = cs + CW > c1 || (unsigned) (xk_cell - cs) < (unsigned) CW ||
                          (unsigned) (xv_cell - cs) < (unsigned) CW || p.softcap != 0.0f;
        float mx = -INFINITY;
        bool dead[NK][2];
        if (edge) {
#pragma unroll
            for (int j = 0; j < NK; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int cell = cs + 8*j + 2*c + e;
                    float x = cell == xk_cell ? xscore : sc[j][e]*qscale;
                    if (p.softcap != 0.0f) x = p.softcap*tanhf(x);
                    const float mv = slope*mk[j][e];
                    dead[j][e] = !row_ok || cell >= c1 || mv == -INFINITY;
                    x = dead[j][e] ? -INFINITY : x + mv;
                    sc[j][e] = x;
                    mx = fmaxf(mx, x);
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < NK; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float mv = slope*mk[j][e];
                    dead[j][e] = !row_ok || mv == -INFINITY;
                    sc[j][e] = dead[j][e] ? -INFINITY : __fmul_rn(sc[j][e], qscale) + mv;   // not fused: as above
                    mx = fmaxf(mx, sc[j][e]);
                }
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(TQ_CUDA_FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(TQ_CUDA_FULL_MASK, mx, 2));
        const float M_new = fmaxf(M, mx);
        // a row that has seen nothing live keeps M = -inf and its (zero) sums
        const float ms = M == -INFINITY ? (M_new == -INFINITY ? 1.0f : 0.0f) : expf(M - M_new);
        float pr[NK][2];
        float psum = 0.0f;
        pe *= ms;
#pragma unroll
        for (int j = 0; j < NK; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                pr[j][e] = dead[j][e] ? 0.0f : expf(sc[j][e] - M_new);
                psum += pr[j][e];
                if (edge && cs + 8*j + 2*c + e == xv_cell) {   // the exact value row: its weight kept apart
                    pe += pr[j][e];
                    pr[j][e] = 0.0f;
                }
            }
        }
        M = M_new;
        S = S*ms + psum;
        if (__any_sync(TQ_CUDA_FULL_MASK, ms != 1.0f)) {
            // the factors of rows 2c and 2c + 1 (lanes 8c and 8c + 4 hold them)
            const float ms0 = __shfl_sync(TQ_CUDA_FULL_MASK, ms, 8*c), ms1 = __shfl_sync(TQ_CUDA_FULL_MASK, ms, 8*c + 4);
#pragma unroll
            for (int t = 0; t < NV/2; ++t) {
                O[t][0] *= ms0; O[t][1] *= ms1; O[t][2] *= ms0; O[t][3] *= ms1;
            }
        }

        // O^T += V^T P^T, 16 cells per k-step: B = p*d_v of row g, cells 16h + 2c + {0,1} (b0) and + 8 (b1)
#pragma unroll
        for (int b = 0; b < NB; ++b) {
#pragma unroll
            for (int hh = 0; hh < CW/16; ++hh) {
                uint32_t pa[2];
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int j = 2*hh + half;
                    float x[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float dv = tq_h2f(*(const uint16_t *) (vt + (8*j + 2*c + e)*L::SV + b*VBB));
                        x[e] = pr[j][e] == 0.0f ? 0.0f : pr[j][e]*dv;
                    }
                    pa[half] = tq_f2h2(x[0], x[1]);
                }
                uint32_t vb0[8], vb1[8];
                const uint8_t * rowa = vt + (16*hh + 2*c)*L::SV + b*VBB;
                tq_mma_v_frag<VBITS>(lutv, rowa, rowa + L::SV, g, vb0);
                tq_mma_v_frag<VBITS>(lutv, rowa + 8*L::SV, rowa + 9*L::SV, g, vb1);
                // vb0[t], vb1[t]: dim tq_mma_v_dim(t, g) of cells 2c, 2c + 1 and 2c + 8, 2c + 9, the
                // A fragment's row g; m-tile t pairs n-tile t (rows g) with t + 4 (rows g + 8)
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    const uint32_t va[4] = { vb0[t], vb0[t + 4], vb1[t], vb1[t + 4] };
                    tq_mma16816(O[4*b + t], va, pa[0], pa[1]);
                }
            }
        }
        __syncwarp();   // the buffer is read before the next step's copy into it starts
    }

    // --- combine the warps: row state to shared memory (the tiles' space) ------------------------
    __syncthreads();
    float * s_wo = (float *) (smem + L::off_tiles);                      // [warp][row][D]
    float * s_wm = s_wo + TQ_MMA_WARPS*TQ_MMA_ROWS*D;                    // [warp][row] M, S, pe
    float * s_ws = s_wm + TQ_MMA_WARPS*TQ_MMA_ROWS;
    float * s_wp = s_ws + TQ_MMA_WARPS*TQ_MMA_ROWS;
    S += __shfl_xor_sync(TQ_CUDA_FULL_MASK, S, 1);
    S += __shfl_xor_sync(TQ_CUDA_FULL_MASK, S, 2);
    pe += __shfl_xor_sync(TQ_CUDA_FULL_MASK, pe, 1);
    pe += __shfl_xor_sync(TQ_CUDA_FULL_MASK, pe, 2);
    if (c == 0) {
        s_wm[warp*TQ_MMA_ROWS + g] = M;
        s_ws[warp*TQ_MMA_ROWS + g] = S;
        s_wp[warp*TQ_MMA_ROWS + g] = pe;
    }
    // only the live rows (GQA 4: half of them); the dead ones are never read
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        if (2*c + e < live) {
#pragma unroll
            for (int i = 0; i < NV/2; ++i) {
                const int b = i / 4, t = i % 4;
                s_wo[(warp*TQ_MMA_ROWS + 2*c + e)*D + b*QK_TQ + tq_mma_v_dim(t, g)]     = O[i][e];
                s_wo[(warp*TQ_MMA_ROWS + 2*c + e)*D + b*QK_TQ + tq_mma_v_dim(t + 4, g)] = O[i][e + 2];
            }
        }
    }
    __syncthreads();
    // row r: M = max over warps; warp weights exp(M_w - M) (a warp with M_w = -inf saw nothing, S_w = 0,
    // or only NaN scores, S_w NaN, which must carry on), once per (warp, row) and not per output value
    float * s_wf = s_wp + TQ_MMA_WARPS*TQ_MMA_ROWS;
    if (tid < TQ_MMA_ROWS) {
        const int r = tid;
        float Mx = -INFINITY;
        for (int w = 0; w < TQ_MMA_WARPS; ++w) Mx = fmaxf(Mx, s_wm[w*TQ_MMA_ROWS + r]);
        float Ssum = 0.0f;
        for (int w = 0; w < TQ_MMA_WARPS; ++w) {
            const float Mw = s_wm[w*TQ_MMA_ROWS + r], Sw = s_ws[w*TQ_MMA_ROWS + r];
            const float f = Mw == -INFINITY ? (Sw == 0.0f ? 0.0f : NAN) : expf(Mw - Mx);
            s_wf[w*TQ_MMA_ROWS + r] = f;
            if (f != 0.0f) {
                Ssum = fmaf(f, Sw, Ssum);
            }
        }
        s_xs[r] = Mx;        // M and S of the CTA (s_xs and s_slope are free now)
        s_slope[r] = Ssum;
    }
    __syncthreads();
    // s_q takes the combined output of the live rows
    for (int e = tid; e < live*D; e += NT) {
        const int r = e / D, j = e % D;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < TQ_MMA_WARPS; ++w) {
            const float f = s_wf[w*TQ_MMA_ROWS + r];
            if (f != 0.0f) {
                o = fmaf(f, s_wo[(w*TQ_MMA_ROWS + r)*D + j] + s_wp[w*TQ_MMA_ROWS + r]*s_xv[j], o);
            }
        }
        s_q[e] = o;
    }
    __syncthreads();

    tq_fa_store_rows<D>(p, tab, true, TQ_MMA_ROWS, r0, ik2, ik3, blockIdx.z, s_q, s_xs, s_slope);
}
