"""How liverseg writes: atomic files and folders, folder locks, and what an output may replace.

Every command that writes a folder checks it with `check_output` before any work is done:

* OUT must not be, or hold, anything the command reads (`inputs`: a run, a dataset, an
  export, a scan, a case list). `export --run R R --force` or `evaluate --out runs` would
  otherwise replace the runs they read.
* A command that replaces OUT as a whole (export, evaluate, cv: `replaces`) replaces only an
  empty folder or an earlier output of its own kind, never a training run, a converted
  dataset or a folder of other files, whatever flag is given.
* OUT (or the folder it will be created in) must be writable: a folder the user may not
  write, or an immutable one, is one line naming it, found before any work and before
  anything is removed.

`atomic_path` then writes beside the target and swaps it in by renames: a failure at any
point leaves the old output as it was.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from liverseg import LiversegError

log = logging.getLogger(__name__)

PARTIAL, REPLACED = ".partial-", ".replaced-"  # the siblings atomic_path writes and swaps through


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write to the yielded temporary sibling of `path`; it replaces `path` when the block
    succeeds and is removed when it fails, so `path` is never half-written.

    The temporary name (`.partial-<name>`) keeps the suffix, so nibabel and Keras pick the
    same format. A folder works too: an existing folder at `path` is renamed aside, the new
    one renamed in, and only then the old one removed (if a rename fails, nothing is lost).
    """
    path = Path(path)
    tmp = path.with_name(f"{PARTIAL}{path.name}")
    remove_path(tmp)
    try:
        yield tmp
        _swap(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


@contextlib.contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """`atomic_path` for a whole folder: yields the empty temporary folder to fill. Missing
    parents are created, and removed again (innermost first) when the block fails, so a
    failure leaves the file system as it was."""
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
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


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree (a symlink itself, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------- what OUT may be

# What an output may replace as a whole: an earlier output of the same command.
REPLACES = ("export", "report")


def kind_of(folder: Path) -> str | None:
    """What a folder is to liverseg, by the file that makes it so: "an export", "a training
    run", "a converted dataset", or None."""
    from liverseg.manifest import MANIFEST
    from liverseg.predict import CONTRACT_FILE
    from liverseg.rundir import RunDir

    if (folder / CONTRACT_FILE).is_file():  # an export keeps a copy of its run's run.json: checked first
        return "an export"
    if RunDir(folder).info.is_file():
        return "a training run"
    if (folder / MANIFEST).is_file():
        return "a converted dataset"
    return None


REPORT_FILES = ("cases.csv", "metrics.json")


def _is_report(folder: Path) -> bool:
    """An earlier evaluate/cv report: cases.csv and metrics.json, and else only overlay PNGs."""
    names = {p.name: p for p in folder.iterdir()}
    return all(n in names for n in REPORT_FILES) and all(
        p.is_file() and (n in REPORT_FILES or n.endswith(".png")) for n, p in names.items()
    )


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(
    out: str | Path,
    inputs: Iterable[str | Path] = (),
    replaces: str | None = None,
    flag: str = "OUT",
    may_be: str | None = None,
) -> None:
    """Refuse `out` in one line before anything is written or removed (see the module docstring).

    inputs: what the command reads; OUT may not be one of them or hold one. replaces:
    "export" or "report" when OUT is replaced as a whole (then it must be absent, empty or an
    earlier output of that kind holding nothing else liverseg made); None when files are
    written into it (then it must not be a run, a dataset or an export, except `may_be`:
    `kind_of`'s name of what the command itself writes into). Also checks that OUT can be
    written (`check_writable`).
    """
    out = Path(out)
    if replaces is not None and out.is_symlink():  # it would be swapped as a whole: a link cannot be
        raise LiversegError(
            f"{flag} {out} is a symbolic link (to {os.readlink(out)}); give the folder it points to, or a new "
            "one (nothing was written)"
        )
    where = out.resolve()
    for inp in inputs:
        inp_path = Path(inp).resolve()
        if _within(inp_path, where):
            what = kind_of(inp_path) if inp_path.is_dir() else None
            said = f"{what} that this command reads" if what else "an input of this command"
            held = "is" if inp_path == where else f"holds {inp_path},"
            raise LiversegError(f"{flag} {out} {held} {said}; choose another output folder (nothing was written)")
    if out.is_dir():
        if replaces is not None and any(out.iterdir()):
            _check_replaceable(out, replaces, flag)
        kind = kind_of(out) if replaces is None else None
        if kind is not None and kind != may_be:
            raise LiversegError(f"{flag} {out} is {kind}; write into another folder (nothing was written)")
    check_writable(out)


def _check_replaceable(out: Path, replaces: str, flag: str) -> None:
    if replaces not in REPLACES:
        raise ValueError(f"replaces={replaces!r}: one of {REPLACES}")
    kind = kind_of(out)
    if not (kind == "an export" if replaces == "export" else _is_report(out)):
        mine = "an earlier export" if replaces == "export" else "an earlier report (cases.csv, metrics.json, PNGs)"
        raise LiversegError(
            f"{flag} {out} is {kind or 'a folder of other files'}, and only {mine} is ever replaced; "
            "choose a new or empty folder (nothing was written or removed)"
        )
    for folder, subdirs, _ in os.walk(out):  # an export's member folders are exports too; nothing else may be below
        for d in subdirs:
            inner = kind_of(Path(folder) / d)
            if inner not in (None, "an export"):
                raise LiversegError(
                    f"{flag} {out} holds {inner} ({Path(folder) / d}), which is never replaced; "
                    "choose a new or empty folder (nothing was written or removed)"
                )


def check_writable(out: str | Path) -> None:
    """Refuse, naming the folder and why, an output that cannot be written: the nearest
    existing folder of `out`'s parents must take a new entry (`out` is created or swapped
    in there), and an existing `out` too (files are written into it, or its entries removed
    when it is replaced). Probed by creating and removing an entry, so immutable folders and
    read-only file systems are found as well as permissions."""
    out = Path(out).absolute()
    places = [next((p for p in out.parents if p.exists()), out)]  # "/" has no parents
    if out.is_dir() and out not in places:
        places.append(out)
    elif not out.is_dir() and out.exists():
        raise LiversegError(f"{out}: exists and is not a folder; choose a folder")
    for place in places:
        probe = place / f"{PARTIAL}probe-{os.getpid()}"
        try:
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


# ------------------------------------------------------------------------- folder locks


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str, holder_kind: str, advice: str, remove: bool = False) -> Iterator[None]:
    """Hold `folder/name` (an flock, released by the kernel when the process dies) for the block.

    A second holder fails with one line naming the first (pid, host, since when) and `advice`.
    A lock file left by a process that died holds no flock, so it is taken over (and said so).
    `remove`: the lock file is deleted on release (a taker then checks that the file it locked
    is still the one at the path, and retries otherwise); else it stays, emptied. A folder
    this call created is removed again when nothing but the lock was written into it.
    """
    import fcntl
    import socket
    import time

    folder = Path(folder)
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
        os.pwrite(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
        )
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


__all__ = ["atomic_path", "check_output", "check_writable", "folder_lock", "kind_of", "new_folder", "remove_path"]
