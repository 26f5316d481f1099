"""Durable file writes, one way for the whole package.

`atomic_write_bytes(path, data)` / `atomic_write_text(path, text)`: the data goes to a temporary file in the
same folder, is flushed and fsynced, then renamed over `path` (`os.replace`), and the folder is fsynced so
the rename itself survives a power cut. A reader sees the old file or the new one, never a part of either.
With `exclusive=True` the temporary file is linked into place instead, which fails with FileExistsError
when `path` exists (an atomic create-if-absent).

`fsync_tree(folder)`: every file directly in `folder`, then the folder itself, on disk: what a folder needs
before it is renamed into place as a whole (a published adapter version, a converted model).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

TMP_SUFFIX = ".tmp"   # temporary files are `.<name>.<random>.tmp`: hidden, and removable at start


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a folder (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file directly in `folder`, then the folder."""
    for p in Path(folder).iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Write `data` to `path` atomically and durably (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)   # fails when `path` exists
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), exclusive=exclusive)
