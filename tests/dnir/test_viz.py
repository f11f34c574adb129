"""Pictures: real SVG/PNG files rendered by Graphviz's `dot`, checked by content."""
import re
import shutil

import numpy as np
import pytest

import dnir
from dnir import viz
from dnir.cli import main

pytestmark = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")


def _scan_graph():
    bb = dnir.Builder()
    s, x, w = bb.input("s", (3,)), bb.input("x", (3,)), bb.input("w", (3,))
    s2 = s * 0.5 + x * w
    body = bb.build([s2, bb.exp(s2)])
    b = dnir.Builder()
    s0, xs, w = b.input("s0", (3,)), b.input("xs", (3, 5)), b.input("w", (3,))
    seq = b.cont(b.permute(b.reshape(xs, (5, 3)), (0, 1)))
    fin, ys = b.scan(body, [s0], [seq], [w])
    return b, b.build([fin, b.matmul(ys, b.reshape(w, (3, 1)))], names=["final", "proj"])


def test_svg_has_labels_types_and_scan_cluster(tmp_path):
    _, graph = _scan_graph()
    svg = viz.render(viz.to_dot(graph), tmp_path / "g.svg").read_text()
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    for label in ("scan", "matmul", "input xs", "output final", "output proj", "f32[5,3]", "axes=[0,1]",
                  "scan body (x5)"):
        assert any(label in t for t in texts), label
    assert 'class="cluster"' in svg
    assert viz.CLASS_COLOURS["matmul"] in svg and viz.CLASS_COLOURS["layout"] in svg


def test_collapse_folds_bodies_and_layout_chains(tmp_path):
    _, graph = _scan_graph()
    full = viz.to_dot(graph).source
    small = viz.to_dot(graph, collapse=True).source
    assert "cluster_" in full and "cluster_" not in small
    assert "layout chain x3" in small and "body: " in small
    assert small.count("->") < full.count("->")


def test_diff_marks_removed_added_unchanged(tmp_path):
    b, before = _scan_graph()
    final, proj = before.outputs
    after = before.with_outputs([final, b.exp(proj)])
    svg = viz.render(viz.diff_dot(after, before), tmp_path / "d.svg").read_text()
    assert viz.DIFF_COLOURS["removed"] in svg and viz.DIFF_COLOURS["unchanged"] in svg
    assert "[removed] exp" in svg
    svg2 = viz.render(viz.diff_dot(before, after), tmp_path / "d2.svg").read_text()
    assert viz.DIFF_COLOURS["added"] in svg2 and "[added] exp" in svg2
    assert "removed: 0, added: 1" in svg2


def test_png_render_opens_with_pillow(tmp_path):
    from PIL import Image
    _, graph = _scan_graph()
    path = viz.render(viz.to_dot(graph, collapse=True), tmp_path / "g.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        colours = np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 3  # a drawing, not a blank page


def test_cli_viz_and_diff(tmp_path, capsys):
    b, graph = _scan_graph()
    src, dst = tmp_path / "a.dnir", tmp_path / "b.dnir"
    src.write_text(dnir.print(graph))
    dst.write_text(dnir.print(graph.with_outputs([graph.outputs[0], b.neg(graph.outputs[1])])))
    assert main(["viz", str(src), "-o", str(tmp_path / "a.svg")]) == 0
    assert main(["viz", str(src), "--diff", str(dst), "-o", str(tmp_path / "d.svg")]) == 0
    assert "[added] neg" in (tmp_path / "d.svg").read_text()
    assert main(["viz", str(src), "-o", str(tmp_path / "a.jpg")]) == 2
    assert "unknown picture format" in capsys.readouterr().err
    assert main(["viz", str(tmp_path / "missing.dnir"), "-o", str(tmp_path / "x.svg")]) == 2


def test_without_dot_writes_dot_file_and_says_how(tmp_path, monkeypatch):
    _, graph = _scan_graph()
    monkeypatch.setattr(viz, "dot_available", lambda: False)
    with pytest.raises(dnir.DnirError, match=r"dot -Tsvg .*g\.dot"):
        viz.render(viz.to_dot(graph), tmp_path / "g.svg")
    assert (tmp_path / "g.dot").read_text().startswith("digraph")
