"""dnir build and dnir run --check, in-process through dnir.cli.main and once as a command."""
import json
import subprocess
import sys

import pytest

import dnir
from dnir.cli import main

SMALL = ["--heads", "2", "--value-heads", "4", "--head-dim", "8", "--value-dim", "8"]


def _build(tmp_path, *argv, name="layer.dnir"):
    path = tmp_path / name
    assert main(["build", *argv, "-o", str(path)]) == 0
    return path


def _run_json(capsys, path, *argv):
    capsys.readouterr()
    code = main(["run", str(path), "--target", "numpy", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv", [
    ["gdn", "--seq-len", "200", "--chunk-size", "32"],
    ["kda", "--seq-len", "200", "--block-size", "16", "--l2norm", "--initial-state", "--final-state"],
    ["gdn", "--batch", "3", "--seq-len", "65", "--mode", "recurrent", "--final-state"],
    ["kda", "--batch", "2", "--mode", "decode", "--initial-state", "--final-state"],
    ["kda", "--cu-seqlens", "0,15,100,300", "--chunk-size", "16", "--initial-state", "--final-state"],
], ids=["gdn-chunked", "kda-blocked", "gdn-recurrent", "kda-decode", "kda-varlen"])
def test_build_then_run_check(tmp_path, capsys, argv):
    path = _build(tmp_path, *argv, *SMALL)
    graph = dnir.parse_file(path)
    assert graph.meta["variant"] == argv[0] and graph.meta["model"] == "delta_net"
    code, result = _run_json(capsys, path, "--check", "--seed", "3")
    assert code == 0, result
    check = result["check"]
    assert check["ok"] and check["tolerance"] == 1e-5
    assert set(check["errors"]) == set(graph.output_names)
    assert all(0 < err < 1e-5 for err in check["errors"].values())
    assert all(o["finite"] for o in result["outputs"])


def test_text_report_and_presets(tmp_path, capsys):
    path = _build(tmp_path, "gdn", "--preset", "qwen3-next", "--seq-len", "16", "--chunk-size", "16")
    assert "B=1 T=16 H=16 HV=32 K=128 V=128" in capsys.readouterr().out
    assert main(["run", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "float32[1, 16, 32, 128]" in out and "tolerance 1e-05): ok" in out
    kimi = dnir.parse_file(_build(tmp_path, "kda", "--seq-len", "16", name="kimi.dnir"))
    assert kimi.inputs[3].shape == (1, 16, 32, 128)          # kimi-linear sizes by default for kda


def test_build_records_the_precision(tmp_path):
    tf32 = dnir.parse_file(_build(tmp_path, "gdn", "--seq-len", "16", "--precision", "tf32", *SMALL))
    default = dnir.parse_file(_build(tmp_path, "gdn", "--seq-len", "16", *SMALL, name="f32.dnir"))
    half = dnir.parse_file(_build(tmp_path, "gdn", "--seq-len", "16", "--dtype", "bf16", *SMALL, name="bf16.dnir"))
    assert (tf32.meta["precision"], default.meta["precision"], half.meta["precision"]) == ("tf32", "highest", "tf32")


def test_check_fails_with_exit_1_when_the_graph_is_wrong(tmp_path, capsys):
    path = _build(tmp_path, "gdn", "--seq-len", "40", *SMALL)
    text = path.read_text()
    scale = dnir.parse(text).meta["scale"]
    # the graph keeps multiplying q by the real scale; the metadata now claims another
    path.write_text(text.replace(f"scale={scale!r}", "scale=0.5", 1))
    code, result = _run_json(capsys, path, "--check")
    assert code == 1 and result["check"]["ok"] is False
    assert result["check"]["errors"]["o"] > 1e-2


def test_run_without_check_accepts_any_graph(tmp_path, capsys):
    b = dnir.Builder()
    x = b.input("x", (3, 4))
    path = tmp_path / "plain.dnir"
    path.write_text(dnir.print(b.build(b.exp(x), names=["y"])))
    code, result = _run_json(capsys, path)
    assert code == 0 and result["outputs"] == [{"name": "y", "shape": [3, 4], "dtype": "float32",
                                                "finite": True}]
    assert main(["run", str(path), "--check"]) == 2
    assert "no delta-net model metadata" in capsys.readouterr().err


@pytest.mark.parametrize("argv,words", [
    (["build", "gdn", "--block-size", "24", "-o", "{tmp}/x.dnir"], "block_size=24"),
    (["build", "kda", "--preset", "qwen3-next", "-o", "{tmp}/x.dnir"], "not kda"),
    (["build", "gdn", "--cu-seqlens", "0,a,9", "-o", "{tmp}/x.dnir"], "--cu-seqlens"),
    (["build", "gdn", "--cu-seqlens", "0,9,5", "-o", "{tmp}/x.dnir"], "not strictly increasing"),
    (["build", "gdn", "--batch", "2", "--cu-seqlens", "0,5,9", "-o", "{tmp}/x.dnir"], "B=1"),
    (["build", "gdn", "--heads", "3", "-o", "{tmp}/x.dnir"], "not a multiple"),
    (["build", "gdn", "--mode", "decode", "--seq-len", "4", "-o", "{tmp}/x.dnir"], "decode"),
    (["run", "{tmp}/missing.dnir"], "no such file"),
    (["run", "{tmp}/x.dnir", "--target", "nowhere"], "nowhere"),
])
def test_bad_command_lines_exit_2(tmp_path, capsys, argv, words):
    _build(tmp_path, "gdn", "--seq-len", "8", *SMALL, name="x.dnir")
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_help_has_examples(capsys):
    for command in ("build", "run"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert f"dnir {command}" in capsys.readouterr().out.split("example")[1]


def test_as_a_command(tmp_path):
    path = tmp_path / "kda.dnir"
    cli = [sys.executable, "-m", "dnir.cli"]
    subprocess.run(cli + ["build", "kda", *SMALL, "--seq-len", "70", "--final-state", "-o", str(path)],
                   check=True, capture_output=True)
    done = subprocess.run(cli + ["run", str(path), "--target", "numpy", "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "error vs float64 recurrent oracle" in done.stdout
