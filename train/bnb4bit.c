// train/bnb4bit.c: reading and writing quantized weights in the layout
// transformers + bitsandbytes use for pre-quantized 4-bit checkpoints.
#define _GNU_SOURCE
#include "train.h"

#include <stdio.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------
// writing

int bnb4_quant_state_json(const nf4_tensor *t, q_buf *out) {
    // Python: json.dumps({"quant_type", "blocksize", "dtype", "shape", [nested...]})
    int rc = q_buf_printf(out, "{\"quant_type\": \"%s\", \"blocksize\": %lld, \"dtype\": \"%s\", \"shape\": [",
                          nf4_qtype_name(t->qtype), (long long)t->blocksize, q_dtype_torch_name(t->dtype));
    for (int i = 0; i < t->ndim; i++) rc |= q_buf_printf(out, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    rc |= q_buf_printf(out, "]");
    if (t->nested) {
        char off[64];
        q_format_float_repr((double)t->offset, off, sizeof off);
        rc |= q_buf_printf(out, ", \"nested_blocksize\": %d, \"nested_dtype\": \"float32\", \"nested_offset\": %s",
                           NF4_NESTED_BLOCKSIZE, off);
    }
    rc |= q_buf_printf(out, "}");
    return rc ? -1 : 0;
}

static q_st_entry *record_add(bnb4_record *r, const char *name, const char *suffix, q_dtype dt, int64_t d0,
                              int64_t d1, const void *data) {
    q_st_entry *e = &r->entries[r->n];
    snprintf(r->names[r->n], sizeof r->names[0], "%s%s", name, suffix);
    e->name = r->names[r->n];
    e->dtype = dt;
    e->ndim = d1 ? 2 : 1;
    e->shape[0] = d0;
    e->shape[1] = d1;
    e->data = data;
    r->n++;
    return e;
}

int bnb4_record_init(bnb4_record *r, const char *name, const nf4_tensor *t, q_err *err) {
    memset(r, 0, sizeof *r);
    if (strlen(name) + 48 >= sizeof r->names[0]) return q_err_set(err, "%s: tensor name too long", name);
    if (bnb4_quant_state_json(t, &r->json)) return q_err_set(err, "%s: out of memory", name);
    char qs[64];
    snprintf(qs, sizeof qs, ".quant_state.bitsandbytes__%s", nf4_qtype_name(t->qtype));
    record_add(r, name, "", Q_DTYPE_U8, nf4_packed_bytes(t->numel), 1, t->packed);
    if (t->nested) {
        record_add(r, name, ".absmax", Q_DTYPE_U8, t->nblocks, 0, t->qabsmax);
        record_add(r, name, ".nested_absmax", Q_DTYPE_F32, nf4_nblocks(t->nblocks, NF4_NESTED_BLOCKSIZE), 0,
                   t->nested_absmax);
        record_add(r, name, ".nested_quant_map", Q_DTYPE_F32, 256, 0, t->nested_map);
    } else {
        record_add(r, name, ".absmax", Q_DTYPE_F32, t->nblocks, 0, t->absmax);
    }
    record_add(r, name, ".quant_map", Q_DTYPE_F32, 16, 0, nf4_code_table(t->qtype));
    record_add(r, name, qs, Q_DTYPE_U8, (int64_t)r->json.len, 0, r->json.data);
    return 0;
}

void bnb4_record_free(bnb4_record *r) { q_buf_free(&r->json); }

bool bnb4_should_quantize(const char *name, const q_st_tensor *t) {
    static const char *const linears[] = {
        ".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
        ".self_attn.o_proj.weight", ".mlp.gate_proj.weight",    ".mlp.up_proj.weight",
        ".mlp.down_proj.weight",
    };
    if (t->ndim != 2 || !q_dtype_is_float(t->dtype)) return false;
    if (strncmp(name, "model.layers.", 13) != 0) return false;
    const char *p = name + 13;
    if (*p < '0' || *p > '9') return false;
    while (*p >= '0' && *p <= '9') p++;
    for (size_t i = 0; i < sizeof linears / sizeof linears[0]; i++)
        if (strcmp(p, linears[i]) == 0) return true;
    return false;
}

// ----------------------------------------------------------------------------
// reading

static const q_st_tensor *find_suffix(const q_st_model *m, const char *name, const char *suffix) {
    char key[1024];
    if (snprintf(key, sizeof key, "%s%s", name, suffix) >= (int)sizeof key) return NULL;
    return q_st_model_find(m, key);
}

static const q_st_tensor *find_quant_state(const q_st_model *m, const char *name, nf4_qtype *qt) {
    const q_st_tensor *t = find_suffix(m, name, ".quant_state.bitsandbytes__nf4");
    if (t) { *qt = NF4_QTYPE_NF4; return t; }
    t = find_suffix(m, name, ".quant_state.bitsandbytes__fp4");
    if (t) *qt = NF4_QTYPE_FP4;
    return t;
}

bool bnb4_is_quantized(const q_st_model *m, const char *name) {
    nf4_qtype qt;
    return find_quant_state(m, name, &qt) != NULL;
}

// A tensor of the expected dtype and element count, or an error naming it.
static const q_st_tensor *need(const q_st_model *m, const char *name, const char *suffix, q_dtype dt,
                               int64_t numel, q_err *err) {
    const q_st_tensor *t = find_suffix(m, name, suffix);
    if (!t) { q_err_set(err, "%s%s: missing from the bnb-4bit checkpoint", name, suffix); return NULL; }
    if (t->dtype != dt || t->numel != numel) {
        q_err_set(err, "%s%s: expected %s with %lld elements, found %s with %lld", name, suffix, q_dtype_name(dt),
                  (long long)numel, q_dtype_name(t->dtype), (long long)t->numel);
        return NULL;
    }
    return t;
}

static int json_int(const q_json *o, const char *key, int64_t *v, const char *name, q_err *err) {
    const q_json *j = q_json_get(o, key);
    if (!j || j->type != Q_JSON_NUMBER || !j->is_int)
        return q_err_set(err, "%s: quant_state lacks integer \"%s\"", name, key);
    *v = j->integer;
    return 0;
}

static void *dup_bytes(const void *src, size_t n) {
    void *p = malloc(n ? n : 1);
    if (p) memcpy(p, src, n);
    return p;
}

int bnb4_load(const q_st_model *m, const char *name, nf4_tensor *t, q_err *err) {
    memset(t, 0, sizeof *t);
    nf4_qtype qt;
    const q_st_tensor *qs = find_quant_state(m, name, &qt);
    if (!qs) return q_err_set(err, "%s: no quant_state.bitsandbytes__nf4/fp4 tensor: not a bnb-4bit weight", name);
    q_json *j = NULL;
    if (qs->dtype != Q_DTYPE_U8 || q_json_parse(qs->data, qs->nbytes, &j, err))
        return q_err_wrap(err, "%s: bad quant_state", name);
    int rc = -1;
    const q_json *v;
    int64_t bs = 0;
    if (json_int(j, "blocksize", &bs, name, err)) goto done;
    if (nf4_blocksize_check(bs, err)) { q_err_wrap(err, "%s", name); goto done; }
    v = q_json_get(j, "quant_type");
    nf4_qtype qt_json;
    if (!v || v->type != Q_JSON_STRING || nf4_qtype_from_name(v->string, &qt_json) || qt_json != qt) {
        q_err_set(err, "%s: quant_state quant_type does not match its key", name);
        goto done;
    }
    v = q_json_get(j, "dtype");
    if (!v || v->type != Q_JSON_STRING || q_dtype_from_torch_name(v->string, &t->dtype) ||
        !q_dtype_is_float(t->dtype)) {
        q_err_set(err, "%s: quant_state dtype missing or not float32/float16/bfloat16", name);
        goto done;
    }
    v = q_json_get(j, "shape");
    if (!v || v->type != Q_JSON_ARRAY || v->count < 1 || v->count > 4) {
        q_err_set(err, "%s: quant_state shape missing or not 1 to 4 dimensions", name);
        goto done;
    }
    t->ndim = (int)v->count;
    t->numel = 1;
    for (size_t i = 0; i < v->count; i++) {
        const q_json *d = &v->items[i];
        if (d->type != Q_JSON_NUMBER || !d->is_int || d->integer <= 0 || d->integer > ((int64_t)1 << 40) ||
            t->numel > ((int64_t)1 << 40) / d->integer) {
            q_err_set(err, "%s: quant_state shape has a bad dimension", name);
            goto done;
        }
        t->shape[i] = d->integer;
        t->numel *= d->integer;
    }
    t->qtype = qt;
    t->blocksize = bs;
    t->nblocks = nf4_nblocks(t->numel, bs);
    t->nested = q_json_get(j, "nested_offset") != NULL;
    const q_st_tensor *packed = need(m, name, "", Q_DTYPE_U8, nf4_packed_bytes(t->numel), err);
    if (!packed) goto done;
    t->packed = dup_bytes(packed->data, packed->nbytes);
    if (!t->nested) {
        const q_st_tensor *a = need(m, name, ".absmax", Q_DTYPE_F32, t->nblocks, err);
        if (!a) goto done;
        t->absmax = dup_bytes(a->data, a->nbytes);
    } else {
        int64_t nbs = 0;
        if (json_int(j, "nested_blocksize", &nbs, name, err)) goto done;
        if (nbs != NF4_NESTED_BLOCKSIZE) {
            q_err_set(err, "%s: nested_blocksize %lld is not supported (only 256)", name, (long long)nbs);
            goto done;
        }
        v = q_json_get(j, "nested_offset");
        if (v->type != Q_JSON_NUMBER) { q_err_set(err, "%s: nested_offset is not a number", name); goto done; }
        t->offset = (float)v->number;
        const q_st_tensor *qa = need(m, name, ".absmax", Q_DTYPE_U8, t->nblocks, err);
        const q_st_tensor *na = qa ? need(m, name, ".nested_absmax", Q_DTYPE_F32,
                                          nf4_nblocks(t->nblocks, NF4_NESTED_BLOCKSIZE), err) : NULL;
        const q_st_tensor *nm = na ? need(m, name, ".nested_quant_map", Q_DTYPE_F32, 256, err) : NULL;
        if (!nm) goto done;
        t->qabsmax = dup_bytes(qa->data, qa->nbytes);
        t->nested_absmax = dup_bytes(na->data, na->nbytes);
        memcpy(t->nested_map, nm->data, sizeof t->nested_map);
    }
    if (!t->packed || (!t->absmax && !t->qabsmax) || (t->nested && !t->nested_absmax)) {
        q_err_set(err, "%s: out of memory", name);
        goto done;
    }
    rc = 0;
done:
    q_json_free(j);
    if (rc) nf4_tensor_free(t);
    return rc;
}
