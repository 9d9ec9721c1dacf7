// optim/optim.c: AdamW with fp32 masters, schedules, clipping.
#define _GNU_SOURCE
#include "optim.h"

#include <math.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------
// AdamW

int optim_adamw_init(optim_adamw *o, const optim_param *p, int64_t n_params, double beta1, double beta2, double eps,
                     double weight_decay, q_err *err) {
    memset(o, 0, sizeof *o);
    for (int64_t i = 0; i < n_params; i++) o->n += p[i].n;
    o->master = malloc((size_t)(o->n ? o->n : 1) * sizeof(float));
    o->m = calloc((size_t)(o->n ? o->n : 1), sizeof(float));
    o->v = calloc((size_t)(o->n ? o->n : 1), sizeof(float));
    if (!o->master || !o->m || !o->v) {
        optim_adamw_free(o);
        return q_err_set(err, "optimizer: out of memory for %lld parameters", (long long)o->n);
    }
    int64_t off = 0;
    for (int64_t i = 0; i < n_params; off += p[i].n, i++)
        q_convert_to_f32(p[i].w16, Q_DTYPE_F16, o->master + off, (size_t)p[i].n);
    o->beta1 = beta1, o->beta2 = beta2, o->eps = eps, o->weight_decay = weight_decay;
    return 0;
}

void optim_adamw_free(optim_adamw *o) {
    free(o->master), free(o->m), free(o->v);
    memset(o, 0, sizeof *o);
}

void optim_adamw_step(optim_adamw *o, const optim_param *p, int64_t n_params, double lr, float grad_mult) {
    o->t++;
    const float b1 = (float)o->beta1, b2 = (float)o->beta2, eps = (float)o->eps;
    const float bc1 = (float)(1.0 - pow(o->beta1, (double)o->t)), bc2 = (float)(1.0 - pow(o->beta2, (double)o->t));
    const float step = (float)lr / bc1, decay = (float)(1.0 - lr * o->weight_decay), sbc2 = sqrtf(bc2);
    int64_t off = 0;
    for (int64_t i = 0; i < n_params; off += p[i].n, i++) {
        float *w = o->master + off, *m = o->m + off, *v = o->v + off;
        const float *g = p[i].grad;
#pragma omp parallel for schedule(static) if (p[i].n > 65536)
        for (int64_t k = 0; k < p[i].n; k++) {
            const float gk = g[k] * grad_mult;
            // in torch's order: m.lerp_(g, 1-b1); v.mul_(b2).addcmul_(g, g, 1-b2);
            // denom = sqrt(v) / sqrt(bc2) + eps; w -= (lr / bc1) * m / denom
            m[k] = m[k] + (1.0f - b1) * (gk - m[k]);
            v[k] = b2 * v[k] + (1.0f - b2) * (gk * gk);
            w[k] = w[k] * decay - step * (m[k] / (sqrtf(v[k]) / sbc2 + eps));
            const uint16_t h = q_f32_to_f16(w[k]);
            p[i].w16[k] = h;
            if (p[i].w32) p[i].w32[k] = q_f16_to_f32(h);
        }
    }
}

double optim_grad_norm(const optim_param *p, int64_t n_params) {
    double s = 0;
    for (int64_t i = 0; i < n_params; i++)
        for (int64_t k = 0; k < p[i].n; k++) s += (double)p[i].grad[k] * (double)p[i].grad[k];
    return sqrt(s);
}

float optim_clip_factor(double norm, double max_norm) {
    if (max_norm <= 0 || !(norm > max_norm)) return 1.0f;
    return (float)(max_norm / (norm + 1e-6));
}

// ----------------------------------------------------------------------------
// schedules

int optim_sched_from_name(const char *name, optim_sched_kind *out, q_err *err) {
    if (strcmp(name, "constant") == 0) *out = OPTIM_SCHED_CONSTANT;
    else if (strcmp(name, "linear") == 0) *out = OPTIM_SCHED_LINEAR;
    else if (strcmp(name, "cosine") == 0) *out = OPTIM_SCHED_COSINE;
    else return q_err_set(err, "unknown schedule \"%s\" (use constant, linear or cosine)", name);
    return 0;
}

double optim_sched_lr(const optim_sched *s, int64_t step) {
    if (step < s->warmup) return s->lr * (double)(step + 1) / (double)s->warmup;
    if (s->kind == OPTIM_SCHED_CONSTANT) return s->lr;
    const int64_t span = s->total - s->warmup;
    double progress = span > 1 ? (double)(step - s->warmup) / (double)(span - 1) : 1.0;
    if (progress > 1.0) progress = 1.0;
    const double shape = s->kind == OPTIM_SCHED_LINEAR ? 1.0 - progress : 0.5 * (1.0 + cos(M_PI * progress));
    return s->lr * (s->final_frac + (1.0 - s->final_frac) * shape);
}
