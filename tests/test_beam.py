"""Conversion on Apache Beam's DirectRunner: the same bytes as the local converter, bad
cases as locally, nothing final-named after a failure, and one line without the extra."""

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from liverseg import InputError, LiversegError
from liverseg.convert import ConvertOptions, convert

pytest.importorskip("apache_beam", reason="the [beam] extra is not installed (pip install -e '.[beam]')")
from liverseg.convert.beam import convert_beam  # noqa: E402


def _same_dataset(a, b, runner):
    assert [p.name for p in sorted(a.iterdir())] == [p.name for p in sorted(b.iterdir())]
    for p in sorted(a.glob("*.tfrecord")):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    ma, mb = json.loads((a / "dataset.json").read_text()), json.loads((b / "dataset.json").read_text())
    assert (ma["creation"].pop("runner"), mb["creation"].pop("runner")) == ("local", f"beam:{runner}")
    assert ma == mb  # everything else, byte for byte as JSON: shards, sha256, cases, statistics, options


def test_direct_runner_writes_what_the_local_converter_writes(phantoms, tmp_path):
    opts = ConvertOptions(val=0.17, test=0.17, shard_mb=0.04)
    convert(phantoms, tmp_path / "local", opts, progress=False)
    m = convert_beam(
        phantoms, tmp_path / "beam", ConvertOptions(val=0.17, test=0.17, shard_mb=0.04, runner="direct", workers=2)
    )
    assert m.runner == "beam:DirectRunner" and len(m.shard_paths("train")) == 4
    _same_dataset(tmp_path / "local", tmp_path / "beam", "DirectRunner")


def _poison(src, case):
    path = src / f"{case}_orig.nii.gz"
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    arr[1, 1, 1] = np.nan  # the header is fine: only reading the voxels finds it
    nib.save(nib.Nifti1Image(arr, img.affine), str(path))


def test_compressed_shards_and_skipped_cases_match_too(phantoms, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(phantoms, src)
    _poison(src, "phantom_002")
    opts = dict(num_shards=2, compression="GZIP", skip_bad=True)
    local = convert(src, tmp_path / "local", ConvertOptions(**opts), progress=False)
    beam = convert_beam(src, tmp_path / "beam", ConvertOptions(**opts, runner="direct"))
    assert [s.case_id for s in beam.skipped] == [s.case_id for s in local.skipped] == ["phantom_002"]
    _same_dataset(tmp_path / "local", tmp_path / "beam", "DirectRunner")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_case_failing_mid_pipeline_leaves_no_final_named_shard(phantoms, tmp_path, workers):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(phantoms, src)
    _poison(src, "phantom_004")
    out = tmp_path / "out"
    with pytest.raises(
        InputError, match=r"^\S+phantom_004_orig\.nii\.gz: 1 voxels are NaN or Inf; fix the source volume$"
    ):
        convert_beam(src, out, ConvertOptions(shard_mb=0.04, runner="direct", workers=workers))
    assert not out.exists()  # no shard, no segment, no manifest, no folder


def test_without_the_extra_the_runner_option_is_one_line(phantoms, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # what an environment without it gives
    with pytest.raises(
        LiversegError, match=r"^--runner needs Apache Beam, an optional extra: pip install 'liverseg\[beam\]'$"
    ):
        convert_beam(phantoms, tmp_path / "out", ConvertOptions(runner="direct"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "runner, args, message",
    [
        ("NopeRunner", (), r"^--runner NopeRunner: Unexpected pipeline runner: NopeRunner\. Valid values are"),
        (
            "direct",
            ("--direct_num_wrokers=2",),
            r"^Beam pipeline option\(s\) --direct_num_wrokers: not options of Beam",
        ),
    ],
)
def test_an_unknown_runner_or_pipeline_option_is_one_line(phantoms, tmp_path, runner, args, message):
    with pytest.raises(LiversegError, match=message):
        convert_beam(phantoms, tmp_path / "out", ConvertOptions(runner=runner), args)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_in_a_worker_is_one_line_naming_the_output(phantoms, tmp_path, monkeypatch):
    import errno

    from liverseg import LiversegError
    from liverseg.convert import beam

    real = beam.writing

    def full(path, *args):
        if ".records" not in str(path):  # the shard itself: its segments fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(beam, "writing", full)
    out = tmp_path / "out"
    with pytest.raises(LiversegError, match=r"^\S+out: no space left on device; nothing was made final; free space"):
        convert_beam(phantoms, out, ConvertOptions(shard_mb=0.04, runner="direct", workers=1))
    assert not out.exists() or not any(out.iterdir())
