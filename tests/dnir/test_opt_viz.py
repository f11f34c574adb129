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


def _decode_layer(tmp_path, value_dim):
    import dnir
    from dnir.models import build_delta_net, preset
    from dnir.passes import optimize
    cfg = preset("kimi-linear", batch=2, seq_len=1, mode="decode", heads=2, value_heads=2, head_dim=16,
                 value_dim=value_dim, initial_state=True, final_state=True)
    path = tmp_path / f"decode{value_dim}.dnir"
    path.write_text(dnir.print(optimize(build_delta_net(cfg), "O2")))
    return path


def test_opt_target_reports_and_draws_the_fused_step(tmp_path, capsys):
    import dnir
    out = tmp_path / "cuda.dnir"
    assert main(["opt", str(_decode_layer(tmp_path, 32)), "--passes", "dce", "--target", "cuda", "--report",
                 "-o", str(out)]) == 0
    report = capsys.readouterr().out
    row = next(line for line in report.splitlines() if line.startswith("fuse_delta_steps "))
    assert "+1 token_step" in row and "-1 matmul" not in row and "-2 matmul" in row
    assert report.splitlines()[-2:] == ["fuse_delta_steps: token_step fused (decode step)",
                                        "fold_step_prologue: token_step folded with its prologue into decode_step"]
    graph = dnir.parse_file(out)
    assert graph.op_histogram()["decode_step"] == 1 and "exp" not in graph.op_histogram()
    (node,) = re.findall(r'label="decode_step\n[^"]*"[^\]]*\]', viz.to_dot(graph).source)   # its attributes
    assert "shape=box3d" in node and viz.CLASS_COLOURS["fused"] in node


def test_opt_target_says_why_a_step_is_not_fused(tmp_path, capsys):
    assert main(["opt", str(_decode_layer(tmp_path, 48)), "--passes", "dce", "--target", "cuda", "--report",
                 "-o", str(tmp_path / "cuda.dnir")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("fuse_delta_steps: token_step not fused: V=48 is not a "
                                                        "multiple of 32 (one thread per state column, whole "
                                                        "warps) (decode step)")
    assert main(["opt", str(tmp_path / "decode48.dnir"), "--target", "tpu", "-o", str(tmp_path / "x.dnir")]) == 2
    assert "--target 'tpu': expected one of numpy, llvm, cuda, vulkan" in capsys.readouterr().err
