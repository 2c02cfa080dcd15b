"""One writer per directory: a second train or prepare is refused, a SIGKILLed holder blocks nothing, data never tears."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from minigpt import data
from minigpt.cli import app
from minigpt.config import DataConfig
from minigpt.errors import DirectoryInUse
from minigpt.lock import LOCK_NAME, DirectoryLock
from minigpt.training import train

from conftest import CONFIGS, VERSE, tiny_config, tiny_sets, write_corpus

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FAST = ["train.warmup_iters=2", "train.sample_chars=0", "train.eval_iters=2"]


def cli_args(command, tmp_path, corpus, *extra):
    args = [sys.executable, "-m", "minigpt", command, "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp_path, corpus):
        args += ["--set", s]
    return args + list(extra)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_second_train_is_refused_reading_is_not_and_a_sigkilled_run_blocks_nothing(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt")
    run_dir = tmp_path / "run"
    first = subprocess.Popen(cli_args("train", tmp_path, corpus, "--set", "train.max_iters=100000",
                                      "--set", "train.eval_interval=10", *[a for s in FAST for a in ("--set", s)]),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(run_dir / "last.pt", first)
        holder = f"PID {first.pid} on host {socket.gethostname()}, started "
        # A second training run into the same directory, in this process: refused before it writes anything.
        with pytest.raises(DirectoryInUse, match=re.escape(f"{run_dir} is in use by another training run ({holder}")):
            train(tiny_config(tmp_path, corpus, "train.max_iters=4", *FAST), resume=True, progress=False)
        # --overwrite of the run in use, as a real command: one line, exit code 4, at once.
        began = time.time()
        second = subprocess.run(cli_args("train", tmp_path, corpus, "--overwrite"), env=ENV, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 4, second.stderr
        assert second.stderr.count("\n") == 1 and second.stderr.startswith(f"error: {run_dir} is in use by another training run")
        assert holder in second.stderr and "pass another --out-dir" in second.stderr
        assert time.time() - began < 60
        # Reading commands are never blocked.
        info = CliRunner().invoke(app, ["info", "--checkpoint", str(run_dir)])
        assert info.exit_code == 0 and "step:" in info.output
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert (run_dir / LOCK_NAME).read_text().startswith(f"PID {first.pid} ")  # the killed holder's file stays ...
    capsys.readouterr()
    result = train(tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", *FAST),
                   overwrite=True, progress=False)  # ... but the OS dropped its lock
    assert result.step == 4
    err = capsys.readouterr().err
    assert f"note: the lock of {run_dir} was left by PID {first.pid} on host" in err and "ended without releasing it" in err
    assert not (run_dir / LOCK_NAME).exists()  # released at the end of the run


def test_a_failed_start_releases_the_lock_and_leaves_no_empty_run_directory(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "missing.txt")
    with pytest.raises(Exception, match="does not exist"):
        train(cfg, progress=False)
    assert not cfg.run_dir().exists()
    corpus = write_corpus(tmp_path / "c.txt")
    assert train(tiny_config(tmp_path, corpus, "train.max_iters=2", "train.eval_interval=2", *FAST), progress=False).step == 2


def test_prepare_is_refused_while_another_process_writes_the_same_prepared_directory(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    cfg = DataConfig(path=str(corpus), prepared_dir=str(tmp_path / "prepared"))
    out = data.prepared_dir_for([corpus], cfg)
    args = ["prepare", "--config", str(CONFIGS / "tiny.yaml"), "--set", f"data.path={corpus}",
            "--set", f"data.prepared_dir={tmp_path / 'prepared'}", "--force"]
    with DirectoryLock(out, "prepare of this corpus"):
        refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 4
    assert f"{out} is in use by another prepare of this corpus (PID {os.getpid()} on host" in refused.output
    assert not (out / "meta.json").exists()  # nothing was written
    assert CliRunner().invoke(app, args).exit_code == 0  # free again


def test_two_concurrent_prepares_never_tear_the_prepared_data(tmp_path):
    corpus = write_corpus(tmp_path / "big.txt", repeats=60000, text=VERSE + "é")  # ~10 MB: each prepare takes a while
    runs = [subprocess.Popen(cli_args("prepare", tmp_path, corpus, "--force"), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for code, err in results:
        assert code in (0, 4), err
        # the holder is named by its PID once it has written its line ("a process that is just starting" before)
        assert code == 0 or "is in use by another prepare of this corpus (" in err
        assert "\r" not in err  # stderr is not a terminal: plain progress lines
    assert 0 in [code for code, _ in results]
    assert any("prepare (2 passes) " in err and "(100%)" in err for _, err in results)
    # What is on disk is exactly what one undisturbed prepare writes.
    mine = data.prepare(DataConfig(path=str(corpus), prepared_dir=str(tmp_path / "prepared")), block_size=32)
    reference = data.prepare(DataConfig(path=str(corpus), prepared_dir=str(tmp_path / "reference")), block_size=32)
    assert mine.tokenizer.chars == reference.tokenizer.chars
    for split in ("train", "val"):
        assert np.array_equal(mine.tokens(split), reference.tokens(split))
    assert not list(mine.directory.glob("*.tmp")) and not (mine.directory / LOCK_NAME).exists()


def test_a_prepare_that_dies_mid_write_leaves_nothing_that_is_reused(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c.txt")
    cfg = DataConfig(path=str(corpus), prepared_dir=str(tmp_path / "prepared"))
    good = data.prepare(cfg, block_size=8)
    before = np.array(good.tokens("train"))

    def dies(self, text):
        raise KeyboardInterrupt  # stands in for a crash in the middle of pass 2

    monkeypatch.setattr(data.CharTokenizer, "encode_array", dies)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg, block_size=8, force=True)
    monkeypatch.undo()
    assert not (good.directory / "meta.json").exists()  # the old meta.json went first: no reader pairs it with new arrays
    again = data.prepare(cfg, block_size=8)  # rebuilt, not reused half-written
    assert np.array_equal(again.tokens("train"), before)
