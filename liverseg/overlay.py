"""PNG overlays of CT slices with mask contours (for `inspect` and `evaluate`).

Inputs are stored-geometry arrays (`geometry`): a stored axial slice is already in
display orientation; the coronal view comes from `geometry.coronal` (superior at the top,
square pixels). PNGs are encoded here with zlib, so no imaging library is needed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from liverseg import geometry
from liverseg.files import atomic_path

GREEN = (0, 220, 0)  # ground truth
RED = (255, 40, 40)  # prediction


def window(hu: np.ndarray, lo: float = -200.0, hi: float = 250.0) -> np.ndarray:
    """HU -> uint8 grey, liver window by default."""
    return (np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D binary mask (4-neighbourhood)."""
    m = mask.astype(bool)
    p = np.pad(m, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def draw(grey: np.ndarray, masks: list[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    """uint8 grey [H, W] + [(mask, colour)] -> RGB [H, W, 3] with each mask's contour drawn."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for m, colour in masks:
        rgb[contour(m)] = colour
    return rgb


def case_panel(ct: np.ndarray, spacing, truth: np.ndarray | None = None, pred: np.ndarray | None = None) -> np.ndarray:
    """Axial (slice with most liver) beside coronal (row through the liver's centre), RGB."""
    ref = truth if truth is not None and truth.any() else pred
    if ref is not None and ref.any():
        z = int(np.argmax(ref.sum(axis=(1, 2))))
        row = int(np.round(np.nonzero(ref)[1].mean()))
    else:
        z, row = ct.shape[0] // 2, ct.shape[1] // 2
    layers = [(m, c) for m, c in ((truth, GREEN), (pred, RED)) if m is not None]
    ax = draw(window(ct[z]), [(m[z], c) for m, c in layers])
    co = draw(window(geometry.coronal(ct, row, spacing)), [(geometry.coronal(m, row, spacing), c) for m, c in layers])
    h = max(ax.shape[0], co.shape[0])
    pad = lambda im: np.pad(im, ((0, h - im.shape[0]), (0, 4), (0, 0)))  # noqa: E731
    return np.concatenate([pad(ax), pad(co)], axis=1)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Minimal PNG writer: 8-bit RGB (or grey [H, W]), atomic."""
    img = np.ascontiguousarray(rgb, dtype=np.uint8)
    colour = 2 if img.ndim == 3 else 0
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
