"""The out dir: whether an export may replace what it holds (only an earlier export of this tool), and the
install that replaces it all at once, whatever a stop signal or the file system does meanwhile."""
from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_cli.base.cli import stop_signals_deferred
from serve_cli.base.manifest import MANIFEST, ManifestError, is_ours, is_plain_name, load_json


def previous_export(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of the export that `out_dir` holds (None when it is new or empty); refuses any other folder,
    before any work is done, so that an export never replaces what it did not write."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ManifestError(f"--out-dir {out_dir} is a file: choose a folder")
    if not any(out_dir.iterdir()):
        return None
    try:
        old = load_json(out_dir / MANIFEST)
    except ManifestError:
        old = None
    if not is_ours(old):
        raise ManifestError(f"--out-dir {out_dir} holds files that are not an export of this tool: choose an empty "
                            f"or new folder")
    return old


class InstallError(OSError):
    """A file system error between the first and the last rename of an install: the message says which files
    are new."""


@dataclass
class Progress:
    """How far an export got, for what a stop says: out_dir once it holds the new export in full."""
    installed: Path | None = None


def install(staging: Path, out_dir: Path, manifest: dict[str, Any], old: dict[str, Any] | None,
            progress: Progress) -> None:
    """Move the new files in one by one, the manifest last, then remove what the old manifest listed and the
    new one does not. Nothing else in out_dir is touched. Each rename is atomic; a reader that comes between
    them sees a manifest whose hashes do not match and refuses, never a mix that answers. A stop signal waits
    until the renames are done (they take milliseconds), so a stopped export is all old or all new."""
    with stop_signals_deferred():
        _install(staging, out_dir, manifest, old)
        progress.installed = out_dir


def _install(staging: Path, out_dir: Path, manifest: dict[str, Any], old: dict[str, Any] | None) -> None:
    out_dir.mkdir(exist_ok=True)
    ours = [entry["file"] for entry in manifest["artifacts"].values()]
    for i, name in enumerate(ours + [MANIFEST]):
        try:
            os.replace(staging / name, out_dir / name)
        except OSError as e:
            if i == 0:
                raise  # nothing was moved yet
            raise InstallError(e.errno, f"{out_dir / name}: {e.strerror} after {', '.join(ours[:i])} had been "
                                        f"replaced, while {out_dir / MANIFEST} is the old export's (serve_cli "
                                        f"refuses the dir): export again") from None
    for entry in (old or {}).get("artifacts", {}).values():
        name = entry.get("file") if isinstance(entry, dict) else None
        if is_plain_name(name) and name not in ours + [MANIFEST]:
            with suppress(OSError):  # the new export is in place; a file it does not list only takes space
                (out_dir / name).unlink(missing_ok=True)
