"""CPU threads that share the cores: the policy's decisions from given load figures, and a run that follows them."""

import subprocess
import sys

import pytest
import torch

from minigpt import device, training
from minigpt.device import ThreadPolicy, choose_threads

from conftest import tiny_config


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("most, cores, busy, threads", [
    (2, 2, 0, 2), (2, 2, 0.4, 2), (2, 2, 0.6, 1), (2, 2, 1, 1), (2, 2, 2, 1), (2, 2, 5, 1),  # at least one
    (4, 8, 2, 4),  # never more than one per physical core (or OMP_NUM_THREADS)
    (8, 8, 3.4, 5), (8, 8, 3.6, 4),
])
def test_threads_are_the_cores_other_processes_leave_free(most, cores, busy, threads):
    assert choose_threads(most, cores, busy) == threads


def test_the_policy_averages_its_samples_and_sets_torchs_thread_count():
    load = iter([0, 0, 2, 2, 1, 2, 0, 1, 0, 0])
    policy = ThreadPolicy(most=2, cores=2, sample=lambda: next(load))
    decisions = []
    for _ in range(5):
        policy.observe()
        policy.observe()
        decisions.append((policy.decide(), torch.get_num_threads()))
    # averages: 0, 2, 1.5, 0.5, 0 busy cores of 2
    assert decisions == [(2, 2), (1, 1), (1, 1), (2, 2), (2, 2)]


def test_between_log_intervals_it_decides_once_a_second_given_a_few_samples():
    now = {"t": 0.0}
    policy = ThreadPolicy(most=2, cores=2, sample=lambda: 2, clock=lambda: now["t"])
    policy.decide()  # at t = 0, with no sample yet: the one it takes now says 2 cores are busy
    assert torch.get_num_threads() == 1
    policy.sample = lambda: 0
    for t in (0.1, 0.2, 0.3, 0.9):
        now["t"] = t
        policy.observe(every_s=0.1)
        assert policy.decide_every(1.0) == 1  # not a second yet
    now["t"] = 1.0
    policy.observe(every_s=0.1)
    assert policy.decide_every(1.0) == 2 == torch.get_num_threads()  # a second, and five samples of a free machine
    now["t"] = 2.5
    assert policy.decide_every(1.0) == 2 and policy.samples == []  # no samples since: no decision


def test_an_explicit_thread_count_wins_and_no_proc_means_every_core():
    assert ThreadPolicy(3, most=2, cores=2, sample=lambda: 2).decide() == 3 == torch.get_num_threads()
    unknown = ThreadPolicy(most=2, cores=2, sample=lambda: None)
    unknown.observe()
    assert unknown.decide() == 2


def test_a_busy_process_beside_this_one_is_counted():
    """busy_elsewhere reads the machine's runnable threads; a spinning child process shows in it."""
    assert device.busy_elsewhere() is not None and device.busy_elsewhere() >= 0
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True)\nwhile True: pass"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert max(device.busy_elsewhere() for _ in range(200)) >= 1
    finally:
        child.kill()
        child.wait()


def test_a_run_changes_its_threads_at_log_boundaries_as_the_load_changes(tmp_path, corpus, monkeypatch):
    torch.set_num_threads(2)
    seen = []
    real_step = training.train_step

    load = {"busy": 0}

    def step(run):  # another process starts working as step 13 begins
        seen.append(torch.get_num_threads())
        load["busy"] = 2 if run.step >= 12 else 0
        return real_step(run)

    monkeypatch.setattr(device, "busy_elsewhere", lambda: load["busy"])
    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    monkeypatch.setattr(training, "train_step", step)
    monkeypatch.setattr(training, "THREAD_SAMPLE_S", 0.0)  # a sample at every step, whatever the steps take
    monkeypatch.setattr(training, "THREAD_DECISION_S", float("inf"))  # decisions at log intervals only
    cfg = tiny_config(tmp_path, corpus, "train.max_iters=30", "train.log_interval=5", "train.eval_interval=30",
                      "train.sample_chars=0", "train.eval_iters=1")
    training.train(cfg, progress=False)
    # two threads until the decision at step 15 sees the other process in 3 of its 5 samples; one after it
    assert seen == [2] * 15 + [1] * 15


def test_the_shared_bench_reports_ratios_of_the_speeds_it_measured():
    from minigpt import benchshared

    report = benchshared.add_ratios({"cores": 2, "steps": 400, "seconds": 90, "fixed_alone": 100.0, "fixed_two_each": [10.0, 12.0],
                                     "fixed_beside_busy": 5.0, "adaptive_alone": 98.0,
                                     "adaptive_two_each": [45.0, 50.0], "adaptive_beside_busy": 49.0})
    assert report["fixed_two_together_vs_alone"] == pytest.approx(0.22)
    assert report["adaptive_two_together_vs_alone"] == pytest.approx(95 / 98)
    assert report["adaptive_beside_busy_vs_alone"] == pytest.approx(0.5)
    assert report["adaptive_alone_vs_fixed_alone"] == pytest.approx(0.98)
    table = benchshared.format_table(report)
    assert "45 / 50" in table and "0.97x" in table and "0.22x" in table and "adaptive alone / fixed alone: 0.98x" in table
