"""The training loop and its small helpers.

`train(cfg)` sets up a run (minigpt.run: data, model, optimizer, resume) and then loops in the
shape every small GPT trainer shares:

    learning rate for this step -> one optimizer step (get batch, forward, backward, clip, step)
        -> log -> every eval_interval: evaluate and checkpoint -> stop on a signal

Exact resume: batch offsets come from a seeded generator whose state, together with torch's
RNG (dropout), the optimizer, the step and the best validation loss, is saved in every
checkpoint. Evaluation and text samples draw from their own freshly seeded generators, so they
never disturb the training stream. Resuming from step N therefore continues exactly the run
that was never stopped.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from minigpt import budget, checkpoint, config as config_mod, device as device_mod
from minigpt.config import Config
from minigpt.distributed import World, current_world
from minigpt.errors import Interrupted, TrainingError
from minigpt.model import GPT
from minigpt.optim import get_lr, set_lr
from minigpt.run import Run, open_progress, rank_batch, start_run, write_run_dir
from minigpt.sample import generate, sample_command
from minigpt.tracking import duration, flat_hparams, log_inspection


@dataclass
class TrainResult:
    """What a finished (or already complete) run reports."""

    run_dir: Path
    step: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)  # one entry per evaluation


def train(cfg: Config, resume: str | bool = False, overwrite: bool = False, progress: bool = True,
          resume_hint: str = "minigpt train --config CONFIG --resume", init_from: str | None = None) -> TrainResult:
    """Train the model described by `cfg`; write config, checkpoints and TensorBoard events to its run dir.

    `resume_hint` is the command shown to the user after an interrupt; `init_from` (a checkpoint
    or run directory) starts from that model's weights instead of random ones. Launched by torchrun, this
    process trains its share of every batch and leaves the process group at the end.
    """
    world = current_world(cfg.train.device, cfg.train.batch_size)
    try:
        run = start_run(cfg, world, resume, overwrite, init_from)
        try:
            measured = None
            if budget.seconds(cfg.train) and not resume:
                measured = budget.fit(run, train_step, evaluate_and_save)  # sets train.max_iters
                if world.is_main:
                    write_run_dir(cfg)  # with the derived step count
            open_progress(run, progress, measured)
            training_loop(run, resume_hint)
            log_hparams(run)
        finally:
            run.close()  # the progress display, TensorBoard, and the run directory's lock
        run.say(f"done: step {run.step}, best val loss {run.best_val_loss:.4f} "
                f"({run.best_val_loss / math.log(2):.4f} bits/char); checkpoints in {run.run_dir}\n"
                f"  sample:      {sample_command(run.run_dir, run.tokenizer.decode(run.tokens['val'][:256]))}\n"
                f"  tensorboard: tensorboard --logdir {run.run_dir}")
        return TrainResult(run_dir=run.run_dir, step=run.step, best_val_loss=run.best_val_loss, history=run.history)
    finally:
        world.shutdown()


def training_loop(run: Run, resume_hint: str) -> None:
    """Step until train.max_iters: log, evaluate and checkpoint at their intervals, stop on a signal."""
    t = run.cfg.train
    recent = RecentSteps(since_step=run.step)
    signals = StopSignals()
    with signals.installed():
        while run.step < t.max_iters:
            lr = set_lr(run.optimizer, get_lr(run.step, t))
            loss, grad_norm = train_step(run)
            run.step += 1
            recent.add(run.step, loss, grad_norm)

            evaluate = run.step % t.eval_interval == 0 or run.step == t.max_iters
            stopping = run.world.any(signals.received is not None)  # every process stops at the same step
            if run.step % t.log_interval == 0 or evaluate or stopping:
                log_progress(run, recent, lr)
            else:
                run.tracker.advance(run.step)

            if evaluate:
                evaluate_and_save(run)
                recent.restart_clock()  # evaluation time is not training speed
            if stopping:
                stop_on_signal(run, signals.received, saved=evaluate, resume_hint=resume_hint)


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
    since_time: float = field(default_factory=time.perf_counter)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (step, loss, grad norm)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, loss, grad_norm))

    def restart_clock(self) -> None:
        self.since_time = time.perf_counter()


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
    now = time.perf_counter()
    speed = (run.step - recent.since_step) * run.tokens_per_step / max(now - recent.since_time, 1e-9)
    run.tracker.scalars(run.step, {"train/loss": sum(losses) / len(losses), "opt/lr": lr,
                                   "opt/grad_norm": sum(norms) / len(norms), "perf/tokens_per_sec": speed})
    shown = {"loss": f"{losses[-1]:.4f}", "tok/s": f"{speed:,.0f}"}
    if run.budget_end is not None:
        shown["left"] = duration(max(0.0, run.budget_end - time.time()))  # of the time budget, as elapsed and ETA read
    run.tracker.advance(run.step, shown)
    recent.pending.clear()
    recent.since_step, recent.since_time = run.step, now


def evaluate_and_save(run: Run) -> None:
    """Estimate train and val loss, log them with a sample and the attention image, write best.pt and last.pt."""
    cfg = run.cfg
    losses = estimate_loss(run.model, run.tokens, cfg, run.device, run.precision, run.world)  # plain module
    if not math.isfinite(losses["val"]):
        raise TrainingError(f"the validation loss became {losses['val']} at step {run.step}; stopped without "
                            f"saving; lower train.learning_rate (now {cfg.train.learning_rate:g}), then --resume")
    bpc = losses["val"] / math.log(2)
    run.history.append({"step": run.step, "train_loss": losses["train"], "val_loss": losses["val"],
                        "val_bpc": bpc, "time_s": time.perf_counter()})
    run.tracker.scalars(run.step, {"train/eval_loss": losses["train"], "val/loss": losses["val"], "val/bpc": bpc})
    if run.world.is_main and cfg.train.sample_chars > 0:
        run.tracker.text(run.step, "samples/text", text_sample(run.model, run.tokenizer, cfg, run.device, run.step))
    log_inspection(run.tracker, run.model, run.tokens, run.tokenizer, cfg, run.step)  # attention image, histograms
    run.say(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val bpc {bpc:.4f}")
    if losses["val"] < run.best_val_loss:
        run.best_val_loss = losses["val"]
        run.save(checkpoint.BEST)
    run.save(checkpoint.LAST)
    run.tracker.flush()


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, tokens: dict, cfg: Config, device: torch.device,
                  precision: device_mod.Precision, world: World) -> dict[str, float]:
    """Mean loss over eval_iters random batches of each split (the same batches at every evaluation)."""
    was_training = model.training
    model.eval()
    out = {}
    for i, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(cfg.train.seed + 1 + i)
        losses = torch.zeros(cfg.train.eval_iters, device=device)
        for k in range(cfg.train.eval_iters):
            x, y = rank_batch(tokens[split], cfg, generator, world, device)
            with precision.autocast(device):
                _, loss = model(x, y)
            losses[k] = loss.float()
        out[split] = world.mean(losses.mean()).item()
    model.train(was_training)
    return out


def text_sample(model: GPT, tokenizer, cfg: Config, device: torch.device, step: int) -> str:
    """A short seeded sample from the model, starting at a newline, for TensorBoard."""
    start = tokenizer.stoi.get("\n", 0)
    idx = torch.tensor([[start]], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + step)
    was_training = model.training
    model.eval()
    ids = [int(t) for t in generate(model, idx, cfg.train.sample_chars, 1.0, None, generator)]
    model.train(was_training)
    return tokenizer.decode(ids)


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.received = signum

    @contextmanager
    def installed(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def stop_on_signal(run: Run, signum: int, saved: bool, resume_hint: str) -> NoReturn:
    """Save last.pt (unless this step's evaluation just did), wait for every process, and stop with exit 130/143."""
    if not saved:
        run.save(checkpoint.LAST)
    run.world.barrier()  # no process exits (and gets its peers killed) before rank 0 has saved
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    error = Interrupted(f"stopped by {name} at step {run.step}; saved {run.run_dir / checkpoint.LAST}; "
                        f"continue with: {resume_hint}")
    error.exit_code = 130 if signum == signal.SIGINT else 143
    raise error


def log_hparams(run: Run) -> None:
    """At the end of a run that evaluated: its hyperparameters with the best validation loss (HParams tab)."""
    if run.best_val_loss < float("inf"):
        run.tracker.hparams(run.step, flat_hparams(config_mod.to_dict(run.cfg)),
                            {"hparams/best_val_loss": run.best_val_loss,
                             "hparams/best_val_bpc": run.best_val_loss / math.log(2)})
