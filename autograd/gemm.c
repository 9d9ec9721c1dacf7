// autograd/gemm.c: the one matrix multiply the CPU path uses. OpenBLAS when
// the build found it (the CPU path's speed is its GEMM), otherwise a blocked
// loop that is correct everywhere and fast nowhere.
#define _GNU_SOURCE
#include "autograd.h"

#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef QLORA_HAVE_CBLAS
#include <cblas.h>

void ag_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
             int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (M == 0 || N == 0) return;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, (int)M,
                (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
}
const char *ag_gemm_backend(void) { return "openblas"; }
static void blas_threads(int n) { openblas_set_num_threads(n); }
// OpenBLAS built with pthreads keeps its own pool beside OpenMP's; spinning
// OpenMP workers then starve it (measured: 2 threads slower than 1). Passive
// waiting makes the two share the cores.
static void blas_threads_init(void) {
    if (openblas_get_parallel() == 1) setenv("OMP_WAIT_POLICY", "passive", 0);
}

#else

// C = alpha A B + beta C, blocked over K and N so a tile of B stays in cache;
// rows of C are independent, so OpenMP splits them.
void ag_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
             int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    enum { KB = 256, NB = 512 };
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *c = C + m * ldc;
        if (beta == 0.0f)
            for (int64_t n = 0; n < N; n++) c[n] = 0.0f;
        else if (beta != 1.0f)
            for (int64_t n = 0; n < N; n++) c[n] *= beta;
        for (int64_t n0 = 0; n0 < N; n0 += NB) {
            int64_t n1 = n0 + NB < N ? n0 + NB : N;
            for (int64_t k0 = 0; k0 < K; k0 += KB) {
                int64_t k1 = k0 + KB < K ? k0 + KB : K;
                for (int64_t k = k0; k < k1; k++) {
                    float a = alpha * (trans_a ? A[k * lda + m] : A[m * lda + k]);
                    if (a == 0.0f) continue;
                    if (!trans_b) {
                        const float *b = B + k * ldb;
                        for (int64_t n = n0; n < n1; n++) c[n] += a * b[n];
                    } else {
                        for (int64_t n = n0; n < n1; n++) c[n] += a * B[n * ldb + k];
                    }
                }
            }
        }
    }
}
const char *ag_gemm_backend(void) { return "builtin"; }
static void blas_threads(int n) { (void)n; }
static void blas_threads_init(void) {}

#endif

uint64_t ag_rng_hash(uint64_t seed, uint64_t index) {
    uint64_t z = seed ^ (index + 0x9e3779b97f4a7c15ull * (index + 1));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void ag_threads_init(void) { blas_threads_init(); }

void ag_set_threads(int n) {
    if (n <= 0) return;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    blas_threads(n);
}
