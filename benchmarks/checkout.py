"""dnir imported from a checkout that was never installed (the GPU machine: no pip, no network).

An install maps lowering/, passes/ and benchmarks/ into the dnir package (pyproject's
package-dir), and `dnir/__init__.py` imports dnir.lowering. Without an install the package is
loaded here with the checkout's root as a second place to find its subpackages: the same
mapping, made at import time.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_loader():
    """dnir.lowering.runtime_loader, from an install or else from this checkout."""
    try:
        import dnir  # noqa: F401
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("dnir."):
            raise
        for name in [m for m in sys.modules if m == "dnir" or m.startswith("dnir.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "dnir", ROOT / "dnir" / "__init__.py", submodule_search_locations=[str(ROOT / "dnir"), str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["dnir"] = module
        spec.loader.exec_module(module)
    from dnir.lowering import runtime_loader
    return runtime_loader
