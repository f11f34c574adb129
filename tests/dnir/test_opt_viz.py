"""`dnir opt --dump-dir D --viz`: a picture per pass that changed the graph, and its diff."""
import re
import shutil

import pytest

from dnir import viz
from dnir.cli import main

pytestmark = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")

# A transpose pair that eliminate_transposes folds away; dce then has nothing left to remove.
GRAPH = """graph(%a: f32[2,4,8], %b: f32[2,8,4]) {
  %0: f32[2,8,4] = permute(%a) {axes=[0, 2, 1]}
  %1: f32[2,4,8] = permute(%0) {axes=[0, 2, 1]}
  %2: f32[2,4,4] = matmul(%1, %b)
  return %2 as y
}
"""


def test_viz_draws_changed_passes_and_their_diffs(tmp_path, capsys):
    src, dump = tmp_path / "g.dnir", tmp_path / "ir"
    src.write_text(GRAPH)
    code = main(["opt", str(src), "--passes", "eliminate_transposes,dce", "--dump-dir", str(dump), "--viz",
                 "-o", str(tmp_path / "out.dnir")])
    assert code == 0
    names = sorted(p.name for p in dump.iterdir())
    assert names == ["000_input.dnir", "000_input.svg", "001_eliminate_transposes.diff.svg",
                     "001_eliminate_transposes.dnir", "001_eliminate_transposes.svg", "002_dce.dnir"]
    before = (dump / "000_input.svg").read_text()
    after = (dump / "001_eliminate_transposes.svg").read_text()
    labels = lambda svg: re.findall(r"<text[^>]*>([^<]*)</text>", svg)  # noqa: E731
    assert sum("permute" in t for t in labels(before)) == 2
    assert not any("permute" in t for t in labels(after))
    diff = (dump / "001_eliminate_transposes.diff.svg").read_text()
    assert viz.DIFF_COLOURS["removed"] in diff and any("[removed] permute" in t for t in labels(diff))


def test_viz_without_dump_dir_is_a_usage_error(tmp_path, capsys):
    src = tmp_path / "g.dnir"
    src.write_text(GRAPH)
    assert main(["opt", str(src), "--viz", "-o", str(tmp_path / "out.dnir")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dump-dir" in err
