"""Every script in examples/ runs to the end (each asserts its own results) and says what it shows.

(In tests/examples/, not tests/: pytest puts a test file's folder on sys.path, and tests/ holds
a tests/dnir/ folder that would then shadow the dnir package.)"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))
# A line each script prints once its checks have passed.
LAST_WORDS = {
    "01_build_and_check.py": "O2: ",
    "02_write_a_pass.py": "after has 0",
    "03_inspect_memory.py": "less compute buffer than O0",
    "04_tvm_codegen.py": "llvm vs NumPy float64",
    "05_torch_drop_in.py": "largest difference from the PyTorch loop",
    "06_toy_backend.py": "the toy python backend vs the float64 oracle",
    "07_ggml_export.py": "T=320 B=3: compute buffer",
}


def test_examples_are_the_ones_listed():
    assert [p.name for p in EXAMPLES] == sorted(LAST_WORDS)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc and len(doc.splitlines()) >= 3, f"{script.name} needs a docstring saying what it shows"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert LAST_WORDS[script.name] in done.stdout
    assert not list(tmp_path.iterdir()), "an example should not leave files behind"
