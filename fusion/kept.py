"""Files kept for later processes (pooled vectors, splits): written whole under a temporary name, or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_kept(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` the file ``path`` through a temporary file beside it, renamed into place, so that a reader never sees
    half of one; a folder that takes no file (read-only, full, not a folder) only costs the reuse.

    The temporary name is unique across processes and hosts (a shared cache folder), and the file gets the usual
    permissions, so that other users of the folder can read it.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as file:
            write(file)
        os.replace(tmp, path)
    except (OSError, RuntimeError):  # torch.save may report a failed write as a RuntimeError
        with contextlib.suppress(OSError):  # nothing to remove, or nowhere to remove it from
            tmp.unlink()
