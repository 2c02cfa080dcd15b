"""The training loop and its small helpers.

`train(cfg)` sets up a run (minigpt.run: data, model, optimizer, resume), fits a time budget's
step count if one is set (minigpt.budget measures and plans, `fit_budget` applies the plan), and
then loops in the shape every small GPT trainer shares:

    learning rate for this step -> one optimizer step (get batch, forward, backward, clip, step)
        -> log -> every eval_interval: evaluate and checkpoint -> stop on a signal

Exact resume: batch offsets come from a seeded generator whose state, together with torch's
RNG (dropout), the optimizer, the step and the best validation loss, is saved in every
checkpoint. Evaluation and text samples draw from their own freshly seeded generators, so they
never disturb the training stream. Resuming from step N therefore continues exactly the run
that was never stopped.
"""

from __future__ import annotations

import copy
import time
import math
import shlex
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from minigpt import budget, checkpoint, config as config_mod
from minigpt.config import Config
from minigpt.console import duration
from minigpt.distributed import current_world
from minigpt.errors import ConfigError, Interrupted, MiniGPTError, TrainingError
from minigpt.evaluation import Outputs, evaluate_and_save, log_hparams
from minigpt.optim import get_lr, set_lr
from minigpt.run import Run, start_run, write_run_dir
from minigpt.signals import StopSignals
from minigpt.tracking import Tracker


THREAD_SAMPLE_S = 0.1  # seconds between samples of the machine's load: one costs about 0.1-0.3 ms
THREAD_DECISION_S = 1.0  # seconds between decisions on the thread count (also made at every log interval)


@dataclass
class TrainResult:
    """What a finished (or already complete) run reports."""

    run_dir: Path
    step: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)  # per evaluation: step, losses, val_bpc, time_s (s since train began)


def train(cfg: Config, resume: str | bool = False, overwrite: bool = False, progress: bool = True,
          resume_hint: str = "minigpt train --config CONFIG --resume", init_from: str | None = None) -> TrainResult:
    """Train the model described by `cfg`; write config, checkpoints and TensorBoard events to its run dir.

    `resume_hint` is the command shown to the user after an interrupt; `init_from` (a checkpoint
    or run directory) starts from that model's weights instead of random ones. Launched by torchrun, this
    process trains its share of every batch and leaves the process group at the end.
    """
    started = time.perf_counter()
    world = current_world(cfg.train.device, cfg.train.batch_size)
    finished = False
    try:
        run = start_run(cfg, world, resume, overwrite, init_from)
        run.started = started  # history's time_s counts from here, data preparation included
        signals = StopSignals()
        try:
            with signals.installed():
                measured = fit_budget(run, signals) if budget.seconds(cfg.train) and not resume else None
                if world.is_main:
                    write_run_dir(cfg)  # the resolved config, with the planned step count
                open_progress(run, progress, measured)
                training_loop(run, signals, resume_hint)
            log_hparams(run)
        finally:
            run.close()  # the progress display, TensorBoard, and the run directory's lock
        run.say(f"done: step {run.step}, best val loss {run.best_val_loss:.4f} "
                f"({run.best_val_loss / math.log(2):.4f} bits/char); checkpoints in {run.run_dir}\n"
                f"  sample:      {sample_command(run.run_dir, run.tokenizer.decode(run.tokens['val'][:256]))}\n"
                f"  tensorboard: tensorboard --logdir {run.run_dir}")
        finished = True
        return TrainResult(run_dir=run.run_dir, step=run.step, best_val_loss=run.best_val_loss, history=run.history)
    except MiniGPTError as exc:
        finished = exc.agreed or isinstance(exc, (Interrupted, TrainingError))  # every process stops with it
        raise
    finally:
        world.shutdown(wait_for_all=finished)  # a process leaving while a peer still talks to it makes the peer abort


def fit_budget(run: Run, signals: StopSignals) -> budget.Costs:
    """Plan train.max_iters for the time budget: rank 0 measures and decides, every process uses its number.

    The measured steps and evaluations are undone: the run is rewound to the snapshot taken
    before them, and the evaluations wrote into a scratch directory that is then removed. A
    Ctrl-C while measuring stops at once: nothing has been trained yet."""
    budget_s = budget.seconds(run.cfg.train)
    snapshot = copy.deepcopy(run.state())
    scratch = Path(tempfile.mkdtemp(prefix=".budget-", dir=run.run_dir if run.world.is_main else None))  # rank 0 writes
    tracker = Tracker(scratch, 0, 1, enabled=run.world.is_main, progress=False)

    def step() -> torch.Tensor:
        if run.world.any(signals.received is not None):
            name = "SIGINT" if signals.received == signal.SIGINT else "SIGTERM"
            stopped = Interrupted(f"stopped by {name} while measuring the time budget, before training began; "
                                  "nothing was trained or saved")
            stopped.exit_code = 130 if signals.received == signal.SIGINT else 143
            raise stopped
        return train_step(run)[0]

    def evaluation() -> None:
        run.best_val_loss = math.inf  # so that the timed evaluation writes best.pt as well as last.pt
        evaluate_and_save(run, Outputs(tracker, scratch, say=lambda message: None))

    try:
        costs = budget.measure(step, evaluation, budget_s, run.world.share)
    finally:
        tracker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    run.restore(snapshot)
    run.history.clear()
    refusal, steps = None, 0
    if run.world.is_main:
        try:
            steps = budget.first_plan(budget_s, costs, run.cfg.train.eval_interval)
        except ConfigError as exc:
            refusal, exc.agreed = exc, True
    steps = run.world.share(steps)
    if steps < 1:  # every process stops, rank 0 with the reason (the others' error is not printed)
        raise refusal or ConfigError("the time budget is too short (process 0 says why)", agreed=True)
    budget.apply(run.cfg.train, steps)
    run.deadline = budget.Deadline.of(budget_s, costs)
    return costs


def open_progress(run: Run, progress: bool = True, measured: budget.Costs | None = None) -> None:
    """Say what is about to run in one line (with what the time budget measured), then open the tracker."""
    t = run.cfg.train
    fitted = (f" (time budget {config_mod.duration_text(t.time_budget)}: {measured.step_s * 1000:.1f} ms/step, "
              f"{measured.eval_s:.1f} s per evaluation, {measured.elapsed_s:.1f} s to start; the plan follows the "
              "machine's speed)") if measured else ""
    threads = "" if run.device.type != "cpu" else (f", {torch.get_num_threads()} threads"
                                                    f"{'' if t.threads else ' (following the machine load)'}")
    run.say(f"minigpt: {t.max_iters} steps{fitted}, {run.model.num_params() / 1e6:.2f}M parameters, "
            f"{run.tokens_per_step} tokens/step, device {run.device}, dtype {run.precision.name}, "
            f"{'fused' if run.fused_attention else 'explicit'} attention{', compiled' if run.compiled else ''}, {t.optimizer}"
            f"{threads}, vocab {run.tokenizer.vocab_size}, "
            f"{run.data_meta['train_tokens']:,} train / {run.data_meta['val_tokens']:,} val characters -> {run.run_dir}")
    if out_of_patience(run):
        run.say(f"the run stopped early at step {run.step}: {run.evals_since_best} evaluations without a better val "
                f"loss (train.patience {t.patience}); to train on: --resume --set train.patience=0")
    elif run.step >= t.max_iters:
        unbudgeted = " --set train.time_budget=0" if budget.seconds(t) else ""  # else the recorded count is kept
        run.say(f"the run is already complete at step {run.step} (train.max_iters {t.max_iters}); "
                f"to train longer: --resume{unbudgeted} --set train.max_iters=N with N > {run.step}")
    run.tracker = Tracker(run.run_dir, run.step, t.max_iters, enabled=run.world.is_main,
                          progress=progress and run.step < t.max_iters and not out_of_patience(run))


def training_loop(run: Run, signals: StopSignals, resume_hint: str) -> None:
    """Step until train.max_iters: log, evaluate and checkpoint at their intervals, stop on a signal.

    At each log interval the run is steered (`steer`): a time budget's plan is brought up to date,
    the CPU thread count follows the machine's load, and every process learns whether to stop."""
    t = run.cfg.train
    recent = RecentSteps(since_step=run.step)
    while run.step < t.max_iters and not out_of_patience(run):
        lr = set_lr(run.optimizer, get_lr(run.step, t))
        loss, grad_norm = train_step(run)
        run.step += 1
        recent.add(run.step, loss, grad_norm)
        run.threads.observe(every_s=THREAD_SAMPLE_S)
        run.threads.decide_every(THREAD_DECISION_S)  # not only at log intervals: a step can get 50x slower

        boundary = run.step % t.log_interval == 0 or run.step == t.max_iters
        stopping = not run.world.distributed and signals.received is not None  # alone: stop at once, no need to agree
        if boundary or stopping:
            log_progress(run, recent, lr)
        else:
            run.tracker.advance(run.step)
        if boundary:
            stopping = steer(run, signals.received is not None)  # one small collective under torchrun

        if run.step % t.eval_interval == 0 or run.step == t.max_iters:
            start = budget.clock()
            evaluate_and_save(run)
            if run.deadline is not None:
                run.deadline.evaluation_took(budget.clock() - start)
            recent.restart_clock()  # evaluation time is not training speed
            saved = True
            if out_of_patience(run):
                run.say(f"stopping early at step {run.step}: {run.evals_since_best} evaluations without a better val "
                        f"loss (train.patience {t.patience}); best.pt holds the best, val loss {run.best_val_loss:.4f}")
        else:
            saved = False
        if stopping:
            stop_on_signal(run, signals.received or signal.SIGINT, saved=saved, resume_hint=resume_hint)


def out_of_patience(run: Run) -> bool:
    """Whether train.patience evaluations in a row have found no better val loss (every process agrees: the
    losses are averaged over processes)."""
    return run.cfg.train.patience > 0 and run.evals_since_best >= run.cfg.train.patience


def steer(run: Run, stop_requested: bool) -> bool:
    """At a log boundary: replan a budgeted run (rank 0 decides, every process follows), let the thread count
    follow the machine's load, and agree whether to stop. Returns whether every process stops now."""
    t = run.cfg.train
    plan = [t.max_iters, 0, 0]  # the step count, and a new [start, end] pair of the decay (0, 0: none)
    if run.deadline is not None and run.world.is_main and run.step < t.max_iters:
        d = run.deadline
        total, decay = budget.replan(t, run.step, d.left(), d.step_estimate(decaying=bool(t.decay_plan)), d.eval_s)
        plan = [total, *(decay[-1] if len(decay) > len(t.decay_plan) else (0, 0))]
    (total, start, end), stopping = run.world.agree(plan, stop_requested)
    if total != t.max_iters or end:
        t.max_iters = total
        if end:
            t.decay_plan = [*t.decay_plan, [start, end]]
            if run.world.is_main:
                write_run_dir(run.cfg)  # the decision, as it is made
        run.tracker.retotal(total)
    run.threads.decide()
    return stopping


def train_step(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: forward and backward over the micro-batches, clip, step; returns (loss, grad norm).

    Both results stay on the device (no host sync). The forward pass runs in `run.step_model` (the
    model, compiled and/or wrapped in DDP); the gradients clipped are those of the plain model.
    """
    t = run.cfg.train
    accum = t.gradient_accumulation_steps
    step_loss = None
    for micro in range(accum):
        x, y = run.next_batch()
        with run.world.no_sync(run.step_model, skip=micro < accum - 1):  # all-reduce only on the last micro-step
            with run.precision.autocast(x.device):
                _, loss = run.step_model(x, y)
                loss = loss / accum
            run.prefetch()  # the next micro-step's (or step's) batch, read while the device computes this one
            run.scaler.scale(loss).backward()
        step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach().float()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm.detach()


@dataclass
class RecentSteps:
    """The losses and gradient norms of the steps since the last log, kept on the device until then."""

    since_step: int  # the step of the last log
    since_time: float = field(default_factory=lambda: budget.clock())  # budget.clock: replaceable in tests
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (step, loss, grad norm)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, loss, grad_norm))

    def restart_clock(self) -> None:
        self.since_time = budget.clock()


def log_progress(run: Run, recent: RecentSteps, lr: float) -> None:
    """Read the pending losses (one host sync), stop on a non-finite one, log scalars and move the bar."""
    # Averaged over processes: every rank sees the same losses, so a non-finite loss on any rank
    # stops all of them at the same step.
    losses = run.world.mean(torch.stack([p[1] for p in recent.pending])).tolist()
    norms = torch.stack([p[2] for p in recent.pending]).tolist()
    for (step, _, _), value in zip(recent.pending, losses):
        if not math.isfinite(value):
            last = run.run_dir / checkpoint.LAST
            raise TrainingError(f"the loss became {value} at step {step}; stopped without saving, so "
                                f"{last if last.exists() else 'no checkpoint'} is untouched; lower train.learning_rate "
                                f"(now {run.cfg.train.learning_rate:g}) or set train.grad_clip, then --resume")
    now = budget.clock()
    speed = (run.step - recent.since_step) * run.tokens_per_step / max(now - recent.since_time, 1e-9)
    run.tracker.scalars(run.step, {"train/loss": sum(losses) / len(losses), "opt/lr": lr,
                                   "opt/grad_norm": sum(norms) / len(norms), "perf/tokens_per_sec": speed})
    shown = {"loss": f"{losses[-1]:.4f}", "tok/s": f"{speed:,.0f}"}
    if run.deadline is not None:
        run.deadline.steps_took((now - recent.since_time) / max(1, run.step - recent.since_step))
        shown["left"] = duration(max(0.0, run.deadline.left()))  # for training, read beside elapsed and ETA
    run.tracker.advance(run.step, shown)
    recent.pending.clear()
    recent.since_step, recent.since_time = run.step, now


def example_prompt(text: str, limit: int = 24) -> str:
    """A short prompt a shell can take, from the beginning of a text: its first whole line of printable characters,
    cut at a word, at most `limit` characters; else the text's printable characters; else ''."""

    def readable(line: str) -> bool:
        return line.isprintable() and "\ufffd" not in line  # no control bytes, NULs or undecodable bytes

    lines = [line.strip() for line in text.split("\n")]
    candidates = [line for line in lines[1:-1] if line and readable(line)] or [line for line in lines if line and readable(line)]
    line = candidates[0] if candidates else "".join(c for c in text if readable(c)).strip()
    if len(line) > limit:
        cut = line.rfind(" ", 0, limit + 1)
        line = line[:cut] if cut > 0 else line[:limit]
    return line


def sample_command(run_dir: Path, val_text: str) -> str:
    """The `minigpt sample` command line for a run, with a prompt from the start of its validation text (if readable)."""
    prompt = example_prompt(val_text)
    return shlex.join(["minigpt", "sample", "--checkpoint", str(run_dir)] + (["--prompt", prompt] if prompt else []))


def stop_on_signal(run: Run, signum: int, saved: bool, resume_hint: str) -> NoReturn:
    """Save last.pt (unless this step's evaluation just did), wait for every process, and stop with exit 130/143."""
    if not saved:
        run.save(run.run_dir / checkpoint.LAST)
    run.world.barrier()  # no process exits (and gets its peers killed) before rank 0 has saved
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    error = Interrupted(f"stopped by {name} at step {run.step}; saved {run.run_dir / checkpoint.LAST}; "
                        f"continue with: {resume_hint}")
    error.exit_code = 130 if signum == signal.SIGINT else 143
    raise error


