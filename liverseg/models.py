"""A model, wherever it comes from: a trained run or an exported folder, with its input contract.

A *model* is anything with a `contract` (`Contract`: the input it was trained on, its
post-processing) and `logits(x)` (an engine from `liverseg.engines`): a trained run
(`load_run`, the Keras network in TensorFlow) or an exported folder (`load_export`: ONNX
Runtime, OpenVINO, LiteRT or a SavedModel; `ExportInfo` owns its `liverseg-model.json`).
`predict` runs either the same way.

A run's model is rebuilt in code from its saved config and only its *weights* are loaded
(`*.weights.h5`): no user-supplied `.keras`/`.h5` model or pickle is ever deserialised.
TensorFlow is imported only by `load_run` (through `unet`), so exports load without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from liverseg import LiversegError, __version__, engines, rundir, serial, storage
from liverseg.layouts import MERGES_TUMOUR
from liverseg.manifest import Manifest

CONTRACT_FILE = "liverseg-model.json"  # an exported folder's contract
CONTRACT_VERSION = 2  # 2: the artifact's input is fixed in H, W where the run's slice size is
CONTRACT_VERSIONS = (1, 2)  # read


@dataclass(frozen=True)
class Contract(serial.Record):
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
    try:
        opts = Manifest.load(records).options
    except (LiversegError, OSError, TypeError):
        return "liver"  # the records are gone: masks of liverseg's layouts are liver masks
    return "liver+tumour" if opts.layout in MERGES_TUMOUR or opts.merge_tumour else "liver"


def load_run(root: str | Path, weights: str | Path | None = None) -> Run:
    """Rebuild the network from RUN/config.yaml and load best.weights.h5 (else final.weights.h5)."""
    from liverseg import unet
    from liverseg.unet import weights_fingerprint

    root, paths = storage.path(root), rundir.RunDir(root)
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
    weights = storage.path(weights)
    if not weights.name.endswith(".weights.h5"):
        raise LiversegError(f"{weights}: only Keras weight files (*.weights.h5) are loaded, never whole models")
    model = unet.build(cfg.model, spec.channels)
    try:
        with storage.local_copy(weights) as local:  # h5py opens a local file
            model.load_weights(str(local))
    except LiversegError:
        raise
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
class ExportInfo(serial.Record):
    """`liverseg-model.json` (CONTRACT_FILE), the one owner of an exported folder's file: its
    format, the artifact, the model's `Contract` (its fields at the top level), the parity
    measured on export, the run it came from; or, for an exported ensemble, its members'
    folders (each an export of its own)."""

    version: int = CONTRACT_VERSION
    format: str = ""
    liverseg: str = __version__
    runs: tuple[str, ...] = ()
    members: tuple[str, ...] = serial.key("ensemble", omit=True, default=())
    artifact: str = serial.key(omit=True, default="")
    contract: Contract | None = serial.key(inline=True, omit=True, default=None)
    parity: dict | None = serial.key(omit=True, default=None)

    @classmethod
    def from_json(cls, d: dict, where: Path) -> ExportInfo:
        version = d.get("version") if isinstance(d, dict) else None
        if version not in CONTRACT_VERSIONS:
            raise LiversegError(
                f"{where}: export format version {version}, this liverseg ({__version__}) reads versions "
                f"{', '.join(map(str, CONTRACT_VERSIONS))}; export the run again with this version"
            )
        try:
            info = serial.from_json(cls, {"liverseg": "?", **d})
        except (KeyError, TypeError, ValueError) as e:
            raise LiversegError(
                f"{where}: unreadable export contract ({type(e).__name__}: {e}); export the run again"
            ) from None
        if not info.members and info.contract is None:
            raise LiversegError(f"{where}: unreadable export contract (no input, no ensemble); export the run again")
        if info.contract is not None:
            info.contract.check(where)
        return info

    @classmethod
    def load(cls, root: str | Path) -> ExportInfo:
        path = storage.path(root) / CONTRACT_FILE
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
        (storage.path(root) / CONTRACT_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_export(root: str | Path, engine: str | None = None) -> Exported:
    """An exported folder: its contract (CONTRACT_FILE) and its artifact in its format's
    runtime (or `engine`: openvino also runs an ONNX export). Refused in one line: not an
    export, an older or newer contract, a missing artifact, a runtime not installed."""
    root = storage.path(root)
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
    artifact = storage.local_folder(root) / info.artifact  # the runtimes open local files
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
    root = storage.path(root)
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


__all__ = [
    "CONTRACT_FILE",
    "Contract",
    "ExportInfo",
    "Exported",
    "Run",
    "check_artifact_input",
    "check_ensemble",
    "load_export",
    "load_exports",
    "load_run",
    "network_input",
]
