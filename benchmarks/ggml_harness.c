/*
 * The CPU benchmark's ggml peer: ggml's fused delta-rule op, ggml_gated_delta_net,
 * as llama.cpp runs it (CPU backend, n threads), on the caller's float32 buffers.
 * Compiled at benchmark time against the ggml build of lowering/ggml/build.py and
 * called from Python (benchmarks/ggml_peer.py, which also maps dnir's layouts to
 * ggml's and checks shapes: ggml aborts on a failed assertion).
 *
 * ggml lists dimensions innermost first, so the C-order arrays
 *   q, k   [B, T, H, D]          are ggml [D, H, T, B]
 *   v      [B, T, HV, D]         are ggml [D, HV, T, B]
 *   g      [B, T, HV, 1 or D]    are ggml [1 or D, HV, T, B]   (1: one gate per head; D: per key channel)
 *   beta   [B, T, HV, 1]         are ggml [1, HV, T, B]
 *   state  [B, HV, D(v), D(k)]   are ggml [D, D, HV, B]        (each head's state transposed)
 * The result is one tensor: the output [B, T, HV, D] followed by the final state
 * [B, HV, D(v), D(k)].
 */
#include <stdint.h>
#include <stdlib.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

enum { Q, K, V, G, BETA, STATE, N_INPUTS };

struct gdn_run {
    struct ggml_context *ctx;
    ggml_backend_t backend;
    ggml_backend_buffer_t buffer;
    struct ggml_cgraph *graph;
    struct ggml_tensor *inputs[N_INPUTS];
    struct ggml_tensor *result;
    size_t output_bytes, state_bytes;
};

void gdn_free(struct gdn_run *run) {
    if (run == NULL) return;
    if (run->buffer) ggml_backend_buffer_free(run->buffer);
    if (run->backend) ggml_backend_free(run->backend);
    if (run->ctx) ggml_free(run->ctx);
    free(run);
}

/* The graph of one op on inputs of these sizes, its tensors allocated in a CPU buffer;
 * NULL when ggml cannot allocate them. */
struct gdn_run *gdn_new(int64_t batch, int64_t tokens, int64_t heads, int64_t value_heads, int64_t dim,
                        int per_channel_gate, int n_threads) {
    struct gdn_run *run = calloc(1, sizeof *run);
    if (run == NULL) return NULL;
    /* Metadata only (no_alloc): the data lives in the backend buffer. */
    struct ggml_init_params params = {ggml_tensor_overhead() * (N_INPUTS + 1) + ggml_graph_overhead(), NULL, true};
    run->ctx = ggml_init(params);
    run->backend = ggml_backend_cpu_init();
    if (run->ctx == NULL || run->backend == NULL) {
        gdn_free(run);
        return NULL;
    }
    ggml_backend_cpu_set_n_threads(run->backend, n_threads);

    struct ggml_context *ctx = run->ctx;
    run->inputs[Q] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, dim, heads, tokens, batch);
    run->inputs[K] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, dim, heads, tokens, batch);
    run->inputs[V] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, dim, value_heads, tokens, batch);
    run->inputs[G] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, per_channel_gate ? dim : 1, value_heads, tokens, batch);
    run->inputs[BETA] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, value_heads, tokens, batch);
    run->inputs[STATE] = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, dim, dim, value_heads, batch);
    /* One snapshot slot: only the final state is kept. */
    run->result = ggml_gated_delta_net(ctx, run->inputs[Q], run->inputs[K], run->inputs[V], run->inputs[G],
                                       run->inputs[BETA], run->inputs[STATE], 1);
    run->graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(run->graph, run->result);

    run->buffer = ggml_backend_alloc_ctx_tensors(ctx, run->backend);
    if (run->buffer == NULL) {
        gdn_free(run);
        return NULL;
    }
    run->output_bytes = ggml_nbytes(run->inputs[V]);
    run->state_bytes = ggml_nbytes(run->inputs[STATE]);
    return run;
}

/* Copies the inputs into ggml's buffer (once; the op does not write them). */
void gdn_set_inputs(struct gdn_run *run, const float *q, const float *k, const float *v, const float *g,
                    const float *beta, const float *state) {
    const float *data[N_INPUTS] = {q, k, v, g, beta, state};
    for (int i = 0; i < N_INPUTS; i++) {
        ggml_backend_tensor_set(run->inputs[i], data[i], 0, ggml_nbytes(run->inputs[i]));
    }
}

/* Runs the op; returns ggml's status (0: success). */
int gdn_compute(struct gdn_run *run) {
    return (int) ggml_backend_graph_compute(run->backend, run->graph);
}

/* Copies the last computed output and final state out of ggml's buffer. */
void gdn_outputs(const struct gdn_run *run, float *output, float *state) {
    ggml_backend_tensor_get(run->result, output, 0, run->output_bytes);
    ggml_backend_tensor_get(run->result, state, run->output_bytes, run->state_bytes);
}
