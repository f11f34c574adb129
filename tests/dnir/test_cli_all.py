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
    "stats": (["stats", "{good}", "--pipeline", ","], "--pipeline"),
    "compile": (["compile", "{good}", "--target", "llvm", "-o", "{tmp}/g.txt"], ".so"),
    "export": (["export", "{good}", "--format", "ggml-c", "-o", "{tmp}/9x.c"], "9x"),
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


def test_check_failure_exits_1_and_an_invalid_file_2(files, capsys):
    exp = files["tmp"] / "exp.dnir"
    exp.write_text("graph(%x: f32[2]) {\n  %0: f32[2] = exp(%x)\n  return %0\n}\n")
    assert main(["check", str(exp)]) == 0
    assert main(["check", str(exp), "--ranges"]) == 1              # valid, but exp(x) can overflow
    assert "exp" in capsys.readouterr().out
    bad = files["tmp"] / "bad.dnir"
    bad.write_text(GOOD.replace("%1: f32[2,3] = cumsum", "%1: f32[3,2] = cumsum"))
    for command in (["check"], ["opt", "-o", str(files["tmp"] / "o.dnir")], ["stats"], ["run"],
                    ["viz", "-o", str(files["tmp"] / "o.svg")], ["compile", "--target", "llvm", "-o",
                                                                 str(files["tmp"] / "o.so")]):
        assert main([command[0], str(bad), *command[1:]]) == 2, command
        assert "bad.dnir:3:7: ParseError" not in (err := _one_line(capsys.readouterr().err))
        assert err.startswith(f"dnir {command[0]}: ParseError: {bad}:3:7: %1 is declared f32[3,2]"), err


def test_missing_file_has_one_wording(files, capsys):
    missing = files["tmp"] / "nope.dnir"
    for command in (["check"], ["opt", "-o", str(files["tmp"] / "o.dnir")], ["stats"], ["run"],
                    ["viz", "-o", str(files["tmp"] / "o.svg")], ["compile", "--target", "llvm", "-o",
                                                                 str(files["tmp"] / "o.so")]):
        assert main([command[0], str(missing), *command[1:]]) == 2, command
        assert _one_line(capsys.readouterr().err) == f"dnir {command[0]}: no such file: {missing}"
    assert main(["viz", str(files["good"]), "--diff", str(missing), "-o", str(files["tmp"] / "d.svg")]) == 2
    assert _one_line(capsys.readouterr().err) == f"dnir viz: no such file: {missing}"


# Every command that writes a file, with {out} for the path it writes.
WRITERS = {
    "build": ["build", "gdn", "--heads", "1", "--value-heads", "1", "--head-dim", "4", "--value-dim", "4",
              "--seq-len", "8", "-o", "{out}.dnir"],
    "opt": ["opt", "{good}", "-o", "{out}.dnir"],
    "viz": ["viz", "{good}", "-o", "{out}.dot"],
    "compile": ["compile", "{good}", "--target", "llvm", "-o", "{out}.so"],
    "export": ["export", "{good}", "--format", "ggml-c", "-o", "{out}.c"],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_output_into_a_missing_folder_is_one_error(command, files, capsys):
    missing = files["tmp"] / "no" / "such"
    argv = [a.format(out=missing / "x", **files) for a in WRITERS[command]]
    assert main(argv) == 2
    out = argv[argv.index("-o") + 1]
    assert _one_line(capsys.readouterr().err) == f"dnir {command}: InputError: cannot write {out}: no folder " \
                                                 f"{missing} (create it first)"
    assert not missing.exists()


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_outputs_are_renamed_into_place(command, files, monkeypatch):
    """Each command writes a temporary beside its output and renames it: the output
    appears whole (with the usual permissions), and no temporary is left behind."""
    import os
    if command == "export":
        from dnir.lowering.ggml.build import GgmlUnavailable, ggml_build
        try:
            ggml_build()
        except GgmlUnavailable as e:
            pytest.skip(f"ggml cannot be built here: {e}")
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b))), real(a, b))[1])
    argv = [a.format(out=files["tmp"] / "x", **files) for a in WRITERS[command]]
    assert main(argv) == 0
    out = argv[argv.index("-o") + 1]
    tmp, dst = renamed[-1]
    assert dst == out and os.path.dirname(tmp) == os.path.dirname(out) and tmp.endswith(os.path.splitext(out)[1])
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in files["tmp"].iterdir()) == sorted(["good.dnir", os.path.basename(out)])


def _umask():
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_opt_in_place_and_a_failure_leaves_the_file(files, capsys):
    path = files["tmp"] / "g.dnir"
    path.write_text(GOOD)
    assert main(["opt", str(path), "-o", str(path), "--passes", "nosuch"]) == 2
    assert path.read_text() == GOOD                                 # a failed run keeps the old file whole
    assert main(["opt", str(path), "-o", str(path)]) == 0           # the in-place edit
    assert main(["check", str(path)]) == 0 and path.read_text() != GOOD
    assert sorted(p.name for p in files["tmp"].iterdir()) == ["g.dnir", "good.dnir"]


def test_empty_pipeline_is_an_error(files, capsys):
    for argv in (["opt", "{good}", "--passes", "", "-o", "{tmp}/o.dnir"],
                 ["opt", "{good}", "--pipeline", " , ", "-o", "{tmp}/o.dnir"],
                 ["stats", "{good}", "--pipeline", ""]):
        assert main(_argv(argv, files)) == 2
        assert "names no pass" in _one_line(capsys.readouterr().err)
    assert not (files["tmp"] / "o.dnir").exists()


@pytest.mark.parametrize("command", [["run", "{good}"], ["demo", "--quick", "--out", "{tmp}/d"], ["bench", "--quick"]])
def test_negative_seed_is_a_usage_error(command, files, capsys):
    try:
        code = main(_argv(command, files) + ["--seed", "-1"])
    except SystemExit as e:      # argparse's own check
        code = e.code
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert "--seed" in line and "-1: expected an integer >= 0" in line


def test_compile_checks_the_architecture(files, capsys):
    assert main(_argv(["compile", "{good}", "--target", "cuda", "--arch", "sm_bogus", "-o", "{tmp}/g.so"],
                      files)) == 2
    assert "--arch 'sm_bogus': expected a CUDA architecture" in _one_line(capsys.readouterr().err)
    assert not (files["tmp"] / "g.so").exists()


@pytest.mark.parametrize("seq_len", ["1000000000000", str(10**30)])
def test_sizes_are_bounded_where_they_are_read(seq_len, files, capsys):
    out = files["tmp"] / "big.dnir"
    assert main(["build", "gdn", "--seq-len", seq_len, "-o", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"seq_len={seq_len}" in err and "q would be f32[1," in err and ("PiB" in err or "EiB" in err), err
    assert "a tensor may have at most 2**40 elements" in err and not out.exists()
    # the same size in a file
    text = GOOD.replace("%x: f32[2,3]", f"%x: f32[{seq_len},3]")
    (files["tmp"] / "big_input.dnir").write_text(text)
    assert main(["stats", str(files["tmp"] / "big_input.dnir")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "big_input.dnir:1:" in err and "at most 2**40 elements" in err, err


def test_run_names_the_memory_a_graph_needs_before_it_runs(files, capsys):
    """Within the size bound but beyond this machine: stats and build state the plan, run
    refuses before drawing inputs."""
    from dnir.limits import machine_memory
    out = files["tmp"] / "long.dnir"
    assert main(["build", "gdn", "--seq-len", "100000000", "-o", str(out)]) == 0
    assert "planned compute buffer" in capsys.readouterr().out
    assert main(["stats", str(out), "--json"]) == 0
    peak = json.loads(capsys.readouterr().out)["peak_bytes"]
    assert peak > machine_memory()
    assert main(["run", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{out}: running needs at least" in err and "TiB" in err and "of memory" in err


def test_run_check_failure_exits_1(files, capsys):
    path = files["tmp"] / "gdn.dnir"
    assert main(["build", "gdn", "--heads", "1", "--value-heads", "2", "--head-dim", "8", "--value-dim", "8",
                 "--seq-len", "20", "--scale", "0.25", "-o", str(path)]) == 0
    # The graph multiplies q by 0.25; the metadata the oracle is built from now says 0.5.
    path.write_text(path.read_text().replace("scale=0.25", "scale=0.5", 1))
    capsys.readouterr()
    assert main(["run", str(path), "--check"]) == 1
    assert "ABOVE TOLERANCE" in capsys.readouterr().out


def test_without_graphviz_the_dot_source_lands_beside_the_picture(files, capsys, monkeypatch):
    import dnir.viz
    monkeypatch.setattr(dnir.viz, "dot_available", lambda: False)
    out = files["tmp"] / "p.svg"
    assert main(["viz", str(files["good"]), "-o", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"wrote {out.with_suffix('.dot')}." in line and f"-o {out}" in line
    assert sorted(p.name for p in files["tmp"].iterdir()) == ["good.dnir", "p.dot"]
    assert out.with_suffix(".dot").read_text().startswith("digraph")


def test_an_interrupted_write_leaves_the_old_file(files, capsys, monkeypatch):
    """Ctrl-C while the optimised graph is being written: exit 130, one line, the old
    file whole and no temporary left."""
    import dnir.files
    path = files["tmp"] / "g.dnir"
    path.write_text(GOOD)

    def interrupted(tmp, target):
        raise KeyboardInterrupt
    monkeypatch.setattr(dnir.files.os, "replace", interrupted)
    assert main(["opt", str(path), "-o", str(path)]) == 130
    assert _one_line(capsys.readouterr().err) == "dnir opt: interrupted"
    assert path.read_text() == GOOD
    assert sorted(p.name for p in files["tmp"].iterdir()) == ["g.dnir", "good.dnir"]


def test_build_bounds_the_values_inside_the_graph_too(files, capsys):
    """KDA's O0 graph holds [.., chunks, C, C, K] decays, far larger than its inputs: a
    length whose inputs fit but whose decays do not is refused before the file is written."""
    out = files["tmp"] / "kda.dnir"
    assert main(["build", "kda", "--seq-len", "5000000", "-o", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("dnir build: InputError: kda chunked B=1 T=5000000 H=32 HV=32 K=128 V=128: ") and \
        "1.31e+12 elements, 4.8 TiB; a tensor may have at most 2**40 elements" in err, err
    assert not out.exists()
