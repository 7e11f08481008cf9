"""Public datasets that hold the same patients: 3D-IRCADb-01's 20 patients are LiTS volumes,
and the Decathlon's Task03_Liver holds LiTS's training volumes under the same numbers. A case
is told by its id or the names on its image's path (`public_origin`); `ircad_overlap` says why
two sets of cases share patients."""

from __future__ import annotations

import re
from pathlib import Path

# LiTS volumes that are 3D-IRCADb-01's 20 patients; the Decathlon's Task03_Liver holds LiTS's
# training volumes under the same numbers (liver_N = volume-N). Which LiTS number is which
# IRCAD patient is not published, so each of them counts as overlapping every IRCAD patient.
# LiTS volumes that are 3D-IRCADb-01's 20 patients. Sources number them 28-47 or 28-44 and
# 46-48: both readings are guarded (28-48), since a missed copy inflates every score.
LITS_FROM_IRCAD = frozenset(range(28, 49))
_IRCAD_NAMES = (re.compile(r"^3Dircadb1\.(\d+)(\.zip)?$"), re.compile(r"^ircad_e?(\d+)$"))
_LITS_NAMES = (
    re.compile(r"^lits_(\d+)$"),
    re.compile(r"^volume-(\d+)(\.nii(\.gz)?)?$"),
    re.compile(r"^liver_(\d+)(\.nii(\.gz)?)?$"),
)


def public_origin(case_id: str, image: Path | None = None) -> str | None:
    """ "ircad" for a 3D-IRCADb-01 patient, "lits-ircad" for a LiTS or Decathlon case that is
    one (LITS_FROM_IRCAD), by its case id or the names on its image's path; else None."""
    names = [case_id, *(Path(image).parts[-3:] if image else ())]
    for name in names:
        if any(p.match(name) for p in _IRCAD_NAMES):
            return "ircad"
        for p in _LITS_NAMES:
            m = p.match(name)
            if m:
                return "lits-ircad" if int(m.group(1)) in LITS_FROM_IRCAD else None
    return None


def ircad_overlap(first: dict[str, Path | None], second: dict[str, Path | None] | None = None) -> str | None:
    """Why some of these cases are the same patients (case id -> image path), or None: IRCAD
    patients and LiTS/MSD cases that are IRCAD patients within `first`, or (with `second`)
    between the two sets, either way round."""

    def split(cases):
        origins = {c: public_origin(c, image) for c, image in cases.items()}
        return (
            sorted(c for c, o in origins.items() if o == "ircad"),
            sorted(c for c, o in origins.items() if o == "lits-ircad"),
        )

    a_ircad, a_lits = split(first)
    b_ircad, b_lits = split(second) if second is not None else (a_ircad, a_lits)
    if a_ircad and b_lits:
        ircad, lits = a_ircad, b_lits
    elif a_lits and b_ircad:
        ircad, lits = b_ircad, a_lits
    else:
        return None

    def named(ids):
        return ", ".join(ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")

    return (
        f"{named(lits)} (LiTS/Decathlon) are 3D-IRCADb-01 scans, as are {named(ircad)} "
        "(LiTS volumes 28-48 hold IRCAD's 20 patients: 28-47 or 28-44 and 46-48 by the source)"
    )


__all__ = ["LITS_FROM_IRCAD", "ircad_overlap", "public_origin"]
