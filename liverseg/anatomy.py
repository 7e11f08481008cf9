"""The phantom's anatomy, rendered in canonical RAS millimetres (+x patient right, +y
anterior, +z superior): air, a body outline with subcutaneous fat and a muscle wall,
paraspinal muscles, spine with discs and posterior elements, ribs, aorta and IVC, kidneys,
a fluid/air stomach, bowel gas, a spleen with liver-like HU on the other side, a
gallbladder and the IVC carved out of the liver, and inside the liver enhancing vessels
and hypodense lesions (both part of the liver mask). Above the liver the chest: the
diaphragm over two hemidomes (the right one on the liver's top, so the dome borders it as in
real CT), the lungs with their vessels reaching down behind and beside the liver, and the
heart with its pericardial fat resting on the diaphragm, in HU measured on the real scans.
Partial-volume blur and Gaussian noise come last. `synth` turns renderings into cases and files.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from liverseg import LiversegError

SLAB = 16  # slices rendered at once (bounds memory at 512x512)


def _draw_anatomy(rng: np.random.Generator, fov_x: float, fov_y: float, coverage: float, liver_box=None) -> dict:
    """All per-case random choices, in mm and HU. liver_box: (lo, hi) xyz mm of a real liver."""
    a = fov_x * rng.uniform(0.38, 0.44)  # body semi-axis, lateral
    b = a * rng.uniform(0.68, 0.8)  # body semi-axis, antero-posterior
    yc = -0.05 * fov_y
    if liver_box is not None:  # make sure the real liver sits inside the abdominal wall
        lo, hi = liver_box
        a = max(a, max(abs(lo[0]), abs(hi[0])) / 0.8)
        b = max(b, max(abs(lo[1] - yc), abs(hi[1] - yc)) / 0.8)
        a, b = min(a, 0.49 * fov_x), min(b, 0.49 * fov_y)
    height = min(rng.uniform(140, 180), 0.8 * coverage)
    if liver_box is not None:
        lz = (liver_box[0][2] + liver_box[1][2]) / 2
        height = liver_box[1][2] - liver_box[0][2]
    else:
        lz = coverage * rng.uniform(0.5, 0.6)
    liver = rng.uniform(55, 115)
    return {
        "a": a,
        "b": b,
        "yc": yc,
        "wobble": [(k, rng.uniform(0.01, 0.035), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4)],
        "fat_t": rng.uniform(0.05, 0.12),
        "muscle_t": rng.uniform(0.04, 0.07),
        "lz": lz,
        "lh": height,
        "right": (
            a * rng.uniform(0.36, 0.46),
            b * rng.uniform(-0.05, 0.1),
            lz - 0.05 * height,
            a * rng.uniform(0.38, 0.46),
            b * rng.uniform(0.55, 0.7),
            0.5 * height,
        ),
        "left": (
            a * rng.uniform(-0.15, 0.0),
            b * rng.uniform(0.35, 0.5),
            lz + 0.15 * height,
            a * rng.uniform(0.25, 0.38),
            b * rng.uniform(0.22, 0.32),
            0.3 * height,
        ),
        "deform": [(_unit(rng) * 2 * math.pi / rng.uniform(60, 140), rng.uniform(0, 2 * math.pi)) for _ in range(6)],
        "deform_amp": rng.uniform(0.08, 0.18),
        "hu": _draw_hu(rng, liver),
        **_draw_organs(rng, a, b, lz, height),
        "vert_r": rng.uniform(16, 22),
        "disc_period": rng.uniform(28, 34),
        "disc_phase": rng.uniform(0, 30),
        "ribs": [
            (ang, rng.uniform(4.5, 7.0), rng.uniform(-0.006, 0.006))
            for ang in np.deg2rad(
                np.concatenate([rng.uniform(-35, 35, 1) + d for d in (-150, -120, -90, -60, -30, 30, 60, 90, 120, 150)])
            )
        ],
        "rib_low": lz - rng.uniform(0.2, 0.45) * height,
        "vessels": [_draw_vessel(rng, a, b, lz, height) for _ in range(rng.integers(5, 9))],
        "lesions": [(rng.uniform(0, 1, 3), rng.uniform(5, 22)) for _ in range(rng.integers(0, 5))],
        "gas": [
            (
                rng.uniform(-0.6, 0.3) * a,
                rng.uniform(-0.2, 0.6) * b,
                lz - height * rng.uniform(0.45, 1.2),
                rng.uniform(6, 18),
            )
            for _ in range(rng.integers(6, 14))
        ],
        "tex": [(_unit(rng) * 2 * math.pi / rng.uniform(8, 40), rng.uniform(0, 2 * math.pi)) for _ in range(10)],
        "thorax": _draw_thorax(rng, a, b),
    }


def _draw_thorax(rng: np.random.Generator, a: float, b: float) -> dict:
    """The chest above the diaphragm (mm): two hemidomes, paraboloids falling `drop` mm over
    their radii and faster behind (the posterior recesses), the right one's apex at the liver's
    top, the left one's lower and on the left; the heart resting on the diaphragm left of the
    midline, its wall, and the fat around its lower, front part; textures of the lungs."""
    return {
        "diaphragm": rng.uniform(3.0, 6.0),
        "rx": a * rng.uniform(0.45, 0.6),
        "ry": b * rng.uniform(0.55, 0.75),
        "drop": rng.uniform(35, 60),
        "back": rng.uniform(1.0, 1.8),
        "left_x": -a * rng.uniform(0.3, 0.45),
        "left_lower": rng.uniform(5, 25),
        "heart": (
            -a * rng.uniform(0.05, 0.2),
            b * rng.uniform(0.0, 0.25),
            a * rng.uniform(0.25, 0.33),
            b * rng.uniform(0.3, 0.42),
            rng.uniform(45, 65),
        ),
        "wall": rng.uniform(6, 12),
        "fat": rng.uniform(3, 12),
        "lung_tex": [(_unit(rng) * 2 * math.pi / rng.uniform(4, 12), rng.uniform(0, 2 * math.pi)) for _ in range(8)],
    }


def _draw_hu(rng: np.random.Generator, liver: float) -> dict:
    """Each tissue's HU, drawn per case: the organs that enhance relative to the liver's."""
    return {
        "air": -1000.0,
        "fat": rng.uniform(-110, -80),
        "muscle": rng.uniform(40, 60),
        "bg": rng.uniform(-40, 10),
        "liver": liver,
        "spleen": liver + rng.uniform(-5, 15),
        "kidney": liver + rng.uniform(60, 120),
        "medulla": liver + rng.uniform(20, 50),
        "aorta": liver + rng.uniform(40, 120),
        "ivc": liver + rng.uniform(20, 60),
        "vessel": liver + rng.uniform(25, 60),
        "lesion": liver - rng.uniform(25, 55),
        "bone": rng.uniform(220, 350),
        "cortex": rng.uniform(600, 1000),
        "disc": rng.uniform(70, 100),
        "fluid": rng.uniform(0, 20),
        "gall": rng.uniform(0, 20),
        "csf": rng.uniform(5, 15),
        "table": rng.uniform(100, 300),
        # the chest, measured on the real scans: lung -870 +- 66 HU at the dome of IRCAD patient 1
        # (-750 at the 3 mm TotalSegmentator CT's, partial volume); its heart ~190 HU in the
        # portal phase against a liver of 110, the heart of a non-contrast scan about the liver's
        "lung": rng.uniform(-900, -800),
        "lung_var": rng.uniform(25, 70),
        "blood": liver + rng.uniform(-15, 100),
        "myocardium": liver + rng.uniform(-30, 15),
    }


def _draw_organs(rng: np.random.Generator, a: float, b: float, lz: float, height: float) -> dict:
    """Spleen, kidneys, stomach and gallbladder: (centre xyz, semi-axes xyz) in mm, about the body
    (semi-axes a, b) and the liver (centre height lz, extent height)."""
    return {
        "spleen": (
            -a * rng.uniform(0.55, 0.65),
            -b * rng.uniform(0.15, 0.35),
            lz + rng.uniform(-0.05, 0.15) * height,
            a * rng.uniform(0.12, 0.17),
            b * rng.uniform(0.25, 0.33),
            height * rng.uniform(0.25, 0.35),
        ),
        "kidneys": [
            (
                s * a * rng.uniform(0.33, 0.42),
                -b * rng.uniform(0.42, 0.55),
                lz - height * rng.uniform(0.35, 0.5),
                a * rng.uniform(0.11, 0.14),
                b * rng.uniform(0.16, 0.22),
                rng.uniform(45, 60),
            )
            for s in (1, -1)
        ],
        "stomach": (
            -a * rng.uniform(0.3, 0.4),
            b * rng.uniform(0.2, 0.4),
            lz + 0.2 * height,
            a * rng.uniform(0.16, 0.24),
            b * rng.uniform(0.18, 0.28),
            0.22 * height,
        ),
        "gall": (
            a * rng.uniform(0.15, 0.3),
            b * rng.uniform(0.25, 0.45),
            lz - 0.3 * height,
            rng.uniform(12, 18),
            rng.uniform(15, 22),
            rng.uniform(25, 40),
        ),
    }


def _unit(rng) -> np.ndarray:
    d = rng.normal(0, 1, 3)
    return d / np.linalg.norm(d)


def _draw_vessel(rng, a, b, lz, h):
    """A straight tube: near-vertical (hepatic vein) or near-horizontal (portal branch)."""
    p0 = np.array([a * rng.uniform(0.1, 0.6), b * rng.uniform(-0.3, 0.4), lz + h * rng.uniform(-0.3, 0.35)])
    if rng.random() < 0.5:
        d = np.array([rng.normal(0, 0.3), rng.normal(0, 0.3), 1.0])
    else:
        d = np.array([rng.normal(0, 1), rng.normal(0, 1), rng.normal(0, 0.2)])
    d /= np.linalg.norm(d)
    return p0, d, rng.uniform(40, 110), rng.uniform(2.0, 5.5)


def _ellipsoid(x, y, z, e) -> np.ndarray:
    cx, cy, cz, sx, sy, sz = e
    return ((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2


def _ellipsoid_box(e, margin: float = 1.0):
    cx, cy, cz, sx, sy, sz = e
    return (cx - margin * sx, cy - margin * sy, cz - margin * sz), (
        cx + margin * sx,
        cy + margin * sy,
        cz + margin * sz,
    )


class _WaveField:
    """Sum of plane waves sin(k.p + phase), normalised to unit variance, evaluated per slab.

    sin(A + B) = sin A cos B + cos A sin B with A in-plane and B along z, so a slab of the
    field is one [X*Y, 2K] @ [2K, S] matrix product instead of K full-size sin() calls.
    """

    def __init__(self, xs, ys, terms):
        k = np.array([t[0] for t in terms], np.float32)
        self.kz = k[:, 2]
        self.phase = np.array([t[1] for t in terms], np.float32)
        a = k[:, 0, None, None] * xs[None, :, None] + k[:, 1, None, None] * ys[None, None, :]
        self.shape = (len(xs), len(ys))
        self.inplane = np.concatenate([np.sin(a), np.cos(a)]).reshape(2 * len(terms), -1).T / np.sqrt(len(terms))

    def slab(self, zs) -> np.ndarray:
        b = self.kz[:, None] * zs[None, :] + self.phase[:, None]
        return (self.inplane @ np.concatenate([np.cos(b), np.sin(b)])).reshape(*self.shape, len(zs))


class _Canvas:
    """One slab of the CT being painted; primitives are evaluated inside their bounding box only."""

    def __init__(self, ct, body, xs, ys, zs):
        self.ct, self.body, self.xs, self.ys, self.zs = ct, body, xs, ys, zs

    def box(self, lo, hi):
        """Index slices and coordinate grids [x,1,1], [1,y,1], [1,1,z] of the mm box, or None."""
        sl = []
        for axis, (a, b) in enumerate(zip(lo, hi)):
            c = (self.xs, self.ys, self.zs)[axis]
            i0, i1 = np.searchsorted(c, a), np.searchsorted(c, b, side="right")
            if i1 <= i0:
                return None
            sl.append(slice(int(i0), int(i1)))
        sl = tuple(sl)
        return sl, self.xs[sl[0], None, None], self.ys[None, sl[1], None], self.zs[None, None, sl[2]]

    def paint(self, box, fn, within=None) -> None:
        """ct[region] = value where (region, value) = fn(x, y, z) inside `box`, body and `within`."""
        got = self.box(*box)
        if got is None:
            return
        sl, x, y, z = got
        region, value = fn(x, y, z)
        view = self.ct[sl]
        region = np.broadcast_to(region, view.shape) & self.body[sl[0], sl[1], None]
        if within is not None:
            region = region & within[sl]
        view[region] = value if np.isscalar(value) else np.broadcast_to(value, view.shape)[region]


def _tube(x, y, z, vessel) -> np.ndarray:
    """Squared distance to a capped segment (p0, direction, length)."""
    p0, d, length, _r = vessel
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip(rx * d[0] + ry * d[1] + rz * d[2], 0, length)
    return (rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2


def _body_rings(A: dict, xs, ys) -> np.ndarray:
    """Normalised radius [X, Y, 1] of the body outline (1 = skin), wobbly ellipse."""
    u, v = xs[:, None] / A["a"], (ys[None, :] - A["yc"]) / A["b"]
    theta = np.arctan2(v, u)
    return (np.sqrt(u**2 + v**2) / (1 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in A["wobble"])))[..., None]


BIG = 1e4  # an ellipsoid axis that spans any slab (structures running the whole length)


def _render_slab(A: dict, cv: _Canvas, r, textures, dome, liver_in, lesions) -> np.ndarray:
    """Paint one slab in cv.ct (HU) and return its liver mask. r: body radius, textures: the
    slab's fields (tissue, liver deformation, lungs), dome: the diaphragm (`_dome`).
    Structures are painted in this order, each over what is below it."""
    tex, deform, lung_tex = textures
    inner = _paint_body_wall(A, cv, r, tex)
    _paint_abdomen(A, cv, inner)
    liver = _procedural_liver(A, cv, r, deform) if liver_in is None else liver_in.astype(bool)
    if liver_in is None:  # a drawn liver ends below the diaphragm (a real mask does by construction)
        liver &= cv.zs[None, None, :] < dome[..., None]
    _paint_liver(A, cv, liver, inner, tex, lesions, gallbladder=liver_in is None)
    _paint_thorax(A, cv, inner, dome, liver, lung_tex)
    ivc = _paint_great_vessels_and_spine(A, cv)
    _paint_ribs(A, cv)
    if liver_in is not None:  # a real mask is the ground truth as given
        return liver
    # The liver mask: liver tissue not overwritten by the IVC.
    got = cv.box(*_ellipsoid_box(ivc))
    if got is not None:
        sl, x, y, z = got
        liver[sl] &= ~(_ellipsoid(x, y, z, ivc) < 1)
    return liver & cv.body[..., None]


def _paint_body_wall(A: dict, cv: _Canvas, r, tex) -> np.ndarray:
    """Air, the table, fat, muscle and the abdominal background; returns the inside of the wall."""
    hu, ct, xs, ys = A["hu"], cv.ct, cv.xs, cv.ys
    ct[...] = hu["air"]
    table_y = A["yc"] - A["b"] - 12.0
    table = (np.abs(ys - table_y) < 4)[None, :, None] & (np.abs(xs) < 1.2 * A["a"])[:, None, None]
    ct[np.broadcast_to(table, ct.shape)] = hu["table"]
    inner2d = r < 1 - A["fat_t"] - A["muscle_t"]
    for ring, value in (
        (r < 1, hu["fat"] + 8 * tex),
        (r < 1 - A["fat_t"], hu["muscle"]),
        (inner2d, hu["bg"] + 25 * tex),
    ):
        region = np.broadcast_to(ring, ct.shape)
        ct[region] = value if np.isscalar(value) else value[region]
    return np.broadcast_to(inner2d, ct.shape)


def _paint_abdomen(A: dict, cv: _Canvas, inner) -> None:
    """Paraspinal muscles, bowel gas, the stomach and the kidneys."""
    hu, spine_y = A["hu"], A["yc"] - 0.62 * A["b"]
    for side in (1, -1):  # paraspinal muscles
        e = (side * 0.22 * A["a"], spine_y - 0.12 * A["b"], 0.0, 0.16 * A["a"], 0.17 * A["b"], BIG)
        cv.paint(
            _ellipsoid_box(e),
            lambda x, y, z, e=e: (((x - e[0]) / e[3]) ** 2 + ((y - e[1]) / e[4]) ** 2 < 1, hu["muscle"]),
        )
    for gx, gy, gz, gr in A["gas"]:  # bowel gas pockets, lower abdomen
        e = (gx, gy, gz, gr, gr, gr / 1.5)
        cv.paint(_ellipsoid_box(e), lambda x, y, z, e=e: (_ellipsoid(x, y, z, e) < 1, hu["air"]), within=inner)
    st = A["stomach"]
    cv.paint(
        _ellipsoid_box(st),
        lambda x, y, z: (_ellipsoid(x, y, z, st) < 1, np.where(y > st[1] + 0.45 * st[4], hu["air"], hu["fluid"])),
        within=inner,
    )
    for k in A["kidneys"]:

        def kidney(x, y, z, k=k):
            q = _ellipsoid(x, y, z, k)
            value = np.where(q < 0.45, np.where(np.abs(x) < abs(k[0]), hu["fat"], hu["medulla"]), hu["kidney"])
            return q < 1, value

        cv.paint(_ellipsoid_box(k), kidney, within=inner)


def _procedural_liver(A: dict, cv: _Canvas, r, deform) -> np.ndarray:
    """The drawn liver: two tapering lobes, deformed, inside the muscle wall, minus the gallbladder."""
    liver = np.zeros(cv.ct.shape, bool)
    lo = np.minimum(_ellipsoid_box(A["right"], 1.3)[0], _ellipsoid_box(A["left"], 1.3)[0])
    hi = np.maximum(_ellipsoid_box(A["right"], 1.3)[1], _ellipsoid_box(A["left"], 1.3)[1])
    got = cv.box(lo, hi)
    if got is None:
        return liver
    sl, x, y, z = got

    def lobe(e):
        cx, cy, cz, sx, sy, sz = e
        taper = 1 - 0.35 * np.clip((cz - z) / sz, 0, 1) ** 2  # narrower towards the inferior tip
        return 1 - _ellipsoid(x, y, z, (cx, cy, cz, sx * taper, sy * taper, sz))

    f = np.maximum(lobe(A["right"]), lobe(A["left"])) + A["deform_amp"] * deform[sl]
    keep = (f > 0) & (r[sl[0], sl[1]] < 1 - A["fat_t"] - 0.5 * A["muscle_t"])
    liver[sl] = keep & ~(_ellipsoid(x, y, z, A["gall"]) < 1)
    return liver


def _paint_liver(A: dict, cv: _Canvas, liver, inner, tex, lesions, gallbladder: bool) -> None:
    """The spleen (liver-like HU), the liver with its vessels and lesions, and the gallbladder."""
    hu, ct = A["hu"], cv.ct
    sp = A["spleen"]
    cv.paint(
        _ellipsoid_box(sp, 1.2), lambda x, y, z: (_ellipsoid(x, y, z, sp) < 1, hu["spleen"]), within=inner & ~liver
    )
    ct[liver & cv.body[..., None]] = (hu["liver"] + 6 * tex)[liver & cv.body[..., None]]
    for vessel in A["vessels"]:
        p0, d, length, rad = vessel
        p1 = p0 + length * d
        box = (np.minimum(p0, p1) - rad, np.maximum(p0, p1) + rad)
        cv.paint(box, lambda x, y, z, v=vessel: (_tube(x, y, z, v) < v[3] ** 2, hu["vessel"]), within=liver)
    for c, rad in lesions:
        e = (*c, rad, rad, rad)
        cv.paint(_ellipsoid_box(e), lambda x, y, z, e=e: (_ellipsoid(x, y, z, e) < 1, hu["lesion"]), within=liver)
    if gallbladder:
        g = A["gall"]
        cv.paint(_ellipsoid_box(g), lambda x, y, z: (_ellipsoid(x, y, z, g) < 1, hu["gall"]))


def _dome(A: dict, xs, ys, zs, liver) -> np.ndarray:
    """The diaphragm's underside, a height in mm per column [X, Y]: the larger of two
    hemidomes (`_draw_thorax`), the right one's apex at the liver's top; over a real liver never
    below the top face of its highest voxel, so the chest never covers a voxel of the mask."""
    T = A["thorax"]
    top = None
    if liver is not None:
        has = liver.any(axis=2)
        highest = zs[liver.shape[2] - 1 - np.argmax(liver[:, :, ::-1], axis=2)]
        step = float(zs[1] - zs[0]) if len(zs) > 1 else 1.0
        top = np.where(has, highest + 0.5 * step, -np.inf)
        i, j = np.unravel_index(int(np.argmax(top)), top.shape)
        apex = (float(xs[i]), float(ys[j]), float(top[i, j]))
    else:
        cx, cy, cz, _sx, _sy, sz = A["right"]
        apex = (cx, cy, cz + sz * (1 - 0.5 * A["deform_amp"]))
    x, y = xs[:, None], ys[None, :]

    def hemidome(ax: float, ay: float, az: float) -> np.ndarray:
        dy = (y - ay) / T["ry"]
        dy = np.where(dy < 0, dy * T["back"], dy)  # behind the apex it falls faster
        return az - T["drop"] * (((x - ax) / T["rx"]) ** 2 + dy**2)

    dome = np.maximum(hemidome(*apex), hemidome(T["left_x"], apex[1], apex[2] - T["left_lower"]))
    if top is not None:
        dome = np.maximum(dome, top)
    return dome.astype(np.float32)


def _paint_thorax(A: dict, cv: _Canvas, inner, dome, liver, lung_tex) -> None:
    """Above the diaphragm, inside the chest wall: the diaphragm itself (muscle), the lungs with
    their vessels, and the heart resting on it (blood pool, wall, the fat below and before it).
    Whatever the abdomen painted there (a stomach's or spleen's top) is covered; the liver never
    is (it lies below the dome)."""
    hu, T = A["hu"], A["thorax"]
    z = cv.zs[None, None, :]
    above = inner & (z > dome[..., None]) & ~liver
    chest = above & (z > dome[..., None] + T["diaphragm"])
    cv.ct[above & ~chest] = hu["muscle"]
    lungs = hu["lung"] + hu["lung_var"] * lung_tex
    lungs = np.where(lung_tex > 1.9, hu["blood"] - 40.0, lungs)  # the lung's vessels: the sparse crests
    cv.ct[chest] = np.broadcast_to(lungs, cv.ct.shape)[chest]
    hx, hy, sx, sy, sz = T["heart"]
    hi, hj = int(np.searchsorted(cv.xs, hx)), int(np.searchsorted(cv.ys, hy))
    base = float(dome[min(hi, len(cv.xs) - 1), min(hj, len(cv.ys) - 1)]) + T["diaphragm"]
    hz = base + 0.55 * sz
    fat_e = (hx, hy, hz, sx + T["fat"], sy + T["fat"], sz + T["fat"])
    got = cv.box(*_ellipsoid_box(fat_e))
    if got is None:
        return
    sl, x, y, zz = got
    region = chest[sl]
    q = _ellipsoid(x, y, zz, (hx, hy, hz, sx, sy, sz))
    fat = region & (_ellipsoid(x, y, zz, fat_e) < 1) & (q >= 1) & ((zz < hz) | (y > hy))
    heart = region & (q < 1)
    pool = heart & (_ellipsoid(x, y, zz, (hx, hy, hz, sx - T["wall"], sy - T["wall"], sz - T["wall"])) < 1)
    view = cv.ct[sl]
    view[fat] = hu["fat"]
    view[heart] = hu["myocardium"]
    view[pool] = hu["blood"]


def _paint_great_vessels_and_spine(A: dict, cv: _Canvas) -> tuple:
    """IVC and aorta, the vertebra with its discs, its posterior arch and the spinal canal;
    returns the IVC (it is carved out of the liver mask)."""
    hu, spine_y, vr = A["hu"], A["yc"] - 0.62 * A["b"], A["vert_r"]
    ivc = (0.17 * A["a"], spine_y + vr + 12, 0.0, 13.0, 13.0, BIG)
    aorta = (-0.1 * A["a"], spine_y + vr + 14, 0.0, 11.0, 11.0, BIG)
    for e, value in ((ivc, hu["ivc"]), (aorta, hu["aorta"])):
        cv.paint(_ellipsoid_box(e), lambda x, y, z, e=e, value=value: (_ellipsoid(x, y, z, e) < 1, value))
    vert = (0.0, spine_y, 0.0, vr, vr, BIG)

    def vertebra(x, y, z):
        d2 = x**2 + (y - spine_y) ** 2
        disc = ((z - A["disc_phase"]) % A["disc_period"]) < 6
        return d2 < vr**2, np.where(disc, hu["disc"], np.where(d2 > (vr - 2.5) ** 2, hu["cortex"], hu["bone"]))

    cv.paint(_ellipsoid_box(vert), vertebra)
    canal_y = spine_y - vr - 8
    post = (0.0, canal_y - 14, 0.0, 10.0, 9.0, BIG)
    cv.paint(_ellipsoid_box(post), lambda x, y, z: (_ellipsoid(x, y, z, post) < 1, hu["cortex"]))
    canal = (0.0, canal_y, 0.0, 7.5, 7.5, BIG)
    cv.paint(_ellipsoid_box(canal), lambda x, y, z: (_ellipsoid(x, y, z, canal) < 1, hu["csf"]))
    return ivc


def _paint_ribs(A: dict, cv: _Canvas) -> None:
    """Ribs: cortex and marrow, each along a slowly drifting arc at the muscle wall."""
    hu, zs = A["hu"], cv.zs
    rib_ring = 1 - A["fat_t"] - 0.5 * A["muscle_t"]
    for ang, rad, drift in A["ribs"]:

        def centre(z, ang=ang, drift=drift):
            phi = ang + drift * (z - A["lz"])
            return A["a"] * rib_ring * np.cos(phi), A["yc"] + A["b"] * rib_ring * np.sin(phi)

        def rib(x, y, z, rad=rad, centre=centre):
            cx, cy = centre(z)
            d2 = (x - cx) ** 2 + (y - cy) ** 2
            return (d2 < rad**2) & (z > A["rib_low"]), np.where(d2 > (rad - 2) ** 2, hu["cortex"], hu["bone"])

        ends = np.array([centre(zs[0]), centre(zs[-1])])  # the rib's path across the slab is a short arc
        pad = rad + 2 + 0.25 * float(np.abs(ends[0] - ends[1]).max())
        cv.paint(((*(ends.min(0) - pad), A["rib_low"]), (*(ends.max(0) + pad), BIG)), rib)


def render(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    liver: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(CT float32 HU as rendered, mask uint8) in RAS order [x, y, z] for a grid of `shape`
    and `spacing` (mm); `synth.render` turns the HU into stored int16."""
    X, Y, Z = shape
    sx, sy, sz = spacing
    xs = ((np.arange(X) - (X - 1) / 2) * sx).astype(np.float32)
    ys = ((np.arange(Y) - (Y - 1) / 2) * sy).astype(np.float32)
    zs = (np.arange(Z) * sz).astype(np.float32)
    box = None
    if liver is not None:
        idx = np.nonzero(liver)
        if len(idx[0]) == 0:
            raise LiversegError("a real liver mask given to synth is empty")
        box = (
            (xs[idx[0].min()], ys[idx[1].min()], zs[idx[2].min()]),
            (xs[idx[0].max()], ys[idx[1].max()], zs[idx[2].max()]),
        )
    A = _draw_anatomy(rng, X * sx, Y * sy, Z * sz, box)
    lesions = []
    if liver is not None:
        pts = np.argwhere(liver[::4, ::4, ::2]) * [4, 4, 2]
        for _u, rad in A["lesions"]:
            p = pts[rng.integers(len(pts))]
            lesions.append(((xs[p[0]], ys[p[1]], zs[p[2]]), rad))
    else:
        for u, rad in A["lesions"]:  # inside the right lobe's inner half
            cx, cy, cz, ex, ey, ez = A["right"]
            lesions.append(((cx + (u[0] - 0.5) * ex, cy + (u[1] - 0.5) * ey, cz + (u[2] - 0.5) * ez), rad))
    r = _body_rings(A, xs, ys)
    body = r[..., 0] < 1
    tex, deform = _WaveField(xs, ys, A["tex"]), _WaveField(xs, ys, A["deform"])
    lung_tex = _WaveField(xs, ys, A["thorax"]["lung_tex"])
    dome = _dome(A, xs, ys, zs, liver)
    ct = np.empty(shape, np.float32)
    mask = np.empty(shape, np.uint8)
    for z0 in range(0, Z, SLAB):
        sl = slice(z0, min(Z, z0 + SLAB))
        cv = _Canvas(ct[:, :, sl], body, xs, ys, zs[sl])
        textures = (tex.slab(zs[sl]), deform.slab(zs[sl]), lung_tex.slab(zs[sl]))
        mask[:, :, sl] = _render_slab(A, cv, r, textures, dome, None if liver is None else liver[:, :, sl], lesions)
    # Partial-volume blur (in voxels: thicker slices blur less along z), then scanner noise.
    blur = rng.uniform(0.5, 0.8)
    ndimage.gaussian_filter(ct, sigma=(blur, blur, 0.35), output=ct)
    noise = rng.uniform(8, 18)
    for z0 in range(0, Z, SLAB):
        sl = slice(z0, min(Z, z0 + SLAB))
        ct[:, :, sl] += noise * rng.standard_normal(ct[:, :, sl].shape, dtype=np.float32)
    return ct, mask
