"""Data-parallel training through real torchrun: 2 CPU processes (gloo) against 1 process.

The runs are shared by the tests (module-scoped fixture): a 2-process run of N steps, the same
run in 1 process, an uninterrupted 1-process run of 2N steps, and the 2-process checkpoint
resumed to 2N with 1 process and, interrupted by Ctrl-C, with 2 processes. All runs use the same
learning-rate schedule (lr_decay_iters fixed), so they differ only in how they were split.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import CONFIGS, tiny_config, tiny_sets, write_corpus
from minigpt import checkpoint, distributed, launch
from minigpt.cli import app
from minigpt.errors import ConfigError, DeviceError
from minigpt.training import train

N = 6  # steps of the short runs; the long ones run 2N
# Max |weight difference| between process counts: float32 sums added in another order. Seen: 3e-6 to 7e-6;
# one AdamW step moves a weight by up to learning_rate (3e-3), so a wrong batch split fails by far.
TOLERANCE = 5e-5
COMMON = ["train.threads=1", "train.dtype=float32", "train.warmup_iters=2", f"train.lr_decay_iters={2 * N}",
          f"train.eval_interval={N}",
          "train.eval_iters=1", "train.log_interval=2", "train.sample_chars=8"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def sets(base: Path, corpus: Path, out: str, *extra: str) -> list[str]:
    """Overrides for a run of tiny.yaml on the test corpus, written to base/out."""
    return tiny_sets(base, corpus)[:-2] + [f"train.out_dir={base / out}", "train.device=cpu", *COMMON, *extra]


def cli_args(overrides: list[str]) -> list[str]:
    return ["train", "--config", str(CONFIGS / "tiny.yaml")] + [a for s in overrides for a in ("--set", s)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / checkpoint.LAST)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def interrupt_when_past(proc: subprocess.Popen, log: Path, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Send Ctrl-C (SIGINT) to `proc` once it has saved a checkpoint beyond `step`.

    (Not its progress display: with stderr in a file that is a line every 10% or 30 seconds.)
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.load(run_dir / checkpoint.LAST)["step"] > step:  # written atomically: never half a file
            proc.send_signal(signal.SIGINT)
            return
        time.sleep(0.2)
    raise AssertionError(f"the run never got past step {step}:\n{log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("ddp")
    corpus = write_corpus(base / "corpus.txt")
    out: dict = {"base": base}

    # 2 processes through torchrun itself, on a corpus no process has prepared yet.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minigpt"]
    out["two"] = subprocess.run(torchrun + cli_args(sets(base, corpus, "two", f"train.max_iters={N}")),
                                env=ENV, text=True, capture_output=True, timeout=180)
    assert out["two"].returncode == 0, out["two"].stderr[-3000:]

    # The same run in 1 process, and the uninterrupted reference of 2N steps.
    for name, steps in (("one", N), ("one_long", 2 * N)):
        train(tiny_config(base, corpus, *sets(base, corpus, name, f"train.max_iters={steps}")), progress=False)

    # The 2-process checkpoint resumed to 2N steps by 1 process.
    shutil.copytree(base / "two", base / "two_then_one")
    train(tiny_config(base, corpus, *sets(base, corpus, "two_then_one", f"train.max_iters={2 * N}")),
          resume=True, progress=False)

    # Resumed by 2 processes through `minigpt train --nproc 2`, stopped by Ctrl-C somewhere past 2N.
    shutil.copytree(base / "two", base / "two_then_two")
    log = base / "two_then_two.log"
    total = 100_000
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "minigpt"] + cli_args(
            sets(base, corpus, "two_then_two", f"train.max_iters={total}", f"train.eval_interval={2 * N + 1}"))
            + ["--nproc", "2", "--resume"], env=ENV, text=True, stdout=subprocess.DEVNULL, stderr=stderr)
        interrupt_when_past(proc, log, base / "two_then_two", 2 * N)
        out["two_then_two_code"] = proc.wait(timeout=120)
    out["two_then_two_log"] = log.read_text(errors="replace")
    stopped_at = checkpoint.load(base / "two_then_two" / checkpoint.LAST)["step"]
    out["stopped_at"] = stopped_at
    reference = sets(base, corpus, "one_to_stop", f"train.max_iters={stopped_at}", f"train.eval_interval={stopped_at}")
    train(tiny_config(base, corpus, *reference), progress=False)
    return out


def test_two_processes_match_one(runs):
    """Same config, same data: the 2-process weights equal the 1-process ones up to reduction order."""
    difference = max_difference(weights(runs["base"] / "two"), weights(runs["base"] / "one"))
    print(f"\nmax |w_2proc - w_1proc| after {N} steps: {difference:.3e}")
    assert difference < TOLERANCE
    assert checkpoint.load(runs["base"] / "two" / checkpoint.LAST)["step"] == N


def test_one_set_of_outputs(runs):
    """Rank 0 alone writes the config, the checkpoints, TensorBoard and the log lines."""
    run_dir = runs["base"] / "two"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.")) == \
        ["best.pt", "config.yaml", "last.pt"]
    assert len(event_files(run_dir)) == 1
    assert not list(run_dir.glob(".*tmp*"))
    stderr = runs["two"].stderr
    assert stderr.count(f"step {N}: train loss") == 1
    assert stderr.count("minigpt: ") == 1 and stderr.count("done: step") == 1
    # The checkpoint holds the plain module's weights, loadable without DDP.
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights(run_dir))
    prepared = list((runs["base"] / "prepared").iterdir())
    assert len(prepared) == 1 and not list(prepared[0].glob("*.tmp"))


def test_resume_two_processes_with_one(runs):
    """A checkpoint written by 2 processes continues in 1 exactly like an uninterrupted run."""
    difference = max_difference(weights(runs["base"] / "two_then_one"), weights(runs["base"] / "one_long"))
    print(f"\nmax |w_2->1 - w_uninterrupted| after {2 * N} steps: {difference:.3e}")
    assert difference < TOLERANCE


def test_resume_with_two_and_stop_together_on_ctrl_c(runs):
    """Resumed by `--nproc 2`, a Ctrl-C stops both processes at one step, saved, continuing the run exactly."""
    assert runs["two_then_two_code"] == 130, runs["two_then_two_log"][-3000:]
    stopped_at = runs["stopped_at"]
    assert stopped_at > 2 * N
    assert f"stopped by SIGINT at step {stopped_at}; saved" in runs["two_then_two_log"]
    assert f"resuming {runs['base'] / 'two_then_two' / 'last.pt'} at step {N}" in runs["two_then_two_log"]
    difference = max_difference(weights(runs["base"] / "two_then_two"), weights(runs["base"] / "one_to_stop"))
    print(f"\nmax |w_2->2 (Ctrl-C at step {stopped_at}) - w_uninterrupted|: {difference:.3e}")
    assert difference < TOLERANCE


# ----------------------------------------------------------------------------- bad launches

def minigpt_cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def test_nproc_must_be_positive(tmp_path, corpus):
    result = minigpt_cli(*cli_args(tiny_sets(tmp_path, corpus)), "--nproc", "0")
    assert result.exit_code == DeviceError.exit_code
    assert "--nproc must be at least 1, got 0" in result.output and "Traceback" not in result.output


def test_nproc_beyond_the_gpus(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = minigpt_cli(*cli_args(tiny_sets(tmp_path, corpus)), "--device", "cuda", "--nproc", "2")
    assert result.exit_code == DeviceError.exit_code
    assert "2 processes need 2 GPUs (one each), but this machine has 1; use --nproc 1 or fewer" in result.output


def test_batch_must_split_over_processes(tmp_path, corpus):
    result = minigpt_cli(*cli_args(tiny_sets(tmp_path, corpus)), "--nproc", "3")
    assert result.exit_code == ConfigError.exit_code
    assert "train.batch_size 8 is the global batch and must split evenly over the 3 processes" in result.output


def test_partial_torchrun_environment_names_the_missing_variable(tmp_path, corpus):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": None, "MASTER_PORT": "29500"}
    result = minigpt_cli(*cli_args(tiny_sets(tmp_path, corpus)), env=env)
    assert result.exit_code == DeviceError.exit_code
    assert result.output.startswith("error: incomplete torchrun environment: RANK, LOCAL_RANK, WORLD_SIZE, "
                                    "MASTER_PORT set but MASTER_ADDR missing")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_world_from_the_environment(monkeypatch):
    """No torchrun variables: one process; WORLD_SIZE=1: one process too; an uneven batch is refused before joining."""
    for name in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.current_world("cpu").size == 1
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.current_world("cpu").size == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="must split evenly over the 3 processes"):
        distributed.current_world("cpu", batch_size=8)
    with pytest.raises(DeviceError, match="names one GPU"):
        distributed.process_device("cuda:1", 0)


@pytest.mark.parametrize("nproc, debug", [(2, False), (3, True)])
def test_launch_command_runs_minigpt_with_the_same_arguments_in_n_processes(nproc, debug, monkeypatch):
    """Read the command the way torchrun does (its own parser and launch config): N workers on this one machine,
    each running this Python's `-m minigpt` with exactly the arguments given. Without --debug the runner is
    minigpt.launch, which hands its arguments to torchrun's own run(); here run() only records what it got."""
    import logging

    from torch.distributed import run as torchrun

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it in this process otherwise
    minigpt_args = ["--debug"] * debug + ["train", "--config", "c.yaml", "--set", "train.max_iters=7"]
    command = launch.launch_command(nproc, minigpt_args)
    assert command[:2] == [sys.executable, "-m"]
    runner, torchrun_args = command[2], command[3:]
    if runner == "minigpt.launch":
        given = []
        monkeypatch.setattr(torchrun, "run", given.append)
        torch_logger = logging.getLogger("torch.distributed")
        monkeypatch.setattr(torch_logger, "level", torch_logger.level)  # quiet_torchrun silences it
        assert launch.quiet_torchrun(torchrun_args) == 0
        (parsed,) = given
    else:
        assert runner == "torch.distributed.run" and debug  # torchrun as it is, its reports included
        parsed = torchrun.get_args_parser().parse_args(torchrun_args)
    config, worker, worker_args = torchrun.config_from_args(parsed)
    assert parsed.standalone and config.min_nodes == config.max_nodes == 1
    assert config.nproc_per_node == nproc
    assert worker == sys.executable
    assert worker_args[worker_args.index("-m"):] == ["-m", "minigpt", *minigpt_args]


def test_time_budget_under_two_processes_is_decided_once(tmp_path, corpus):
    """`--nproc 2 --time`: rank 0 measures and plans, both processes follow its plan as it changes (a rank
    taking more steps would wait forever in the gradient all-reduce), and the decisions are recorded. The
    shape is auto: the launcher chooses it once and hands it to both processes (each choosing on its own,
    they could build different networks)."""
    run_dir = tmp_path / "run"
    overrides = tiny_sets(tmp_path, corpus)[:-2] + [f"train.out_dir={run_dir}", "train.device=cpu", "train.threads=1",
                                                    "train.eval_interval=200", "train.eval_iters=1",
                                                    "train.log_interval=50", "train.sample_chars=8",
                                                    "model.n_layer=auto", "model.n_embd=auto", "model.n_head=auto"]
    result = subprocess.run([sys.executable, "-m", "minigpt", *cli_args(overrides), "--nproc", "2", "--time", "45s"],
                            env=ENV, text=True, capture_output=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    first = next(line for line in result.stderr.splitlines() if line.startswith("minigpt:"))
    assert "time budget 45s" in first and int(first.split()[1]) > 10
    recorded = checkpoint.load(run_dir / checkpoint.LAST)
    t = recorded["config"]["train"]
    assert recorded["step"] == t["max_iters"] == t["decay_plan"][-1][1] > 10  # ended where its decay ends
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["train"] == t
    chosen = [line for line in result.stderr.splitlines() if line.startswith("minigpt auto: ")]
    assert len(chosen) == 1 and written["sized"]["reason"] in chosen[0]
    assert written["sized"]["keys"] == ["model.n_layer", "model.n_head", "model.n_embd"]
    assert f"{written['model']['n_layer']} layers x {written['model']['n_embd']}" in chosen[0]
    assert "Traceback" not in result.stderr


def test_a_too_short_budget_under_two_processes_is_one_line_and_exit_2(tmp_path, corpus):
    overrides = tiny_sets(tmp_path, corpus) + ["train.threads=1"]
    result = subprocess.run([sys.executable, "-m", "minigpt", *cli_args(overrides), "--nproc", "2", "--time", "1s"],
                            env=ENV, text=True, capture_output=True, timeout=240)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: train.time_budget 1s is too short"), result.stderr
