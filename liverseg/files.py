"""How liverseg writes files: atomically, into folders it may write, under a folder lock.

The low-level file tools every reader and writer uses (the formats, checkpoints, reports, the
converter); they import nothing of liverseg above its errors. What an output may *replace*
is the policy in `outputs`, above the file formats.

`atomic_path` writes beside the target and swaps it in by renames: a failure at any point
leaves the old output as it was. `check_writable` finds an unwritable folder before any
work, `check_readable` says why an input file cannot be opened; `folder_lock` holds a folder
for one writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from liverseg import InputError, LiversegError, storage

log = logging.getLogger(__name__)

PARTIAL, REPLACED = ".partial-", ".replaced-"  # the siblings atomic_path writes and swaps through


@contextlib.contextmanager
def atomic_path(path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Write to the yielded temporary sibling of `path`; it replaces `path` when the block
    succeeds and is removed when it fails, so `path` is never half-written.

    The temporary name (`.partial-<name>`) keeps the suffix, so nibabel and Keras pick the
    same format. A folder works too: an existing folder at `path` is renamed aside, the new
    one renamed in, and only then the old one removed (if a rename fails, nothing is lost).
    In a bucket the block writes a local temporary file or folder, uploaded when it succeeds
    (an object appears whole; a folder's `last` names after every other object: its marker).
    """
    path = storage.path(path)
    if isinstance(path, storage.GcsPath):
        with tempfile.TemporaryDirectory(prefix="liverseg-") as tmp:
            local = Path(tmp) / path.name
            yield local
            if local.is_dir():
                storage.upload_tree(local, path, last)
            else:
                path.write_bytes(local.read_bytes())
        return
    tmp = path.with_name(f"{PARTIAL}{path.name}")
    remove_path(tmp)
    try:
        yield tmp
        _swap(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


@contextlib.contextmanager
def new_folder(path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """`atomic_path` for a whole folder: yields the empty temporary folder to fill. Missing
    parents are created, and removed again (innermost first) when the block fails, so a
    failure leaves the file system as it was. In a bucket, `last` names the folder's marker
    objects, uploaded after the rest (a bucket has no folders to create)."""
    path = storage.path(path)
    created = [] if storage.is_remote(path) else [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, last) as tmp:
            tmp.mkdir()
            yield tmp
    except BaseException:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _swap(tmp: Path, path: Path) -> None:
    if not (tmp.is_dir() and path.is_dir() and not path.is_symlink()):
        tmp.replace(path)
        return
    old = path.with_name(f"{REPLACED}{path.name}")
    remove_path(old)
    path.replace(old)  # rename cannot replace a non-empty folder: move the old one aside first
    try:
        tmp.replace(path)
    except BaseException:
        old.replace(path)
        raise
    try:
        remove_path(old)
    except OSError as e:
        log.warning(
            "%s: replaced, but the old copy could not be removed (%s); delete %s yourself", path, e.strerror or e, old
        )


def remove_path(path) -> None:
    """Remove a file or a folder tree (a symlink itself, never what it points to)."""
    storage.remove_tree(storage.path(path))


def check_writable(out) -> None:
    """Refuse, naming the folder and why, an output that cannot be written: the nearest
    existing folder of `out`'s parents must take a new entry (`out` is created or swapped
    in there), and an existing `out` too (files are written into it, or its entries removed
    when it is replaced). Probed by creating and removing an entry, so immutable folders and
    read-only file systems are found as well as permissions (in a bucket: an object)."""
    out = storage.path(out).absolute()
    if isinstance(out, storage.GcsPath):
        places = [out]
    else:
        places = [next((p for p in out.parents if p.exists()), out)]  # "/" has no parents
        if out.is_dir() and out not in places:
            places.append(out)
        elif not out.is_dir() and out.exists():
            raise LiversegError(f"{out}: exists and is not a folder; choose a folder")
    for place in places:
        probe = place / f"{PARTIAL}probe-{os.getpid()}"
        try:
            if isinstance(probe, storage.GcsPath):
                probe.write_bytes(b"")
                probe.unlink()
            else:
                probe.mkdir()
                probe.rmdir()
        except OSError as e:
            reason = {
                errno.EACCES: "permission denied",
                errno.EPERM: "not permitted (immutable?)",
                errno.EROFS: "read-only file system",
            }.get(e.errno, e.strerror or str(e))
            raise LiversegError(
                f"{place}: cannot write here ({reason}); choose a folder you may write, or fix its "
                "permissions (nothing was written or removed)"
            ) from None
        except Exception as e:  # noqa: BLE001 - TensorFlow's errors for a bucket (permission, no bucket)
            raise LiversegError(
                f"{place}: cannot write here ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                "check the bucket's name and your credentials (nothing was written or removed)"
            ) from None


def check_readable(path: Path) -> None:
    """Raise InputError saying why `path` cannot be opened (missing, a dangling or looping
    symbolic link, no permission), rather than a generic "not found"."""
    try:
        if os.stat(path).st_size == 0:
            raise InputError(f"{path}: the file is empty (0 bytes); re-copy or re-export it")
        if not os.access(path, os.R_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(
                f"{path}: symbolic link loop ({path} -> {os.readlink(path)} -> ...); point the link at the real file"
            ) from None
        if e.errno == errno.ENOENT and path.is_symlink():
            raise InputError(
                f"{path}: symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
            ) from None
        if e.errno == errno.ENOENT:
            raise InputError(f"{path}: file not found") from None
        raise InputError(f"{path}: cannot read ({e.strerror}); check its permissions") from None


# ------------------------------------------------------------------------- folder locks


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str, holder_kind: str, advice: str, remove: bool = False) -> Iterator[None]:
    """Hold `folder/name` (an flock, released by the kernel when the process dies) for the block.

    A second holder fails with one line naming the first (pid, host, since when) and `advice`.
    A lock file left by a process that died holds no flock, so it is taken over (and said so).
    In a bucket, where there is no flock, the lock is an object (`_object_lock`).
    `remove`: the lock file is deleted on release (a taker then checks that the file it locked
    is still the one at the path, and retries otherwise); else it stays, emptied. A folder
    this call created is removed again when nothing but the lock was written into it.
    """
    folder = storage.path(folder)
    if isinstance(folder, storage.GcsPath):
        with _object_lock(folder, name, holder_kind, advice):
            yield
        return
    created = not folder.exists()
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LiversegError(f"{folder} is in use by {holder_kind} ({holder}); {advice}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we took it: take the one at the path now
    try:
        stale = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if stale:
            log.warning("%s: taking over the lock of %s that did not exit cleanly (%s)", path, holder_kind, stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        try:
            yield
        finally:
            if remove:
                path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # releases the flock
        if created and folder.is_dir() and not [p for p in folder.iterdir() if p != path]:
            shutil.rmtree(folder, ignore_errors=True)


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextlib.contextmanager
def _object_lock(folder, name: str, holder_kind: str, advice: str) -> Iterator[None]:
    """A folder lock in a bucket: an object naming its holder, written when it is absent and
    deleted on release. A second holder fails naming the first; a lock object left by a
    process that died on this host is taken over (its pid is gone), one left by another host
    is not (nothing here can tell it is dead: delete it). Two processes taking it within the
    same moment could both succeed: a bucket offers no create-if-absent through TensorFlow's
    file system, so the lock is checked, written and read back."""
    check_writable(folder)
    path = folder / name
    if path.exists():
        holder = path.read_text().strip() or "another process"
        pid, _, rest = holder.removeprefix("pid ").partition(" on ")
        host = rest.split(" since ")[0]
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
            raise LiversegError(
                f"{folder} is in use by {holder_kind} ({holder}; a lock object: if that process is gone, delete "
                f"{path}); {advice}"
            )
        log.warning("%s: taking over the lock of %s that did not exit cleanly (%s)", path, holder_kind, holder)
    mine = _holder()
    path.write_text(mine)
    if path.read_text() != mine:
        raise LiversegError(f"{folder} was locked by another {holder_kind} at the same moment; {advice}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, LiversegError):  # a bucket that stopped answering: the next start sees it
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "PARTIAL",
    "REPLACED",
    "atomic_path",
    "check_readable",
    "check_writable",
    "folder_lock",
    "new_folder",
    "remove_path",
]
