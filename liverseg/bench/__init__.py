"""Benchmarks (`liverseg bench ...`): throughput measured in one run, printed as a table.

Rates are totals over wall time (total slices / total seconds after warm-up), never
averages of per-step rates. Figures belong in docs/benchmarks.md with the command. One
module per benchmark: `convert`, `pipeline`, `train`, `predict` (prediction engines,
ensembles and metric time), `scale` (every stage from 100 to 10,000 cases).
"""

from __future__ import annotations

from liverseg.bench.convert import bench_convert
from liverseg.bench.pipeline import bench_pipeline
from liverseg.bench.predict import bench_metrics, bench_predict
from liverseg.bench.scale import bench_scale
from liverseg.bench.train import ROWS, bench_train

__all__ = ["ROWS", "bench_convert", "bench_metrics", "bench_pipeline", "bench_predict", "bench_scale", "bench_train"]
