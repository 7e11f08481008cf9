"""What an output may replace: the policy every command that writes a folder follows.

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

The file tools below it (atomic writes and swaps, writability, locks) are `files`; this
module sits above the file formats, whose marker files say what a folder is (`kind_of`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from liverseg import LiversegError, storage
from liverseg.files import PARTIAL, REPLACED, check_writable
from liverseg.manifest import MANIFEST
from liverseg.models import CONTRACT_FILE
from liverseg.rundir import RUN_ENTRIES, RunDir

# ------------------------------------------------------------------------- what OUT may be

# What an output may replace as a whole: an earlier output of the same command.
REPLACES = ("export", "report")


def kind_of(folder: Path) -> str | None:
    """What a folder is to liverseg, by the file that makes it so: "an export", "a training
    run", "a converted dataset", or None."""
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
    out = storage.path(out)
    if replaces is not None and out.is_symlink():  # it would be swapped as a whole: a link cannot be
        raise LiversegError(
            f"{flag} {out} is a symbolic link (to {os.readlink(out)}); give the folder it points to, or a new "
            "one (nothing was written)"
        )
    where = out.resolve()
    for inp in inputs:
        inp_path = storage.path(inp).resolve()
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
    if storage.is_remote(out):
        raise LiversegError(
            f"{flag} {out}: not empty, and a bucket has no atomic folder swap, so liverseg replaces no output "
            "there (a failure part-way would leave old and new mixed); remove it first or choose a new prefix "
            "(nothing was written or removed)"
        )
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


def check_run_folder(run: Path, records: str | Path) -> None:
    """Refuse, before anything is written, a --run that is or holds the dataset it reads, lies
    inside it, is an export or a dataset, or holds files a run does not (scans, a checkout)."""
    check_output(run, [records], flag="--run", may_be="a training run")
    for folder in run.resolve().parents:
        what = kind_of(folder)
        if what in ("a converted dataset", "an export"):
            raise LiversegError(f"--run {run}: lies inside {folder}, which is {what}; choose a folder outside it")
    if run.is_dir():
        foreign = sorted(
            p.name for p in run.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith((PARTIAL, REPLACED))
        )
        if foreign:
            raise LiversegError(
                f"--run {run}: holds files that are not a training run's ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); train into a new or empty folder, or a run of its "
                "own (nothing was written)"
            )


__all__ = ["REPLACES", "check_output", "check_run_folder", "kind_of"]
