// tests/test_generate.c: generation with a KV cache (gen_generate) and the
// `qlora generate` command, on the golden models of tests/fixtures/models.
//
// Three references:
//   - model_forward, itself held to PyTorch + PEFT within 1e-6 by test_model:
//     the KV-cached logits (gen_forward_logits) must equal its logits at every
//     position of prompt + continuation within 1e-5 (relative, per row);
//     greedy tokens must be its argmax; sampled tokens must be what an
//     independent implementation of the documented rule (softmax(logits / T),
//     top-p nucleus, u = ag_rng_uniform(seed, step)) draws from its logits,
//     except where a draw falls within rounding of a boundary;
//   - transformers' generate(do_sample=False) with its own KV cache
//     (tests/fixtures/generate/hf_greedy.json, by
//     scripts/fixtures/make_generate_fixtures.py): the same 20 ids;
//   - hand-computed cases: all-equal logits (ties, uniform draws), a byte
//     tokenizer whose ids are the bytes of the text.
#define _GNU_SOURCE
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

#include "test_util.h"
#include "train/train.h"

// train/generate.c: logits [n, V] of ids through the KV-cached path (prefill
// of n_prefill ids, then one decode step each). Declared here until train.h's
// generation section declares it.
int gen_forward_logits(const model *m, const lora *l, const int32_t *ids, int64_t n, int64_t n_prefill,
                       float *logits, q_err *err);

#define N_STEPS 20
// relative to the largest |logit| of the row: ~10x the 1e-6 the two fp32
// paths differ by
#define LOGIT_TOL 1e-5

static const char *model_path(const char *name, const char *sub) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/models/%s%s%s", test_fixture(""), name, sub ? "/" : "", sub ? sub : "");
    return path;
}

static void load(model *m, lora *l, const char *name, bool adapter) {
    q_err err;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", model_path(name, NULL));
    TEST_OK(model_load(m, dir, 64, &err), &err);
    if (adapter) TEST_OK(lora_load_peft(l, m, model_path(name, "adapter"), &err), &err);
}

// A prompt of n ids from a seeded generator (the fixtures' vocabularies are
// random bytes anyway).
static void make_prompt(int32_t *ids, int64_t n, int64_t vocab, uint64_t seed) {
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(ag_rng_hash(seed, (uint64_t)i) % (uint64_t)vocab);
}

// model_forward's logits [T, V] of ids[T] as one document.
static float *forward_logits(const model *m, const lora *l, const int32_t *ids32, int64_t T) {
    const int64_t V = m->cfg.vocab;
    int64_t *ids = malloc((size_t)T * sizeof *ids);
    for (int64_t i = 0; i < T; i++) ids[i] = ids32[i];
    model_batch b;
    q_err err;
    TEST_OK(model_batch_init(&b, 1, T, ids, NULL, NULL, V, &err), &err);
    float *logits = malloc((size_t)(T * V) * sizeof *logits);
    model_step_result r;
    TEST_OK(model_forward(m, l, &b, logits, &r, &err), &err);
    model_batch_free(&b);
    free(ids);
    return logits;
}

static float row_absmax(const float *x, int64_t V) {
    float a = 0;
    for (int64_t i = 0; i < V; i++) a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
    return a;
}

// The documented sampling rule, written independently of generate.c: the
// candidate set (all ids in id order, or the top-p nucleus by descending
// logit, ties by id), p_i = exp((l_i - max) / T), the first candidate whose
// running sum passes u * sum. Returns -1 when u * sum is within the logit
// rounding of a boundary (either neighbour would be right).
static int64_t reference_sample(const float *logits, int64_t V, float temperature, float top_p, float u) {
    int64_t *cand = malloc((size_t)V * sizeof *cand);
    double *p = malloc((size_t)V * sizeof *p);
    float mx = logits[0];
    for (int64_t i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double total = 0;
    for (int64_t i = 0; i < V; i++) total += p[i] = exp(((double)logits[i] - mx) / temperature), cand[i] = i;
    int64_t n = V;
    if (top_p < 1.0f) {  // insertion sort: V is a few hundred
        for (int64_t i = 1; i < V; i++)
            for (int64_t j = i; j > 0; j--) {
                const int64_t a = cand[j - 1], b = cand[j];
                if (logits[b] > logits[a] || (logits[b] == logits[a] && b < a)) cand[j - 1] = b, cand[j] = a;
                else break;
            }
        double kept = 0;
        for (n = 0; n < V && kept < top_p * total;) kept += p[cand[n++]];
        total = kept;
    }
    // logits off by ~1e-6 relative move the boundaries by ~1e-5 of the mass at most
    const double target = u * total, slack = 2e-5 * total;
    double acc = 0;
    int64_t pick = -1;
    for (int64_t k = 0; k < n && pick < 0; k++) {
        acc += p[cand[k]];
        if (fabs(acc - target) < slack) break;  // ambiguous: -1
        if (acc > target || k == n - 1) pick = cand[k];
    }
    free(cand), free(p);
    return pick;
}

// Generates N_STEPS tokens and checks each against model_forward's logits.
// Returns the number of steps that were held to an exact choice.
static int check_against_forward(const model *m, const lora *l, int64_t n_prompt, const gen_opts *o, uint64_t pseed,
                                 double *min_margin) {
    const int64_t V = m->cfg.vocab;
    int32_t seq[64 + N_STEPS], *gen;
    make_prompt(seq, n_prompt, V, pseed);
    int64_t n_gen;
    q_err err;
    TEST_OK(gen_generate(m, l, seq, n_prompt, o, &gen, &n_gen, &err), &err);
    CU_ASSERT_EQUAL_FATAL(n_gen, N_STEPS);
    memcpy(seq + n_prompt, gen, N_STEPS * sizeof *gen);
    // row t predicts token t+1: the last generated token is predicted by row T-2
    float *logits = forward_logits(m, l, seq, n_prompt + N_STEPS - 1);
    int exact = 0;
    for (int64_t i = 0; i < n_gen; i++) {
        const float *row = logits + (n_prompt - 1 + i) * V;
        const float tol = (float)LOGIT_TOL * row_absmax(row, V);
        if (o->temperature == 0.0f) {
            int64_t best = 0, second = -1;
            for (int64_t v = 1; v < V; v++)
                if (row[v] > row[best]) second = best, best = v;
                else if (second < 0 || row[v] > row[second]) second = v;
            const double margin = (row[best] - row[second]) / row_absmax(row, V);
            if (margin < *min_margin) *min_margin = margin;
            CU_ASSERT(row[gen[i]] >= row[best] - tol);  // the argmax, or within rounding of it
            exact += gen[i] == best;
        } else {
            const int64_t want = reference_sample(row, V, o->temperature, o->top_p, ag_rng_uniform(o->seed, i));
            if (want >= 0) {
                CU_ASSERT_EQUAL(gen[i], want);
                exact++;
            }
        }
    }
    free(logits);
    free(gen);
    return exact;
}

// ----------------------------------------------------------------------------
// the cached forward against model_forward

// Every position of prompt + greedy continuation: the KV-cached logits
// (prefill of the prompt, or of the first token only, then decode steps)
// against model_forward's, each row within LOGITS_RTOL.
#define LOGITS_RTOL 1e-5
static void logits_vs_forward(const char *name) {
    for (int a = 0; a < 2; a++) {
        model m;
        lora l;
        load(&m, &l, name, a);
        const lora *lp = a ? &l : NULL;
        const int64_t V = m.cfg.vocab, n_prompt = 7;
        int32_t ids[7 + N_STEPS], *gen;
        int64_t n_gen;
        q_err err;
        make_prompt(ids, n_prompt, V, 200);
        const gen_opts o = {.max_new_tokens = N_STEPS, .temperature = 0, .top_p = 1, .seed = 0, .stop_id = -1};
        TEST_OK(gen_generate(&m, lp, ids, n_prompt, &o, &gen, &n_gen, &err), &err);
        CU_ASSERT_EQUAL_FATAL(n_gen, N_STEPS);
        memcpy(ids + n_prompt, gen, N_STEPS * sizeof *gen);
        const int64_t T = n_prompt + N_STEPS;
        float *ref = forward_logits(&m, lp, ids, T);
        float *got = malloc((size_t)(T * V) * sizeof *got);
        double worst[2] = {0, 0};
        const int64_t prefills[2] = {n_prompt, 1};
        for (int k = 0; k < 2; k++) {
            TEST_OK(gen_forward_logits(&m, lp, ids, T, prefills[k], got, &err), &err);
            for (int64_t t = 0; t < T; t++) {
                const double e = test_rel_err(got + t * V, ref + t * V, V);
                CU_ASSERT(e <= LOGITS_RTOL);
                worst[k] = e > worst[k] || isnan(e) ? e : worst[k];
            }
        }
        printf("\n    %s%s: %lld positions, worst row rel err %.1e (prefill %lld + decode), %.1e (all decode) ", name,
               a ? " + adapter" : "", (long long)T, worst[0], (long long)n_prompt, worst[1]);
        free(ref), free(got), free(gen);
        if (a) lora_free(&l);
        model_free(&m);
    }
}

static void test_logits_llama_gqa(void) { logits_vs_forward("llama_gqa"); }
static void test_logits_qwen2_bias(void) { logits_vs_forward("qwen2_bias"); }
static void test_logits_llama_tied(void) { logits_vs_forward("llama_tied"); }

static void greedy_vs_forward(const char *name) {
    for (int a = 0; a < 2; a++) {
        model m;
        lora l;
        load(&m, &l, name, a);
        gen_opts o = {.max_new_tokens = N_STEPS, .temperature = 0, .top_p = 1, .seed = 0, .stop_id = -1};
        double min_margin = INFINITY;
        int exact = 0, total = 0;
        // prompts of 1 token (prefill = one row), 7 and 16
        const int64_t lens[] = {1, 7, 16};
        for (int k = 0; k < 3; k++, total += N_STEPS)
            exact += check_against_forward(&m, a ? &l : NULL, lens[k], &o, 100 + (uint64_t)k, &min_margin);
        CU_ASSERT(exact >= total - 1);  // a near-tie may go either way, not more than one
        printf("\n    %s%s: greedy = argmax of model_forward at %d/%d steps (smallest top-2 gap %.1e) ", name,
               a ? " + adapter" : "", exact, total, min_margin);
        if (a) lora_free(&l);
        model_free(&m);
    }
}

static void test_greedy_llama_gqa(void) { greedy_vs_forward("llama_gqa"); }
static void test_greedy_qwen2_bias(void) { greedy_vs_forward("qwen2_bias"); }
static void test_greedy_llama_tied(void) { greedy_vs_forward("llama_tied"); }

static void test_sampling_vs_forward(void) {
    model m;
    lora l;
    load(&m, &l, "llama_gqa", true);
    const struct {
        float t, p;
    } cases[] = {{1.0f, 1.0f}, {0.7f, 0.9f}, {1.5f, 0.5f}};
    for (int c = 0; c < 3; c++) {
        gen_opts o = {.max_new_tokens = N_STEPS, .temperature = cases[c].t, .top_p = cases[c].p, .seed = 7 + c,
                      .stop_id = -1};
        double unused = INFINITY;
        const int exact = check_against_forward(&m, &l, 9, &o, 300 + (uint64_t)c, &unused);
        CU_ASSERT(exact >= N_STEPS - 3);  // the rest fell within rounding of a boundary
        printf("\n    T=%.1f top_p=%.1f: %d/%d draws as the reference sampler ", cases[c].t, cases[c].p, exact,
               N_STEPS);
    }
    lora_free(&l);
    model_free(&m);
}

// transformers' generate(do_sample=False) with its own KV cache, on the same
// checkpoints and adapters (tests/fixtures/generate/hf_greedy.json, made by
// scripts/fixtures/make_generate_fixtures.py; every step's top-2 gap is
// >= 1e-4, so the ids do not depend on rounding).
static void test_hf_greedy(void) {
    char *text;
    size_t len;
    q_err err;
    q_json *j;
    TEST_OK(q_file_read(test_fixture("generate/hf_greedy.json"), &text, &len, &err), &err);
    TEST_OK(q_json_parse(text, len, &j, &err), &err);
    const q_json *cases = q_json_get(j, "cases");
    CU_ASSERT_PTR_NOT_NULL_FATAL(cases);
    int matched = 0;
    for (size_t c = 0; c < cases->count; c++) {
        const q_json *k = &cases->items[c];
        const q_json *p = q_json_get(k, "prompt"), *g = q_json_get(k, "generated");
        const bool adapter = q_json_get(k, "adapter")->boolean;
        model m;
        lora l;
        load(&m, &l, q_json_get(k, "model")->string, adapter);
        int32_t prompt[64], *gen;
        int64_t n_gen;
        CU_ASSERT_FATAL(p->count <= 64);
        for (size_t i = 0; i < p->count; i++) prompt[i] = (int32_t)p->items[i].integer;
        const gen_opts o = {.max_new_tokens = (int64_t)g->count, .temperature = 0, .top_p = 1, .stop_id = -1};
        TEST_OK(gen_generate(&m, adapter ? &l : NULL, prompt, (int64_t)p->count, &o, &gen, &n_gen, &err), &err);
        CU_ASSERT_EQUAL_FATAL(n_gen, (int64_t)g->count);
        bool same = true;
        for (size_t i = 0; i < g->count; i++) same &= gen[i] == g->items[i].integer;
        CU_ASSERT(same);
        matched += same;
        free(gen);
        if (adapter) lora_free(&l);
        model_free(&m);
    }
    CU_ASSERT_EQUAL(cases->count, 12);
    printf("\n    %d/%zu cases (3 models, with and without adapter, prompts of 7 and 1 tokens, 20 steps) ", matched,
           cases->count);
    q_json_free(j);
    free(text);
}

// The fp32 weight cache and the dequantize-per-step workspace give the same tokens.
static void test_uncached_weights(void) {
    model m;
    lora l;
    load(&m, &l, "qwen2_bias", true);
    int32_t prompt[8];
    make_prompt(prompt, 8, m.cfg.vocab, 5);
    gen_opts o = {.max_new_tokens = N_STEPS, .temperature = 0.8f, .top_p = 0.95f, .seed = 3, .stop_id = -1};
    int32_t *a, *b;
    int64_t na, nb;
    q_err err;
    TEST_OK(gen_generate(&m, &l, prompt, 8, &o, &a, &na, &err), &err);
    setenv("QLORA_GEN_WEIGHT_CACHE_MB", "0", 1);
    TEST_OK(gen_generate(&m, &l, prompt, 8, &o, &b, &nb, &err), &err);
    unsetenv("QLORA_GEN_WEIGHT_CACHE_MB");
    CU_ASSERT_EQUAL_FATAL(na, nb);
    CU_ASSERT(memcmp(a, b, (size_t)na * sizeof *a) == 0);
    free(a), free(b);
    lora_free(&l);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// sampling

static int64_t gen(const model *m, const lora *l, const int32_t *prompt, int64_t n, gen_opts o, int32_t **out) {
    int64_t n_out;
    q_err err;
    TEST_OK(gen_generate(m, l, prompt, n, &o, out, &n_out, &err), &err);
    return n_out;
}

static void test_determinism(void) {
    model m;
    lora l;
    load(&m, &l, "llama_gqa", true);
    int32_t prompt[5];
    make_prompt(prompt, 5, m.cfg.vocab, 11);
    const gen_opts t1 = {.max_new_tokens = N_STEPS, .temperature = 1.0f, .top_p = 1.0f, .seed = 42, .stop_id = -1};
    int32_t *a, *b, *c, *greedy, *tiny;
    CU_ASSERT_EQUAL_FATAL(gen(&m, &l, prompt, 5, t1, &a), N_STEPS);
    CU_ASSERT_EQUAL_FATAL(gen(&m, &l, prompt, 5, t1, &b), N_STEPS);
    CU_ASSERT(memcmp(a, b, N_STEPS * sizeof *a) == 0);  // same seed, same tokens
    gen_opts t2 = t1;
    t2.seed = 43;
    CU_ASSERT_EQUAL_FATAL(gen(&m, &l, prompt, 5, t2, &c), N_STEPS);
    int differ = 0, distinct = 0;
    for (int i = 0; i < N_STEPS; i++) differ += a[i] != c[i];
    CU_ASSERT(differ > 0);  // another seed, another sample
    // a nucleus of one token is greedy
    gen_opts g = t1, p = t1;
    g.temperature = 0;
    p.top_p = 1e-6f;
    CU_ASSERT_EQUAL_FATAL(gen(&m, &l, prompt, 5, g, &greedy), N_STEPS);
    CU_ASSERT_EQUAL_FATAL(gen(&m, &l, prompt, 5, p, &tiny), N_STEPS);
    CU_ASSERT(memcmp(greedy, tiny, N_STEPS * sizeof *a) == 0);
    for (int i = 0; i < N_STEPS; i++) {
        bool seen = false;
        for (int j = 0; j < i; j++) seen |= greedy[j] == greedy[i];
        distinct += !seen;
    }
    CU_ASSERT(distinct >= 3);  // not a degenerate model
    printf("\n    seeds 42/43 differ at %d/%d tokens; greedy has %d distinct ids ", differ, N_STEPS, distinct);
    free(a), free(b), free(c), free(greedy), free(tiny);
    lora_free(&l);
    model_free(&m);
}

// With lm_head zeroed every logit is exactly 0: greedy (and a one-token
// nucleus) must take the lowest id, and sampling is uniform, so the draw of
// step i is floor(ag_rng_uniform(seed, i) * V).
static void test_ties(void) {
    model m;
    load(&m, NULL, "llama_gqa", false);
    const int64_t V = m.cfg.vocab;
    memset(m.lm_head, 0, (size_t)(V * m.cfg.hidden) * sizeof(float));
    int32_t prompt[3] = {1, 2, 3}, *a, *b, *c;
    gen_opts o = {.max_new_tokens = N_STEPS, .temperature = 0, .top_p = 1, .seed = 9, .stop_id = -1};
    CU_ASSERT_EQUAL_FATAL(gen(&m, NULL, prompt, 3, o, &a), N_STEPS);
    o.temperature = 1.0f, o.top_p = 1e-6f;
    CU_ASSERT_EQUAL_FATAL(gen(&m, NULL, prompt, 3, o, &b), N_STEPS);
    o.top_p = 1.0f;
    CU_ASSERT_EQUAL_FATAL(gen(&m, NULL, prompt, 3, o, &c), N_STEPS);
    for (int i = 0; i < N_STEPS; i++) {
        CU_ASSERT_EQUAL(a[i], 0);
        CU_ASSERT_EQUAL(b[i], 0);
        CU_ASSERT_EQUAL(c[i], (int32_t)(ag_rng_uniform(9, (uint64_t)i) * (float)V));
    }
    free(a), free(b), free(c);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// stopping

static void test_stop_id(void) {
    model m;
    load(&m, NULL, "qwen2_bias", false);
    int32_t prompt[6], *all, *stopped;
    make_prompt(prompt, 6, m.cfg.vocab, 21);
    gen_opts o = {.max_new_tokens = N_STEPS, .temperature = 0, .top_p = 1, .seed = 0, .stop_id = -1};
    CU_ASSERT_EQUAL_FATAL(gen(&m, NULL, prompt, 6, o, &all), N_STEPS);
    o.stop_id = all[5];
    int64_t first = 0;
    while (all[first] != o.stop_id) first++;
    const int64_t n = gen(&m, NULL, prompt, 6, o, &stopped);
    CU_ASSERT_EQUAL(n, first + 1);  // the stop id is included, nothing after it
    CU_ASSERT(memcmp(all, stopped, (size_t)(first + 1) * sizeof *all) == 0);
    free(all), free(stopped);
    model_free(&m);
}

static void test_max_position(void) {
    model m;
    load(&m, NULL, "llama_tied", false);
    int32_t prompt[10], *all, *cut;
    make_prompt(prompt, 10, m.cfg.vocab, 31);
    gen_opts o = {.max_new_tokens = N_STEPS, .temperature = 0, .top_p = 1, .seed = 0, .stop_id = -1};
    CU_ASSERT_EQUAL_FATAL(gen(&m, NULL, prompt, 10, o, &all), N_STEPS);
    // room for 3 more tokens: positions 10, 11, 12
    m.cfg.max_position = 13;
    CU_ASSERT_EQUAL(gen(&m, NULL, prompt, 10, o, &cut), 3);
    CU_ASSERT(memcmp(all, cut, 3 * sizeof *all) == 0);
    free(cut);
    m.cfg.max_position = 10;  // a full prompt leaves no room: nothing, and no error
    CU_ASSERT_EQUAL(gen(&m, NULL, prompt, 10, o, &cut), 0);
    free(cut);
    m.cfg.max_position = 9;  // a prompt longer than the model can see is an error
    q_err err = {{0}};
    int64_t n = -1;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 10, &o, &cut, &n, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "max_position"));
    free(all);
    model_free(&m);
}

static void test_bad_input(void) {
    model m;
    load(&m, NULL, "llama_tied", false);
    int32_t prompt[4] = {1, 2, 3, 4}, *out = NULL;
    int64_t n;
    q_err err;
    const gen_opts ok = {.max_new_tokens = 4, .temperature = 0, .top_p = 1, .seed = 0, .stop_id = -1};
    gen_opts o = ok;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 0, &o, &out, &n, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "empty"));
    prompt[2] = 256;  // vocab is 256
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "vocabulary"));
    prompt[2] = -1;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), -1);
    prompt[2] = 3;
    o.top_p = 0;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "top_p"));
    o = ok, o.temperature = -1;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), -1);
    o.temperature = NAN;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "temperature"));
    o = ok, o.max_new_tokens = -1;
    CU_ASSERT_EQUAL(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), -1);
    o.max_new_tokens = 0;
    TEST_OK(gen_generate(&m, NULL, prompt, 4, &o, &out, &n, &err), &err);
    CU_ASSERT_EQUAL(n, 0);
    free(out);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// qlora generate

// Runs `QLORA_BIN ARGS`, returns the exit status; stdout and stderr are kept
// (malloc'd) when out/errs are not NULL.
static int run_cli(char **out, char **errs, const char *dir, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int run_cli(char **out, char **errs, const char *dir, const char *fmt, ...) {
    char args[8192], cmd[16384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' generate %s >'%s/out' 2>'%s/err'", getenv("QLORA_BIN"), args, dir, dir);
    const int st = system(cmd);
    char path[4200];
    size_t len;
    q_err err;
    snprintf(path, sizeof path, "%s/out", dir);
    if (out && q_file_read(path, out, &len, &err)) *out = strdup("");
    snprintf(path, sizeof path, "%s/err", dir);
    if (errs && q_file_read(path, errs, &len, &err)) *errs = strdup("");
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli_arguments(void) {
    if (!getenv("QLORA_BIN")) {
        printf("\n    QLORA_BIN not set (run through ctest): skipped ");
        return;
    }
    char *dir = test_tmpdir(), *errs;
    char model_dir[4096];
    snprintf(model_dir, sizeof model_dir, "%s", model_path("llama_gqa", NULL));
    // usage errors: exit 2
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "%s", ""), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s'", model_dir), 2);  // no prompt
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "--prompt hi"), 2);       // no model
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s' --prompt hi --prompt-file '%s/p.txt'", model_dir, dir), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s' --prompt", model_dir), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt hi --max-new-tokens 12x", model_dir), 2);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "--max-new-tokens"));
    free(errs);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s' --prompt hi --temperature -1", model_dir), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s' --prompt hi --top-p 0", model_dir), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s' --prompt hi --top-p 1.5", model_dir), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "'%s' --prompt hi --seed -3", model_dir), 2);
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt hi --temprature 1", model_dir), 2);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "--temprature"));
    free(errs);
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt hi --template chatlm", model_dir), 2);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "chatlm"));
    free(errs);
    CU_ASSERT_EQUAL(run_cli(NULL, NULL, dir, "--help"), 0);
    // run-time errors: exit 1 with one "error: " line naming the problem
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s/nope' --prompt hi", dir), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "error: "));
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "nope: no such model"));
    free(errs);
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt hi --tokenizer '%s/nope.json'", model_dir, dir), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "error: "));
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "nope.json"));
    free(errs);
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt hi", model_dir), 1);  // the fixture has no tokenizer
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "error: "));
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "--tokenizer"));
    free(errs);
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt-file '%s/missing.txt'", model_dir, dir), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "missing.txt"));
    free(errs);
    // SmolLM2's tokenizer gives "hello" an id past this model's 320
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --prompt hello --template none --tokenizer '%s'", model_dir,
                            test_fixture("tokenizers/smollm2/tokenizer.json")), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "the model's own?"));
    free(errs);
    test_rmtree(dir);
    free(dir);
}

// A byte-level BPE tokenizer.json with no merges, in the layout of
// SmolLM2's: byte b is token id_of_byte[b] (under GPT-2's bytes_to_unicode;
// the identity when NULL), <|endoftext|> (the EOS) is eos_id, then
// <|im_start|> 257, <|im_end|> 258. Its 259 ids fit the fixture models'
// vocabularies, so the command can run end to end on them.
static void write_byte_tokenizer(const char *path, const int *id_of_byte, int eos_id) {
    q_buf b = {0};
    q_buf_printf(&b, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": [");
    const char *const special[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    const int special_id[] = {eos_id, 257, 258};
    for (int i = 0; i < 3; i++)
        q_buf_printf(&b, "%s{\"id\": %d, \"content\": \"%s\", \"single_word\": false, \"lstrip\": false, "
                     "\"rstrip\": false, \"normalized\": false, \"special\": true}", i ? ", " : "", special_id[i],
                     special[i]);
    q_buf_printf(&b, "], \"normalizer\": null, "
                 "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, "
                 "\"use_regex\": true}, "
                 "\"post_processor\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": false, "
                 "\"use_regex\": true}, "
                 "\"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, "
                 "\"use_regex\": true}, "
                 "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
                 "\"continuing_subword_prefix\": \"\", \"end_of_word_suffix\": \"\", \"fuse_unk\": false, "
                 "\"byte_fallback\": false, \"ignore_merges\": false, \"vocab\": {");
    // bytes_to_unicode: printable Latin-1 bytes stand for themselves, the
    // rest for U+0100 onwards in byte order
    int next = 256;
    for (int c = 0; c < 256; c++) {
        const bool printable = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF);
        q_buf_printf(&b, "%s\"\\u%04x\": %d", c ? ", " : "", printable ? c : next++, id_of_byte ? id_of_byte[c] : c);
    }
    q_buf_printf(&b, "}, \"merges\": []}}\n");
    q_err err;
    TEST_OK(q_file_write_atomic(path, b.data, b.len, &err), &err);
    q_buf_free(&b);
}

// `qlora generate` end to end: the text it prints is the decoding of the
// ids gen_generate picks for the hand-tokenized prompt (tokens = bytes).
static void test_cli_run(void) {
    if (!getenv("QLORA_BIN")) {
        printf("\n    QLORA_BIN not set (run through ctest): skipped ");
        return;
    }
    char *dir = test_tmpdir(), *out, *errs, tok_path[4200], model_dir[4096];
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", dir);
    write_byte_tokenizer(tok_path, NULL, 256);
    snprintf(model_dir, sizeof model_dir, "%s", model_path("llama_gqa", NULL));
    q_err err;
    tok_tokenizer *tok;
    TEST_OK(tok_load_json(&tok, tok_path, &err), &err);
    model m;
    lora l;
    load(&m, &l, "llama_gqa", true);
    struct {
        const char *args;
        int32_t prompt[32];
        int64_t n;
        int32_t stop;
    } cases[] = {
        // raw text: one token per byte
        {"--template none --prompt 'hello'", {'h', 'e', 'l', 'l', 'o'}, 5, tok_eos_id(tok)},
        // <|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n, ended by <|im_end|>
        {"--template chatml --prompt 'hello' --temperature 0.9 --top-p 0.95 --seed 5",
         {257, 'u', 's', 'e', 'r', '\n', 'h', 'e', 'l', 'l', 'o', 258, '\n', 257, 'a', 's', 's', 'i', 's', 't', 'a',
          'n', 't', '\n'},
         24, 258},
    };
    const float temps[] = {0.0f, 0.9f}, top_ps[] = {1.0f, 0.95f};
    for (int c = 0; c < 2; c++) {
        CU_ASSERT_EQUAL(run_cli(&out, &errs, dir, "'%s' --adapter '%s/adapter' --tokenizer '%s' --max-new-tokens 24 %s",
                                model_dir, model_dir, tok_path, cases[c].args), 0);
        const gen_opts o = {.max_new_tokens = 24, .temperature = temps[c], .top_p = top_ps[c], .seed = c ? 5 : 0,
                            .stop_id = cases[c].stop};
        int32_t *gen;
        int64_t n_gen;
        TEST_OK(gen_generate(&m, &l, cases[c].prompt, cases[c].n, &o, &gen, &n_gen, &err), &err);
        // printed: every id but the stop token, skipping those the tokenizer lacks
        int64_t n_print = 0, n_skipped = 0;
        for (int64_t i = 0; i < n_gen; i++) {
            if (gen[i] == o.stop_id) continue;
            if (gen[i] < tok_vocab_size(tok)) gen[n_print++] = gen[i];
            else n_skipped++;
        }
        char *text;
        size_t len;
        TEST_OK(tok_decode(tok, gen, n_print, &text, &len, &err), &err);
        CU_ASSERT(strlen(out) == len + 1 && memcmp(out, text, len) == 0 && out[len] == '\n');
        char want[64];
        snprintf(want, sizeof want, "prompt %lld tokens", (long long)cases[c].n);
        CU_ASSERT_PTR_NOT_NULL(strstr(errs, want));
        CU_ASSERT_PTR_NOT_NULL(strstr(errs, "decode"));
        CU_ASSERT_EQUAL(strstr(errs, "note: ") != NULL, n_skipped > 0);
        errs[strcspn(errs, "\n")] = 0;
        printf("\n    %s: %zu bytes from %lld tokens (%lld past the tokenizer); stderr: %s ",
               c ? "chatml, sampled" : "raw, greedy", len, (long long)n_print, (long long)n_skipped, errs);
        free(text), free(gen), free(errs);
        if (c == 0) {  // the same prompt from a file (its final newline is not part of it)
            char *again, path[4200];
            snprintf(path, sizeof path, "%s/prompt.txt", dir);
            TEST_OK(q_file_write_atomic(path, "hello\n", 6, &err), &err);
            CU_ASSERT_EQUAL(run_cli(&again, NULL, dir,
                                    "'%s' --adapter '%s/adapter' --tokenizer '%s' --max-new-tokens 24 --template none "
                                    "--prompt-file '%s'", model_dir, model_dir, tok_path, path), 0);
            CU_ASSERT_STRING_EQUAL(again, out);
            free(again);
        }
        free(out);
    }
    // an empty prompt is an error, not a crash
    CU_ASSERT_EQUAL(run_cli(NULL, &errs, dir, "'%s' --tokenizer '%s' --template none --prompt ''", model_dir, tok_path),
                    1);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, "empty"));
    free(errs);
    tok_free(tok);
    lora_free(&l);
    model_free(&m);
    test_rmtree(dir);
    free(dir);
}

// Streaming across a split UTF-8 character, and stopping at EOS, through
// the command. The greedy ids for "hello" are known (gen_generate); a byte
// tokenizer is then laid out so that three consecutive of them are the bytes
// of U+20AC (E2 82 AC, the euro sign) and a later one is <|endoftext|>. The
// prompt's bytes keep their ids, so the command sees the same prompt and
// generates the same ids: it must print the euro sign whole, stop at the
// EOS, and not print it.
static void test_cli_stream_and_stop(void) {
    if (!getenv("QLORA_BIN")) {
        printf("\n    QLORA_BIN not set (run through ctest): skipped ");
        return;
    }
    model m;
    lora l;
    load(&m, &l, "llama_gqa", true);
    const int32_t prompt[5] = {'h', 'e', 'l', 'l', 'o'};
    const gen_opts o = {.max_new_tokens = 24, .temperature = 0, .top_p = 1, .stop_id = -1};
    int32_t *gen;
    int64_t n_gen;
    q_err err;
    TEST_OK(gen_generate(&m, &l, prompt, 5, &o, &gen, &n_gen, &err), &err);
    lora_free(&l);
    model_free(&m);
    // ids free to re-map: bytes, not the prompt's, not the euro's bytes, and
    // first seen at that step (so the stop happens there)
    const int euro[3] = {0xE2, 0x82, 0xAC};
    bool usable[24];
    for (int64_t i = 0; i < n_gen; i++) {
        usable[i] = gen[i] < 256 && !strchr("helo", gen[i]) && gen[i] != euro[0] && gen[i] != euro[1] &&
                    gen[i] != euro[2];
        for (int64_t j = 0; j < i; j++) usable[i] &= gen[j] != gen[i];
    }
    int64_t at = -1, stop = -1;
    for (int64_t i = 0; i + 3 < n_gen && at < 0; i++)
        if (usable[i] && usable[i + 1] && usable[i + 2])
            for (int64_t j = i + 3; j < n_gen && at < 0; j++)
                if (usable[j]) at = i, stop = j;
    CU_ASSERT_FATAL(at >= 0);  // the fixture's continuation has such ids (checked when written)

    int id_of_byte[256];
    for (int b = 0; b < 256; b++) id_of_byte[b] = b;
    for (int k = 0; k < 3; k++) id_of_byte[euro[k]] = gen[at + k], id_of_byte[gen[at + k]] = euro[k];
    id_of_byte[gen[stop]] = 256;  // <|endoftext|> takes its id
    char *dir = test_tmpdir(), *out, *errs, tok_path[4200], model_dir[4096], want[128];
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", dir);
    write_byte_tokenizer(tok_path, id_of_byte, gen[stop]);
    snprintf(model_dir, sizeof model_dir, "%s", model_path("llama_gqa", NULL));
    CU_ASSERT_EQUAL(run_cli(&out, &errs, dir, "'%s' --adapter '%s/adapter' --tokenizer '%s' --template none "
                            "--prompt hello --max-new-tokens 24", model_dir, model_dir, tok_path), 0);
    tok_tokenizer *tok;
    char *text;
    size_t len;
    TEST_OK(tok_load_json(&tok, tok_path, &err), &err);
    CU_ASSERT_EQUAL(tok_eos_id(tok), gen[stop]);
    int32_t kept[24];
    int64_t n_kept = 0;
    for (int64_t i = 0; i < stop; i++)
        if (gen[i] < tok_vocab_size(tok)) kept[n_kept++] = gen[i];
    TEST_OK(tok_decode(tok, kept, n_kept, &text, &len, &err), &err);
    CU_ASSERT_PTR_NOT_NULL(strstr(text, "\xE2\x82\xAC"));
    CU_ASSERT(strlen(out) == len + 1 && memcmp(out, text, len) == 0 && out[len] == '\n');
    snprintf(want, sizeof want, "generated %lld tokens, stopped by the stop token (%d)", (long long)stop + 1,
             gen[stop]);
    CU_ASSERT_PTR_NOT_NULL(strstr(errs, want));
    printf("\n    euro sign from ids %d %d %d at step %lld, EOS %d at step %lld ", gen[at], gen[at + 1], gen[at + 2],
           (long long)at, gen[stop], (long long)stop);
    free(text), free(out), free(errs), free(gen);
    tok_free(tok);
    test_rmtree(dir);
    free(dir);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("KV-cached forward vs model_forward", NULL, NULL);
    CU_add_test(s, "llama_gqa logits at every position", test_logits_llama_gqa);
    CU_add_test(s, "qwen2_bias logits at every position", test_logits_qwen2_bias);
    CU_add_test(s, "llama_tied logits at every position", test_logits_llama_tied);
    CU_add_test(s, "llama_gqa (GQA, llama3 rope) greedy, with and without adapter", test_greedy_llama_gqa);
    CU_add_test(s, "qwen2_bias (q/k/v biases) greedy, with and without adapter", test_greedy_qwen2_bias);
    CU_add_test(s, "llama_tied (tied, bf16) greedy, with and without adapter", test_greedy_llama_tied);
    CU_add_test(s, "temperature / top-p draws", test_sampling_vs_forward);
    CU_add_test(s, "greedy ids as transformers' generate", test_hf_greedy);
    CU_add_test(s, "weights dequantized per step", test_uncached_weights);
    s = CU_add_suite("sampling and stopping", NULL, NULL);
    CU_add_test(s, "seeds, top-p to greedy", test_determinism);
    CU_add_test(s, "ties", test_ties);
    CU_add_test(s, "stop id", test_stop_id);
    CU_add_test(s, "max_position", test_max_position);
    CU_add_test(s, "bad input", test_bad_input);
    s = CU_add_suite("qlora generate", NULL, NULL);
    CU_add_test(s, "arguments and errors", test_cli_arguments);
    CU_add_test(s, "generates what gen_generate does, printed as text", test_cli_run);
    CU_add_test(s, "a character split across tokens, EOS", test_cli_stream_and_stop);
    return test_main();
}
