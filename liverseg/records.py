"""The record schema and TFRecord framing: writer and reader both import this.

One `tf.train.Example` per axial slice (stored geometry, see `geometry`). Encoding is done
here in pure Python (the converter never imports TensorFlow) with map keys in sorted
order, so the same slice always serialises to the same bytes. Decoding uses TensorFlow's
`parse_example`; `tests/test_records.py` checks the two against each other.

A shard is a TFRecord file (`{split}-{i:05d}-of-{n:05d}.tfrecord`, optionally GZIP/ZLIB
compressed) holding whole cases: a case never spans shards, and its slices are
contiguous and in order (slice 0 = most inferior). That lets the pipeline rebuild 2.5D
context at read time without storing any slice twice. The manifest (`dataset.json`) that
lists shards and cases is owned by `liverseg.manifest`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from liverseg import LiversegError, storage

SCHEMA_VERSION = 1

# Feature keys. Byte layouts are little-endian, row-major [height, width].
IMAGE = "image"  # bytes: int16 Hounsfield units, clipped to [-1024, 3071]
MASK = "mask"  # bytes: uint8 liver mask in {0, 1}
HEIGHT = "height"  # int64
WIDTH = "width"  # int64
CASE_ID = "case_id"  # bytes: utf-8 case identifier
CASE_INDEX = "case_index"  # int64: position of the case in the manifest's "cases" list
SLICE_INDEX = "slice_index"  # int64: 0 = most inferior slice of the case
NUM_SLICES = "num_slices"  # int64: slices in the case
LIVER_VOXELS = "liver_voxels"  # int64: liver voxels in this slice (foreground sampling)
SPACING = "spacing"  # float[3]: (slice, row, column) spacing in mm

KEY_DOC = {
    IMAGE: "bytes, int16 little-endian [height, width], Hounsfield units clipped to [-1024, 3071]",
    MASK: "bytes, uint8 [height, width], liver = 1",
    HEIGHT: "int64",
    WIDTH: "int64",
    CASE_ID: "bytes, utf-8",
    CASE_INDEX: "int64, index into the manifest's cases",
    SLICE_INDEX: "int64, 0 = most inferior slice",
    NUM_SLICES: "int64, slices in the case",
    LIVER_VOXELS: "int64, liver voxels in the slice",
    SPACING: "float[3], (slice, row, column) mm",
}
COMPRESSIONS = ("", "GZIP", "ZLIB")
SPLITS = ("train", "val", "test")  # shards are named {split}-{i:05d}-of-{n:05d}.tfrecord


class RecordsError(LiversegError):
    pass


# ------------------------------------------------------------------------- encoding

# Protobuf wire format for tf.train.Example: Example{1: Features{1: map<string, Feature>}},
# Feature{1: BytesList, 2: FloatList, 3: Int64List}, each list {1: repeated value}.
# Parts are collected in lists and joined once, so a 512x512 slice is copied once.


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(tag: int, parts: list) -> list:
    """A length-delimited field: tag byte, varint length, payload parts."""
    return [bytes((tag,)) + _varint(sum(len(p) for p in parts)), *parts]


def _bytes_feature(value: bytes) -> list:
    return _ld(0x0A, _ld(0x0A, [value]))


def _float_feature(values) -> list:
    return _ld(0x12, _ld(0x0A, [struct.pack(f"<{len(values)}f", *values)]))


def _int64_feature(value: int) -> list:
    return _ld(0x1A, _ld(0x0A, [_varint(int(value))]))


def encode_example(
    image: bytes,
    mask: bytes,
    height: int,
    width: int,
    case_id: str,
    case_index: int,
    slice_index: int,
    num_slices: int,
    liver_voxels: int,
    spacing,
) -> bytes:
    """Serialised tf.train.Example for one slice. image/mask are the raw bytes described above."""
    return b"".join(
        encode_parts(image, mask, height, width, case_id, case_index, slice_index, num_slices, liver_voxels, spacing)
    )


def _byte_view(x) -> np.ndarray:
    """Read-only flat uint8 view of a contiguous buffer (what crc32c, hashlib and files all accept)."""
    a = np.ascontiguousarray(x).reshape(-1).view(np.uint8) if isinstance(x, np.ndarray) else np.frombuffer(x, np.uint8)
    a.flags.writeable = False
    return a


def encode_parts(
    image,
    mask,
    height: int,
    width: int,
    case_id: str,
    case_index: int,
    slice_index: int,
    num_slices: int,
    liver_voxels: int,
    spacing,
) -> list:
    """`encode_example` as a list of buffers whose concatenation is the example.

    image/mask may be any contiguous buffers (e.g. a numpy slice's memoryview): the shard
    writer checksums and writes the parts directly, so voxel bytes are never copied.
    """
    image, mask = _byte_view(image), _byte_view(mask)
    if len(image) != 2 * height * width or len(mask) != height * width:
        raise ValueError(f"slice bytes do not match {height}x{width}")
    features = {
        IMAGE: _bytes_feature(image),
        MASK: _bytes_feature(mask),
        HEIGHT: _int64_feature(height),
        WIDTH: _int64_feature(width),
        CASE_ID: _bytes_feature(case_id.encode()),
        CASE_INDEX: _int64_feature(case_index),
        SLICE_INDEX: _int64_feature(slice_index),
        NUM_SLICES: _int64_feature(num_slices),
        LIVER_VOXELS: _int64_feature(liver_voxels),
        SPACING: _float_feature(spacing),
    }
    entries: list = []
    for key in sorted(features):
        entries += _ld(0x0A, _ld(0x0A, [key.encode()]) + _ld(0x12, features[key]))
    return _ld(0x0A, entries)


# ------------------------------------------------------------------------- decoding without TF


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """(field number, wire type, value) of a protobuf message: an int for varints, a
    memoryview for length-delimited and fixed-size fields."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire in (1, 2, 5):
            if wire == 2:
                n, i = _read_varint(buf, i)
            else:
                n = 8 if wire == 1 else 4
            if i + n > len(buf):
                raise ValueError(f"field {number} runs past the end of its message")
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _feature_value(buf: memoryview):
    """A tf.train.Feature: bytes, a list of floats or a list of int64 (packed or not)."""
    for kind, _, lst in _fields(buf):
        values = []
        for _, wire, v in _fields(lst):
            if kind == 1:
                values.append(bytes(v))
            elif kind == 2:
                values += list(struct.unpack(f"<{len(v) // 4}f", v)) if wire == 2 else [struct.unpack("<f", v)[0]]
            elif kind == 3:
                if wire == 2:  # packed varints
                    j = 0
                    while j < len(v):
                        x, j = _read_varint(v, j)
                        values.append(x - (1 << 64) if x >= 1 << 63 else x)
                else:
                    values.append(v - (1 << 64) if v >= 1 << 63 else v)
        return values
    return []


def parse_example(raw: bytes) -> dict[str, list]:
    """A serialised tf.train.Example -> {feature name: list of values}, in plain Python
    (the mirror of `encode_example`, for `verify` without TensorFlow). ValueError if it is
    not one."""
    out: dict[str, list] = {}
    for number, wire, features in _fields(memoryview(raw)):
        if number != 1 or wire != 2:
            raise ValueError(f"not a tf.train.Example (field {number})")
        for _, _, entry in _fields(features):
            key, value = None, None
            for n, _, v in _fields(entry):
                if n == 1:
                    key = bytes(v).decode()
                elif n == 2:
                    value = _feature_value(v)
            if key is None:
                raise ValueError("a feature without its name")
            out[key] = value or []
    return out


# ------------------------------------------------------------------------- decoding (TF)


def feature_spec() -> dict:
    import tensorflow as tf

    return {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        MASK: tf.io.FixedLenFeature([], tf.string),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        CASE_ID: tf.io.FixedLenFeature([], tf.string),
        CASE_INDEX: tf.io.FixedLenFeature([], tf.int64),
        SLICE_INDEX: tf.io.FixedLenFeature([], tf.int64),
        NUM_SLICES: tf.io.FixedLenFeature([], tf.int64),
        LIVER_VOXELS: tf.io.FixedLenFeature([], tf.int64),
        SPACING: tf.io.FixedLenFeature([3], tf.float32),
    }


def decode_example(serialized, height: int | None = None, width: int | None = None) -> dict:
    """Vectorised decode of a batch of serialised examples (all of one slice size).

    Returns image int16 [N, H, W], mask uint8 [N, H, W] and the scalar features [N].
    Pass height/width when known statically (the manifest has them) so shapes are static.
    """
    import tensorflow as tf

    ex = tf.io.parse_example(serialized, feature_spec())
    h = height if height is not None else ex[HEIGHT][0]
    w = width if width is not None else ex[WIDTH][0]
    ex[IMAGE] = tf.reshape(tf.io.decode_raw(ex[IMAGE], tf.int16, little_endian=True), [-1, h, w])
    ex[MASK] = tf.reshape(tf.io.decode_raw(ex[MASK], tf.uint8), [-1, h, w])
    return ex


# ------------------------------------------------------------------------- framing


def _masked_crc(*chunks: bytes) -> int:
    crc = 0
    for c in chunks:
        crc = google_crc32c.extend(crc, c)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _HashingFile:
    """File wrapper that hashes and counts what is written (the shard's sha256 and bytes)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.bytes += len(b)
        return len(b)

    def flush(self) -> None:
        self.f.flush()


class ShardWriter:
    """Writes a TFRecord file; `close()` returns (num_examples, bytes, sha256) of the file.

    Output is a pure function of the records written (gzip mtime 0, no file name), so a
    re-run with the same inputs produces byte-identical shards.
    """

    def __init__(self, path: Path, compression: str = ""):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}: choose one of {COMPRESSIONS}")
        self._raw = storage.open_file(storage.path(path), "wb")
        self._hashed = _HashingFile(self._raw)
        self._zlib = zlib.compressobj(6) if compression == "ZLIB" else None
        self._gzip = (
            gzip.GzipFile(fileobj=self._hashed, mode="wb", mtime=0, filename="") if compression == "GZIP" else None
        )
        self.num_examples = 0

    def _out(self, b: bytes) -> None:
        if self._gzip is not None:
            self._gzip.write(b)
        elif self._zlib is not None:
            self._hashed.write(self._zlib.compress(b))
        else:
            self._hashed.write(b)

    def write(self, record) -> None:
        """Append one record: bytes, or a list of buffers forming it (see encode_parts)."""
        parts = record if isinstance(record, list) else [record]
        header = struct.pack("<Q", sum(len(p) for p in parts))
        self._out(header + struct.pack("<I", _masked_crc(header)))
        for p in parts:
            self._out(p)
        self._out(struct.pack("<I", _masked_crc(*parts)))
        self.num_examples += 1

    def append_framed(self, data, count: int) -> None:
        """Append `count` records already framed (the bytes of an uncompressed TFRecord file):
        the result is what writing them one by one would give."""
        self._out(data)
        self.num_examples += count

    def close(self) -> tuple[int, int, str]:
        if self._gzip is not None:
            self._gzip.close()
        elif self._zlib is not None:
            self._hashed.write(self._zlib.flush())
        self._raw.close()
        return self.num_examples, self._hashed.bytes, self._hashed.sha.hexdigest()

    def abort(self) -> None:
        """Close without caring what is lost (the file is deleted next): flushing the buffer
        may fail again, e.g. on the full disk that made us abort."""
        try:
            self._raw.close()
        except (OSError, LiversegError):  # a full disk, a bucket that stopped answering
            pass


@dataclass
class FramingError(Exception):
    index: int
    offset: int
    reason: str


def iter_records(
    path: Path, compression: str = "", start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """Yield (record index, byte offset, record) of records [start, stop) (default: all),
    checking both CRCs of every record yielded.

    Offsets are in the uncompressed stream. An uncompressed shard is read record by record:
    the records before `start` are skipped by their headers (length and its CRC checked, the
    data not read), and reading ends at `stop`; a compressed one is decompressed whole.
    Raises FramingError at the first bad record."""
    if compression:
        data = storage.path(path).read_bytes()
        data = gzip.decompress(data) if compression == "GZIP" else zlib.decompress(data)
        f, n = io.BytesIO(data), len(data)
    else:
        f = storage.open_file(storage.path(path), "rb")
        n = storage.size(path)
    with f:
        pos, index = 0, 0
        while pos < n and (stop is None or index < stop):
            header = f.read(12)
            if len(header) < 12:
                raise FramingError(index, pos, f"truncated header ({len(header)} of 12 bytes)")
            (length,) = struct.unpack("<Q", header[:8])
            (crc,) = struct.unpack("<I", header[8:])
            if crc != _masked_crc(header[:8]):
                raise FramingError(index, pos, "length CRC mismatch (corrupt header)")
            end = pos + 12 + length
            if end + 4 > n:
                raise FramingError(index, pos, f"truncated record (needs {length + 16} bytes, {n - pos} left)")
            if index < start:
                f.seek(length + 4, io.SEEK_CUR)
            else:
                record = f.read(length)
                (crc,) = struct.unpack("<I", f.read(4))
                if crc != _masked_crc(record):
                    raise FramingError(index, pos, "data CRC mismatch (corrupt record)")
                yield index, pos, record
            pos, index = end + 4, index + 1


def find_corruption(paths: list[Path], compression: str = "") -> str | None:
    """First bad record among `paths` as 'file: record i at byte b: reason', or None."""
    for p in paths:
        try:
            for _ in iter_records(p, compression):
                pass
        except FramingError as e:
            return f"{p}: record {e.index} at byte {e.offset}: {e.reason}"
        except (OSError, EOFError, zlib.error) as e:
            return f"{p}: {e}"
    return None


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


# ------------------------------------------------------------------------- reading a case


@dataclass(frozen=True)
class CaseRecords:
    """Where one case's records are: `count` consecutive records from record `first` of
    `shard` (cases are contiguous in their shard). `Manifest.records_of` locates them;
    `dataset` (the folder) is named in error messages."""

    case_id: str
    shard: Path
    first: int
    count: int
    compression: str
    dataset: Path


def read_case(where: CaseRecords) -> tuple[np.ndarray, np.ndarray]:
    """Stored image [Z, H, W] int16 and mask [Z, H, W] uint8 of one case, from its shard.

    Only the case's own records are read and decoded (those before it are skipped by their
    headers). For many cases, `read_cases` reads each shard once."""
    return next(read_cases([where]))[1:]


def read_cases(wheres: list[CaseRecords]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(case id, stored image, stored mask) of each case, in the order given, reading each run
    of cases that share a shard in one pass (cost linear in the records read, whatever the
    number of cases per shard)."""
    i = 0
    while i < len(wheres):
        j = i + 1
        while j < len(wheres) and wheres[j].shard == wheres[i].shard and wheres[j].first >= wheres[j - 1].first:
            j += 1
        group = wheres[i:j]
        start, stop = group[0].first, max(w.first + w.count for w in group)
        raws: dict[int, bytes] = {}
        try:
            for index, _, r in iter_records(group[0].shard, group[0].compression, start, stop):
                raws[index] = r
        except FramingError as e:
            raise RecordsError(
                f"corrupt record: {group[0].shard}: record {e.index} at byte {e.offset}: {e.reason}; "
                f"run liverseg verify {group[0].dataset}"
            ) from None
        except (OSError, EOFError, zlib.error) as e:
            raise RecordsError(
                f"{group[0].shard}: unreadable shard ({e}); run liverseg verify {group[0].dataset}"
            ) from None
        for where in group:
            yield (
                where.case_id,
                *_decode_case(where, [raws[k] for k in range(where.first, where.first + where.count) if k in raws]),
            )
        i = j


def _decode_case(where: CaseRecords, raw: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    first, last = where.first, where.first + where.count
    if len(raw) != where.count:
        raise RecordsError(
            f"{where.shard}: records {first}-{last - 1} are not all {where.case_id}; "
            f"run liverseg verify {where.dataset}"
        )
    ex = decode_example(tf.constant(raw))
    if not bool(tf.reduce_all(ex[CASE_ID] == where.case_id.encode())):
        raise RecordsError(
            f"{where.shard}: records {first}-{last - 1} are not all {where.case_id}; "
            f"run liverseg verify {where.dataset}"
        )
    held = ex[NUM_SLICES].numpy()
    if not (np.all(held == where.count) and np.array_equal(ex[SLICE_INDEX].numpy(), np.arange(where.count))):
        raise RecordsError(
            f"{where.shard}: case {where.case_id} has {int(held[0])} slices in its records, but the manifest's "
            f"cases file says {where.count}; the cases file was edited or belongs to another dataset: run "
            f"liverseg verify {where.dataset}"
        )
    return ex[IMAGE].numpy(), ex[MASK].numpy()
