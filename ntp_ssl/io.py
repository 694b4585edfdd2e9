"""Crash-safe file writing.

Every file a run writes goes to a temporary name in the same folder and is renamed into
place with :func:`os.replace`, which is atomic on POSIX: a reader sees the old file or the
new one, never half of one, and a crash leaves at most a ``.tmp-*`` file nobody trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Usage: ``with atomic_path(p) as tmp: write(tmp)``. On an exception the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600, and some writers (safetensors) recreate the file 0600: give the
        # finished file the usual permissions, after the writer is done with it.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as handle:  # flush to disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pending_path(path: Path) -> Path:
    """Where the tensors of a checkpoint wait while its ``.json`` is being committed."""
    return path.with_name(path.name + ".pending")


def roll_forward(path: Path, expected: str | None) -> Path | None:
    """Finish a checkpoint save killed between its commit (the ``.json`` naming the new hash)
    and the rename of ``NAME.pending`` onto ``path``: when ``.pending`` has the ``expected``
    hash, rename it; return the file that now holds the committed tensors (``.pending`` itself
    in a read-only folder; None: there is no committed save to finish)."""
    pending = pending_path(path)
    if expected is None or not pending.is_file() or sha256_file(pending) != expected:
        return None
    try:
        os.replace(pending, path)
    except FileNotFoundError:  # someone else finished it meanwhile
        return path if path.exists() else None
    except OSError:  # a read-only folder: the committed tensors stay where they are
        return pending
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
