"""Where liverseg's files live: a local folder, or a bucket (`gs://BUCKET/...`).

`path(x)` is the one way a user's name for records, a run or an output becomes a path: a
`pathlib.Path` for a local name, a `GcsPath` for a `gs://` URI. A GcsPath has the pathlib
methods liverseg uses (`/`, `name`, `parent`, `exists`, `is_dir`, `iterdir`, `glob`,
`read_bytes`, `write_text`, `open`, `stat`, `unlink`, `mkdir`, `replace`, ...), carried out by
TensorFlow's file system (`tf.io.gfile`, whose GCS client takes credentials as Google's client
libraries do: GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or a
VM's service account); the modules that read and write handle both kinds the same way. `open`
and `size` here work on either; `local_copy` and `staged` give the libraries that need a local
file (h5py, nibabel, tf2onnx) one, downloaded or uploaded around them.

What a bucket cannot do, and what liverseg does instead (README, "Records and runs in a
bucket"): an object appears whole when its upload completes, but nothing renames a folder
atomically, so an output is written object by object and committed by its marker object last
(a dataset's manifest, an export's contract, a report's metrics.json); there is no flock, so a
folder lock is an object naming its holder (`files.folder_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from liverseg import LiversegError

SCHEME = "gs://"


def is_remote(x) -> bool:
    """Whether a name is a bucket URI (gs://...)."""
    return str(x).startswith(SCHEME)


def path(x) -> Path | GcsPath:
    """The path a name stands for: local (pathlib.Path) or in a bucket (GcsPath)."""
    if isinstance(x, GcsPath):
        return x
    if is_remote(x):
        return GcsPath(str(x))
    if "://" in str(x):
        scheme = str(x).split("://", 1)[0]
        raise LiversegError(f"{x}: {scheme}:// is not a storage liverseg reads; give a local path or gs://BUCKET/...")
    return Path(x)


def _gfile():
    """tf.io.gfile: TensorFlow's file system carries every bucket access."""
    try:
        import tensorflow as tf
    except ImportError:
        raise LiversegError(
            "gs:// paths go through TensorFlow's file system: pip install 'liverseg[cpu]' (or [gpu])"
        ) from None
    return tf.io.gfile


@contextlib.contextmanager
def _as_os_errors(uri: str):
    """TensorFlow's file-system errors as the OSErrors a local file raises, so callers handle
    both kinds of path the same way (a missing object is FileNotFoundError, ...)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - tf.errors.*, without importing TensorFlow for the names
        kind = type(e).__name__
        text = (getattr(e, "message", None) or str(e)).strip().splitlines()[0][:300]
        if kind == "NotFoundError":
            raise FileNotFoundError(errno.ENOENT, text, uri) from None
        if kind in ("PermissionDeniedError", "UnauthenticatedError"):
            raise PermissionError(errno.EACCES, text, uri) from None
        if kind in ("AlreadyExistsError",):
            raise FileExistsError(errno.EEXIST, text, uri) from None
        if kind.endswith("Error") and type(e).__module__.startswith("tensorflow"):
            raise LiversegError(unreachable(uri, f"{kind}: {text}")) from None
        raise


def unreachable(where, reason: str, then: str = "run the same command again once it answers") -> str:
    """The one line that says a bucket did not answer (network, server, credentials)."""
    return (
        f"{where}: the bucket did not answer ({reason}); nothing was made final there: check the network and "
        f"credentials, then {then}"
    )


def _from_a_bucket(e: BaseException) -> bool:
    """Whether a TensorFlow error came from its GCS client (what a bucket's outage raises deep in
    tf.data, checkpoints or TensorBoard writers)."""
    text = str(getattr(e, "message", "") or e)
    return type(e).__module__.startswith("tensorflow") and any(
        k in text for k in ("gs://", "libcurl", "googleapis", "retry attempts failed")
    )


@contextlib.contextmanager
def bucket_errors(where, then):
    """A bucket that stopped answering while TensorFlow read or wrote it, said in one line
    naming `where` and what to do (`then()`), instead of TensorFlow's error and trace."""
    try:
        yield
    except Exception as e:
        if _from_a_bucket(e):
            reason = str(getattr(e, "message", "") or e).strip().splitlines()[0][:240]
            raise LiversegError(unreachable(where, f"{type(e).__name__}: {reason}", then())) from None
        raise


class _Writing:
    """A GFile open for writing that takes any buffer (numpy arrays, memoryviews: what a local
    file takes), its errors as OSErrors."""

    def __init__(self, f, uri: str):
        self.f, self.uri = f, uri

    def write(self, data) -> int:
        with _as_os_errors(self.uri):
            self.f.write(data if isinstance(data, (bytes, str)) else memoryview(data).tobytes())
        return len(data)

    def flush(self) -> None:
        with _as_os_errors(self.uri):
            self.f.flush()

    def close(self) -> None:
        with _as_os_errors(self.uri):  # the upload completes here: the object appears, whole
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stat:
    def __init__(self, size: int, mtime: float):
        self.st_size, self.st_mtime = size, mtime


class GcsPath:
    """A path in a bucket: `gs://BUCKET/key`, with the pathlib methods liverseg uses."""

    def __init__(self, uri: str):
        rest = uri[len(SCHEME) :].strip("/")
        if not rest or not rest.split("/")[0]:
            raise LiversegError(f"{uri}: name a bucket (gs://BUCKET/...)")
        self.uri = SCHEME + "/".join(p for p in rest.split("/") if p)

    # -- names
    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"GcsPath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, GcsPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name) -> GcsPath:
        return GcsPath(f"{self.uri}/{name}")

    @property
    def bucket(self) -> str:
        return self.uri[len(SCHEME) :].split("/")[0]

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1] if "/" in self.uri[len(SCHEME) :] else ""

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> GcsPath:
        return GcsPath(self.uri.rsplit("/", 1)[0]) if self.name else self

    @property
    def parents(self) -> list[GcsPath]:
        out, p = [], self
        while p.name:
            p = p.parent
            out.append(p)
        return out

    def with_name(self, name: str) -> GcsPath:
        return self.parent / name

    def relative_to(self, other) -> PurePosixPath:
        prefix = str(other).rstrip("/") + "/"
        if not self.uri.startswith(prefix):
            raise ValueError(f"{self} is not in {other}")
        return PurePosixPath(self.uri[len(prefix) :])

    def resolve(self) -> GcsPath:
        return self

    absolute = resolve

    # -- queries
    def exists(self) -> bool:
        with _as_os_errors(self.uri):
            return _gfile().exists(self.uri)

    def is_dir(self) -> bool:
        with _as_os_errors(self.uri):
            return _gfile().isdir(self.uri)

    def is_file(self) -> bool:
        with _as_os_errors(self.uri):
            return self.name != "" and _gfile().exists(self.uri) and not _gfile().isdir(self.uri)

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator[GcsPath]:
        with _as_os_errors(self.uri):
            names = sorted(_gfile().listdir(self.uri))
        return iter([self / n.rstrip("/") for n in names if n.rstrip("/")])

    def glob(self, pattern: str) -> Iterator[GcsPath]:
        with _as_os_errors(self.uri):
            return iter(sorted(GcsPath(p) for p in _gfile().glob(f"{self.uri}/{pattern}")))

    def stat(self) -> _Stat:
        with _as_os_errors(self.uri):
            s = _gfile().stat(self.uri)
        return _Stat(s.length, s.mtime_nsec / 1e9)

    # -- contents
    def open(self, mode: str = "r", **_):
        with _as_os_errors(self.uri):
            f = _gfile().GFile(self.uri, mode)
        return _Writing(f, self.uri) if "w" in mode or "a" in mode else f

    def read_bytes(self) -> bytes:
        with _as_os_errors(self.uri), self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8")

    def write_bytes(self, data: bytes) -> int:
        with _as_os_errors(self.uri), self.open("wb") as f:  # the object appears, whole, when the upload completes
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str | None = None) -> int:
        return self.write_bytes(text.encode(encoding or "utf-8"))

    # -- changes
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.is_dir() and not exist_ok:
            raise FileExistsError(self.uri)
        with _as_os_errors(self.uri):
            _gfile().makedirs(self.uri)

    def rmdir(self) -> None:
        if any(True for _ in self.iterdir()):
            raise OSError(f"{self.uri}: not empty")
        with contextlib.suppress(Exception):  # a folder marker, where there is one
            _gfile().remove(self.uri + "/")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with _as_os_errors(self.uri):
                _gfile().remove(self.uri)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def replace(self, target) -> GcsPath:
        """Move the object to `target` (a copy, then the delete: each object is whole at all times)."""
        with _as_os_errors(self.uri):
            _gfile().rename(self.uri, str(target), overwrite=True)
        return path(target)


def open_file(p, mode: str = "rb"):
    """An open file, local or in a bucket."""
    return p.open(mode) if isinstance(p, GcsPath) else open(p, mode)


def size(p) -> int:
    return path(p).stat().st_size


def remove_tree(p) -> None:
    """Remove a folder tree or a file (a symlink itself, never what it points to)."""
    if isinstance(p, GcsPath):
        if p.is_dir():
            _gfile().rmtree(p.uri)
        else:
            p.unlink(missing_ok=True)
    elif p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def upload_tree(local: Path, target: GcsPath, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder's files under `target`, the names in `last` after every other (an
    output's marker objects: a reader that finds them finds the rest)."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.name in last):
        _gfile().makedirs(str(target / p.parent.relative_to(local))) if p.parent != local else None
        _gfile().copy(str(p), str(target / p.relative_to(local)), overwrite=True)


@contextlib.contextmanager
def local_copy(p) -> Iterator[Path]:
    """A local file with the content of `p` (itself where it is local), for a library that opens
    files by name."""
    p = path(p)
    if not isinstance(p, GcsPath):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="liverseg-") as tmp:
        local = Path(tmp) / p.name
        _gfile().copy(p.uri, str(local), overwrite=True)
        yield local


@contextlib.contextmanager
def staged(p) -> Iterator[Path]:
    """A local file to write for `p` in a bucket, uploaded when the block ends without error."""
    with tempfile.TemporaryDirectory(prefix="liverseg-") as tmp:
        local = Path(tmp) / p.name
        yield local
        _gfile().copy(str(local), p.uri, overwrite=True)


_DOWNLOADED: dict[str, tempfile.TemporaryDirectory] = {}


def local_folder(p) -> Path:
    """A local copy of a folder in a bucket, made once and kept while the process lives (the
    folder itself where it is local): for the runtimes that open an export's files by name."""
    p = path(p)
    if not isinstance(p, GcsPath):
        return p
    if p.uri not in _DOWNLOADED:
        tmp = tempfile.TemporaryDirectory(prefix="liverseg-")
        for src in _gfile().walk(p.uri):
            folder, _, files = src
            rel = folder[len(p.uri) :].strip("/")
            (Path(tmp.name) / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                _gfile().copy(f"{folder.rstrip('/')}/{f}", str(Path(tmp.name) / rel / f), overwrite=True)
        _DOWNLOADED[p.uri] = tmp
    return Path(_DOWNLOADED[p.uri].name)


def free_bytes(p) -> float | None:
    """Free space where `p` would be written (None for a bucket: it has no such limit)."""
    if isinstance(p, GcsPath):
        return None
    p = Path(p)
    where = next(q for q in (p, *p.parents) if q.exists())
    return float(shutil.disk_usage(where).free)


__all__ = [
    "GcsPath",
    "bucket_errors",
    "free_bytes",
    "is_remote",
    "local_copy",
    "local_folder",
    "open_file",
    "path",
    "remove_tree",
    "size",
    "staged",
    "unreachable",
    "upload_tree",
]
