"""`liverseg bench predict` and `liverseg bench metrics`: whole-volume prediction and metric time."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np

from liverseg import LiversegError, config, engines, export, layouts, metrics, models, predict, rundir, volumes
from liverseg.bench.measure import warm
from liverseg.volumes import Source

ENGINE_ROWS = ("tensorflow", "tensorflow-xla", "onnxruntime", "openvino", "openvino-bf16")  # litert: --engine litert


def _untrained_run(config_file, size: int, root: Path) -> Path:
    """A run folder holding an untrained (seeded) network of the recipe at size x size:
    for speed alone, no accuracy."""
    import tensorflow as tf

    from liverseg import unet

    cfg = config.load(config_file)
    lo, hi = cfg.data.hu_window
    channels = 2 * cfg.data.context + 1
    spec = rundir.InputSpec(size, size, channels, cfg.data.context, size, rundir.Normalization(lo, hi, lo, hi - lo))
    tf.keras.utils.set_random_seed(cfg.seed)
    model = unet.build(cfg.model, channels)
    root.mkdir(parents=True)
    rundir.save_config(root, cfg)
    rundir.RunInfo("(untrained: bench predict --config)", "0" * 64, spec).save(root)
    model.save_weights(str(rundir.RunDir(root).final_weights))
    return root


def _exports(runs: list[Path], engines_wanted, tmp: Path) -> dict[str, list[Path]]:
    """The exports the file engines need, per engine (openvino runs its own IR)."""

    need = {"onnxruntime": "onnx", "openvino": "openvino", "openvino-bf16": "openvino", "litert": "litert"}
    made: dict[str, list[Path]] = {}
    out = {}
    for engine in engines_wanted:
        fmt = need.get(engine)
        if fmt and fmt not in made:
            made[fmt] = [export.export(models.load_run(r), tmp / f"{fmt}-{i}", fmt)[0] for i, r in enumerate(runs)]
        if fmt:
            out[engine] = made[fmt]
    return out


def _measure(engine: str, models: list[Path], images: list[Path], masks_out: Path) -> dict:
    """One engine in a fresh process (`python -m liverseg.bench.predict`): seconds per volume
    after one warm-up volume, slices/s, its peak RSS, and its masks saved for comparison."""
    import json
    import os
    import subprocess
    import sys

    job = {
        "engine": engine,
        "models": [str(m) for m in models],
        "images": [str(i) for i in images],
        "masks": str(masks_out),
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL") or "2"}
    r = subprocess.run(
        [sys.executable, "-m", "liverseg.bench.predict", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        return {"error": (lines or [f"exit status {r.returncode}"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss, which Linux
    carries across exec from the parent, it is this program's own)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(job: dict) -> dict:
    engine, paths = job["engine"], [Path(m) for m in job["models"]]
    if engine.startswith("tensorflow"):
        nets = [models.load_run(p).use_engine(engine) for p in paths]
    else:
        nets = [models.load_export(p, engine) for p in paths]
    loaded = [volumes.load_image(Source.nifti(p)) for p in job["images"]]
    predict.predict_image(nets, loaded[0].voxels, loaded[0].header)  # trace, compile and warm up once
    seconds, slices, masks = 0.0, 0, {}
    for i, vol in enumerate(loaded):
        t0 = time.perf_counter()
        mask, _, geom = predict.predict_image(nets, vol.voxels, vol.header)
        seconds += time.perf_counter() - t0
        slices += geom.stored_shape[0]
        masks[f"m{i}"] = mask
    np.savez_compressed(job["masks"], **masks)
    return {"seconds": seconds, "slices": slices, "volumes": len(loaded), "peak_rss_mb": _peak_rss_mb()}


def _unmeasured(engine: str, models: str, why: str) -> dict:
    return {
        "engine": engine,
        "models": models,
        "s/volume": "",
        "slices/s": "",
        "peak RSS MB": "",
        "same mask": "",
        "note": why,
    }


def bench_predict(
    run_dirs=(),
    data: str | Path | None = None,
    cases: int = 3,
    config_file=None,
    size: int | None = None,
    engine_rows=ENGINE_ROWS,
) -> list[dict]:
    """Whole-volume prediction (orientation, 2.5D stacks, network, TTA, back to the source
    grid, post-processing; reading excluded), one row per engine on the same volumes, each
    engine in its own process: seconds per volume, slices/s, peak RSS, and the share of
    voxels whose mask equals the first engine's. With several runs, rows for their ensemble
    (probabilities averaged) follow. The model: `run_dirs`, or an untrained network of
    `config_file` at `size` (speed only)."""
    import tempfile

    found, _ = layouts.find(Path(data))
    images = [pair.image.path for _, pair in sorted(found.items())[:cases]]
    warm(images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="liverseg-bench-predict-") as tmp:
        tmp = Path(tmp)
        runs = [Path(r) for r in run_dirs] or [_untrained_run(config_file, size, tmp / "untrained")]
        available = []
        for engine in engine_rows:
            try:
                engines.require(engine)
                available.append(engine)
            except LiversegError as e:  # a runtime not installed: its row says so
                rows.append(_unmeasured(engine, "", str(e)))
        exported = _exports(runs, available, tmp)
        groups = [("1 run", runs[:1])] + ([(f"ensemble of {len(runs)}", runs)] if len(runs) > 1 else [])
        for label, members in groups:
            reference = None
            for engine in available:
                models = exported[engine][: len(members)] if engine in exported else members
                r = _measure(engine, models, images, tmp / f"{engine}-{len(members)}.npz")
                if "error" in r:
                    rows.append(_unmeasured(engine, label, r["error"]))
                    continue
                masks = np.load(tmp / f"{engine}-{len(members)}.npz")
                same = ""
                if reference is None:
                    reference = masks
                else:
                    equal = sum(int((masks[k] == reference[k]).sum()) for k in masks.files)
                    same = f"{100 * equal / sum(masks[k].size for k in masks.files):.3f}%"
                rows.append(
                    {
                        "engine": engine,
                        "models": label,
                        "s/volume": round(r["seconds"] / r["volumes"], 2),
                        "slices/s": round(r["slices"] / r["seconds"], 1),
                        "peak RSS MB": round(r["peak_rss_mb"]),
                        "same mask": same or "(reference)",
                        "note": "",
                    }
                )
    return rows


def bench_metrics(masks: str | Path, shift: int = 2) -> list[dict]:
    """Metric time per case on real masks, scored against an imperfect 'prediction': the
    mask shifted by `shift` voxels along every axis and eroded once."""
    from scipy import ndimage

    rows = []
    for p in sorted(Path(masks).glob("*_liver.nii*")):
        img = nib.load(str(p))
        ref = np.asanyarray(img.dataobj) > 0
        pred = ndimage.binary_erosion(np.roll(ref, shift, axis=(0, 1, 2)))
        t0 = time.perf_counter()
        m = metrics.case_metrics(pred, ref, img.header.get_zooms()[:3])
        rows.append(
            {
                "case": p.name.split("_liver")[0],
                "shape": "x".join(map(str, ref.shape)),
                "seconds": round(time.perf_counter() - t0, 2),
                "dice": round(m["dice"], 3),
                "hd95 mm": round(m["hd95"], 2),
                "assd mm": round(m["assd"], 2),
            }
        )
    return rows


if __name__ == "__main__":  # one engine's measurement, in its own process (see _measure)
    import json
    import sys

    print(json.dumps(_worker(json.loads(sys.argv[1]))))
