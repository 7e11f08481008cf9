"""Conversion: round trips, splits, determinism, atomicity, and every bad input's clear error."""

import gzip
import json
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from conftest import HANG, liverseg_process, load_image, load_mask, tree, write_nifti
from liverseg import LiversegError, geometry, records, synth, verify
from liverseg.convert import ConvertOptions, convert
from liverseg.manifest import Manifest


def _decode_shard(path, compression=""):
    raw = [r for _, _, r in records.iter_records(path, compression)]
    ex = records.decode_example(tf.constant(raw))
    return {k: v.numpy() for k, v in ex.items()}


def test_round_trip_equals_reoriented_source(dataset):
    m = Manifest.load(dataset)
    for case in m.cases:
        src_img = case.image.path
        image, header = load_image(src_img)
        mask, _ = load_mask(case.mask.path)
        geom = case.geometry
        assert np.allclose(np.array(geom.affine), nib.load(src_img).affine)
        assert geom.shape == nib.load(src_img).shape
        assert geom.orientation == "".join(nib.aff2axcodes(nib.load(src_img).affine))
        ex = _decode_shard(dataset / case.shard)
        mine = ex["case_id"] == case.case_id.encode()
        assert mine.sum() == case.num_slices == image.shape[2]
        assert np.array_equal(ex["image"][mine], geometry.to_stored(image, geom, "image"))
        assert np.array_equal(ex["mask"][mine], geometry.to_stored(mask, geom, "mask"))
        assert ex["slice_index"][mine].tolist() == list(range(case.num_slices))
        assert ex["liver_voxels"][mine].sum() == case.liver_voxels == mask.sum()
        assert set(ex["case_index"][mine]) == {case.index}


def test_splits_never_share_a_case(dataset):
    m = Manifest.load(dataset)
    seen = {}
    for split in m.splits:
        for path in m.shard_paths(split):
            ex = _decode_shard(path)
            for cid in set(ex["case_id"].tolist()):
                assert seen.setdefault(cid, split) == split
    assert {c.split for c in m.cases} == {"train", "val", "test"}
    assert sum(m.split(s).num_examples for s in m.splits) == sum(c.num_slices for c in m.cases)


def _one_anatomy(tmp_path, orientation):
    ras_ct, ras_mask = synth.render(np.random.default_rng(5), (24, 20, 6), (12.0, 13.0, 20.0))
    src = tmp_path / orientation
    for arr, kind, dtype in ((ras_ct, "orig", np.int16), (ras_mask, "liver", np.uint8)):
        a, aff = geometry.from_canonical_ras(arr, (12.0, 13.0, 20.0), orientation, origin=(-100, 50, 10))
        write_nifti(src / f"case01_{kind}.nii.gz", a, aff, dtype)
    return src


def test_same_anatomy_las_ras_lps_gives_identical_records(tmp_path):
    shards = []
    for o in ("LAS", "RAS", "LPS"):
        m = convert(_one_anatomy(tmp_path, o), tmp_path / f"out-{o}", progress=False)
        assert m.cases[0].geometry.orientation == o
        shards.append((tmp_path / f"out-{o}" / "train-00000-of-00001.tfrecord").read_bytes())
    assert shards[0] == shards[1] == shards[2]


def test_rerun_byte_identical_and_workers_agree(phantoms, tmp_path):
    opts = ConvertOptions(val=0.2, num_shards=2)
    a = convert(phantoms, tmp_path / "a", opts, progress=False)
    convert(phantoms, tmp_path / "b", ConvertOptions(val=0.2, num_shards=2, workers=2), progress=False)
    again = convert(phantoms, tmp_path / "a", opts, progress=False)  # same dataset: allowed without --overwrite
    assert a == again
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert len(a.splits["train"].shards) == 2


def test_resize_and_compression(phantoms, tmp_path):
    m = convert(phantoms, tmp_path / "r", ConvertOptions(size=16, compression="GZIP"), progress=False)
    assert m.splits["train"].slice_shape == (16, 16)
    case = m.cases[0]
    assert case.geometry.native_hw == (32, 32) and case.geometry.stored_shape[1:] == (16, 16)
    ex = _decode_shard(tmp_path / "r" / case.shard, "GZIP")
    assert ex["image"].shape[1:] == (16, 16) and set(np.unique(ex["mask"])) <= {0, 1}
    assert all(r.ok for r in verify.verify(tmp_path / "r"))


def test_split_file_and_preset(phantoms, tmp_path):
    ids = sorted(p.name[: -len("_orig.nii.gz")] for p in phantoms.glob("*_orig.nii.gz"))
    spec = tmp_path / "split.json"
    spec.write_text(json.dumps({"train": ids[:4], "val": ids[4:5], "test": ids[5:]}))
    m = convert(phantoms, tmp_path / "s", ConvertOptions(split_file=str(spec)), progress=False)
    assert {c.case_id: c.split for c in m.cases} == {**{i: "train" for i in ids[:4]}, ids[4]: "val", ids[5]: "test"}
    spec.write_text(json.dumps({"train": ids[:4], "val": ids[4:5]}))
    with pytest.raises(LiversegError, match=f"not in split file: {ids[5]}"):
        convert(phantoms, tmp_path / "s2", ConvertOptions(split_file=str(spec)), progress=False)
    m = convert(phantoms, tmp_path / "p", ConvertOptions(split_preset="ircad"), progress=False)  # phantom_001..006
    assert {c.split for c in m.cases} == {"train"}


def test_split_subfolders(tmp_path):
    synth.synthesize(tmp_path / "seed", cases=4, size=24, slices=(6, 6), layout="seed", progress=False)
    m = convert(tmp_path / "seed", tmp_path / "out", progress=False)
    assert {s: m.splits[s].num_cases for s in m.splits} == {"train": 3, "test": 1}


# ------------------------------------------------------------------------- verify


def test_verify_catches_truncated_shard_and_flipped_byte(dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    assert all(r.ok for r in verify.verify(ds))
    shards = sorted(ds.glob("train-*.tfrecord"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-7])
    flipped = bytearray(shards[1].read_bytes())
    first = len(next(records.iter_records(shards[1]))[2]) + 16
    flipped[first + 100] ^= 0x10
    shards[1].write_bytes(bytes(flipped))
    bad = {r.file: r.status for r in verify.verify(ds) if not r.ok}
    assert set(bad) == {shards[0].name, shards[1].name}
    assert "truncated" in bad[shards[0].name]
    assert bad[shards[1].name] == f"record 1 at byte {first}: data CRC mismatch (corrupt record)"


# ------------------------------------------------------------------------- atomicity


@pytest.mark.slow
def test_killed_conversion_leaves_no_partial_and_no_manifest(tmp_path):
    src = tmp_path / "src"
    synth.synthesize(src, cases=6, size=96, slices=(30, 40), seed=2, progress=False)
    for delay in (0.0, 0.05, 0.15, 0.3):
        out = tmp_path / f"out{delay}"
        proc = liverseg_process("convert", src, out, "--num-shards", 6, stdout=subprocess.DEVNULL, stderr=None)
        t0 = time.time()
        while not list(out.glob(".liverseg-tmp-*")) and proc.poll() is None and time.time() - t0 < HANG:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finals = sorted(out.glob("*-of-*.tfrecord"))
        if (out / "dataset.json").exists():  # finished before the kill: must be complete
            assert all(r.ok for r in verify.verify(out))
        else:
            for f in finals:  # a shard under its final name is always complete
                list(records.iter_records(f))
        # re-running the same command completes the dataset
        convert(src, out, ConvertOptions(num_shards=6), progress=False)
        assert all(r.ok for r in verify.verify(out)) and not list(out.glob(".liverseg-tmp-*"))


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def good_src(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        write_nifti(src / f"{c}_orig.nii.gz", rng.integers(-1000, 1000, (16, 16, 4)), dtype=np.int16)
        mask = np.zeros((16, 16, 4), np.uint8)
        mask[4:10, 4:10, 1:3] = 1
        write_nifti(src / f"{c}_liver.nii.gz", mask, dtype=np.uint8)
    return src


def _fails(src, out, match, **opts):
    with pytest.raises(LiversegError, match=match):
        convert(src, out, ConvertOptions(**opts), progress=False)
    assert tree(out) == [], f"{out} must hold nothing after a failed run"


def test_unpaired_files_are_listed(good_src, tmp_path):
    (good_src / "b_liver.nii.gz").unlink()
    (good_src / "z_liver.nii.gz").write_bytes((good_src / "a_liver.nii.gz").read_bytes())
    _fails(good_src, tmp_path / "out", r"2 file\(s\) without a partner .*b_orig\.nii\.gz.*z_liver\.nii\.gz")


@pytest.mark.parametrize(
    "defect, match",
    [
        ("shape", r"b_liver\.nii\.gz: mask shape \(16, 16, 5\) differs"),
        ("affine", r"b_liver\.nii\.gz: affine differs from image \S*b_orig\.nii\.gz by 3 mm"),
        ("spacing", r"b_liver\.nii\.gz: voxel sizes .* differ"),
        ("2d", r"b_orig\.nii\.gz: image is 2D"),
        ("channels", r"b_orig\.nii\.gz: image has shape \(16, 16, 4, 3\)"),
        ("pixdim", r"b_orig\.nii\.gz: voxel sizes \(pixdim\)"),
    ],
)
def test_bad_headers_fail_before_anything_is_written(good_src, tmp_path, defect, match):
    img, mask = good_src / "b_orig.nii.gz", good_src / "b_liver.nii.gz"
    if defect == "shape":
        write_nifti(mask, np.zeros((16, 16, 5)), dtype=np.uint8)
    elif defect == "affine":
        aff = np.diag([0.8, 0.8, 2.5, 1.0])
        aff[1, 3] = 3.0
        write_nifti(mask, np.zeros((16, 16, 4)), aff, np.uint8)
    elif defect == "spacing":
        write_nifti(mask, np.zeros((16, 16, 4)), np.diag([0.9, 0.8, 2.5, 1.0]), np.uint8)
    elif defect == "2d":
        write_nifti(img, np.zeros((16, 16)), dtype=np.int16)
    elif defect == "channels":
        write_nifti(img, np.zeros((16, 16, 4, 3)), dtype=np.int16)
    elif defect == "pixdim":  # patch the stored bytes: nibabel would "fix" a negative pixdim on save
        raw = bytearray(gzip.decompress(img.read_bytes()))
        raw[84:88] = struct.pack("<f", -1.0)  # pixdim[2]
        img.write_bytes(gzip.compress(bytes(raw)))
    _fails(good_src, tmp_path / "out", match)


@pytest.mark.parametrize(
    "defect, match",
    [
        ("nan", r"b_orig\.nii\.gz: 1 voxels are NaN or Inf"),
        ("truncated", r"b_orig\.nii\.gz: truncated or corrupt gzip"),
        ("labels", r"b_liver\.nii\.gz: mask labels \[0, 1, 7\]"),
        ("lits", r"b_liver\.nii\.gz: .*look like LiTS.*--merge-tumour"),
    ],
)
def test_bad_voxels_fail_the_run_before_any_shard_is_final(good_src, tmp_path, defect, match):
    img, mask = good_src / "b_orig.nii.gz", good_src / "b_liver.nii.gz"
    if defect == "nan":
        vol = np.zeros((16, 16, 4), np.float32)
        vol[3, 3, 3] = np.nan
        write_nifti(img, vol, dtype=np.float32)
    elif defect == "truncated":
        img.write_bytes(img.read_bytes()[:-200])
    else:
        m = np.asanyarray(nib.load(str(mask)).dataobj).copy()
        m[0, 0, 0] = 7 if defect == "labels" else 2
        write_nifti(mask, m, dtype=np.uint8)
    # one shard per case: a, b, c; b fails while a's shard is already written under its temp name
    _fails(good_src, tmp_path / "out", match, num_shards=3)
    m = convert(good_src, tmp_path / "skip", ConvertOptions(num_shards=3, skip_bad=True), progress=False)
    assert [c.case_id for c in m.cases] == ["a", "c"]
    assert [s.case_id for s in m.skipped] == ["b"] and "b_" in m.skipped[0].error
    assert [s.file for s in m.splits["train"].shards] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    assert all(r.ok for r in verify.verify(tmp_path / "skip"))


def test_mask_label_conventions_accepted(good_src, tmp_path):
    m = np.asanyarray(nib.load(str(good_src / "a_liver.nii.gz")).dataobj)
    write_nifti(good_src / "a_liver.nii.gz", m * 255, dtype=np.uint8, slope=1 / 255)  # {0,255}, slope 1/255
    lits = m.copy()
    lits[5, 5, 1] = 2
    write_nifti(good_src / "b_liver.nii.gz", lits, dtype=np.uint8)
    out = convert(good_src, tmp_path / "out", ConvertOptions(merge_tumour=True), progress=False)
    assert [c.liver_voxels for c in out.cases] == [m.sum()] * 3


def test_out_holding_another_dataset_is_not_overwritten(good_src, phantoms, tmp_path):
    out = tmp_path / "out"
    convert(good_src, out, progress=False)
    before = {p: (out / p).read_bytes() for p in tree(out)}
    with pytest.raises(LiversegError, match="already holds a different dataset.*--overwrite"):
        convert(phantoms, out, progress=False)
    with pytest.raises(LiversegError, match="already holds a different dataset"):
        convert(good_src, out, ConvertOptions(size=32), progress=False)
    assert {p: (out / p).read_bytes() for p in tree(out)} == before
    # same options, same file names, different voxels: caught once the sources are hashed
    rng = np.random.default_rng(9)
    write_nifti(good_src / "a_orig.nii.gz", rng.integers(-1000, 1000, (16, 16, 4)), dtype=np.int16)
    with pytest.raises(LiversegError, match="converted from different source files"):
        convert(good_src, out, progress=False)
    assert {p: (out / p).read_bytes() for p in tree(out)} == before
    m = convert(phantoms, out, ConvertOptions(overwrite=True), progress=False)
    assert sorted(tree(out)) == sorted(
        ["cases.jsonl", "dataset.json"] + [s.file for sp in m.splits.values() for s in sp.shards]
    )


def test_out_with_foreign_files_is_refused(good_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LiversegError, match=r"holds files that are not a liverseg dataset \(notes\.txt\)"):
        convert(good_src, out, progress=False)
    assert tree(out) == ["notes.txt"]


def test_two_conversions_into_one_out_the_second_fails_naming_the_first(tmp_path):
    """OUT is locked while a conversion writes into it (a second one would delete its temporary shards)."""
    import os

    from liverseg import LiversegError
    from liverseg.convert.output import LOCK, locked

    src = tmp_path / "src"
    synth.synthesize(src, cases=2, size=24, slices=(6, 6), seed=1, progress=False)
    out = tmp_path / "out"
    with locked(out, src):
        assert (out / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(
            LiversegError, match=rf"{out} is in use by a conversion \(pid {os.getpid()} .*choose another OUT"
        ):
            convert(src, out, ConvertOptions(), progress=False)
        assert tree(out) == [LOCK]  # the second wrote nothing
    assert not out.exists()  # made by the lock, left empty: removed
    (out).mkdir()
    (out / LOCK).write_text("pid 99999 on gone since 2026-01-01")  # a killed conversion's lock: taken over
    m = convert(src, out, ConvertOptions(), progress=False)
    assert sorted(tree(out)) == sorted(
        ["cases.jsonl", "dataset.json"] + [s.file for sp in m.splits.values() for s in sp.shards]
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        (dict(affine_tol=float("nan")), r"--affine-tol nan: choose a tolerance in mm between 0 and 10"),
        (dict(shard_mb=float("nan")), r"--shard-mb nan, .*--shard-mb must be in \(0, 1048576\]"),
        (dict(val=float("nan")), r"--val nan / --test 0.0: fractions in \[0, 1\)"),
    ],
)
def test_non_finite_convert_options_are_refused(tmp_path, opts, message):
    from liverseg import LiversegError

    src = tmp_path / "src"
    synth.synthesize(src, cases=2, size=24, slices=(6, 6), seed=1, progress=False)
    with pytest.raises(LiversegError, match=message):
        convert(src, tmp_path / "out", ConvertOptions(**opts), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"train": [1, 2]}, r"'train' must be a list of case ids as strings"),
        ({"train": "phantom_001"}, r"'train' must be a list of case ids as strings .*got \"phantom_001\""),
    ],
)
def test_a_split_file_of_numbers_or_a_string_is_refused(tmp_path, spec, message):
    import json

    from liverseg import LiversegError

    src = tmp_path / "src"
    synth.synthesize(src, cases=2, size=24, slices=(6, 6), seed=1, progress=False)
    (tmp_path / "split.json").write_text(json.dumps(spec))
    with pytest.raises(LiversegError, match=message):
        convert(src, tmp_path / "out", ConvertOptions(split_file=str(tmp_path / "split.json")), progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- what convert may remove


def _snapshot(folder: Path) -> dict:
    return {p: (folder / p).read_bytes() for p in tree(folder)}


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_convert_did_not_write_survive_byte_for_byte(good_src, tmp_path, overwrite):
    """A draft with a temporary-looking name, another tool's shard named like ours and a
    foreign manifest: OUT refused before anything is removed, with or without --overwrite."""
    opts = ConvertOptions(overwrite=overwrite)
    for name, content in (
        (".tmp-draft.txt", b"a draft"),
        ("train-00000-of-00002.tfrecord", b"another tool's records"),
        ("dataset.json", b'{"name": "an MSD task", "training": []}'),
    ):
        out = tmp_path / name.strip(".")
        out.mkdir()
        (out / "notes.txt").write_bytes(b"mine")
        (out / name).write_bytes(content)
        before = _snapshot(out)
        with pytest.raises(
            LiversegError,
            match=r"(not a liverseg dataset|not a readable liverseg manifest).*"
            r"nothing was written or removed",
        ):
            convert(good_src, out, opts, progress=False)
        assert _snapshot(out) == before
    # a liverseg dataset with another tool's shard beside it: --overwrite may not take that shard
    out = tmp_path / "ours"
    convert(good_src, out, progress=False)
    (out / "mydata-00000-of-00001.tfrecord").write_bytes(b"not ours")
    before = _snapshot(out)
    with pytest.raises(LiversegError, match=r"mydata-00000-of-00001\.tfrecord"):
        convert(good_src, out, ConvertOptions(size=32, overwrite=True), progress=False)
    assert _snapshot(out) == before


def test_a_commit_cut_short_is_completed_by_a_rerun(phantoms, tmp_path):
    """Killed between removing the old manifest and placing the new one: the ledger proves the
    final-named shards ours, and the re-run completes the dataset (and removes the ledger)."""
    from liverseg.convert.output import LEDGER

    out = tmp_path / "out"
    convert(phantoms, out, ConvertOptions(val=0.2, num_shards=2), progress=False)
    shards = sorted(p.name for p in out.glob("*.tfrecord"))
    (out / LEDGER).write_text("".join(f"{n}\n" for n in shards))
    (out / "dataset.json").unlink()
    (out / ".liverseg-tmp-train-00001.tfrecord").write_bytes(b"half a shard")
    m = convert(phantoms, out, ConvertOptions(val=0.2, num_shards=3), progress=False)  # other shard names
    assert sorted(tree(out)) == sorted(
        ["cases.jsonl", "dataset.json", *(s.file for sp in m.splits.values() for s in sp.shards)]
    )
    assert all(r.ok for r in verify.verify(out))
