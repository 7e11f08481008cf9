"""The training loop: one GPU, several GPUs (Mirrored) or several hosts (MultiWorkerMirrored).

A custom loop, because Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy (keras
issue 20585). It reads top to bottom:

    set-up   strategy (first), run directory, the training state (`step.build_state`), input
             iterator, checkpoint (restored), the compiled step (`step`), validation, the
             hooks, the time budget (`budget`)
    run      `Trainer.run(until_step)`: calls of `steps_per_call` compiled steps, each also
             copying the next call's batches onto the devices (unless a checkpoint is due);
             after each, the budget's one call, then the hooks (`hooks.Hooks.after_call`:
             log, validate, checkpoint, the non-finite streak, preempt, each when the step
             count crosses its interval). The loop owns its log window and progress bar

* Non-finite steps are skipped on every replica (`step.apply_or_skip`); a streak of
  `max_nonfinite_steps` stops the run naming the steps (checked every that many steps), and
  no checkpoint is written during a streak, so the last checkpoint is good.
* The checkpoint holds model, optimizer, step, best validation Dice and the tf.data
  iterator: re-running on the same run directory continues on the exact next batch (from
  the newest checkpoint that restores, `checkpoints.restore_newest`; the chief holds the run
  lock). Through the tf.data service the iterator cannot be saved: a count of restarts is,
  and each restart reads a freshly seeded job.
* SIGTERM saves a checkpoint and ends with `Preempted` (exit status 42, TF's "preempted,
  restart me" convention); under multi-worker, TF's PreemptionCheckpointHandler
  coordinates the save across workers.
* Only the chief writes into the run directory; other workers checkpoint to a temporary
  folder (deleted at the end) and write no logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf

from liverseg import budget as budget_mod
from liverseg import (
    checkpoints,
    config,
    data_service,
    folds,
    objective,
    outputs,
    pipeline,
    plan,
    rundir,
    step,
    storage,
    unet,
    validation,
)
from liverseg import hooks as hooks_mod
from liverseg.config import Config
from liverseg.hooks import PREEMPTED_EXIT, Hooks, LogWindow, NonFiniteLoss, Preempted, every, stop_requested

log = logging.getLogger(__name__)


class Trainer:
    """Set-up in __init__, then `run(until_step)` (any number of times), then `finish()`;
    `close()` always. `input_transform` (for `liverseg bench train`) maps the training
    dataset before its iterator is made (e.g. one batch held in memory, repeated).

    What the loop keeps between calls is here: `at` (the step count), the log `window`,
    the progress `bar`, `summary` (the last figures the hooks reported) and `paused_total`
    (seconds in validation and checkpoints)."""

    def __init__(
        self,
        cfg: Config,
        run: str | Path,
        progress: bool = True,
        input_transform: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
    ):
        self.cfg, self.paths = cfg, rundir.RunDir(run)
        self.input_transform = input_transform
        self.strategy = step.make_strategy(cfg.train.strategy)  # first: MultiWorkerMirrored must precede any TF op
        tf.keras.utils.set_random_seed(cfg.seed)
        step.set_op_determinism(cfg.deterministic)
        self.chief = step.is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.local = len(self.strategy.extended.worker_devices)
        self.global_batch = plan.global_batch(cfg, self.replicas)
        if self.chief:  # before anything of the run is read or written
            outputs.check_run_folder(self.paths.root, cfg.data.records)
        self.manifest, self.info = self._check_inputs(_earlier(self.paths))
        # The steps this run trains: train.steps, or fewer where a time budget fixes them (`budget`).
        self.planned, self.budget = cfg.train.steps, None
        self.window, self.summary, self.paused_total = hooks_mod.LogWindow(), {}, 0.0
        self.cleanup = contextlib.ExitStack()  # the run lock, a worker's temporary folder: released by close()
        try:
            self._set_up(progress)
        except BaseException:
            self.cleanup.close()
            raise

    def _set_up(self, progress: bool) -> None:
        from tqdm import tqdm

        cfg, tc = self.cfg, self.cfg.train
        self._claim_run()
        self.state = step.build_state(
            cfg,
            self.strategy,
            self.info.input.channels,
            self.planned,
            self.replicas if cfg.data.batch_per_replica else 1,
        )
        manager = self._build_input_and_checkpoint()
        self.run_steps = step.build_train_step(
            cfg,
            self.strategy,
            self.state.model,
            self.state.optimizer,
            self.info.input.normalization,
            self.state.step,
            self.state.figures,
        )
        validating = "val" in self.manifest.splits and tc.eval_every > 0
        if not validating:
            log.warning(
                "no validation (%s): no %s",
                "train.eval_every=0" if tc.eval_every == 0 else f"{self.manifest.root} has no val split",
                self.paths.best_weights.name,
            )
        validator = (
            validation.make_validator(self.state.model, cfg, objective.per_example_loss(tc), self.manifest.num_cases)
            if validating and self.chief
            else None
        )
        self.hooks = Hooks(
            tc=tc,
            paths=self.paths,
            chief=self.chief,
            state=self.state,
            manager=manager,
            sync_bn=step.batch_norm_sync(self.strategy, self.state.model),
            validating=validating,
            validator=validator,
            writers=hooks_mod.writers(cfg, self.paths, self.chief),
            preemption=step.preemption_handler(self.strategy, manager, PREEMPTED_EXIT),
            last_saved=self.at,
            saved=lambda at: self._save_info() if self.budget is not None else None,
        )
        self.bar = tqdm(
            total=self.planned, initial=self.at, desc="train", unit="step", disable=not (progress and self.chief)
        )
        self.budget = budget_mod.Budget.resume(tc.time_budget_min, tc.steps, self.info.budget, self.at, self._agree)
        if self.budget is not None:
            self._plan(self.budget.steps)

    # ------------------------------------------------------------------ set-up

    def _check_inputs(self, earlier: rundir.RunInfo | None) -> tuple:
        """Everything about the inputs that can be checked before anything is written, and the
        run's info: the dataset, the input contract, and what an earlier start of the run
        decided (its time budget, whether its training data was held in memory)."""
        cfg = self.cfg
        manifest = plan.check_training(cfg, self.replicas)
        unet.check_training_input(cfg, *manifest.split("train").slice_shape, manifest.root)
        in_memory = plan.resumed_in_memory(
            cfg, step.input_context(self.strategy), earlier.in_memory if earlier else None, self.paths.root
        )
        return manifest, rundir.RunInfo(
            str(storage.path(cfg.data.records).resolve()),
            manifest.sha256,
            plan.input_spec(cfg, manifest),
            folds=folds.record(manifest, cfg.data),
            budget=earlier.budget if earlier else None,
            in_memory=in_memory,
        )

    def _claim_run(self) -> None:
        """The chief locks the run directory, checks that a resumed run keeps its recipe and its
        dataset, and only then writes config.yaml and run.json."""
        root = self.paths.root
        if not self.chief:
            log.info("not the chief: nothing is written to %s", root)
            return
        self.cleanup.enter_context(rundir.claim(root))
        rundir.check_resume(root, self.cfg)
        rundir.check_dataset(root, self.info)
        rundir.save_config(root, self.cfg)
        self.info.save(root)

    def _dataset(self, restarts: int = 0) -> tf.data.Dataset:
        """This worker's training batches, held in memory as the run decided; on the tf.data
        service, a job of this start's own (`data_service.restarted`)."""
        cfg = config.replace(self.cfg, **{"data.in_memory": "always" if self.info.in_memory else "never"})
        cfg, job = data_service.restarted(cfg, restarts, f"{self.info.manifest_sha256[:12]}-{self.paths.root.name}")
        ds = pipeline.build_dataset(cfg, "train", step.input_context(self.strategy), service_job=job)
        return self.input_transform(ds) if self.input_transform else ds

    def _build_input_and_checkpoint(self) -> tf.train.CheckpointManager:
        """The input iterator and the checkpoint, restored (sets `iterator` and `at`); returns
        the checkpoint manager, which writes this worker's checkpoints."""
        # One plain tf.data iterator per worker, feeding its local replicas: unlike TF's
        # DistributedIterator (not trackable, TF issue 56372) it can be checkpointed, so a
        # resumed run continues on the exact next batch. A cache or the tf.data service
        # cannot be checkpointed: then a resumed run continues with a fresh data order.
        st = self.state
        tracked = {"model": st.model, "optimizer": st.optimizer, "step": st.step, "best": st.best}
        service = self.cfg.data.service
        if service:
            log.warning(
                "data.service %s: the service's position cannot be checkpointed, so a resumed run continues "
                "with a fresh, non-repeating data order, not the exact next batch",
                service,
            )
            restarts = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_restarts")
            tracked["input_restarts"] = restarts
        else:
            self.iterator = iter(self._dataset())
            if self.cfg.data.cache:
                log.warning("data.cache: tf.data cannot checkpoint a cache, so a resumed run restarts the data order")
            else:
                tracked["iterator"] = self.iterator
        ckpt = tf.train.Checkpoint(**tracked)
        ckpt_dir = self.paths.checkpoints
        # Every worker restores from the chief's checkpoints; only the chief repairs them.
        restored = checkpoints.restore_newest(ckpt, ckpt_dir, repair=self.chief)
        if service:
            if restored is not None:
                restarts.assign_add(1)
            self.iterator = iter(self._dataset(int(restarts.numpy())))
        write_dir = ckpt_dir
        if not self.chief:
            resolver = self.strategy.cluster_resolver
            write_dir = checkpoints.worker_checkpoint_dir(self.paths.root, f"{resolver.task_type}{resolver.task_id}")
            self.cleanup.callback(shutil.rmtree, write_dir, ignore_errors=True)
        self.at = int(st.step.numpy())  # the step counter, read once: the loop counts steps itself
        if restored is not None:
            log.info("resumed from %s at step %d", ckpt_dir / f"ckpt-{restored}", self.at)
        return tf.train.CheckpointManager(ckpt, str(write_dir), max_to_keep=self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ the loop

    def run(self, until_step: int) -> None:
        """Train from the current step to `until_step` (to fewer where train.time_budget_min
        fixes the run's steps): calls of steps_per_call steps, the hooks after each (the run's
        end counts as `last`: log, validate, checkpoint)."""
        tc, staged, token, calls = self.cfg.train, [], None, 0
        until = min(until_step, self.planned)
        self.hooks.preempt(self.at, staged=False)  # SIGTERM during set-up
        with pipeline.named_data_errors(self.cfg, "train"):
            while self.at < until:
                before = self.at
                k = len(staged) or min(tc.steps_per_call, until - before)
                batches = staged or self._draw(k)
                after = before + k
                k_next = min(tc.steps_per_call, until - after)
                ahead = (
                    tc.device_prefetch
                    and k_next > 0
                    and not stop_requested()
                    and not every(before, after, tc.checkpoint_every)
                )  # checkpoints see nothing drawn ahead
                upcoming = self._draw(k_next) if ahead else []
                self.hooks.profile(before)
                staged, token = self.window.call(self.run_steps, batches, upcoming, k, token, first=calls == 0)
                calls += 1
                self.at = after
                self.window.steps += k
                self.window.images += k * self.global_batch
                self.bar.update(k)
                planned = self.budget.after_call(calls, after, after + len(staged), token) if self.budget else None
                if planned is not None:
                    until = min(until_step, self._plan(planned))
                self._reported(self.hooks.after_call(before, after, bool(staged), after == until, self.window))

    def _reported(self, report: hooks_mod.Report) -> None:
        """Take in what the hooks did: their figures, a new log window after a log (started now,
        so the hooks' own time is not in it), their pauses."""
        self.paused_total += report.paused
        if report.train is not None:
            means = report.train
            self.bar.set_postfix(
                loss=f"{means['loss']:.4f}",
                dice=f"{means['dice']:.3f}",
                img_s=f"{means['images_per_sec']:.1f}",
                idle=f"{means.get('input_wait_fraction', 0):.0%}",
            )
            self.summary["train"] = means
            self.window = hooks_mod.LogWindow()
        else:
            self.window.paused += report.paused
        if report.validation is not None:
            self.summary["validation"] = report.validation
        if report.best_step is not None:
            self.summary["best_step"] = report.best_step

    def _plan(self, steps: int) -> int:
        """The run's steps are now `steps` (a time budget fixed them): the schedule spans them,
        the bar shows them, run.json keeps the budget (the chief writes it)."""
        self.planned = steps
        self.state.schedule_steps.assign(float(steps))
        self._save_info()
        self.bar.total = steps
        self.bar.refresh()
        return steps

    def _save_info(self, **changes) -> None:
        """run.json with the budget as it stands (and `changes`), written by the chief."""
        budget = self.budget.record() if self.budget is not None else self.info.budget
        self.info = dataclasses.replace(self.info, budget=budget, **changes)
        if self.chief:
            self.info.save(self.paths.root)

    def _agree(self, value: float) -> float:
        """A figure's mean over the cluster's workers (their clocks differ): the same decision everywhere."""
        if self.cfg.train.strategy != "multi_worker":
            return value
        values = self.strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant(value, tf.float64))
        return float(self.strategy.reduce(tf.distribute.ReduceOp.MEAN, values, axis=None).numpy())

    def _draw(self, k: int) -> list:
        t = time.perf_counter()
        if self.cfg.data.service:
            batches = data_service.with_deadline(
                self.cfg.data.service_timeout_s,
                step.draw,
                self.iterator,
                k,
                self.local,
                what=f"no batch from the tf.data service at {self.cfg.data.service} for "
                f"{self.cfg.data.service_timeout_s:g} s (data.service_timeout_s): are its "
                "workers running? (liverseg data-service worker --dispatcher ...)",
            )
        else:
            batches = step.draw(self.iterator, k, self.local)
        self.window.input_wait += time.perf_counter() - t
        return batches

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        self.bar.close()
        self.hooks.close()
        self.cleanup.close()

    def finish(self) -> dict:
        self.hooks.sync_bn()
        best = float(self.state.best.numpy())
        summary = self.summary
        summary.update(
            step=self.at,
            best_val_dice_3d=best if best >= 0 else None,
            weights_fingerprint=unet.weights_fingerprint(self.state.model),
            replicas=self.replicas,
        )
        log.info("finished at step %d, weights %s", self.at, summary["weights_fingerprint"])
        if self.chief:
            unet.save_weights(self.state.model, self.paths.final_weights)
        self._save_info(result={k: v for k, v in summary.items() if k != "train"})
        return summary


def train(cfg: Config, run: str | Path, progress: bool = True) -> dict:
    """Train (or resume) in `run`. Returns the summary also written to RUN/run.json (chief)."""
    trainer: Trainer | None = None

    def resume_point() -> str:
        saved = trainer.hooks.last_saved if trainer is not None and hasattr(trainer, "hooks") else None
        where = rundir.RunDir(run).checkpoints
        if not saved:
            return f"its newest checkpoint in {where}, if any (none was written by this start)"
        return f"step {saved} in {where}"

    # From the strategy's first collective (set-up broadcasts the initial weights) to the last.
    with (
        step.lost_workers_explained(cfg.train.strategy == "multi_worker", resume_point),
        storage.bucket_errors(run, lambda: f"run the same command again: training resumes from {resume_point()}"),
    ):
        trainer = Trainer(cfg, run, progress)
        try:
            with hooks_mod.sigterm_stops(cfg.train.strategy == "multi_worker"):
                trainer.run(cfg.train.steps)
                return trainer.finish()
        finally:
            trainer.close()


def _earlier(paths: rundir.RunDir) -> rundir.RunInfo | None:
    """The run.json of an earlier start of this run, or None."""
    return rundir.RunInfo.load(paths.root) if paths.info.is_file() else None


__all__ = ["LogWindow", "NonFiniteLoss", "PREEMPTED_EXIT", "Preempted", "Trainer", "every", "train"]
