"""Writing files so that none is ever half-written: every file dnir writes (graphs,
pictures, libraries, dumps) goes to a temporary beside it, renamed into place when
complete. Readers see the old file or the new one; a failing or interrupted run
leaves no truncated output, and an output may name an input (`dnir opt X -o X`).
"""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


def check_output(path) -> Path:
    """An output path in an existing folder, not itself a folder (output_path checks it;
    callers with slow work before the write check it first too)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"cannot write {path}: no folder {target.parent} (create it first)")
    if target.is_dir():
        raise InputError(f"cannot write {path}: it is a folder")
    return target


@contextmanager
def output_path(path):
    """A temporary path beside `path` (same folder and suffix, which picks the format of
    tools that write by suffix) to write into; renamed onto `path` when the block
    succeeds, with the old file's permissions or the usual ones, removed when it fails."""
    target = check_output(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    except OSError as e:     # a read-only folder: name the output, not the temporary
        raise InputError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode) if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str):
    with output_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
