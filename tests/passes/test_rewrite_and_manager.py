"""The rewrite engine, the pass manager and `dnir opt`."""
import json

import numpy as np
import pytest

import dnir
from dnir import passes
from dnir.cli import main
from dnir.ops import make_node
from dnir.passes import P, Rule, apply_rules
from dnir.passes.rewrite import RewriteError


def small_graph():
    b = dnir.Builder()
    x = b.input("x", (4, 8))
    y = b.permute(b.cont(b.permute(b.exp(x), (1, 0))), (1, 0))
    return b.build(b.add(y, x), names=["y"], meta={"note": "kept"})


def test_pattern_captures_predicates_and_repeated_names():
    g = small_graph()
    add = g.outputs[0]
    caps = {}
    assert P("add", P("permute", P.any("inner"), name="outer"), P.any("x")).match(add, caps)
    assert caps["outer"].op == "permute" and caps["inner"].op == "cont" and caps["x"].op == "input"
    assert not P("add", P("exp"), P.any()).match(add, {})
    assert not P("permute", axes=(0, 1)).match(add.inputs[0], {})
    assert P("permute", axes=lambda a: a == (1, 0)).match(add.inputs[0], {})
    same = make_node("add", (add.inputs[1], add.inputs[1]), {})
    assert P("add", P.any("v"), P.any("v")).match(same, {})      # one name, one node
    assert not P("add", P.any("v"), P.any("v")).match(add, {})


def test_rules_reach_a_fixpoint_inside_scan_bodies_and_keep_the_signature():
    b = dnir.Builder()
    s, xs = b.input("s", (3,)), b.input("xs", (5, 3))
    body = dnir.Builder()
    c, xi = body.input("c", (3,)), body.input("xi", (3,))
    inner = body.build([body.add(c, body.neg(body.neg(xi))), body.cont(c)], names=["c", "y"])
    final, ys = b.scan(inner, [s], [xs])
    g = b.build([final, ys], names=["s", "ys"])
    rules = [Rule(P("neg", P("neg", P.any("x"))), lambda m: m.x, "double_neg"),
             Rule(P("cont", P.any("x")), lambda m: m.x, "drop_cont")]
    out, changed = apply_rules(g, rules)
    assert changed and out.input_types == g.input_types and out.output_types == g.output_types
    hist = out.op_histogram()
    assert hist["neg"] == 0 and hist["cont"] == 0
    assert apply_rules(out, rules) == (out, False)


def test_a_rule_that_changes_a_type_or_never_stops_is_reported():
    g = small_graph()
    with pytest.raises(RewriteError, match="bad"):
        apply_rules(g, [Rule(P("exp", P.any("x")), lambda m: make_node("sum", (m.x,), {"axes": (0,)}), "bad")])
    flip = Rule(P("exp", P.any("x")), lambda m: make_node("exp", (make_node("neg", (make_node("neg", (m.x,), {}),), {}),), {}),
                "grows")
    with pytest.raises(RewriteError, match="grows"):
        apply_rules(g, [flip])


def test_pipelines_resolve_and_unknown_names_are_errors():
    assert passes.resolve("O0") == []
    assert set(passes.PIPELINES["O1"]) < set(passes.PIPELINES["O2"])
    assert passes.resolve("cse,dce") == ["cse", "dce"]
    with pytest.raises(dnir.DnirError, match="no_such_pass"):
        passes.resolve("cse,no_such_pass")
    with pytest.raises(dnir.DnirError, match="O3"):
        passes.optimize(small_graph(), "O3")


def test_records_dumps_and_metadata(tmp_path):
    g = small_graph()
    out, records = passes.run_pipeline(g, "O1", dump_dir=str(tmp_path))
    assert out.meta == g.meta and out.output_names == g.output_names
    assert [r.name for r in records] == ["input"] + passes.PIPELINES["O1"]
    assert records[0].nodes == g.node_count() and records[-1].nodes == out.node_count()
    changed = [r for r in records if r.changed]
    assert changed and all(r.delta for r in changed)
    assert records[-1].ops["permute"] == 0 and records[0].ops["permute"] == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "000_input.dnir" and files[1] == f"001_{passes.PIPELINES['O1'][0]}.dnir"
    assert len(files) == len(records)
    assert dnir.structurally_equal(dnir.parse_file(tmp_path / files[-1]), out)
    assert "cse" in passes.report_table(records)


def test_validation_names_the_broken_pass_and_the_ones_before(monkeypatch):
    def wrong(graph):
        """Replaces exp by neg (a broken pass)."""
        return apply_rules(graph, [Rule(P("exp", P.any("x")), lambda m: make_node("neg", (m.x,), {}))])
    monkeypatch.setitem(passes.PASSES, "wrong", passes.Pass("wrong", wrong))
    with pytest.raises(passes.ValidationError, match=r"'wrong' \(after cse, dce\).*output y"):
        passes.run_pipeline(small_graph(), ["cse", "dce", "wrong"], validate=True)
    passes.run_pipeline(small_graph(), ["cse", "dce", "wrong"])   # without validation it is not noticed


def test_dnir_opt_writes_the_graph_and_reports(tmp_path, capsys):
    src, dst = tmp_path / "g.dnir", tmp_path / "g.O2.dnir"
    src.write_text(dnir.print(dnir.models.build("kda", seq_len=40, heads=1, value_heads=2, head_dim=8,
                                                value_dim=4, chunk_size=32)))
    assert main(["opt", str(src), "--report", "--validate", "--block-size", "8", "-o", str(dst)]) == 0
    table = capsys.readouterr().out
    before, after = dnir.parse_file(src), dnir.parse_file(dst)
    conts = before.op_histogram()["cont"]       # every one is removed, and the table says so
    for word in ("pass", "time ms", "nodes", "GFLOP", "peak MB", "block_tril", f"-{conts} cont"):
        assert word in table
    assert after.input_types == before.input_types and after.op_histogram()["cont"] == 0
    assert main(["opt", str(src), "--passes", "eliminate_transposes,cse", "--json", "-o", str(dst)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["pass"] for p in report["passes"]] == ["input", "eliminate_transposes", "cse"]
    assert main(["opt", str(src), "--passes", "nope", "-o", str(dst)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["opt", str(tmp_path / "missing.dnir"), "-o", str(dst)]) == 2
