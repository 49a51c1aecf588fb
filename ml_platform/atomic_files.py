"""Writing a file so that readers see the old one or the new one, never half of one: write a temp
file in the same folder, then os.replace it into place (the temp file is removed on failure).
The one implementation every atomic write of the platform goes through."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temp path next to `path` (parents created), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet_atomic(path: str | os.PathLike, table, compression: str = "zstd") -> Path:
    """A pyarrow Table as a Parquet file at `path`."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression=compression))
