"""`minigpt bench --shared`: how fast training is when the machine is doing other things too.

The same fixed number of steps of the config is trained by real `minigpt train` processes:

* alone, with the thread count fixed at one per core (what a run used before it followed the
  machine's load) and with the thread policy (`train.threads: 0`), twice each in alternating
  rounds, keeping each one's best (the machine's own speed drifts by 10% and more);
* two runs at once, each way;
* one run beside a two-thread matrix-multiply loop (another program that keeps the cores busy
  and does not adapt), each way.

A run's speed is the median of the tokens/s it logged (`perf/tokens_per_sec`, every 10 steps),
so its start-up and last moments, when the other process may not be running, do not count. A
run that has not finished its steps after `seconds` is stopped (SIGTERM: it saves and ends) and
judged by what it logged until then: beside a busy loop, fixed threads can be 100 times slower. The report gives the
ratios the thread policy is judged by: alone against the fixed count (the policy must not cost a
run alone anything), both runs together against one alone, and a run beside the busy loop
against one alone.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from minigpt.benchprep import BenchError, write_corpus
from minigpt.config import Config
from minigpt.device import usable_cores
from minigpt.viz import read_scalars

STEPS = 400  # training steps of each measured run
SECONDS = 90  # at most this long for each measured run
BUSY_LOOP = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\nprint('ready', flush=True)\n"
             "while True:\n    a @ a\n")


def train_command(config: Path, run_dir: Path, corpus: Path, threads: int, steps: int, sets: list[str]) -> list[str]:
    """`minigpt train` for `steps` steps into `run_dir`, logging its speed every 10 steps, evaluating once."""
    overrides = [*sets, "train.time_budget=0", f"train.max_iters={steps}", f"train.eval_interval={steps}",
                 "train.log_interval=10", "train.sample_chars=0", "train.eval_iters=1", f"train.threads={threads}",
                 f"data.path={corpus}", f"data.prepared_dir={run_dir.parent / 'prepared'}", "train.device=cpu"]
    return [sys.executable, "-m", "minigpt", "train", "--config", str(config), "--out-dir", str(run_dir),
            "--overwrite", *[arg for item in overrides for arg in ("--set", item)]]


def tokens_per_s(run_dir: Path) -> float:
    """The median speed a finished run logged."""
    return statistics.median(value for _, value in read_scalars(run_dir, ("perf/tokens_per_sec",))["perf/tokens_per_sec"])


def train_together(commands: list[list[str]], beside_busy_loop: bool = False, seconds: float = SECONDS) -> None:
    """Run the training commands at the same time (beside the busy loop, if asked) and wait for them, stopping
    any still running after `seconds` (it saves and ends, exit code 143)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # each run chooses its own threads, as a user's would
    busy = None
    if beside_busy_loop:
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True, env=env)
        busy.stdout.readline()  # it is running
    try:
        runs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                for c in commands]
        deadline = time.monotonic() + seconds
        for p in runs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        failed = [(p.wait(), p.stderr.read()) for p in runs]
        failed = [err for code, err in failed if code not in (0, 143)]
        if failed:
            raise BenchError(f"a measured training run failed: {failed[0].strip()[-500:]}")
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def run(cfg: Config, config_path: Path, sets: list[str], steps: int = STEPS, seconds: float = SECONDS,
        progress: Callable[[str], None] | None = None) -> dict:
    """Measure every arrangement, fixed and adaptive, and return tokens/s and the ratios."""
    say = progress or (lambda message: None)
    cores = usable_cores()
    report: dict = {"cores": cores, "steps": steps, "seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-shared-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus.txt", 2 * 1024 * 1024)

        def command(label: str, name: str) -> list[str]:
            threads = cores if label == "fixed" else 0
            return train_command(config_path, work / f"{label}-{name}", corpus, threads, steps, sets)

        say("one run alone, fixed and load-following threads in alternating rounds (a machine's speed drifts)")
        for round_, label in enumerate(("fixed", "adaptive", "adaptive", "fixed")):
            train_together([command(label, f"alone{round_}")], seconds=seconds)
            report[f"{label}_alone"] = max(report.get(f"{label}_alone", 0.0), tokens_per_s(work / f"{label}-alone{round_}"))
        for label in ("fixed", "adaptive"):
            say(f"{label} threads: two runs at once")
            train_together([command(label, "a"), command(label, "b")], seconds=seconds)
            report[f"{label}_two_each"] = [tokens_per_s(work / f"{label}-{n}") for n in "ab"]
            say(f"{label} threads: one run beside a 2-thread matrix-multiply loop")
            train_together([command(label, "busy")], beside_busy_loop=True, seconds=seconds)
            report[f"{label}_beside_busy"] = tokens_per_s(work / f"{label}-busy")
    return add_ratios(report)


def add_ratios(report: dict) -> dict:
    """The ratios the policy is judged by, for each way of choosing threads."""
    for label in ("fixed", "adaptive"):
        alone = report[f"{label}_alone"]
        report[f"{label}_two_together_vs_alone"] = sum(report[f"{label}_two_each"]) / alone
        report[f"{label}_beside_busy_vs_alone"] = report[f"{label}_beside_busy"] / alone
    report["adaptive_alone_vs_fixed_alone"] = report["adaptive_alone"] / report["fixed_alone"]
    return report


def format_table(report: dict) -> str:
    """The report as a table: rows per arrangement, a column per way of choosing threads."""
    rows = [("one run alone, tokens/s", "{_alone:,.0f}"),
            ("two at once, each", "{_two_a:,.0f} / {_two_b:,.0f}"),
            ("two at once, together", "{_two_sum:,.0f}"),
            ("  together / alone", "{_two_together_vs_alone:.2f}x"),
            ("beside a 2-thread matmul loop", "{_beside_busy:,.0f}"),
            ("  beside / alone", "{_beside_busy_vs_alone:.2f}x")]
    columns = {}
    for label in ("fixed", "adaptive"):
        values = {k[len(label):]: v for k, v in report.items() if k.startswith(label + "_")}
        values.update(_two_a=values["_two_each"][0], _two_b=values["_two_each"][1], _two_sum=sum(values["_two_each"]))
        columns[label] = [fmt.format(**values) for _, fmt in rows]
    width = max(len(label) for label, _ in rows)
    head = f"{'':<{width}}  {'threads = ' + str(report['cores']):>22}  {'threads follow the load':>24}"
    lines = [head] + [f"{label:<{width}}  {a:>22}  {b:>24}" for (label, _), a, b in zip(rows, *columns.values())]
    lines.append(f"adaptive alone / fixed alone: {report['adaptive_alone_vs_fixed_alone']:.2f}x "
                 f"({report['steps']} steps or {report['seconds']:g} s each, {report['cores']} cores)")
    return "\n".join(lines)
