"""`minigpt train --nproc N`: check that the launch can work, then run torchrun as a child process.

torchrun starts N copies of `minigpt train ...` on this machine, each of which joins the process
group described in minigpt.distributed. A time budget counts from this process's start, which
the workers learn through an environment variable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from minigpt import budget
from minigpt.autosize import overrides, resolve
from minigpt.config import Config
from minigpt.distributed import check_gpus, per_rank_batch, process_device, torchrun_env
from minigpt.errors import DeviceError


def check_launch(nproc: int, device: str, batch_size: int) -> None:
    """Refuse a launch that cannot work: no process, more processes than GPUs, an uneven batch, torchrun in torchrun."""
    if nproc < 1:
        raise DeviceError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1:
        return
    per_rank_batch(batch_size, nproc)
    if torchrun_env() is not None:
        raise DeviceError("--nproc launches torchrun, but this process was already launched by torchrun; "
                          "drop --nproc (torchrun's --nproc_per_node sets the number of processes)")
    kind = process_device(device.split(":")[0], 0).type  # rejects mps and unknown names
    if kind == "cuda":
        check_gpus(nproc)


def train_args(config: Path, out_dir: Path | None, device: str | None, set_: list[str] | None, resume: bool,
               resume_from: Path | None, overwrite: bool, init_from: Path | None = None, debug: bool = False) -> list[str]:
    """The `minigpt` arguments that repeat a train command (without --nproc): in each torchrun process, and
    in the command a stopped run prints to continue it."""
    args = (["--debug"] if debug else []) + ["train", "--config", str(config)]
    args += ["--out-dir", str(out_dir)] if out_dir else []
    args += ["--device", device] if device else []
    for item in set_ or []:  # --time is among them, as train.time_budget=...
        args += ["--set", item]
    args += ["--resume"] if resume else []
    args += ["--resume-from", str(resume_from)] if resume_from else []
    args += ["--overwrite"] if overwrite else []
    args += ["--init-from", str(init_from)] if init_from else []
    return args


def sized_once(cfg: Config, set_: list[str] | None, init_from: Path | None) -> list[str]:
    """Choose the config's auto keys here, once, and hand every torchrun process the choice as --set values."""
    resolve(cfg, init_from=str(init_from) if init_from else None)
    return list(set_ or []) + overrides(cfg)


def launch_command(nproc: int, minigpt_args: list[str]) -> list[str]:
    """The torchrun command that runs `minigpt MINIGPT_ARGS` in `nproc` processes on this machine.

    It is torchrun's own code (torch.distributed.run), run by `quiet_torchrun` below: the
    workers say what went wrong in one line each, so torchrun's report of a failed worker (a
    traceback and a table) only repeats it. With --debug, torchrun speaks as usual."""
    runner = ["torch.distributed.run"] if "--debug" in minigpt_args else ["minigpt.launch"]
    return [sys.executable, "-m", *runner, "--standalone", f"--nproc_per_node={nproc}", "-m", "minigpt", *minigpt_args]


def quiet_torchrun(torchrun_args: list[str]) -> int:
    """Run torchrun in this process without its failure report and warnings; the exit code of the first worker
    that failed (2 for a config error, 130 for Ctrl-C, ...), as a single process would have exited."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(torchrun_args))
    except ChildFailedError as exc:
        first = min(exc.failures.values(), key=lambda failure: failure.timestamp)
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # a negative code is a signal
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def launch(nproc: int, minigpt_args: list[str]) -> int:
    """Run torchrun with `nproc` processes as a child process; return its exit code.

    torchrun runs in its own session so that a Ctrl-C reaches it exactly once, from here: it
    passes the signal on to every worker, which save a checkpoint and stop together.
    """
    env = dict(os.environ)
    # torchrun would otherwise set 1 thread per process (with a warning); share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault(budget.START_ENV, str(budget.process_start_time()))  # a time budget counts from this process's start
    child = subprocess.Popen(launch_command(nproc, minigpt_args), env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]  # what the workers exit with when stopped by that signal
    return code


if __name__ == "__main__":  # launch_command's runner: python -m minigpt.launch TORCHRUN_ARGS
    sys.exit(quiet_torchrun(sys.argv[1:]))
