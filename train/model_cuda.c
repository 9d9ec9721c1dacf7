// train/model_cuda.c: the model on a CUDA device. Plain C over autograd's
// device API: it copies the weights once, keeps the adapter's values and
// gradients in one device buffer, and runs the same pass as the CPU
// (model_pass_run) on a device tape. In a build without CUDA every entry
// point fails with autograd's "built without CUDA" message.
#include <stdlib.h>
#include <string.h>

#include "train.h"

// A device copy of n bytes of host memory, owned by d (NULL with err set).
static void *upload(model_cuda *d, const void *src, int64_t bytes, q_err *err) {
    if (d->n_bufs == d->cap_bufs) {
        const int64_t cap = d->cap_bufs ? 2 * d->cap_bufs : 64;
        void **b = realloc(d->bufs, (size_t)cap * sizeof *b);
        if (!b) return q_err_set(err, "out of memory"), NULL;
        d->bufs = b;
        d->cap_bufs = cap;
    }
    void *p;
    if (ag_cuda_malloc(&p, bytes, err)) return NULL;
    d->bufs[d->n_bufs++] = p;
    d->weight_bytes += bytes;
    if (src && ag_cuda_copy(p, src, bytes, NULL, err)) return NULL;
    return p;
}

static const float *upload_f32(model_cuda *d, const float *src, int64_t n, q_err *err) {
    return src ? upload(d, src, n * (int64_t)sizeof(float), err) : NULL;
}

// The view of a quantized weight, its arrays copied to the device.
static int upload_nf4(model_cuda *d, const nf4_tensor *t, nf4_view *v, q_err *err) {
    *v = nf4_tensor_view(t);
    const int64_t nb = t->nblocks;
    if (!(v->packed = upload(d, t->packed, (t->numel + 1) / 2, err))) return -1;
    if (t->nested) {
        v->absmax = NULL;
        if (!(v->qabsmax = upload(d, t->qabsmax, nb, err)) ||
            !(v->nested_absmax = upload_f32(d, t->nested_absmax, (nb + 255) / 256, err)) ||
            !(v->nested_map = upload_f32(d, t->nested_map, 256, err)))
            return -1;
    } else if (!(v->absmax = upload_f32(d, t->absmax, nb, err))) {
        return -1;
    }
    return 0;
}

// The adapter's shape, with A, B, dA, dB carved out of one device buffer:
// values first (uploaded each step), gradients after (downloaded each step).
static int lora_mirror(model_cuda *d, const lora *l, q_err *err) {
    d->l = *l;
    const int64_t nmods = l->n_layers * LIN_COUNT;
    d->l.mods = calloc((size_t)nmods, sizeof *d->l.mods);
    if (!d->l.mods) return q_err_set(err, "out of memory");
    int64_t n = 0;
    for (int64_t i = 0; i < nmods; i++) n += l->mods[i].r * (l->mods[i].in + l->mods[i].out);
    d->lora_numel = n;
    d->lora_host = malloc((size_t)(n ? n : 1) * sizeof(float));
    if (!d->lora_host) return q_err_set(err, "out of memory");
    if (ag_cuda_malloc((void **)&d->lora_dev, 2 * n * (int64_t)sizeof(float), err)) return -1;
    float *vals = d->lora_dev, *grads = d->lora_dev + n;
    for (int64_t i = 0, off = 0; i < nmods; i++) {
        const lora_module *h = &l->mods[i];
        lora_module *m = &d->l.mods[i];
        *m = (lora_module){.r = h->r, .in = h->in, .out = h->out};
        if (!h->r) continue;
        m->A = vals + off, m->dA = grads + off;
        off += h->r * h->in;
        m->B = vals + off, m->dB = grads + off;
        off += h->r * h->out;
    }
    return 0;
}

int model_cuda_upload(model_cuda *d, const model *m, const lora *l, ag_precision prec, q_err *err) {
    memset(d, 0, sizeof *d);
    const model_config *c = &m->cfg;
    if (ag_cuda_ctx_create(&d->ctx, prec, err)) return -1;
    d->w = (model_weights){.cfg = c};
    d->w.layers = calloc((size_t)c->n_layers, sizeof *d->w.layers);
    if (!d->w.layers) {
        q_err_set(err, "out of memory");
        goto fail;
    }
    const int64_t V = c->vocab, D = c->hidden;
    if (!(d->w.embed = upload_f32(d, m->embed, V * D, err)) ||
        !(d->w.final_norm = upload_f32(d, m->final_norm, D, err)) ||
        !(d->w.inv_freq = upload_f32(d, m->inv_freq, c->head_dim / 2, err)))
        goto fail;
    d->w.lm_head = m->lm_head == m->embed ? d->w.embed : upload_f32(d, m->lm_head, V * D, err);
    if (!d->w.lm_head) goto fail;
    for (int64_t i = 0; i < c->n_layers; i++) {
        const model_layer *L = &m->layers[i];
        model_layer_weights *lw = &d->w.layers[i];
        if (!(lw->attn_norm = upload_f32(d, L->attn_norm, D, err)) ||
            !(lw->mlp_norm = upload_f32(d, L->mlp_norm, D, err)))
            goto fail;
        for (int id = 0; id < LIN_COUNT; id++) {
            int64_t out, in;
            model_linear_shape(c, (model_linear_id)id, &out, &in);
            lw->w_dtype[id] = L->w[id].dtype;
            if (upload_nf4(d, &L->w[id], &lw->w[id], err)) goto fail;
            if (L->bias[id] && !(lw->bias[id] = upload_f32(d, L->bias[id], out, err))) goto fail;
        }
    }
    if (l && lora_mirror(d, l, err)) goto fail;
    return 0;
fail:
    q_err_wrap(err, "copying the model to the device");
    model_cuda_free(d);
    return -1;
}

void model_cuda_free(model_cuda *d) {
    for (int64_t i = 0; i < d->n_bufs; i++) ag_cuda_free(d->bufs[i]);
    ag_cuda_free(d->lora_dev);
    ag_cuda_free(d->batch_dev);
    free(d->bufs);
    free(d->w.layers);
    free(d->l.mods);
    free(d->lora_host);
    ag_cuda_ctx_free(d->ctx);
    memset(d, 0, sizeof *d);
}

// The batch's four index arrays on the device. The attention kernels need
// documents as contiguous runs (start non-decreasing, start[n] <= n), which
// model_batch_init always makes; anything else is refused here.
static int upload_batch(model_cuda *d, const model_batch *b, q_err *err) {
    const int64_t N = b->N;
    for (int64_t n = 0; n < N; n++)
        if (b->start[n] > n || (n > 0 && b->start[n] < b->start[n - 1]))
            return q_err_set(err, "batch: token %lld: documents must be contiguous runs on the device",
                             (long long)n);
    if (N > d->batch_cap) {
        ag_cuda_free(d->batch_dev);
        d->batch_dev = NULL;
        d->batch_cap = 0;
        if (ag_cuda_malloc((void **)&d->batch_dev, 4 * N * (int64_t)sizeof(int32_t), err)) return -1;
        d->batch_cap = N;
    }
    const int32_t *src[4] = {b->ids, b->targets, b->pos, b->start};
    for (int k = 0; k < 4; k++)
        if (ag_cuda_copy(d->batch_dev + k * d->batch_cap, src[k], N * (int64_t)sizeof(int32_t),
                         ag_cuda_ctx_stream(d->ctx), err))
            return -1;
    return 0;
}

// Packs the host adapter's fp32 values (or, with grads, nothing) in the
// mirror's order.
static void lora_pack(const model_cuda *d, const lora *l) {
    float *dst = d->lora_host;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        const lora_module *h = &l->mods[i];
        if (!h->r) continue;
        memcpy(dst, h->A, (size_t)(h->r * h->in) * sizeof(float));
        dst += h->r * h->in;
        memcpy(dst, h->B, (size_t)(h->r * h->out) * sizeof(float));
        dst += h->r * h->out;
    }
}

static int lora_check_shape(const model_cuda *d, const lora *l, q_err *err) {
    if (!d->l.mods || l->n_layers != d->l.n_layers)
        return q_err_set(err, "model_cuda: the adapter does not match the one given at upload");
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        const lora_module *a = &l->mods[i], *b = &d->l.mods[i];
        if (a->r != b->r || (a->r && (a->in != b->in || a->out != b->out)))
            return q_err_set(err, "model_cuda: the adapter does not match the one given at upload");
    }
    return 0;
}

static int run(model_cuda *d, lora *l, const model_batch *b, const model_step_opts *o, bool training,
               model_step_result *r, q_err *err) {
    void *s = ag_cuda_ctx_stream(d->ctx);
    if (l) {
        if (lora_check_shape(d, l, err)) return -1;
        d->l.cfg = l->cfg;  // dropout and seed may change between steps
        d->l.scale = l->scale;
        lora_pack(d, l);
        const int64_t bytes = d->lora_numel * (int64_t)sizeof(float);
        if (ag_cuda_copy(d->lora_dev, d->lora_host, bytes, s, err) ||
            (training && ag_cuda_zero(d->lora_dev + d->lora_numel, bytes, s, err)))
            return -1;
    }
    if (upload_batch(d, b, err)) return -1;
    const int32_t *dev = d->batch_dev;
    const int64_t cap = d->batch_cap;
    const model_pass p = {&d->w, l ? &d->l : NULL, d->ctx, dev, dev + cap, dev + 2 * cap, dev + 3 * cap, b};
    if (model_pass_run(&p, o, training, NULL, r, err)) return -1;
    if (!training || !l) return 0;
    // host dA/dB += the device's gradients of this pass
    if (ag_cuda_copy(d->lora_host, d->lora_dev + d->lora_numel, d->lora_numel * (int64_t)sizeof(float), s, err))
        return -1;
    const float *g = d->lora_host;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        lora_module *h = &l->mods[i];
        if (!h->r) continue;
        for (int64_t j = 0; j < h->r * h->in; j++) h->dA[j] += *g++;
        for (int64_t j = 0; j < h->r * h->out; j++) h->dB[j] += *g++;
    }
    return 0;
}

int model_cuda_step(model_cuda *d, lora *l, const model_batch *b, const model_step_opts *o, model_step_result *r,
                    q_err *err) {
    return run(d, l, b, o, true, r, err);
}

int model_cuda_forward(model_cuda *d, const lora *l, const model_batch *b, model_step_result *r, q_err *err) {
    const model_step_opts o = {0};
    return run(d, (lora *)l, b, &o, false, r, err);  // a forward never writes the adapter
}
