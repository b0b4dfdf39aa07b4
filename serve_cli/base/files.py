"""Files, for every package: atomic replacement of a regular file, JSON, and what is wrong with a link.
Imports nothing of ours."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temp file in the same folder, fsync, then os.replace: readers see old or new, never half.

    On any failure (a full disk, Ctrl-C) the temp file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix: some writers (torch.export.save) insist on it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def broken_link(path: Path, name: str | None = None) -> str | None:
    """How a link that leads nowhere is broken, in words for an error message that calls it `name` (default:
    the path); None when it is not such a link."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{name or path} is a link in a circle"
    return f"{name or path} is a link to {os.readlink(path)}, which does not exist"
