"""Real training processes stopped by signals: Ctrl-C, SIGTERM, a second Ctrl-C, and SIGKILL at random moments."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigpt import checkpoint

from conftest import CONFIGS, tiny_sets, write_corpus

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(tmp_path, corpus, *sets, resume=False, stderr=subprocess.PIPE):
    args = [sys.executable, "-m", "minigpt", "train", "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp_path, corpus) + ["train.warmup_iters=2", "train.sample_chars=0"] + list(sets):
        args += ["--set", s]
    args += ["--resume"] if resume else []
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def weights(run_dir):
    return checkpoint.load(run_dir, prefer=checkpoint.LAST)["model"]


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_saves_checkpoint_and_resume_finishes(tmp_path, sig, code, name):
    corpus = write_corpus(tmp_path / "c.txt")
    proc = start(tmp_path, corpus, "train.max_iters=100000", "train.eval_interval=20")
    wait_for(tmp_path / "run" / "last.pt")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert out == "" and "Traceback" not in err and "error" not in err  # a stop on request is not an error
    line = [l for l in err.splitlines() if l.startswith("stopped by ")][-1]
    assert f"stopped by {name} at step" in line and "continue with: minigpt train --config" in line and "--resume" in line
    step = int(line.split("at step ")[1].split(";")[0])
    assert checkpoint.load(tmp_path / "run", prefer=checkpoint.LAST)["step"] == step >= 20
    resumed = start(tmp_path, corpus, f"train.max_iters={step + 5}", "train.eval_interval=20", resume=True)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert checkpoint.load(tmp_path / "run", prefer=checkpoint.LAST)["step"] == step + 5


def blocked_writing(pid: int) -> bool:
    """Whether the process's main thread sleeps in a write to a full pipe with no SIGINT pending (Linux /proc).

    Read after a SIGINT was sent, it also means that the signal's Python handler has run: the signal woke the
    write (EINTR), and Python runs the handlers before it retries the write and sleeps again.
    """
    task = Path(f"/proc/{pid}/task/{pid}")
    try:
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        waiting_in = (task / "wchan").read_text()
        pending = [int(line.split()[1], 16) for line in (task / "status").read_text().splitlines()
                   if line.startswith(("SigPnd:", "ShdPnd:"))]
    except FileNotFoundError:
        return False  # the process has ended
    return state == "S" and "pipe_write" in waiting_in and not any(p & (1 << (signal.SIGINT - 1)) for p in pending)


def wait_until(condition, what: str, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.01)


def fill(pipe_end: int) -> None:
    """Write NUL bytes to a pipe until it is full, so that the next write to it waits for a reader."""
    # Through a non-blocking file of its own: made non-blocking itself, the child's copy would be too.
    filler = os.open(f"/proc/self/fd/{pipe_end}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for chunk in (b"\0" * 4096, b"\0"):  # big writes first, then the last bytes one by one
            try:
                while True:
                    os.write(filler, chunk)
            except BlockingIOError:
                pass
    finally:
        os.close(filler)


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="reads where a process waits from Linux's /proc")
def test_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The second Ctrl-C lands while the run is stuck inside a step: its stderr is a pipe that the test fills, so
    the step's evaluation line cannot be written until the test reads. Without the abort it would wait there, then
    finish the step, save and report "stopped by SIGINT"; with it, it aborts and saves nothing more."""
    corpus = write_corpus(tmp_path / "c.txt")
    read_end, write_end = os.pipe()
    proc = start(tmp_path, corpus, "train.max_iters=100000", "train.eval_interval=2", "train.eval_iters=1",
                 stderr=write_end)  # the test keeps write_end too
    last = tmp_path / "run" / "last.pt"
    try:
        wait_for(last)
        fill(write_end)
        wait_until(lambda: blocked_writing(proc.pid), "the run waiting to write to its full stderr")
        before = checkpoint.load(last)["step"]
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: blocked_writing(proc.pid), "the first SIGINT's handler running")
        proc.send_signal(signal.SIGINT)
    except BaseException:
        proc.kill()
        raise
    finally:
        os.close(write_end)  # the run's own copy stays open until it ends
    with os.fdopen(read_end, "rb") as stderr:
        err = stderr.read().replace(b"\0", b"").decode()  # until the run has ended; without the test's filling
    proc.wait(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "aborted (second interrupt)" in err and "stopped by" not in err and "Traceback" not in err, err[-2000:]
    assert checkpoint.load(last)["step"] == before  # nothing saved after the abort, and what was saved loads


def test_ctrl_c_after_the_stop_is_ignored_without_a_traceback(tmp_path):
    """Ctrl-C pressed again and again: the first stops the run; those that land while the process exits do nothing
    (one used to print an "Exception ignored in atexit callback" traceback, or kill the process by SIGINT)."""
    corpus = write_corpus(tmp_path / "c.txt")
    proc = start(tmp_path, corpus, "train.max_iters=100000", "train.eval_interval=20")
    wait_for(tmp_path / "run" / "last.pt")
    proc.send_signal(signal.SIGINT)
    err = ""
    while "stopped by SIGINT" not in err:  # read until the stop is reported: the process is on its way out
        line = proc.stderr.readline()
        assert line, f"the run ended without reporting the stop: {err[-2000:]}"
        err += line
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # keep pressing Ctrl-C while it exits
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, err + rest
    assert "Traceback" not in rest and "Exception ignored" not in rest and "aborted" not in rest, rest


def test_sigkill_at_random_moments_then_resume_continues_the_run_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    sets = ["train.max_iters=150", "train.eval_interval=10", "train.log_interval=1", "train.eval_iters=2"]
    rng = random.Random(20261122)
    kills = []
    run_dir = tmp_path / "run"
    for _ in range(4):
        proc = start(tmp_path, corpus, *sets, resume=(run_dir / "last.pt").exists())
        wait_for(run_dir / "config.yaml")
        time.sleep(rng.uniform(0.5, 3.0))
        if proc.poll() is None:
            proc.kill()  # SIGKILL: no handler runs, no cleanup
            kills.append(checkpoint.load(run_dir, prefer=checkpoint.LAST)["step"] if (run_dir / "last.pt").exists() else 0)
        proc.communicate(timeout=60)
    final = start(tmp_path, corpus, *sets, resume=(run_dir / "last.pt").exists())
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert kills, "no kill landed during training"

    payload = checkpoint.load(run_dir, prefer=checkpoint.LAST)
    assert payload["step"] == 150
    # The curve continues: one point per step, no duplicates from the killed processes.
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 151))
    val = [e.value for e in acc.Scalars("val/loss")]
    assert len(val) == 15 and val[-1] < val[0]

    # And it is the very run that was never killed.
    straight_dir = tmp_path / "straight"
    straight = start(tmp_path / "straight", corpus, *sets)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    reference = weights(straight_dir / "run")
    assert all(torch.equal(payload["model"][k], reference[k]) for k in reference)
    print(f"SIGKILLs landed at checkpointed steps {kills}; resumed run equals the uninterrupted one bit for bit")
