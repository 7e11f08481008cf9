"""`liverseg export`: a trained run as an artifact that runs where TensorFlow does not.

OUT holds the network in one format, its contract (`models.ExportInfo`: the input it was
trained on, the divisor its input is padded to, post-processing, labels, weights
fingerprint, the parity measured here) and, for the record, the run's weights, config.yaml
and run.json. `liverseg predict --model OUT` reproduces `predict --run` from it: the pre- and
post-processing is liverseg's NumPy code, the artifact only the network (float32 input
[N, H, W, 2k+1], normalised and padded; output the liver logits [N, H, W, 1], any N, H, W).

savedmodel  OUT/saved_model: a `logits` signature (the network), and `serving_default`
            (int16 HU slices [N, H, W, 2k+1] in stored geometry -> liver probability, the
            normalisation and padding inside: for TensorFlow Serving)
onnx        OUT/model.onnx (Keras's ONNX export through tf2onnx), for ONNX Runtime
openvino    OUT/model.xml + model.bin (the ONNX graph converted by OpenVINO, weights kept float32)
litert      OUT/model.tflite (Keras's LiteRT export), for the LiteRT interpreter

After writing, each artifact is run by its own runtime on a probe batch and compared with
the Keras forward pass: a probability further than PARITY_TOL away refuses the export and
nothing is left in OUT.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from liverseg import LiversegError, engines, rundir, storage
from liverseg.files import new_folder
from liverseg.models import CONTRACT_FILE, ExportInfo, Run, check_ensemble, load_export, network_input
from liverseg.outputs import check_output
from liverseg.predict import normalize

FORMATS = ("savedmodel", "onnx", "openvino", "litert")
ARTIFACTS = {"savedmodel": "saved_model", "onnx": "model.onnx", "openvino": "model.xml", "litert": "model.tflite"}
# The modules each format needs at export time, and the extra that installs them.
EXPORTERS = {
    "onnx": (("tf2onnx", "onnx"), "onnx"),
    "openvino": (("tf2onnx", "onnx", "openvino"), "openvino"),
    "litert": (("ai_edge_litert",), "litert"),
}
PARITY_TOL = 1e-4  # largest |probability difference| from the Keras forward pass accepted


def _require_exporter(fmt: str) -> None:
    import importlib.util

    modules, extra = EXPORTERS.get(fmt, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LiversegError(f"--format {fmt}: needs {', '.join(missing)} to export; pip install 'liverseg[{extra}]'")


def _signature(run: Run):
    """The network's input as the artifact declares it (`models.network_input`): fixed H and W
    where the run was trained at one slice size, so a contract edited to another size is
    caught by the runtime's own shape (`models.check_artifact_input`)."""
    import tensorflow as tf

    return [tf.TensorSpec([None, *network_input(run.contract)], tf.float32, name="slices")]


def _quiet_export(fn) -> None:
    """Run a Keras export without its progress lines (tf2onnx and the converters log at INFO)."""
    import contextlib
    import io
    import warnings

    loggers = [logging.getLogger(n) for n in ("tf2onnx", "absl", "openvino")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"keras\.src\.export")  # np.object probe
            fn()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _savedmodel(run: Run, path: Path) -> None:
    import tensorflow as tf

    from liverseg import pipeline

    model, norm, divisor = run.model, run.contract.spec.normalization, run.contract.divisor
    channels = run.contract.spec.channels

    class Serving(tf.Module):
        @tf.function(input_signature=_signature(run))
        def logits(self, slices):
            return {"logits": model(slices, training=False)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.int16, name="slices_hu")])
        def serve(self, slices_hu):
            """int16 HU slices (stored geometry) -> liver probability [N, H, W, 1]."""
            h, w = tf.shape(slices_hu)[1], tf.shape(slices_hu)[2]
            x = pipeline.normalize(tf.cast(slices_hu, tf.float32), norm)
            x = tf.pad(x, [[0, 0], [0, -h % divisor], [0, -w % divisor], [0, 0]], mode="REFLECT")
            return {"liver_probability": tf.sigmoid(model(x, training=False))[:, :h, :w, :]}

    module = Serving()
    module.model = model
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve, "logits": module.logits})


def _onnx(run: Run, path: Path) -> None:
    sig = _signature(run)
    _quiet_export(lambda: run.model.export(str(path), format="onnx", input_signature=sig, verbose=False))


def _openvino(run: Run, path: Path) -> None:
    import openvino as ov

    onnx = path.with_name("model.onnx")
    _onnx(run, onnx)
    ov.save_model(ov.convert_model(str(onnx)), str(path), compress_to_fp16=False)  # fp16 weights would cost parity
    onnx.unlink()


def _litert(run: Run, path: Path) -> None:
    sig = _signature(run)
    _quiet_export(lambda: run.model.export(str(path), format="litert", input_signature=sig, verbose=False))


WRITERS = {"savedmodel": _savedmodel, "onnx": _onnx, "openvino": _openvino, "litert": _litert}


def probe(run: Run, n: int = 2) -> np.ndarray:
    """A deterministic batch of network inputs at the run's stored size: CT-like HU
    (soft tissue, air and bone) normalised as the run does."""
    spec, d = run.contract.spec, run.contract.divisor
    h, w = spec.height + (-spec.height % d), spec.width + (-spec.width % d)
    rng = np.random.default_rng(0)
    hu = rng.choice(np.array([-1000.0, -100.0, 40.0, 60.0, 100.0, 700.0], np.float32), size=(n, h, w, spec.channels))
    return normalize(hu + rng.normal(0, 20, hu.shape).astype(np.float32), spec.normalization)


def _check_out(out: Path, overwrite: bool, runs: list[Run]) -> None:
    """OUT may replace an earlier export only (with --force), never a run, a dataset, the
    export's own source or a folder of other files (`outputs.check_output`)."""
    sources = [p for r in runs for p in (r.root, r.weights, storage.path(r.cfg.data.records))]
    check_output(out, sources, replaces="export")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LiversegError(f"{out} holds an earlier export; pass --force to replace it")


def export(run: Run, out: str | Path, fmt: str = "savedmodel", overwrite: bool = False) -> tuple[Path, float]:
    """Write the export of `run` in `fmt` to `out` (atomically), checked against the Keras
    forward pass by the format's own runtime. Returns (out, largest probability difference)."""
    if fmt not in FORMATS:
        raise LiversegError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    _require_exporter(fmt)
    if fmt != "savedmodel":
        engines.require(engines.ENGINE_OF_FORMAT[fmt])
    out = storage.path(out)
    _check_out(out, overwrite, [run])
    with new_folder(out, last=(CONTRACT_FILE,)) as tmp:
        WRITERS[fmt](run, tmp / ARTIFACTS[fmt])
        info = ExportInfo(format=fmt, artifact=ARTIFACTS[fmt], contract=run.contract, runs=(str(run.root.resolve()),))
        info.save(tmp)
        x = probe(run)
        want = engines.sigmoid(np.asarray(run.model(x, training=False)))
        got = engines.sigmoid(load_export(tmp).logits(x))
        diff = float(np.abs(got - want).max())
        if not diff <= PARITY_TOL:
            raise LiversegError(
                f"--format {fmt}: the exported network's probabilities differ from the run's by {diff:.3g} "
                f"(more than {PARITY_TOL}); nothing written (report this with the run's config)"
            )
        dataclasses.replace(info, parity={"max_abs_probability_difference": diff, "probe": list(x.shape)}).save(tmp)
        for path in (run.weights, rundir.RunDir(run.root).config, rundir.RunDir(run.root).info):
            (tmp / path.name).write_bytes(path.read_bytes())  # the run may be in a bucket
    return out, diff


def export_ensemble(
    runs: list[Run], out: str | Path, fmt: str = "savedmodel", overwrite: bool = False
) -> tuple[Path, float]:
    """Several runs as one exported ensemble: OUT/member-<i>/ each an export of one run, and
    OUT/liverseg-model.json naming them (`predict --model OUT` averages their probabilities
    on the source grid). Returns (out, the largest parity difference of the members)."""
    if len(runs) == 1:
        return export(runs[0], out, fmt, overwrite)
    check_ensemble(runs)
    out = storage.path(out)
    _check_out(out, overwrite, runs)
    diffs = []
    with new_folder(out, last=(CONTRACT_FILE,)) as tmp:
        names = [f"member-{i}" for i in range(len(runs))]
        for name, run in zip(names, runs):
            diffs.append(export(run, tmp / name, fmt)[1])
        ExportInfo(format=fmt, members=tuple(names), runs=tuple(str(r.root.resolve()) for r in runs)).save(tmp)
    return out, max(diffs)


__all__ = ["ARTIFACTS", "FORMATS", "PARITY_TOL", "export", "export_ensemble", "probe"]
