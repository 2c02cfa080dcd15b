"""One Ctrl-C outside the training loop, through real processes: a true one-line message and exit 130.

The training loop's own stops (save, `stopped by SIGINT at step N`) and a second Ctrl-C there are
tested in test_faults.py. Here each command is caught in the middle of its work by waiting for
something it does (its first output, a progress line, a blocking read of a FIFO, a lock it waits
for), never by a sleep that has to land in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt.cli import app
from minigpt.exits import STOPPED_WHILE, user_errors
from minigpt.lock import DirectoryLock
from minigpt.training import train

from conftest import CONFIGS, tiny_config, tiny_sets, write_corpus

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("interrupts")
    corpus = write_corpus(tmp / "corpus.txt")
    threads = torch.get_num_threads()
    try:
        result = train(tiny_config(tmp, corpus, "train.max_iters=4", "train.eval_interval=4", "train.warmup_iters=1",
                                   "train.eval_iters=1", "train.sample_chars=0", "train.threads=1"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return result.run_dir


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minigpt", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ctrl_c(proc: subprocess.Popen, already_read: str = "") -> str:
    """Send one SIGINT, wait for the end; the whole stderr."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return already_read + err


def assert_one_true_line(proc: subprocess.Popen, err: str, doing: str) -> str:
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "aborted" not in err and "second interrupt" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped by SIGINT (Ctrl-C) while {doing}"), line
    return line


def test_ctrl_c_while_sampling(run_dir):
    proc = start("sample", "--checkpoint", str(run_dir), "-n", "100000000", "--no-cache")
    assert proc.stdout.read(1)  # generation has started: text is streaming
    line = assert_one_true_line(proc, ctrl_c(proc), "sampling")
    assert "nothing is lost" in line


def test_ctrl_c_while_evaluating(run_dir, tmp_path):
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    proc = start("eval", "--checkpoint", str(run_dir), "--file", str(fifo))
    with open(fifo, "w"):  # opens once eval opens it for reading: eval is then blocked reading the text
        err = ctrl_c(proc)
    line = assert_one_true_line(proc, err, "evaluating")
    assert "nothing is lost" in line and proc.stdout is not None


def test_ctrl_c_while_preparing(tmp_path):
    corpus = write_corpus(tmp_path / "big.txt", repeats=200_000)  # about 30 MB: many progress lines
    args = ["prepare", "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp_path, corpus):
        args += ["--set", s]
    proc = start(*args)
    seen = ""
    while "%" not in seen:  # the first progress line: the first chunk is done, the passes are under way
        line = proc.stderr.readline()
        assert line, f"prepare ended before its first progress line: {seen}"
        seen += line
    line = assert_one_true_line(proc, ctrl_c(proc, seen), "preparing the data")
    assert "minigpt prepare or train starts it again" in line
    # No lock, no half-written arrays, no meta.json (an unfinished preparation is never reused): here nothing at all.
    assert not [p for p in (tmp_path / "prepared").rglob("*") if p.is_file()]


def test_ctrl_c_before_the_training_loop(tmp_path):
    """Train waits for the prepared data's lock (held here): a Ctrl-C then stops it before its first step."""
    corpus = write_corpus(tmp_path / "c.txt")
    from minigpt import data
    from minigpt.config import load

    cfg = load(CONFIGS / "tiny.yaml", tiny_sets(tmp_path, corpus))
    prepared_dir = data.prepared_dir_for(data.resolve_sources(cfg.data), cfg.data)
    lock = DirectoryLock(prepared_dir, "test")
    try:
        args = ["train", "--config", str(CONFIGS / "tiny.yaml")]
        for s in tiny_sets(tmp_path, corpus):
            args += ["--set", s]
        proc = start(*args)
        deadline = time.monotonic() + 120
        while not waits_for_a_lock(proc.pid):  # train has set up its run directory and waits for the data
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        err = ctrl_c(proc)
    finally:
        lock.release()
    line = assert_one_true_line(proc, err, "preparing the data")
    assert "minigpt prepare or train starts it again" in line
    assert not (tmp_path / "run" / ".lock").exists() and not list((tmp_path / "run").glob("*.pt"))


def waits_for_a_lock(pid: int) -> bool:
    """Whether process `pid` is blocked waiting for a flock (Linux lists waiters in /proc/locks as `-> FLOCK ...`)."""
    return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines())


def test_every_command_says_what_a_ctrl_c_stopped(capsys, monkeypatch):
    """Each command has its own line for a Ctrl-C outside the training loop; none says "second interrupt"."""
    import typer
    from typer.main import get_command

    monkeypatch.setattr("minigpt.exits.ignore_further_interrupts", lambda: None)  # keep this process's Ctrl-C
    group = get_command(app)
    names = {c.callback.__name__ for c in group.commands.values() if not hasattr(c, "commands")}
    names |= {c.callback.__name__ for g in group.commands.values() for c in getattr(g, "commands", {}).values()}
    assert names == set(STOPPED_WHILE)
    for name in sorted(names):
        def interrupted():
            raise KeyboardInterrupt
        interrupted.__name__ = name
        with pytest.raises(typer.Exit) as ended:
            user_errors(interrupted)()
        assert ended.value.exit_code == 130
        doing, outcome = STOPPED_WHILE[name]
        assert capsys.readouterr().err == f"stopped by SIGINT (Ctrl-C) while {doing}: {outcome}\n"
