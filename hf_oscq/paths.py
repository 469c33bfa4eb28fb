"""Paths named after outside input (a Hub repository id, a module name): they stay inside the folder meant for them."""

from __future__ import annotations

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
