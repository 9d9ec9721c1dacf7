// train/cmd_dequantize.c: `qlora dequantize CKPT OUT.safetensors` writes every
// tensor of a checkpoint with its bnb-4bit weights dequantized back to their
// original dtype, in bitsandbytes' order of operations. For merging, for
// other tools, and for checking qlora's files against bitsandbytes.
#include "train.h"

#include <stdio.h>
#include <stdlib.h>

static bool is_aux(const q_st_model *m, const char *name) {
    const char *dot = strrchr(name, '.');
    char owner[1024];
    // auxiliary names end in .absmax, .quant_map, ... or .quant_state.bitsandbytes__*
    const char *qs = strstr(name, ".quant_state.");
    size_t l = qs ? (size_t)(qs - name) : dot ? (size_t)(dot - name) : 0;
    if (!l || l >= sizeof owner) return false;
    memcpy(owner, name, l);
    owner[l] = 0;
    return bnb4_is_quantized(m, owner);
}

int cmd_dequantize(int argc, char **argv) {
    if (argc != 2 || argv[0][0] == '-') {
        fprintf(stderr, "usage: qlora dequantize CHECKPOINT OUT.safetensors\n");
        return 2;
    }
    q_st_model m;
    q_err err = {{0}};
    if (q_st_model_open(&m, argv[0], &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    q_st_entry *e = calloc(m.n_tensors, sizeof *e);
    void **owned = calloc(m.n_tensors, sizeof *owned);
    size_t n = 0, nq = 0;
    int rc = 1;
    if (!e || !owned) { fprintf(stderr, "error: out of memory\n"); goto done; }
    for (size_t i = 0; i < m.n_tensors; i++) {
        const q_st_tensor *t = m.tensors[i];
        if (is_aux(&m, t->name)) continue;
        e[n].name = t->name;
        if (!bnb4_is_quantized(&m, t->name)) {
            e[n].dtype = t->dtype;
            e[n].ndim = t->ndim;
            memcpy(e[n].shape, t->shape, sizeof e[n].shape);
            e[n++].data = t->data;
            continue;
        }
        nf4_tensor q;
        if (bnb4_load(&m, t->name, &q, &err)) { fprintf(stderr, "error: %s\n", err.msg); goto done; }
        owned[n] = malloc((size_t)q.numel * q_dtype_size(q.dtype));
        nf4_view v = nf4_tensor_view(&q);
        if (!owned[n] || nf4_dequantize(&v, owned[n], q.dtype, &err)) {
            fprintf(stderr, "error: %s: %s\n", t->name, owned[n] ? err.msg : "out of memory");
            nf4_tensor_free(&q);
            goto done;
        }
        e[n].dtype = q.dtype;
        e[n].ndim = q.ndim;
        memcpy(e[n].shape, q.shape, sizeof q.shape);
        e[n].data = owned[n];
        n++, nq++;
        nf4_tensor_free(&q);
    }
    if (q_st_write(argv[1], e, n, NULL, NULL, 0, &err)) { fprintf(stderr, "error: %s\n", err.msg); goto done; }
    printf("wrote %s: %zu tensors, %zu dequantized from 4-bit\n", argv[1], n, nq);
    rc = 0;
done:
    for (size_t i = 0; owned && i < m.n_tensors; i++) free(owned[i]);
    free(owned);
    free(e);
    q_st_model_close(&m);
    return rc;
}
