"""The layer graphs against the float64 recurrent oracle: the acceptance matrix,
varlen batches, strong gates, decode, and the shape of the graph as written."""
import itertools
import re

import numpy as np
import pytest

import dnir
from dnir.models import DeltaNetConfig, build, build_delta_net
from delta_helpers import assert_close, draw, oracle

T_VALUES = (1, 15, 63, 64, 65, 127, 200, 256, 1000)
HEADS = ((2, 4), (2, 2))              # (H, HV): GQA and one value head per q/k head
CHUNKS = (16, 32, 64)


def _matrix():
    """Every T for both variants and both sequence modes; the other axes cycle with
    coprime periods so every value of each meets many values of the others."""
    cases = []
    for i, (mode, variant, T) in enumerate(itertools.product(("chunked", "recurrent"), ("gdn", "kda"),
                                                             T_VALUES)):
        chunk = CHUNKS[i % 3]
        cases.append(dict(variant=variant, mode=mode, seq_len=T, batch=(1, 3)[i % 2],
                          heads=HEADS[(i // 2) % 2][0], value_heads=HEADS[(i // 2) % 2][1],
                          initial_state=bool(i % 5 % 2), l2norm=bool(i // 3 % 2), chunk_size=chunk,
                          block_size=16 if mode == "chunked" and chunk > 16 and i % 4 < 2 else None))
    return cases


MATRIX = _matrix()


def test_matrix_covers_every_value_of_every_axis():
    for mode, variant in itertools.product(("chunked", "recurrent"), ("gdn", "kda")):
        cases = [c for c in MATRIX if c["mode"] == mode and c["variant"] == variant]
        assert {c["seq_len"] for c in cases} == set(T_VALUES)
        assert {c["batch"] for c in cases} == {1, 3}
        assert {(c["heads"], c["value_heads"]) for c in cases} == set(HEADS)
        assert {c["initial_state"] for c in cases} == {False, True}
        assert {c["l2norm"] for c in cases} == {False, True}
        if mode == "chunked":
            assert {c["chunk_size"] for c in cases} == set(CHUNKS)
            assert {c["block_size"] for c in cases} == {None, 16}


def _id(c):
    return (f"{c['variant']}-{c['mode']}-T{c['seq_len']}-B{c['batch']}-H{c['heads']}HV{c['value_heads']}"
            f"{'-init' if c['initial_state'] else ''}{'-l2' if c['l2norm'] else ''}"
            + (f"-C{c['chunk_size']}" + (f"b{c['block_size']}" if c['block_size'] else "")
               if c['mode'] == "chunked" else ""))


@pytest.mark.parametrize("case", MATRIX, ids=_id)
def test_graph_matches_oracle(rng, case):
    cfg = DeltaNetConfig(head_dim=16, value_dim=8, final_state=True, **case)
    x = draw(cfg, rng)
    o, state = dnir.run(build_delta_net(cfg), x)
    o_ref, state_ref = oracle(cfg, x)
    assert o.dtype == np.float32
    assert_close(o, o_ref)
    assert_close(state, state_ref, what="final_state")


def _varlen_cases():
    return [dict(variant="gdn", mode="chunked", chunk_size=64),
            dict(variant="kda", mode="chunked", chunk_size=32, block_size=16),
            dict(variant="gdn", mode="recurrent"),
            dict(variant="kda", mode="recurrent")]


@pytest.mark.parametrize("case", _varlen_cases(), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_varlen_sequences_equal_running_each_alone(rng, case):
    cu = (0, 15, 100, 300)
    cfg = DeltaNetConfig(batch=1, seq_len=300, heads=2, value_heads=4, head_dim=8, value_dim=8,
                         initial_state=True, final_state=True, cu_seqlens=cu, **case)
    x = draw(cfg, rng)
    o, state = dnir.run(build_delta_net(cfg), x)
    o_ref, state_ref = oracle(cfg, x)
    assert_close(o, o_ref)
    assert_close(state, state_ref, what="final_state")
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        alone = DeltaNetConfig(batch=1, seq_len=b - a, heads=2, value_heads=4, head_dim=8, value_dim=8,
                               initial_state=True, final_state=True, **case)
        part = {name: arr[:, a:b] for name, arr in x.items() if name != "initial_state"}
        part["initial_state"] = x["initial_state"][n:n + 1]
        o_n, state_n = dnir.run(build_delta_net(alone), part)
        assert_close(o[:, a:b], o_n, tol=1e-6, what=f"o of sequence {n}")
        assert_close(state[n:n + 1], state_n, tol=1e-6, what=f"final_state of sequence {n}")


@pytest.mark.parametrize("variant", ["gdn", "kda"])
@pytest.mark.parametrize("mode,block_size", [("chunked", None), ("chunked", 16), ("recurrent", None)])
def test_strong_gates_stay_finite_and_exact(rng, variant, mode, block_size):
    """g = -20 per token over whole chunks: cumulative gates reach -1280 inside a chunk."""
    cfg = DeltaNetConfig(variant, batch=2, seq_len=200, heads=2, value_heads=4, head_dim=8, value_dim=8,
                         mode=mode, chunk_size=64, block_size=block_size, initial_state=True,
                         final_state=True)
    x = draw(cfg, rng)
    x["g"][:, :128] = -20.0                      # the first two chunks entirely
    x["g"][:, 150:160] = -20.0
    o, state = dnir.run(build_delta_net(cfg), x)
    o_ref, state_ref = oracle(cfg, x)
    assert_close(o, o_ref)
    assert_close(state, state_ref, what="final_state")


@pytest.mark.parametrize("block_size", [None, 16])
def test_factorized_decay_overflows_on_strong_gates(rng, block_size):
    """The option exists to show what the exact mask avoids: exp(-gam_j) = inf, then inf * 0."""
    cfg = DeltaNetConfig("gdn", seq_len=64, head_dim=8, value_dim=8, block_size=block_size,
                         factorized_decay=True)
    x = draw(cfg, rng)
    graph = build_delta_net(cfg)
    (o,) = dnir.run(graph, x)
    assert_close(o, oracle(cfg, x)[0])            # mild gates: the factorisation is still right
    x["g"][:] = -20.0
    with np.errstate(all="ignore"):
        (o,) = dnir.run(graph, x)
    assert not np.isfinite(o).all()


@pytest.mark.parametrize("variant", ["gdn", "kda"])
@pytest.mark.parametrize("cu", [None, (0, 1, 2, 3)])
def test_decode_is_one_step_without_a_scan(rng, variant, cu):
    B = 3 if cu is None else 1
    cfg = DeltaNetConfig(variant, batch=B, seq_len=1 if cu is None else 3, heads=2, value_heads=4,
                         head_dim=16, value_dim=8, mode="decode", initial_state=True, final_state=True,
                         l2norm=True, cu_seqlens=cu)
    graph = build_delta_net(cfg)
    assert "scan" not in graph.op_histogram()
    x = draw(cfg, rng)
    o, state = dnir.run(graph, x)
    o_ref, state_ref = oracle(cfg, x)
    assert_close(o, o_ref)
    assert_close(state, state_ref, what="final_state")


@pytest.mark.parametrize("name", ["qwen3-next", "kimi-linear"])
@pytest.mark.parametrize("options", [dict(mode="chunked"), dict(mode="chunked", block_size=16),
                                     dict(mode="chunked", chunk_size=16, initial_state=True, final_state=True),
                                     dict(mode="recurrent", l2norm=True)], ids=str)
def test_node_count_does_not_depend_on_seq_len(name, options):
    counts = {T: build(name, seq_len=T, **options).node_count() for T in (64, 65, 1000, 65536)}
    assert len(set(counts.values())) == 1, counts


def test_varlen_node_count_depends_on_the_sequence_count_only():
    def count(cu):
        return build("gdn", batch=1, seq_len=cu[-1], cu_seqlens=cu, final_state=True).node_count()
    assert count((0, 10, 64)) == count((0, 30000, 65536))
    assert count((0, 10, 20, 64)) > count((0, 10, 64))


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_varlen_runs_one_recurrence_per_sequence_over_its_own_chunks(mode):
    graph = build("kda", batch=1, seq_len=300, cu_seqlens=(0, 15, 100, 300), head_dim=8, value_dim=8,
                  mode=mode, chunk_size=64)
    scans = [n for n in graph.topo_order() if n.op == "scan"]
    steps = [1, 2, 4] if mode == "chunked" else [15, 85, 200]      # whole chunks of each sequence, or tokens
    assert sorted(n.attrs["length"] for n in scans) == steps


def _nodes(graph):
    """Every node, scan bodies included."""
    for node in graph.topo_order():
        yield node
        if node.op == "scan":
            yield from _nodes(node.attrs["body"])


@pytest.mark.parametrize("variant", ["gdn", "kda"])
def test_chunked_graph_is_written_as_for_ggml(variant):
    graph = build(variant, seq_len=200, heads=2, value_heads=4, head_dim=8, value_dim=8)
    nodes = list(_nodes(graph))
    hist = graph.op_histogram()
    # cumsum only along the innermost axis, fed by a transposed copy
    cumsums = [n for n in nodes if n.op == "cumsum"]
    assert cumsums and all(n.attrs["axis"] in (-1, n.rank - 1) for n in cumsums)
    assert all(n.inputs[0].op == "cont" and n.inputs[0].inputs[0].op == "permute" for n in cumsums)
    # the decay: exp of segment sums, a running sum of the gate (repeated with broadcast_to) masked
    # to below the diagonal by a tril of ones, never a difference of prefix sums
    masks = [n.inputs[0].inputs[0].inputs[0] for n in cumsums]
    assert any(m.op == "mul" and {i.op for i in m.inputs} == {"broadcast_to", "tril"} for m in masks)
    assert "sub" not in {n.inputs[0].op for n in nodes if n.op == "exp"}
    assert any(n.op == "broadcast_to" for n in nodes)
    assert "neg" not in hist                                    # no exp(-gam) factorisation
    # full C x C products, masked afterwards; the solve; the scan over chunks
    assert any(n.op == "tril" and n.inputs[0].op == "sum" and n.shape[-2:] == (64, 64) for n in nodes)
    assert hist["solve_tri"] == 1 and hist["scan"] == 1
    assert hist["cont"] >= 5


def test_recurrent_step_uses_sum_of_products():
    graph = build("gdn", mode="recurrent", seq_len=5, heads=2, value_heads=4, head_dim=8, value_dim=8)
    (scan,) = [n for n in graph.topo_order() if n.op == "scan"]
    body = scan.attrs["body"]
    state = body.inputs[0]
    # S^T (a k) and S^T (a q), both of the incoming state, as sum_rows(S^T * x); and the dot product k . q
    reads = [n for n in body.topo_order() if n.op == "sum" and state in n.inputs[0].inputs]
    assert len(reads) == 2 and all(n.inputs[0].op == "mul" and n.attrs["axes"] in ((-1,), (3,)) for n in reads)
    assert body.op_histogram()["sum"] == 3 and "matmul" not in body.op_histogram()


def test_blocked_chunks_are_assembled_with_acc_into_zeros():
    C, s = 64, 16
    graph = build("kda", seq_len=128, head_dim=8, value_dim=8, chunk_size=C, block_size=s)
    accs = [n for n in graph.topo_order() if n.op == "acc"]
    lower_blocks = (C // s) * (C // s + 1) // 2                   # 10 of 16 for 64 / 16
    assert len(accs) == 2 * lower_blocks
    roots = {id(n) for n in accs if n.inputs[0].op == "full" and n.inputs[0].attrs["value"] == 0.0}
    assert len(roots) == 2
    assert {n.inputs[1].shape[-2:] for n in accs} == {(s, s)}
    # an unblocked graph has no acc at all
    assert "acc" not in build("kda", seq_len=128, head_dim=8, value_dim=8).op_histogram()


@pytest.mark.parametrize("mode", ["chunked", "recurrent", "decode"])
def test_graph_names_layouts_and_metadata(mode):
    cfg = DeltaNetConfig("kda", batch=1, seq_len=100 if mode != "decode" else 2, heads=2, value_heads=4,
                         head_dim=8, value_dim=4, mode=mode, block_size=16 if mode == "chunked" else None,
                         initial_state=True, final_state=True, l2norm=True, scale=0.3,
                         cu_seqlens=(0, 30, 100) if mode != "decode" else (0, 1, 2))
    graph = build_delta_net(cfg)
    T = cfg.seq_len
    assert graph.input_names == ("q", "k", "v", "g", "beta", "initial_state")
    assert [n.shape for n in graph.inputs] == [(1, T, 2, 8), (1, T, 2, 8), (1, T, 4, 4), (1, T, 4, 8),
                                              (1, T, 4), (2, 4, 8, 4)]
    assert graph.output_names == ("o", "final_state")
    assert graph.output_types[0].shape == (1, T, 4, 4) and graph.output_types[1].shape == (2, 4, 8, 4)
    again = dnir.parse(dnir.print(graph))
    assert dnir.structurally_equal(graph, again)
    assert DeltaNetConfig.from_meta(again.meta) == cfg
    assert again.meta["variant"] == "kda" and again.meta["mode"] == mode and again.meta["scale"] == 0.3


def test_precision_defaults_by_dtype_and_survives_the_text_format():
    """None resolves to tf32 for half activations (exact in TF32) and highest for float32; the
    resolved value is in the metadata, so a file read back and its printed hash keep it."""
    assert DeltaNetConfig("gdn").precision == "highest"
    assert DeltaNetConfig("gdn", dtype="bf16").precision == DeltaNetConfig("kda", dtype="f16").precision == "tf32"
    assert DeltaNetConfig("gdn", dtype="bf16", precision="highest").precision == "highest"
    graph = build_delta_net(DeltaNetConfig("kda", precision="tf32"))
    again = dnir.parse(dnir.print(graph))
    assert again.meta["precision"] == "tf32" and DeltaNetConfig.of_graph(again).precision == "tf32"
    assert dnir.print(build_delta_net(DeltaNetConfig("kda"))) != dnir.print(graph)
    # a file written before the option resolves it by its dtype again
    old = dnir.print(build_delta_net(DeltaNetConfig("gdn", dtype="bf16"))).replace(', precision="tf32"', "", 1)
    assert "precision" not in dnir.parse(old).meta
    assert DeltaNetConfig.of_graph(dnir.parse(old)).precision == "tf32"


@pytest.mark.parametrize("value", ["fast", "TF32", 1, True])
def test_bad_precision_names_the_choices(value):
    with pytest.raises(dnir.InputError, match=rf"precision={re.escape(repr(value))}; expected one of highest, tf32"):
        DeltaNetConfig("gdn", precision=value)


def test_only_o_without_final_state():
    graph = build("gdn", seq_len=10, head_dim=8, value_dim=8)
    assert graph.output_names == ("o",) and graph.input_names == ("q", "k", "v", "g", "beta")


@pytest.mark.parametrize("options,words", [
    (dict(value_heads=3), "not a multiple"),
    (dict(chunk_size=48), "chunk_size=48"),
    (dict(block_size=24), "block_size=24"),
    (dict(mode="decode", seq_len=2), "decode"),
    (dict(mode="prefill"), "mode='prefill'"),
    (dict(batch=2, seq_len=10, cu_seqlens=(0, 5, 10)), "B=1"),
    (dict(seq_len=10, cu_seqlens=(0, 5, 5, 10)), "not strictly increasing"),
    (dict(seq_len=10, cu_seqlens=(0, 5, 9)), "ends at 9"),
    (dict(seq_len=10, cu_seqlens=(1, 5, 10)), "start at 0"),
    (dict(scale=-1.0), "scale"),
    (dict(head_dim=0), "head_dim=0"),
])
def test_bad_options_raise_naming_the_option(options, words):
    with pytest.raises(dnir.InputError, match=words):
        DeltaNetConfig("gdn", **{"heads": 2, "value_heads": 4, **options})


def test_presets_and_unknown_names():
    q = build("qwen3-next", seq_len=64)
    assert [n.shape for n in q.inputs] == [(1, 64, 16, 128), (1, 64, 16, 128), (1, 64, 32, 128), (1, 64, 32),
                                          (1, 64, 32)]
    kimi = build("kimi-linear", seq_len=64)
    assert [n.shape for n in kimi.inputs][3] == (1, 64, 32, 128)
    assert kimi.meta["variant"] == "kda"
    with pytest.raises(dnir.InputError, match="unknown preset"):
        build("llama", seq_len=64)
    with pytest.raises(dnir.InputError, match="not kda"):
        build("qwen3-next", variant="kda")
