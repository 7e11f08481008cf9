"""Cross-validation folds over patients: `data.folds` K and `data.fold` k.

The training patients of a dataset are its manifest's train and val cases together (a case
id is a patient); they are dealt into K folds in a seeded, stable order (sorted ids shuffled
by `derive_seed(data.fold_seed, "folds")`, then dealt round-robin, so fold sizes differ by at most one
and the same seed, K and patients always give the same folds). Fold k validates on its
patients and trains on the others; the test split is never used.

`refold` gives the manifest as that fold sees it: the cases' splits reassigned and the train
and val summaries recomputed from the cases (HU pooled as conversion does). Their shards are
every train and val shard holding one of the split's cases, so a shard may also hold cases
of the other split: the pipeline keeps only the split's own cases' rows (`plan.plan_split`).
"""

from __future__ import annotations

import dataclasses
import random

from liverseg.config import derive_seed
from liverseg.manifest import Manifest, SplitInfo
from liverseg.records import RecordsError

POOL = ("train", "val")  # the splits whose cases the folds deal


def patients(m: Manifest) -> list[str]:
    return sorted(c.case_id for c in m.cases if c.split in POOL)


def assign(ids: list[str], k: int, seed: int) -> dict[str, int]:
    """The fold of each patient id."""
    order = sorted(ids)
    random.Random(derive_seed(seed, "folds")).shuffle(order)
    return {case: i % k for i, case in enumerate(order)}


def refold(m: Manifest, k: int, fold: int, seed: int) -> Manifest:
    """`m` as fold `fold` of `k` sees it (k patients at least; refused naming the dataset)."""
    ids = patients(m)
    if k > len(ids):
        raise RecordsError(
            f"{m.root}: data.folds={k} folds need at least {k} training patients, but its train and val "
            f"splits hold {len(ids)}; use fewer folds"
        )
    if not 0 <= fold < k:
        raise RecordsError(f"data.fold={fold} is not a fold of data.folds={k} (0..{k - 1})")
    of = assign(ids, k, seed)
    cases = tuple(
        dataclasses.replace(c, split=("val" if of[c.case_id] == fold else "train")) if c.split in POOL else c
        for c in m.cases
    )
    pool_shards = [s for split in POOL if split in m.splits for s in m.splits[split].shards]
    splits = {name: info for name, info in m.splits.items() if name not in POOL}
    for split in POOL:
        members = [c for c in cases if c.split == split]
        names = {c.case_id for c in members}
        shards = tuple(s for s in pool_shards if names & set(m.cases_of(s)))
        splits[split] = SplitInfo.of(members, shards)
    ordered = {name: splits[name] for name in ("train", "val", "test") if name in splits}
    return dataclasses.replace(m, splits=ordered, cases=cases)


def view(m: Manifest, data_cfg) -> Manifest:
    """The manifest a config trains and validates on: refolded when data.folds is set."""
    return refold(m, data_cfg.folds, data_cfg.fold, data_cfg.fold_seed) if data_cfg.folds else m


def record(m: Manifest, data_cfg) -> dict | None:
    """What run.json records of a fold: K, k, the seed, and the exact train and val patients."""
    if not data_cfg.folds:
        return None
    return {
        "folds": data_cfg.folds,
        "fold": data_cfg.fold,
        "fold_seed": data_cfg.fold_seed,
        "train": [c.case_id for c in m.cases_in("train")],
        "val": [c.case_id for c in m.cases_in("val")],
    }


__all__ = ["assign", "patients", "record", "refold", "view"]
