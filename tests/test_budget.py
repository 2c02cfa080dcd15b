"""Training to a time budget: the derived step count, the rewind after measuring, exact resume, errors."""

import re
import signal

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigpt import budget, checkpoint, training as train_mod
from minigpt.budget import Costs, evaluations, plan_steps
from minigpt.config import duration_seconds
from minigpt.errors import ConfigError, Interrupted
from minigpt.training import train

from conftest import run_cli, tiny_config

FAST = ["train.warmup_iters=2", "train.log_interval=1", "train.sample_chars=0", "train.eval_iters=2", "model.dropout=0.1"]


def scalars(run_dir, tag="train/loss"):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_durations_in_seconds_minutes_and_hours():
    assert [duration_seconds(v) for v in (90, "90", "90s", "5m", "1.5h", 0)] == [90, 90, 90, 300, 5400, 0]
    for bad in ("fast", "-5m", "", "5 minutes"):
        with pytest.raises(ValueError):
            duration_seconds(bad)


@pytest.mark.parametrize("costs", [Costs(elapsed_s=8.0, step_s=0.11, eval_s=1.7), Costs(elapsed_s=30.0, step_s=0.02, eval_s=4.0),
                                   Costs(elapsed_s=2.0, step_s=1.3, eval_s=0.1)])
@pytest.mark.parametrize("budget_s", [60.0, 300.0, 3600.0])
def test_derived_steps_are_the_most_that_fit(costs, budget_s):
    """N steps and their evaluations fit in what is left of the budget; N + 1 would not."""
    interval = 250
    n = plan_steps(budget_s, costs, interval)
    available = budget_s - costs.elapsed_s - budget.margin_s(budget_s)

    def cost(steps):
        return steps * costs.step_s + evaluations(steps, interval) * costs.eval_s

    assert n >= 1 and cost(n) <= available < cost(n + 1)


def test_evaluations_counts_the_final_one():
    assert [evaluations(n, 10) for n in (1, 9, 10, 11, 20, 25)] == [1, 1, 1, 2, 2, 3]


def test_too_short_budget_names_the_minimum_which_then_suffices():
    costs = Costs(elapsed_s=9.0, step_s=0.5, eval_s=3.0)
    with pytest.raises(ConfigError, match=r"time_budget 10s is too short.*give at least (\d+)s") as info:
        plan_steps(10, costs, 100)
    minimum = int(re.search(r"give at least (\d+)s", str(info.value)).group(1))
    assert plan_steps(minimum, costs, 100) >= 1  # the minimum it names is enough
    with pytest.raises(ConfigError):
        plan_steps(minimum - 2, costs, 100)


def test_budget_is_validated_with_the_config(tmp_path, corpus):
    with pytest.raises(ConfigError, match="train.time_budget must be seconds or a duration such as 90s, 5m or 1h, got 'soon'"):
        tiny_config(tmp_path, corpus, "train.time_budget=soon")
    # with a budget, warmup_iters may exceed the max_iters the budget will replace
    assert tiny_config(tmp_path, corpus, "train.time_budget=5m", "train.warmup_iters=5000").train.time_budget == "5m"


def test_config_show_prints_the_budget(tmp_path):
    shown = run_cli("config", "show", "--config", "configs/shakespeare_char_cpu.yaml", "--set", "train.time_budget=90s",
)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["train"]["time_budget"] == "90s"


def fixed_plan(steps):
    """plan_steps as if the measured timings gave `steps` (the measurement itself still runs)."""
    return lambda budget_s, costs, interval: steps


def test_measuring_rewinds_so_a_budgeted_run_equals_the_fixed_step_run(tmp_path, corpus, monkeypatch, capsys):
    """The warm-up steps and the timed evaluation leave no trace: same losses and weights as max_iters=N."""
    monkeypatch.setattr(budget, "plan_steps", fixed_plan(12))
    timed = train(tiny_config(tmp_path / "b", corpus, "train.time_budget=1h", "train.eval_interval=5", *FAST), progress=False)
    first_line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("minigpt:"))
    assert first_line.startswith("minigpt: 12 steps (time budget 1h: ") and "ms/step" in first_line
    fixed = train(tiny_config(tmp_path / "f", corpus, "train.max_iters=12", "train.eval_interval=5", *FAST), progress=False)
    assert timed.step == fixed.step == 12
    assert scalars(timed.run_dir) == scalars(fixed.run_dir)
    assert scalars(timed.run_dir, "val/loss") == scalars(fixed.run_dir, "val/loss") and len(timed.history) == 3
    a, b = (checkpoint.load(r.run_dir, prefer=checkpoint.LAST) for r in (timed, fixed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the derived count is recorded in the run's config.yaml and its checkpoints; no scratch directory is left
    assert yaml.safe_load((timed.run_dir / "config.yaml").read_text())["train"]["max_iters"] == 12
    assert a["config"]["train"]["max_iters"] == 12 and a["config"]["train"]["time_budget"] == "1h"
    assert not [p for p in timed.run_dir.iterdir() if p.name.startswith(".budget-")]


def test_step_time_is_the_median_so_a_pause_during_measuring_does_not_shrink_the_run(tmp_path, corpus, monkeypatch):
    """A clock on which every timed interval is 0.1 s, except one step that the machine stalled for 5 s."""
    calls = {"n": 0}

    def fake_clock():
        calls["n"] += 1
        return calls["n"] * 0.1 + (5.0 if calls["n"] >= 6 else 0.0)  # the jump lands inside the second timed step

    seen = []

    def recording_plan(budget_s, costs, interval):
        seen.append(costs)
        return 12

    monkeypatch.setattr(budget, "clock", fake_clock)
    monkeypatch.setattr(budget, "plan_steps", recording_plan)
    train(tiny_config(tmp_path / "m", corpus, "train.time_budget=60s", *FAST), progress=False)
    # 60 s * 1.5% / 0.1 s: 8 or 9 timed steps (two clock readings each), one of them 5.1 s: a mean of over 0.6 s
    assert calls["n"] in (2 + 2 * 8 + 2, 2 + 2 * 9 + 2) and len(seen) == 1
    assert seen[0].step_s == pytest.approx(0.1 * budget.HEADROOM)


def test_budgeted_run_stopped_and_resumed_equals_one_never_stopped(tmp_path, corpus, monkeypatch):
    sets = ["train.time_budget=1h", "train.eval_interval=5", "train.gradient_accumulation_steps=2", *FAST]
    monkeypatch.setattr(budget, "plan_steps", fixed_plan(20))
    straight = train(tiny_config(tmp_path / "s", corpus, *sets), progress=False)

    real_step, taken = train_mod.train_step, {"n": 0}

    def interrupted_at_10(run):  # a Ctrl-C during step 10 (the loop's steps; measuring calls budget's reference)
        taken["n"] += 1
        if taken["n"] == 10:
            signal.raise_signal(signal.SIGINT)
        return real_step(run)

    monkeypatch.setattr(train_mod, "train_step", interrupted_at_10)
    monkeypatch.setattr(budget, "measure", lambda take_step, evaluate, budget_s, share: Costs(1.0, 0.1, 0.1))
    with pytest.raises(Interrupted, match="stopped by SIGINT at step 10"):
        train(tiny_config(tmp_path / "r", corpus, *sets), progress=False)
    monkeypatch.setattr(train_mod, "train_step", real_step)

    def no_new_plan(*args):
        raise AssertionError("a resumed budgeted run must keep its step count, not measure again")

    monkeypatch.setattr(budget, "plan_steps", no_new_plan)
    monkeypatch.setattr(budget, "measure", no_new_plan)
    resumed = train(tiny_config(tmp_path / "r", corpus, *sets), resume=True, progress=False)
    assert resumed.step == straight.step == 20
    assert scalars(resumed.run_dir) == scalars(straight.run_dir)
    a, b = (checkpoint.load(r.run_dir, prefer=checkpoint.LAST) for r in (straight, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_val_loss"] == b["best_val_loss"]


def test_cli_time_option_sets_the_budget_and_refuses_a_tiny_one(tmp_path, corpus):
    """--time is train.time_budget; a budget the machine cannot meet says the minimum, exit 2, no traceback."""
    result = run_cli("train", "--config", "configs/tiny.yaml", "--set", f"data.path={corpus}",
                     "--set", f"data.prepared_dir={tmp_path / 'prepared'}", "--out-dir", str(tmp_path / "run"),
                     "--time", "1s")
    assert result.returncode == 2
    assert "error: train.time_budget 1s is too short on this machine" in result.stderr and "give at least" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "last.pt").exists()


def test_a_finished_budgeted_run_says_how_to_train_longer(tmp_path, corpus, monkeypatch, capsys):
    """Resuming keeps a budgeted run's recorded count, so the hint must turn the budget off to train longer."""
    monkeypatch.setattr(budget, "plan_steps", fixed_plan(4))
    sets = ["train.time_budget=1h", "train.eval_interval=4", *FAST]
    train(tiny_config(tmp_path, corpus, *sets), progress=False)
    capsys.readouterr()
    assert train(tiny_config(tmp_path, corpus, *sets), resume=True, progress=False).step == 4
    err = capsys.readouterr().err
    assert "already complete at step 4" in err and "--resume --set train.time_budget=0 --set train.max_iters=N" in err
    longer = train(tiny_config(tmp_path, corpus, *sets[1:], "train.time_budget=0", "train.max_iters=6"), resume=True,
                   progress=False)
    assert longer.step == 6
