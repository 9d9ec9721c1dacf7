// train/cmd_train.c: `qlora train RECIPE.yaml [key=value ...] [--resume]`.
#include "train.h"

#include <stdlib.h>

static int usage(void) {
    fprintf(stderr,
            "usage: qlora train RECIPE.yaml [key=value ...] [--resume] [--stop-after N]\n"
            "       qlora train --keys            list every recipe key with its default\n"
            "Fine-tunes LoRA adapters on a frozen NF4 base as the recipe says. key=value overrides a recipe key\n"
            "(qlora train recipes/quickstart.yaml lora.r=32 optim.lr=1e-4). --resume continues from the newest\n"
            "checkpoint in run.dir; --stop-after N pauses after update N (checkpointed).\n");
    return 2;
}

int cmd_train(int argc, char **argv) {
    const char *path = NULL;
    bool resume = false;
    long long stop_after = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return usage(), 0;
        if (strcmp(argv[i], "--keys") == 0) {
            recipe_print_keys(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--resume") == 0) resume = true;
        else if (strcmp(argv[i], "--stop-after") == 0 && i + 1 < argc) stop_after = atoll(argv[++i]);
        else if (!strchr(argv[i], '=') && argv[i][0] != '-' && !path) path = argv[i];
        else if (argv[i][0] == '-') {
            fprintf(stderr, "error: qlora train: unknown option '%s'\n", argv[i]);
            return usage();
        }
    }
    if (!path) return usage();
    recipe *r = malloc(sizeof *r);
    q_err err;
    if (!r) return fprintf(stderr, "error: out of memory\n"), 1;
    recipe_defaults(r);
    int rc = recipe_load(r, path, &err);
    for (int i = 0; i < argc && !rc; i++)
        if (strchr(argv[i], '=') && argv[i][0] != '-') rc = recipe_override(r, argv[i], &err);
    if (!rc) rc = recipe_validate(r, &err);
    if (!rc) rc = train_run(r, resume, stop_after, &err);
    if (rc) fprintf(stderr, "error: %s\n", err.msg);
    free(r);
    return rc ? 1 : 0;
}
