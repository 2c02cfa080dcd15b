"""Training to a time budget: a deadline that the run follows, whatever the machine's speed does.

With `train.time_budget` set, the whole `minigpt train` process, start-up included, ends within
the budget. `measure` times a few real training steps one by one at start-up (the first ones,
which include compilation and memory allocation, are left out; the median of the rest is the
steady-state time) and one evaluation with its text sample, attention image and checkpoints.
`first_plan` turns that into a step count, or refuses a budget that cannot hold one step and one
evaluation, naming a budget that can. The training loop rewinds the run to step 0 after
measuring, so the measured steps change nothing.

Then the plan follows the machine: at every log interval the loop gives `replan` the time left
and the recent seconds per step and per evaluation. Before the warmup-stable-decay schedule's
decay begins, the step count simply moves (the learning rate is flat, so nothing depends on it
yet), and with it the step where the decay will start. Once the decay is due, it is committed
as a [start, end] pair in `train.decay_plan`; if the machine then slows down so much that the end
would miss the deadline, a second pair starts where the run stands and ends sooner: the decay
continues from the current learning rate, faster, and the final model is always a fully decayed
one, never a run cut off in the middle. If the machine gets faster, so that a quarter more steps
than the plan's (and at least a log interval's) would fit, a pair ends later instead: the decay
continues, slower, and the budget's time is not left unused. Every decision is recorded in the
run's config.yaml and checkpoints, so `--resume` keeps them and `--set train.time_budget=0
--set train.max_iters=N --set train.decay_plan=...` reproduces the run exactly.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from minigpt.config import TrainConfig, duration_seconds
from minigpt.errors import ConfigError

if TYPE_CHECKING:
    import torch

IMPORT_TIME = time.time()  # fallback start of the process where /proc is not available
START_ENV = "MINIGPT_START_TIME"  # set by `minigpt train --nproc N` for its torchrun workers
FIRST_STEPS = 5  # untimed steps: compilation, allocation, caches
TIMING_FRACTION = 0.01  # of the budget spent timing steady-state steps (between 3 and 50 steps)
RECENT = 4  # log intervals whose step times make the current estimate
EXTEND = 1.25  # a committed decay is lengthened once this many times its steps left would fit (a faster machine);
# 1.1 lengthened and cut it 8 to 17 times a run on a host whose speed swung by a third from minute to minute
clock = time.perf_counter  # replaceable in tests
wall_clock = time.time  # epoch seconds, to count from the process's start; replaceable in tests


@dataclass
class Costs:
    """What the budget has to pay for, measured on this machine at start-up."""

    elapsed_s: float  # from process start to the end of the measurement
    step_s: float  # one optimizer step, steady state
    eval_s: float  # one evaluation with its sample, attention image and checkpoints


def seconds(t: TrainConfig) -> float:
    """The run's time budget in seconds; 0 means none."""
    return duration_seconds(t.time_budget)


def margin_s(budget_s: float) -> float:
    """Time kept back for the end of the run (final logs, closing files, interpreter exit) and noise."""
    return 1.0 + 0.01 * budget_s


def process_start_time() -> float:
    """When this `minigpt train` process started (epoch seconds): the launcher's start for torchrun workers."""
    if os.environ.get(START_ENV):
        return float(os.environ[START_ENV])
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return IMPORT_TIME


def fitting_steps(step: int, left_s: float, step_s: float, eval_s: float, eval_interval: int) -> int:
    """The most further steps n >= 0 after `step` whose time and evaluations (at multiples of eval_interval
    and at the end) fit in `left_s` seconds."""
    def cost(n: int) -> float:
        if n == 0:
            return 0.0
        due = (step + n) // eval_interval - step // eval_interval + ((step + n) % eval_interval != 0)
        return n * step_s + due * eval_s

    n = max(0, int(left_s // step_s))
    while n and cost(n) > left_s:  # each pass drops the evaluations' share; the count only falls
        n = max(0, min(n - 1, int((left_s - (cost(n) - n * step_s)) // step_s)))
    while cost(n + 1) <= left_s:
        n += 1
    return n


def minimum_budget(costs: Costs) -> int:
    """A budget that surely holds start-up, one step and one evaluation, with room for a slower start next time."""
    need = 1.2 * (costs.elapsed_s + costs.step_s + costs.eval_s) + 1.0  # + margin_s(budget), solved for the budget
    return math.ceil(need / 0.99) + 1


def first_plan(budget_s: float, costs: Costs, eval_interval: int) -> int:
    """The step count planned at start-up; a budget that cannot hold one step and one evaluation is refused."""
    left = budget_s - costs.elapsed_s - margin_s(budget_s)
    steps = fitting_steps(0, left, costs.step_s, costs.eval_s, eval_interval)
    if steps < 1:
        minimum = minimum_budget(costs)
        raise ConfigError(
            f"train.time_budget {budget_s:g}s is too short on this machine: start-up, data and warm-up took "
            f"{costs.elapsed_s:.1f} s and one step with an evaluation takes {costs.step_s + costs.eval_s:.1f} s; "
            f"give at least {minimum}s (e.g. --time {minimum}s)")
    return steps


def replan(t: TrainConfig, step: int, left_s: float, step_s: float, eval_s: float) -> tuple[int, list[list[int]]]:
    """The step count and decay plan for the rest of a budgeted run at `step`, with `left_s` seconds left.

    Before the decay: as many steps as fit, and the decay committed once it is due before the next
    log interval. During the decay: the plan stands while it fits and the time left is not much
    more than it needs; otherwise a new pair, from where the run stands, ends the decay sooner (it
    no longer fits) or later (EXTEND times the steps left, and a log interval more, would fit)."""
    fit = fitting_steps(step, left_s, step_s, eval_s, t.eval_interval)
    if not t.decay_plan:
        total = step + max(fit, 1)
        start = max(t.warmup_iters, total - max(1, round(t.decay_fraction * total)))
        if start > step + t.log_interval:
            return total, []
        return total, [[min(max(start, step), total - 1), total]]
    end = t.decay_plan[-1][1]
    planned = end - step
    if step >= end or planned <= fit < max(EXTEND * planned, planned + t.log_interval):
        return t.max_iters, t.decay_plan
    new_end = step + max(fit, 1)
    return new_end, [*t.decay_plan, [step, new_end]]


def apply(t: TrainConfig, steps: int) -> None:
    """Set the first planned step count; a warmup longer than a quarter of the run is shortened to that."""
    t.max_iters = steps
    t.warmup_iters = min(t.warmup_iters, steps // 4)
    t.decay_plan = []


def keep_resolved(t: TrainConfig, recorded: dict) -> None:
    """On resume: the step count, warmup and decay plan the run had decided, from its checkpoint's config."""
    t.max_iters, t.warmup_iters = recorded["max_iters"], recorded["warmup_iters"]
    t.decay_plan = recorded.get("decay_plan") or []


@dataclass
class Deadline:
    """A budgeted run's end on `clock`, and what its steps and evaluations have cost lately."""

    end: float  # clock() time by which training must be done: the budget's end, less margin_s
    step_s: float  # seconds per step measured at start-up, until the loop has measured its own
    eval_s: float  # seconds per evaluation, the latest measured
    recent: list[float] = field(default_factory=list)  # seconds per step of the last RECENT log intervals

    @classmethod
    def of(cls, budget_s: float, costs: Costs) -> "Deadline":
        """The deadline of a budget counted from this process's start."""
        left = process_start_time() + budget_s - margin_s(budget_s) - wall_clock()
        return cls(end=clock() + left, step_s=costs.step_s, eval_s=costs.eval_s)

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.end - clock()

    def steps_took(self, seconds_per_step: float) -> None:
        self.recent = [*self.recent, seconds_per_step][-RECENT:]

    def evaluation_took(self, seconds: float) -> None:
        self.eval_s = seconds

    def step_estimate(self, decaying: bool = False) -> float:
        """Seconds per step to plan with, from the last few log intervals.

        Before the decay, their median: a stall in one interval does not shrink the run, and a
        lasting change shows within a few intervals (nothing is committed yet). During the decay,
        the deadline comes first: the latest interval's, or their median if that is slower (a
        slowdown that is over, such as threads fighting another process for a moment, does not
        cut the decay short again and again)."""
        if not self.recent:
            return self.step_s
        if not decaying:
            return statistics.median(self.recent)
        return max(self.recent[-1], statistics.median(self.recent))


def measure(take_step: Callable[[], "torch.Tensor"], evaluate: Callable[[], None], budget_s: float,
            share: Callable[[int], int] = lambda n: n) -> Costs:
    """Time steady-state steps and one evaluation.

    `take_step()` takes one training step and returns its loss (on the device); `evaluate()`
    makes one evaluation as the run makes them (the first also imports what evaluation uses and
    lays out the attention figure that later ones only repaint, so it is dearer than the ones the
    loop times later). `share` gives every process rank 0's count
    of timed steps (each step all-reduces gradients, so all must take the same number). The
    caller rewinds the run afterwards: measuring changes nothing it keeps."""
    for _ in range(FIRST_STEPS):
        loss = take_step()
    float(loss)  # waits for the device: what follows is the steady state
    start = clock()
    float(take_step())
    count = share(min(50, max(3, int(budget_s * TIMING_FRACTION / max(clock() - start, 1e-6)))))
    times = []
    for _ in range(count):
        start = clock()
        float(take_step())  # waits for the device: each step is timed whole
        times.append(clock() - start)
    step_s = statistics.median(times)  # a few steps slowed by something else on the machine do not count
    start = clock()
    evaluate()
    eval_s = clock() - start
    return Costs(elapsed_s=wall_clock() - process_start_time(), step_s=step_s, eval_s=eval_s)
