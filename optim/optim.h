// optim/optim.h: AdamW on fp32 master weights for fp16 adapters, learning
// rate schedules and gradient-norm clipping.
//
// The trained weights live in fp16 (what the model reads and what is saved);
// the optimizer keeps an fp32 master copy and both moments, updates the
// master and rounds it back into the fp16 weight and its fp32 compute copy.
#ifndef QLORA_OPTIM_H
#define QLORA_OPTIM_H

#include "core/core.h"

#ifdef __cplusplus
extern "C" {
#endif

// One trained tensor, as the optimizer sees it.
typedef struct optim_param {
    uint16_t *w16;      // [n] the fp16 weight
    float *w32;         // [n] its fp32 compute copy (kept equal to w16), may be NULL
    const float *grad;  // [n]
    int64_t n;
} optim_param;

typedef struct optim_adamw {
    int64_t n;            // total elements over all params
    float *master;        // [n] fp32 master weights, params concatenated in order
    float *m, *v;         // [n] first and second moments
    int64_t t;            // updates done (bias correction uses t + 1)
    double beta1, beta2, eps, weight_decay;
} optim_adamw;

// Master weights start as the fp16 values.
int optim_adamw_init(optim_adamw *o, const optim_param *p, int64_t n_params, double beta1, double beta2, double eps,
                     double weight_decay, q_err *err);
void optim_adamw_free(optim_adamw *o);
// One update with learning rate lr on gradients multiplied by grad_mult
// (the clipping factor), as torch.optim.AdamW computes it:
//   w -= lr * wd * w;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
void optim_adamw_step(optim_adamw *o, const optim_param *p, int64_t n_params, double lr, float grad_mult);

// Global L2 norm of all gradients (accumulated in double, fixed order).
double optim_grad_norm(const optim_param *p, int64_t n_params);
// The factor that brings the norm to max_norm when it is above it (1 otherwise;
// max_norm <= 0 disables clipping), as torch's clip_grad_norm_.
float optim_clip_factor(double norm, double max_norm);

// ----------------------------------------------------------------------------
// learning-rate schedules

typedef enum optim_sched_kind { OPTIM_SCHED_CONSTANT, OPTIM_SCHED_LINEAR, OPTIM_SCHED_COSINE } optim_sched_kind;

typedef struct optim_sched {
    optim_sched_kind kind;
    double lr;             // peak
    int64_t warmup;        // steps of linear warmup
    int64_t total;         // steps in the run
    double final_frac;     // lr at the end = final_frac * lr (linear, cosine)
} optim_sched;

int optim_sched_from_name(const char *name, optim_sched_kind *out, q_err *err);
// lr of update `step` (0-based). Warmup gives lr * (step + 1) / warmup, so the
// first update is not wasted at lr 0; then constant, or linear / half-cosine
// decay from lr to final_frac * lr over the remaining steps.
double optim_sched_lr(const optim_sched *s, int64_t step);

#ifdef __cplusplus
}
#endif
#endif  // QLORA_OPTIM_H
