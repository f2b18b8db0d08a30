"""Input and output paths: checked before any work; outputs written atomically with the permissions of any new file.

The command line checks every output path first (a missing directory, a path that is a directory, a place it cannot
write) so that a mistake costs nothing; the library writes its file under a temporary name and renames it into place.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Callable


def _probe(directory: str, what: str, path: str) -> None:
    """ValueError unless a file can be created (and removed) in ``directory``: the one test that also holds for root,
    read-only mounts and pseudo file systems, where permission bits alone say nothing."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".genknowsub-fast-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ValueError(f"{what} {path!r}: cannot write in {directory!r} ({exc.strerror or exc})") from None


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def check_input_file(path: str | os.PathLike, what: str = "input file") -> str:
    """``path`` if it is a regular file (or a link to one); ValueError saying what it is otherwise: missing, or a
    directory, FIFO, socket or device (reading a FIFO would wait for a writer instead of failing)."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ValueError(f"{what} {path!r} is {kind}, not a regular file")
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> str:
    """``path`` if a file can be written there: its directory exists and is writable, and it is not a directory."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} is an empty path")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path!r}: directory {os.path.dirname(path) or parent!r} does not exist")
    _probe(parent, what, path)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> str:
    """Create ``path`` (and its parents) if needed and check that files can be written in it; returns it."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} is an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be created ({exc.strerror or exc})") from None
    _probe(path, what, path)
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a fresh file next to ``path``, then rename it to ``path``; a failure leaves ``path`` as it was.

    The final file gets the permissions of any newly created file (0o666 less the umask): the temporary file is
    created with mode 0o666, which the umask reduces, and that mode is put back after ``write``, because writers such
    as safetensors' ``save_file`` leave 0o600 whatever the umask. OSError from creating the file becomes a ValueError
    naming ``path``.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ValueError(f"cannot write {path!r} ({exc.strerror or exc})") from None
        break
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = ["check_input_file", "check_output_file", "check_output_dir", "write_atomically"]
