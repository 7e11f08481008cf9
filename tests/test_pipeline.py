"""The input pipeline on the tiny converted phantoms (32x32, one case per shard)."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from liverseg import config, pipeline, plan, records
from liverseg.manifest import Manifest
from liverseg.records import RecordsError


def cfg_for(dataset, *overrides):
    return config.load(None, [f"data.records={dataset}", "data.batch_size=4", "eval.batch_size=5", *overrides])


def _volumes(dataset):
    m = Manifest.load(dataset)
    return m, {c.index: records.read_case(m.records_of(c.case_id)) for c in m.cases}


@pytest.mark.parametrize("k", [1, 2])
def test_context_channels_are_neighbours_clamped_to_the_case(dataset, k):
    m, vols = _volumes(dataset)
    norm = plan.normalization(cfg_for(dataset), m)
    seen = []
    for split in ("train", "val"):
        for b in pipeline.build_dataset(cfg_for(dataset, f"data.context={k}"), split, training=False):
            for img, msk, ci, si in zip(
                b["image"].numpy(), b["mask"].numpy(), b["case_index"].numpy(), b["slice_index"].numpy()
            ):
                image, mask = vols[ci]
                z = image.shape[0]
                assert img.shape[-1] == 2 * k + 1
                for c, off in enumerate(range(-k, k + 1)):
                    src = int(np.clip(si + off, 0, z - 1))
                    np.testing.assert_allclose(
                        img[..., c], pipeline.normalize(tf.constant(image[src], tf.float32), norm).numpy(), atol=1e-6
                    )
                np.testing.assert_array_equal(msk[..., 0], mask[si])
                seen.append((ci, si))
    assert len(seen) == len(set(seen)) == m.split("train").num_examples + m.split("val").num_examples


def test_eval_order_every_slice_once_in_case_slice_order(dataset):
    m = Manifest.load(dataset)
    batches = list(pipeline.build_dataset(cfg_for(dataset), "train", training=False))
    order = [(int(c), int(s)) for b in batches for c, s in zip(b["case_index"], b["slice_index"])]
    expected = [(c.index, s) for c in m.cases_in("train") for s in range(c.num_slices)]
    assert order == expected
    assert batches[-1]["mask"].shape[0] == len(expected) % 5 or len(expected) % 5 == 0  # remainder kept
    assert all(b["image"].dtype == tf.float32 for b in batches)


@pytest.mark.parametrize("memory", ["always", "never"])
def test_training_batches_are_static_and_foreground_share_matches(dataset, memory):
    m = Manifest.load(dataset)
    f = m.split("train").liver_fraction
    for p in (0.0, 0.6):
        cfg = cfg_for(
            dataset,
            f"data.foreground_fraction={p}",
            "augment.placement=none",
            "data.batch_size=16",
            f"data.in_memory={memory}",
        )
        ds = pipeline.build_dataset(cfg, "train")
        assert ds.element_spec["image"].shape == (16, 32, 32, 1)
        liver = total = 0
        for b in ds.take(150):
            has = tf.reduce_any(b["mask"] > 0, axis=[1, 2, 3]).numpy()
            liver, total = liver + has.sum(), total + has.size
        expected = p + (1 - p) * f
        assert abs(liver / total - expected) < 0.03, (p, liver / total, expected)


def test_two_input_pipelines_see_every_eval_example_once(dataset, caplog):
    m = Manifest.load(dataset)
    for split in ("train", "val"):  # 4 shards: file sharding; 1 shard: record sharding with a warning
        got = []
        for pipe in range(2):
            ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipe, num_replicas_in_sync=2)
            with caplog.at_level(logging.WARNING, logger="liverseg.pipeline"):
                ds = pipeline.build_dataset(cfg_for(dataset), split, ctx, training=False)
            got += [(int(c), int(s)) for b in ds for c, s in zip(b["case_index"], b["slice_index"])]
        assert sorted(got) == sorted((c.index, s) for c in m.cases_in(split) for s in range(c.num_slices))
        assert len(got) == len(set(got))
    assert "1 shard(s) for 2 input pipelines" in caplog.text


def test_in_memory_passes_are_permutations_of_the_training_slices(dataset):
    """Held in memory, each pass (no thinning) yields every training slice once, each pass in
    another order, the same order for the same seed; "auto" holds a split that fits."""
    m = Manifest.load(dataset)
    cfg = cfg_for(
        dataset, "data.foreground_fraction=0", "augment.placement=none", "data.batch_size=1", "data.in_memory=always"
    )
    n = m.split("train").num_examples
    drawn = [
        (int(b["case_index"][0]), int(b["slice_index"][0])) for b in pipeline.build_dataset(cfg, "train").take(2 * n)
    ]
    every = sorted((c.index, s) for c in m.cases_in("train") for s in range(c.num_slices))
    assert sorted(drawn[:n]) == every and sorted(drawn[n:]) == every and drawn[:n] != drawn[n:]
    again = [(int(b["case_index"][0]), int(b["slice_index"][0])) for b in pipeline.build_dataset(cfg, "train").take(n)]
    assert again == drawn[:n]
    shards, (h, w) = m.shards("train"), m.split("train").slice_shape
    auto = config.replace(cfg, **{"data.in_memory": "auto"})
    assert plan.in_memory(auto, shards, h, w) and not plan.in_memory(auto, shards, h, w, on_service=True)
    assert not plan.in_memory(config.replace(cfg, **{"data.in_memory": "never"}), shards, h, w)


def test_in_memory_always_is_refused_where_the_shards_would_not_fit(dataset, tmp_path, monkeypatch):
    """data.in_memory=always is sized as auto is: refused, naming the sizes, before the trainer
    reads a shard (not a ResourceExhaustedError traceback)."""
    from liverseg import LiversegError, train

    m = Manifest.load(dataset)
    (h, w), n = m.split("train").slice_shape, m.split("train").num_examples
    monkeypatch.setattr(plan, "available_memory", lambda: float(n * (3 * h * w + 64)))  # less than 4/3 of them
    cfg = cfg_for(dataset, "data.in_memory=always", "train.steps=1", "data.shuffle_buffer=1", "data.batch_size=1")
    with pytest.raises(
        LiversegError,
        match=r"data.in_memory=always: the training shards take .* GB in memory, more "
        r"than 75% of the .* GB available; use data.in_memory=never",
    ):
        train.Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_file_sharding_gives_each_pipeline_its_own_shards(dataset):
    cases = []
    for pipe in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipe, num_replicas_in_sync=2)
        ds = pipeline.build_dataset(cfg_for(dataset, "augment.placement=none"), "train", ctx)
        assert ds.element_spec["image"].shape[0] == 2  # per-replica batch of the global 4
        cases.append({int(c) for b in ds.take(20) for c in b["case_index"]})
    assert cases[0] and cases[1] and not cases[0] & cases[1]


def test_deterministic_mode_is_bit_identical(dataset):
    cfg = cfg_for(dataset, "deterministic=true", "data.context=1")
    assert cfg.augment.placement == "host"
    runs = [[b["image"].numpy() for b in pipeline.build_dataset(cfg, "train").take(6)] for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    other = [b["image"].numpy() for b in pipeline.build_dataset(config.replace(cfg, seed=1), "train").take(6)]
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], other))


def test_device_placement_ships_raw_int16(dataset):
    ds = pipeline.build_dataset(cfg_for(dataset, "augment.placement=device"), "train")
    assert ds.element_spec["image"].dtype == tf.int16 and ds.element_spec["mask"].dtype == tf.uint8


def test_iterator_checkpoint_resumes_on_the_exact_next_batch(dataset, tmp_path):
    cfg = cfg_for(dataset, "deterministic=true")
    it = iter(pipeline.build_dataset(cfg, "train"))
    for _ in range(3):
        next(it)
    ckpt = tf.train.Checkpoint(iterator=it)
    path = ckpt.write(str(tmp_path / "it"))
    expected = [next(it)["image"].numpy() for _ in range(3)]
    fresh = iter(pipeline.build_dataset(cfg, "train"))
    tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
    for e in expected:
        np.testing.assert_array_equal(next(fresh)["image"].numpy(), e)


@pytest.mark.slow
@pytest.mark.parametrize("placement, memory", [("host", "always"), ("host", "never"), ("device", "never")])
def test_resumed_three_times_reads_exactly_like_one_pass(dataset, tmp_path, placement, memory):
    """An iterator restored from a checkpoint that a restored iterator wrote (and so on) still
    yields the uninterrupted sequence: a run can be resumed any number of times, shards held in
    memory or streamed. (TF 2.21's `enumerate`, a zip over a shuffle, failed the second
    restore: "Expected 4 components but got 0".)"""
    cfg = cfg_for(
        dataset,
        "deterministic=true",
        f"augment.placement={placement}",
        "data.shuffle_buffer=64",
        "data.cycle_length=2",
        f"data.in_memory={memory}",
    )
    ref = iter(pipeline.build_dataset(cfg, "train"))
    expected = [next(ref) for _ in range(16)]  # several passes over the 4 training shards
    it, got, path = iter(pipeline.build_dataset(cfg, "train")), [], None
    for visit in range(4):
        if path is not None:  # a fresh iterator, as a resumed run builds it
            it = iter(pipeline.build_dataset(cfg, "train"))
            tf.train.Checkpoint(iterator=it).read(path).assert_consumed()
        got += [next(it) for _ in range(4)]
        path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / f"it{visit}"))
    for e, g in zip(expected, got, strict=True):
        for key in ("image", "mask", "case_index", "slice_index"):
            np.testing.assert_array_equal(g[key].numpy(), e[key].numpy(), err_msg=key)


def test_zscore_normalisation_uses_the_training_livers_statistics(dataset):
    """Against every liver voxel of the training cases, read back from the records (the
    manifest's figures come from a strided subsample of them)."""
    m, vols = _volumes(dataset)
    hu = np.concatenate([vols[c.index][0][vols[c.index][1] > 0] for c in m.cases_in("train")]).astype(np.float64)
    norm = plan.normalization(cfg_for(dataset, "data.normalize=zscore"), m)
    assert norm.shift == pytest.approx(hu.mean(), abs=0.1 * hu.std())
    assert norm.scale == pytest.approx(hu.std(), rel=0.1)
    # the split's percentiles are the voxel-weighted mean of its cases' percentiles (the manifest
    # says so): between the smallest and the largest of the cases' own
    per_case = [vols[c.index][0][vols[c.index][1] > 0] for c in m.cases_in("train")]
    for value, q in ((norm.lo, 0.5), (norm.hi, 99.5)):
        own = [np.percentile(v, q) for v in per_case]
        assert min(own) - 0.1 * hu.std() <= value <= max(own) + 0.1 * hu.std(), (q, value, own)
    out = pipeline.normalize(tf.constant([norm.shift, norm.shift + norm.scale, -5000.0]), norm).numpy()
    np.testing.assert_allclose(out, [0.0, 1.0, (norm.lo - norm.shift) / norm.scale], rtol=1e-5, atol=1e-6)


def test_bad_records_folder_fails_before_training(dataset, tmp_path):
    with pytest.raises(RecordsError, match="no records folder"):
        pipeline.build_dataset(config.load(None), "train")
    with pytest.raises(RecordsError, match="no dataset.json"):
        pipeline.build_dataset(cfg_for(tmp_path), "train")
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    with pytest.raises(RecordsError, match="no split 'nope'"):
        pipeline.build_dataset(cfg_for(ds), "nope")
    data = json.loads((ds / "dataset.json").read_text())
    data["schema_version"] = 0
    (ds / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(RecordsError, match="schema version 0"):
        pipeline.build_dataset(cfg_for(ds), "train")
    data["schema_version"] = records.SCHEMA_VERSION
    (ds / "dataset.json").write_text(json.dumps(data))
    next(iter(sorted(ds.glob("train-*")))).unlink()
    with pytest.raises(RecordsError, match="is missing"):
        pipeline.build_dataset(cfg_for(ds), "train")


def test_corrupt_record_is_reported_with_its_shard(dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    shard = sorted(ds.glob("val-*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: passes the manifest's size check, fails the CRC
    shard.write_bytes(bytes(data))
    cfg = cfg_for(ds)
    with pytest.raises(RecordsError, match=rf"corrupt record: {shard}: record \d+ at byte \d+: data CRC mismatch"):
        with pipeline.named_data_errors(cfg, "val"):
            for _ in pipeline.build_dataset(cfg, "val"):
                pass


def test_zscore_on_constant_liver_hu_and_buffers_past_the_memory_are_refused(dataset):
    import dataclasses

    m = Manifest.load(dataset)
    split = m.split("train")
    flat = dataclasses.replace(
        split, hu=dataclasses.replace(split.hu, liver=dataclasses.replace(split.hu.liver, std=0.0))
    )
    constant = dataclasses.replace(m, splits={**m.splits, "train": flat})
    with pytest.raises(RecordsError, match=r"standard deviation of 0 \(nearly constant\).*use data.normalize=window"):
        plan.normalization(cfg_for(dataset, "data.normalize=zscore"), constant)
    cfg = cfg_for(dataset, "data.shuffle_buffer=100000")  # 100000 x 32x32 x 3 bytes: 307 MB
    plan.check_memory(cfg, m, 1e9)
    with pytest.raises(
        RecordsError,
        match=r"data.shuffle_buffer=100000: .* more than half of the 0.5 GB available; "
        r"choose at most 81380",
    ):
        plan.check_memory(cfg, m, 0.5e9)


@pytest.fixture(scope="module")
def mixed(phantoms, tmp_path_factory) -> Path:
    """The phantoms as a case list: two cases tagged "real", four "phantom"; train only."""
    from liverseg.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("mixed")
    cases = sorted(p.name.removesuffix("_orig.nii.gz") for p in phantoms.glob("*_orig.nii.gz"))
    rows = [
        f"{c},{phantoms / f'{c}_orig.nii.gz'},{phantoms / f'{c}_liver.nii.gz'},train,{'real' if i < 2 else 'phantom'}"
        for i, c in enumerate(cases)
    ]
    (root / "cases.csv").write_text("case,image,mask,split,source\n" + "\n".join(rows) + "\n")
    convert(root / "cases.csv", root / "ds", ConvertOptions(layout="list", shard_mb=0.04), progress=False)
    return root / "ds"


def _real_share(cfg, batches=150):
    m = Manifest.load(cfg.data.records)
    real = {c.index for c in m.cases if c.source == "real"}
    it = iter(pipeline.build_dataset(cfg, "train"))
    drawn = np.concatenate([next(it)["case_index"].numpy() for _ in range(batches)])
    return np.isin(drawn, list(real)).mean(), sum(c.num_slices for c in m.cases if c.index in real) / sum(
        c.num_slices for c in m.cases
    )


@pytest.mark.parametrize("memory", ["always", "never"])
def test_source_weights_set_each_sources_share_whatever_its_slices(mixed, memory):
    base = [
        f"data.records={mixed}",
        "data.batch_size=4",
        "augment.placement=none",
        "data.foreground_fraction=0",
        f"data.in_memory={memory}",
    ]
    plain, by_slices = _real_share(config.load(None, base))
    assert plain == pytest.approx(by_slices, abs=0.1)  # without weights: as the slices come (~1/3 real)
    for w in (0.5, 0.8):
        share, _ = _real_share(config.load(None, [*base, f"data.source_weights={{real: {w}, phantom: {1 - w}}}"]))
        assert share == pytest.approx(w, abs=4 * np.sqrt(w * (1 - w) / 600))  # 600 slices drawn: 4 sigma


@pytest.mark.slow
def test_source_weights_keep_exact_resume(mixed, tmp_path):
    cfg = config.load(
        None,
        [
            f"data.records={mixed}",
            "data.batch_size=4",
            "deterministic=true",
            "data.source_weights={real: 0.7, phantom: 0.3}",
            "data.shuffle_buffer=64",
        ],
    )
    expected = [next(it)["image"].numpy() for it in [iter(pipeline.build_dataset(cfg, "train"))] for _ in range(12)]
    it, got, path = iter(pipeline.build_dataset(cfg, "train")), [], None
    for visit in range(3):
        if path is not None:
            it = iter(pipeline.build_dataset(cfg, "train"))
            tf.train.Checkpoint(iterator=it).read(path).assert_consumed()
        got += [next(it)["image"].numpy() for _ in range(4)]
        path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / f"it{visit}"))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


def test_weights_for_a_source_no_case_has_are_refused(mixed):
    with pytest.raises(
        RecordsError,
        match=r"data.source_weights: no train case has source ct; train cases of source "
        r"phantom have no weight \(the train split's sources: phantom, real",
    ):
        pipeline.build_dataset(
            config.load(None, [f"data.records={mixed}", "data.source_weights={real: 1, ct: 1}"]), "train"
        )
