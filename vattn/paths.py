"""Output paths checked before any work starts, so a bad one loses nothing computed."""
from __future__ import annotations

import os
from pathlib import Path

from vattn.errors import VattnError


def check_writable_dir(path, what: str):
    """A directory we can create (or that exists) and write in; else a VattnError naming `what`."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists():
            if not p.is_dir():
                raise VattnError(f"{what} {path}: {p} is a file, not a directory; choose another path")
            if not os.access(p, os.W_OK | os.X_OK):
                raise VattnError(f"{what} {path}: {p} is not writable; choose another path")
            return


def check_writable_file(path, what: str):
    """`path` can be written as a file (its first existing ancestor a writable directory)."""
    path = Path(path)
    if path.is_dir():
        raise VattnError(f"{what} {path} is a directory; give a file path")
    check_writable_dir(path.parent, what)
