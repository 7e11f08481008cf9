"""Conversion, phase 3: the output folder, the manifest of the written shards, the commit.

The commit makes a conversion final in an order that never shows a partial dataset: the
new manifest and its cases file are written under temporary names first (the writes that may
fail for space), then the shards are renamed to their final names, then the cases file, then
the manifest. A failure
before the last rename leaves no manifest, and a failure before the shard renames leaves
no final-named shard.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from liverseg import LiversegError, records
from liverseg.convert.discover import Case
from liverseg.convert.shards import TMP_PREFIX, ShardResult
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
from liverseg.outputs import check_output, folder_lock
from liverseg.records import SPLITS

LOCK = ".lock"  # held by the conversion writing into OUT


def locked(out: Path, src: Path):
    """OUT locked for one conversion: a second one into the same OUT fails naming the first
    (it would delete the first's temporary shards); a lock left by a killed one is taken over.
    Checked first: OUT is not SRC, does not hold it, is not a run or an export, and can be
    written (`outputs.check_output`)."""
    check_output(out, [src], may_be="a converted dataset")
    return folder_lock(
        out, LOCK, "a conversion", "wait for it to finish or stop it, or choose another OUT", remove=True
    )


def check_out(out: Path, opts: ConvertOptions, src: Path, cases: list[Case] = ()) -> Manifest | None:
    """Refuse to clobber a different dataset or unrelated files, or to write where a case's
    files are; return the old manifest, if any."""
    check_output(out, [p for c in cases for p in (c.image.path, c.mask.path)], may_be="a converted dataset")
    if not out.exists():
        return None
    if not out.is_dir():
        raise LiversegError(f"{out}: exists and is not a folder")
    for p in out.glob(f"{TMP_PREFIX}*"):  # leftovers of a killed run
        p.unlink()
    ours = re.compile(
        r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$|^(" + "|".join(map(re.escape, (MANIFEST, CASES, LOCK))) + ")$"
    )
    foreign = sorted(p.name for p in out.iterdir() if not ours.match(p.name))
    if foreign and not opts.overwrite:
        raise LiversegError(
            f"{out}: holds files that are not a liverseg dataset ({', '.join(foreign[:5])}); "
            "choose an empty or new folder"
        )
    if not (out / MANIFEST).is_file():
        return None
    try:
        old = Manifest.load(out, check_shards=False)
    except LiversegError:
        old = None
    same = old is not None and old.options.creation() == opts.creation() and old.source == str(src.resolve())
    if not same and not opts.overwrite:
        raise LiversegError(
            f"{out}: already holds a different dataset (see {out / MANIFEST}); "
            "pass --overwrite to replace it or choose another folder"
        )
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
    """Make a complete conversion final: new manifest written (temp name), old manifest out,
    shards to their final names, new manifest in.

    The manifest is written first because it is the one write left (a full disk fails it
    with nothing final-named yet); renames need no space. A crash after the old manifest is
    removed leaves no manifest, i.e. an incomplete dataset that a re-run completes; a shard
    under its final name is always complete.
    """
    tmp, tmp_cases = out / f"{TMP_PREFIX}{MANIFEST}", out / f"{TMP_PREFIX}{CASES}"
    try:
        for path, text in ((tmp_cases, cases_lines(manifest.cases)), (tmp, manifest.dumps())):
            with open(path, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_cases.unlink(missing_ok=True)
        raise
    (out / MANIFEST).unlink(missing_ok=True)
    ordered = sorted(results, key=lambda r: (SPLITS.index(r.split), r.ordinal))
    for r in ordered:
        if r.num_examples == 0:  # every case of the shard was skipped
            Path(r.tmp).unlink(missing_ok=True)
    final = set()
    for split, info in manifest.splits.items():
        for r, s in zip([r for r in ordered if r.split == split and r.num_examples > 0], info.shards):
            os.replace(r.tmp, out / s.file)
            final.add(s.file)
    for p in out.glob("*-of-*.tfrecord"):
        if p.name not in final:
            p.unlink()
    os.replace(tmp_cases, out / CASES)  # before the manifest that records its sha256: the commit point
    os.replace(tmp, out / MANIFEST)
    return manifest
