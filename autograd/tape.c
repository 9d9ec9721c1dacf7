// autograd/tape.c: tensors, the reverse-mode tape, and the ops as tape
// entries. Each op runs its forward kernel (ops.c, or its CUDA twin when the
// tape lives on the device) and, when the tape records, saves what its
// backward needs in a small context; the backward replays the contexts
// newest first. Checkpointed segments keep only their input and are rerun on
// a fresh tape inside the backward.
//
// Device tapes: tensor data and gradients come from the CUDA context's
// stream-ordered pool; records stay on the host. A failing CUDA call marks
// the tape failed with its message in t->err, and every later op is a no-op.
#define _GNU_SOURCE
#include "autograd.h"

#include <math.h>
#include <stdlib.h>

typedef void (*ag_backward_fn)(ag_tape *t, void *ctx);
struct ag_record {
    ag_backward_fn fn;
    void *ctx;
};

// ----------------------------------------------------------------------------
// memory: every buffer a tape hands out is 64-byte aligned, zeroed, counted

void ag_tape_init(ag_tape *t, bool recording, ag_mem *mem, float *workspace, int64_t workspace_numel) {
    memset(t, 0, sizeof *t);
    t->recording = recording;
    t->mem = mem;
    t->workspace = workspace;
    t->workspace_numel = workspace_numel;
}

void ag_tape_init_cuda(ag_tape *t, bool recording, ag_mem *mem, ag_cuda_ctx *ctx) {
    ag_tape_init(t, recording, mem, NULL, 0);
    t->cuda = ctx;
}

// Runs one CUDA op call (which fills t->err on failure) unless the tape has
// already failed; marks it failed otherwise.
#define DEV(t, call)                              \
    do {                                          \
        if (!(t)->failed && (call) != 0) (t)->failed = true; \
    } while (0)

static void *stream(const ag_tape *t) { return ag_cuda_ctx_stream(t->cuda); }

// A zeroed buffer owned by the tape: on the host (records, contexts) or,
// when device is set, from the context's pool (tensor data).
static void *tape_alloc_on(ag_tape *t, int64_t bytes, bool device) {
    if (t->failed) return NULL;
    if (t->n_allocs == t->cap_allocs) {
        int64_t cap = t->cap_allocs ? 2 * t->cap_allocs : 64;
        ag_alloc *a = realloc(t->allocs, (size_t)cap * sizeof *a);
        if (!a) {
            t->failed = true;
            q_err_set(&t->err, "autograd: out of host memory for the tape");
            return NULL;
        }
        t->allocs = a;
        t->cap_allocs = cap;
    }
    size_t size = ((size_t)(bytes > 0 ? bytes : 1) + 63) & ~(size_t)63;
    void *p;
    if (device) {
        p = ag_cuda_ctx_alloc(t->cuda, (int64_t)size, &t->err);
    } else {
        p = aligned_alloc(64, size);
        if (p) memset(p, 0, size);
        else q_err_set(&t->err, "autograd: out of memory for activations (%zu bytes more)", size);
    }
    if (!p) {
        t->failed = true;
        return NULL;
    }
    t->allocs[t->n_allocs++] = (ag_alloc){p, (int64_t)size, device};
    if (t->mem) {
        t->mem->live += (int64_t)size;
        if (t->mem->live > t->mem->peak) t->mem->peak = t->mem->live;
    }
    return p;
}

static void *tape_alloc(ag_tape *t, int64_t bytes) { return tape_alloc_on(t, bytes, false); }
// Tensor data: where the tape's tensors live.
static void *tape_alloc_data(ag_tape *t, int64_t bytes) { return tape_alloc_on(t, bytes, t->cuda != NULL); }

static void alloc_free(ag_tape *t, const ag_alloc *a) {
    if (a->device) ag_cuda_ctx_release(t->cuda, a->p);
    else free(a->p);
    if (t->mem) t->mem->live -= a->bytes;
}

void ag_tape_free(ag_tape *t) {
    for (int64_t i = 0; i < t->n_allocs; i++) alloc_free(t, &t->allocs[i]);
    free(t->allocs);
    free(t->records);
    ag_cuda_ctx *cuda = t->cuda;
    ag_tape_init(t, t->recording, t->mem, t->workspace, t->workspace_numel);
    t->cuda = cuda;
}

// Frees one buffer before the tape ends (newest first: releases happen in
// the backward, which walks the tape from the end).
static void tape_release(ag_tape *t, void *p) {
    for (int64_t i = t->n_allocs - 1; p && i >= 0; i--)
        if (t->allocs[i].p == p) {
            alloc_free(t, &t->allocs[i]);
            t->allocs[i] = (ag_alloc){NULL, 0, false};
            return;
        }
}

ag_tensor *ag_tensor_new(ag_tape *t, int ndim, const int64_t *shape, bool requires_grad) {
    ag_tensor *x = tape_alloc(t, sizeof *x);
    if (!x) return NULL;
    x->dtype = Q_DTYPE_F32;
    x->device = t->cuda ? AG_DEVICE_CUDA : AG_DEVICE_CPU;
    x->ndim = ndim;
    x->numel = 1;
    for (int i = 0; i < ndim; i++) x->numel *= (x->shape[i] = shape[i]);
    x->requires_grad = requires_grad;
    x->data = tape_alloc_data(t, x->numel * (int64_t)sizeof(float));
    return x->data ? x : NULL;
}

static ag_tensor *tensor_2d(ag_tape *t, int64_t n, int64_t d, bool requires_grad) {
    int64_t shape[2] = {n, d};
    return ag_tensor_new(t, 2, shape, requires_grad);
}

float *ag_tensor_grad(ag_tape *t, ag_tensor *x) {
    if (!x->grad) x->grad = tape_alloc_data(t, x->numel * (int64_t)sizeof(float));
    return x->grad;
}

// Saves a copy of ctx (size bytes) with its backward. No-op when not recording.
static void tape_push(ag_tape *t, ag_backward_fn fn, const void *ctx, size_t size) {
    if (!t->recording || t->failed) return;
    if (t->n_records == t->cap_records) {
        int64_t cap = t->cap_records ? 2 * t->cap_records : 64;
        ag_record *r = realloc(t->records, (size_t)cap * sizeof *r);
        if (!r) {
            t->failed = true;
            return;
        }
        t->records = r;
        t->cap_records = cap;
    }
    void *c = tape_alloc(t, (int64_t)size);
    if (!c) return;
    memcpy(c, ctx, size);
    t->records[t->n_records++] = (ag_record){fn, c};
}

void ag_tape_backward(ag_tape *t) {
    for (int64_t i = t->n_records - 1; i >= 0 && !t->failed; i--) t->records[i].fn(t, t->records[i].ctx);
}

// True when y received a gradient and x wants one.
static bool flows(const ag_tensor *y, const ag_tensor *x) { return y->grad && x->requires_grad; }

// ----------------------------------------------------------------------------
// embedding: the table is frozen, so nothing flows back from here

ag_tensor *ag_embedding(ag_tape *t, const int32_t *ids, const float *table, int64_t N, int64_t D) {
    ag_tensor *out = tensor_2d(t, N, D, false);
    if (out && t->cuda) DEV(t, ag_cuda_embedding_forward(out->data, ids, table, N, D, stream(t), &t->err));
    else if (out) ag_embedding_forward(out->data, ids, table, N, D);
    return t->failed ? NULL : out;
}

// ----------------------------------------------------------------------------
// rmsnorm

typedef struct rmsnorm_ctx {
    ag_tensor *x, *out;
    const float *w;
    float *rstd;  // [N]
} rmsnorm_ctx;

static void rmsnorm_bwd(ag_tape *t, void *p) {
    rmsnorm_ctx *c = p;
    if (!flows(c->out, c->x)) return;
    float *dx = ag_tensor_grad(t, c->x);
    const int64_t N = c->x->shape[0], D = c->x->shape[1];
    if (dx && t->cuda)
        DEV(t, ag_cuda_rmsnorm_backward(dx, NULL, c->out->grad, c->x->data, c->w, c->rstd, N, D, NULL, stream(t),
                                        &t->err));
    else if (dx) ag_rmsnorm_backward(dx, NULL, c->out->grad, c->x->data, c->w, c->rstd, N, D);
}

ag_tensor *ag_rmsnorm(ag_tape *t, ag_tensor *x, const float *w, float eps) {
    if (!x) return NULL;
    const int64_t N = x->shape[0], D = x->shape[1];
    ag_tensor *out = tensor_2d(t, N, D, x->requires_grad);
    float *rstd = tape_alloc_data(t, N * (int64_t)sizeof(float));
    if (!out || !rstd) return NULL;
    if (t->cuda) DEV(t, ag_cuda_rmsnorm_forward(out->data, rstd, x->data, w, N, D, eps, stream(t), &t->err));
    else ag_rmsnorm_forward(out->data, rstd, x->data, w, N, D, eps);
    if (t->failed) return NULL;
    tape_push(t, rmsnorm_bwd, &(rmsnorm_ctx){x, out, w, rstd}, sizeof(rmsnorm_ctx));
    return out;
}

// ----------------------------------------------------------------------------
// NF4 + LoRA linear. The base weight is dequantized into the tape's shared
// workspace in the forward and again in the backward: only one layer's
// weight ever exists in fp32.

static int linear_weight(ag_tape *t, const ag_linear *lin, const float **W) {
    if (lin->dense) {
        *W = lin->dense;
        return 0;
    }
    const int64_t n = lin->in * lin->out;
    if (n > t->workspace_numel) {
        t->failed = true;
        return q_err_set(&t->err, "autograd: a %lld x %lld weight does not fit the %lld-float workspace",
                         (long long)lin->out, (long long)lin->in, (long long)t->workspace_numel);
    }
    if (nf4_dequantize(&lin->w, t->workspace, Q_DTYPE_F32, &t->err)) {
        t->failed = true;
        return -1;
    }
    float *w = t->workspace;
    if (lin->w_dtype == Q_DTYPE_BF16) {
        for (int64_t i = 0; i < n; i++) w[i] = q_bf16_to_f32(q_f32_to_bf16(w[i]));
    } else if (lin->w_dtype == Q_DTYPE_F16) {
        for (int64_t i = 0; i < n; i++) w[i] = q_f16_to_f32(q_f32_to_f16(w[i]));
    }
    *W = w;
    return 0;
}

typedef struct linear_ctx {
    ag_tensor *x, *y;
    ag_linear lin;
    float *xd;  // [N,I] dropout(x), or x->data when dropout is off
    float *xa;  // [N,r]
} linear_ctx;

// The device backward: the same steps through ag_cuda_linear_backward, which
// dequantizes the base again into the context's workspace.
static void linear_bwd_cuda(ag_tape *t, linear_ctx *c) {
    const ag_linear *l = &c->lin;
    const int64_t N = c->x->shape[0];
    float *dx = c->x->requires_grad ? ag_tensor_grad(t, c->x) : NULL;
    if (t->failed) return;
    if (l->r > 0 && l->dropout > 0.0f && dx) {
        float *dxd = tape_alloc_data(t, N * l->in * (int64_t)sizeof(float));
        if (!dxd) return;
        DEV(t, ag_cuda_linear_backward(t->cuda, dx, dxd, c->y->grad, c->xd, c->xa, l, N, &t->err));
        DEV(t, ag_cuda_dropout_backward(dx, dxd, N * l->in, l->dropout, l->dropout_seed, stream(t), &t->err));
        tape_release(t, dxd);
    } else {
        DEV(t, ag_cuda_linear_backward(t->cuda, dx, dx, c->y->grad, c->xd, c->xa, l, N, &t->err));
    }
}

static void linear_bwd(ag_tape *t, void *p) {
    linear_ctx *c = p;
    if (!c->y->grad) return;
    if (t->cuda) {
        linear_bwd_cuda(t, c);
        return;
    }
    const ag_linear *l = &c->lin;
    const int64_t N = c->x->shape[0];
    const float *W;
    if (linear_weight(t, l, &W)) return;
    float *dx = c->x->requires_grad ? ag_tensor_grad(t, c->x) : NULL;
    if (l->r == 0) {
        if (dx) ag_gemm(false, false, N, l->in, l->out, 1.0f, c->y->grad, l->out, W, l->in, 1.0f, dx, l->in);
        return;
    }
    float *scratch = tape_alloc(t, N * l->r * (int64_t)sizeof(float));
    if (!scratch) return;
    if (l->dropout > 0.0f) {
        // dxd goes through the dropout mask before it joins dx
        float *dxd = dx ? tape_alloc(t, N * l->in * (int64_t)sizeof(float)) : NULL;
        ag_lora_linear_backward(dx, dxd, l->dA, l->dB, c->y->grad, c->xd, c->xa, W, l->A, l->B, l->scale, N, l->in,
                                l->out, l->r, scratch);
        if (dxd) ag_dropout_backward(dx, dxd, N * l->in, l->dropout, l->dropout_seed);
    } else {
        ag_lora_linear_backward(dx, dx, l->dA, l->dB, c->y->grad, c->xd, c->xa, W, l->A, l->B, l->scale, N, l->in,
                                l->out, l->r, scratch);
    }
}

ag_tensor *ag_linear_apply(ag_tape *t, ag_tensor *x, const ag_linear *lin) {
    if (!x) return NULL;
    const int64_t N = x->shape[0];
    const bool trains = lin->r > 0 && (lin->dA || lin->dB);
    ag_tensor *y = tensor_2d(t, N, lin->out, x->requires_grad || trains);
    const float *W = NULL;
    if (!y || (!t->cuda && linear_weight(t, lin, &W))) return NULL;
    linear_ctx c = {x, y, *lin, x->data, NULL};
    if (lin->r > 0) {
        c.xa = tape_alloc_data(t, N * lin->r * (int64_t)sizeof(float));
        if (lin->dropout > 0.0f) {
            c.xd = tape_alloc_data(t, N * lin->in * (int64_t)sizeof(float));
            if (c.xd && t->cuda)
                DEV(t, ag_cuda_dropout_forward(c.xd, x->data, N * lin->in, lin->dropout, lin->dropout_seed, stream(t),
                                               &t->err));
            else if (c.xd) ag_dropout_forward(c.xd, x->data, N * lin->in, lin->dropout, lin->dropout_seed);
        }
        if (!c.xa || !c.xd) return NULL;
    }
    if (t->cuda)
        DEV(t, ag_cuda_linear_forward(t->cuda, y->data, c.xa, x->data, c.xd, lin, N, &t->err));
    else
        ag_lora_linear_forward(y->data, c.xa, x->data, c.xd, W, lin->bias, lin->A, lin->B, lin->scale, N, lin->in,
                               lin->out, lin->r);
    if (t->failed) return NULL;
    tape_push(t, linear_bwd, &c, sizeof c);
    return y;
}

// ----------------------------------------------------------------------------
// rope

typedef struct rope_ctx {
    ag_tensor *x, *out;
    const int32_t *pos;
    const float *inv_freq;
    int64_t H, hd;
} rope_ctx;

static void rope_bwd(ag_tape *t, void *p) {
    rope_ctx *c = p;
    if (!flows(c->out, c->x)) return;
    float *dx = ag_tensor_grad(t, c->x);
    if (dx && t->cuda)
        DEV(t, ag_cuda_rope_backward(dx, c->out->grad, c->pos, c->inv_freq, c->x->shape[0], c->H, c->hd, stream(t),
                                     &t->err));
    else if (dx) ag_rope_backward(dx, c->out->grad, c->pos, c->inv_freq, c->x->shape[0], c->H, c->hd);
}

ag_tensor *ag_rope(ag_tape *t, ag_tensor *x, const int32_t *pos, const float *inv_freq, int64_t H, int64_t hd) {
    if (!x) return NULL;
    ag_tensor *out = tensor_2d(t, x->shape[0], x->shape[1], x->requires_grad);
    if (!out) return NULL;
    if (t->cuda) DEV(t, ag_cuda_rope_forward(out->data, x->data, pos, inv_freq, x->shape[0], H, hd, stream(t), &t->err));
    else ag_rope_forward(out->data, x->data, pos, inv_freq, x->shape[0], H, hd);
    if (t->failed) return NULL;
    tape_push(t, rope_bwd, &(rope_ctx){x, out, pos, inv_freq, H, hd}, sizeof(rope_ctx));
    return out;
}

// ----------------------------------------------------------------------------
// attention

typedef struct attention_ctx {
    ag_tensor *q, *k, *v, *out;
    float *lse;  // [N,H]
    const int32_t *start;
    int64_t H, Hkv, hd;
} attention_ctx;

static void attention_bwd(ag_tape *t, void *p) {
    attention_ctx *c = p;
    if (!c->out->grad) return;
    // attention's three inputs come from linears that want gradients together
    float *dq = ag_tensor_grad(t, c->q), *dk = ag_tensor_grad(t, c->k), *dv = ag_tensor_grad(t, c->v);
    if (!dq || !dk || !dv) return;
    const int64_t N = c->q->shape[0];
    if (t->cuda) {
        float *scratch = tape_alloc_data(t, ag_cuda_attention_backward_scratch_floats(N, c->H) * (int64_t)sizeof(float));
        if (!scratch) return;
        DEV(t, ag_cuda_attention_backward(dq, dk, dv, c->out->grad, c->q->data, c->k->data, c->v->data, c->out->data,
                                          c->lse, c->start, N, c->H, c->Hkv, c->hd, scratch, stream(t), &t->err));
        tape_release(t, scratch);
        return;
    }
    ag_attention_backward(dq, dk, dv, c->out->grad, c->q->data, c->k->data, c->v->data, c->out->data, c->lse,
                          c->start, N, c->H, c->Hkv, c->hd);
}

ag_tensor *ag_attention(ag_tape *t, ag_tensor *q, ag_tensor *k, ag_tensor *v, const int32_t *start, int64_t H,
                        int64_t Hkv, int64_t hd) {
    if (!q || !k || !v) return NULL;
    const int64_t N = q->shape[0];
    ag_tensor *out = tensor_2d(t, N, H * hd, q->requires_grad || k->requires_grad || v->requires_grad);
    float *lse = tape_alloc_data(t, N * H * (int64_t)sizeof(float));
    if (!out || !lse) return NULL;
    if (t->cuda)
        DEV(t, ag_cuda_attention_forward(out->data, lse, q->data, k->data, v->data, start, N, H, Hkv, hd, stream(t),
                                         &t->err));
    else ag_attention_forward(out->data, lse, q->data, k->data, v->data, start, N, H, Hkv, hd);
    if (t->failed) return NULL;
    tape_push(t, attention_bwd, &(attention_ctx){q, k, v, out, lse, start, H, Hkv, hd}, sizeof(attention_ctx));
    return out;
}

// ----------------------------------------------------------------------------
// swiglu and residual add

typedef struct swiglu_ctx {
    ag_tensor *gate, *up, *out;
} swiglu_ctx;

static void swiglu_bwd(ag_tape *t, void *p) {
    swiglu_ctx *c = p;
    if (!c->out->grad) return;
    float *dg = ag_tensor_grad(t, c->gate), *du = ag_tensor_grad(t, c->up);
    if (dg && du && t->cuda)
        DEV(t, ag_cuda_swiglu_backward(dg, du, c->out->grad, c->gate->data, c->up->data, c->out->numel, stream(t),
                                       &t->err));
    else if (dg && du) ag_swiglu_backward(dg, du, c->out->grad, c->gate->data, c->up->data, c->out->numel);
}

ag_tensor *ag_swiglu(ag_tape *t, ag_tensor *gate, ag_tensor *up) {
    if (!gate || !up) return NULL;
    ag_tensor *out = tensor_2d(t, gate->shape[0], gate->shape[1], gate->requires_grad || up->requires_grad);
    if (!out) return NULL;
    if (t->cuda) DEV(t, ag_cuda_swiglu_forward(out->data, gate->data, up->data, out->numel, stream(t), &t->err));
    else ag_swiglu_forward(out->data, gate->data, up->data, out->numel);
    if (t->failed) return NULL;
    tape_push(t, swiglu_bwd, &(swiglu_ctx){gate, up, out}, sizeof(swiglu_ctx));
    return out;
}

typedef struct add_ctx {
    ag_tensor *a, *b, *out;
} add_ctx;

static void add_into(ag_tape *t, ag_tensor *x, const float *g) {
    if (!x->requires_grad) return;
    float *dx = ag_tensor_grad(t, x);
    if (dx && t->cuda) DEV(t, ag_cuda_add_backward(dx, NULL, g, x->numel, stream(t), &t->err));
    else if (dx)
        for (int64_t i = 0; i < x->numel; i++) dx[i] += g[i];
}

static void add_bwd(ag_tape *t, void *p) {
    add_ctx *c = p;
    if (!c->out->grad) return;
    add_into(t, c->a, c->out->grad);
    add_into(t, c->b, c->out->grad);
}

ag_tensor *ag_add(ag_tape *t, ag_tensor *a, ag_tensor *b) {
    if (!a || !b) return NULL;
    ag_tensor *out = tensor_2d(t, a->shape[0], a->shape[1], a->requires_grad || b->requires_grad);
    if (!out) return NULL;
    if (t->cuda) DEV(t, ag_cuda_add_forward(out->data, a->data, b->data, a->numel, stream(t), &t->err));
    else
        for (int64_t i = 0; i < a->numel; i++) out->data[i] = a->data[i] + b->data[i];
    if (t->failed) return NULL;
    tape_push(t, add_bwd, &(add_ctx){a, b, out}, sizeof(add_ctx));
    return out;
}

// ----------------------------------------------------------------------------
// loss: forward and backward are fused (the logits are never kept), so the
// record only hands the finished dh to h

typedef struct loss_ctx {
    ag_tensor *h;
    float *dh;
} loss_ctx;

static void loss_bwd(ag_tape *t, void *p) {
    loss_ctx *c = p;
    add_into(t, c->h, c->dh);
}

void ag_loss(ag_tape *t, ag_tensor *h, const float *Wlm, const int32_t *targets, int64_t V, float grad_scale,
             int64_t token_chunk, int64_t vocab_chunk, double *loss_sum, int64_t *n_valid) {
    *loss_sum = 0.0;
    *n_valid = 0;
    if (!h || t->failed) return;
    const int64_t N = h->shape[0], D = h->shape[1];
    float *dh = t->recording && h->requires_grad ? tape_alloc_data(t, N * D * (int64_t)sizeof(float)) : NULL;
    if (t->failed) return;
    if (t->cuda) {
        DEV(t, ag_cuda_cross_entropy(t->cuda, loss_sum, n_valid, dh, h->data, Wlm, targets, N, D, V, grad_scale,
                                     token_chunk, vocab_chunk, &t->err));
    } else {
        float *scratch = tape_alloc(t, ag_cross_entropy_scratch_floats(D, V, token_chunk, vocab_chunk) * 4);
        if (!scratch) return;
        ag_cross_entropy(loss_sum, n_valid, dh, h->data, Wlm, targets, N, D, V, grad_scale, token_chunk, vocab_chunk,
                         scratch);
        tape_release(t, scratch);
    }
    if (t->failed) return;
    if (dh) tape_push(t, loss_bwd, &(loss_ctx){h, dh}, sizeof(loss_ctx));
}

// ----------------------------------------------------------------------------
// checkpointing

typedef struct checkpoint_ctx {
    ag_tensor *x, *out;
    ag_segment_fn fn;
    void *ctx;
} checkpoint_ctx;

static void checkpoint_bwd(ag_tape *t, void *p) {
    checkpoint_ctx *c = p;
    if (!c->out->grad) return;
    ag_tape sub;
    ag_tape_init(&sub, true, t->mem, t->workspace, t->workspace_numel);
    sub.cuda = t->cuda;
    // the rerun reads the saved input and accumulates straight into its gradient
    ag_tensor x = *c->x;
    x.grad = x.requires_grad ? ag_tensor_grad(t, c->x) : NULL;
    ag_tensor *y = c->fn(&sub, &x, c->ctx);
    if (y && !sub.failed) {
        y->grad = c->out->grad;
        ag_tape_backward(&sub);
    }
    if (!y || sub.failed) {
        t->failed = true;
        t->err = sub.err;
    }
    ag_tape_free(&sub);
    // every reader of the segment's output has run its backward by now: drop
    // it and its gradient, so checkpointed memory stays at the stored inputs
    tape_release(t, c->out->grad);
    tape_release(t, c->out->data);
    c->out->grad = c->out->data = NULL;
}

ag_tensor *ag_checkpoint(ag_tape *t, ag_tensor *x, ag_segment_fn fn, void *ctx) {
    if (!x || t->failed) return NULL;
    if (!t->recording) return fn(t, x, ctx);
    ag_tape sub;
    ag_tape_init(&sub, false, t->mem, t->workspace, t->workspace_numel);
    sub.cuda = t->cuda;
    ag_tensor *y = fn(&sub, x, ctx);
    ag_tensor *out = y && !sub.failed ? ag_tensor_new(t, y->ndim, y->shape, true) : NULL;
    const int64_t bytes = out ? y->numel * (int64_t)sizeof(float) : 0;
    if (out && t->cuda) DEV(t, ag_cuda_copy(out->data, y->data, bytes, stream(t), &t->err));
    else if (out) memcpy(out->data, y->data, (size_t)bytes);
    if (sub.failed) t->err = sub.err;
    ag_tape_free(&sub);
    if (!out || t->failed) {
        t->failed = true;
        return NULL;
    }
    tape_push(t, checkpoint_bwd, &(checkpoint_ctx){x, out, fn, ctx}, sizeof(checkpoint_ctx));
    return out;
}

// ----------------------------------------------------------------------------
// names of the GEMM precisions (here, not in a .cu: recipes parse them in
// builds without CUDA too)

static const char *const precision_names[] = {"fp32", "tf32", "bf16", "fp16"};

const char *ag_precision_name(ag_precision p) {
    return (unsigned)p < sizeof precision_names / sizeof precision_names[0] ? precision_names[p] : "?";
}

int ag_precision_parse(const char *s, ag_precision *p, q_err *err) {
    for (int i = 0; i < (int)(sizeof precision_names / sizeof precision_names[0]); i++)
        if (strcmp(s, precision_names[i]) == 0) {
            *p = (ag_precision)i;
            return 0;
        }
    return q_err_set(err, "unknown precision \"%s\" (expected fp32, tf32, bf16 or fp16)", s);
}
