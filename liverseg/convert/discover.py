"""Conversion, phase 1: find the cases in a source folder, give each its split, check headers.

A case is an image and a liver mask of one patient, NIfTI files or DICOM series, found by
the source's layout (`liverseg.layouts`: file-name patterns by default; ircad, msd, lits). Splits
are by patient: from train/val/test subfolders, a split file, a preset (`ircad`), or
seeded fractions. Headers (DICOM: tags) are checked before any voxel is read, so a bad case
fails the run (or, with --skip-bad, is listed) before anything is written.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from liverseg import InputError, LiversegError, geometry, layouts, volumes
from liverseg.manifest import ConvertOptions
from liverseg.records import SPLITS
from liverseg.volumes import Source

log = logging.getLogger(__name__)


def _ircad_split(number: int) -> str:
    """3D-IRCADb-01 customary split: 1-10 train, 11-15 val, 16-20 test."""
    return "train" if number <= 10 else "val" if number <= 15 else "test"


SPLIT_PRESETS = {"ircad": _ircad_split}


@dataclass
class Case:
    case_id: str
    split: str
    image: Source
    mask: Source
    index: int = -1
    source: str = ""  # the case list's source tag
    origin: str = ""  # where it was listed ("LIST row N"), named by errors about it
    geometry: geometry.Geometry | None = None  # planned from the headers (a --spacing window is placed later)
    error: str | None = None

    def explain(self, e: Exception) -> str:
        """An error about this case, naming the case list's row it came from (when it did)."""
        return f"{e} (case {self.case_id}, {self.origin})" if self.origin else str(e)


def discover(src: Path, opts: ConvertOptions) -> list[Case]:
    """Pair images with masks by the layout; the split comes from subfolders, a split file, a
    preset or seeded fractions."""
    if opts.layout == "list" and not src.is_file():
        raise LiversegError(f"{src}: --layout list needs the case list file (CSV or JSON)")
    if opts.layout != "list" and not src.is_dir():
        raise LiversegError(f"{src}: source folder does not exist")
    found, from_folders = layouts.find(
        src.resolve(), opts.layout, opts.image_pattern, opts.mask_pattern, opts.mask_segment
    )  # absolute: the manifest names the sources
    found = _without_ircad_twins(found, opts.exclude_ircad_overlap)
    cases = [
        Case(c, pair.split, pair.image, pair.mask, source=pair.source, origin=pair.origin)
        for c, pair in sorted(found.items())
    ]
    _assign_splits(cases, opts, from_folders)
    order = {s: i for i, s in enumerate(SPLITS)}
    cases.sort(key=lambda c: (order[c.split], c.source, c.case_id))  # the order shards hold them in
    for i, c in enumerate(cases):
        c.index = i
    return cases


def _without_ircad_twins(found: layouts.Found, exclude: bool) -> layouts.Found:
    """The cases, less the LiTS/MSD ones that are IRCAD patients with --exclude-ircad-overlap;
    without it, a warning naming them when the same source also holds IRCAD patients."""
    if exclude:
        twins = sorted(c for c, pair in found.items() if layouts.public_origin(c, pair.image.name) == "lits-ircad")
        if twins:
            log.warning(
                "--exclude-ircad-overlap: dropped %d LiTS/Decathlon case(s) that are 3D-IRCADb-01 patients: %s",
                len(twins),
                ", ".join(twins),
            )
            found = {c: pair for c, pair in found.items() if c not in twins}
            if not found:
                raise LiversegError("--exclude-ircad-overlap dropped every case; nothing to convert")
        return found
    why = layouts.ircad_overlap({c: pair.image.name for c, pair in found.items()})
    if why:
        log.warning(
            "these cases overlap: %s; a patient in two splits inflates every score (--exclude-ircad-overlap "
            "drops the LiTS/Decathlon copies)",
            why,
        )
    return found


def _assign_splits(cases: list[Case], opts: ConvertOptions, from_folders: bool) -> None:
    chosen = [x for x in (opts.split_file, opts.split_preset, (opts.val or opts.test) or None) if x]
    if len(chosen) > 1:
        raise LiversegError("choose one of --split-file, --split-preset or --val/--test")
    if from_folders and chosen:
        raise LiversegError(
            "the source already has train/val/test subfolders; drop --split-file/--split-preset/--val/--test"
        )
    ids = [c.case_id for c in cases]
    if opts.split_file:
        path = Path(opts.split_file)
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LiversegError(f"{path}: cannot read split file ({e})") from None
        if not isinstance(spec, dict) or set(spec) - set(SPLITS):
            raise LiversegError(f"{path}: must map some of {SPLITS} to lists of case ids")
        where: dict[str, str] = {}
        for split, members in spec.items():
            if not isinstance(members, list) or not all(isinstance(c, str) for c in members):
                raise LiversegError(
                    f'{path}: {split!r} must be a list of case ids as strings (e.g. ["case_01"]), '
                    f"got {json.dumps(members)[:80]}"
                )
            for c in members:
                if c in where:
                    raise LiversegError(f"{path}: case {c!r} is in both {where[c]} and {split}")
                where[c] = split
        missing = sorted(set(where) - set(ids))
        extra = sorted(set(ids) - set(where))
        if missing or extra:
            raise LiversegError(
                f"{path}: split file and source disagree; "
                + (f"not in source: {', '.join(missing)}; " if missing else "")
                + (f"not in split file: {', '.join(extra)}" if extra else "")
            )
        for c in cases:
            c.split = where[c.case_id]
    elif opts.split_preset:
        if opts.split_preset not in SPLIT_PRESETS:
            raise LiversegError(f"--split-preset {opts.split_preset!r}: choose one of {', '.join(SPLIT_PRESETS)}")
        for c in cases:
            m = re.search(r"(\d+)$", c.case_id)
            if not m:
                raise LiversegError(f"case {c.case_id!r} has no trailing number for --split-preset {opts.split_preset}")
            c.split = SPLIT_PRESETS[opts.split_preset](int(m.group(1)))
    elif not from_folders:
        if not (0 <= opts.val < 1 and 0 <= opts.test < 1 and opts.val + opts.test < 1):
            raise LiversegError(f"--val {opts.val} / --test {opts.test}: fractions in [0, 1) that sum below 1")
        order = sorted(ids)
        random.Random(opts.seed).shuffle(order)
        n = len(order)
        n_test = max(1, round(opts.test * n)) if opts.test else 0
        n_val = max(1, round(opts.val * n)) if opts.val else 0
        if n_test + n_val >= n:
            raise LiversegError(f"{n} cases cannot give {n_val} val + {n_test} test cases and keep one for training")
        split_of = {c: "test" for c in order[:n_test]} | {c: "val" for c in order[n_test : n_test + n_val]}
        for c in cases:
            c.split = split_of.get(c.case_id, "train")


def check_headers(cases: list[Case], opts: ConvertOptions) -> None:
    """Fill each case's planned stored geometry, or its error, from headers alone."""
    for c in cases:
        try:
            image, mask = volumes.read_header(c.image, ct=True), volumes.read_header(c.mask)
            geometry.check_pair(image, mask, opts.affine_tol)
            c.geometry = geometry.stored_geometry(image, opts.size, opts.spacing)
        except InputError as e:
            c.error = c.explain(e)
