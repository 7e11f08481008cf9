"""Cross-validation: folds over patients, a fold's pipeline, run.json, resume, `cv`, refusals."""

import collections
import json
import shutil

import pytest

from conftest import SMOKE
from liverseg import LiversegError, config, evaluate, folds, models, pipeline, plan, train
from liverseg.manifest import Manifest


def test_folds_are_disjoint_cover_the_patients_and_are_stable():
    ids = [f"p{i:02d}" for i in range(14)]
    of = folds.assign(ids, 5, seed=0)
    assert set(of) == set(ids) and sorted(collections.Counter(of.values()).values()) == [2, 3, 3, 3, 3]
    assert folds.assign(list(reversed(ids)), 5, seed=0) == of  # the order given does not matter
    assert folds.assign(ids, 5, seed=1) != of


def test_a_folds_manifest_and_pipelines_hold_exactly_its_patients(dataset):
    m = Manifest.load(dataset)
    pool = folds.patients(m)
    assert len(pool) == 5 and not set(pool) & {c.case_id for c in m.cases_in("test")}
    seen = []
    for k in range(3):
        cfg = config.load(
            SMOKE,
            [
                f"data.records={dataset}",
                "data.folds=3",
                f"data.fold={k}",
                "data.batch_size=1",
                "data.foreground_fraction=0",
                "augment.placement=none",
            ],
        )
        view = plan.open_split(cfg, "train")
        val = {c.case_id for c in view.cases_in("val")}
        trained = {c.case_id for c in view.cases_in("train")}
        assert val | trained == set(pool) and not val & trained
        assert [c.case_id for c in view.cases_in("test")] == [c.case_id for c in m.cases_in("test")]
        index = {c.index: c.case_id for c in m.cases}
        got_val = collections.Counter(
            index[int(i)] for b in pipeline.build_dataset(cfg, "val") for i in b["case_index"].numpy()
        )
        assert got_val == {c: m.case(c).num_slices for c in val}
        got_train = {index[int(b["case_index"][0])] for b in pipeline.build_dataset(cfg, "train", epochs=1)}
        assert got_train == trained
        thinned = config.replace(cfg, **{"data.foreground_fraction": 0.7})  # with background slices thinned too
        got_thinned = {index[int(b["case_index"][0])] for b in pipeline.build_dataset(thinned, "train", epochs=3)}
        assert got_thinned == trained
        seen += sorted(val)
    assert sorted(seen) == sorted(pool)  # every patient validated by exactly one fold


def _fold_run(dataset, root, k, n=2, *extra):
    cfg = config.load(
        SMOKE,
        [f"data.records={dataset}", f"data.folds={n}", f"data.fold={k}", "train.steps=2", "train.eval_every=2", *extra],
    )
    train.train(cfg, root, progress=False)
    return root


@pytest.fixture(scope="module")
def fold_runs(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    return [_fold_run(dataset, root / f"fold{k}", k) for k in range(2)]


def test_run_json_records_the_fold_and_resume_keeps_it(dataset, fold_runs, tmp_path):
    info = json.loads((fold_runs[0] / "run.json").read_text())["folds"]
    assert (info["folds"], info["fold"], info["fold_seed"]) == (2, 0, 0)
    assert sorted(info["train"] + info["val"]) == folds.patients(Manifest.load(dataset))
    copy = tmp_path / "copy"
    shutil.copytree(fold_runs[0], copy)
    with pytest.raises(LiversegError, match=r"different config \(data\.folds: 2 -> 3"):
        _fold_run(dataset, copy, 0, 3)
    with pytest.raises(LiversegError, match=r"data\.fold=2 is not valid: must be in \[0, 1\] \(data\.folds=2\)"):
        config.load(SMOKE, ["data.folds=2", "data.fold=2"])
    with pytest.raises(
        LiversegError,
        match=r"data\.folds=9 folds need at least 9 training patients, but its train and "
        r"val splits hold 5",
    ):
        _fold_run(dataset, tmp_path / "nine", 0, 9)
    assert not (tmp_path / "nine").exists()


def test_cv_scores_every_patient_exactly_once(dataset, fold_runs, tmp_path):
    rows, summary, out = evaluate.cross_validate(fold_runs, tmp_path / "cv")
    assert sorted(r["case"] for r in rows) == folds.patients(Manifest.load(dataset))
    for fold, run in enumerate(fold_runs):
        val = json.loads((run / "run.json").read_text())["folds"]["val"]
        assert sorted(r["case"] for r in rows if r["fold"] == fold) == sorted(val)
    assert summary["overall"]["dice"]["n"] == 5 and set(summary["folds"]) == {"0", "1"}
    assert (out / "cases.csv").read_text().splitlines()[0].startswith("case,fold,pred_ml,ref_ml,dice,")
    written = json.loads((out / "metrics.json").read_text())
    assert written["summary"]["folds"]["1"]["dice"]["n"] == len([r for r in rows if r["fold"] == 1])


def test_cv_refuses_missing_duplicate_and_foreign_folds(dataset, fold_runs, trained_run, tmp_path):
    with pytest.raises(LiversegError, match=r"fold\(s\) 1 of data\.folds=2 missing"):
        evaluate.cross_validate(fold_runs[:1], tmp_path / "a")
    with pytest.raises(LiversegError, match=r"fold0 and .*fold0 are both fold 0"):
        evaluate.cross_validate([fold_runs[0], fold_runs[0]], tmp_path / "b")
    with pytest.raises(LiversegError, match=r"not runs of a fold \(no data\.folds\): .*smoke"):
        evaluate.cross_validate([*fold_runs, trained_run], tmp_path / "c")
    other = tmp_path / "other"
    shutil.copytree(fold_runs[1], other)
    info = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**info, "manifest_sha256": "f" * 64}))
    with pytest.raises(LiversegError, match=r"runs of different datasets: .*ffffffffffff"):
        evaluate.cross_validate([fold_runs[0], other], tmp_path / "d")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_an_ensemble_evaluates_the_mean_of_its_members(fold_runs, tmp_path):
    import numpy as np

    from liverseg import predict, records

    runs = [models.load_run(r) for r in fold_runs]
    m = Manifest.load(runs[0].cfg.data.records)
    case = m.cases_in("test")[0]
    image, _ = records.read_case(m.records_of(case.case_id))
    want = (predict.infer_volume(runs[0], image) + predict.infer_volume(runs[1], image)) / 2
    [(case_id, pred, *_)] = list(evaluate.record_cases(runs, None, "test"))
    assert case_id == case.case_id
    c = runs[0].contract
    np.testing.assert_array_equal(
        pred, predict.postprocess(want, c.threshold, c.largest_component, c.min_component_fraction)
    )
    rows, _, _ = evaluate.evaluate(runs, split="test", out=tmp_path / "ens", pngs=False)
    assert [r["case"] for r in rows] == [case.case_id]
