# Two entry points (see README): `make demo` and `make test`. Both set up
# everything first, idempotently, in .venv with the interpreter on PATH.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup ggml demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

# ggml from source, cached outside the repository (lowering/ggml/build.py); setup builds it too.
ggml: setup
	$(PY) -c "import sys; from dnir.lowering.ggml.build import main; sys.exit(main())"

demo: setup
	$(VENV)/bin/dnir demo

test: setup
	XDG_RUNTIME_DIR=/tmp $(PY) -m pytest -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
