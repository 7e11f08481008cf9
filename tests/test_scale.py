"""What must not grow with the number of cases, counted (not timed): training's start-up reads
no case, a case is found without scanning the others, a split's cases are read one shard pass
each; and `liverseg bench scale` at tiny sizes, its slopes from its own totals."""

import json
import math
import re

import pytest

from conftest import invoke
from liverseg import config, manifest, records, train
from liverseg.manifest import Manifest


class _Counted(tuple):
    """The cases, counting how often they are walked."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def test_training_start_up_and_first_step_read_no_case(dataset, tmp_path, monkeypatch):
    """The plain recipe (no folds, no source weights) starts from the manifest's summary: with
    the cases file unreadable, set-up, a step, validation and the end still run."""

    def no_cases(self):
        raise AssertionError("the cases file was read")

    monkeypatch.setattr(manifest.LazyCases, "_items", property(no_cases))
    cfg = config.load("smoke", [f"data.records={dataset}", "train.steps=2", "train.eval_every=2", "data.context=1"])
    assert train.train(cfg, tmp_path / "run", progress=False)["step"] == 2


def test_finding_every_case_walks_the_cases_a_fixed_number_of_times(dataset):
    m = Manifest.load(dataset)
    counted = manifest.dataclasses.replace(m, cases=_Counted(m.cases))
    _Counted.walks = 0
    for c in m.cases:
        counted.records_of(c.case_id)
        counted.case(c.case_id)
    assert _Counted.walks <= 2  # the id index and the shard placement, built once each


def test_a_splits_cases_are_read_in_one_pass_per_shard(dataset, monkeypatch):
    m = Manifest.load(dataset)
    real, seen = records.iter_records, []

    def counting(path, compression="", start=0, stop=None):
        for item in real(path, compression, start, stop):
            seen.append(item[0])
            yield item

    monkeypatch.setattr(records, "iter_records", counting)
    wheres = [m.records_of(c.case_id) for c in m.cases_in("train")]
    got = list(records.read_cases(wheres))
    assert [g[0] for g in got] == [w.case_id for w in wheres]
    assert len(seen) == m.split("train").num_examples  # each record once, whatever the cases per shard
    image, mask = records.read_case(wheres[-1])  # one case: its own records only
    assert image.shape[0] == wheres[-1].count and len(seen) == m.split("train").num_examples + wheres[-1].count


@pytest.mark.slow
def test_bench_scale_prints_every_figure_with_slopes_from_its_totals(tmp_path):
    out = tmp_path / "scale.json"
    r = invoke(
        "bench",
        "scale",
        "--cases",
        "10,30",
        "--no-beam",
        "--size",
        "16",
        "--slices",
        "6",
        "--work",
        str(tmp_path),
        "--json",
        str(out),
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    rows, totals = {row["figure"]: row for row in got["rows"]}, got["totals"]
    assert set(rows) >= {
        "convert (local, 2 workers)",
        "manifest load",
        "verify",
        "inspect",
        "train start-up to first step",
        "train peak RSS",
        "pipeline slices/s",
        "evaluate per test case",
        "cv bookkeeping",
    }
    for figure, row in rows.items():
        want = math.log(totals["30"][figure] / totals["10"][figure]) / math.log(3)
        assert float(row["slope"]) == pytest.approx(want, abs=0.006), figure
    assert totals["30"]["records bytes"] == pytest.approx(3 * totals["10"]["records bytes"], rel=0.01)
    assert "train start-up at 30 cases" in got["notes"][-1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("liverseg-scale-")]  # its data removed


def test_a_10000_row_case_list_with_one_broken_row_is_refused_naming_it(phantoms, tmp_path):
    """Row 9,731 of 10,000 (line 9,732 of the file: the header is line 1) names a missing mask:
    refused naming the list and the row, nothing written."""
    from liverseg import LiversegError
    from liverseg.convert import ConvertOptions, convert

    image, mask = sorted(phantoms.glob("*_orig.nii.gz"))[0], sorted(phantoms.glob("*_liver.nii.gz"))[0]
    rows = [f"c{i:05d},{image},{tmp_path / 'gone.nii.gz' if i == 9730 else mask}" for i in range(10_000)]
    listed = tmp_path / "cases.csv"
    listed.write_text("case,image,mask\n" + "\n".join(rows) + "\n")
    with pytest.raises(LiversegError, match=r"cases\.csv row 9732: mask .*gone\.nii\.gz does not exist"):
        convert(listed, tmp_path / "out", ConvertOptions(layout="list"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--size", "0"], r"--size 0 / --slices 8: choose a size in \[16, 512\]"),
        (["--slices", "-3"], r"--size 32 / --slices -3"),
        (["--work", "MISSING"], r"--work MISSING: no such folder"),
        (["--cases", "100000000"], r"case counts in \[10, 10,000,000\]"),
        (["--cases", "9000000", "--size", "512", "--slices", "256"], r"GB of temporary data, but .* GB free"),
    ],
)
def test_bench_scale_refuses_what_it_cannot_do_before_writing(tmp_path, args, match):
    r = invoke("bench", "scale", "--no-beam", *args, catch_exceptions=False)
    assert r.exit_code == 2 and re.search(match, r.output), r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_bench_scale_json_never_replaces_another_file(dataset, tmp_path):
    """--json at a dataset's dataset.json: refused, the dataset intact; an earlier bench scale JSON
    is replaced only with --force (checked before any case is made)."""
    manifest = dataset / "dataset.json"
    before = manifest.read_bytes()
    r = invoke("bench", "scale", "--json", str(manifest), catch_exceptions=False)
    assert r.exit_code == 2 and "is not an earlier bench scale JSON" in r.output, r.output
    assert manifest.read_bytes() == before
    earlier = tmp_path / "scale.json"
    earlier.write_text(json.dumps({"written_by": "liverseg bench scale", "rows": []}))
    r = invoke("bench", "scale", "--json", str(earlier), catch_exceptions=False)
    assert r.exit_code == 2 and "pass --force" in r.output, r.output
