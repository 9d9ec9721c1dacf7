// tests/test_recipe.c: YAML recipes. Defaults against the QLoRA reference
// values (recipes-and-qat.md B3), nested and dotted spellings, every kind of
// error with its exact message, overrides, the resolved-recipe writer read
// back into an identical struct, and the recipes shipped in recipes/.
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

#include "test_util.h"
#include "train/train.h"

#define ALL_LINEAR ((1u << LIN_COUNT) - 1)

static int parse(recipe *r, const char *yaml, q_err *err) {
    return recipe_parse(r, yaml, strlen(yaml), "x.yaml", err);
}

// Parses yaml over the defaults and expects failure with exactly `msg`.
static void expect_error(const char *yaml, const char *msg) {
    recipe r;
    q_err err = {{0}};
    recipe_defaults(&r);
    const int rc = parse(&r, yaml, &err);
    CU_ASSERT_EQUAL(rc, -1);
    if (rc == 0 || strcmp(err.msg, msg) != 0)
        fprintf(stderr, "\n  yaml:     %s\n  expected: %s\n  got:      %s\n", yaml, msg, rc ? err.msg : "(success)");
    CU_ASSERT_STRING_EQUAL(err.msg, msg);
}

// Same, for an override.
static void expect_override_error(const char *assignment, const char *msg) {
    recipe r;
    q_err err = {{0}};
    recipe_defaults(&r);
    const int rc = recipe_override(&r, assignment, &err);
    CU_ASSERT_EQUAL(rc, -1);
    if (rc == 0 || strcmp(err.msg, msg) != 0)
        fprintf(stderr, "\n  override: %s\n  expected: %s\n  got:      %s\n", assignment, msg, rc ? err.msg : "(success)");
    CU_ASSERT_STRING_EQUAL(err.msg, msg);
}

// ----------------------------------------------------------------------------
// defaults

static void test_defaults(void) {
    recipe r;
    recipe_defaults(&r);
    // QLoRA (artidoro/qlora qlora.py): r 64, alpha 16, dropout 0, lr 2e-4
    // constant with warmup_ratio 0.03, max_grad_norm 0.3, weight decay 0,
    // batch 1 x 16, train_on_source False, gradient checkpointing; bnb NF4 block 64.
    CU_ASSERT_EQUAL(r.lora_r, 64);
    CU_ASSERT_EQUAL(r.lora_alpha, 16.0);
    CU_ASSERT_EQUAL(r.lora_dropout, 0.0);
    CU_ASSERT_FALSE(r.lora_rslora);
    CU_ASSERT_EQUAL(r.lora_targets, ALL_LINEAR);
    CU_ASSERT_EQUAL(r.optim_lr, 2e-4);
    CU_ASSERT_STRING_EQUAL(r.sched_name, "constant");
    CU_ASSERT_EQUAL(r.sched_warmup_ratio, 0.03);
    CU_ASSERT_EQUAL(r.sched_warmup_steps, 0);
    CU_ASSERT_EQUAL(r.sched_final_lr_frac, 0.0);
    CU_ASSERT_EQUAL(r.optim_max_grad_norm, 0.3);
    CU_ASSERT_EQUAL(r.optim_weight_decay, 0.0);
    CU_ASSERT_EQUAL(r.optim_beta1, 0.9);
    CU_ASSERT_EQUAL(r.optim_beta2, 0.999);
    CU_ASSERT_EQUAL(r.optim_eps, 1e-8);
    CU_ASSERT_EQUAL(r.train_micro_batch_size, 1);
    CU_ASSERT_EQUAL(r.train_gradient_accumulation_steps, 16);
    CU_ASSERT_EQUAL(r.train_epochs, 1);
    CU_ASSERT_EQUAL(r.train_max_steps, 0);
    CU_ASSERT_TRUE(r.train_recompute);
    CU_ASSERT_EQUAL(r.train_threads, 0);
    CU_ASSERT_EQUAL(r.train_log_every, 1);
    CU_ASSERT_FALSE(r.data_train_on_inputs);
    CU_ASSERT_EQUAL(r.quant_block_size, 64);
    CU_ASSERT_EQUAL(r.seed, 42u);
    CU_ASSERT_STRING_EQUAL(r.run_dir, "runs/qlora");
    CU_ASSERT_STRING_EQUAL(r.model_path, "");
    CU_ASSERT_STRING_EQUAL(r.tokenizer_path, "");
    CU_ASSERT_EQUAL(r.data_format, DATA_FORMAT_ALPACA);
    CU_ASSERT_EQUAL(r.data_template, DATA_TEMPLATE_ALPACA);
    CU_ASSERT_STRING_EQUAL(r.data_prompt_field, "question");  // data.h's documented defaults
    CU_ASSERT_STRING_EQUAL(r.data_response_field, "answer");
    CU_ASSERT_STRING_EQUAL(r.data_text_field, "text");
    CU_ASSERT_STRING_EQUAL(r.data_system_prompt, "");
    CU_ASSERT_FALSE(r.data_packing);
    CU_ASSERT_FALSE(r.data_skip_bad_lines);
    CU_ASSERT_EQUAL(r.data_seq_len, 1024);
    CU_ASSERT_EQUAL(r.data_max_examples, 0);
    CU_ASSERT_EQUAL(r.eval_split, 0.0);
    CU_ASSERT_EQUAL(r.eval_max_examples, 256);
    CU_ASSERT_EQUAL(r.eval_every_n_steps, 0);
    CU_ASSERT_EQUAL(r.eval_max_batches, 0);
    CU_ASSERT_EQUAL(r.ckpt_every_n_steps, 250);
    CU_ASSERT_EQUAL(r.ckpt_keep, 3);
    CU_ASSERT(r.sample_count > 0);
    CU_ASSERT_EQUAL(r.sample_max_new_tokens, 128);

    // an empty file and a comment-only file change nothing
    recipe e = r;
    q_err err;
    TEST_OK(parse(&e, "", &err), &err);
    TEST_OK(parse(&e, "# nothing\n", &err), &err);
    CU_ASSERT_EQUAL(memcmp(&e, &r, sizeof r), 0);
}

// ----------------------------------------------------------------------------
// spellings

static void test_nested_and_dotted(void) {
    const char *nested =
        "seed: 7\n"
        "lora:\n  r: 16\n  alpha: 32\n  dropout: 0.05\n  targets: [q_proj, v, down_proj]\n"
        "data:\n  path: d.jsonl\n  format: completion\n  template: chatml\n  packing: yes\n"
        "  system_prompt: 'You are: helpful'\n"
        "optim: {lr: 3e-4, max_grad_norm: 1}\n"
        "train:\n  recompute: none\n"
        "sched:\n  name: cosine\n  warmup_steps: 10\n";
    const char *dotted =
        "seed: 7\n"
        "lora.r: 16\nlora.alpha: 32\nlora.dropout: 0.05\nlora.targets:\n  - q_proj\n  - v_proj\n  - down\n"
        "data.path: \"d.jsonl\"\ndata.format: completion\ndata.template: chatml\ndata.packing: true\n"
        "data.system_prompt: \"You are: helpful\"\n"
        "optim.lr: 0.0003\noptim.max_grad_norm: 1.0\n"
        "train.recompute: none\n"
        "sched.name: cosine\nsched.warmup_steps: 10\n";
    recipe a, b;
    q_err err;
    recipe_defaults(&a);
    recipe_defaults(&b);
    TEST_OK(parse(&a, nested, &err), &err);
    TEST_OK(parse(&b, dotted, &err), &err);
    CU_ASSERT_EQUAL(memcmp(&a, &b, sizeof a), 0);

    CU_ASSERT_EQUAL(a.seed, 7u);
    CU_ASSERT_EQUAL(a.lora_r, 16);
    CU_ASSERT_EQUAL(a.lora_alpha, 32.0);
    CU_ASSERT_EQUAL(a.lora_dropout, 0.05);
    CU_ASSERT_EQUAL(a.lora_targets, (1u << LIN_Q) | (1u << LIN_V) | (1u << LIN_DOWN));
    CU_ASSERT_STRING_EQUAL(a.data_path, "d.jsonl");
    CU_ASSERT_EQUAL(a.data_format, DATA_FORMAT_COMPLETION);
    CU_ASSERT_EQUAL(a.data_template, DATA_TEMPLATE_CHATML);
    CU_ASSERT_TRUE(a.data_packing);
    CU_ASSERT_STRING_EQUAL(a.data_system_prompt, "You are: helpful");
    CU_ASSERT_EQUAL(a.optim_lr, 3e-4);
    CU_ASSERT_EQUAL(a.optim_max_grad_norm, 1.0);
    CU_ASSERT_FALSE(a.train_recompute);
    CU_ASSERT_STRING_EQUAL(a.sched_name, "cosine");
    CU_ASSERT_EQUAL(a.sched_warmup_steps, 10);
    // setting warmup_steps replaces the default warmup_ratio (they are exclusive)
    CU_ASSERT_EQUAL(a.sched_warmup_ratio, 0.0);
    // keys not written keep their defaults
    CU_ASSERT_EQUAL(a.train_gradient_accumulation_steps, 16);

    // a file applies over the current values, not over the defaults
    TEST_OK(parse(&a, "lora: {r: 8}\n", &err), &err);
    CU_ASSERT_EQUAL(a.lora_r, 8);
    CU_ASSERT_EQUAL(a.lora_alpha, 32.0);

    // the fixed keys accept their one implemented value; "lora:" alone is an empty section
    TEST_OK(parse(&a, "quant:\n  base: nf4\n  double_quant: true\noptim.name: adamw\nlora:\n", &err), &err);
    // YAML null clears a string; a quoted "null" is the text
    TEST_OK(parse(&a, "data.system_prompt: ~\nmodel.tokenizer: 'null'\n", &err), &err);
    CU_ASSERT_STRING_EQUAL(a.data_system_prompt, "");
    CU_ASSERT_STRING_EQUAL(a.tokenizer_path, "null");
    // YAML anchors and aliases resolve
    TEST_OK(parse(&a, "ckpt.every_n_steps: &n 50\neval.every_n_steps: *n\neval.split: 0.1\n", &err), &err);
    CU_ASSERT_EQUAL(a.ckpt_every_n_steps, 50);
    CU_ASSERT_EQUAL(a.eval_every_n_steps, 50);
    // seeds use the whole 64-bit range
    TEST_OK(parse(&a, "seed: 18446744073709551615\n", &err), &err);
    CU_ASSERT_EQUAL(a.seed, UINT64_MAX);
}

// ----------------------------------------------------------------------------
// errors

static void test_unknown_keys(void) {
    // typos, nearest key within the section
    expect_error("lora:\n  r: 16\n  rank: 16\n", "x.yaml:3: unknown key 'lora.rank' (did you mean 'lora.r'?)");
    expect_error("lora.alhpa: 16\n", "x.yaml:1: unknown key 'lora.alhpa' (did you mean 'lora.alpha'?)");
    expect_error("optim:\n  lr: 1e-4\n  weight_decy: 0.1\n",
                 "x.yaml:3: unknown key 'optim.weight_decy' (did you mean 'optim.weight_decay'?)");
    expect_error("sed: 3\n", "x.yaml:1: unknown key 'sed' (did you mean 'seed'?)");
    // the right key in the wrong section
    expect_error("train:\n  lr: 1e-4\n", "x.yaml:2: unknown key 'train.lr' (did you mean 'optim.lr'?)");
    expect_error("data.dropout: 0.1\n", "x.yaml:1: unknown key 'data.dropout' (did you mean 'lora.dropout'?)");
    // other trainers' names (axolotl, torchtune, HF)
    expect_error("learning_rate: 0.0002\n", "x.yaml:1: unknown key 'learning_rate' (did you mean 'optim.lr'?)");
    expect_error("sequence_len: 2048\n", "x.yaml:1: unknown key 'sequence_len' (did you mean 'data.seq_len'?)");
    expect_error("lora_target_modules: [q_proj]\n",
                 "x.yaml:1: unknown key 'lora_target_modules' (did you mean 'lora.targets'?)");
    expect_error("sample_packing: true\n", "x.yaml:1: unknown key 'sample_packing' (did you mean 'data.packing'?)");
    // nothing close
    expect_error("flux_capacitor: 1\n",
                 "x.yaml:1: unknown key 'flux_capacitor' (sections: seed, run, model, quant, lora, data, eval, "
                 "train, optim, sched, ckpt, sample; `qlora train --help` lists every key)");
}

static void test_type_errors(void) {
    expect_error("lora:\n  r: sixteen\n", "x.yaml:2: lora.r: expected an integer, got 'sixteen'");
    expect_error("lora.r: 16.5\n", "x.yaml:1: lora.r: expected an integer, got '16.5'");
    expect_error("lora.r:\n", "x.yaml:1: lora.r: expected an integer, got nothing");
    expect_error("optim.lr: fast\n", "x.yaml:1: optim.lr: expected a number, got 'fast'");
    expect_error("optim.lr: .nan\n", "x.yaml:1: optim.lr: expected a number, got '.nan'");
    expect_error("data.packing: maybe\n", "x.yaml:1: data.packing: expected true or false, got 'maybe'");
    expect_error("seed: -1\n", "x.yaml:1: seed: expected a non-negative integer below 2^64, got '-1'");
    expect_error("lora.r: [1, 2]\n", "x.yaml:1: lora.r: expected an integer, got a list");
    expect_error("optim:\n  lr: {a: 1}\n", "x.yaml:2: optim.lr: expected a number, got a mapping");
    expect_error("lora: 16\n",
                 "x.yaml:1: 'lora' is a section: write its keys under it (lora.r, lora.alpha, lora.dropout, "
                 "lora.rslora, lora.targets), not a value");
    expect_error("- lora.r\n", "x.yaml:1: a recipe is a mapping of keys (lora.r: 16, ...), got a list");
    expect_error("[a]: 1\n", "x.yaml:1: keys must be plain names, got a list");
    expect_error("data.prompt_field: "
                 "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
                 "x.yaml:1: data.prompt_field: longer than 63 bytes");
    expect_error("data.path: \"a\\0b\"\n", "x.yaml:1: data.path: the value contains a NUL byte");
}

static void test_range_errors(void) {
    expect_error("optim:\n  lr: 0\n", "x.yaml:2: optim.lr must be > 0, got 0");
    expect_error("optim.lr: -1e-4\n", "x.yaml:1: optim.lr must be > 0, got -1e-4");
    expect_error("lora.r: 0\n", "x.yaml:1: lora.r must be in [1, 4096], got 0");
    expect_error("lora.dropout: 1\n", "x.yaml:1: lora.dropout must be in [0, 1), got 1");
    expect_error("eval.split: 1.0\n", "x.yaml:1: eval.split must be in [0, 1), got 1.0");
    expect_error("optim.beta2: 1\n", "x.yaml:1: optim.beta2 must be in [0, 1), got 1");
    expect_error("train.micro_batch_size: 0\n", "x.yaml:1: train.micro_batch_size must be in [1, 65536], got 0");
    expect_error("quant.block_size: 48\n", "x.yaml:1: quant.block_size must be a power of 2 in [32, 4096], got 48");
    expect_error("quant.block_size: 8192\n",
                 "x.yaml:1: quant.block_size must be a power of 2 in [32, 4096], got 8192");
    expect_error("quant.block_size: 16\n", "x.yaml:1: quant.block_size must be a power of 2 in [32, 4096], got 16");
    expect_error("data.max_examples: -5\n", "x.yaml:1: data.max_examples must be >= 0, got -5");
}

static void test_choice_errors(void) {
    expect_error("quant:\n  base: fp4\n",
                 "x.yaml:2: quant.base: 'fp4' is planned but not implemented yet; only nf4 is (4-bit format of the "
                 "frozen base weights: NF4 with double-quantized block scales, as bitsandbytes)");
    expect_error("quant.base: int8\n",
                 "x.yaml:1: quant.base: 'int8' is not supported; only nf4 is implemented (4-bit format of the frozen "
                 "base weights: NF4 with double-quantized block scales, as bitsandbytes)");
    expect_error("quant.double_quant: false\n",
                 "x.yaml:1: quant.double_quant: 'false' is not supported; only true is implemented (block scales "
                 "stored as 8 bits in groups of 256 (bnb_4bit_use_double_quant=True))");
    expect_error("optim.name: paged_adamw8bit\n",
                 "x.yaml:1: optim.name: 'paged_adamw8bit' is planned but not implemented yet; only adamw is "
                 "(optimizer: AdamW with fp32 state (8-bit and paged variants are planned))");
    expect_error("optim.name: sgd\n",
                 "x.yaml:1: optim.name: 'sgd' is not supported; only adamw is implemented (optimizer: AdamW with "
                 "fp32 state (8-bit and paged variants are planned))");
    expect_error("sched.name: wsd\n",
                 "x.yaml:1: sched.name: 'wsd' is planned but not implemented yet (available: constant, linear, cosine)");
    expect_error("sched.name: step\n",
                 "x.yaml:1: sched.name: expected one of constant, linear, cosine, got 'step'; planned: wsd");
    expect_error("train.recompute: mlp\n",
                 "x.yaml:1: train.recompute: 'mlp' is planned but not implemented yet (available: none, all)");
    expect_error("train.recompute: true\n",
                 "x.yaml:1: train.recompute: expected one of none, all, got 'true'; planned: mlp");
    expect_error("data.format: sharegpt\n",
                 "x.yaml:1: data.format: unknown data format 'sharegpt' (use alpaca, chat, completion or text)");
    expect_error("data.template: vicuna\n",
                 "x.yaml:1: data.template: unknown template 'vicuna' (use chatml, llama3, alpaca or plain)");
    expect_error("lora.targets: [q_proj, lm_head]\n",
                 "x.yaml:1: lora.targets: unknown LoRA target module \"lm_head\" (use q_proj, k_proj, v_proj, o_proj, "
                 "gate_proj, up_proj, down_proj, their short names q, k, v, o, gate, up, down, or all-linear)");
    expect_error("lora:\n  targets:\n    - q_proj\n    - [v_proj]\n",
                 "x.yaml:4: lora.targets: expected module names, got a list");
    expect_error("lora.targets: []\n", "x.yaml:1: lora.targets: empty list (name some modules, or write all-linear)");
}

static void test_structure_errors(void) {
    expect_error("lora.r: 8\noptim.lr: 1e-4\nlora:\n  r: 16\n", "x.yaml:4: duplicate key 'lora.r' (first set at line 1)");
    expect_error("seed: 1\nseed: 2\n", "x.yaml:2: duplicate key 'seed' (first set at line 1)");
    // libyaml's own description and position
    expect_error("lora:\n  r: 16\n alpha: 3\n",
                 "x.yaml:3: YAML syntax error: did not find expected key while parsing a block mapping (column 2)");
    expect_error("lora: {r: 16\n", "x.yaml:2: YAML syntax error: did not find expected ',' or '}' while parsing a "
                                   "flow mapping (column 1)");
    expect_error("a: 'unterminated\n",
                 "x.yaml:2: YAML syntax error: found unexpected end of stream while scanning a quoted scalar "
                 "(column 1)");
    expect_error("seed: 1\n---\nseed: 2\n", "x.yaml:3: more than one YAML document; a recipe is one");
}

static void test_cross_field_errors(void) {
    expect_error("sched:\n  warmup_steps: 100\n  warmup_ratio: 0.1\n",
                 "x.yaml:3: sched.warmup_steps and sched.warmup_ratio are both set; set only one");
    expect_error("train: {epochs: 0, max_steps: 0}\n",
                 "x.yaml: train.epochs and train.max_steps are both 0: nothing to train");
    expect_error("train.max_steps: 50\nsched.warmup_steps: 100\n",
                 "x.yaml: sched.warmup_steps (100) exceeds train.max_steps (50)");
    expect_error("data.format: completion\ndata.prompt_field: ''\n",
                 "x.yaml: data.format completion needs data.prompt_field and data.response_field");
    expect_error("data: {format: text, text_field: ''}\n", "x.yaml: data.format text needs data.text_field");
    expect_error("data.format: chat\n",
                 "x.yaml: data.format chat needs a chat template (data.template chatml or llama3), not alpaca");
    expect_error("eval:\n  every_n_steps: 10\n",
                 "x.yaml:2: eval.every_n_steps is set but eval.split is 0: nothing is held out to evaluate");

    // a failed parse changes nothing, even keys set before the bad one
    recipe r, before;
    q_err err;
    recipe_defaults(&r);
    before = r;
    CU_ASSERT_EQUAL(parse(&r, "lora.r: 8\noptim.lr: 0\n", &err), -1);
    CU_ASSERT_EQUAL(memcmp(&r, &before, sizeof r), 0);

    // a missing file names the path
    CU_ASSERT_EQUAL(recipe_load(&r, "/nonexistent/recipe.yaml", &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "/nonexistent/recipe.yaml"));
}

// ----------------------------------------------------------------------------
// overrides

static void test_overrides(void) {
    recipe r;
    q_err err;
    recipe_defaults(&r);
    TEST_OK(recipe_override(&r, "lora.r=32", &err), &err);
    CU_ASSERT_EQUAL(r.lora_r, 32);
    TEST_OK(recipe_override(&r, "lora.targets=q_proj,v_proj", &err), &err);
    CU_ASSERT_EQUAL(r.lora_targets, (1u << LIN_Q) | (1u << LIN_V));
    TEST_OK(recipe_override(&r, "lora.targets=all-linear", &err), &err);
    CU_ASSERT_EQUAL(r.lora_targets, ALL_LINEAR);
    TEST_OK(recipe_override(&r, "data.system_prompt=You are: helpful = kind", &err), &err);  // the first '=' splits
    CU_ASSERT_STRING_EQUAL(r.data_system_prompt, "You are: helpful = kind");
    TEST_OK(recipe_override(&r, "train.recompute=none", &err), &err);
    CU_ASSERT_FALSE(r.train_recompute);
    TEST_OK(recipe_override(&r, "optim.lr=5e-5", &err), &err);
    CU_ASSERT_EQUAL(r.optim_lr, 5e-5);
    TEST_OK(recipe_override(&r, "data.format=text", &err), &err);
    CU_ASSERT_EQUAL(r.data_format, DATA_FORMAT_TEXT);
    TEST_OK(recipe_override(&r, "model.tokenizer=", &err), &err);
    CU_ASSERT_STRING_EQUAL(r.tokenizer_path, "");
    // an overridden warmup_steps replaces the recipe's warmup_ratio
    CU_ASSERT_EQUAL(r.sched_warmup_ratio, 0.03);
    TEST_OK(recipe_override(&r, "sched.warmup_steps=20", &err), &err);
    CU_ASSERT_EQUAL(r.sched_warmup_steps, 20);
    CU_ASSERT_EQUAL(r.sched_warmup_ratio, 0.0);

    expect_override_error("lora.rnak=3", "override 'lora.rnak=3': unknown key 'lora.rnak' (did you mean 'lora.r'?)");
    expect_override_error("lora.r=sixteen", "override 'lora.r=sixteen': lora.r: expected an integer, got 'sixteen'");
    expect_override_error("optim.lr=0", "override 'optim.lr=0': optim.lr must be > 0, got 0");
    expect_override_error("lora.r", "override 'lora.r': expected key=value (for example lora.r=32)");
    expect_override_error("=3", "override '=3': expected key=value");

    // checks spanning keys wait for the whole recipe: overrides work in any order
    recipe a, b;
    recipe_defaults(&a);
    recipe_defaults(&b);
    TEST_OK(recipe_override(&a, "data.format=chat", &err), &err);
    TEST_OK(recipe_override(&a, "data.template=chatml", &err), &err);
    TEST_OK(recipe_override(&b, "data.template=chatml", &err), &err);
    TEST_OK(recipe_override(&b, "data.format=chat", &err), &err);
    CU_ASSERT_EQUAL(memcmp(&a, &b, sizeof a), 0);
    // and a failed override changes nothing
    b = a;
    CU_ASSERT_EQUAL(recipe_override(&a, "lora.dropout=2", &err), -1);
    CU_ASSERT_EQUAL(memcmp(&a, &b, sizeof a), 0);
}

// ----------------------------------------------------------------------------
// the resolved recipe

static int write_and_parse(const recipe *r, recipe *back, q_buf *text) {
    q_err err;
    memset(text, 0, sizeof *text);
    if (recipe_write_yaml(r, text)) return -1;
    recipe_defaults(back);
    const int rc = recipe_parse(back, text->data, text->len, "resolved.yaml", &err);
    if (rc) fprintf(stderr, "\n  %s\n%s\n", err.msg, text->data);
    return rc;
}

static void test_round_trip(void) {
    // defaults
    recipe r, back;
    q_buf y;
    recipe_defaults(&r);
    CU_ASSERT_EQUAL_FATAL(write_and_parse(&r, &back, &y), 0);
    CU_ASSERT_EQUAL(memcmp(&r, &back, sizeof r), 0);
    // every key appears, grouped under its section
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\nlora:\n  r: 64 "));
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\n  targets: all-linear "));
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\nquant:\n  base: nf4 "));
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\n  double_quant: true "));
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\noptim:\n  name: adamw "));
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\n  lr: 0.0002 "));
    q_buf_free(&y);

    // every field away from its default, with awkward strings and floats
    // whose shortest decimal form matters (0.1, 1e-05, 1/3)
    q_err err;
    const char *text =
        "seed: 12345678901234567\n"
        "run.dir: 'runs/a b'\n"
        "model: {path: \"m/\\\"quoted\\\"\\\\back\", tokenizer: t.json}\n"
        "quant.block_size: 128\n"
        "lora: {r: 7, alpha: 0.3333333333333333, dropout: 0.1, rslora: true, targets: [k, o, up]}\n"
        "data:\n"
        "  path: \"caf\\u00e9.jsonl\"\n"
        "  format: chat\n"
        "  template: llama3\n"
        "  prompt_field: q\n  response_field: r\n  text_field: body\n"
        "  system_prompt: \"line one\\nline two\\ttab \\x01 #not a comment\"\n"
        "  train_on_inputs: true\n  packing: true\n  skip_bad_lines: true\n  seq_len: 333\n  max_examples: 99\n"
        "eval: {split: 0.125, max_examples: 5, every_n_steps: 3, max_batches: 2}\n"
        "train: {micro_batch_size: 3, gradient_accumulation_steps: 5, epochs: 2, max_steps: 77, recompute: none,"
        " threads: 2, log_every: 4}\n"
        "optim: {lr: 1e-05, weight_decay: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-06, max_grad_norm: 0}\n"
        "sched: {name: linear, warmup_steps: 7, final_lr_frac: 0.1}\n"
        "ckpt: {every_n_steps: 11, keep: 0}\n"
        "sample: {count: 0, max_new_tokens: 9}\n";
    recipe_defaults(&r);
    TEST_OK(parse(&r, text, &err), &err);
    CU_ASSERT_STRING_EQUAL(r.model_path, "m/\"quoted\"\\back");
    CU_ASSERT_STRING_EQUAL(r.data_path, "caf\xc3\xa9.jsonl");
    CU_ASSERT_STRING_EQUAL(r.data_system_prompt, "line one\nline two\ttab \x01 #not a comment");
    CU_ASSERT_EQUAL(r.seed, 12345678901234567ull);
    CU_ASSERT_EQUAL(r.lora_alpha, 1.0 / 3.0);
    CU_ASSERT_EQUAL_FATAL(write_and_parse(&r, &back, &y), 0);
    CU_ASSERT_EQUAL(memcmp(&r, &back, sizeof r), 0);
    // and writing the read-back recipe gives the same text
    q_buf y2 = {0};
    CU_ASSERT_EQUAL(recipe_write_yaml(&back, &y2), 0);
    CU_ASSERT_STRING_EQUAL(y.data, y2.data);
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\n  targets: [k_proj, o_proj, up_proj] "));
    CU_ASSERT_PTR_NOT_NULL(strstr(y.data, "\n  alpha: 0.3333333333333333 "));
    q_buf_free(&y);
    q_buf_free(&y2);
}

static void test_print_keys(void) {
    char *buf = NULL;
    size_t size = 0;
    FILE *f = open_memstream(&buf, &size);
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    recipe_print_keys(f);
    fclose(f);
    // every key the resolved recipe writes is documented
    static const char *const some[] = {"seed", "lora.r", "lora.targets", "optim.lr", "sched.warmup_ratio",
                                       "data.train_on_inputs", "quant.block_size", "sample.max_new_tokens"};
    for (size_t i = 0; i < sizeof some / sizeof some[0]; i++) CU_ASSERT_PTR_NOT_NULL(strstr(buf, some[i]));
    CU_ASSERT_PTR_NOT_NULL(strstr(buf, "[constant, linear, cosine]"));
    CU_ASSERT_PTR_NOT_NULL(strstr(buf, "(power of 2 in [32, 4096])"));
    free(buf);
}

// ----------------------------------------------------------------------------
// shipped recipes

static void test_shipped_recipes(void) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/../../recipes", test_fixture(""));
    DIR *d = opendir(dir);
    CU_ASSERT_PTR_NOT_NULL_FATAL(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        const size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".yaml") != 0) continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        recipe r;
        q_err err;
        recipe_defaults(&r);
        const int rc = recipe_load(&r, path, &err);
        if (rc) fprintf(stderr, "\n  %s\n", err.msg);
        CU_ASSERT_EQUAL(rc, 0);
        n++;
    }
    closedir(d);
    CU_ASSERT(n >= 3);

    // the quickstart as the README describes it
    char path[8192];
    snprintf(path, sizeof path, "%s/quickstart.yaml", dir);
    recipe r;
    q_err err;
    recipe_defaults(&r);
    TEST_OK(recipe_load(&r, path, &err), &err);
    CU_ASSERT_STRING_EQUAL(r.model_path, "models/SmolLM2-135M-Instruct.Q4_1.gguf");
    CU_ASSERT_STRING_EQUAL(r.data_path, "datasets/gsm8k/train.jsonl");
    CU_ASSERT_EQUAL(r.data_format, DATA_FORMAT_COMPLETION);
    CU_ASSERT_EQUAL(r.data_template, DATA_TEMPLATE_CHATML);
    CU_ASSERT_TRUE(r.data_packing);
    CU_ASSERT_EQUAL(r.lora_r, 16);
    CU_ASSERT_EQUAL(r.lora_alpha, 32.0);
    CU_ASSERT_EQUAL(r.lora_targets, ALL_LINEAR);
    CU_ASSERT_STRING_EQUAL(r.sched_name, "cosine");
    CU_ASSERT(r.sched_warmup_steps > 0 && r.sched_warmup_ratio == 0.0);
    CU_ASSERT(r.sample_count > 0);
    CU_ASSERT(r.train_max_steps > 0);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("recipe", NULL, NULL);
    CU_add_test(s, "defaults (QLoRA reference values)", test_defaults);
    CU_add_test(s, "nested and dotted keys", test_nested_and_dotted);
    CU_add_test(s, "unknown keys and suggestions", test_unknown_keys);
    CU_add_test(s, "wrong types", test_type_errors);
    CU_add_test(s, "out of range", test_range_errors);
    CU_add_test(s, "choices, planned values, targets", test_choice_errors);
    CU_add_test(s, "duplicates, YAML syntax, documents", test_structure_errors);
    CU_add_test(s, "cross-field checks", test_cross_field_errors);
    CU_add_test(s, "command-line overrides", test_overrides);
    CU_add_test(s, "resolved recipe round trip", test_round_trip);
    CU_add_test(s, "key documentation", test_print_keys);
    CU_add_test(s, "recipes/*.yaml", test_shipped_recipes);
    return test_main();
}
