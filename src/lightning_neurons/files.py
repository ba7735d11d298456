"""Writing a file so that a crash, a kill or a full disk never leaves half of it under its real name.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "round.json"
    >>> write_text_atomic(path, '{"epoch": 0}').read_text()
    '{"epoch": 0}'
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary sibling, flush it to disk and rename it over ``path``.

    Readers (TensorBoard, a browser, ``jq``) see the old file or the new one, never a partial one; on failure the
    temporary file is removed and the old file is kept.

    Returns:
        The path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


__all__ = ["write_text_atomic"]
