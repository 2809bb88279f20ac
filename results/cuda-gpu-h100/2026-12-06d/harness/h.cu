// Old (HEAD) against new (worktree) decoding attention kernels at Llama-3.1-8B's decode shape: 8 K/V
// heads of 128, GQA 4 (32 query heads, one token), tq3 K / tq2 V, with a mask and an exact row in the
// last cell. For each KV length and each kernel (mma: tq_fattn_mma_kernel, vec: tq_fattn_vec_kernel,
// 4 rows a CTA), the splits as tq_fa_make_plan chooses them, and cases:
//   exact         the exact row used for K and V
//   K NaN         the exact cell's coded K row has a NaN block norm (the exact key row is not used)
//   V NaN         the exact cell's coded V row has a NaN block norm (the exact value row is not used)
//   V NaN masked  as V NaN, the exact cell masked for every row, the exact V row holding an Inf (an
//                 unused exact value row must not reach the output: 0 * Inf)
// Every case compares each new version's combined output with old's: NaN where old has NaN, elsewhere
// within H_TOL (default 2^-9) of max |out|. The exact case is timed: CUDA graphs of 50 calls, the best
// of 10 launches, old with main's split plan and each new version with the plans for 2, 3 (and 4) CTAs
// a multiprocessor (new3: built with a launch bound of 3 CTAs, new4: of 4, where the header takes
// TQ_MMA_MIN_CTAS).
// Usage: h [n_kv ...]  (default 256 4096 32768 65536). Exit status 1 on any case beyond the tolerance.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include "../../ggml_tq/tq-cuda.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <random>
#include <algorithm>
#include <string>

extern "C" void old_launch(int kind, int combine, const void * params, const void * tables, unsigned gx, unsigned gy, unsigned gz, cudaStream_t st);
extern "C" void new3_launch(int kind, int combine, const void * params, const void * tables, unsigned gx, unsigned gy, unsigned gz, cudaStream_t st);
extern "C" void new4_launch(int kind, int combine, const void * params, const void * tables, unsigned gx, unsigned gy, unsigned gz, cudaStream_t st);
extern "C" size_t old_params_size(void);
extern "C" size_t new4_params_size(void);
extern "C" size_t old_tables_size(void);
extern "C" size_t new4_tables_size(void);

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__); exit(2); } } while (0)

static const int D = 128, NH = 32, NHKV = 8, GQA = NH / NHKV;
static const size_t KB = D / 64 * 26, VB = D / 64 * 18;   // row bytes: tq3 K, tq2 V

static tq_cuda_tables make_tables() {
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

// tq_fa_make_plan (tq-cuda.cu) for this shape: mma 8 rows a CTA, steps of 128 cells; vec 4 rows, tiles of 64
static void plan(int kind, int n_kv, int n_sm, int & n_split, int & split_cells, unsigned & chunks, int per_sm = 2) {
    const int rows = GQA, nr = kind == 0 ? TQ_MMA_ROWS : 4;
    chunks = (unsigned) ((rows + nr - 1) / nr);
    const long tile = kind == 0 ? TQ_MMA_WARPS*TQ_MMA_CELLS : TQ_FA_TILE;
    const long ctas = (long) NHKV*chunks, tiles = (n_kv + tile - 1) / tile;
    const long want = ((kind == 0 ? per_sm : 4)*(long) n_sm + ctas - 1) / ctas;
    int ns = (int) std::max<long>(1, std::min<long>(want, tiles / 2));
    ns = std::min(ns, 1024);
    const long tps = std::max<long>(1, (tiles + ns - 1) / ns);
    split_cells = (int) (tps*tile);
    n_split = (int) std::max<long>(1, (n_kv + split_cells - 1) / split_cells);
}

struct bufs {
    char * k, * v; float * q, * xk, * xv, * dst, * part; __half * mask; int32_t * ecell;
};

// version 0: old, 1: new built for 3 CTAs a multiprocessor, 2: new built for 4
static void run(int ver, int kind, bool combine, const tq_fattn_params & p, const tq_cuda_tables & t, dim3 g, cudaStream_t st) {
    (ver == 0 ? old_launch : ver == 1 ? new3_launch : new4_launch)(kind, combine ? 1 : 0, &p, &t, g.x, g.y, g.z, st);
}

static float time_graph(int old, int kind, bool combine, const tq_fattn_params & p, const tq_cuda_tables & t, dim3 g, cudaStream_t st) {
    cudaGraph_t graph; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < 50; ++i) run(old, kind, combine, p, t, g, st);
    CK(cudaStreamEndCapture(st, &graph));
    CK(cudaGraphInstantiate(&ge, graph, 0));
    CK(cudaGraphLaunch(ge, st)); CK(cudaStreamSynchronize(st));
    cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int r = 0; r < 10; ++r) {
        CK(cudaEventRecord(e0, st)); CK(cudaGraphLaunch(ge, st)); CK(cudaEventRecord(e1, st)); CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); best = std::min(best, ms);
    }
    CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(graph));
    return best*1000.0f/50.0f;
}

int main(int argc, char ** argv) {
    if (old_params_size() != sizeof(tq_fattn_params) || new4_params_size() != sizeof(tq_fattn_params) ||
        old_tables_size() != sizeof(tq_cuda_tables) || new4_tables_size() != sizeof(tq_cuda_tables)) {
        printf("tq_fattn_params / tq_cuda_tables differ between old and new: the harness passes them by layout\n");
        return 2;
    }
    std::vector<int> lens;
    for (int i = 1; i < argc; ++i) lens.push_back(atoi(argv[i]));
    if (lens.empty()) lens = { 256, 4096, 32768, 65536 };
    const int max_kv = *std::max_element(lens.begin(), lens.end());

    cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
    const int n_sm = prop.multiProcessorCount;
    printf("device %s, %d SMs; D %d, %d K/V heads, GQA %d, tq3 K / tq2 V, mask, exact row in the last cell\n", prop.name, n_sm, D, NHKV, GQA);
    cudaStream_t st; CK(cudaStreamCreate(&st));
    const tq_cuda_tables tab = make_tables();
    std::mt19937 rng(1234);

    // caches: random indices, block norms random positive f16 in [0.25, 4)
    bufs B;
    std::vector<uint8_t> hk((size_t) max_kv*NHKV*KB), hv((size_t) max_kv*NHKV*VB);
    for (auto & x : hk) x = (uint8_t) rng();
    for (auto & x : hv) x = (uint8_t) rng();
    auto set_norm = [](uint8_t * blk, uint16_t h) { blk[0] = (uint8_t) (h & 0xff); blk[1] = (uint8_t) (h >> 8); };
    for (size_t b = 0; b < hk.size() / 26; ++b) set_norm(&hk[b*26], (uint16_t) (0x3400 + (rng() & 0x0fff)));
    for (size_t b = 0; b < hv.size() / 18; ++b) set_norm(&hv[b*18], (uint16_t) (0x3400 + (rng() & 0x0fff)));
    CK(cudaMalloc(&B.k, hk.size())); CK(cudaMalloc(&B.v, hv.size()));
    CK(cudaMemcpy(B.k, hk.data(), hk.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(B.v, hv.data(), hv.size(), cudaMemcpyHostToDevice));
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> hq(D*NH), hxk(D*NHKV), hxv(D*NHKV);
    for (auto & x : hq) x = nd(rng);
    for (auto & x : hxk) x = nd(rng);
    for (auto & x : hxv) x = nd(rng);
    CK(cudaMalloc(&B.q, hq.size()*4)); CK(cudaMalloc(&B.xk, hxk.size()*4)); CK(cudaMalloc(&B.xv, hxv.size()*4));
    CK(cudaMemcpy(B.q, hq.data(), hq.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(B.xk, hxk.data(), hxk.size()*4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&B.dst, D*NH*4)); CK(cudaMalloc(&B.part, (size_t) NH*1024*(D + 2)*4));
    CK(cudaMalloc(&B.mask, (size_t) max_kv*2)); CK(cudaMalloc(&B.ecell, 4));

    long failures = 0;
    const double tol = getenv("H_TOL") ? atof(getenv("H_TOL")) : 0x1p-9;
    const char * kinds[2] = { "mma", "vec" };
    const char * cases[4] = { "exact", "K NaN", "V NaN", "V NaN masked" };
    for (int n_kv : lens) {
        const int ce = n_kv - 1;
        CK(cudaMemcpy(B.ecell, &ce, 4, cudaMemcpyHostToDevice));
        for (int kind = 0; kind < 2; ++kind) {
            tq_fattn_params p; memset(&p, 0, sizeof(p));
            p.q = (const char *) B.q; p.nbq1 = D*NH*4; p.nbq2 = D*4; p.nbq3 = D*NH*4;
            p.k = B.k; p.nbk1 = KB*NHKV; p.nbk2 = KB; p.nbk3 = KB*NHKV*(size_t) n_kv;
            p.v = B.v; p.nbv1 = VB*NHKV; p.nbv2 = VB; p.nbv3 = VB*NHKV*(size_t) n_kv;
            p.mask = (const char *) B.mask; p.nbm1 = (size_t) n_kv*2; p.nbm2 = (size_t) n_kv*2; p.nbm3 = (size_t) n_kv*2; p.ne_m2 = 1; p.ne_m3 = 1;
            p.k_exact = B.xk; p.nbxk1 = D*NHKV*4; p.v_exact = B.xv; p.nbxv1 = D*NHKV*4; p.exact_cell = B.ecell;
            p.dst = B.dst; p.part = B.part;
            p.n_q = 1; p.n_head = NH; p.n_head_kv = NHKV; p.n_kv = n_kv; p.gqa = GQA;
            unsigned chunks;
            plan(kind, n_kv, n_sm, p.n_split, p.split_cells, chunks);
            p.copy_unit = 4;
            p.scale = 1.0f/sqrtf((float) D);
            p.n_head_log2 = 1u << (uint32_t) floorf(log2f((float) NH));
            p.m0 = powf(2.0f, -0.0f / p.n_head_log2); p.m1 = p.m0;
            const dim3 g(NHKV, chunks, p.n_split);
            const size_t n_part = (size_t) NH*p.n_split*(D + 2);

            for (int cs = 0; cs < 4; ++cs) {
                // the case's cache rows, mask and exact V row
                std::vector<uint8_t> kr(hk.begin() + (size_t) ce*NHKV*KB, hk.begin() + (size_t) (ce + 1)*NHKV*KB);
                std::vector<uint8_t> vr(hv.begin() + (size_t) ce*NHKV*VB, hv.begin() + (size_t) (ce + 1)*NHKV*VB);
                for (int h = 0; h < NHKV; ++h) {
                    if (cs == 1) set_norm(&kr[h*KB], 0x7E00);        // block 0 of K
                    if (cs >= 2) set_norm(&vr[h*VB + 18], 0x7E00);   // block 1 of V
                }
                CK(cudaMemcpy(B.k + (size_t) ce*NHKV*KB, kr.data(), kr.size(), cudaMemcpyHostToDevice));
                CK(cudaMemcpy(B.v + (size_t) ce*NHKV*VB, vr.data(), vr.size(), cudaMemcpyHostToDevice));
                std::vector<__half> hm(n_kv);
                for (int c = 0; c < n_kv; ++c) hm[c] = __float2half(c % 97 == 13 ? -INFINITY : 0.0f);
                if (cs == 3) hm[ce] = __float2half(-INFINITY);
                CK(cudaMemcpy(B.mask, hm.data(), n_kv*2, cudaMemcpyHostToDevice));
                std::vector<float> xv = hxv;
                if (cs == 3) for (int h = 0; h < NHKV; ++h) xv[h*D + 5] = INFINITY;
                CK(cudaMemcpy(B.xv, xv.data(), xv.size()*4, cudaMemcpyHostToDevice));

                // the combined output of each version, all with old's split plan
                std::vector<float> f[3];
                for (int w = 0; w < 3; ++w) {
                    CK(cudaMemset(B.part, 0xff, n_part*4)); CK(cudaMemset(B.dst, 0xff, D*NH*4));
                    run(w, kind, true, p, tab, g, st);
                    CK(cudaStreamSynchronize(st)); CK(cudaGetLastError());
                    f[w].resize(D*NH);
                    CK(cudaMemcpy(f[w].data(), B.dst, D*NH*4, cudaMemcpyDeviceToHost));
                }
                printf("%s n_kv %6d splits %3d %-13s:", kinds[kind], n_kv, p.n_split, cases[cs]);
                for (int w = 1; w < 3; ++w) {
                    // NaN where old has NaN; elsewhere within tol of max |old|
                    double mx = 0.0, err = 0.0;
                    long nan_diff = 0;
                    for (int i = 0; i < D*NH; ++i) {
                        if (std::isnan(f[0][i]) != std::isnan(f[w][i])) { ++nan_diff; continue; }
                        if (std::isnan(f[0][i])) continue;
                        mx = std::max(mx, (double) fabsf(f[0][i]));
                        err = std::max(err, (double) fabsf(f[0][i] - f[w][i]));
                    }
                    const double rel = err / (mx + 1e-30);
                    const bool ok = nan_diff == 0 && rel <= tol;
                    printf(" %s: max diff %.3g of max|out| %s%s", w == 1 ? "new3" : "new4", rel, ok ? "ok" : "MISMATCH", nan_diff ? " (NaN differ)" : "");
                    if (!ok) ++failures;
                }
                printf("\n");
                if (cs == 0) {
                    // old with its plan; each new with the plans for 2, 3 (and 4) CTAs a multiprocessor
                    const float t_old = std::min(time_graph(0, kind, true, p, tab, g, st), time_graph(0, kind, true, p, tab, g, st));
                    const float k_old = time_graph(0, kind, false, p, tab, g, st);
                    printf("%s n_kv %6d timing: old splits %3d kernel %7.2f us, with combine %7.2f us\n", kinds[kind], n_kv, p.n_split, k_old, t_old);
                    for (int w = 1; w < 3; ++w) {
                        for (int per = 2; per <= (kind == 0 ? w + 2 : 2); ++per) {
                            tq_fattn_params q = p;
                            unsigned ch;
                            plan(kind, n_kv, n_sm, q.n_split, q.split_cells, ch, per);
                            const dim3 gq(NHKV, ch, q.n_split);
                            const float tk = time_graph(w, kind, false, q, tab, gq, st);
                            const float tc = std::min(time_graph(w, kind, true, q, tab, gq, st), time_graph(w, kind, true, q, tab, gq, st));
                            printf("%s n_kv %6d timing: %s plan %d/SM splits %3d kernel %7.2f us, with combine %7.2f us (%.3fx old)\n",
                                   kinds[kind], n_kv, w == 1 ? "new3" : "new4", per, q.n_split, tk, tc, tc/t_old);
                        }
                    }
                }
                // restore the rows
                CK(cudaMemcpy(B.k + (size_t) ce*NHKV*KB, hk.data() + (size_t) ce*NHKV*KB, kr.size(), cudaMemcpyHostToDevice));
                CK(cudaMemcpy(B.v + (size_t) ce*NHKV*VB, hv.data() + (size_t) ce*NHKV*VB, vr.size(), cudaMemcpyHostToDevice));
            }
        }
    }
    printf(failures ? "FAILED: %ld cases differ between old and new\n" : "ALL CASES WITHIN TOLERANCE\n", failures);
    return failures ? 1 : 0;
}
