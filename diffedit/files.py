"""Safe output files: nothing is overwritten without consent, nothing half-written is left."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffedit.errors import DiffeditError


def check_readable(path: str | Path | None, kind: str = "a file") -> None:
    """Fail at once (before any model loads) if an input file is missing, a folder or empty; "-" and
    None pass ("-" is stdin, read later). `kind` names what was expected, for the message."""
    if path is None or str(path) == "-":
        return
    path = Path(path)
    if not path.exists():
        raise DiffeditError(f"{path}: no such file")
    if path.is_dir():
        raise DiffeditError(f"{path}: is a folder, not {kind}")
    if path.stat().st_size == 0:
        raise DiffeditError(f"{path}: empty file")


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Fail early if `path` cannot be written: it exists (without overwrite), it is not a regular file
    (a folder, a device, a FIFO, a socket, or a symlink, which --overwrite would replace with a file
    and so not write where it points), or its folder is missing."""
    path = Path(path)
    if path.is_symlink():
        raise DiffeditError(f"{path}: is a symbolic link; outputs are written only as regular files (remove it first)")
    if path.is_dir():
        raise DiffeditError(f"{path}: is a folder, not a file")
    if path.exists() and not path.is_file():
        raise DiffeditError(f"{path}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    if path.exists() and not overwrite:
        raise DiffeditError(f"{path}: already exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise DiffeditError(f"{path}: folder {parent} does not exist")


@contextmanager
def atomic_output(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; rename it onto `path` on success, remove it on error.

    The temporary name keeps the suffix of `path`, so writers that infer the format from it work.
    """
    path = Path(path)
    check_writable(path, overwrite)
    remove_stale_temps(path.parent)
    tmp = _reserve_temp(path)
    try:
        yield tmp
        if not tmp.exists():
            raise DiffeditError(f"{path}: nothing was written")
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


STALE_SECONDS = 3600


def remove_stale_temps(folder: Path) -> None:
    """Remove our own temporary files (`.NAME.HEX.tmp.SUFFIX`) that a killed run left in `folder` more
    than an hour ago (younger ones may belong to a run still writing)."""
    import re
    import time

    pattern = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(\.[^.]+)?$")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if pattern.match(entry.name) and entry.is_file(follow_symlinks=False) and \
                    now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                os.unlink(entry.path)
        except OSError:
            continue


def _reserve_temp(path: Path) -> Path:
    # O_EXCL makes the name ours; mode 0o666 lets the umask decide the final permissions,
    # as for any ordinary file (mkstemp would leave 0o600).
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise DiffeditError(f"{path}: cannot write in {path.parent} ({e.strerror or e})") from e
    raise DiffeditError(f"{path}: cannot create a temporary file in {path.parent}")


def _link_new(tmp: Path, path: Path) -> None:
    # A hard link fails if `path` appeared since the check, so a file created meanwhile by
    # another process is not silently replaced; where links are unsupported, fall back to replace.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise DiffeditError(f"{path}: already exists; pass --overwrite to replace it") from None
    except OSError:
        if path.exists():
            raise DiffeditError(f"{path}: already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()
