"""FLOP and byte counts, `dnir stats`, `dnir check --ranges`, and peak bytes per pass in `dnir opt --report`."""
import json
import math

import pytest

import dnir
from dnir.analysis.cost import graph_bytes, graph_flops, node_bytes, node_flops
from dnir.analysis.memory import plan
from dnir.cli import main
from dnir.models import build


def test_flop_rules():
    b = dnir.Builder()
    a, w = b.input("a", (3, 5, 7)), b.input("w", (7, 4))
    mm = b.matmul(a, w)                                      # batch 3, m 5, k 7, n 4
    tri = b.tril(b.input("t", (6, 6)))
    solve = b.solve_tri(tri, b.input("r", (6, 2)))
    total = b.sum(mm, axis=(0, 1))
    ex = b.exp(mm)
    graph = b.build([solve, total, ex])
    assert node_flops(mm) == 2 * 3 * 5 * 4 * 7
    assert node_flops(ex) == 3 * 5 * 4 and node_flops(tri) == 36
    assert node_flops(solve) == 6 * 6 * 2                    # n^2 per right-hand-side column
    assert node_flops(total) == 3 * 5 * 4
    assert graph_flops(graph) == sum(node_flops(n) for n in graph.topo_order())


def test_bytes_views_move_nothing_and_scans_count_per_step():
    b = dnir.Builder()
    x = b.input("x", (4, 8))
    e = b.exp(x)
    assert node_bytes(e) == 2 * 4 * 8 * 4
    assert node_bytes(b.reshape(e, (32,))) == 0 and node_bytes(b.slice_axis(e, 0, 1, 3)) == 0
    assert node_bytes(b.slice_axis(e, 1, 1, 3)) == (4 * 2 + 4 * 8) * 4   # strided: a copy
    bb = dnir.Builder()
    c, xi = bb.input("c", (8,)), bb.input("xi", (8,))
    body = bb.build([bb.add(c, xi), bb.exp(c)])
    final, ys = b.scan(body, [b.full((8,), 1.0)], [e])
    scan = final.inputs[0]
    assert node_bytes(scan) == 4 * graph_bytes(body) and node_flops(scan) == 4 * graph_flops(body)


@pytest.fixture
def layer(tmp_path):
    path = tmp_path / "kda.dnir"
    assert main(["build", "kda", "--heads", "2", "--value-heads", "2", "--head-dim", "16", "--value-dim", "16",
                 "--seq-len", "100", "-o", str(path)]) == 0
    return path


def test_stats_json(layer, capsys):
    capsys.readouterr()
    assert main(["stats", str(layer), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    graph = dnir.parse_file(str(layer))
    mp = plan(graph)
    assert stats["nodes"] == graph.node_count() and stats["ops"] == dict(graph.op_histogram())
    assert stats["flops"] == graph_flops(graph) and stats["bytes_moved"] == graph_bytes(graph)
    assert stats["peak_bytes"] == mp.peak_bytes and stats["peak_lower_bound"] == mp.lower_bound
    assert 0 < stats["peak_lower_bound"] <= stats["peak_bytes"]


def test_stats_table_and_per_pass_peaks(layer, capsys):
    capsys.readouterr()
    assert main(["stats", str(layer)]) == 0
    text = capsys.readouterr().out
    assert "peak" in text and "lower bound" in text and "matmul" in text
    assert main(["stats", str(layer), "--pipeline", "O2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    passes = stats["passes"]
    assert passes[0]["pass"] == "input" and len(passes) > 5
    assert all(r["peak_bytes"] >= r["peak_lower_bound"] > 0 for r in passes)
    assert passes[-1]["peak_bytes"] == stats["peak_bytes"] < passes[0]["peak_bytes"]


def test_opt_report_shows_peak_per_pass(layer, tmp_path, capsys):
    capsys.readouterr()
    assert main(["opt", str(layer), "-o", str(tmp_path / "o2.dnir"), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["passes"]
    assert records[0]["peak_bytes"] == plan(dnir.parse_file(str(layer))).peak_bytes
    assert records[-1]["peak_bytes"] == plan(dnir.parse_file(str(tmp_path / "o2.dnir"))).peak_bytes
    assert main(["opt", str(layer), "-o", str(tmp_path / "o2.dnir"), "--report"]) == 0
    table = capsys.readouterr().out
    assert "peak MB" in table
    assert f"{records[0]['peak_bytes'] / 2**20:.1f}" in table


def test_check_ranges_exit_codes(tmp_path, capsys):
    clean = tmp_path / "clean.dnir"
    bad = tmp_path / "bad.dnir"
    for path, extra in ((clean, []), (bad, ["--factorized-decay"])):
        assert main(["build", "gdn", "--heads", "1", "--value-heads", "2", "--head-dim", "8", "--value-dim", "8",
                     "--seq-len", "64", *extra, "-o", str(path)]) == 0
    capsys.readouterr()
    assert main(["check", str(clean), "--ranges"]) == 0
    assert "value ranges ok" in capsys.readouterr().out
    assert main(["check", str(bad), "--ranges"]) == 1
    out = capsys.readouterr().out
    assert "exp" in out and "[0, 1280]" in out
    assert main(["check", str(bad), "--ranges", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["findings"][0]["op"] == "exp"
    assert report["findings"][0]["ranges"][0][1] == pytest.approx(1280)
    assert main(["check", str(bad), "--range", "g=-1,0"]) == 0          # gentle gates cannot overflow
    assert main(["check", str(bad), "--range", "g=0"]) == 2
    assert main(["check", str(bad), "--range", "nope=0,1"]) == 2
    assert main(["check", str(bad)]) == 0                               # no --ranges: parse + verify only


def test_preset_numbers_are_plausible():
    """qwen3-next at T=4096: the scan's inputs alone (w, u, q_decayed, k_to_end: 64 MiB each) are live together."""
    mp = plan(build("qwen3-next", seq_len=4096))
    assert 4 * 64 * 2**20 < mp.lower_bound <= mp.peak_bytes < 2**30
    assert math.isclose(mp.peak_bytes, mp.lower_bound, rel_tol=0.1)
