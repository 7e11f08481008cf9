#!/usr/bin/env python3
"""Leave one real scan out: the protocol that judges a real-CT recipe without a held-out scan
from outside (docs/benchmarks.md, "Real CT: leave one real scan out").

The two real labelled scans in ../shared/data/real-ct take turns:

    fold A   trains on real IRCAD patient 1 (manual mask) + phantoms; judged on the
             TotalSegmentator CT and its 20-slice JPEG 2000 series (TotalSegmentator's label 5)
    fold B   trains on the TotalSegmentator CT + phantoms; judged on IRCAD patient 1's manual mask

Phantoms are built around real liver masks (`liverseg synth --masks`): IRCAD e02-e15 (never
e01, which fold B judges, nor the test patients e16-e20) and, as a lever, the LiTS masks.
Every step is a liverseg command, printed as it runs:

    python tools/real_ct.py prepare WORK [--lits]          # phantoms (once per anatomy version)
    python tools/real_ct.py run WORK --fold A --name baseline [--minutes 7 | --steps 2150] [--seed 1]
        [--config real-cpu] [--phantoms ircad|ircad+lits] [--set KEY=VALUE ...]
    python tools/real_ct.py table WORK                      # every run so far, both folds

`run` converts the fold's case list with the convert flags on the recipe's first line
(cached per fold and phantom set), trains the recipe (--minutes sets train.time_budget_min,
--seed the seed), evaluates the held-out scans on their own grids (`evaluate --split test`),
and appends the figures to WORK/results.jsonl. No validation split: nothing here chooses a
checkpoint on the scans that judge it. Run one fold at a time (each takes the machine's cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVERSEG_SHARED", REPO.parent / "shared")) / "data"
REAL = SHARED / "real-ct"
IRCAD_MASKS = SHARED / "ircad-liver-masks"
LITS_MASKS = SHARED / "lits-liver-masks"
TRAIN_MASKS = [f"ircad_e{i:02d}_liver.nii.gz" for i in range(2, 16)]  # never e01 (fold B judges it), e16-e20

IRCAD_P1 = ("ircad_e01", REAL / "ircad-01" / "PATIENT_DICOM", IRCAD_MASKS / "ircad_e01_liver.nii.gz", "")
TS = REAL / "totalsegmentator"
TS_CT = ("ts_ct", TS / "example_ct.nii.gz", TS / "example_ct_seg.nii.gz", "5")
TS_DICOM = ("ts_dicom", TS / "example_ct_dicom", TS / "example_ct_dicom_seg.nii.gz", "5")
FOLDS = {"A": ([IRCAD_P1], [TS_CT, TS_DICOM]), "B": ([TS_CT], [IRCAD_P1])}  # (real training scans, judged)


def liverseg(*args, log: Path | None = None) -> None:
    cmd = [str(Path(sys.executable).parent / "liverseg"), *map(str, args)]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with open(log, "a") if log else open(os.devnull, "w") as sink:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sink.write(proc.stdout)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stdout[-3000:]}")


def prepare(work: Path, lits: bool, tag: str = "") -> None:
    """Phantoms around the IRCAD masks e02-e15 (and the LiTS masks), built by liverseg synth:
    phantoms-ircad[-TAG], phantoms-lits[-TAG] (a tag names the anatomy of this liverseg)."""
    for name, folder, masks in (("ircad", IRCAD_MASKS, TRAIN_MASKS), ("lits", LITS_MASKS, None)):
        if name == "lits" and not lits:
            continue
        out = work / f"phantoms-{name}{'-' + tag if tag else ''}"
        if out.is_dir():
            print(f"{out}: there already")
            continue
        chosen = work / f"masks-{name}"
        chosen.mkdir(parents=True, exist_ok=True)
        for p in sorted(folder.glob("*_liver.nii.gz")):
            if masks is None or p.name in masks:
                (chosen / p.name).unlink(missing_ok=True)
                (chosen / p.name).symlink_to(p)
        liverseg("synth", out, "--masks", chosen, "--workers", "2")


def case_list(work: Path, fold: str, phantoms: str) -> Path:
    real, judged = FOLDS[fold]
    rows = ["case,image,mask,split,source,mask_label"]
    rows += [f"{c},{image},{mask},train,real,{label}" for c, image, mask, label in real]
    for name in phantoms.split("+"):
        folder = work / f"phantoms-{name}"
        if not folder.is_dir():
            sys.exit(f"{folder}: missing; make it with: python tools/real_ct.py prepare {work} (--lits, --tag)")
        for image in sorted(folder.glob("*_orig.nii.gz")):
            case = image.name.removesuffix("_orig.nii.gz")
            rows.append(f"phantom_{case},{image},{folder / (case + '_liver.nii.gz')},train,phantom,")
    rows += [f"{c},{image},{mask},test,real,{label}" for c, image, mask, label in judged]
    path = work / f"cases-{fold}-{phantoms}.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def convert_flags(config: str) -> list[str]:
    text = (REPO / "liverseg" / "presets" / f"{config}.yaml") if "/" not in config else Path(config)
    first = Path(text).read_text().splitlines()[0]
    if not first.startswith("# convert: "):
        sys.exit(f"{config}: its first line does not give the convert flags (# convert: ...)")
    return first.removeprefix("# convert: ").split()


def run(args) -> None:
    work = args.work
    flags = convert_flags(args.config) + list(args.convert)
    key = "-".join(f.strip("-") for f in flags if f not in ("--layout", "list"))
    records = work / f"records-{args.fold}-{args.phantoms}-{key}"
    if not records.is_dir():
        liverseg("convert", case_list(work, args.fold, args.phantoms), records, *flags)
    tag = f"{args.name}-{args.fold}-s{args.seed}"
    runs = work / "runs" / tag
    if runs.exists():
        sys.exit(f"{runs}: exists; give another --name")
    log = work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sets = [f"seed={args.seed}", "train.eval_every=0", *args.set]
    if args.minutes is not None:
        sets.append(f"train.time_budget_min={args.minutes}")
    if args.steps is not None:  # a fixed number of steps: the figures do not depend on the machine's load
        sets += ["train.time_budget_min=0", f"train.steps={args.steps}"]
    t0 = time.time()
    liverseg(
        "train",
        "--config",
        args.config,
        "--records",
        records,
        "--run",
        runs,
        *[x for s in sets for x in ("--set", s)],
        log=log,
    )
    wall = time.time() - t0
    liverseg("evaluate", "--run", runs, "--split", "test", "--out", runs / "eval" / "held-out", log=log)
    report = json.loads((runs / "eval" / "held-out" / "metrics.json").read_text())
    info = json.loads((runs / "run.json").read_text())
    row = {
        "name": args.name,
        "fold": args.fold,
        "seed": args.seed,
        "config": args.config,
        "phantoms": args.phantoms,
        "sets": args.set,
        "convert": flags,
        "minutes": args.minutes,
        "fixed_steps": args.steps,
        "steps": info["result"]["step"],
        "wall_s": round(wall, 1),
        "cases": {c["case"]: {k: c[k] for k in ("dice", "hd95", "assd", "pred_ml", "ref_ml")} for c in report["cases"]},
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def table(work: Path) -> None:
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines() if line.strip()]
    print("| run | fold | seed | steps | wall | case | Dice | HD95 mm | ASSD mm | pred / ref ml |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for case, m in r["cases"].items():
            print(
                f"| {r['name']} | {r['fold']} | {r['seed']} | {r['steps']:,} | {r['wall_s'] / 60:.1f} min | {case} | "
                f"{m['dice']:.3f} | {m['hd95']:.1f} | {m['assd']:.2f} | {m['pred_ml']:,.0f} / {m['ref_ml']:,.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("work", type=Path)
    p.add_argument("--lits", action="store_true", help="Also phantoms around the LiTS masks.")
    p.add_argument("--tag", default="", help="Names this anatomy's phantom sets (phantoms-ircad-TAG, ...).")
    r = sub.add_parser("run")
    r.add_argument("work", type=Path)
    r.add_argument("--fold", choices=sorted(FOLDS), required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--config", default="real-cpu")
    r.add_argument("--phantoms", default="ircad", help="Phantom sets joined by +: ircad, lits, ircad-TAG, ...")
    r.add_argument("--minutes", type=float, help="train.time_budget_min (default: the recipe's).")
    r.add_argument("--steps", type=int, help="Train this many steps, no time budget (screening on a busy machine).")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", default=[], help="A config override (repeatable).")
    r.add_argument("--convert", action="append", default=[], help="An extra convert flag (repeatable).")
    t = sub.add_parser("table")
    t.add_argument("work", type=Path)
    args = parser.parse_args()
    if not REAL.is_dir():
        sys.exit(f"{REAL}: the shared real CT is not here (set LIVERSEG_SHARED)")
    if args.command == "prepare":
        prepare(args.work, args.lits, args.tag)
    elif args.command == "run":
        run(args)
    else:
        table(args.work)


if __name__ == "__main__":
    main()
