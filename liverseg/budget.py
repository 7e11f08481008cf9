"""`train.time_budget_min`: the steps a run trains so that its training ends within the budget.

What the budget counts: the training loop's wall time (every call of the step, compilation,
validation, checkpoints, logging), summed over the run's starts; each start adds its time up
to its last checkpoint (`spent_s` in run.json: steps after it are trained again). The
start-up before the loop (imports, building, restoring) is not counted.

How the steps are fixed: after the loop's first two calls (they compile) the clock is marked;
BUDGET_STEPS steps later, and again every REFIX_STEPS steps, the steps are fixed from the
speed since that mark, pauses included, so validation and checkpoints count as they happen:

    steps = done + rate x (budget x (1 - RESERVE) - spent)

at most train.steps and never fewer than the steps already drawn; the learning-rate schedule
spans them. Every worker of a cluster decides at the same step counts, on the mean of their
figures (`agree`).

What a resumed run does with what it is told, each said in one line where it changes
something:

* the same time_budget_min: the budget goes on, its spent time kept; a larger train.steps
  extends the run inside the budget (a budget capped by train.steps is not frozen at that cap);
* another time_budget_min: the new budget holds, counting the time already spent; 0 turns the
  budget off and the run trains to train.steps;
* a budget that is spent before the speed can be measured (smaller than compilation): the run
  stops after its first two calls and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

BUDGET_STEPS = 64  # steps timed after the two calls that compile, before the first fix
REFIX_STEPS = 256  # the steps are fixed again this often, from the speed since the mark
RESERVE = 0.05  # share of the budget kept for the last validation, checkpoint and weights


def clock() -> float:
    """The budget's clock (seconds); tests replace it."""
    return time.perf_counter()


def _same(value: float) -> float:
    return value


@dataclasses.dataclass
class Budget:
    """A run's time budget (see the module docstring): `steps` are the steps it trains now."""

    minutes: float
    cap: int  # train.steps
    steps: int
    spent: float = 0.0  # seconds of the run's earlier starts
    rate: float | None = None  # steps/s, pauses included, of the last fix
    fit: int | None = None  # the steps the budget fits, before the cap
    at_step: int | None = None  # step of the last fix
    agree: Callable[[float], float] = _same  # a figure's mean over the cluster's workers
    start: float = dataclasses.field(default_factory=lambda: clock())  # this start's loop began (set-up ends)
    mark: tuple[int, float] | None = None  # (step, time) after the compiling calls
    next_at: int = 0  # the step count of the next fix
    pause: float = 0.0  # the longest time from one call to the next, after the mark (kept back for the end)
    seen: float = 0.0  # when the last call was seen

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    @classmethod
    def resume(cls, minutes: float, cap: int, stored: dict | None, at: int, agree=_same) -> Budget | None:
        """The budget of a start at step `at` (None: none), from time_budget_min, train.steps
        (`cap`) and what run.json stored; says in one line what a change of either does."""
        if minutes <= 0:
            if stored is not None:
                log.info(
                    "train.time_budget_min=0: this run's %g-minute budget is off; training to train.steps=%d",
                    stored["minutes"],
                    cap,
                )
            return None
        if stored is None:
            if at > 0:
                log.info("train.time_budget_min=%g on a run trained without one: it counts from this start", minutes)
            return cls(minutes, cap, cap, agree=agree)
        rate, fit, old = stored.get("steps_per_s"), stored.get("fit", stored.get("steps")), float(stored["minutes"])
        spent = float(stored.get("spent_s", at / max(rate or 1.0, 1e-9)))  # runs of before spent_s: estimated
        budget = cls(minutes, cap, cap, spent, rate, fit, stored.get("at_step"), agree)
        if minutes != old:
            budget.fit = at + max(0, int(rate * budget.left())) if rate else cap
            log.info(
                "train.time_budget_min %g -> %g: %.1f of the %g minutes spent at step %d; about %d steps (fixed "
                "again from this start's speed)",
                old,
                minutes,
                spent / 60,
                minutes,
                at,
                min(cap, max(at, budget.fit)),
            )
        elif cap != stored.get("cap", cap) and (fit or 0) > at:
            log.info("train.steps=%d: the run trains on inside its %g-minute budget (it fits about %d)", cap, old, fit)
        budget.steps = min(cap, max(at, int(budget.fit or cap)))
        return budget

    def left(self, now: float | None = None) -> float:
        """Seconds of the budget left for steps, less the reserve: RESERVE of it, or twice the
        longest time from one call to the next (a validation with its checkpoint: the run's end
        has one more, and the last steps may hold one), if longer."""
        now = clock() if now is None else now
        return self.seconds - max(RESERVE * self.seconds, 2 * self.pause) - self.spent - (now - self.start)

    def after_call(self, calls: int, at: int, drawn: int, token=None) -> int | None:
        """The loop's one call, after each call of the step: the run's new steps when they were
        fixed (again), else None. `drawn`: the steps drawn so far (at least that many are
        trained); `token`: the call's device value, read to wait for the device before the
        clock is read. Decided at step counts, so every worker decides at the same call."""
        if self.mark is not None:  # the longest time from one call to the next: a validation with its checkpoint
            now = clock()
            self.pause = max(self.pause, now - self.seen)
            self.seen = now
        if self.mark is None:
            if calls < 2:
                return None
            _wait(token)
            now = clock()
            self.mark, self.next_at, self.seen = (at, now), at + BUDGET_STEPS, now
            if self.agree(self.left(now)) > 0:
                return None
            log.warning(
                "train.time_budget_min=%g (%.1f s) was spent before the steps/s could be measured (the first two "
                "calls, which compile, took %.1f s): stopping at step %d",
                self.minutes,
                self.seconds,
                now - self.start,
                drawn,
            )
            return self._fix(drawn, drawn, at, None)
        if at < self.next_at:
            return None
        _wait(token)
        now = clock()
        rate = self.agree((at - self.mark[0]) / max(now - self.mark[1], 1e-9))
        steps = self._fix(at + max(0, int(rate * self.agree(self.left(now)))), drawn, at, rate)
        if self.next_at == self.mark[0] + BUDGET_STEPS:  # the first fix of this start
            log.info(
                "train.time_budget_min=%g: %d steps (%.2f steps/s measured to step %d)", self.minutes, steps, rate, at
            )
        self.next_at = at + REFIX_STEPS
        return steps

    def _fix(self, fit: int, drawn: int, at: int, rate: float | None) -> int:
        self.fit, self.at_step = fit, at
        if rate is not None:
            self.rate = rate
        self.steps = min(self.cap, max(fit, drawn))
        return self.steps

    def record(self) -> dict:
        """What run.json keeps of the budget, at a checkpoint or the end."""
        return {
            "minutes": self.minutes,
            "steps": self.steps,
            "cap": self.cap,
            "fit": self.fit,
            "spent_s": round(self.spent + clock() - self.start, 3),
            "steps_per_s": None if self.rate is None else round(self.rate, 3),
            "at_step": self.at_step,
        }


def _wait(token) -> None:
    if token is not None:
        int(token)


__all__ = ["BUDGET_STEPS", "RESERVE", "REFIX_STEPS", "Budget", "clock"]
