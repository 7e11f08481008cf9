"""The record schema: hand-encoded examples vs TensorFlow's protobuf, framing, manifest checks."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from liverseg import records
from liverseg.manifest import Manifest
from liverseg.records import FramingError, RecordsError


def _slice(h=5, w=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 3071, (h, w)).astype("<i2"), (rng.random((h, w)) > 0.5).astype(np.uint8)


def _encode(img, mask, **kw):
    args = dict(
        height=img.shape[0],
        width=img.shape[1],
        case_id="case_é1",
        case_index=3,
        slice_index=2,
        num_slices=40,
        liver_voxels=int(mask.sum()),
        spacing=(2.5, 0.7, 0.71),
    )
    args.update(kw)
    return records.encode_example(img.tobytes(), mask.tobytes(), **args)


def test_hand_encoding_matches_tensorflow_protobuf():
    img, mask = _slice()
    ours = _encode(img, mask, case_index=300, liver_voxels=2**40)
    ref = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()])),
                "mask": tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask.tobytes()])),
                "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[5])),
                "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
                "case_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=["case_é1".encode()])),
                "case_index": tf.train.Feature(int64_list=tf.train.Int64List(value=[300])),
                "slice_index": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
                "num_slices": tf.train.Feature(int64_list=tf.train.Int64List(value=[40])),
                "liver_voxels": tf.train.Feature(int64_list=tf.train.Int64List(value=[2**40])),
                "spacing": tf.train.Feature(float_list=tf.train.FloatList(value=[2.5, 0.7, 0.71])),
            }
        )
    )
    assert tf.train.Example.FromString(ours) == ref
    assert _encode(img, mask, case_index=300, liver_voxels=2**40) == ours  # deterministic bytes


def test_the_tf_free_parser_reads_ours_and_tensorflows_serialisation_alike():
    img, mask = _slice()
    ours = _encode(img, mask, case_index=300, liver_voxels=2**40)
    theirs = tf.train.Example.FromString(ours)
    theirs.features.feature["case_index"].int64_list.value[:] = [-3, 300]  # packed by protobuf, negative too
    for raw, case_index in ((ours, [300]), (theirs.SerializeToString(), [-3, 300])):
        ex = records.parse_example(raw)
        assert ex["image"] == [img.tobytes()] and ex["mask"] == [mask.tobytes()]
        assert (ex["height"], ex["width"], ex["case_id"], ex["case_index"]) == (
            [5],
            [7],
            ["case_é1".encode()],
            case_index,
        )
        assert ex["liver_voxels"] == [2**40] and np.allclose(ex["spacing"], [2.5, 0.7, 0.71])
    with pytest.raises(ValueError, match="runs past the end"):
        records.parse_example(ours[:-3])


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**35, -1])
def test_varint(n):
    ex = tf.train.Example.FromString(_encode(*_slice(), slice_index=n))
    assert ex.features.feature["slice_index"].int64_list.value[0] == n


def test_decode_round_trip_batch_and_inside_dataset_map():
    slices = [_slice(seed=i) for i in range(4)]
    serialized = [_encode(im, m, slice_index=i) for i, (im, m) in enumerate(slices)]
    eager = records.decode_example(tf.constant(serialized), 5, 7)
    mapped = next(
        iter(tf.data.Dataset.from_tensor_slices(serialized).batch(4).map(lambda s: records.decode_example(s, 5, 7)))
    )
    for ex in (eager, mapped):
        assert ex["image"].dtype == tf.int16 and ex["image"].shape == (4, 5, 7)
        for i, (im, m) in enumerate(slices):
            assert np.array_equal(ex["image"][i].numpy(), im) and np.array_equal(ex["mask"][i].numpy(), m)
        assert ex["slice_index"].numpy().tolist() == [0, 1, 2, 3]
        assert ex["case_id"][0].numpy().decode() == "case_é1"
        assert np.allclose(ex["spacing"][0].numpy(), [2.5, 0.7, 0.71])


@pytest.mark.parametrize("compression", ["", "GZIP", "ZLIB"])
def test_shard_writer_is_read_by_tensorflow(tmp_path, compression):
    path = tmp_path / "s.tfrecord"
    payloads = [_encode(*_slice(seed=i)) for i in range(5)]
    w = records.ShardWriter(path, compression)
    for p in payloads:
        w.write(p)
    n, nbytes, sha = w.close()
    assert n == 5 and nbytes == path.stat().st_size and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    got = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type=compression)]
    assert got == payloads
    assert [r for _, _, r in records.iter_records(path, compression)] == payloads


def test_framing_errors_name_record_and_offset(tmp_path):
    path = tmp_path / "s.tfrecord"
    w = records.ShardWriter(path)
    sizes = []
    for i in range(3):
        p = _encode(*_slice(seed=i))
        w.write(p)
        sizes.append(len(p) + 16)
    w.close()
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[sizes[0] + 40] ^= 0x01  # inside record 1's payload
    (tmp_path / "flip.tfrecord").write_bytes(bytes(flipped))
    with pytest.raises(FramingError) as e:
        list(records.iter_records(tmp_path / "flip.tfrecord"))
    assert (e.value.index, e.value.offset) == (1, sizes[0]) and "data CRC" in e.value.reason
    (tmp_path / "cut.tfrecord").write_bytes(bytes(data[:-10]))
    with pytest.raises(FramingError) as e:
        list(records.iter_records(tmp_path / "cut.tfrecord"))
    assert e.value.index == 2 and "truncated" in e.value.reason
    msg = records.find_corruption([path, tmp_path / "flip.tfrecord"])
    assert msg.startswith(str(tmp_path / "flip.tfrecord")) and "record 1 at byte" in msg


def test_manifest_load_errors(dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    m = Manifest.load(ds)
    assert list(m.splits) == ["train", "val", "test"] and m.compression == ""
    with pytest.raises(RecordsError, match="no dataset.json"):
        Manifest.load(tmp_path / "nowhere")
    data = json.loads((ds / "dataset.json").read_text())
    data["schema_version"] = 99
    (ds / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(RecordsError, match="schema version 99 cannot be read"):
        Manifest.load(ds)
    data["schema_version"] = records.SCHEMA_VERSION
    (ds / "dataset.json").write_text(json.dumps(data))
    shard = m.shard_paths("train")[0]
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(RecordsError, match="truncated or was replaced"):
        Manifest.load(ds)
    shard.unlink()
    with pytest.raises(RecordsError, match=f"{shard.name}: shard listed in .* is missing"):
        Manifest.load(ds)
