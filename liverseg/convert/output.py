"""Conversion, phase 3: the output folder, the manifest of the written shards, the commit.

What convert may remove in OUT is what it can prove it wrote: the shards its manifest lists,
its own temporary files (`shards.is_temporary`: a marked prefix and exact forms), and the
shards a commit that was cut short had listed in its ledger. Anything else in OUT (another
tool's `train-00000-of-00002.tfrecord`, a `notes.txt`, a `.tmp-draft.txt`) makes OUT
refused before anything is written or removed, with or without --overwrite.

The commit makes a conversion final in an order that never shows a partial dataset:

1. the ledger (LEDGER) lists every final-named shard OUT holds that is ours, old and new,
   so a re-run after a crash at any later point knows them;
2. the new manifest and its cases file are written under temporary names (the writes that
   may fail for space);
3. the old manifest is removed, the shards are renamed to their final names, and shards of
   the old dataset that the new one does not have are removed;
4. the cases file, then the manifest are renamed into place (the commit point), and the
   ledger is removed.

A failure before the manifest's rename leaves no manifest (a re-run completes the dataset);
a shard under its final name is always complete.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from liverseg import LiversegError, records, storage
from liverseg.convert.discover import Case
from liverseg.convert.shards import TMP_PREFIX, ShardResult, is_temporary
from liverseg.files import folder_lock
from liverseg.manifest import (
    CASES,
    MANIFEST,
    CaseInfo,
    ConvertOptions,
    Manifest,
    ShardInfo,
    SkippedCase,
    SplitInfo,
    cases_lines,
)
from liverseg.outputs import check_output
from liverseg.records import SPLITS

LOCK = ".liverseg-convert.lock"  # held by the conversion writing into OUT
LEDGER = ".liverseg-ledger"  # the final-named shards a commit under way may leave: ours (one name per line)


def locked(out: Path, src: Path):
    """OUT locked for one conversion: a second one into the same OUT fails naming the first
    (it would delete the first's temporary shards); a lock left by a killed one is taken over.
    Checked first: OUT is not SRC, does not hold it, is not a run or an export, and can be
    written (`outputs.check_output`)."""
    check_output(out, [src], may_be="a converted dataset")
    return folder_lock(
        out, LOCK, "a conversion", "wait for it to finish or stop it, or choose another OUT", remove=True
    )


def owned_shards(out: Path) -> set[str]:
    """The final-named shard files in OUT that are provably ours: listed by its manifest or by
    the ledger of a commit that was cut short."""
    owned = set(Manifest.shards_listed(out / MANIFEST) or ())
    ledger = out / LEDGER
    if ledger.is_file():
        owned |= {line for line in ledger.read_text().splitlines() if line}
    return owned


def check_out(out: Path, opts: ConvertOptions, src: Path, cases: list[Case] = ()) -> Manifest | None:
    """Refuse (before anything is written or removed) an OUT holding anything convert cannot
    prove it wrote, a different dataset without --overwrite, or a case's files; then remove a
    killed conversion's temporary files. Returns the old manifest, if any."""
    check_output(out, [p for c in cases for p in (c.image.path, c.mask.path)], may_be="a converted dataset")
    if not out.exists():
        return None
    if not out.is_dir():
        raise LiversegError(f"{out}: exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    manifest = MANIFEST in names and Manifest.shards_listed(out / MANIFEST) is not None
    if MANIFEST in names and not manifest:
        raise LiversegError(
            f"{out / MANIFEST}: not a readable liverseg manifest (another tool's file, or damaged); convert "
            "replaces only its own datasets: choose another OUT or move the file away (nothing was written or removed)"
        )
    ours = owned_shards(out) | {LOCK, LEDGER} | ({CASES} if manifest or LEDGER in names else set())
    foreign = sorted(n for n in names if n not in ours and not is_temporary(n) and n != MANIFEST)
    if foreign:
        raise LiversegError(
            f"{out}: holds files that are not a liverseg dataset ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); convert removes only files it wrote: choose an empty or "
            "new folder, or move them away (nothing was written or removed)"
        )
    old = Manifest.load(out, check_shards=False) if manifest else None
    if old is not None:
        same = old.options.creation() == opts.creation() and old.source == str(src.resolve())
        if not same and not opts.overwrite:
            raise LiversegError(
                f"{out}: already holds a different dataset (see {out / MANIFEST}); "
                "pass --overwrite to replace it or choose another folder"
            )
    for name in names:  # a killed conversion's leftovers (the ledger stays until a commit completes)
        if is_temporary(name):
            (out / name).unlink(missing_ok=True)
    return old


def assemble(
    src: Path, opts: ConvertOptions, cases: list[Case], results: list[ShardResult], runner: str = "local"
) -> Manifest:
    """The manifest of a conversion from its written shards (any order) and the header-failed cases."""
    results = sorted(results, key=lambda r: (SPLITS.index(r.split), r.ordinal))
    skipped = [SkippedCase(c.case_id, c.split, c.error) for c in cases if c.error]
    skipped += [s for r in results for s in r.skipped]
    kept = [r for r in results if r.num_examples > 0]
    splits: dict[str, SplitInfo] = {}
    infos: list[CaseInfo] = []
    for split in SPLITS:
        shards = [r for r in kept if r.split == split]
        if not shards:
            continue
        named = [(records.shard_name(split, k, len(shards)), r) for k, r in enumerate(shards)]
        members = [replace(i, shard=name) for name, r in named for i in r.cases]
        splits[split] = SplitInfo.of(members, [ShardInfo(name, r.num_examples, r.bytes, r.sha256) for name, r in named])
        infos += members
    return Manifest(
        source=str(src.resolve()),
        options=ConvertOptions.from_creation(opts.creation()),
        splits=splits,
        cases=tuple(sorted(infos, key=lambda i: i.index)),
        skipped=tuple(skipped),
        runner=runner,
    )


def check_same_sources(out: Path, old: Manifest | None, new: Manifest, opts: ConvertOptions) -> None:
    """Re-running into a dataset with the same options must also mean the same source bytes."""
    if old is None or opts.overwrite:
        return
    before = {c.case_id: (c.image.sha256, c.mask.sha256) for c in old.cases}
    if before != {c.case_id: (c.image.sha256, c.mask.sha256) for c in new.cases}:
        raise LiversegError(
            f"{out}: already holds a dataset converted from different source files; "
            "pass --overwrite to replace it or choose another folder"
        )


def commit(out: Path, manifest: Manifest, results: list[ShardResult]) -> Manifest:
    """Make a complete conversion final, in the order of the module docstring. Renames need
    no space; the ledger and the manifest are the writes that may fail, before anything is
    final. Removes only the shards the old manifest or a ledger proves ours."""
    ordered = sorted(results, key=lambda r: (SPLITS.index(r.split), r.ordinal))
    placed = [
        (r, s)
        for split, info in manifest.splits.items()
        for r, s in zip([r for r in ordered if r.split == split and r.num_examples > 0], info.shards)
    ]
    final = {s.file for _, s in placed}
    owned = owned_shards(out)
    tmp, tmp_cases = out / f"{TMP_PREFIX}{MANIFEST}", out / f"{TMP_PREFIX}{CASES}"
    try:
        _write_synced(out / f"{TMP_PREFIX}ledger", "".join(f"{n}\n" for n in sorted(owned | final)))
        (out / f"{TMP_PREFIX}ledger").replace(out / LEDGER)
        _write_synced(tmp_cases, cases_lines(manifest.cases))
        _write_synced(tmp, manifest.dumps())
    except BaseException:
        for p in (tmp, tmp_cases, out / f"{TMP_PREFIX}ledger"):
            p.unlink(missing_ok=True)
        raise
    (out / MANIFEST).unlink(missing_ok=True)
    for r in ordered:
        if r.num_examples == 0:  # every case of the shard was skipped
            storage.path(r.tmp).unlink(missing_ok=True)
    for r, s in placed:
        storage.path(r.tmp).replace(out / s.file)
    for name in sorted(owned - final):  # the old dataset's shards the new one does not have
        (out / name).unlink(missing_ok=True)
    tmp_cases.replace(out / CASES)  # before the manifest that records its sha256: the commit point
    tmp.replace(out / MANIFEST)
    (out / LEDGER).unlink(missing_ok=True)
    return manifest


def _write_synced(path, text: str) -> None:
    """Write a file and wait for the disk (an object in a bucket is whole once written)."""
    if storage.is_remote(path):
        path.write_text(text)
        return
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
