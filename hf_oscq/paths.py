"""Paths named after outside input (a Hub repository id, a module name) stay inside the folder meant for them;
output paths a user names are checked before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OscqValueError


def child_path(folder: str | Path, name: str) -> Path:
    """`folder / name` for a name taken from outside input, refused unless it is one plain path component.

    Args:
        folder: the folder the path must stay in.
        name: one component, e.g. the `NAME` of `ORG/NAME`.

    Returns:
        The path `folder / name`, which resolves to a child of `folder` (an existing symlink leading elsewhere is
        refused).

    Raises:
        OscqValueError: for an empty name, `.`, `..`, a name holding a path separator or a NUL byte, or a path that
            resolves outside `folder`.
    """
    folder = Path(folder)
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise OscqValueError(
            f"{name!r} cannot name a folder inside {str(folder)!r}: it must be one plain name (no '/', '\\', '.' or "
            "'..'). Check the repository id or module name it comes from."
        )
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise OscqValueError(
            f"{str(path)!r} leads outside {str(folder)!r} (a symbolic link): remove it or choose another folder."
        )
    return path


def check_output_path(path: str | Path, flag: str, kind: str | None = None) -> Path:
    """Checks, before any work starts, that `path` (a file or folder to write, or to replace) can be written: every
    part of it that exists is a folder, the last part is of the `kind` asked for where it exists, and the nearest
    existing folder above it is writable.

    Args:
        path: the output path.
        flag: what named it, for the message (`--output`, `output_dir`).
        kind: `"file"` (a JSON record: an existing folder there is refused), `"folder"` (an existing file there is
            refused) or None (either).

    Returns:
        `path` as an absolute path.

    Raises:
        OscqValueError: naming the part of the path that is a file, a folder where a file belongs (or the reverse),
            or the folder that cannot be written.
    """
    path = Path(path).absolute()
    if kind == "file" and path.is_dir():
        raise OscqValueError(f"{flag} {str(path)!r} is a folder, where a file belongs: pass a file path.")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OscqValueError(f"{flag} {str(path)!r} is a file, where a folder belongs: pass a folder path.")
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise OscqValueError(
                f"{flag} {str(path)!r}: {str(parent)!r} is a file, where a folder belongs. Pass a path whose "
                "existing parts are folders."
            )
    existing = next(parent for parent in path.parents if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OscqValueError(
            f"{flag} {str(path)!r}: the folder {str(existing)!r} cannot be written (read-only file system or no "
            "permission). Pass a path on a disk you can write to."
        )
    return path


def not_a_folder(path: str | Path) -> str:
    """Why `path` cannot be read as a folder, for a message: `"is a file, not a folder"` or `"does not exist"`."""
    return "is a file, not a folder" if Path(path).exists() else "does not exist"
