"""train.time_budget_min (liverseg.budget): the wall time holds, validation and checkpoints
counted as they happen, and each rule of a resumed run. Time is simulated (each step drawn and
each validation advances a clock by a fixed amount), so nothing here depends on the machine."""

import logging

import pytest

from conftest import smoke
from liverseg import budget, hooks, rundir, step, train


class Clock:
    """Simulated seconds: `per_step` for each training step drawn, `per_validation` for each validation."""

    def __init__(self, monkeypatch, per_step: float, per_validation: float = 0.0):
        self.now = 0.0
        real_draw, real_validate = step.draw, hooks.Hooks.validate

        def draw(iterator, k, local):
            self.now += per_step * k
            return real_draw(iterator, k, local)

        def validate(hooks_self, at):
            self.now += per_validation
            return real_validate(hooks_self, at)

        monkeypatch.setattr(step, "draw", draw)
        monkeypatch.setattr(hooks.Hooks, "validate", validate)
        monkeypatch.setattr(budget, "clock", lambda: self.now)
        monkeypatch.setattr(budget, "BUDGET_STEPS", 8)
        monkeypatch.setattr(budget, "REFIX_STEPS", 8)


def _cfg(dataset, *overrides):
    base = ["train.steps=100000", "train.eval_every=0", "train.checkpoint_every=20", "train.log_every=10"]
    return smoke(dataset, *base, *overrides)


def test_the_budget_holds_the_wall_time_with_validation_counted(dataset, tmp_path, monkeypatch):
    """6 s of budget, 0.05 s per step and 0.5 s per validation every 10 steps: the 114 steps the
    first 8 measured fit would take 8.5 s with their validations; the run ends inside the budget."""
    clock = Clock(monkeypatch, per_step=0.05, per_validation=0.5)
    result = train.train(_cfg(dataset, "train.time_budget_min=0.1", "train.eval_every=10"), tmp_path / "run", False)
    info = rundir.RunInfo.load(tmp_path / "run").budget
    assert 6.0 - 3 * 0.55 <= clock.now <= 6.0, clock.now  # kept back: twice the longest pause (0.55 s)
    assert result["step"] == info["steps"] < 0.95 * 6 / 0.05
    assert info["spent_s"] == pytest.approx(clock.now, abs=0.5)


def test_a_resumed_run_keeps_its_budget_and_its_spent_time(dataset, tmp_path, monkeypatch, terminate):
    clock = Clock(monkeypatch, per_step=0.05)
    cfg = _cfg(dataset, "train.time_budget_min=0.05")  # 3 s: about 57 steps
    real_draw = step.draw

    def draw(iterator, k, local):
        if clock.now >= 1.2:  # SIGTERM as the run's clock passes 1.2 s
            terminate.set()
        return real_draw(iterator, k, local)

    monkeypatch.setattr(step, "draw", draw)
    with pytest.raises(train.Preempted):
        train.train(cfg, tmp_path / "run", False)
    stopped = rundir.RunInfo.load(tmp_path / "run").budget
    assert 1.0 <= stopped["spent_s"] <= 1.4
    terminate.clear()
    monkeypatch.setattr(step, "draw", real_draw)
    resumed = train.train(cfg, tmp_path / "run", False)
    info = rundir.RunInfo.load(tmp_path / "run").budget
    assert resumed["step"] == info["steps"] and 0.85 * 3 <= info["spent_s"] <= 3.0, info
    assert 0.85 * 3 / 0.05 < resumed["step"] <= 3 / 0.05


def test_budget_off_on_resume_trains_to_train_steps_and_says_so(dataset, tmp_path, monkeypatch, caplog):
    Clock(monkeypatch, per_step=0.1)
    train.train(_cfg(dataset, "train.time_budget_min=0.02", "train.steps=200"), tmp_path / "run", False)
    assert rundir.RunInfo.load(tmp_path / "run").budget["steps"] < 12
    with caplog.at_level(logging.INFO, logger="liverseg.budget"):
        result = train.train(_cfg(dataset, "train.time_budget_min=0", "train.steps=30"), tmp_path / "run", False)
    assert result["step"] == 30
    assert "train.time_budget_min=0: this run's 0.02-minute budget is off; training to train.steps=30" in caplog.text


@pytest.mark.slow
def test_a_larger_budget_or_train_steps_extends_the_run(dataset, tmp_path, monkeypatch, caplog):
    """A budget capped by train.steps is not frozen at that cap; a larger budget counts what was spent."""
    clock = Clock(monkeypatch, per_step=0.1)
    run = tmp_path / "run"
    assert train.train(_cfg(dataset, "train.time_budget_min=0.1", "train.steps=20"), run, False)["step"] == 20
    with caplog.at_level(logging.INFO, logger="liverseg.budget"):
        assert train.train(_cfg(dataset, "train.time_budget_min=0.1", "train.steps=40"), run, False)["step"] == 40
        assert "train.steps=40: the run trains on inside its 0.1-minute budget" in caplog.text
        spent = rundir.RunInfo.load(run).budget["spent_s"]
        result = train.train(_cfg(dataset, "train.time_budget_min=0.15"), run, False)
    assert "train.time_budget_min 0.1 -> 0.15" in caplog.text
    assert 0.85 * 9 <= clock.now <= 9.0 and result["step"] > 40 and spent < rundir.RunInfo.load(run).budget["spent_s"]


def test_a_budget_spent_before_it_could_be_measured_stops_and_says_so(dataset, tmp_path, monkeypatch, caplog):
    Clock(monkeypatch, per_step=0.5)
    with caplog.at_level(logging.WARNING, logger="liverseg.budget"):
        result = train.train(_cfg(dataset, "train.time_budget_min=0.01"), tmp_path / "run", False)
    assert result["step"] <= 3  # the two compiling calls, and the one drawn ahead
    assert "train.time_budget_min=0.01 (0.6 s) was spent before the steps/s could be measured" in caplog.text
