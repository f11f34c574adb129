"""`dnir demo --quick`: the per-pass report, runs on NumPy and TVM-llvm checked against
the oracle, and the pictures and graphs it says it wrote."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dnir
from dnir import viz
from dnir.cli.demo import LAYERS, QUICK, QUICK_SEQ_LEN
from dnir.models import build_delta_net, preset

pytestmark = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "pictures"
    done = subprocess.run([sys.executable, "-m", "dnir.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, out


def _section(stdout, name):
    return stdout.split(f"== {name} ")[1].split("\n== ")[0]


def test_pass_report_matches_the_written_graphs(demo):
    stdout, out = demo
    for name in LAYERS:
        section = _section(stdout, name)
        assert re.search(r"^pass +nodes +GFLOP +peak MB +ms +changes$", section, re.M)
        input_nodes = int(re.search(r"^input +(\d+) ", section, re.M).group(1))
        final_nodes = int(re.search(r"^O2 \(\d+ passes\) +(\d+) ", section, re.M).group(1))
        assert re.search(r"^block_tril +\d+ ", section, re.M)       # a pass that always rewrites these layers
        before, after = dnir.parse_file(out / f"{name}.O0.dnir"), dnir.parse_file(out / f"{name}.O2.dnir")
        assert before.node_count() == input_nodes and after.node_count() == final_nodes
        built = build_delta_net(preset(name, seq_len=QUICK_SEQ_LEN, **QUICK[name]))
        assert dnir.structurally_equal(before, built)


def test_every_run_matches_the_oracle(demo):
    stdout, _ = demo
    for name in LAYERS:
        rows = re.findall(r"^(numpy|llvm|vulkan) +(O0|O2) +(\S+) +(\d+) +([\d.]+)x +([\d.]+)x +(\S+)$",
                          _section(stdout, name), re.M)
        assert {(r[0], r[1]) for r in rows} >= {("numpy", "O0"), ("numpy", "O2"), ("llvm", "O0"), ("llvm", "O2")}
        for target, level, compile_s, _, vs_o0, _, error in rows:
            assert float(error) < 1e-5, (name, target, level)
            assert (compile_s == "-") == (target == "numpy")
            assert level == "O2" or float(vs_o0) == 1.0


def test_pictures_are_written_where_it_says(demo):
    stdout, out = demo
    assert f"wrote to {out}/" in stdout
    for name in LAYERS:
        listed = re.search(rf"^  ({name}\.\S+(  {name}\.\S+)*)$", stdout, re.M).group(1).split("  ")
        assert sorted(listed) == sorted(f"{name}.{s}" for s in ("O0.dnir", "O2.dnir", "O0.svg", "O2.svg",
                                                                 "diff.svg"))
        for file in listed:
            assert (out / file).stat().st_size > 0
        diff = (out / f"{name}.diff.svg").read_text()
        assert diff.startswith("<?xml") and "<svg" in diff
        assert viz.DIFF_COLOURS["removed"] in diff and viz.DIFF_COLOURS["added"] in diff
