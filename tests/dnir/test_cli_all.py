"""Every `dnir` subcommand: --help with an example, exit code 2 and one line for a
usage or input error, exit 1 for a failed check, JSON where a program reads the output."""
import json

import pytest

from dnir.cli import COMMANDS, main

GOOD = """graph(%x: f32[2,3], %w: f32[3,3]) {
  %0: f32[2,3] = matmul(%x, %w) {transpose_b=true}
  %1: f32[2,3] = cumsum(%0) {axis=-1}
  return %1 as y
}
"""

# One usage or input error per command, and the words its message must name.
USAGE_ERRORS = {
    "check": (["check", "{tmp}/missing.dnir"], "missing.dnir"),
    "demo": (["demo", "--quick", "--out", "{good}"], "--out"),
    "viz": (["viz", "{good}", "-o", "{tmp}/g.jpg"], ".jpg"),
    "build": (["build", "gdn", "--heads", "0", "-o", "{tmp}/x.dnir"], "heads=0"),
    "run": (["run", "{good}", "--target", "nosuch"], "nosuch"),
    "opt": (["opt", "{good}", "--passes", "nosuch", "-o", "{tmp}/x.dnir"], "nosuch"),
    "stats": (["stats", "{good}", "--top", "-1"], "--top"),
    "compile": (["compile", "{good}", "--target", "llvm", "-o", "{tmp}/g.txt"], ".so"),
    "bench": (["bench", "--threads", "0"], "--threads"),
}
JSON_COMMANDS = {
    "check": ["check", "{good}", "--json"],
    "run": ["run", "{good}", "--json"],
    "opt": ["opt", "{good}", "-o", "{tmp}/o.dnir", "--json"],
    "stats": ["stats", "{good}", "--json"],
}


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.dnir"
    good.write_text(GOOD)
    return {"tmp": tmp_path, "good": good}


def _argv(argv, files):
    return [a.format(**files) for a in argv]


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_every_command_is_covered():
    assert set(USAGE_ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: dnir {command}")
    assert "example" in text and f"dnir {command}" in text.split("example", 1)[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_input_error_exits_2_with_one_line(command, files, capsys):
    argv, words = USAGE_ERRORS[command]
    assert main(_argv(argv, files)) == 2
    captured = capsys.readouterr()
    assert words in _one_line(captured.err)


@pytest.mark.parametrize("command", COMMANDS)
def test_argparse_error_exits_2_with_one_line(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--no-such-option"])
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("dnir") and line.endswith("--help)")


@pytest.mark.parametrize("command", sorted(JSON_COMMANDS))
def test_json_output_is_one_document(command, files, capsys):
    assert main(_argv(JSON_COMMANDS[command], files)) == 0
    out = capsys.readouterr().out
    assert isinstance(json.loads(out), dict)


def test_check_failure_exits_1(files, capsys):
    bad = files["tmp"] / "bad.dnir"
    bad.write_text(GOOD.replace("%1: f32[2,3] = cumsum", "%1: f32[3,2] = cumsum"))
    assert main(["check", str(bad)]) == 1
    assert "bad.dnir" in _one_line(capsys.readouterr().err)


def test_run_check_failure_exits_1(files, capsys):
    path = files["tmp"] / "gdn.dnir"
    assert main(["build", "gdn", "--heads", "1", "--value-heads", "2", "--head-dim", "8", "--value-dim", "8",
                 "--seq-len", "20", "--scale", "0.25", "-o", str(path)]) == 0
    # The graph multiplies q by 0.25; the metadata the oracle is built from now says 0.5.
    path.write_text(path.read_text().replace("scale=0.25", "scale=0.5", 1))
    capsys.readouterr()
    assert main(["run", str(path), "--check"]) == 1
    assert "ABOVE TOLERANCE" in capsys.readouterr().out
