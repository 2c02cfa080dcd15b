"""Training to a time budget: how many steps fit in N minutes on this machine.

With `train.time_budget` set, `train.max_iters` is derived instead of guessed. After the run is
set up, a few real training steps are timed one by one (the first ones, which include compilation
and memory allocation, are left out; the median of the rest is the steady-state time, so a pause
of the machine during a few of them does not shrink the run), then one evaluation with its text
sample, attention image and two checkpoints, written to a scratch directory (timed the second
time: the first one warms up what evaluation uses). This module measures and plans;
minigpt.training applies the plan: it rewinds the run to step 0 from an in-memory snapshot
(weights, optimizer, RNG streams), so the steps taken while measuring change nothing: a budgeted run equals the same config run with
`--set train.max_iters=N`. N is the largest step count whose steps and evaluations fit in what
is left of the budget, counted from the start of the `minigpt train` process.

The derived N is written into the run's config.yaml and every checkpoint; `--resume` keeps it,
so a stopped and resumed budgeted run is the run that was never stopped.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from minigpt.config import TrainConfig, duration_seconds
from minigpt.errors import ConfigError

if TYPE_CHECKING:
    import torch

IMPORT_TIME = time.time()  # fallback start of the process where /proc is not available
START_ENV = "MINIGPT_START_TIME"  # set by `minigpt train --nproc N` for its torchrun workers
FIRST_STEPS = 5  # untimed steps: compilation, allocation, caches
TIMING_FRACTION = 0.015  # of the budget spent timing steady-state steps (between 5 and 200 steps)
clock = time.perf_counter  # replaceable in tests
# Steps are planned at this multiple of the time measured in the first seconds: a machine's speed
# drifts within a run (docs/time-budget.md).
HEADROOM = 1.15


@dataclass
class Costs:
    """What the budget has to pay for, measured on this machine."""

    elapsed_s: float  # from process start to the end of the measurement
    step_s: float  # one optimizer step, steady state (with HEADROOM)
    eval_s: float  # one evaluation with its sample, attention image and checkpoints (with HEADROOM)


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


def evaluations(steps: int, eval_interval: int) -> int:
    """How many evaluations a run of `steps` steps makes (every eval_interval, and at the end)."""
    return steps // eval_interval + (1 if steps % eval_interval else 0)


def plan_steps(budget_s: float, costs: Costs, eval_interval: int) -> int:
    """The most steps whose training and evaluations fit in what is left of the budget."""
    available = budget_s - costs.elapsed_s - margin_s(budget_s)

    def cost(n: int) -> float:
        return n * costs.step_s + evaluations(n, eval_interval) * costs.eval_s

    if available < cost(1):
        minimum = math.ceil(costs.elapsed_s + margin_s(budget_s) + cost(1)) + 1
        raise ConfigError(
            f"train.time_budget {budget_s:g}s is too short on this machine: start-up, data and warm-up took "
            f"{costs.elapsed_s:.1f} s and one step with an evaluation takes {cost(1):.1f} s; "
            f"give at least {minimum}s (e.g. --time {minimum}s)")
    n = int(available // costs.step_s)
    while cost(n) > available:  # each pass drops the evaluations' share; the count only falls
        n = int((available - evaluations(n, eval_interval) * costs.eval_s) // costs.step_s)
    while cost(n + 1) <= available:
        n += 1
    return n


def apply(t: TrainConfig, steps: int) -> None:
    """Set the derived step count; a warmup longer than a quarter of the run is shortened to that."""
    t.max_iters = steps
    t.warmup_iters = min(t.warmup_iters, steps // 4)


def keep_resolved(t: TrainConfig, recorded: dict) -> None:
    """On resume: the step count (and warmup) the run derived when it started, from its checkpoint's config."""
    t.max_iters, t.warmup_iters = recorded["max_iters"], recorded["warmup_iters"]


def measure(take_step: Callable[[], "torch.Tensor"], evaluate: Callable[[], None], budget_s: float,
            share: Callable[[int], int] = lambda n: n) -> Costs:
    """Time steady-state steps and an evaluation (the second of two).

    `take_step()` takes one training step and returns its loss (on the device); `evaluate()`
    makes one evaluation as the run makes them. `share` gives every process rank 0's count of
    timed steps (each step all-reduces gradients, so all must take the same number). The caller
    rewinds the run afterwards: measuring changes nothing it keeps."""
    for _ in range(FIRST_STEPS):
        loss = take_step()
    float(loss)  # waits for the device: what follows is the steady state
    start = clock()
    float(take_step())
    count = min(200, max(5, int(budget_s * TIMING_FRACTION / max(clock() - start, 1e-6))))
    count = share(count)
    times = []
    for _ in range(count):
        start = clock()
        float(take_step())  # waits for the device: each step is timed whole
        times.append(clock() - start)
    step_s = statistics.median(times)  # a few steps slowed by something else on the machine do not count
    evaluate()  # the first one also imports and warms up what evaluation uses (matplotlib, sampling)
    start = clock()
    evaluate()
    eval_s = clock() - start
    return Costs(elapsed_s=time.time() - process_start_time(), step_s=step_s * HEADROOM, eval_s=eval_s * HEADROOM)
