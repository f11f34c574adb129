"""Errors a user can cause. Each names what was given and what was expected."""
from __future__ import annotations

import os
import traceback

_PKG_DIRS = tuple(  # with a trailing separator, so that dnir_demo.py next to dnir/ is user code
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, os.path.join(os.path.dirname(__file__), "..", "passes", "x"),
              os.path.join(os.path.dirname(__file__), "..", "lowering", "x"))
)


def user_call_site() -> str | None:
    """The innermost stack frame outside dnir's own code, as 'file:line'.

    Errors raised while a graph is built point at the builder call that made
    the bad node, not at the inference code that noticed it.
    """
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_PKG_DIRS) and "pytest" not in path and "pluggy" not in path:
            return f"{frame.filename}:{frame.lineno}"
    return None


class DnirError(Exception):
    """Base class of every error dnir raises for a user's mistake."""


class ShapeError(DnirError):
    """Operand shapes do not fit the op (matmul, broadcasting, axes, regions)."""


class DTypeError(DnirError):
    """Operand dtypes do not fit the op."""


class AttrError(DnirError):
    """An attribute is missing, unknown or has the wrong kind of value."""


class ParseError(DnirError):
    """Malformed `.dnir` text; carries the line and column."""

    def __init__(self, message: str, line: int, col: int, source_name: str = "<text>"):
        self.line, self.col, self.source_name = line, col, source_name
        super().__init__(f"{source_name}:{line}:{col}: {message}")


class VerifyError(DnirError):
    """A graph breaks an invariant of the IR."""


class InputError(DnirError):
    """A runtime input (array, state, option) does not fit what the graph expects."""


class NumericError(DnirError):
    """A result is not finite although every input is (float32 overflow)."""


class InputWarning(UserWarning):
    """An input dnir accepts but that is outside where the model behaves (an unstable key)."""


class BackendError(DnirError):
    """A backend cannot lower or run a graph (missing ops, no device)."""
