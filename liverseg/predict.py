"""Whole-volume inference and prediction, one path for every engine (TensorFlow-free).

A *model* here is anything with a `contract` (`Contract`: the input it was trained on, its
post-processing) and `logits(x)` (an engine from `liverseg.engines`): a trained run
(`load_run`, the Keras network in TensorFlow) or an exported folder (`load_export`: ONNX
Runtime, OpenVINO, LiteRT or a SavedModel). `infer_volume` turns a stored-geometry CT volume
into liver probabilities in NumPy: the 2.5D stacks, normalisation, padding to the network's
divisor, optional flip TTA, sigmoid. `predict_image` brings a source CT (NIfTI or DICOM)
into the model's stored geometry and maps the probabilities back to the source's own grid
through `geometry` (one way in, one way out); several models (an ensemble) are averaged
there, each after its own TTA, then thresholded and post-processed once (`postprocess`).
`evaluate` scores exactly what it returns.

A run's model is rebuilt in code from its saved config and only its *weights* are
loaded (`*.weights.h5`): no user-supplied `.keras`/`.h5` model or pickle is ever
deserialised. This module imports TensorFlow only inside `load_run`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverseg import (
    InputError,
    LiversegError,
    __version__,
    dicom_io,
    engines,
    geometry,
    layouts,
    nifti_io,
    rundir,
    serial,
    volumes,
)
from liverseg.outputs import check_output, folder_lock
from liverseg.volumes import Source

log = logging.getLogger(__name__)

CONTRACT_FILE = "liverseg-model.json"  # an exported folder's contract
CONTRACT_VERSION = 2  # 2: the artifact's input is fixed in H, W where the run's slice size is
CONTRACT_VERSIONS = (1, 2)  # read
OUTPUT_FORMATS = ("nifti", "dicom-seg")
LOCK = ".liverseg-predict.lock"  # held in --out while a prediction writes there
PREDICTION = "liverseg prediction"  # the descrip of the NIfTI files predict writes (what --force may replace)


@dataclass(frozen=True)
class Contract:
    """What inference needs to reproduce `predict`: the input the network was trained on
    (`rundir.InputSpec`: context, size or spacing, normalisation), the divisor its input is
    padded to, the post-processing options, what its labels mean and its weights' fingerprint."""

    spec: rundir.InputSpec = serial.key("input")
    divisor: int = serial.key()
    threshold: float = serial.key(group="postprocess")
    tta_flip: bool = serial.key(group="postprocess")
    largest_component: bool = serial.key(group="postprocess")
    min_component_fraction: float = serial.key(group="postprocess")
    batch_size: int = serial.key()
    labels: str = "liver"  # "liver+tumour" for a model trained on masks whose tumour was merged into the liver
    weights: str = ""  # fingerprint (sha256 of the weight values, 16 hex digits)

    to_json = serial.to_json
    from_json = classmethod(serial.from_json)

    def check(self, where) -> Contract:
        """This contract, or LiversegError naming the first value inference cannot use (an edited
        or damaged contract: ONNX Runtime would fail with a dump, or masks come out empty)."""
        spec, norm = self.spec, self.spec.normalization
        finite = all(math.isfinite(v) for v in (norm.lo, norm.hi, norm.shift, norm.scale))
        for ok, key, value, what in (
            (self.divisor >= 1 and self.divisor & (self.divisor - 1) == 0, "divisor", self.divisor, "a power of 2"),
            (1 <= self.batch_size <= 4096, "batch_size", self.batch_size, "in [1, 4096]"),
            (0 < self.threshold < 1, "postprocess.threshold", self.threshold, "in (0, 1)"),
            (
                0 <= self.min_component_fraction <= 1,
                "postprocess.min_component_fraction",
                self.min_component_fraction,
                "in [0, 1]",
            ),
            (
                0 <= spec.context <= 16 and spec.channels == 2 * spec.context + 1,
                "input.channels",
                spec.channels,
                f"2 x context + 1 = {2 * spec.context + 1}",
            ),
            (
                1 <= spec.height <= 4096 and 1 <= spec.width <= 4096,
                "input.height/width",
                (spec.height, spec.width),
                "in [1, 4096]",
            ),
            (
                spec.size is None or spec.height == spec.width == spec.size,
                "input.size",
                spec.size,
                f"the slice size, equal to input.height and input.width ({spec.height}x{spec.width})",
            ),
            (
                finite and norm.lo < norm.hi and norm.scale > 0,
                "input.intensity",
                (norm.lo, norm.hi, norm.scale),
                "finite, lo < hi and scale > 0",
            ),
            (self.labels in ("liver", "liver+tumour"), "labels", self.labels, "liver or liver+tumour"),
        ):
            if not ok:
                raise LiversegError(f"{where}: {key}={value!r} is not valid ({what}); export the run again")
        return self


@dataclass
class Run:
    """A trained run: its config, input contract and the network with its weights loaded."""

    root: Path
    cfg: object  # config.Config
    model: object
    weights: Path
    contract: Contract
    engine: engines.Engine  # the Keras model in TensorFlow; `use_engine` gives tensorflow-xla

    @property
    def name(self) -> str:
        return str(self.root)

    @property
    def spec(self) -> rundir.InputSpec:
        return self.contract.spec

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.engine(x)

    def use_engine(self, name: str) -> Run:
        """This run with the network run by `name` (tensorflow or tensorflow-xla)."""
        if name not in ("tensorflow", "tensorflow-xla"):
            raise LiversegError(
                f"engine {name}: a run is run by tensorflow or tensorflow-xla; export it "
                f"(liverseg export --format ...) for {name}"
            )
        return replace(self, engine=engines.keras_engine(self.model, xla=name == "tensorflow-xla"))


@dataclass
class Exported:
    """An exported folder (`liverseg export`): its contract and the engine of its artifact."""

    root: Path
    format: str
    contract: Contract
    engine: engines.Engine = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.root)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.engine(x)


def _labels_of(records: str | None) -> str:
    """What a dataset's masks mean: tumour merged into the liver (msd, lits) or the liver alone."""
    from liverseg.manifest import Manifest

    try:
        opts = Manifest.load(Path(records)).options
    except (LiversegError, OSError, TypeError):
        return "liver"  # the records are gone: masks of liverseg's layouts are liver masks
    return "liver+tumour" if opts.layout in layouts.MERGES_TUMOUR or opts.merge_tumour else "liver"


def load_run(root: str | Path, weights: str | Path | None = None) -> Run:
    """Rebuild the network from RUN/config.yaml and load best.weights.h5 (else final.weights.h5)."""
    from liverseg import unet
    from liverseg.unet import weights_fingerprint

    root, paths = Path(root), rundir.RunDir(root)
    cfg = rundir.load_config(root)
    info = rundir.RunInfo.load(root)
    spec = info.input
    if weights is None:
        weights = next((p for p in (paths.best_weights, paths.final_weights) if p.is_file()), None)
        if weights is None:
            raise LiversegError(
                f"{root}: no {paths.best_weights.name} or {paths.final_weights.name} yet; train longer "
                "or pass --weights"
            )
    weights = Path(weights)
    if not weights.name.endswith(".weights.h5"):
        raise LiversegError(f"{weights}: only Keras weight files (*.weights.h5) are loaded, never whole models")
    model = unet.build(cfg.model, spec.channels)
    try:
        model.load_weights(str(weights))
    except Exception as e:  # a weights file of another architecture or a corrupt file: Keras dumps the tensors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LiversegError(
            f"{weights}: cannot load into this run's {cfg.model.name} ({first}); pass the weights of "
            f"this run ({rundir.RunDir(root).best_weights.name} or "
            f"{rundir.RunDir(root).final_weights.name})"
        ) from None
    e = cfg.eval
    contract = Contract(
        spec,
        unet.divisor(cfg.model),
        e.threshold,
        e.tta_flip,
        e.largest_component,
        e.min_component_fraction,
        e.batch_size,
        _labels_of(info.records),
        weights_fingerprint(model),
    )
    return Run(root, cfg, model, weights, contract, engines.keras_engine(model))


@dataclass(frozen=True)
class ExportInfo:
    """`liverseg-model.json` (CONTRACT_FILE), the one owner of an exported folder's file: its
    format, the artifact, the model's `Contract` (its fields at the top level), the parity
    measured on export, the run it came from; or, for an exported ensemble, its members'
    folders (each an export of its own)."""

    format: str
    artifact: str = ""
    contract: Contract | None = None
    members: tuple[str, ...] = ()
    parity: dict | None = None
    runs: tuple[str, ...] = ()
    liverseg: str = __version__
    version: int = CONTRACT_VERSION

    def to_json(self) -> dict:
        d = {"version": self.version, "format": self.format, "liverseg": self.liverseg, "runs": list(self.runs)}
        if self.members:
            return {**d, "ensemble": list(self.members)}
        return {
            **d,
            "artifact": self.artifact,
            **self.contract.to_json(),
            **({"parity": self.parity} if self.parity is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict, where: Path) -> ExportInfo:
        version = d.get("version") if isinstance(d, dict) else None
        if version not in CONTRACT_VERSIONS:
            raise LiversegError(
                f"{where}: export format version {version}, this liverseg ({__version__}) reads versions "
                f"{', '.join(map(str, CONTRACT_VERSIONS))}; export the run again with this version"
            )
        try:
            if d.get("ensemble"):
                return cls(
                    d["format"],
                    members=tuple(d["ensemble"]),
                    runs=tuple(d.get("runs", ())),
                    liverseg=d.get("liverseg", "?"),
                    version=version,
                )
            return cls(
                d["format"],
                d["artifact"],
                Contract.from_json(d).check(where),
                (),
                d.get("parity"),
                tuple(d.get("runs", ())),
                d.get("liverseg", "?"),
                version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise LiversegError(
                f"{where}: unreadable export contract ({type(e).__name__}: {e}); export the run again"
            ) from None

    @classmethod
    def load(cls, root: str | Path) -> ExportInfo:
        path = Path(root) / CONTRACT_FILE
        if not path.is_file():
            raise LiversegError(
                f"{root}: not a liverseg export (no {CONTRACT_FILE}); make one with liverseg export "
                f"--run RUN {root} --format onnx|openvino|litert|savedmodel"
            )
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise LiversegError(
                f"{path}: unreadable export contract ({type(e).__name__}: {e}); export the run again"
            ) from None
        return cls.from_json(d, path)

    def save(self, root: str | Path) -> None:
        (Path(root) / CONTRACT_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_export(root: str | Path, engine: str | None = None) -> Exported:
    """An exported folder: its contract (CONTRACT_FILE) and its artifact in its format's
    runtime (or `engine`: openvino also runs an ONNX export). Refused in one line: not an
    export, an older or newer contract, a missing artifact, a runtime not installed."""
    root = Path(root)
    info = ExportInfo.load(root)
    fmt = info.format
    if info.members:
        raise LiversegError(f"{root}: an exported ensemble of {len(info.members)} models; load it with load_exports")
    if fmt not in engines.FILE_ENGINES:
        raise LiversegError(
            f"{root / CONTRACT_FILE}: unknown export format {fmt!r} (known: {', '.join(engines.FILE_ENGINES)})"
        )
    artifact = root / info.artifact
    if not artifact.exists():
        raise LiversegError(f"{root}: its {fmt} artifact {artifact.name} is missing; export the run again")
    name = engine or engines.ENGINE_OF_FORMAT[fmt]
    if name == engines.ENGINE_OF_FORMAT[fmt]:
        network = engines.FILE_ENGINES[fmt](artifact)
    elif name in ("openvino", "openvino-bf16") and fmt in ("onnx", "openvino"):
        network = engines.openvino_engine(artifact, "bf16" if name.endswith("bf16") else "f32")
    else:
        raise LiversegError(
            f"engine {name} cannot run a {fmt} export (it runs {engines.ENGINE_OF_FORMAT[fmt]}"
            f"{', openvino or openvino-bf16' if fmt in ('onnx', 'openvino') else ''})"
        )
    check_artifact_input(info, network.input_shape, artifact)
    return Exported(root, fmt, info.contract, network)


def network_input(contract: Contract) -> tuple[int | None, int | None, int]:
    """(H, W, C) of the network's input under a contract: the padded stored slice where the
    run was trained at one size (`size`, or `spacing`'s window), None where any size comes
    (native-size records: each scan keeps its own); C = 2k+1."""
    spec, d = contract.spec, contract.divisor
    if spec.size is None:
        return None, None, spec.channels
    return spec.height + (-spec.height % d), spec.width + (-spec.width % d), spec.channels


def check_artifact_input(info: ExportInfo, shape: tuple, artifact: Path) -> None:
    """The contract's input against the input shape the artifact declares: channels always; the
    slice size for exports of version 2 on (earlier ones declared any size). Refused naming both."""
    want = network_input(info.contract)
    got = tuple(shape[1:4]) if len(shape) == 4 else None
    checked = (2,) if info.version < 2 else (0, 1, 2)
    if got is None or any(got[i] != want[i] for i in checked):

        def shown(hwc):
            return "x".join("any" if v is None else str(v) for v in hwc) if hwc else f"rank {len(shape)}"

        raise LiversegError(
            f"{artifact.parent / CONTRACT_FILE}: its input ({shown(want)}: H x W x channels, from "
            f"context {info.contract.spec.context}, size {info.contract.spec.size}) does not match "
            f"the network in {artifact.name} ({shown(got)}); the contract was edited or belongs to "
            "another export: export the run again"
        )


def load_exports(root: str | Path, engine: str | None = None) -> list[Exported]:
    """The models of an exported folder: one, or an exported ensemble's members."""
    root = Path(root)
    info = ExportInfo.load(root)
    return [load_export(root / name, engine) for name in info.members] or [load_export(root, engine)]


def check_ensemble(models: list) -> None:
    """Models whose probabilities may be averaged: the same labels (each may have its own
    input contract: each maps back to the source grid)."""
    labels = {m.contract.labels for m in models}
    if len(labels) > 1:
        raise LiversegError(
            "these models segment different labels ("
            + "; ".join(f"{m.name}: {m.contract.labels}" for m in models)
            + "): an ensemble averages models of one label"
        )


# ------------------------------------------------------------------------- inference


def context_rows(z: int, k: int) -> np.ndarray:
    """[Z, 2k+1] slice indices of each slice's 2.5D stack, clamped to the volume (as
    `pipeline.context_rows` stacks them in training)."""
    return np.clip(np.arange(z)[:, None] + np.arange(-k, k + 1)[None, :], 0, z - 1)


def normalize(hu: np.ndarray, norm: rundir.Normalization) -> np.ndarray:
    """`pipeline.normalize` in NumPy (float32): (clip(hu, lo, hi) - shift) / scale."""
    return (
        np.clip(hu.astype(np.float32), np.float32(norm.lo), np.float32(norm.hi)) - np.float32(norm.shift)
    ) / np.float32(norm.scale)


def infer_volume(model, image: np.ndarray, batch_size: int | None = None, tta_flip: bool | None = None) -> np.ndarray:
    """Stored-geometry CT [Z, H, W] int16 -> liver probability [Z, H, W] float32."""
    c = model.contract
    batch_size = batch_size or c.batch_size
    tta_flip = c.tta_flip if tta_flip is None else tta_flip
    z, h, w = image.shape
    ph, pw = -h % c.divisor, -w % c.divisor
    rows = context_rows(z, c.spec.context)
    out = np.empty((z, h, w), np.float32)
    for i in range(0, z, batch_size):
        x = normalize(image[rows[i : i + batch_size]].transpose(0, 2, 3, 1), c.spec.normalization)  # [b, H, W, 2k+1]
        x = np.ascontiguousarray(np.pad(x, [(0, 0), (0, ph), (0, pw), (0, 0)], mode="reflect"))
        prob = engines.sigmoid(model.logits(x))
        if tta_flip:
            prob = (prob + engines.sigmoid(model.logits(np.ascontiguousarray(x[:, :, ::-1])))[:, :, ::-1]) / 2
        out[i : i + batch_size] = prob[:, :h, :w, 0]
    return out


def postprocess(prob: np.ndarray, threshold: float, largest_component: bool, min_fraction: float = 1.0) -> np.ndarray:
    """Probabilities -> uint8 mask. With largest_component: keep the largest 26-connected
    component and any other of at least min_fraction of its size, then fill holes."""
    mask = prob >= threshold
    if largest_component and mask.any():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = np.isin(labels, np.flatnonzero(sizes >= max(1, min_fraction * sizes.max())))
        mask = ndimage.binary_fill_holes(mask)
    return mask.astype(np.uint8)


def members(models) -> list:
    """A model or an ensemble as a list of models."""
    return list(models) if isinstance(models, (list, tuple)) else [models]


def predict_source(models, src: Source) -> tuple[np.ndarray, np.ndarray, geometry.Geometry]:
    """(mask uint8, probability float32) on the source's own grid (a NIfTI file or DICOM series), and its geometry."""
    ct = volumes.load_image(src)
    return predict_image(models, ct.voxels, ct.header)


def predict_image(
    models, image: np.ndarray, header: geometry.Header
) -> tuple[np.ndarray, np.ndarray, geometry.Geometry]:
    """A source-grid CT (int16 HU) -> (mask, probability) on the same grid, and the first
    model's geometry. An ensemble: each model's probability (after its own TTA) mapped back
    to the source grid, averaged, then thresholded and post-processed once with the first
    model's options."""
    models = members(models)
    total, geom = None, None
    for model in models:
        spec = model.contract.spec
        stored, g = geometry.to_stored_image(image, header, spec.size, spec.spacing)
        prob = geometry.from_stored(infer_volume(model, stored), g, "prob")
        total, geom = (prob if total is None else total + prob), geom or g
    prob = total / np.float32(len(models)) if len(models) > 1 else total
    c = models[0].contract
    return postprocess(prob, c.threshold, c.largest_component, c.min_component_fraction), prob, geom


# ------------------------------------------------------------------------- predict


def inputs(paths) -> tuple[list[tuple[Source, str]], list[str]]:
    """(source, output stem) of every scan to predict, and why any path gave none.

    A path is a `.nii`/`.nii.gz` file; a folder: its NIfTI files (not our own outputs) or,
    when it holds none, every CT DICOM series below it (zips in it included; label series
    such as 3D-IRCADb's MASKS_DICOM are not scans); or a `.zip` of DICOM series. A scan is
    named by its file, or its series' folder (`layouts.series_name`: 3D-IRCADb's PATIENT_DICOM
    by its patient). Scans whose names collide are named by their paths from the folder
    they share; the same scan given twice is refused."""
    found: list[tuple[Source, Path]] = []
    failures: list[str] = []
    for p in map(Path, paths):
        try:
            found += _scans_in(p)
        except InputError as e:
            failures.append(str(e))
    named, seen = [], {}
    for (src, where), stem in zip(found, _unique_stems(found)):
        key = (str(src.path), src.series, src.members)
        if key in seen:
            failures.append(f"{where}: given twice (also as {seen[key]}); predict it once")
            continue
        seen[key] = where
        named.append((src, stem))
    return named, failures


def _scans_in(p: Path) -> list[tuple[Source, Path]]:
    """(source, the path that names it) of every scan a path holds."""
    if p.is_file() and p.name.endswith((".nii", ".nii.gz")):
        return [(Source.nifti(p), p)]
    if p.is_dir():
        niftis = sorted(
            f
            for f in p.iterdir()
            if f.name.endswith((".nii", ".nii.gz"))
            and not f.name.endswith(("_liver.nii", "_liver.nii.gz", "_liver_prob.nii.gz"))
        )
        if niftis:
            return [(Source.nifti(f), f) for f in niftis]
    elif not p.name.lower().endswith(".zip"):
        raise InputError(f"{p}: not a NIfTI file (.nii, .nii.gz), a folder or a zip of DICOM series")
    series = [s for s in dicom_io.find_series(p) if s.modality in ("CT", "") and not layouts.is_label_series(s)]
    if not series:
        raise InputError(f"{p}: holds no NIfTI files and no CT DICOM series")
    return [(Source.dicom(s), layouts.series_name(s)) for s in series]


def _unique_stems(scans: list[tuple[Source, Path]]) -> list[str]:
    """Output stems: each scan's own name; where two share one, the path from their common
    folder; where two series share a folder too, the last part of each one's UID appended."""
    paths = [where for _, where in scans]
    base = [_nifti_stem(p) if p.name.endswith((".nii", ".nii.gz")) else p.name.removesuffix(".zip") for p in paths]
    stems = list(base)
    for name in {b for b in base if base.count(b) > 1}:
        clashing = [i for i, b in enumerate(base) if b == name]
        resolved = [paths[i].resolve() for i in clashing]
        common = Path(
            *[
                parts[0]
                for parts in itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*(r.parts for r in resolved)))
            ]
        )
        for i, r in zip(clashing, resolved):
            rel = r.relative_to(common) if r != common else Path(r.name)
            stems[i] = "_".join([*rel.parent.parts, name]) if rel.parent.parts else name
    shared = [stems.count(stem) > 1 for stem in stems]
    return [
        f"{stem}_{src.series.rsplit('.', 1)[-1]}" if clash and src.series else stem
        for stem, clash, (src, _) in zip(stems, shared, scans)
    ]


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii").removesuffix("_orig")


def predict(
    models, paths, out: str | Path, force: bool = False, probabilities: bool = False, fmt: str = "nifti"
) -> tuple[list[Path], list[str]]:
    """Write `<case>_liver.nii.gz` (fmt "nifti") or `<case>_liver.dcm` (fmt "dicom-seg": a
    DICOM Segmentation over the input series; DICOM inputs only) for every input scan, on
    that scan's own grid (a DICOM series as NIfTI: an affine that puts every voxel where the
    DICOM does). `models`: one model or an ensemble (see `predict_image`).

    A bad input (unreadable, corrupt, existing output without force) is reported by name
    and does not stop the others. Returns (written files, failure messages).
    """
    if fmt not in OUTPUT_FORMATS:
        raise LiversegError(f"--format {fmt!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    models = members(models)
    check_ensemble(models)
    out = Path(out)
    written = []
    scans, failures = inputs(paths)
    if not scans:
        raise LiversegError(
            "; ".join(failures) or f"no .nii/.nii.gz inputs or DICOM series in {', '.join(map(str, paths))}"
        )
    if fmt == "dicom-seg":
        not_dicom = [str(src.name) for src, _ in scans if src.kind != "dicom"]
        if not_dicom:
            raise LiversegError(
                f"--format dicom-seg needs DICOM series as inputs (a SEG refers to the series' slices), "
                f"but {', '.join(not_dicom)} {'is' if len(not_dicom) == 1 else 'are'} not DICOM; use "
                "--format nifti for them"
            )
    sources = [m.root for m in models if getattr(m, "root", None)]  # a run or an export (a test model has none)
    check_output(out, [*paths, *sources], flag="--out")  # never over an input: a mask, a scan, a model
    for msg in failures:
        log.error("%s", msg)
    with folder_lock(out, LOCK, "a prediction", "wait for it to finish, or choose another --out", remove=True):
        written += _predict_all(models, scans, out, force, probabilities, fmt, failures)
    return written, failures


def _predict_all(models, scans, out: Path, force: bool, probabilities: bool, fmt: str, failures: list) -> list[Path]:
    """Predict every scan into `out` (held by this process), a failure reported and appended."""
    written = []
    suffix = "_liver.dcm" if fmt == "dicom-seg" else "_liver.nii.gz"
    for src, stem in scans:
        target, prob_target = out / f"{stem}{suffix}", out / f"{stem}_liver_prob.nii.gz"
        try:
            for path in (target, prob_target) if probabilities else (target,):
                _check_replaceable(path, force)
            mask, prob, geom = predict_source(models, src)
            if fmt == "dicom-seg":
                _write_seg(target, mask, src, models)
            else:
                nifti_io.save_like(target, mask, geom, np.uint8, PREDICTION)
            written.append(target)
            if probabilities:
                nifti_io.save_like(prob_target, prob, geom, np.float32, PREDICTION)
                written.append(prob_target)
            log.info("%s -> %s (%.0f ml)", src.name, target, mask.sum() * math.prod(geom.spacing) / 1000)
        except (LiversegError, OSError) as err:
            msg = str(err) if str(src.name) in str(err) else f"{src.name}: {err}"
            failures.append(msg)
            log.error("%s", msg)
    return written


def _check_replaceable(target: Path, force: bool) -> None:
    """An existing output is replaced with --force only when predict wrote it (NIfTI: its
    descrip field; SEG: its series description): never a label or scan of the same name."""
    if not target.exists():
        return
    if not force:
        raise LiversegError(f"{target} exists; pass --force to overwrite")
    from liverseg import dicom_seg

    ours = dicom_seg.written_here(target) if target.suffix == ".dcm" else nifti_io.description_of(target) == PREDICTION
    if not ours:
        raise LiversegError(
            f"{target} exists and was not written by liverseg predict (a label or scan of that name?); "
            "--force replaces only earlier predictions: choose another --out"
        )


def _write_seg(target: Path, mask: np.ndarray, src: Source, models: list) -> None:
    """A BINARY DICOM SEG of `mask` over the series `src`, the algorithm identified by
    liverseg's version and the weights' fingerprints (a SEG holds no frame for a mask with
    no liver: then it is not written, and the input is reported)."""
    from liverseg import dicom_seg

    if not mask.any():
        raise LiversegError(
            f"{src.name}: no liver found, and a DICOM SEG holds frames of the segment only; nothing "
            "written for it (--format nifti writes the empty mask)"
        )
    dicom_seg.write(target, mask, src.dicom_series(), __version__, "+".join(m.contract.weights for m in models))


__all__ = [
    "CONTRACT_FILE",
    "Contract",
    "ExportInfo",
    "Exported",
    "OUTPUT_FORMATS",
    "Run",
    "infer_volume",
    "inputs",
    "load_export",
    "load_exports",
    "load_run",
    "postprocess",
    "predict",
    "predict_image",
    "predict_source",
]
