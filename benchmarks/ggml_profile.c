// Per-node times of a ggml graph on a backend: each node computed alone, as a one-node view of
// the graph (ggml_graph_view, from ggml's internal header), in graph order so that its operands
// are fresh. Views, reshapes and permutes compute nothing and cost next to nothing.
#include <time.h>
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-impl.h"

int profile_nodes(ggml_backend_t backend, struct ggml_cgraph * graph, double * seconds) {
    for (int i = 0; i < ggml_graph_n_nodes(graph); i++) {
        struct ggml_cgraph one = ggml_graph_view(graph, i, i + 1);
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        int status = ggml_backend_graph_compute(backend, &one);
        clock_gettime(CLOCK_MONOTONIC, &end);
        if (status != 0) {
            return status;
        }
        seconds[i] = (double) (end.tv_sec - start.tv_sec) + 1e-9 * (double) (end.tv_nsec - start.tv_nsec);
    }
    return 0;
}

struct ggml_tensor * node_tensor(struct ggml_cgraph * graph, int i) { return ggml_graph_node(graph, i); }
const char * node_op(struct ggml_cgraph * graph, int i) { return ggml_op_desc(ggml_graph_node(graph, i)); }
