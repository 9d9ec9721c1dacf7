// train/generate.c: text generation with a KV cache, and `qlora generate`.
//
// The forward is model.c's layer_forward written with the autograd kernels
// directly (no tape: nothing is kept for a backward), over N new tokens at
// positions p0 .. p0+N-1 whose keys and values are appended to a cache:
//
//   prefill  the whole prompt in one pass (p0 = 0): batched GEMMs, and
//            ag_attention_forward with every start[] = 0, the attention
//            model_forward runs on one document;
//   decode   one token (N = 1) at position p0, attending to the cached keys
//            and values of positions 0..p0 (attend_one below).
//
// Only the last row's logits are computed. Sampling: temperature 0 is greedy
// (the lowest id wins a tie); otherwise softmax(logits / T), cut to the top-p
// nucleus, sampled with the counter-based ag_rng_uniform(seed, step), so the
// same seed gives the same tokens on every machine and thread count.
//
// Base weights: each linear is dequantized to fp32 (rounded to the weight's
// dtype, as the tape's linear does) once per call into a per-model cache
// when all of them fit in GEN_WEIGHT_CACHE_MB (default 1024 MiB; the
// environment variable QLORA_GEN_WEIGHT_CACHE_MB overrides it, 0 = never
// cache); above that, every linear is dequantized into one workspace at each
// forward, which costs a full dequantization per decoded token.
#define _GNU_SOURCE
#include "train.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define GEN_WEIGHT_CACHE_MB 1024

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ----------------------------------------------------------------------------
// the generation state: weights, KV cache, activations

typedef struct gen_state {
    const model *m;
    const lora *l;                 // NULL: the base model
    int64_t cap;                   // positions the cache holds
    int64_t n;                     // positions filled
    int64_t rows;                  // activation rows (the prompt length)
    float *kc, *vc;                // [n_layers, cap, Hkv*hd] keys (after rope) and values
    float **w;                     // [n_layers * LIN_COUNT] dequantized weights, or NULL (not cached)
    float *ws;                     // [max linear numel] workspace when not cached
    float *x, *h, *q, *att, *y;    // [rows, D] / [rows, H*hd]
    float *gate, *up;              // [rows, F]
    float *xa;                     // [rows, r_max] LoRA down-projection
    float *lse;                    // [rows, H] (ag_attention_forward writes it)
    float *scores;                 // [H/Hkv, cap] decode attention, one kv head's queries at a time
    float *logits;                 // [V] of the last row
    int32_t *pos, *start;          // [rows]
} gen_state;

// Dequantizes a base weight to fp32, rounded to the dtype it was quantized
// from, exactly as autograd/tape.c's linear does, so both paths see the same W.
static int dequant_weight(const nf4_tensor *w, float *out, q_err *err) {
    const nf4_view v = nf4_tensor_view(w);
    if (nf4_dequantize(&v, out, Q_DTYPE_F32, err)) return -1;
    if (w->dtype == Q_DTYPE_BF16) {
        for (int64_t i = 0; i < w->numel; i++) out[i] = q_bf16_to_f32(q_f32_to_bf16(out[i]));
    } else if (w->dtype == Q_DTYPE_F16) {
        for (int64_t i = 0; i < w->numel; i++) out[i] = q_f16_to_f32(q_f32_to_f16(out[i]));
    }
    return 0;
}

static int64_t cache_limit_bytes(void) {
    int64_t mb = GEN_WEIGHT_CACHE_MB;
    const char *s = getenv("QLORA_GEN_WEIGHT_CACHE_MB");
    if (s && *s) {
        char *end;
        errno = 0;
        const long long v = strtoll(s, &end, 10);
        if (!*end && !errno && v >= 0) mb = v;
    }
    return mb * 1048576;
}

static void state_free(gen_state *s) {
    if (s->w)
        for (int64_t i = 0; i < s->m->cfg.n_layers * LIN_COUNT; i++) free(s->w[i]);
    free(s->w);
    free(s->ws);
    free(s->kc), free(s->vc);
    free(s->x), free(s->h), free(s->q), free(s->att), free(s->y);
    free(s->gate), free(s->up), free(s->xa), free(s->lse), free(s->scores), free(s->logits);
    free(s->pos), free(s->start);
    memset(s, 0, sizeof *s);
}

static float *alloc_f32(int64_t n) { return malloc((size_t)(n > 0 ? n : 1) * sizeof(float)); }

// Dequantizes every linear once into s->w when they all fit the budget (and
// memory): a decode step then costs one GEMV per linear instead of a full
// dequantization as well. Leaves s->w NULL otherwise.
static int cache_weights(gen_state *s, q_err *err) {
    const model *m = s->m;
    const size_t n_lin = (size_t)m->cfg.n_layers * LIN_COUNT;
    int64_t total = 0;
    for (size_t i = 0; i < n_lin; i++) total += m->layers[i / LIN_COUNT].w[i % LIN_COUNT].numel * 4;
    if (total > cache_limit_bytes() || !(s->w = calloc(n_lin, sizeof *s->w))) return 0;
    for (size_t i = 0; i < n_lin; i++) {
        const nf4_tensor *w = &m->layers[i / LIN_COUNT].w[i % LIN_COUNT];
        if (!(s->w[i] = alloc_f32(w->numel))) {  // not so much memory after all: use the workspace
            for (size_t j = 0; j < i; j++) free(s->w[j]);
            free(s->w);
            s->w = NULL;
            return 0;
        }
        if (dequant_weight(w, s->w[i], err))
            return q_err_wrap(err, "generate: layer %zu %s", i / LIN_COUNT, model_linear_names[i % LIN_COUNT]);
    }
    return 0;
}

static int state_init(gen_state *s, const model *m, const lora *l, int64_t rows, int64_t cap, q_err *err) {
    memset(s, 0, sizeof *s);
    const model_config *c = &m->cfg;
    const int64_t D = c->hidden, F = c->intermediate, V = c->vocab, H = c->n_heads, hd = c->head_dim;
    const int64_t KV = c->n_kv_heads * hd, L = c->n_layers;
    s->m = m, s->l = l, s->cap = cap, s->rows = rows;
    int64_t r_max = 0;
    for (int64_t i = 0; l && i < L * LIN_COUNT; i++) r_max = l->mods[i].r > r_max ? l->mods[i].r : r_max;

    s->kc = alloc_f32(L * cap * KV), s->vc = alloc_f32(L * cap * KV);
    s->x = alloc_f32(rows * D), s->h = alloc_f32(rows * D), s->y = alloc_f32(rows * D);
    s->q = alloc_f32(rows * H * hd), s->att = alloc_f32(rows * H * hd);
    s->gate = alloc_f32(rows * F), s->up = alloc_f32(rows * F), s->xa = alloc_f32(rows * r_max);
    s->lse = alloc_f32(rows * H), s->scores = alloc_f32(H / c->n_kv_heads * cap), s->logits = alloc_f32(V);
    s->pos = malloc((size_t)rows * sizeof(int32_t)), s->start = malloc((size_t)rows * sizeof(int32_t));
    if (!s->kc || !s->vc || !s->x || !s->h || !s->y || !s->q || !s->att || !s->gate || !s->up || !s->xa ||
        !s->lse || !s->scores || !s->logits || !s->pos || !s->start) {
        state_free(s);
        return q_err_set(err, "generate: out of memory for the KV cache (%lld positions) and activations",
                         (long long)cap);
    }

    if (cache_weights(s, err)) {
        state_free(s);
        return -1;
    }
    if (!s->w && !(s->ws = alloc_f32(model_max_linear_numel(c)))) {
        state_free(s);
        return q_err_set(err, "generate: out of memory for the dequantization workspace");
    }
    return 0;
}

// ----------------------------------------------------------------------------
// the forward

// y[N,O] = x[N,I] W^T + bias + LoRA (no dropout at inference).
static int linear(gen_state *s, int64_t layer, model_linear_id id, const float *x, float *y, int64_t N, q_err *err) {
    const model_layer *L = &s->m->layers[layer];
    const nf4_tensor *w = &L->w[id];
    const float *W;
    if (s->w) {
        W = s->w[layer * LIN_COUNT + id];
    } else {
        if (dequant_weight(w, s->ws, err))
            return q_err_wrap(err, "generate: layer %lld %s", (long long)layer, model_linear_names[id]);
        W = s->ws;
    }
    const lora_module *a = s->l ? lora_mod(s->l, layer, id) : NULL;
    const int64_t r = a ? a->r : 0;
    ag_lora_linear_forward(y, r ? s->xa : NULL, x, r ? x : NULL, W, L->bias[id], r ? a->A : NULL, r ? a->B : NULL,
                           r ? s->l->scale : 0.0f, N, w->shape[1], w->shape[0], r);
    return 0;
}

// One query q[H,hd] at position p against the cached k, v [0..p] of a layer
// ([cap, Hkv, hd] rows): out[H,hd]. Per key/value head g, its G = H/Hkv
// query heads are G rows of one GEMM:
//   scores[G, p+1] = q_g k_g^T / sqrt(hd);  softmax per row;  out_g = P v_g
// with the softmax as ag_attention_forward computes it (max subtracted, the
// sum in double). GEMMs rather than an OpenMP loop: a decode step then runs
// on OpenBLAS's threads only (OpenMP threads spinning after a parallel
// region starve them: 4x slower decoding on 2 cores).
static void attend_one(float *out, const float *q, const float *k, const float *v, float *scores, int64_t p,
                       int64_t H, int64_t Hkv, int64_t hd) {
    const int64_t G = H / Hkv, L = p + 1, KV = Hkv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t g = 0; g < Hkv; g++) {
        ag_gemm(false, true, G, L, hd, scale, q + g * G * hd, hd, k + g * hd, KV, 0.0f, scores, L);
        for (int64_t h = 0; h < G; h++) {
            float *row = scores + h * L, mx = -INFINITY;
            for (int64_t j = 0; j < L; j++) mx = row[j] > mx ? row[j] : mx;
            double sum = 0;
            for (int64_t j = 0; j < L; j++) {
                row[j] = expf(row[j] - mx);
                sum += row[j];
            }
            const float inv = (float)(1.0 / sum);
            for (int64_t j = 0; j < L; j++) row[j] *= inv;
        }
        ag_gemm(false, false, G, hd, L, 1.0f, scores, L, v + g * hd, KV, 0.0f, out + g * G * hd, hd);
    }
}

// Runs ids[N] at positions s->n .. s->n+N-1 (N > 1 only for the prefill, at
// position 0), appends their keys and values to the cache and leaves the
// logits of the last one in s->logits, or of all N in all_logits[N,V] when
// that is not NULL.
static int forward(gen_state *s, const int32_t *ids, int64_t N, float *all_logits, q_err *err) {
    const model *m = s->m;
    const model_config *c = &m->cfg;
    const int64_t D = c->hidden, F = c->intermediate, H = c->n_heads, Hkv = c->n_kv_heads, hd = c->head_dim;
    const int64_t KV = Hkv * hd, p0 = s->n;
    for (int64_t i = 0; i < N; i++) s->pos[i] = (int32_t)(p0 + i), s->start[i] = 0;

    ag_embedding_forward(s->x, ids, m->embed, N, D);
    for (int64_t li = 0; li < c->n_layers; li++) {
        const model_layer *L = &m->layers[li];
        float *kc = s->kc + li * s->cap * KV, *vc = s->vc + li * s->cap * KV;
        // x = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1))), n1 = rmsnorm(x)
        ag_rmsnorm_forward(s->h, NULL, s->x, L->attn_norm, N, D, c->rms_eps);
        if (linear(s, li, LIN_Q, s->h, s->q, N, err) || linear(s, li, LIN_K, s->h, kc + p0 * KV, N, err) ||
            linear(s, li, LIN_V, s->h, vc + p0 * KV, N, err))
            return -1;
        ag_rope_forward(s->q, s->q, s->pos, m->inv_freq, N, H, hd);
        ag_rope_forward(kc + p0 * KV, kc + p0 * KV, s->pos, m->inv_freq, N, Hkv, hd);
        if (p0 == 0)
            ag_attention_forward(s->att, s->lse, s->q, kc, vc, s->start, N, H, Hkv, hd);
        else  // N == 1
            attend_one(s->att, s->q, kc, vc, s->scores, p0, H, Hkv, hd);
        if (linear(s, li, LIN_O, s->att, s->y, N, err)) return -1;
        for (int64_t i = 0; i < N * D; i++) s->x[i] += s->y[i];
        // x = x + down(silu(gate(n2)) * up(n2)), n2 = rmsnorm(x)
        ag_rmsnorm_forward(s->h, NULL, s->x, L->mlp_norm, N, D, c->rms_eps);
        if (linear(s, li, LIN_GATE, s->h, s->gate, N, err) || linear(s, li, LIN_UP, s->h, s->up, N, err)) return -1;
        ag_swiglu_forward(s->gate, s->gate, s->up, N * F);
        if (linear(s, li, LIN_DOWN, s->gate, s->y, N, err)) return -1;
        for (int64_t i = 0; i < N * D; i++) s->x[i] += s->y[i];
    }
    s->n += N;
    // logits = rmsnorm(x) lm_head^T, of the last row unless all are wanted
    const int64_t n_out = all_logits ? N : 1;
    ag_rmsnorm_forward(s->h, NULL, s->x + (N - n_out) * D, m->final_norm, n_out, D, c->rms_eps);
    ag_gemm(false, true, n_out, c->vocab, D, 1.0f, s->h, D, m->lm_head, D, 0.0f, all_logits ? all_logits : s->logits,
            c->vocab);
    return 0;
}

// ----------------------------------------------------------------------------
// sampling

typedef struct ranked {
    float logit;
    int32_t id;
} ranked;

static int by_logit_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);  // ties: the lower id first, as greedy
}

typedef struct sampler {
    gen_opts o;
    int64_t V;
    ranked *order;  // [V] top-p: ids by logit, descending
    double *e;      // [V] exp((logit - max) / T)
} sampler;

// The next token from logits[V]. Temperature 0: the argmax. Otherwise the
// probabilities softmax(logits / T) are cut to the nucleus (the fewest most
// likely tokens whose probability reaches top_p; all of them, in id order,
// when top_p = 1) and u = ag_rng_uniform(seed, step) picks the first token
// whose cumulative share of the kept mass passes u.
static int sample(sampler *sp, const float *logits, uint64_t step, int32_t *id, q_err *err) {
    const int64_t V = sp->V;
    int64_t best = 0;
    for (int64_t i = 0; i < V; i++) {
        if (!isfinite(logits[i]))
            return q_err_set(err, "generate: logit %lld at step %llu is not finite (%g)", (long long)i,
                             (unsigned long long)step, logits[i]);
        if (logits[i] > logits[best]) best = i;
    }
    if (sp->o.temperature <= 0.0f) {
        *id = (int32_t)best;
        return 0;
    }
    // (logit - max) / T <= 0: no overflow however small T is
    const float mx = logits[best], T = sp->o.temperature;
    double total = 0;
    for (int64_t i = 0; i < V; i++) total += sp->e[i] = exp((double)((logits[i] - mx) / T));
    int64_t n = V;  // candidates, in walking order
    if (sp->o.top_p < 1.0f) {
        // The tokens with e >= thr lead the descending order; once their mass
        // reaches top_p the nucleus is among them, and only they are sorted.
        const double want = (double)sp->o.top_p * total;
        double thr = 1e-1;
        for (double above = 0; thr > 0; thr = thr > 1e-30 ? thr * 1e-3 : 0) {
            above = 0;
            for (int64_t i = 0; i < V; i++) above += sp->e[i] >= thr ? sp->e[i] : 0;
            if (above >= want) break;
        }
        int64_t m = 0;
        for (int64_t i = 0; i < V; i++)
            if (sp->e[i] >= thr) sp->order[m++] = (ranked){logits[i], (int32_t)i};
        qsort(sp->order, (size_t)m, sizeof *sp->order, by_logit_desc);
        double kept = 0;
        n = 0;
        while (n < m && kept < want) kept += sp->e[sp->order[n++].id];
        total = kept;
    }
    const double target = (double)ag_rng_uniform(sp->o.seed, step) * total;
    double acc = 0;
    int64_t k = 0;
    for (; k < n - 1; k++) {  // the last candidate takes what rounding leaves
        acc += sp->e[sp->o.top_p < 1.0f ? sp->order[k].id : k];
        if (acc > target) break;
    }
    *id = sp->o.top_p < 1.0f ? sp->order[k].id : (int32_t)k;
    return 0;
}

// ----------------------------------------------------------------------------
// the generation loop

typedef enum gen_stop { GEN_STOP_MAX_NEW, GEN_STOP_ID, GEN_STOP_MAX_POSITION } gen_stop;

typedef struct gen_stats {
    double setup_s;    // allocation and weight dequantization
    double prefill_s;  // the prompt's forward and the first token
    double decode_s;   // every later token
    gen_stop stop;
} gen_stats;

// Called with each new id as soon as it is chosen; non-zero stops the run
// (the callback has filled err).
typedef int (*gen_token_fn)(int32_t id, void *ctx, q_err *err);

static int check_args(const model *m, const lora *l, const int32_t *prompt, int64_t n_prompt, const gen_opts *o,
                      q_err *err) {
    const model_config *c = &m->cfg;
    if (n_prompt <= 0) return q_err_set(err, "generate: the prompt is empty (at least one token is needed)");
    if (o->max_new_tokens < 0)
        return q_err_set(err, "generate: max_new_tokens must be >= 0, got %lld", (long long)o->max_new_tokens);
    if (!(o->temperature >= 0.0f) || !isfinite(o->temperature))
        return q_err_set(err, "generate: temperature must be a finite number >= 0, got %g", o->temperature);
    if (!(o->top_p > 0.0f && o->top_p <= 1.0f))
        return q_err_set(err, "generate: top_p must be in (0, 1], got %g", o->top_p);
    if (n_prompt > c->max_position)
        return q_err_set(err, "generate: the prompt has %lld tokens, more than the model's max_position_embeddings "
                         "(%lld)", (long long)n_prompt, (long long)c->max_position);
    if (l && l->n_layers != c->n_layers)
        return q_err_set(err, "generate: the adapter has %lld layers, the model %lld", (long long)l->n_layers,
                         (long long)c->n_layers);
    for (int64_t i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= c->vocab)
            return q_err_set(err, "generate: prompt token %lld (id %d) is outside the model's vocabulary (%lld)",
                             (long long)i, prompt[i], (long long)c->vocab);
    return 0;
}

// Prefill, then one decode step per token until stop_id, max_new_tokens or
// the last position the model has (new token i sits at n_prompt + i, which
// must stay below max_position).
static int gen_run(const model *m, const lora *l, const int32_t *prompt, int64_t n_prompt, const gen_opts *o,
                   gen_token_fn on_token, void *ctx, gen_stats *st, int32_t **out, int64_t *n_out, q_err *err) {
    memset(st, 0, sizeof *st);
    *out = NULL, *n_out = 0;
    if (check_args(m, l, prompt, n_prompt, o, err)) return -1;
    const int64_t room = m->cfg.max_position - n_prompt;
    const int64_t n_max = o->max_new_tokens < room ? o->max_new_tokens : room;
    st->stop = n_max < o->max_new_tokens ? GEN_STOP_MAX_POSITION : GEN_STOP_MAX_NEW;
    int32_t *ids = malloc((size_t)(n_max > 0 ? n_max : 1) * sizeof *ids);
    if (!ids) return q_err_set(err, "generate: out of memory");
    if (n_max == 0) {
        *out = ids;
        return 0;
    }
    const int64_t V = m->cfg.vocab;
    sampler sp = {.o = *o, .V = V, .order = malloc((size_t)V * sizeof(ranked)),
                  .e = malloc((size_t)V * sizeof(double))};
    gen_state s;
    double t0 = now_s();
    if (!sp.order || !sp.e) {
        free(ids), free(sp.order), free(sp.e);
        return q_err_set(err, "generate: out of memory");
    }
    if (state_init(&s, m, l, n_prompt, n_prompt + n_max, err)) {
        free(ids), free(sp.order), free(sp.e);
        return -1;
    }
    st->setup_s = now_s() - t0;

    t0 = now_s();
    int64_t n = 0;
    int rc = forward(&s, prompt, n_prompt, NULL, err);
    while (!rc) {
        int32_t next;
        if ((rc = sample(&sp, s.logits, (uint64_t)n, &next, err))) break;
        ids[n++] = next;
        if (n == 1) st->prefill_s = now_s() - t0, t0 = now_s();
        if (on_token && (rc = on_token(next, ctx, err))) break;
        if (next == o->stop_id) {
            st->stop = GEN_STOP_ID;
            break;
        }
        if (n == n_max) break;
        rc = forward(&s, &next, 1, NULL, err);
    }
    if (n > 1) st->decode_s = now_s() - t0;
    state_free(&s);
    free(sp.order), free(sp.e);
    if (rc) {
        free(ids);
        return -1;
    }
    *out = ids, *n_out = n;
    return 0;
}

int gen_generate(const model *m, const lora *l, const int32_t *prompt, int64_t n_prompt, const gen_opts *o,
                 int32_t **out, int64_t *n_out, q_err *err) {
    gen_stats st;
    return gen_run(m, l, prompt, n_prompt, o, NULL, NULL, &st, out, n_out, err);
}

// Logits [n, V] of ids[0..n) as generation computes them: ids[0..n_prefill)
// in one prefill pass, then one decode step per id, through the KV cache.
// For the tests, which hold every row to model_forward's.
int gen_forward_logits(const model *m, const lora *l, const int32_t *ids, int64_t n, int64_t n_prefill,
                       float *logits, q_err *err) {
    const gen_opts o = {.max_new_tokens = 0, .temperature = 0, .top_p = 1, .stop_id = -1};
    if (n_prefill < 1 || n_prefill > n)
        return q_err_set(err, "generate: n_prefill must be in [1, %lld], got %lld", (long long)n, (long long)n_prefill);
    if (check_args(m, l, ids, n, &o, err)) return -1;
    gen_state s;
    if (state_init(&s, m, l, n_prefill, n, err)) return -1;
    const int64_t V = m->cfg.vocab;
    int rc = forward(&s, ids, n_prefill, logits, err);
    for (int64_t i = n_prefill; i < n && !rc; i++) rc = forward(&s, &ids[i], 1, logits + i * V, err);
    state_free(&s);
    return rc;
}

// ----------------------------------------------------------------------------
// qlora generate

static int usage(void) {
    fprintf(stderr,
            "usage: qlora generate MODEL (--prompt TEXT | --prompt-file F) [options]\n"
            "Generates a reply with a KV cache and prints it as it comes; a summary goes to stderr.\n"
            "  MODEL                 HF safetensors folder (quantized to NF4 at load), bnb-4bit checkpoint or .gguf\n"
            "  --adapter DIR         PEFT adapter (adapter_config.json + adapter_model.safetensors)\n"
            "  --tokenizer FILE      tokenizer.json (default: MODEL/tokenizer.json, or the GGUF's own)\n"
            "  --template NAME       chatml | llama3 | alpaca | plain | none (raw text, special tokens allowed)\n"
            "                        default: chatml if the tokenizer has <|im_start|>, llama3 if it has\n"
            "                        <|start_header_id|>, else plain\n"
            "  --system TEXT         system message (chatml, llama3)\n"
            "  --max-new-tokens N    default 128\n"
            "  --temperature T       0 = greedy (default)\n"
            "  --top-p P             nucleus sampling, in (0, 1]; 1 = off (default)\n"
            "  --seed S              sampling seed (default 0): same seed, same text\n"
            "  --blocksize B         NF4 block size when quantizing at load (default 64)\n"
            "Generation stops at the template's end-of-turn token (<|im_end|>, <|eot_id|>) or EOS, which is not\n"
            "printed. QLORA_GEN_WEIGHT_CACHE_MB (default 1024) caps the fp32 copy of the base weights kept for\n"
            "decoding; larger models are dequantized at every step.\n");
    return 2;
}

static bool parse_i64(const char *s, int64_t lo, int64_t *v) {
    char *end;
    errno = 0;
    const long long x = strtoll(s, &end, 10);
    if (!*s || *end || errno || x < lo) return false;
    *v = x;
    return true;
}

static bool parse_u64(const char *s, uint64_t *v) {
    char *end;
    errno = 0;
    const unsigned long long x = strtoull(s, &end, 10);
    if (!*s || *end || errno || s[0] == '-') return false;
    *v = x;
    return true;
}

static bool parse_float(const char *s, float lo, float hi, float *v) {
    char *end;
    errno = 0;
    const double x = strtod(s, &end);
    if (!*s || *end || errno || !(x >= lo && x <= hi)) return false;
    *v = (float)x;
    return true;
}

// Prints the decoded text of the new tokens as it grows: each token, the
// whole sequence is decoded again (a token may end inside a UTF-8 character,
// and byte-level BPE only makes sense over the whole) and the part not yet
// printed is written. A trailing U+FFFD is held back until the next token
// can complete it.
//
// Ids the tokenizer does not have (a model's vocabulary may be padded past
// the tokenizer's, as Qwen2's is) are skipped, as HF's decode skips them,
// and counted.
typedef struct stream {
    const tok_tokenizer *tok;
    int32_t stop_id;
    int32_t *ids;       // [n] printed tokens (the stop id is not)
    int64_t n, cap;
    int64_t n_unknown;  // ids skipped
    size_t printed;     // bytes of the decoded text already written
} stream;

static int stream_flush(stream *s, bool final, q_err *err) {
    char *text;
    size_t len;
    if (tok_decode(s->tok, s->ids, s->n, &text, &len, err)) return -1;
    size_t end = len;
    while (!final && end >= s->printed + 3 && memcmp(text + end - 3, "\xEF\xBF\xBD", 3) == 0) end -= 3;
    if (end > s->printed) {
        fwrite(text + s->printed, 1, end - s->printed, stdout);
        fflush(stdout);
        s->printed = end;
    }
    free(text);
    return 0;
}

static int stream_token(int32_t id, void *p, q_err *err) {
    stream *s = p;
    if (id == s->stop_id) return 0;
    if (id < 0 || id >= tok_vocab_size(s->tok)) {
        s->n_unknown++;
        return 0;
    }
    if (s->n == s->cap) {
        const int64_t cap = s->cap ? 2 * s->cap : 256;
        int32_t *ids = realloc(s->ids, (size_t)cap * sizeof *ids);
        if (!ids) return q_err_set(err, "out of memory");
        s->ids = ids, s->cap = cap;
    }
    s->ids[s->n++] = id;
    return stream_flush(s, false, err);
}

// The tokenizer: --tokenizer, else MODEL/tokenizer.json for a folder, else
// the GGUF file's own (g stays open: the tokenizer may point into it).
static int load_tokenizer(tok_tokenizer **t, const char *path, const char *model_path, q_gguf *g, bool *g_open,
                          q_err *err) {
    if (!q_path_exists(model_path)) return q_err_set(err, "%s: no such model file or folder", model_path);
    if (path) return tok_load_json(t, path, err);
    const size_t len = strlen(model_path);
    if (len > 5 && strcmp(model_path + len - 5, ".gguf") == 0) {
        if (q_gguf_open(g, model_path, err)) return -1;
        *g_open = true;
        return tok_load_gguf(t, g, err);
    }
    char json[4096];
    snprintf(json, sizeof json, "%s/tokenizer.json", model_path);
    if (access(json, R_OK) != 0)
        return q_err_set(err, "%s: no tokenizer.json beside the model (pass --tokenizer FILE)", model_path);
    return tok_load_json(t, json, err);
}

// Formats the prompt with the template (auto-detected when name is NULL)
// and picks the id that ends the reply.
static int encode_prompt(const tok_tokenizer *t, const char **name, const char *system, const char *text,
                         int32_t **ids, int64_t *n, int32_t *stop_id, q_err *err) {
    if (!*name)
        *name = tok_token_id(t, "<|im_start|>") >= 0          ? "chatml"
                : tok_token_id(t, "<|start_header_id|>") >= 0 ? "llama3"
                                                              : "plain";
    *stop_id = tok_eos_id(t);
    if (strcmp(*name, "none") == 0) {
        // raw text, as tokenizer(text) would: BOS first when the model expects it
        int32_t *raw;
        int64_t n_raw;
        if (tok_encode(t, text, strlen(text), true, &raw, &n_raw, err)) return -1;
        const bool bos = tok_adds_bos(t) && tok_bos_id(t) >= 0;
        *ids = malloc((size_t)(n_raw + 1) * sizeof **ids);
        if (!*ids) {
            free(raw);
            return q_err_set(err, "out of memory");
        }
        if (bos) (*ids)[0] = tok_bos_id(t);
        if (n_raw) memcpy(*ids + bos, raw, (size_t)n_raw * sizeof *raw);
        *n = n_raw + bos;
        free(raw);
        return 0;
    }
    data_template tmpl;
    if (data_template_from_name(*name, &tmpl, err)) return q_err_wrap(err, "--template");
    const char *eot = tmpl == DATA_TEMPLATE_CHATML ? "<|im_end|>" : tmpl == DATA_TEMPLATE_LLAMA3 ? "<|eot_id|>" : NULL;
    if (eot && tok_token_id(t, eot) >= 0) *stop_id = tok_token_id(t, eot);
    return data_prompt_encode(t, tmpl, system, text, ids, n, err);
}

int cmd_generate(int argc, char **argv) {
    const char *model_path = NULL, *prompt = NULL, *prompt_file = NULL, *adapter = NULL, *tok_path = NULL;
    const char *tmpl = NULL, *system = NULL;
    int64_t blocksize = NF4_DEFAULT_BLOCKSIZE;
    gen_opts o = {.max_new_tokens = 128, .temperature = 0, .top_p = 1, .seed = 0, .stop_id = -1};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return usage(), 0;
        if (a[0] != '-') {
            if (model_path) {
                fprintf(stderr, "error: qlora generate: more than one MODEL ('%s', '%s')\n", model_path, a);
                return usage();
            }
            model_path = a;
            continue;
        }
        if (!v) {
            fprintf(stderr, "error: qlora generate: %s needs a value\n", a);
            return usage();
        }
        i++;
        if (strcmp(a, "--prompt") == 0) prompt = v;
        else if (strcmp(a, "--prompt-file") == 0) prompt_file = v;
        else if (strcmp(a, "--adapter") == 0) adapter = v;
        else if (strcmp(a, "--tokenizer") == 0) tok_path = v;
        else if (strcmp(a, "--template") == 0) {
            data_template t;
            tmpl = v;
            ok = strcmp(v, "none") == 0 || data_template_from_name(v, &t, NULL) == 0;
        }
        else if (strcmp(a, "--system") == 0) system = v;
        else if (strcmp(a, "--max-new-tokens") == 0) ok = parse_i64(v, 0, &o.max_new_tokens);
        else if (strcmp(a, "--temperature") == 0) ok = parse_float(v, 0.0f, 1e6f, &o.temperature);
        else if (strcmp(a, "--top-p") == 0) ok = parse_float(v, 1e-30f, 1.0f, &o.top_p);
        else if (strcmp(a, "--seed") == 0) ok = parse_u64(v, &o.seed);
        else if (strcmp(a, "--blocksize") == 0) ok = parse_i64(v, 1, &blocksize);
        else {
            fprintf(stderr, "error: qlora generate: unknown option '%s'\n", a);
            return usage();
        }
        if (!ok) {
            fprintf(stderr, "error: qlora generate: bad value for %s: '%s'\n", a, v);
            return usage();
        }
    }
    if (!model_path || !prompt == !prompt_file) {
        fprintf(stderr, "error: qlora generate: %s\n",
                !model_path ? "MODEL is missing" : "give exactly one of --prompt and --prompt-file");
        return usage();
    }

    q_err err;
    model m;
    lora l;
    tok_tokenizer *tok = NULL;
    q_gguf g;
    bool g_open = false, have_lora = false;
    char *file_text = NULL;
    int32_t *ids = NULL, *out = NULL;
    int64_t n_ids = 0, n_out = 0;
    stream st = {0};
    int status = 1;
    memset(&m, 0, sizeof m);

    double t0 = now_s();
    if (prompt_file) {
        size_t len;
        if (q_file_read(prompt_file, &file_text, &len, &err)) goto done;
        if (len && file_text[len - 1] == '\n') file_text[--len] = 0;  // the file's final newline is not the prompt's
        if (len && file_text[len - 1] == '\r') file_text[--len] = 0;
        prompt = file_text;
    }
    if (load_tokenizer(&tok, tok_path, model_path, &g, &g_open, &err)) goto done;
    if (encode_prompt(tok, &tmpl, system, prompt, &ids, &n_ids, &o.stop_id, &err)) goto done;
    if (model_load(&m, model_path, blocksize, &err)) goto done;
    if (adapter) {
        if (lora_load_peft(&l, &m, adapter, &err)) goto done;
        have_lora = true;
    }
    const double t_load = now_s() - t0;
    for (int64_t i = 0; i < n_ids; i++)
        if (ids[i] >= m.cfg.vocab) {
            q_err_set(&err, "the prompt has token id %d, past the model's vocabulary (%lld): is the tokenizer "
                      "(%lld tokens) the model's own?", ids[i], (long long)m.cfg.vocab, (long long)tok_vocab_size(tok));
            goto done;
        }

    st = (stream){.tok = tok, .stop_id = o.stop_id};
    gen_stats gs;
    if (gen_run(&m, have_lora ? &l : NULL, ids, n_ids, &o, stream_token, &st, &gs, &out, &n_out, &err)) {
        if (st.printed) fputc('\n', stdout);
        goto done;
    }
    if (stream_flush(&st, true, &err)) goto done;
    fputc('\n', stdout);
    fflush(stdout);

    char why[160];
    if (gs.stop == GEN_STOP_ID) snprintf(why, sizeof why, "the stop token (%d)", o.stop_id);
    else if (gs.stop == GEN_STOP_MAX_POSITION)
        snprintf(why, sizeof why, "max_position_embeddings (%lld)", (long long)m.cfg.max_position);
    else snprintf(why, sizeof why, "--max-new-tokens (%lld)", (long long)o.max_new_tokens);
    fprintf(stderr,
            "prompt %lld tokens (template %s), generated %lld tokens, stopped by %s; prefill %.1f tokens/s, "
            "decode %.1f tokens/s; load %.2f s, weights %.2f s\n",
            (long long)n_ids, tmpl, (long long)n_out, why, gs.prefill_s > 0 ? (double)n_ids / gs.prefill_s : 0.0,
            gs.decode_s > 0 ? (double)(n_out - 1) / gs.decode_s : 0.0, t_load, gs.setup_s);
    if (st.n_unknown)
        fprintf(stderr, "note: %lld generated ids are past the tokenizer's vocabulary (%lld) and were not printed\n",
                (long long)st.n_unknown, (long long)tok_vocab_size(tok));
    status = 0;
done:
    if (status) fprintf(stderr, "error: %s\n", err.msg);
    free(out), free(ids), free(st.ids), free(file_text);
    if (have_lora) lora_free(&l);
    model_free(&m);
    if (tok) tok_free(tok);
    if (g_open) q_gguf_close(&g);
    return status;
}
