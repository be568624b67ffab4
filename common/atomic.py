"""Write files so that a crash never leaves them half-written."""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomically(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    text = json.dumps(payload, indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def replace_directory(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a fresh directory beside `path`, then swap it in for `path`.

    An error (or a crash) while writing leaves `path` exactly as it was and no partial
    directory under its name. The caller decides whether an existing `path` may go.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    old = tmp.with_suffix(".old")
    try:
        write(tmp)
        if path.exists():
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if old.exists():
                os.rename(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
