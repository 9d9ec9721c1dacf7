// tests/test_autograd.c: the CPU kernels of autograd/ops.c. Every backward
// against central finite differences of its forward, every forward against
// a naive double-precision reference written here (never the code under
// test), and the properties the trainer leans on: documents that do not see
// each other in attention, dropout's mask and scale, gradients that
// accumulate (+=), results that do not depend on the thread count.
//
// Gradient checks: pick a random projection R, let L = sum(out * R) in
// double, and compare the analytic gradient of L (the backward with
// dout = R) with (L(x + eps) - L(x - eps)) / 2eps for every input element.
// The comparison is over the whole vector, ||g - fd|| / ||fd||: elements
// whose gradient is near zero make per-element relative errors meaningless.
// See FD_TOL for the tolerance.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "autograd/autograd.h"
#include "test_util.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// Finite differences in fp32: the forward's outputs carry rounding of about
// 6e-8 relative, which enters L and is divided by 2 eps. With eps = 1e-2 that
// noise is ~1e-5 of a typical gradient element, and the truncation error of a
// central difference (eps^2 / 6 times a third derivative of order one) is of
// the same size, so a correct backward lands near 1e-5 to 1e-4 while any
// wrong term (a missing factor, a dropped contribution) is O(1). 1e-3 keeps
// a margin of 10x over the worst measured case.
#define FD_EPS 1e-2f
#define FD_TOL 1e-3

static uint64_t rng = 0x5eed;

static float *rnd(int64_t n, float lo, float hi) {
    float *x = malloc((size_t)n * sizeof *x);
    test_fill_uniform(x, (size_t)n, lo, hi, &rng);
    return x;
}
static float *zeros(int64_t n) { return calloc((size_t)n, sizeof(float)); }
static float *copy(const float *x, int64_t n) {
    float *y = malloc((size_t)n * sizeof *y);
    memcpy(y, x, (size_t)n * sizeof *y);
    return y;
}

// L = sum(out * R), accumulated in double
static double proj(const float *out, const float *R, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)out[i] * R[i];
    return s;
}

static bool all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return false;
    return true;
}

typedef double (*loss_fn)(void *ctx);

// fd[i] = dL/dx[i] by central differences; the step is what fp32 actually
// took, (x + eps) - (x - eps), not 2 eps.
static double *finite_diff(float *x, int64_t n, loss_fn loss, void *ctx) {
    double *fd = malloc((size_t)n * sizeof *fd);
    for (int64_t i = 0; i < n; i++) {
        const float x0 = x[i], xp = x0 + FD_EPS, xm = x0 - FD_EPS;
        x[i] = xp;
        const double lp = loss(ctx);
        x[i] = xm;
        const double lm = loss(ctx);
        x[i] = x0;
        fd[i] = (lp - lm) / ((double)xp - (double)xm);
    }
    return fd;
}

// Analytic gradient g against finite differences of x under loss; frees fd.
static void expect_grad(const char *what, const float *g, float *x, int64_t n, loss_fn loss, void *ctx) {
    double *fd = finite_diff(x, n, loss, ctx);
    double num = 0, den = 0;
    bool finite = all_finite(g, n);
    for (int64_t i = 0; i < n; i++) {
        finite &= isfinite(fd[i]) != 0;
        num += (g[i] - fd[i]) * (g[i] - fd[i]);
        den += fd[i] * fd[i];
    }
    const double rel = sqrt(num / den);
    printf("\n    %-40s |g-fd|/|fd| = %.2e ", what, rel);
    CU_ASSERT(finite);
    CU_ASSERT(den > 0);  // a gradient that is zero everywhere tests nothing
    CU_ASSERT(rel < FD_TOL);  // false for NaN too
    free(fd);
}

// A forward against its double reference: max |got - ref| / max |ref|.
static double expect_close(const char *what, const float *got, const double *ref, int64_t n, double tol) {
    double err = 0, scale = 0;
    bool finite = all_finite(got, n);
    for (int64_t i = 0; i < n; i++) {
        err = fmax(err, fabs(got[i] - ref[i]));
        scale = fmax(scale, fabs(ref[i]));
    }
    const double rel = err / scale;
    printf("\n    %-40s max err / max|ref| = %.2e ", what, rel);
    CU_ASSERT(finite);
    CU_ASSERT(scale > 0);
    CU_ASSERT(rel < tol);
    return rel;
}

// ----------------------------------------------------------------------------
// embedding

typedef struct emb_ctx {
    int64_t N, D;
    const int32_t *ids;
    float *table, *out, *R;
} emb_ctx;

static double emb_loss(void *p) {
    emb_ctx *c = p;
    ag_embedding_forward(c->out, c->ids, c->table, c->N, c->D);
    return proj(c->out, c->R, c->N * c->D);
}

static void test_embedding(void) {
    enum { V = 7, D = 21, N = 9 };
    const int32_t ids[N] = {3, 0, 3, 6, 1, 3, 0, 5, 6};  // repeats: rows of dtable collect several tokens
    emb_ctx c = {N, D, ids, rnd(V * D, -1, 1), zeros(N * D), rnd(N * D, -1, 1)};
    emb_loss(&c);
    int bad = 0;
    for (int n = 0; n < N; n++) bad += memcmp(c.out + n * D, c.table + ids[n] * D, D * sizeof(float)) != 0;
    CU_ASSERT_EQUAL(bad, 0);
    float *dtable = zeros(V * D);
    ag_embedding_backward(dtable, c.R, ids, N, D);
    for (int d = 0; d < D; d++) CU_ASSERT_EQUAL(dtable[2 * D + d], 0.0f);  // id 2 never appears
    expect_grad("embedding dtable", dtable, c.table, V * D, emb_loss, &c);
    free(dtable);
    free(c.table);
    free(c.out);
    free(c.R);
}

// ----------------------------------------------------------------------------
// RMSNorm

typedef struct rms_ctx {
    int64_t N, D;
    float eps;
    float *x, *w, *out, *rstd, *R;
} rms_ctx;

static double rms_loss(void *p) {
    rms_ctx *c = p;
    ag_rmsnorm_forward(c->out, c->rstd, c->x, c->w, c->N, c->D, c->eps);
    return proj(c->out, c->R, c->N * c->D);
}

static void test_rmsnorm(void) {
    const int64_t sizes[2][2] = {{4, 19}, {3, 40}};  // D below and above the 16-lane blocks, with tails
    for (int t = 0; t < 2; t++) {
        const int64_t N = sizes[t][0], D = sizes[t][1];
        rms_ctx c = {N, D, 1e-5f, rnd(N * D, -1, 1), rnd(D, 0.5f, 1.5f), zeros(N * D), zeros(N), rnd(N * D, -1, 1)};
        // forward against double
        rms_loss(&c);
        double *ref = malloc(N * D * sizeof *ref), *rref = malloc(N * sizeof *rref);
        for (int64_t n = 0; n < N; n++) {
            double ss = 0;
            for (int64_t d = 0; d < D; d++) ss += (double)c.x[n * D + d] * c.x[n * D + d];
            rref[n] = 1.0 / sqrt(ss / D + 1e-5);
            for (int64_t d = 0; d < D; d++) ref[n * D + d] = c.w[d] * c.x[n * D + d] * rref[n];
        }
        expect_close("rmsnorm forward", c.out, ref, N * D, 1e-6);
        expect_close("rmsnorm rstd", c.rstd, rref, N, 1e-6);
        // backward
        float *dx = zeros(N * D), *dw = zeros(D), *dx2 = zeros(N * D);
        ag_rmsnorm_backward(dx, dw, c.R, c.x, c.w, c.rstd, N, D);
        ag_rmsnorm_backward(dx2, NULL, c.R, c.x, c.w, c.rstd, N, D);  // frozen weight: dw NULL
        CU_ASSERT_EQUAL(memcmp(dx, dx2, N * D * sizeof(float)), 0);
        expect_grad("rmsnorm dx", dx, c.x, N * D, rms_loss, &c);
        expect_grad("rmsnorm dw", dw, c.w, D, rms_loss, &c);
        free(ref);
        free(rref);
        free(dx);
        free(dx2);
        free(dw);
        free(c.x);
        free(c.w);
        free(c.out);
        free(c.rstd);
        free(c.R);
    }
}

// ----------------------------------------------------------------------------
// dropout

typedef struct drop_ctx {
    int64_t n;
    float p;
    uint64_t seed;
    float *x, *out, *R;
} drop_ctx;

static double drop_loss(void *ptr) {
    drop_ctx *c = ptr;
    ag_dropout_forward(c->out, c->x, c->n, c->p, c->seed);
    return proj(c->out, c->R, c->n);
}

static void test_dropout(void) {
    const float p = 0.3f, scale = 1.0f / (1.0f - p);
    enum { BIG = 200000 };
    float *x = rnd(BIG, 0.5f, 1.5f), *out = zeros(BIG), *dx = zeros(BIG), *ones = malloc(BIG * sizeof(float));
    for (int i = 0; i < BIG; i++) ones[i] = 1.0f;
    ag_dropout_forward(out, x, BIG, p, 77);
    ag_dropout_backward(dx, ones, BIG, p, 77);
    int64_t kept = 0, bad_value = 0, bad_mask = 0;
    for (int i = 0; i < BIG; i++) {
        const bool k = out[i] != 0.0f;  // x is never 0
        kept += k;
        bad_value += k && out[i] != x[i] * scale;  // exactly x / (1 - p), in fp32
        bad_mask += k ? dx[i] != scale : dx[i] != 0.0f;  // the backward recomputes the same mask
    }
    const double frac = (double)kept / BIG;  // binomial: sd = sqrt(0.21 / 2e5) = 1e-3
    printf("\n    kept fraction %.4f (expected 0.7) ", frac);
    CU_ASSERT(fabs(frac - 0.7) < 0.006);
    CU_ASSERT_EQUAL(bad_value, 0);
    CU_ASSERT_EQUAL(bad_mask, 0);
    // another seed, another mask; the same seed, the same mask
    float *out2 = zeros(BIG);
    ag_dropout_forward(out2, x, BIG, p, 78);
    CU_ASSERT_NOT_EQUAL(memcmp(out, out2, BIG * sizeof(float)), 0);
    ag_dropout_forward(out2, x, BIG, p, 77);
    CU_ASSERT_EQUAL(memcmp(out, out2, BIG * sizeof(float)), 0);
    // p = 0 copies, in place too
    ag_dropout_forward(out2, x, BIG, 0.0f, 77);
    CU_ASSERT_EQUAL(memcmp(out2, x, BIG * sizeof(float)), 0);
    ag_dropout_forward(out2, out2, BIG, 0.0f, 77);
    CU_ASSERT_EQUAL(memcmp(out2, x, BIG * sizeof(float)), 0);

    enum { n = 60 };
    drop_ctx c = {n, p, 1234, rnd(n, -1, 1), zeros(n), rnd(n, -1, 1)};
    float *g = zeros(n);
    ag_dropout_backward(g, c.R, n, p, c.seed);
    expect_grad("dropout dx (p = 0.3)", g, c.x, n, drop_loss, &c);
    free(g);
    free(c.x);
    free(c.out);
    free(c.R);
    free(x);
    free(out);
    free(out2);
    free(dx);
    free(ones);
}

// ----------------------------------------------------------------------------
// LoRA linear

typedef struct lora_ctx {
    int64_t N, I, O, r;
    float scale, p;  // p: dropout on the LoRA branch input (0: xd is x itself)
    uint64_t seed;
    float *x, *xd, *W, *bias, *A, *B, *xa, *y, *R;
} lora_ctx;

static double lora_loss(void *ptr) {
    lora_ctx *c = ptr;
    if (c->r) ag_dropout_forward(c->xd, c->x, c->N * c->I, c->p, c->seed);
    ag_lora_linear_forward(c->y, c->xa, c->x, c->r ? c->xd : NULL, c->W, c->bias, c->A, c->B, c->scale, c->N, c->I,
                           c->O, c->r);
    return proj(c->y, c->R, c->N * c->O);
}

static void lora_case(int64_t r, bool bias, float p) {
    const int64_t N = 5, I = 11, O = 6;
    lora_ctx c = {N, I, O, r, 2.0f, p, 99, rnd(N * I, -1, 1), zeros(N * I), rnd(O * I, -1, 1),
                  bias ? rnd(O, -1, 1) : NULL, r ? rnd(r * I, -1, 1) : NULL, r ? rnd(O * r, -1, 1) : NULL,
                  r ? zeros(N * r) : NULL, zeros(N * O), rnd(N * O, -1, 1)};
    char name[96];
    const char *tag = r == 0 ? "r=0" : p > 0 ? "dropout" : "no dropout";

    // forward against double: y = x W^T + b + scale (xd A^T) B^T
    lora_loss(&c);
    double *ref = malloc(N * O * sizeof *ref), *xa_ref = malloc((N * r + 1) * sizeof *xa_ref);
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < r; k++) {
            double s = 0;
            for (int64_t i = 0; i < I; i++) s += (double)c.xd[n * I + i] * c.A[k * I + i];
            xa_ref[n * r + k] = s;
        }
        for (int64_t o = 0; o < O; o++) {
            double s = bias ? c.bias[o] : 0.0;
            for (int64_t i = 0; i < I; i++) s += (double)c.x[n * I + i] * c.W[o * I + i];
            for (int64_t k = 0; k < r; k++) s += (double)c.scale * xa_ref[n * r + k] * c.B[o * r + k];
            ref[n * O + o] = s;
        }
    }
    snprintf(name, sizeof name, "lora forward y (%s%s)", tag, bias ? ", bias" : "");
    expect_close(name, c.y, ref, N * O, 1e-6);
    if (r) expect_close("lora forward xa", c.xa, xa_ref, N * r, 1e-6);

    // backward with dy = R
    float *dx = zeros(N * I), *dxd = zeros(N * I), *dA = r ? zeros(r * I) : NULL, *dB = r ? zeros(O * r) : NULL;
    float *scratch = r ? zeros(N * r) : NULL;
    if (r && p > 0) {
        // x feeds the base directly and the branch through dropout
        ag_lora_linear_backward(dx, dxd, dA, dB, c.R, c.xd, c.xa, c.W, c.A, c.B, c.scale, N, I, O, r, scratch);
        ag_dropout_backward(dx, dxd, N * I, p, c.seed);
    } else {
        // no dropout: xd is x, and dxd aliases dx
        ag_lora_linear_backward(dx, r ? dx : NULL, dA, dB, c.R, c.xd, c.xa, c.W, c.A, c.B, c.scale, N, I, O, r,
                                scratch);
    }
    snprintf(name, sizeof name, "lora dx (%s%s)", tag, bias ? ", bias" : "");
    expect_grad(name, dx, c.x, N * I, lora_loss, &c);
    if (r) {
        snprintf(name, sizeof name, "lora dA (%s)", tag);
        expect_grad(name, dA, c.A, r * I, lora_loss, &c);
        snprintf(name, sizeof name, "lora dB (%s)", tag);
        expect_grad(name, dB, c.B, O * r, lora_loss, &c);
        // no input gradient wanted: dA and dB unchanged
        float *dA2 = zeros(r * I), *dB2 = zeros(O * r);
        lora_loss(&c);
        ag_lora_linear_backward(NULL, NULL, dA2, dB2, c.R, c.xd, c.xa, c.W, c.A, c.B, c.scale, N, I, O, r, scratch);
        CU_ASSERT_EQUAL(memcmp(dA, dA2, r * I * sizeof(float)), 0);
        CU_ASSERT_EQUAL(memcmp(dB, dB2, O * r * sizeof(float)), 0);
        free(dA2);
        free(dB2);
    }
    free(ref);
    free(xa_ref);
    free(dx);
    free(dxd);
    free(dA);
    free(dB);
    free(scratch);
    free(c.x);
    free(c.xd);
    free(c.W);
    free(c.bias);
    free(c.A);
    free(c.B);
    free(c.xa);
    free(c.y);
    free(c.R);
}

static void test_lora_linear(void) {
    lora_case(3, true, 0.3f);
    lora_case(3, false, 0.3f);
    lora_case(3, true, 0.0f);
    lora_case(0, true, 0.0f);
    lora_case(0, false, 0.0f);
}

// ----------------------------------------------------------------------------
// rotary embedding

// Llama 3's published rope_scaling; with hd = 8 and theta = 5e5 the four
// wavelengths (6.3, 167, 4.5e3, 1.2e5) hit all three regimes.
static const ag_rope_scaling llama3 = {8.0f, 1.0f, 4.0f, 8192};

// inv_freq in double from the formula (HF's _compute_llama3_parameters).
static double inv_freq_ref(int64_t i, int64_t hd, double theta, const ag_rope_scaling *s, int *regime) {
    const double f = 1.0 / pow(theta, (double)(2 * i) / (double)hd);
    *regime = 0;
    if (!s || s->factor == 0) return f;
    const double low_wl = s->original_max_position / (double)s->low_freq_factor;
    const double high_wl = s->original_max_position / (double)s->high_freq_factor;
    const double wavelen = 2 * 3.14159265358979323846 / f;
    if (wavelen > low_wl) {
        *regime = 1;
        return f / s->factor;
    }
    if (wavelen < high_wl) return f;
    *regime = 2;
    const double smooth = (s->original_max_position / wavelen - s->low_freq_factor) /
                          ((double)s->high_freq_factor - s->low_freq_factor);
    return (1 - smooth) * f / s->factor + smooth * f;
}

static void test_rope_inv_freq(void) {
    const struct {
        int64_t hd;
        double theta;
        const ag_rope_scaling *s;
    } cases[] = {{128, 500000.0, &llama3}, {64, 500000.0, &llama3}, {8, 500000.0, &llama3},
                 {128, 10000.0, NULL},     {64, 10000.0, &(ag_rope_scaling){0}}};
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        float got[64];
        double worst = 0;
        int count[3] = {0};
        const int64_t half = cases[t].hd / 2;
        ag_rope_inv_freq(got, cases[t].hd, cases[t].theta, cases[t].s);
        for (int64_t i = 0; i < half; i++) {
            int regime;
            const double ref = inv_freq_ref(i, cases[t].hd, cases[t].theta, cases[t].s, &regime);
            count[regime]++;
            worst = fmax(worst, fabs(got[i] - ref) / ref);
            CU_ASSERT(isfinite(got[i]) && got[i] > 0);
        }
        printf("\n    inv_freq hd %3lld theta %6.0f %-7s: max rel err %.2e (unchanged %d, scaled %d, smoothed %d) ",
               (long long)cases[t].hd, cases[t].theta, cases[t].s && cases[t].s->factor ? "llama3" : "plain", worst,
               count[0], count[1], count[2]);
        // fp32 steps against exact arithmetic: a few roundings of 6e-8 each
        CU_ASSERT(worst < 1e-6);
        if (cases[t].s && cases[t].s->factor) CU_ASSERT(count[0] > 0 && count[1] > 0 && count[2] > 0);
    }
}

typedef struct rope_ctx {
    int64_t N, H, hd;
    const int32_t *pos;
    const float *inv_freq;
    float *x, *out, *R;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    ag_rope_forward(c->out, c->x, c->pos, c->inv_freq, c->N, c->H, c->hd);
    return proj(c->out, c->R, c->N * c->H * c->hd);
}

static void rope_case(int64_t hd, const ag_rope_scaling *s, bool grad) {
    const int64_t N = 5, H = 3, half = hd / 2, n_el = N * H * hd;
    const int32_t pos[5] = {0, 1, 7, 300, 8000};
    float *inv_freq = malloc(half * sizeof(float));
    ag_rope_inv_freq(inv_freq, hd, 500000.0, s);
    rope_ctx c = {N, H, hd, pos, inv_freq, rnd(n_el, -1, 1), zeros(n_el), rnd(n_el, -1, 1)};
    rope_loss(&c);
    double *ref = malloc(n_el * sizeof *ref);
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < half; i++) {
                const float theta = (float)pos[n] * inv_freq[i];  // the fp32 angle is part of the contract
                const float *xr = c.x + (n * H + h) * hd;
                double *o = ref + (n * H + h) * hd;
                o[i] = xr[i] * cos(theta) - xr[i + half] * sin(theta);
                o[i + half] = xr[i + half] * cos(theta) + xr[i] * sin(theta);
            }
    char name[96];
    snprintf(name, sizeof name, "rope forward hd %lld%s", (long long)hd, s ? " llama3" : "");
    expect_close(name, c.out, ref, n_el, 1e-6);
    // in place gives the same bits
    float *inplace = copy(c.x, n_el);
    ag_rope_forward(inplace, inplace, pos, inv_freq, N, H, hd);
    CU_ASSERT_EQUAL(memcmp(inplace, c.out, n_el * sizeof(float)), 0);
    // the backward of the forward gives x back (the rotation is orthogonal)
    float *back = zeros(n_el);
    ag_rope_backward(back, c.out, pos, inv_freq, N, H, hd);
    double err = 0;
    for (int64_t i = 0; i < n_el; i++) err = fmax(err, fabs(back[i] - c.x[i]));
    CU_ASSERT(err < 1e-6);
    if (grad) {
        float *dx = zeros(n_el);
        ag_rope_backward(dx, c.R, pos, inv_freq, N, H, hd);
        snprintf(name, sizeof name, "rope dx hd %lld%s", (long long)hd, s ? " llama3" : "");
        expect_grad(name, dx, c.x, n_el, rope_loss, &c);
        free(dx);
    }
    free(back);
    free(inplace);
    free(ref);
    free(inv_freq);
    free(c.x);
    free(c.out);
    free(c.R);
}

static void test_rope(void) {
    rope_case(8, NULL, true);
    rope_case(8, &llama3, true);
    rope_case(136, &llama3, false);  // 68 frequencies: more than one block of angles
}

// ----------------------------------------------------------------------------
// attention

typedef struct attn_ctx {
    int64_t N, H, Hkv, hd;
    const int32_t *start;
    float *q, *k, *v, *out, *lse, *R;
} attn_ctx;

static double attn_loss(void *p) {
    attn_ctx *c = p;
    ag_attention_forward(c->out, c->lse, c->q, c->k, c->v, c->start, c->N, c->H, c->Hkv, c->hd);
    return proj(c->out, c->R, c->N * c->H * c->hd);
}

static attn_ctx attn_new(int64_t N, int64_t H, int64_t Hkv, int64_t hd, const int32_t *start) {
    attn_ctx c = {N, H, Hkv, hd, start, rnd(N * H * hd, -1.5f, 1.5f), rnd(N * Hkv * hd, -1.5f, 1.5f),
                  rnd(N * Hkv * hd, -1, 1), zeros(N * H * hd), zeros(N * H), rnd(N * H * hd, -1, 1)};
    return c;
}

static void attn_free(attn_ctx *c) {
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->out);
    free(c->lse);
    free(c->R);
}

// softmax((q . k) / sqrt(hd)) v over keys [start[n], n], in double
static void attn_ref(const attn_ctx *c, double *out, double *lse) {
    const int64_t N = c->N, H = c->H, Hkv = c->Hkv, hd = c->hd;
    double *s = malloc(N * sizeof *s);
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / Hkv), j0 = c->start[n];
            const float *qh = c->q + (n * H + h) * hd;
            double m = -INFINITY, sum = 0;
            for (int64_t j = j0; j <= n; j++) {
                double d = 0;
                for (int64_t i = 0; i < hd; i++) d += (double)qh[i] * c->k[(j * Hkv + g) * hd + i];
                s[j] = d / sqrt((double)hd);
                m = fmax(m, s[j]);
            }
            for (int64_t j = j0; j <= n; j++) sum += exp(s[j] - m);
            lse[n * H + h] = m + log(sum);
            for (int64_t i = 0; i < hd; i++) {
                double o = 0;
                for (int64_t j = j0; j <= n; j++) o += exp(s[j] - m) / sum * c->v[(j * Hkv + g) * hd + i];
                out[(n * H + h) * hd + i] = o;
            }
        }
    free(s);
}

// three packed documents: [0, 4), [4, 5) (one token), [5, 10)
static const int32_t doc_start[10] = {0, 0, 0, 0, 4, 5, 5, 5, 5, 5};

static void attn_case(int64_t H, int64_t Hkv, int64_t hd, const int32_t *start, const char *tag) {
    const int64_t N = 10, nq = N * H * hd, nkv = N * Hkv * hd;
    attn_ctx c = attn_new(N, H, Hkv, hd, start);
    attn_loss(&c);
    double *ref = malloc(nq * sizeof *ref), *lse_ref = malloc(N * H * sizeof *lse_ref);
    attn_ref(&c, ref, lse_ref);
    char name[96];
    snprintf(name, sizeof name, "attention forward %s", tag);
    expect_close(name, c.out, ref, nq, 1e-6);
    expect_close("attention lse", c.lse, lse_ref, N * H, 1e-6);

    float *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
    ag_attention_backward(dq, dk, dv, c.R, c.q, c.k, c.v, c.out, c.lse, start, N, H, Hkv, hd);
    snprintf(name, sizeof name, "attention dq %s", tag);
    expect_grad(name, dq, c.q, nq, attn_loss, &c);
    snprintf(name, sizeof name, "attention dk %s", tag);
    expect_grad(name, dk, c.k, nkv, attn_loss, &c);
    snprintf(name, sizeof name, "attention dv %s", tag);
    expect_grad(name, dv, c.v, nkv, attn_loss, &c);
    free(dq);
    free(dk);
    free(dv);
    free(ref);
    free(lse_ref);
    attn_free(&c);
}

static void test_attention(void) {
    attn_case(4, 2, 20, doc_start, "GQA 4/2, 3 docs");   // hd 20: one 16-lane block and a tail
    attn_case(2, 2, 8, doc_start, "MHA 2/2, 3 docs");
    const int32_t one_doc[10] = {0};
    attn_case(4, 1, 16, one_doc, "GQA 4/1, 1 doc");
    // start[] that is not a set of contiguous documents (a sliding window):
    // the backward falls back to one task per head and stays exact
    int32_t window[10];
    for (int n = 0; n < 10; n++) window[n] = n < 3 ? 0 : n - 3;
    attn_case(4, 2, 8, window, "GQA 4/2, window");
}

// Nothing of document 1 reaches document 2 or 3, in either direction; within
// a document nothing reaches back in time.
static void test_attention_documents(void) {
    const int64_t N = 10, H = 4, Hkv = 2, hd = 8, nq = N * H * hd, nkv = N * Hkv * hd;
    attn_ctx c = attn_new(N, H, Hkv, hd, doc_start);
    attn_loss(&c);
    float *out0 = copy(c.out, nq), *lse0 = copy(c.lse, N * H);
    const int64_t tok = 2;  // inside document 1 = [0, 4)
    for (int64_t i = 0; i < H * hd; i++) c.q[tok * H * hd + i] += 0.5f;
    for (int64_t i = 0; i < Hkv * hd; i++) {
        c.k[tok * Hkv * hd + i] -= 0.7f;
        c.v[tok * Hkv * hd + i] += 0.9f;
    }
    attn_loss(&c);
    const int64_t row = H * hd;
    // earlier tokens of the document and all later documents: bit for bit unchanged
    CU_ASSERT_EQUAL(memcmp(c.out, out0, tok * row * sizeof(float)), 0);
    CU_ASSERT_EQUAL(memcmp(c.out + 4 * row, out0 + 4 * row, (N - 4) * row * sizeof(float)), 0);
    CU_ASSERT_EQUAL(memcmp(c.lse + 4 * H, lse0 + 4 * H, (N - 4) * H * sizeof(float)), 0);
    // the perturbed token and the one after it do change
    CU_ASSERT_NOT_EQUAL(memcmp(c.out + tok * row, out0 + tok * row, 2 * row * sizeof(float)), 0);

    // gradients: dout only on documents 2 and 3 leaves document 1's dq, dk, dv exactly zero
    float *dout = zeros(nq), *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
    for (int64_t i = 4 * row; i < nq; i++) dout[i] = c.R[i];
    ag_attention_backward(dq, dk, dv, dout, c.q, c.k, c.v, c.out, c.lse, doc_start, N, H, Hkv, hd);
    int nonzero = 0, zero_later = 0;
    for (int64_t i = 0; i < 4 * row; i++) nonzero += dq[i] != 0.0f;
    for (int64_t i = 0; i < 4 * Hkv * hd; i++) nonzero += (dk[i] != 0.0f) + (dv[i] != 0.0f);
    for (int64_t i = 4 * Hkv * hd; i < nkv; i++) zero_later += dv[i] == 0.0f;
    CU_ASSERT_EQUAL(nonzero, 0);
    CU_ASSERT_EQUAL(zero_later, 0);
    free(dout);
    free(dq);
    free(dk);
    free(dv);
    free(out0);
    free(lse0);
    attn_free(&c);
}

// Large scores must not overflow: the softmax subtracts the row maximum.
static void test_attention_large_scores(void) {
    const int64_t N = 10, H = 2, Hkv = 1, hd = 8, nq = N * H * hd, nkv = N * Hkv * hd;
    attn_ctx c = attn_new(N, H, Hkv, hd, doc_start);
    for (int64_t i = 0; i < nq; i++) c.q[i] *= 60.0f;  // scores in the hundreds
    for (int64_t i = 0; i < nkv; i++) c.k[i] *= 10.0f;
    attn_loss(&c);
    double *ref = malloc(nq * sizeof *ref), *lse_ref = malloc(N * H * sizeof *lse_ref);
    attn_ref(&c, ref, lse_ref);
    expect_close("attention forward, scores ~1e2", c.out, ref, nq, 1e-5);
    expect_close("attention lse, scores ~1e2", c.lse, lse_ref, N * H, 1e-6);
    float *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
    ag_attention_backward(dq, dk, dv, c.R, c.q, c.k, c.v, c.out, c.lse, doc_start, N, H, Hkv, hd);
    CU_ASSERT(all_finite(dq, nq) && all_finite(dk, nkv) && all_finite(dv, nkv));
    free(dq);
    free(dk);
    free(dv);
    free(ref);
    free(lse_ref);
    attn_free(&c);
}

// ----------------------------------------------------------------------------
// SwiGLU

typedef struct swiglu_ctx {
    int64_t n;
    float *gate, *up, *out, *R;
} swiglu_ctx;

static double swiglu_loss(void *p) {
    swiglu_ctx *c = p;
    ag_swiglu_forward(c->out, c->gate, c->up, c->n);
    return proj(c->out, c->R, c->n);
}

static void test_swiglu(void) {
    enum { n = 64 };
    swiglu_ctx c = {n, rnd(n, -5, 5), rnd(n, -2, 2), zeros(n), rnd(n, -1, 1)};
    c.gate[0] = -100.0f;  // exp(100) overflows to inf: silu is -0, its gradient 0, never NaN
    c.gate[1] = 100.0f;
    swiglu_loss(&c);
    double ref[n];
    for (int i = 0; i < n; i++) ref[i] = c.gate[i] / (1.0 + exp(-(double)c.gate[i])) * c.up[i];
    expect_close("swiglu forward", c.out, ref, n, 1e-6);
    float *dg = zeros(n), *du = zeros(n);
    ag_swiglu_backward(dg, du, c.R, c.gate, c.up, n);
    CU_ASSERT(all_finite(dg, n) && all_finite(du, n));
    expect_grad("swiglu dgate", dg, c.gate, n, swiglu_loss, &c);
    expect_grad("swiglu dup", du, c.up, n, swiglu_loss, &c);
    free(dg);
    free(du);
    free(c.gate);
    free(c.up);
    free(c.out);
    free(c.R);
}

// ----------------------------------------------------------------------------
// cross-entropy

typedef struct ce_ctx {
    int64_t N, D, V, tc, vc;
    float grad_scale;
    const int32_t *targets;
    float *h, *W, *scratch;
} ce_ctx;

static double ce_run(ce_ctx *c, float *dh, int64_t *n_valid) {
    double loss;
    ag_cross_entropy(&loss, n_valid, dh, c->h, c->W, c->targets, c->N, c->D, c->V, c->grad_scale, c->tc, c->vc,
                     c->scratch);
    return loss;
}

// the quantity whose gradient dh holds
static double ce_loss(void *p) {
    int64_t nv;
    return ce_run(p, NULL, &nv) * ((ce_ctx *)p)->grad_scale;
}

// sum over valid n of logsumexp(logits[n]) - logits[n, target], in double
static double ce_ref(const float *h, const float *W, const int32_t *t, int64_t N, int64_t D, int64_t V) {
    double total = 0, *z = malloc(V * sizeof *z);
    for (int64_t n = 0; n < N; n++) {
        if (t[n] == AG_IGNORE_INDEX) continue;
        double m = -INFINITY, s = 0;
        for (int64_t v = 0; v < V; v++) {
            z[v] = 0;
            for (int64_t d = 0; d < D; d++) z[v] += (double)h[n * D + d] * W[v * D + d];
            m = fmax(m, z[v]);
        }
        for (int64_t v = 0; v < V; v++) s += exp(z[v] - m);
        total += m + log(s) - z[t[n]];
    }
    free(z);
    return total;
}

static void test_cross_entropy(void) {
    enum { N = 12, D = 20, V = 37 };
    // ignored targets at the ends and in the middle: chunks are both
    // adjacent runs and gathered rows
    const int32_t targets[N] = {-100, 5, 36, -100, -100, 0, 17, 17, 2, -100, 30, -100};
    const int64_t expect_valid = 7;
    const int64_t chunks[][2] = {{12, 64}, {5, 37}, {4, 36}, {5, 10}, {3, 8}, {2, 1}, {1, 37}, {16, 5}};
    float *h = rnd(N * D, -1, 1), *W = rnd(V * D, -1, 1);
    const double ref = ce_ref(h, W, targets, N, D, V);
    printf("\n    reference loss sum %.9f ", ref);
    for (size_t t = 0; t < sizeof chunks / sizeof chunks[0]; t++) {
        const int64_t tc = chunks[t][0], vc = chunks[t][1];
        const int64_t nscratch = ag_cross_entropy_scratch_floats(D, V, tc, vc);
        ce_ctx c = {N, D, V, tc, vc, 1.0f / 7, targets, h, W, malloc(nscratch * sizeof(float))};
        float *dh = zeros(N * D);
        int64_t nv = -1, nv2 = -1;
        const double loss = ce_run(&c, dh, &nv), loss_nograd = ce_run(&c, NULL, &nv2);
        const double rel = fabs(loss - ref) / fabs(ref);
        printf("\n    token_chunk %2lld vocab_chunk %2lld: loss rel err %.2e ", (long long)tc, (long long)vc, rel);
        CU_ASSERT(isfinite(loss));
        CU_ASSERT(rel < 1e-6);
        CU_ASSERT_EQUAL(nv, expect_valid);
        CU_ASSERT_EQUAL(nv2, expect_valid);
        CU_ASSERT_EQUAL(loss, loss_nograd);  // the gradient pass does not touch the loss
        // ignored tokens get no gradient
        int stray = 0;
        for (int64_t n = 0; n < N; n++)
            for (int64_t d = 0; d < D; d++) stray += targets[n] == AG_IGNORE_INDEX && dh[n * D + d] != 0.0f;
        CU_ASSERT_EQUAL(stray, 0);
        char name[96];
        snprintf(name, sizeof name, "cross-entropy dh (tc %lld, vc %lld)", (long long)tc, (long long)vc);
        expect_grad(name, dh, h, N * D, ce_loss, &c);
        free(dh);
        free(c.scratch);
    }

    // every target ignored: nothing, and dh untouched
    const int32_t none[N] = {-100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100, -100};
    ce_ctx c = {N, D, V, 4, 10, 1.0f, none, h, W, malloc(ag_cross_entropy_scratch_floats(D, V, 4, 10) * 4)};
    float *dh = zeros(N * D);
    int64_t nv = -1;
    CU_ASSERT_EQUAL(ce_run(&c, dh, &nv), 0.0);
    CU_ASSERT_EQUAL(nv, 0);
    int touched = 0;
    for (int64_t i = 0; i < N * D; i++) touched += dh[i] != 0.0f;
    CU_ASSERT_EQUAL(touched, 0);

    // large logits (hundreds): the online log-sum-exp keeps everything finite
    c.targets = targets;
    for (int64_t i = 0; i < N * D; i++) h[i] *= 40.0f;
    const double ref_big = ce_ref(h, W, targets, N, D, V), big = ce_run(&c, dh, &nv);
    printf("\n    large logits: loss %.6g, rel err %.2e ", big, fabs(big - ref_big) / ref_big);
    CU_ASSERT(fabs(big - ref_big) / ref_big < 1e-6);
    CU_ASSERT(all_finite(dh, N * D));
    free(dh);
    free(c.scratch);
    free(h);
    free(W);
}

// ----------------------------------------------------------------------------
// properties shared by all backwards

// Backward kernels add into their outputs: starting from ones gives one more
// than starting from zeros (up to one rounding).
static bool accumulates(const float *from_zero, const float *from_one, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!(fabsf(from_one[i] - 1.0f - from_zero[i]) <= 1e-6f * (1.0f + fabsf(from_zero[i])))) return false;
    return true;
}

static float *filled(int64_t n, float v) {
    float *x = malloc((size_t)n * sizeof *x);
    for (int64_t i = 0; i < n; i++) x[i] = v;
    return x;
}

static void test_accumulate(void) {
    const int64_t N = 6, D = 12, V = 9, r = 2, O = 5, H = 2, hd = 8, n_el = N * H * hd;
    float *x = rnd(N * D, -1, 1), *dout = rnd(N * D, -1, 1), *w = rnd(D, 0.5f, 1.5f), *rstd = zeros(N);
    float *out = zeros(N * D), *W = rnd(O * D, -1, 1), *A = rnd(r * D, -1, 1), *B = rnd(O * r, -1, 1);
    float *xa = zeros(N * r), *y = zeros(N * O), *dy = rnd(N * O, -1, 1), *scratch = zeros(N * r);
    float *Wlm = rnd(V * D, -1, 1), *inv_freq = zeros(hd / 2);
    const int32_t ids[6] = {1, 4, 1, 0, 8, 4}, pos[6] = {0, 1, 2, 3, 4, 5}, start[6] = {0, 0, 0, 3, 3, 3};
    const int32_t targets[6] = {3, -100, 8, 0, 0, 1};
    int ok = 0, total = 0;
#define CHECK(n, call_with_g)                        \
    do {                                             \
        float *g0 = zeros(n), *g1 = filled(n, 1.0f); \
        {                                            \
            float *g = g0;                           \
            call_with_g;                             \
        }                                            \
        {                                            \
            float *g = g1;                           \
            call_with_g;                             \
        }                                            \
        ok += accumulates(g0, g1, n);                \
        total++;                                     \
        free(g0);                                    \
        free(g1);                                    \
    } while (0)

    CHECK(V * D, ag_embedding_backward(g, dout, ids, N, D));
    ag_rmsnorm_forward(out, rstd, x, w, N, D, 1e-5f);
    CHECK(N * D, ag_rmsnorm_backward(g, NULL, dout, x, w, rstd, N, D));
    CHECK(D, ag_rmsnorm_backward(NULL, g, dout, x, w, rstd, N, D));
    CHECK(N * D, ag_dropout_backward(g, dout, N * D, 0.3f, 5));
    ag_lora_linear_forward(y, xa, x, x, W, NULL, A, B, 2.0f, N, D, O, r);
    CHECK(N * D, ag_lora_linear_backward(g, NULL, NULL, NULL, dy, x, xa, W, A, B, 2.0f, N, D, O, r, scratch));
    CHECK(N * D, ag_lora_linear_backward(NULL, g, NULL, NULL, dy, x, xa, W, A, B, 2.0f, N, D, O, r, scratch));
    CHECK(r * D, ag_lora_linear_backward(NULL, NULL, g, NULL, dy, x, xa, W, A, B, 2.0f, N, D, O, r, scratch));
    CHECK(O * r, ag_lora_linear_backward(NULL, NULL, NULL, g, dy, x, xa, W, A, B, 2.0f, N, D, O, r, scratch));
    // rope and attention on [N, H, hd] (H = 2, Hkv = 1)
    float *q = rnd(n_el, -1, 1), *kv = rnd(N * hd, -1, 1), *ao = zeros(n_el), *lse = zeros(N * H);
    float *ado = rnd(n_el, -1, 1), *sink = zeros(n_el);
    ag_rope_inv_freq(inv_freq, hd, 10000.0, NULL);
    CHECK(n_el, ag_rope_backward(g, ado, pos, inv_freq, N, H, hd));
    ag_attention_forward(ao, lse, q, kv, kv, start, N, H, 1, hd);
    CHECK(N * H * hd, ag_attention_backward(g, sink, sink, ado, q, kv, kv, ao, lse, start, N, H, 1, hd));
    CHECK(N * hd, ag_attention_backward(sink, g, sink, ado, q, kv, kv, ao, lse, start, N, H, 1, hd));
    CHECK(N * hd, ag_attention_backward(sink, sink, g, ado, q, kv, kv, ao, lse, start, N, H, 1, hd));
    CHECK(D, ag_swiglu_backward(g, NULL, dout, x, w, D));
    CHECK(D, ag_swiglu_backward(NULL, g, dout, x, w, D));
    float *ce_scratch = malloc(ag_cross_entropy_scratch_floats(D, V, 4, 4) * sizeof(float));
    double loss;
    int64_t nv;
    CHECK(N * D, ag_cross_entropy(&loss, &nv, g, x, Wlm, targets, N, D, V, 0.2f, 4, 4, ce_scratch));
#undef CHECK
    printf("\n    %d of %d backward outputs accumulate ", ok, total);
    CU_ASSERT_EQUAL(ok, total);
    free(ce_scratch);
    free(q);
    free(kv);
    free(ao);
    free(lse);
    free(ado);
    free(sink);
    free(x);
    free(dout);
    free(w);
    free(rstd);
    free(out);
    free(W);
    free(A);
    free(B);
    free(xa);
    free(y);
    free(dy);
    free(scratch);
    free(Wlm);
    free(inv_freq);
}

// The kernels' own loops (no GEMM) give the same bits on 1 thread and on 3.
// Sizes are above the kernels' parallel threshold (PAR_MIN_WORK in ops.c, 32768
// element operations), so the 3-thread run really splits the work.
static void test_thread_count(void) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    const int64_t N = 40, H = 4, Hkv = 2, hd = 24, nq = N * H * hd, nkv = N * Hkv * hd, D = 1000, ne = N * D;
    int32_t start[40];
    for (int n = 0; n < N; n++) start[n] = n < 13 ? 0 : n < 14 ? 13 : n < 30 ? 14 : 30;
    float *q = rnd(nq, -1, 1), *k = rnd(nkv, -1, 1), *v = rnd(nkv, -1, 1), *dout = rnd(nq, -1, 1);
    float *x = rnd(ne, -1, 1), *w = rnd(D, 0.5f, 1.5f), *dn = rnd(ne, -1, 1), *up = rnd(ne, -1, 1);
    enum { K = 11 };
    float *res[2][K];
    for (int t = 0; t < 2; t++) {
        omp_set_num_threads(t == 0 ? 1 : 3);
        float *out = zeros(nq), *lse = zeros(N * H), *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
        float *rstd = zeros(N), *dw = zeros(D), *dx = zeros(ne), *sw = zeros(ne), *dg = zeros(ne), *dr = zeros(ne);
        ag_attention_forward(out, lse, q, k, v, start, N, H, Hkv, hd);
        ag_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, start, N, H, Hkv, hd);
        float *tmp = zeros(ne);
        ag_rmsnorm_forward(tmp, rstd, x, w, N, D, 1e-6f);
        ag_rmsnorm_backward(dx, dw, dn, x, w, rstd, N, D);
        ag_swiglu_forward(sw, x, up, ne);
        ag_swiglu_backward(dg, NULL, dn, x, up, ne);
        ag_dropout_forward(dr, x, ne, 0.1f, 3);
        free(tmp);
        float *r[K] = {out, lse, dq, dk, dv, rstd, dw, dx, sw, dg, dr};
        memcpy(res[t], r, sizeof r);
    }
    omp_set_num_threads(saved);
    const int64_t len[K] = {nq, N * H, nq, nkv, nkv, N, D, ne, ne, ne, ne};
    int same = 0;
    for (int i = 0; i < K; i++) {
        same += memcmp(res[0][i], res[1][i], len[i] * sizeof(float)) == 0;
        free(res[0][i]);
        free(res[1][i]);
    }
    printf("\n    %d of %d outputs identical on 1 and 3 threads ", same, K);
    CU_ASSERT_EQUAL(same, K);
    free(q);
    free(k);
    free(v);
    free(dout);
    free(x);
    free(w);
    free(dn);
    free(up);
#endif
}

// The GEMM path at the model's shape (SmolLM2: H 9, Hkv 3, hd 64): a
// 5-token document (the scalar path) then a 295-token one (query blocks of
// 64 and a ragged tail), forward and backward against a double reference.
// dq, dk, dv by the softmax's chain rule: p = exp(s - lse), D = sum_j p dP,
// ds = p (dP - D), dq = ds k / sqrt(hd), dk = ds q / sqrt(hd), dv = p dout.
static void attn_ref_backward(const attn_ctx *c, const double *lse, const float *dout, double *dq, double *dk,
                              double *dv) {
    const int64_t N = c->N, H = c->H, Hkv = c->Hkv, hd = c->hd;
    const double rs = 1.0 / sqrt((double)hd);
    double *p = malloc(N * sizeof *p), *dp = malloc(N * sizeof *dp);
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / (H / Hkv), j0 = c->start[n];
            const float *qh = c->q + (n * H + h) * hd, *doh = dout + (n * H + h) * hd;
            double D = 0;
            for (int64_t j = j0; j <= n; j++) {
                const float *kj = c->k + (j * Hkv + g) * hd, *vj = c->v + (j * Hkv + g) * hd;
                double s = 0, d = 0;
                for (int64_t i = 0; i < hd; i++) {
                    s += (double)qh[i] * kj[i];
                    d += (double)doh[i] * vj[i];
                }
                p[j] = exp(s * rs - lse[n * H + h]);
                dp[j] = d;
                D += p[j] * d;
            }
            for (int64_t j = j0; j <= n; j++) {
                const double ds = p[j] * (dp[j] - D);
                for (int64_t i = 0; i < hd; i++) {
                    dq[(n * H + h) * hd + i] += ds * c->k[(j * Hkv + g) * hd + i] * rs;
                    dk[(j * Hkv + g) * hd + i] += ds * qh[i] * rs;
                    dv[(j * Hkv + g) * hd + i] += p[j] * doh[i];
                }
            }
        }
    free(p);
    free(dp);
}

static void test_attention_long(void) {
    const int64_t N = 300, H = 9, Hkv = 3, hd = 64, nq = N * H * hd, nkv = N * Hkv * hd;
    int32_t start[300];
    for (int n = 0; n < N; n++) start[n] = n < 5 ? 0 : 5;
    attn_ctx c = attn_new(N, H, Hkv, hd, start);
    attn_loss(&c);
    double *ref = malloc(nq * sizeof *ref), *lse_ref = malloc(N * H * sizeof *lse_ref);
    attn_ref(&c, ref, lse_ref);
    expect_close("attention forward, 5 + 295 tokens", c.out, ref, nq, 1e-6);
    expect_close("attention lse, 5 + 295 tokens", c.lse, lse_ref, N * H, 1e-6);

    float *dq = zeros(nq), *dk = zeros(nkv), *dv = zeros(nkv);
    double *rdq = calloc(nq, sizeof *rdq), *rdk = calloc(nkv, sizeof *rdk), *rdv = calloc(nkv, sizeof *rdv);
    ag_attention_backward(dq, dk, dv, c.R, c.q, c.k, c.v, c.out, c.lse, start, N, H, Hkv, hd);
    attn_ref_backward(&c, lse_ref, c.R, rdq, rdk, rdv);
    expect_close("attention dq, 5 + 295 tokens", dq, rdq, nq, 1e-5);
    expect_close("attention dk, 5 + 295 tokens", dk, rdk, nkv, 1e-5);
    expect_close("attention dv, 5 + 295 tokens", dv, rdv, nkv, 1e-5);
    // and it accumulates: from ones, one more than from zeros
    float *dq1 = filled(nq, 1), *dk1 = filled(nkv, 1), *dv1 = filled(nkv, 1);
    ag_attention_backward(dq1, dk1, dv1, c.R, c.q, c.k, c.v, c.out, c.lse, start, N, H, Hkv, hd);
    CU_ASSERT(accumulates(dq, dq1, nq) && accumulates(dk, dk1, nkv) && accumulates(dv, dv1, nkv));
    free(dq1);
    free(dk1);
    free(dv1);
    free(dq);
    free(dk);
    free(dv);
    free(rdq);
    free(rdk);
    free(rdv);
    free(ref);
    free(lse_ref);
    attn_free(&c);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("autograd_kernels", NULL, NULL);
    CU_add_test(s, "embedding", test_embedding);
    CU_add_test(s, "rmsnorm", test_rmsnorm);
    CU_add_test(s, "dropout", test_dropout);
    CU_add_test(s, "lora linear", test_lora_linear);
    CU_add_test(s, "rope inv_freq (llama3)", test_rope_inv_freq);
    CU_add_test(s, "rope", test_rope);
    CU_add_test(s, "attention", test_attention);
    CU_add_test(s, "attention document isolation", test_attention_documents);
    CU_add_test(s, "attention large scores", test_attention_large_scores);
    CU_add_test(s, "attention long document (GEMM path)", test_attention_long);
    CU_add_test(s, "swiglu", test_swiglu);
    CU_add_test(s, "cross-entropy", test_cross_entropy);
    CU_pSuite p = CU_add_suite("autograd_properties", NULL, NULL);
    CU_add_test(p, "backward accumulates", test_accumulate);
    CU_add_test(p, "thread count independence", test_thread_count);
    return test_main();
}
