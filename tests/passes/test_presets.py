"""O2 on the real layer sizes (qwen3-next, kimi-linear, T = 4096): built and
optimised only, never run here. Checks what the optimised graph no longer holds."""
import functools

import pytest

from dnir import passes
from dnir.cli import main
from dnir.models import build
from dnir.passes.rewrite import is_elementwise
from dnir.passes.construct import is_last_two_swap, moves_only_unit_axes
from dnir.text import print_graph

C, K = 64, 128


def nodes(graph):
    for node in graph.topo_order():
        yield node
        if node.op == "scan":
            yield from nodes(node.attrs["body"])


def readers(graph):
    users = {}
    for node in nodes(graph):
        for i in node.inputs:
            users.setdefault(id(i), []).append(node)
    return users


@functools.lru_cache(maxsize=None)
def optimised(name):
    o0 = build(name, seq_len=4096)
    return name, o0, passes.optimize(o0, "O2")


@pytest.fixture(params=["qwen3-next", "kimi-linear"])
def graphs(request):
    return optimised(request.param)


def test_no_acc_cont_or_broadcast_feeding_elementwise(graphs):
    _, o0, o2 = graphs
    hist = o2.op_histogram()
    assert hist["acc"] == 0 and hist["cont"] == 0 and o0.op_histogram()["cont"] > 0
    for node in nodes(o2):
        if node.op != "input" and is_elementwise(node):
            assert not any(i.op == "broadcast_to" for i in node.inputs), node


def test_cumsum_runs_on_its_axis_without_permutes(graphs):
    _, _, o2 = graphs
    users = readers(o2)
    for node in nodes(o2):
        if node.op == "cumsum":
            assert node.inputs[0].op != "permute"
            assert all(u.op != "permute" for u in users.get(id(node), []))


def test_every_permute_left_is_essential(graphs):
    _, o0, o2 = graphs
    users = readers(o2)
    permutes = [n for n in nodes(o2) if n.op == "permute"]
    assert len(permutes) <= o0.op_histogram()["permute"] / 2                 # at most half of O0's remain
    for p in permutes:
        assert p.inputs[0].op != "permute"                                   # no pairs left to compose
        assert not moves_only_unit_axes(p.attrs["axes"], p.inputs[0].shape)  # not a reshape in disguise
        if is_last_two_swap(p.attrs["axes"]):
            assert not any(u.op == "matmul" for u in users.get(id(p), []))  # not foldable into flags


def test_kda_has_no_per_channel_chunk_by_chunk_decay():
    _, o0, o2 = optimised("kimi-linear")
    heads, chunks = 32, 4096 // C

    def decay_like(graph):   # a C x C matrix per key channel, per chunk and head: [.., C, C, K] in any order
        return [n for n in nodes(graph) if n.op != "scan" and n.type.size >= heads * chunks * C * C * K]
    assert decay_like(o0)          # the written graph has it
    assert not decay_like(o2)


def test_o2_needs_fewer_flops_and_reports_each_pass(graphs, tmp_path, capsys):
    name, o0, o2 = graphs
    records = passes.run_pipeline(o0, "O2")[1]
    assert records[-1].flops < records[0].flops
    assert o2.input_types == o0.input_types and o2.output_types == o0.output_types
    src = tmp_path / "layer.dnir"
    src.write_text(print_graph(o0))
    assert main(["opt", str(src), "--report", "-o", str(tmp_path / "out.dnir")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["pass", "time"] and len(table) == 2 + len(records)
    assert any("block_tril" in line and "+" in line for line in table)
