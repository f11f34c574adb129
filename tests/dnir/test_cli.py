"""`dnir --version` and `dnir check`: exit codes 0 (ok), 1 (a check of a valid graph failed),
2 (usage or input: a file that is not a valid graph is an input error, as in every command)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dnir
from dnir import Builder
from dnir.cli import main

ROOT = Path(__file__).resolve().parents[2]

GOOD = """graph(%x: f32[2,3], %w: f32[3,3]) {
  %0: f32[2,3] = matmul(%x, %w) {transpose_b=true}
  %1: f32[2,3] = cumsum(%0) {axis=-1}
  return %1 as y
}
"""


def cli(*args):
    return subprocess.run([sys.executable, "-m", "dnir.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.dnir"
    path.write_text(GOOD)
    return path


def test_version():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"dnir {dnir.__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "dnir"
    if not script.exists():
        pytest.skip("the dnir console script is not installed here (pip install -e .)")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and dnir.__version__ in done.stdout


def test_check_good_file(good, capsys):
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{good}: ok (") and "inputs x, w" in out and "outputs y" in out
    assert main(["check", "--json", str(good)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"ok": True, "nodes": 4, "inputs": ["x", "w"], "outputs": ["y"]}


def test_check_a_printed_graph(tmp_path, capsys):
    bb = Builder()
    c, x = bb.input("c", (2,)), bb.input("x", (2,))
    body = bb.build([c + x, bb.sum(c)])
    b = Builder()
    c0, xs = b.input("c0", (2,)), b.input("xs", (5, 2))
    path = tmp_path / "scan.dnir"
    path.write_text(dnir.print(b.build(b.scan(body, [c0], [xs]))))
    assert main(["check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_bad_file_reports_line_and_column(tmp_path):
    bad = tmp_path / "bad.dnir"
    bad.write_text(GOOD.replace("cumsum(%0) {axis=-1}", "cumsum(%0) {axis=2}"))
    done = cli("check", str(bad))
    assert done.returncode == 2
    assert f"{bad}:3:18:" in done.stderr and "ParseError" in done.stderr
    assert "cumsum(f32[2,3]): axis 2 is out of range for rank 2" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("text, fragments", [
    (GOOD.replace("matmul", "matmull"), ["2:18:", "unknown op 'matmull'"]),
    (GOOD.replace("return %1 as y", "return %1 as y, %1 as y"), ["VerifyError", "output names repeat"]),
    (GOOD[:-2], ["5:1:", "expected '}', got end of input"]),
    (GOOD.replace("f32[2,3], %w", "f32[2,3) %w"), ["1:18:", "expected ',', got ')'"]),
])
def test_invalid_files_exit_2(tmp_path, capsys, text, fragments):
    bad = tmp_path / "bad.dnir"
    bad.write_text(text)
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
    assert main(["check", "--json", str(bad)]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and fragments[-1] in result["error"]


def test_check_binary_file_exits_2(tmp_path, capsys):
    path = tmp_path / "blob.dnir"
    path.write_bytes(b"\xff\xfe\x00graph")
    assert main(["check", str(path)]) == 2
    assert "not a UTF-8 text file" in capsys.readouterr().err


def test_check_reads_a_bounded_prefix_of_an_endless_file(capsys):
    """/dev/zero never ends: it is refused after the size limit, not read to the end."""
    assert main(["check", "/dev/zero"]) == 2
    assert "/dev/zero: larger than 64.0 MiB" in capsys.readouterr().err


def test_check_validates_the_metadata_against_the_graph(tmp_path, capsys):
    path = tmp_path / "gdn.dnir"
    assert main(["build", "gdn", "--heads", "1", "--value-heads", "2", "--head-dim", "8", "--value-dim", "8",
                 "--seq-len", "20", "--final-state", "-o", str(path)]) == 0
    assert main(["check", str(path)]) == 0
    text = path.read_text()
    cases = [(text.replace("value_dim=8", "value_dim=99999999999999999999"), "outside the 64-bit range"),
             (text.replace("value_dim=8", "value_dim=2**70"), "unexpected character '*'"),
             (text.replace("value_dim=8", "value_dim=999999999999"), "value_dim=999999999999: v would be"),
             (text.replace("value_dim=8", "value_dim=4"), "meta describes input v as f32[1,20,2,4], the graph "
                                                         "has f32[1,20,2,8]"),
             (text.replace("final_state=true", "final_state=false"), "meta describes outputs ['o'], the graph "
                                                                    "has ['o', 'final_state']"),
             (text.replace("chunk_size=64", "chunk_size=64.0"), "chunk_size=64.0"),
             (text.replace("l2norm=false", 'l2norm="no"'), "l2norm='no'; expected true or false"),
             (text.replace('variant="gdn", ', ""), "no variant")]
    for bad, words in cases:
        assert bad != text, words
        path.write_text(bad)
        capsys.readouterr()
        assert main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        assert words in err and str(path) in err, err
        assert main(["run", str(path), "--check"]) == 2          # run reads it the same way


def test_check_missing_file_exits_2(tmp_path):
    done = cli("check", str(tmp_path / "nope.dnir"))
    assert done.returncode == 2
    assert "nope.dnir" in done.stderr and "Traceback" not in done.stderr


def test_usage_errors_exit_2(capsys, tmp_path):
    assert main([]) == 2                              # no command: help, usage error
    assert "usage: dnir" in capsys.readouterr().out
    assert main(["check", str(tmp_path)]) == 2        # a directory
    with pytest.raises(SystemExit) as e:
        main(["check"])                               # argparse: missing FILE
    assert e.value.code == 2
