"""Safe file writing: unique temporary names in the target folder, then an atomic rename.

A fixed temporary name (``out.tmp``) can be pre-planted as a symlink by anyone who can write the
folder, and two processes writing the same target would share it; ``tempfile`` names are unique
and created exclusively (``O_EXCL``), so neither happens. Files end with the mode a plain
``open()`` would give (0666 less the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0666 less the process umask: what ``open(path, "w")`` creates."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A unique temporary path beside ``target`` for a writer that takes a file name; on success
    it gets the default mode and replaces ``target``, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(default_file_mode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically through a unique temporary file."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def temp_dir_beside(target: str | os.PathLike[str]) -> Path:
    """A new, uniquely named, empty folder next to ``target`` (to fill, then rename onto it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    path.chmod(0o777 & ~_umask())  # mkdtemp gives 0700; a plain mkdir would not
    return path


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None, for strict JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (no NaN/Infinity tokens, which other parsers reject): non-finite -> null."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def read_only_dir(path: str | os.PathLike[str]) -> bool:
    """An existing folder this process cannot write into (a read-only mount, or permissions)."""
    return Path(path).is_dir() and not os.access(path, os.W_OK | os.X_OK)
