"""`dnir export --format ggml-c`: the exported C function, compiled against
ggml, builds a graph that computes what NumPy computes."""
import numpy as np
import pytest

import dnir
import dnir.passes
from dnir.errors import BackendError
from dnir.lowering.ggml.build import GgmlUnavailable, ggml_build
from dnir.lowering.registry import prepare
from dnir.models import DeltaNetConfig, build, random_inputs

from cases import CASES, build_all, nmse
from cases import random_inputs as case_inputs


def _ggml_or_reason():
    try:
        ggml_build()
    except GgmlUnavailable as e:
        return str(e)
    return None


_MISSING = _ggml_or_reason()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"ggml cannot be built here: {_MISSING}")

if _MISSING is None:
    from dnir.lowering.ggml.export_c import compile_c, export_c, load_builder
    from dnir.lowering.ggml.run import GgmlGraph


def run_exported(graph, inputs, tmp_path, name="build_graph"):
    source = tmp_path / f"{name}.c"
    source.write_text(export_c(graph, name))
    library = compile_c(source, tmp_path / f"{name}.so")
    return GgmlGraph(graph, builder=load_builder(library, name, graph))(inputs)


@pytest.mark.parametrize("variant,mode,level", [("gdn", "chunked", "O2"), ("kda", "chunked", "O0"),
                                                ("kda", "recurrent", "O2"), ("gdn", "decode", "O2")])
def test_exported_layer_matches_numpy(tmp_path, rng, variant, mode, level):
    shape = dict(seq_len=1, batch=2) if mode == "decode" else dict(seq_len=21, batch=2)
    graph = dnir.passes.optimize(build(variant, mode=mode, heads=2, value_heads=4, head_dim=16, value_dim=16,
                                       chunk_size=16, initial_state=True, final_state=True, **shape), level)
    graph = prepare(graph, "ggml")      # as the ggml target runs it: token loops as ggml_gated_delta_net
    x = random_inputs(DeltaNetConfig.from_meta(graph.meta), rng)
    for out, ref in zip(run_exported(graph, x, tmp_path), dnir.run(graph, x)):
        assert np.isfinite(out).all()
        assert nmse(out, ref) < 1e-7


def test_exported_conformance_table_matches_numpy(tmp_path):
    graph = build_all([name for name in CASES if name != "const"])
    x = case_inputs(graph, np.random.default_rng())
    for name, out, ref in zip(graph.output_names, run_exported(graph, x, tmp_path), dnir.run(graph, x)):
        if ref.dtype.kind == "f":
            assert nmse(out, ref) < 1e-7, name
        else:
            np.testing.assert_array_equal(out, ref, err_msg=name)


def test_export_is_one_statement_per_call_under_the_node_it_lowers():
    b = dnir.Builder()
    x = b.input("x", (4, 8))
    graph = b.build(b.exp(b.cumsum(x, axis=1)), names=["y"])
    source = export_c(graph, "f")
    body = source[source.index("{"):]
    assert "// %0 = cumsum\n    struct ggml_tensor * t0 = ggml_cumsum(ctx, x);" in body
    assert "// %1 = exp\n" in body and "ggml_exp(ctx, t" in body
    assert "*out_y = " in body


def test_a_const_of_differing_values_cannot_be_exported():
    b = dnir.Builder()
    x = b.input("x", (2, 3))
    graph = b.build(x + b.const(np.arange(6.0).reshape(2, 3)))
    with pytest.raises(BackendError, match=r"node %0 = const: a const of 6 differing values"):
        export_c(graph)


def test_cli_export_writes_the_function_and_reports_both_buffers(tmp_path, capsys):
    from dnir.cli import main
    graph = dnir.passes.optimize(build("gdn", mode="chunked", seq_len=20, heads=2, head_dim=16, value_dim=16,
                                       chunk_size=16), "O2")
    source = tmp_path / "gdn.dnir"
    source.write_text(dnir.print(graph))
    assert main(["export", str(source), "--format", "ggml-c", "-o", str(tmp_path / "delta_net.c")]) == 0
    text = (tmp_path / "delta_net.c").read_text()
    assert "void delta_net(struct ggml_context * ctx," in text and "struct ggml_tensor ** out_o" in text
    out = capsys.readouterr().out
    assert "compute buffer at the file's shapes: ggml " in out and "dnir's plan" in out


def test_cli_run_on_ggml_reports_its_compute_buffer(tmp_path, capsys):
    import json
    from dnir.cli import main
    source = tmp_path / "kda.dnir"
    source.write_text(dnir.print(build("kda", mode="chunked", seq_len=20, heads=2, head_dim=16, value_dim=16,
                                       chunk_size=16)))
    assert main(["run", str(source), "--target", "ggml", "--check", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["check"]["ok"]
    assert result["compute_buffer"]["ggml_bytes"] > 0 and result["compute_buffer"]["plan_bytes"] > 0


def test_inputs_named_like_c_words_or_the_functions_tensors_are_renamed(tmp_path, rng):
    b = dnir.Builder()
    names = ("int", "t0", "ctx", "out_x")
    xs = [b.input(n, (3, 4)) for n in names]
    graph = b.build((xs[0] * xs[1] + xs[2]) - xs[3], names=["y"])
    source = export_c(graph, "f")
    assert all(f"struct ggml_tensor * in_{n} " in source for n in names)
    x = {n: rng.standard_normal((3, 4)).astype(np.float32) for n in names}
    (out,) = run_exported(graph, x, tmp_path, "f")
    np.testing.assert_allclose(out, x["int"] * x["t0"] + x["ctx"] - x["out_x"], rtol=1e-6)


def _export_layer(tmp_path, variant, mode, level, value_dim=16, **shape):
    """A layer written to a file as `dnir build` and `dnir opt` make it, exported by the CLI."""
    from dnir.cli import main
    sizes = dict(heads=2, value_heads=4, head_dim=16, value_dim=value_dim, chunk_size=16, initial_state=True,
                 final_state=True)
    source = tmp_path / "layer.dnir"
    source.write_text(dnir.print(dnir.passes.optimize(build(variant, mode=mode, **sizes, **shape), level)))
    assert main(["export", str(source), "--format", "ggml-c", "-o", str(tmp_path / "delta_net.c")]) == 0
    library = compile_c(tmp_path / "delta_net.c", tmp_path / "delta_net.so")
    return (tmp_path / "delta_net.c").read_text(), library, sizes


def _run_at(library, variant, mode, level, sizes, rng, seq_len, batch, size_args):
    from dnir.models import delta_rule_reference, relative_rms_error
    graph = prepare(dnir.passes.optimize(build(variant, mode=mode, seq_len=seq_len, batch=batch, **sizes), level),
                    "ggml")
    cfg = DeltaNetConfig.from_meta(graph.meta)
    x = random_inputs(cfg, rng)
    o, state = GgmlGraph(graph, builder=load_builder(library, "delta_net", graph, size_args))(x)
    o_ref, state_ref = delta_rule_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=cfg.scale,
                                            initial_state=x["initial_state"])
    assert o.shape == o_ref.shape and state.shape == state_ref.shape
    assert relative_rms_error(o, o_ref) < 1e-5 and relative_rms_error(state, state_ref) < 1e-5


@pytest.mark.parametrize("variant,level", [("gdn", "O2"), ("kda", "O0")])
def test_a_chunked_layer_exports_for_any_length_and_batch(tmp_path, rng, variant, level):
    """One exported function, compiled once, computes the layer at lengths and batches other than the
    file's (n_tokens, n_seqs are parameters, the loop over chunks a C loop), against the oracle."""
    text, library, sizes = _export_layer(tmp_path, variant, "chunked", level, seq_len=48, batch=2)
    assert "int64_t n_tokens,\n        int64_t n_seqs," in text
    assert "for (int64_t i = 0; i < n_chunks; i++) {" in text and "chunk i" in text
    for seq_len, batch in ((48, 2), (64, 3), (160, 4)):
        _run_at(library, variant, "chunked", level, sizes, rng, seq_len, batch, (seq_len, batch))


def test_an_unrolled_token_loop_exports_as_a_c_loop(tmp_path, rng):
    """V != K: ggml's fused op does not apply and the loop over tokens is unrolled; exported, it is a C
    loop over n_tokens carrying the state from the initial_state input."""
    text, library, sizes = _export_layer(tmp_path, "gdn", "recurrent", "O2", value_dim=8, seq_len=7, batch=2)
    assert "for (int64_t i = 0; i < n_tokens; i++) {" in text and "= initial_state;" in text
    for seq_len, batch in ((7, 2), (4, 3), (12, 2)):
        _run_at(library, "gdn", "recurrent", "O2", sizes, rng, seq_len, batch, (seq_len, batch))


def test_a_single_sequence_layer_exports_for_any_length(tmp_path, rng):
    """A file of one sequence: the passes choose layouts a batch of one allows, so n_tokens is the
    one size parameter (the recurrent loop is one ggml_gated_delta_net for any length)."""
    text, library, sizes = _export_layer(tmp_path, "kda", "recurrent", "O2", seq_len=9, batch=1)
    assert "int64_t n_tokens,\n" in text and "n_seqs" not in text
    assert text.count("ggml_gated_delta_net(") == 1
    for seq_len in (9, 4, 17):
        _run_at(library, "kda", "recurrent", "O2", sizes, rng, seq_len, 1, (seq_len,))


def test_comments_name_the_pass_that_made_each_node(tmp_path):
    """Nodes of the built layer are named alone; a node a pass made says which (the pass manager's
    side table, the target's own passes included)."""
    o2, _, _ = _export_layer(tmp_path, "gdn", "chunked", "O2", seq_len=48, batch=2)
    assert "= chunk_scan  [made by fuse_delta_steps]" in o2
    assert "[made by propagate_layout]" in o2 or "[made by eliminate_transposes]" in o2
    o0, _, _ = _export_layer(tmp_path, "gdn", "chunked", "O0", seq_len=48, batch=2)
    assert {m for m in __import__("re").findall(r"made by (\w+)", o0)} == {"fuse_delta_steps"}


def test_fixed_shapes_on_request_and_for_graphs_that_are_no_layer(tmp_path, capsys):
    from dnir.cli import main
    source = tmp_path / "gdn.dnir"
    source.write_text(dnir.print(build("gdn", mode="chunked", seq_len=48, heads=2, head_dim=16, value_dim=16,
                                       chunk_size=16)))
    assert main(["export", str(source), "--format", "ggml-c", "-o", str(tmp_path / "a.c"), "--fixed-shapes"]) == 0
    assert "n_tokens" not in (tmp_path / "a.c").read_text() and "for its own shapes" in capsys.readouterr().out


def test_a_layer_file_written_before_precision_still_exports_for_any_length(tmp_path, capsys):
    """Files from before the layers had a precision (no such key in their metadata) are read with their
    dtype's default, and `dnir export` still recognises them as the O2 layer: a function for any length."""
    import re

    from dnir.cli import main
    graph = dnir.passes.optimize(build("gdn", mode="chunked", seq_len=48, heads=2, head_dim=16, value_dim=16,
                                       chunk_size=16), "O2")
    text = dnir.print(graph)
    old = re.sub(r', precision="\w+"', "", text)
    assert old != text
    source = tmp_path / "gdn.dnir"
    source.write_text(old)
    assert main(["export", str(source), "--format", "ggml-c", "-o", str(tmp_path / "a.c")]) == 0
    assert "for any n_tokens, n_seqs" in capsys.readouterr().out
    assert "int64_t n_tokens," in (tmp_path / "a.c").read_text()
