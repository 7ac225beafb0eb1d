"""Replacing a file whole: a reader, a second process or a kill mid-write finds the old file or the new one."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# Read once, at import: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def replace(path: str | Path, mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """Open a new temporary file beside `path`; on success flush it to disk and rename it over `path`.

    The temporary file sits in the target's own folder, so the rename is atomic on every filesystem (a cluster's
    shared disk included), and its name is unique, so two processes replacing one file never write into each
    other's. On any error, Ctrl-C included, it is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's file is its owner's alone; a plain write obeys the umask
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` whole with `text`."""
    with replace(path) as f:
        f.write(text)
