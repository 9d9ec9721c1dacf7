// train/cmd_inspect.c: `qlora inspect PATH` summarizes a safetensors file or
// model folder: tensors, dtypes, parameters, bytes, and bits per parameter,
// counting a bnb-4bit weight and its scale tensors as one logical weight.
#include "train.h"

#include <stdio.h>
#include <stdlib.h>

// The weight a bnb-4bit auxiliary tensor belongs to: "P.weight.absmax" -> "P.weight".
static bool aux_of(const char *name, char *owner, size_t size) {
    static const char *const sfx[] = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                      ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"};
    size_t l = strlen(name);
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++) {
        size_t k = strlen(sfx[i]);
        if (l > k && strcmp(name + l - k, sfx[i]) == 0 && l - k < size) {
            memcpy(owner, name, l - k);
            owner[l - k] = 0;
            return true;
        }
    }
    return false;
}

static void shape_str(const int64_t *shape, int ndim, char *out, size_t size) {
    int k = snprintf(out, size, "[");
    for (int i = 0; i < ndim && k < (int)size; i++) k += snprintf(out + k, size - k, i ? ", %lld" : "%lld",
                                                                   (long long)shape[i]);
    if (k < (int)size) snprintf(out + k, size - k, "]");
}

int cmd_inspect(int argc, char **argv) {
    const char *path = NULL;
    bool list = true;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--summary") == 0) list = false;
        else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) path = NULL, argc = 0;
        else if (!path) path = argv[i];
        else { fprintf(stderr, "error: unexpected argument %s\n", argv[i]); return 2; }
    }
    if (!path) {
        fprintf(stderr, "usage: qlora inspect PATH [--summary]\n"
                        "  PATH: a .safetensors file, or a folder with model.safetensors or an index\n");
        return 2;
    }
    q_st_model m;
    q_err err = {{0}};
    if (q_st_model_open(&m, path, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    int64_t params = 0, bytes = 0, q_params = 0, q_core = 0, q_aux = 0, n_q = 0;
    int64_t by_dtype[Q_DTYPE_COUNT] = {0};
    char owner[1024], shp[128];
    for (size_t i = 0; i < m.n_tensors; i++) {
        const q_st_tensor *t = m.tensors[i];
        bytes += (int64_t)t->nbytes;
        by_dtype[t->dtype] += (int64_t)t->numel;
        if (aux_of(t->name, owner, sizeof owner) && bnb4_is_quantized(&m, owner)) {
            // absmax codes and nested scales cost bits per weight; the fixed maps and JSON do not scale
            bool per_weight = strstr(t->name + strlen(owner), "absmax") != NULL;
            *(per_weight ? &q_core : &q_aux) += (int64_t)t->nbytes;
            continue;
        }
        if (bnb4_is_quantized(&m, t->name)) {
            nf4_tensor q;
            if (bnb4_load(&m, t->name, &q, &err)) {
                fprintf(stderr, "error: %s\n", err.msg);
                q_st_model_close(&m);
                return 1;
            }
            shape_str(q.shape, q.ndim, shp, sizeof shp);
            if (list)
                printf("%-64s %-4s %-14s %s block %lld%s\n", t->name, nf4_qtype_name(q.qtype), shp,
                       q_dtype_torch_name(q.dtype), (long long)q.blocksize, q.nested ? " double-quant" : "");
            params += q.numel;
            q_params += q.numel;
            q_core += (int64_t)t->nbytes;
            n_q++;
            nf4_tensor_free(&q);
            continue;
        }
        shape_str(t->shape, t->ndim, shp, sizeof shp);
        if (list) printf("%-64s %-4s %s\n", t->name, q_dtype_name(t->dtype), shp);
        params += t->numel;
    }
    printf("%s: %zu tensors in %zu file%s, %.2f MB\n", path, m.n_tensors, m.n_files, m.n_files == 1 ? "" : "s",
           bytes / 1e6);
    printf("  stored elements by dtype:");
    for (int d = 0; d < Q_DTYPE_COUNT; d++)
        if (by_dtype[d]) printf(" %s %lld", q_dtype_name((q_dtype)d), (long long)by_dtype[d]);
    printf("\n  parameters: %lld (%.1f M), %.3f bits per parameter overall\n", (long long)params, params / 1e6,
           params ? bytes * 8.0 / (double)params : 0.0);
    if (n_q)
        printf("  4-bit weights: %lld tensors, %lld parameters, %.3f bits per parameter "
               "(%.3f with per-tensor code maps and quant_state)\n",
               (long long)n_q, (long long)q_params, q_core * 8.0 / (double)q_params,
               (q_core + q_aux) * 8.0 / (double)q_params);
    q_st_model_close(&m);
    return 0;
}
