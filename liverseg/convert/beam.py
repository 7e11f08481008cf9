"""Conversion on Apache Beam: the same checks, records and manifest as the local converter.

Phase 1 (discovery, splits, header checks, the shard plan) runs where the command runs, as
locally. The pipeline then does the per-case work in parallel and writes each shard on one
worker, in case order, so the output is byte-identical to `liverseg convert`:

    cases --Map--> read, check, reorient, encode one case into a segment file
          --GroupByKey(shard)--> append the shard's segments in case order, compressed as
                                 asked (the same bytes as writing the records one by one)
          --ToList--> one step writes the manifest and renames the shards (`output.commit`),
                      only once every shard is complete

Segments and shards live in OUT under temporary names (`shards.TMP_PREFIX`), so OUT
must be a filesystem every worker sees (local for the DirectRunner; a shared mount for
Flink or Spark clusters). A failed pipeline leaves no final-named shard and no manifest:
the driver removes the temporary files.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from liverseg import InputError, LiversegError, storage
from liverseg.convert import prepare, resolve
from liverseg.convert.discover import Case
from liverseg.convert.output import assemble, check_same_sources, commit, locked
from liverseg.convert.shards import (
    TMP_PREFIX,
    ShardJob,
    ShardResult,
    full_disk_named,
    is_temporary,
    write_case,
    writing,
)
from liverseg.manifest import CaseInfo, ConvertOptions, Manifest, SkippedCase

RUNNERS = {"direct": "DirectRunner"}  # short names; any other Beam runner name is passed on as it is


@dataclass(frozen=True)
class Segment:
    """One case's records, framed and uncompressed, in a temporary file (or why it was skipped)."""

    position: int  # the case's place in its shard
    path: str | None
    count: int
    outcome: CaseInfo | SkippedCase


def import_beam():
    """apache_beam, imported quietly (its import logs warnings about optional GCP clients)."""
    try:
        logging.disable(logging.WARNING)
        import apache_beam
    except ImportError:
        raise LiversegError("--runner needs Apache Beam, an optional extra: pip install 'liverseg[beam]'") from None
    finally:
        logging.disable(logging.NOTSET)
    return apache_beam


def _encode(task: tuple[tuple[str, int], int, Case], out: str, opts: ConvertOptions):
    key, position, case = task
    path = storage.path(out) / f"{TMP_PREFIX}case-{case.index:06d}.records"
    result: list = []
    with full_disk_named(out):
        count, _, _ = writing(path, "", lambda w: result.append(write_case(w, case, opts)))
    if isinstance(result[0], SkippedCase):
        path.unlink(missing_ok=True)
        return key, Segment(position, None, 0, result[0])
    return key, Segment(position, str(path), count, result[0])


def _write(keyed, jobs: dict, opts: ConvertOptions) -> ShardResult:
    key, segments = keyed
    job: ShardJob = jobs[key]
    segments = sorted(segments, key=lambda s: s.position)

    def fill(writer) -> None:
        for s in segments:
            if s.path is not None:
                writer.append_framed(storage.path(s.path).read_bytes(), s.count)

    with full_disk_named(job.tmp.parent):
        written = writing(job.tmp, opts.compression, fill)
    for s in segments:
        if s.path is not None:
            storage.path(s.path).unlink()
    return ShardResult.of(job, written, [s.outcome for s in segments])


def _commit(results: list[ShardResult], src: Path, out: str, opts: ConvertOptions, cases, old, runner: str) -> None:
    manifest = assemble(src, opts, cases, results, runner=f"beam:{runner}")
    check_same_sources(storage.path(out), old, manifest, opts)
    commit(storage.path(out), manifest, results)


def pipeline(runner: str, workers: int, args: tuple[str, ...], worker_log: Path):
    """(runner name, beam.Pipeline). "direct" is the Python FnApiRunner, the DirectRunner's
    own engine, used directly (the DirectRunner would first try to download the Prism
    runner), with `workers` worker processes whose start-up chatter goes to `worker_log`."""
    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(
        [f"--runner={runner}", *args] if runner.lower() not in RUNNERS else [f"--direct_num_workers={workers}", *args]
    )
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
    if unknown:  # Beam would only log "Discarding unparseable args" and run without them
        raise LiversegError(
            f"Beam pipeline option(s) {', '.join('--' + u for u in unknown)}: not options of Beam or "
            "of its runners; check their spelling (`python -m apache_beam.examples.wordcount --help` "
            "lists them)"
        )
    if runner.lower() not in RUNNERS:
        try:
            return runner, beam.Pipeline(options=options)
        except ValueError as e:  # "Unexpected pipeline runner: X. Valid values are ..."
            raise LiversegError(f"--runner {runner}: {str(e).splitlines()[0]}") from None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms import environments

    environment = None
    if workers > 1:  # what --direct_running_mode=multi_processing starts, with its stderr in a log file
        environment = environments.SubprocessSDKEnvironment.from_command_string(
            f"LIVERSEG_CONVERTER_PID={os.getpid()} {shlex.quote(sys.executable)} -m liverseg.convert.beam_worker "
            f"2>>{shlex.quote(str(worker_log))}"
        )  # Beam's worker main, ended with this process (beam_worker)
    return RUNNERS[runner.lower()], beam.Pipeline(runner=FnApiRunner(default_environment=environment), options=options)


def convert_beam(src: str | Path, out: str | Path, opts: ConvertOptions, beam_args: tuple[str, ...] = ()) -> Manifest:
    """Convert SRC to OUT on Beam (`opts.runner`: "direct" or a Beam runner name; beam_args:
    its pipeline options). Returns the manifest, as `convert.convert` does."""

    with locked(storage.path(out), Path(src)):
        return _convert_beam(Path(src), storage.path(out), opts, beam_args)


def _convert_beam(src: Path, out: Path, opts: ConvertOptions, beam_args: tuple[str, ...]) -> Manifest:

    beam = import_beam()
    # Beam's INFO/WARNING lines are per-worker chatter, and it logs a failing step's traceback
    # before raising it: the failure is reported once, as one line, by _explained.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    opts = resolve(opts)
    cases, jobs, old = prepare(src, out, opts)
    worker_log = Path(tempfile.gettempdir()) / f"liverseg-beam-workers-{os.getpid()}.log"
    runner, p = pipeline(opts.runner, opts.workers, tuple(beam_args), worker_log)
    by_key = {(j.split, j.ordinal): j for j in jobs}
    tasks = [((j.split, j.ordinal), i, c) for j in jobs for i, c in enumerate(j.cases)]
    keep_log = False
    try:
        with p:
            _ = (
                p
                | "cases" >> beam.Create(tasks, reshuffle=True)
                | "read, check, encode" >> beam.Map(_encode, str(out), opts)
                | "by shard" >> beam.GroupByKey()
                | "write shard" >> beam.Map(_write, by_key, opts)
                | "every shard" >> beam.combiners.ToList()
                | "manifest" >> beam.Map(_commit, src, str(out), opts, cases, old, runner)
            )
        return Manifest.load(out)
    except Exception as e:
        error = _explained(e, worker_log)
        keep_log = "worker output:" in str(error)
        raise error from None
    finally:
        if not keep_log:
            worker_log.unlink(missing_ok=True)
        for p in out.glob(f"{TMP_PREFIX}*"):  # none left after a commit; a failed run's partial files
            if is_temporary(p.name):
                p.unlink(missing_ok=True)


def _explained(e: Exception, worker_log: Path) -> Exception:
    """A failed pipeline as one clear error: the InputError or LiversegError a worker raised
    (Beam re-raises it with the step's name appended), else the first line and the worker log."""
    if isinstance(e, LiversegError):  # raised in this process (one worker): Beam appended the step
        return type(e)(str(e).split(" [while running")[0].strip())
    ours = re.search(
        r"\b(?:liverseg\.)?(?:\w+\.)*(InputError|RecordsError|LiversegError): (.+?)(?: \[while running|\n|$)", str(e)
    )
    if ours:  # raised in a worker process: Beam passes on its traceback as text
        return (InputError if ours.group(1) == "InputError" else LiversegError)(ours.group(2).strip())
    where = f" (worker output: {worker_log})" if worker_log.exists() else ""
    return LiversegError(f"the Beam pipeline failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}{where}")


__all__ = ["RUNNERS", "convert_beam", "import_beam"]
