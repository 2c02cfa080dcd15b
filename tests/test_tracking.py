"""Console progress off a terminal: plain lines about every 10% or 30 seconds, with ETA, never a carriage return."""

import io

from minigpt.console import PlainProgress, byte_progress, duration
from minigpt.tracking import Tracker


class FakeClock:
    """A clock the test moves by hand: progress lines do not depend on how fast the machine is."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_come_every_tenth_of_the_run_with_elapsed_and_eta():
    clock, out = FakeClock(), io.StringIO()
    lines = PlainProgress(1000, stream=out, clock=clock)
    for step in range(1, 1001):
        clock.now += 0.1  # fast steps: the 10% rule decides
        lines.update(step, {"loss": f"{3 - step / 1000:.4f}"} if step % 10 == 0 else None)
    text = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in text] == [f"step {n}/1000 ({n // 10}%)" for n in range(100, 1001, 100)]
    assert text[0] == "step 100/1000 (10%), loss 2.9000, elapsed 0:00:10, ETA 0:01:30"  # 900 steps left at 10 steps/s
    assert text[-1].endswith("elapsed 0:01:40, ETA 0:00:00")
    assert "\r" not in out.getvalue()


def test_plain_lines_come_every_thirty_seconds_when_steps_are_slow():
    clock, out = FakeClock(), io.StringIO()
    lines = PlainProgress(1000, initial=500, stream=out, clock=clock)  # a resumed run: rate over this process's steps
    for step in range(501, 561):
        clock.now += 2.0
        lines.update(step)
    steps = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert steps == [515, 530, 545, 560]  # every 30 s = every 15 steps of 2 s
    assert out.getvalue().splitlines()[0].endswith("elapsed 0:00:30, ETA 0:16:10")  # 485 steps left at 0.5 steps/s


def test_tracker_writes_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    clock = FakeClock()
    tracker = Tracker(tmp_path, 0, 20, plain=None, clock=clock)  # pytest's stderr is not a terminal
    for step in range(1, 21):
        clock.now += 1.0
        tracker.advance(step, {"loss": "2.5000", "tok/s": "1,000"} if step % 2 == 0 else None)
    tracker.close()
    err = capsys.readouterr().err
    assert tracker.bar is None and "\r" not in err
    assert err.splitlines()[0] == "step 2/20 (10%), loss 2.5000, tok/s 1,000, elapsed 0:00:02, ETA 0:00:18"
    assert len(err.splitlines()) == 10


def test_prepare_progress_is_plain_off_a_terminal(capsys):
    clock = FakeClock()
    with byte_progress("prepare", plain=True, clock=clock) as progress:
        for done in range(0, 2_000_001, 100_000):
            clock.now += 1.0
            progress(done, 2_000_000)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "prepare 0.2 MB/2.0 MB (10%), elapsed 0:00:03, ETA 0:00:27"
    assert err.splitlines()[-1].startswith("prepare 2.0 MB/2.0 MB (100%)") and "\r" not in err


def test_duration_reads_as_hours_minutes_seconds():
    assert [duration(s) for s in (0, 59.6, 61, 3600 * 27 + 5)] == ["0:00:00", "0:01:00", "0:01:01", "27:00:05"]
