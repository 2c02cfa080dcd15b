"""Training to a time budget: a deadline the run follows whatever the machine's speed does.

The plan is tested against hand-computed values; whole runs go on a simulated machine (`Machine`):
its clock moves only when a step or an evaluation is taken, by what that machine charges for it,
so the runs are the real training loop on a real tiny model, and no test depends on how fast the
machine running the tests is.
"""

import re
import signal

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigpt import budget, checkpoint, training
from minigpt.budget import Costs, Deadline, first_plan, fitting_steps, replan
from minigpt.config import TrainConfig, duration_seconds
from minigpt.errors import ConfigError, Interrupted
from minigpt.optim import get_lr
from minigpt.training import train

from conftest import run_cli, tiny_config

FAST = ["train.warmup_iters=2", "train.log_interval=5", "train.sample_chars=0", "train.eval_iters=2", "model.dropout=0.1",
        "train.eval_interval=50"]
START = 1000.0  # the simulated machine's clock when the process started
STEP_S = 0.2  # what a step costs on the simulated machine, unless a test says otherwise


def scalars(run_dir, tag="train/loss"):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ----------------------------------------------------------------------------- the plan, by hand

def test_durations_in_seconds_minutes_and_hours():
    assert [duration_seconds(v) for v in (90, "90", "90s", "5m", "1.5h", 0)] == [90, 90, 90, 300, 5400, 0]
    for bad in ("fast", "-5m", "", "5 minutes"):
        with pytest.raises(ValueError):
            duration_seconds(bad)


def test_fitting_steps_counts_the_evaluations_the_steps_cross():
    # 1 s a step, 2 s an evaluation (every 4 steps and at the end), 10 s: 6 steps + evaluations at 4 and 6 = 10 s
    assert fitting_steps(0, 10, 1, 2, 4) == 6
    # from step 3: 5 steps (4..8) + evaluations at 4 and 8 = 9 s; a sixth step adds one at 9: 12 s
    assert fitting_steps(3, 10, 1, 2, 4) == 5
    assert fitting_steps(0, 2.5, 1, 2, 4) == 0  # one step and its evaluation take 3 s


def test_first_plan_fills_what_is_left_after_start_up_and_the_margin():
    # 100 s - 4 s start-up - 2 s margin = 94 s: 696 steps of 0.125 s (87 s) and 7 evaluations of 1 s
    assert first_plan(100, Costs(elapsed_s=4.0, step_s=0.125, eval_s=1.0), 100) == 696


def test_too_short_budget_names_a_minimum_which_then_suffices():
    costs = Costs(elapsed_s=9.0, step_s=0.5, eval_s=3.0)
    with pytest.raises(ConfigError, match=r"time_budget 10s is too short.*give at least 18s") as info:
        first_plan(10, costs, 100)  # 1.2 x (9 + 0.5 + 3) + 1 = 16 s, with the 1% margin 16.2: 17, and 1 s more
    minimum = int(re.search(r"give at least (\d+)s", str(info.value)).group(1))
    assert first_plan(minimum, costs, 100) >= 1
    assert first_plan(minimum, Costs(elapsed_s=9.0 * 1.15, step_s=0.5, eval_s=3.0), 100) >= 1  # a slower start too


def wsd(**changes) -> TrainConfig:
    t = TrainConfig(max_iters=1000, warmup_iters=10, decay_fraction=0.2, log_interval=10, eval_interval=100,
                    lr_schedule="wsd")
    for key, value in changes.items():
        setattr(t, key, value)
    return t


def test_before_the_decay_the_step_count_follows_the_time_left():
    # at step 100 with 62.5 s left: 460 steps of 0.125 s (57.5 s) + evaluations at 200..500 and 560 (5 s)
    assert replan(wsd(), 100, 62.5, 0.125, 1.0) == (560, [])  # the decay would start at 448: not yet due


def test_the_decay_is_committed_when_it_is_due_before_the_next_decision():
    # at step 340 with 12.5 s left: 84 steps (10.5 s) + evaluations at 400 and 424; the last 20% (85) start at 339
    assert replan(wsd(), 340, 12.5, 0.125, 1.0) == (424, [[340, 424]])


def test_during_the_decay_the_plan_stands_while_it_fits_and_is_cut_short_when_it_does_not():
    t = wsd(max_iters=400, decay_plan=[[320, 400]])
    assert replan(t, 350, 7.5, 0.125, 1.0) == (400, [[320, 400]])  # 50 steps + 1 evaluation: 7.25 s
    # 5 s left: 32 steps (4 s) and the final evaluation; the decay goes on from step 350 to 382
    assert replan(t, 350, 5.0, 0.125, 1.0) == (382, [[320, 400], [350, 382]])


def test_during_the_decay_a_faster_machine_lengthens_it_to_use_the_time():
    t = wsd(max_iters=400, decay_plan=[[320, 400]], learning_rate=1.0, min_lr=0.0, warmup_iters=0)
    # 8.5 s left: 52 steps fit (6.5 s and evaluations at 400 and 402), short of the 63 (a quarter more than the
    # 50 planned) that would lengthen it: the plan stands
    assert replan(t, 350, 8.5, 0.125, 1.0) == (400, [[320, 400]])
    # 12.5 s left: 84 steps (10.5 s) and evaluations at 400 and 434: the decay goes on, slower, to 434
    total, t.decay_plan = replan(t, 350, 12.5, 0.125, 1.0)
    assert (total, t.decay_plan) == (434, [[320, 400], [350, 434]])
    reached = 1 - 30 / 80
    assert get_lr(350, t) == pytest.approx(reached)  # no jump where the longer decay takes over
    assert get_lr(392, t) == pytest.approx(reached / 2)
    assert get_lr(434, t) == 0.0


def test_a_cut_decay_continues_from_the_learning_rate_reached():
    t = wsd(max_iters=382, learning_rate=1.0, min_lr=0.0, warmup_iters=0, decay_plan=[[320, 400], [350, 382]])
    assert get_lr(319, t) == 1.0
    assert get_lr(340, t) == pytest.approx(1 - 20 / 80)
    reached = 1 - 30 / 80  # at step 350, where the second pair takes over
    assert get_lr(350, t) == pytest.approx(reached)
    assert get_lr(366, t) == pytest.approx(reached * (1 - 16 / 32))
    assert get_lr(381, t) == pytest.approx(reached / 32)  # the last step: one 32nd of the way from the floor
    assert get_lr(382, t) == 0.0


def test_a_plan_of_one_pair_is_the_plain_warmup_stable_decay():
    plain = wsd(max_iters=100, decay_fraction=0.3)
    planned = wsd(max_iters=100, decay_fraction=0.3, decay_plan=[[70, 100]])
    assert [get_lr(s, plain) for s in range(100)] == [get_lr(s, planned) for s in range(100)]


def test_the_step_estimate_is_the_latest_interval_or_the_recent_mean_if_slower():
    d = Deadline(end=100.0, step_s=0.5, eval_s=1.0)
    assert d.step_estimate() == 0.5  # nothing measured by the loop yet: start-up's figure
    for seconds in (0.1, 0.1, 0.3):
        d.steps_took(seconds)
    assert d.step_estimate() == 0.1  # before the decay: the median, so one slow interval does not count
    assert d.step_estimate(decaying=True) == 0.3  # in the decay: the latest, slower than the median
    d.steps_took(0.2)
    d.steps_took(0.1)
    assert d.step_estimate(decaying=True) == pytest.approx(0.15)  # the median of the last four: 0.1, 0.3, 0.2, 0.1


def test_a_budget_with_a_schedule_that_cannot_follow_a_deadline_is_refused(tmp_path, corpus):
    with pytest.raises(ConfigError, match="cosine decay over a step count fixed in advance"):
        tiny_config(tmp_path, corpus, "train.time_budget=5m", "train.lr_schedule=cosine")
    with pytest.raises(ConfigError, match="lr_decay_iters fixes where the decay ends"):
        tiny_config(tmp_path, corpus, "train.time_budget=5m", "train.lr_decay_iters=100")
    assert tiny_config(tmp_path, corpus, "train.time_budget=5m").train.lr_schedule == "wsd"  # auto
    assert tiny_config(tmp_path, corpus).train.lr_schedule == "cosine"
    with pytest.raises(ConfigError, match=r"must start inside the decay before it"):
        tiny_config(tmp_path, corpus, "train.decay_plan=[[10, 20], [25, 30]]")


def test_budget_is_validated_with_the_config(tmp_path, corpus):
    with pytest.raises(ConfigError, match="train.time_budget must be seconds or a duration such as 90s, 5m or 1h, got 'soon'"):
        tiny_config(tmp_path, corpus, "train.time_budget=soon")
    # with a budget, warmup_iters may exceed the max_iters the budget will replace
    assert tiny_config(tmp_path, corpus, "train.time_budget=5m", "train.warmup_iters=5000").train.time_budget == "5m"


# ----------------------------------------------------------------------------- whole runs on a simulated machine

class Machine:
    """A machine whose clock moves only by what it charges: `step_s(t)` seconds for a step begun at time t
    (seconds since the process started) and `eval_s` for an evaluation. Start-up took `started_s`."""

    def __init__(self, monkeypatch, step_s, eval_s: float = 0.5, started_s: float = 5.0, on_step=None):
        self.now, self.step_s, self.eval_s, self.on_step, self.steps = START + started_s, step_s, eval_s, on_step, 0
        monkeypatch.setattr(budget, "clock", lambda: self.now)
        monkeypatch.setattr(budget, "wall_clock", lambda: self.now)
        monkeypatch.setattr(budget, "process_start_time", lambda: START)
        real_step, real_evaluation = training.train_step, training.evaluate_and_save

        def step(run):
            self.steps += 1
            if self.on_step:
                self.on_step(self.steps)
            self.now += self.step_s(self.elapsed)
            return real_step(run)

        def evaluation(run, out=None):
            self.now += self.eval_s
            return real_evaluation(run, out)

        monkeypatch.setattr(training, "train_step", step)
        monkeypatch.setattr(training, "evaluate_and_save", evaluation)

    @property
    def elapsed(self) -> float:
        return self.now - START


def budgeted(tmp_path, corpus, seconds=60, *sets, name="run"):
    return tiny_config(tmp_path / name, corpus, f"train.time_budget={seconds}s", *FAST, *sets)


def assert_fully_decayed(run_dir):
    """The run ended where its (last) decay ends, and its config.yaml and last.pt record that plan."""
    final = checkpoint.load(run_dir, prefer=checkpoint.LAST)
    t = final["config"]["train"]
    assert final["step"] == t["max_iters"] == t["decay_plan"][-1][1]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"] == t
    return t


def test_on_a_quiet_machine_the_run_uses_the_budget_and_ends_decayed(tmp_path, corpus, monkeypatch):
    machine = Machine(monkeypatch, lambda t: STEP_S)
    result = train(budgeted(tmp_path, corpus), progress=False)
    assert 0.97 * 60 <= machine.elapsed <= 60
    t = assert_fully_decayed(result.run_dir)
    assert len(t["decay_plan"]) == 1  # committed once, never cut
    start, end = t["decay_plan"][0]
    assert end - start == round(0.2 * end)  # the last decay_fraction of the steps


@pytest.mark.parametrize("slower_s, after_s", [(3 * STEP_S, 24.0), (3 * STEP_S, 50.0), (STEP_S / 3, 24.0),
                                               (STEP_S / 2, 50.0)],
                         ids=["3x-slower-at-40%", "3x-slower-in-the-decay", "3x-faster-at-40%", "2x-faster-in-the-decay"])
def test_a_machine_that_changes_speed_still_ends_on_time_and_decayed(tmp_path, corpus, monkeypatch, slower_s, after_s):
    machine = Machine(monkeypatch, lambda t: slower_s if t >= after_s else STEP_S)
    result = train(budgeted(tmp_path, corpus), progress=False)
    assert machine.elapsed <= 60 * 1.02
    assert machine.elapsed >= 0.94 * 60  # most of it used (a quiet machine's run uses 97%: the test above)
    t = assert_fully_decayed(result.run_dir)
    if after_s > 48:  # the machine changed speed during the decay, which was then cut short or lengthened
        assert len(t["decay_plan"]) >= 2


def test_a_ten_second_stall_costs_steps_not_the_deadline(tmp_path, corpus, monkeypatch):
    machine = Machine(monkeypatch, lambda t: 10.0 if 30.0 <= t < 30.0 + STEP_S else STEP_S)
    result = train(budgeted(tmp_path, corpus), progress=False)
    assert 0.97 * 60 <= machine.elapsed <= 60 * 1.02
    assert_fully_decayed(result.run_dir)


def test_the_recorded_decisions_reproduce_the_run_exactly(tmp_path, corpus, monkeypatch):
    """Measuring is rewound, and config.yaml holds every decision: run again without a budget, it is the same run."""
    Machine(monkeypatch, lambda t: 3 * STEP_S if t >= 50 else STEP_S)  # slows in the decay: a cut pair is part of the plan
    timed = train(budgeted(tmp_path, corpus, name="b"), progress=False)
    t = assert_fully_decayed(timed.run_dir)
    monkeypatch.undo()
    again = train(tiny_config(tmp_path / "f", corpus, *FAST, "train.time_budget=0", f"train.max_iters={t['max_iters']}",
                              f"train.warmup_iters={t['warmup_iters']}", "train.lr_schedule=wsd",
                              f"train.decay_plan={t['decay_plan']}"), progress=False)
    assert scalars(timed.run_dir) == scalars(again.run_dir)
    assert scalars(timed.run_dir, "val/loss") == scalars(again.run_dir, "val/loss")
    a, b = (checkpoint.load(r.run_dir, prefer=checkpoint.LAST) for r in (timed, again))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not [p for p in timed.run_dir.iterdir() if p.name.startswith(".budget-")]  # no scratch directory left


@pytest.mark.parametrize("when", ["after", "before"])
def test_resume_keeps_the_decisions_made(tmp_path, corpus, monkeypatch, when):
    """Stopped after the decay began, the resumed run is bit for bit the run never stopped; stopped before, it
    finishes the recorded step count with the decay that count implies, and nothing is measured again."""
    Machine(monkeypatch, lambda t: STEP_S)
    straight = train(budgeted(tmp_path, corpus, name="s"), progress=False)
    t = assert_fully_decayed(straight.run_dir)
    decay_start = t["decay_plan"][0][0]
    # at a log boundary (every 5 steps), where the run never stopped logs too
    stop_at = (decay_start // 5 + 4) * 5 if when == "after" else decay_start // 10 * 5
    monkeypatch.undo()
    machine = Machine(monkeypatch, lambda t: STEP_S)
    measured = {"steps": None}
    real_measure = budget.measure

    def counting_measure(*args, **kwargs):
        costs = real_measure(*args, **kwargs)
        measured["steps"] = machine.steps
        return costs

    monkeypatch.setattr(budget, "measure", counting_measure)
    # a Ctrl-C during the loop's step `stop_at` (the machine counts measuring's steps too)
    machine.on_step = lambda n: (measured["steps"] is not None and n - measured["steps"] == stop_at
                                 and signal.raise_signal(signal.SIGINT))
    with pytest.raises(Interrupted, match=f"stopped by SIGINT at step {stop_at}"):
        train(budgeted(tmp_path, corpus, name="r"), progress=False)

    def no_new_plan(*args, **kwargs):
        raise AssertionError("a resumed budgeted run keeps its decisions: it neither measures nor plans again")

    monkeypatch.undo()
    monkeypatch.setattr(budget, "measure", no_new_plan)
    monkeypatch.setattr(budget, "replan", no_new_plan)
    resumed = train(budgeted(tmp_path, corpus, name="r"), resume=True, progress=False)
    recorded = checkpoint.load(resumed.run_dir, prefer=checkpoint.LAST)["config"]["train"]
    if when == "after":
        assert resumed.step == straight.step and recorded["decay_plan"] == t["decay_plan"]
        assert scalars(resumed.run_dir) == scalars(straight.run_dir)
        a, b = (checkpoint.load(r.run_dir, prefer=checkpoint.LAST) for r in (straight, resumed))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    else:
        assert recorded["decay_plan"] == [] and resumed.step == recorded["max_iters"] > stop_at


def test_ctrl_c_while_measuring_stops_cleanly_before_anything_is_written(tmp_path, corpus, monkeypatch):
    machine = Machine(monkeypatch, lambda t: 0.1, on_step=lambda n: n == 3 and signal.raise_signal(signal.SIGINT))
    with pytest.raises(Interrupted, match="while measuring the time budget, before training began") as info:
        train(budgeted(tmp_path, corpus), progress=False)
    assert info.value.exit_code == 130 and machine.steps == 3
    assert not (tmp_path / "run" / "run" / "last.pt").exists()


def test_step_time_is_the_median_so_a_pause_during_measuring_does_not_shrink_the_run(tmp_path, corpus, monkeypatch):
    seen = []
    real_plan = budget.first_plan

    def recording_plan(budget_s, costs, interval):
        seen.append(costs)
        return real_plan(budget_s, costs, interval)

    Machine(monkeypatch, lambda t: 5.0 if 5.8 < t < 5.9 else 0.1)  # one of the timed steps stalls for 5 s
    monkeypatch.setattr(budget, "first_plan", recording_plan)
    train(budgeted(tmp_path, corpus), progress=False)
    assert seen[0].step_s == pytest.approx(0.1) and seen[0].eval_s == pytest.approx(0.5)


def test_the_first_line_says_what_was_measured_and_the_budget_as_given(tmp_path, corpus, monkeypatch, capsys):
    Machine(monkeypatch, lambda t: 0.1)
    train(tiny_config(tmp_path, corpus, "train.time_budget=60", *FAST), progress=False)
    first_line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("minigpt:"))
    # start-up 5 s, then 5 untimed steps, 1 to size the timing, 5 timed (1% of 60 s / 0.1 s) and one evaluation
    assert "(time budget 60s: 100.0 ms/step, 0.5 s per evaluation, 6.6 s to start;" in first_line


def test_cli_time_option_sets_the_budget_and_refuses_a_tiny_one(tmp_path, corpus):
    """--time is train.time_budget; a budget the machine cannot meet says the minimum, exit 2, no traceback."""
    result = run_cli("train", "--config", "configs/tiny.yaml", "--set", f"data.path={corpus}",
                     "--set", f"data.prepared_dir={tmp_path / 'prepared'}", "--out-dir", str(tmp_path / "run"),
                     "--time", "1s")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "error: train.time_budget 1s is too short on this machine" in errors[0]
    assert "give at least" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_config_show_prints_the_budget(tmp_path, corpus):
    shown = run_cli("config", "show", "--config", "configs/shakespeare_char_cpu.yaml", "--set", "train.time_budget=90s",
                    "--set", f"data.path={corpus}", "--set", f"data.prepared_dir={tmp_path / 'prepared'}")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["train"]["time_budget"] == "90s"


def test_a_finished_budgeted_run_says_how_to_train_longer(tmp_path, corpus, monkeypatch, capsys):
    """Resuming keeps a budgeted run's recorded count, so the hint must turn the budget off to train longer."""
    Machine(monkeypatch, lambda t: STEP_S)
    done = train(budgeted(tmp_path, corpus, 20), progress=False)
    capsys.readouterr()
    assert train(budgeted(tmp_path, corpus, 20), resume=True, progress=False).step == done.step
    err = capsys.readouterr().err
    assert f"already complete at step {done.step}" in err
    assert "--resume --set train.time_budget=0 --set train.max_iters=N" in err
    longer = train(tiny_config(tmp_path / "run", corpus, *FAST, "train.lr_schedule=wsd",
                               f"train.max_iters={done.step + 2}"), resume=True, progress=False)
    assert longer.step == done.step + 2
