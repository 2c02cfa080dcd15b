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
import math
import shlex
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import torch

from minigpt import budget, checkpoint, config as config_mod, data, device as device_mod
from minigpt.config import Config
from minigpt.console import duration
from minigpt.decoding import generate
from minigpt.distributed import World, current_world
from minigpt.errors import Interrupted, TrainingError
from minigpt.inspection import attention_of, weights_and_grads
from minigpt.model import GPT
from minigpt.optim import get_lr, set_lr
from minigpt.run import Run, rank_batch, start_run, write_run_dir
from minigpt.signals import StopSignals
from minigpt.tracking import Tracker, flat_hparams


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
    try:
        run = start_run(cfg, world, resume, overwrite, init_from)
        run.started = started  # history's time_s counts from here, data preparation included
        try:
            measured = fit_budget(run) if budget.seconds(cfg.train) and not resume else None  # sets train.max_iters
            if world.is_main:
                write_run_dir(cfg)  # the resolved config, with a derived step count
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


def fit_budget(run: Run) -> budget.Costs:
    """Derive train.max_iters from the time budget: rank 0 measures and decides, every process uses its number.

    The measured steps and evaluations are undone: the run is rewound to the snapshot taken
    before them, and the evaluations wrote into a scratch directory that is then removed."""
    budget_s = budget.seconds(run.cfg.train)
    snapshot = copy.deepcopy(run.state())
    scratch = Path(tempfile.mkdtemp(prefix=".budget-", dir=run.run_dir if run.world.is_main else None))  # rank 0 writes
    tracker = Tracker(scratch, 0, 1, enabled=run.world.is_main, progress=False)
    quiet = Outputs(tracker, scratch, say=lambda message: None)

    def timed_evaluation() -> None:
        run.best_val_loss = math.inf  # so that every timed evaluation writes best.pt as well as last.pt
        evaluate_and_save(run, quiet)

    try:
        costs = budget.measure(lambda: train_step(run)[0], timed_evaluation, budget_s, run.world.share)
    finally:
        tracker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    run.restore(snapshot)
    run.history.clear()
    steps = budget.plan_steps(budget_s, costs, run.cfg.train.eval_interval) if run.world.is_main else 0
    budget.apply(run.cfg.train, run.world.share(steps))
    run.budget_end = budget.process_start_time() + budget_s
    return costs


def open_progress(run: Run, progress: bool = True, measured: budget.Costs | None = None) -> None:
    """Say what is about to run in one line (with what the time budget measured), then open the tracker."""
    t = run.cfg.train
    fitted = (f" (time budget {config_mod.duration_text(t.time_budget)}: {measured.step_s * 1000:.1f} ms/step, {measured.eval_s:.1f} s per "
              f"evaluation, {measured.elapsed_s:.1f} s to start)") if measured else ""
    run.say(f"minigpt: {t.max_iters} steps{fitted}, {run.model.num_params() / 1e6:.2f}M parameters, "
            f"{run.tokens_per_step} tokens/step, device {run.device}, dtype {run.precision.name}, "
            f"{'fused' if run.fused_attention else 'explicit'} attention{', compiled' if run.compiled else ''}, {t.optimizer}, "
            f"{torch.get_num_threads()} threads, vocab {run.tokenizer.vocab_size}, "
            f"{run.data_meta['train_tokens']:,} train / {run.data_meta['val_tokens']:,} val characters -> {run.run_dir}")
    if run.step >= t.max_iters:
        unbudgeted = " --set train.time_budget=0" if budget.seconds(t) else ""  # else the recorded count is kept
        run.say(f"the run is already complete at step {run.step} (train.max_iters {t.max_iters}); "
                f"to train longer: --resume{unbudgeted} --set train.max_iters=N with N > {run.step}")
    run.tracker = Tracker(run.run_dir, run.step, t.max_iters, enabled=run.world.is_main,
                          progress=progress and run.step < t.max_iters)


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


@dataclass
class Outputs:
    """Where an evaluation's results go: TensorBoard, checkpoint files, progress lines."""

    tracker: Tracker
    run_dir: Path
    say: Callable[[str], None]


def evaluate_and_save(run: Run, out: Outputs | None = None) -> None:
    """Estimate train and val loss, log them with a sample and the attention image, write best.pt and last.pt.

    Into the run's own tracker and directory, or into `out` (the time budget times an evaluation there)."""
    out = out or Outputs(run.tracker, run.run_dir, run.say)
    cfg = run.cfg
    losses = estimate_loss(run.model, run.tokens, cfg, run.device, run.precision, run.world)  # plain module
    if not math.isfinite(losses["val"]):
        raise TrainingError(f"the validation loss became {losses['val']} at step {run.step}; stopped without "
                            f"saving; lower train.learning_rate (now {cfg.train.learning_rate:g}), then --resume")
    bpc = losses["val"] / math.log(2)
    run.history.append({"step": run.step, "train_loss": losses["train"], "val_loss": losses["val"],
                        "val_bpc": bpc, "time_s": time.perf_counter() - run.started})
    out.tracker.scalars(run.step, {"train/eval_loss": losses["train"], "val/loss": losses["val"], "val/bpc": bpc})
    if run.world.is_main and cfg.train.sample_chars > 0:
        out.tracker.text(run.step, "samples/text", text_sample(run.model, run.tokenizer, cfg, run.device, run.step))
    log_inspection(out.tracker, run)  # attention image, histograms
    out.say(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val bpc {bpc:.4f}")
    if losses["val"] < run.best_val_loss:
        run.best_val_loss = losses["val"]
        run.save(out.run_dir / checkpoint.BEST)
    run.save(out.run_dir / checkpoint.LAST)
    out.tracker.flush()


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


PROBE_CHARS = 48  # characters of validation text whose attention is drawn at each evaluation


def log_inspection(tracker: Tracker, run: Run) -> None:
    """At an evaluation: the attention image of a fixed probe text and, if train.histograms, histograms."""
    if not tracker.enabled:
        return
    cfg, model, tokens, step = run.cfg, run.model, run.tokens, run.step
    block_size = cfg.model.block_size
    probe = [int(i) for i in tokens["val"][:min(block_size, PROBE_CHARS)]]  # the start of the validation text
    tracker.attention(step, "attention/probe", list(run.tokenizer.decode(probe)), attention_of(model, probe))
    if cfg.train.histograms:
        generator = torch.Generator().manual_seed(cfg.train.seed + 3)  # the same training batch every time
        offsets = data.sample_offsets(len(tokens["train"]), block_size, cfg.train.batch_size, generator)
        x, y = data.get_batch(tokens["train"], offsets, block_size)
        device = next(model.parameters()).device
        tracker.histograms(step, weights_and_grads(model, x.to(device), y.to(device)))


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


def log_hparams(run: Run) -> None:
    """At the end of a run that evaluated: its hyperparameters with the best validation loss (HParams tab)."""
    if run.best_val_loss < float("inf"):
        run.tracker.hparams(run.step, flat_hparams(config_mod.to_dict(run.cfg)),
                            {"hparams/best_val_loss": run.best_val_loss,
                             "hparams/best_val_bpc": run.best_val_loss / math.log(2)})
