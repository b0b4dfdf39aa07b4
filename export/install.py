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


def installed_files(manifest: Any) -> list[str]:
    """Every file an export installs but its manifest, relative to the out dir: the artifacts (plain names), then
    the Triton repository's files (exactly those of export/triton.py's layout for its model name). A damaged
    manifest (an old export's) gives only the names that pass those rules: nothing else is ever ours to remove."""
    from .triton import check_name, paths  # here: triton imports nothing of install, but keep the stack one-way

    if not is_ours(manifest):
        return []
    artifacts = [e.get("file") for e in manifest["artifacts"].values() if isinstance(e, dict)]
    names = [n for n in artifacts if is_plain_name(n) and n != MANIFEST]
    repository = manifest.get("triton")
    if isinstance(repository, dict) and isinstance(repository.get("files"), dict):
        try:
            layout = set(paths(check_name(repository.get("name"))).values())
        except (ValueError, TypeError):
            layout = set()
        names += [n for n in repository["files"] if n in layout]
    return names


def _install(staging: Path, out_dir: Path, manifest: dict[str, Any], old: dict[str, Any] | None) -> None:
    out_dir.mkdir(exist_ok=True)
    ours = installed_files(manifest)
    for i, name in enumerate(ours + [MANIFEST]):
        try:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out_dir / name)
        except OSError as e:
            if i == 0:
                raise  # nothing was moved yet
            raise InstallError(e.errno, f"{out_dir / name}: {e.strerror} after {', '.join(ours[:i])} had been "
                                        f"replaced, while {out_dir / MANIFEST} is the old export's (serve_cli "
                                        f"refuses the dir): export again") from None
    stale = [name for name in installed_files(old) if name not in ours]
    for name in stale:
        with suppress(OSError):  # the new export is in place; a file it does not list only takes space
            (out_dir / name).unlink(missing_ok=True)
    for name in stale:  # the model folders that held them, once empty (a file of someone else's keeps its folder)
        for folder in list(Path(name).parents)[:-2]:  # triton/NAME/1 and triton/NAME, never triton/ itself
            with suppress(OSError):
                (out_dir / folder).rmdir()
