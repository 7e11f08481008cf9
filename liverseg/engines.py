"""Inference engines: the network's forward pass, behind one call, in whichever runtime runs it.

An engine maps a batch of network inputs (float32 [N, H, W, 2k+1], normalised and padded to
the network's divisor: `predict.infer_volume` prepares them in NumPy) to liver logits
[N, H, W, 1] as a float32 NumPy array. Everything before and after (orientation, spacing,
2.5D stacks, normalisation, TTA, sigmoid, threshold, components) is NumPy/SciPy shared by
every engine, so an engine is only the network.

ENGINES names them as `bench predict` rows and `predict --engine` do:

tensorflow      the run's Keras model in TensorFlow (eager-free tf.function)
tensorflow-xla  the same, compiled by XLA (jit_compile)
onnxruntime     an ONNX export in ONNX Runtime (`pip install liverseg[onnx]`, no TensorFlow)
openvino        an OpenVINO IR export (or the ONNX one) in the OpenVINO runtime, float32
                (`pip install liverseg[openvino]`, no TensorFlow)
openvino-bf16   the same with bfloat16 inference on CPUs that have it (AVX512-BF16, AMX;
                others run float32): faster, probabilities within ~1e-2, so masks may
                differ at the boundary (`bench predict` counts how many voxels do)
litert          a LiteRT (.tflite) export in the LiteRT interpreter (`pip install liverseg[litert]`)

Only the TensorFlow engines import TensorFlow, and only when built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg import LiversegError

ENGINES = ("tensorflow", "tensorflow-xla", "onnxruntime", "openvino", "openvino-bf16", "litert")
# The runtime module and the extra that installs it, per file engine.
RUNTIMES = {
    "onnxruntime": ("onnxruntime", "onnx"),
    "openvino": ("openvino", "openvino"),
    "openvino-bf16": ("openvino", "openvino"),
    "litert": ("ai_edge_litert", "litert"),
}

Shape = tuple  # [N, H, W, C]: an int where the network takes one size only, None where it takes any


@dataclass(frozen=True)
class Engine:
    """A network in its runtime: float32 [N, H, W, C] -> float32 logits [N, H, W, 1] as NumPy,
    and the input shape the artifact declares (what a contract is checked against)."""

    forward: Callable[[np.ndarray], np.ndarray]
    input_shape: Shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)


def _dims(dims) -> Shape:
    """A runtime's declared dimensions as ints, None for a symbolic or unknown one."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in dims)


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def require(engine: str) -> None:
    """Refuse, in one line naming the extra, an engine whose runtime is not installed."""
    import importlib.util

    module, extra = RUNTIMES.get(engine, ("tensorflow", "cpu"))
    if importlib.util.find_spec(module) is None:
        raise LiversegError(
            f"engine {engine}: its runtime ({module}) is not installed; pip install 'liverseg[{extra}]'"
        )


def keras_engine(model, xla: bool = False) -> Engine:
    """The run's Keras model (TensorFlow), optionally XLA-compiled; input shapes may vary."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True, jit_compile=xla)
    return Engine(lambda x: np.asarray(forward(tf.constant(x)), np.float32), _dims(model.input_shape))


def savedmodel_engine(path: Path) -> Engine:
    """A `liverseg export --format savedmodel` artifact (TensorFlow): its `logits` signature."""
    require("tensorflow")
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["logits"]
    shape = fn.structured_input_signature[1]["slices"].shape.as_list()
    return Engine(lambda x: np.asarray(fn(slices=tf.constant(x))["logits"], np.float32), _dims(shape))


def onnx_engine(path: Path) -> Engine:
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.log_severity_level = 3  # errors only: no "unused initializer" notices on the console
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    return Engine(lambda x: np.asarray(session.run(None, {first.name: x})[0], np.float32), _dims(first.shape))


def openvino_engine(path: Path, precision: str = "f32") -> Engine:
    """float32 by default (OpenVINO would otherwise pick bfloat16 on CPUs that have it);
    precision "bf16" asks for it."""
    require("openvino")
    import openvino as ov

    # LATENCY: one request over all cores (predict sends one batch at a time); measured 7.8
    # against 7.0 (no hint) and 3.6 (THROUGHPUT) slices/s for the default model at 512x512.
    compiled = ov.Core().compile_model(
        str(path),
        "CPU",
        {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": _threads()},
    )
    request = compiled.create_infer_request()
    shape = [d.get_length() if d.is_static else None for d in compiled.input(0).get_partial_shape()]
    return Engine(lambda x: np.array(request.infer([x])[0], np.float32), _dims(shape))


def litert_engine(path: Path) -> Engine:
    require("litert")
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path), num_threads=_threads())
    details = interpreter.get_input_details()[0]
    inp, out = details["index"], interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(x):
        if shape[0] != x.shape:  # the interpreter's tensors are sized per input shape
            interpreter.resize_tensor_input(inp, x.shape, strict=False)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(inp, np.ascontiguousarray(x))
        interpreter.invoke()
        return np.array(interpreter.get_tensor(out), np.float32)

    return Engine(run, _dims(details.get("shape_signature", details["shape"])))


FILE_ENGINES = {
    "savedmodel": savedmodel_engine,
    "onnx": onnx_engine,
    "openvino": openvino_engine,
    "litert": litert_engine,
}
ENGINE_OF_FORMAT = {"savedmodel": "tensorflow", "onnx": "onnxruntime", "openvino": "openvino", "litert": "litert"}


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities, without overflow for large negative logits."""
    logits = np.asarray(logits, np.float32)
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)


__all__ = ["ENGINES", "ENGINE_OF_FORMAT", "FILE_ENGINES", "Engine", "keras_engine", "require", "sigmoid"]
