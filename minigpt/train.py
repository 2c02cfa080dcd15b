"""The training loop and its small helpers.

`train(cfg)` reads top to bottom in the shape every small GPT trainer shares:

    prepare data -> build model and AdamW -> (resume) -> loop:
        get batch -> forward -> backward -> clip -> step -> log -> every eval_interval: eval, save

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
from typing import Callable

import torch

from minigpt import checkpoint, config as config_mod, data, device as device_mod
from minigpt.config import Config, TrainConfig
from minigpt.distributed import World, current_world, per_rank_batch
from minigpt.errors import CheckpointError, Interrupted, TrainingError
from minigpt.model import GPT
from minigpt.sample import generate, sample_command
from minigpt.tracking import Tracker, flat_hparams, log, log_inspection

SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias")


def get_lr(step: int, t: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def make_optimizer(model: GPT, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the fused kernel where this torch has it."""
    groups = model.optimizer_groups(t.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), foreach=True)


def train_step(step_model: torch.nn.Module, model: GPT, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: device_mod.Precision, world: World, t: TrainConfig,
               next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: forward and backward over the micro-batches, clip, step; returns (loss, grad norm).

    Both results stay on the device (no host sync). `step_model` is what runs the forward pass (the
    model, compiled and/or wrapped in DDP); `model` is the plain module whose gradients are clipped.
    """
    accum = t.gradient_accumulation_steps
    step_loss = None
    for micro in range(accum):
        x, y = next_batch()
        with world.no_sync(step_model, skip=micro < accum - 1):  # all-reduce only on the last micro-step
            with precision.autocast(x.device):
                _, loss = step_model(x, y)
                loss = loss / accum
            scaler.scale(loss).backward()
        step_loss = loss.detach().float() if step_loss is None else step_loss + loss.detach().float()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm.detach()


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


def rank_batch(tokens, cfg: Config, generator: torch.Generator, world: World,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets for the whole global batch from one generator; this process reads its own slice."""
    offsets = data.sample_offsets(len(tokens), cfg.model.block_size, cfg.train.batch_size, generator)
    per_rank = per_rank_batch(cfg.train.batch_size, world.size)
    mine = offsets[world.rank * per_rank:(world.rank + 1) * per_rank]
    x, y = data.get_batch(tokens, mine, cfg.model.block_size)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


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


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted keys whose values differ between two config dicts."""
    diffs = {}
    for section in config_mod.SECTIONS:
        for key in set(old.get(section, {})) | set(new.get(section, {})):
            a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if a != b:
                diffs[f"{section}.{key}"] = (a, b)
    return diffs


@dataclass
class TrainResult:
    """What a finished (or already complete) run reports."""

    run_dir: Path
    step: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)  # one entry per evaluation


def _check_resume(payload: dict, cfg: Config, tokenizer, say: Callable[[str], None] = log) -> None:
    """Refuse a checkpoint whose network shape or vocabulary differ; say which harmless keys changed."""
    diffs = config_differences(payload["config"], config_mod.to_dict(cfg))
    shape = {k: v for k, v in diffs.items() if k in SHAPE_KEYS}
    if shape:
        listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in shape.items())
        raise CheckpointError(f"cannot resume {payload['path']}: the config changes the model shape ({listed}); "
                              "restore those values or train a new run with --out-dir")
    if payload["tokenizer"]["chars"] != tokenizer.chars:
        raise CheckpointError(f"cannot resume {payload['path']}: the corpus vocabulary differs from the one it was "
                              "trained on; use the same data.path or train a new run with --out-dir")
    harmless = {k: v for k, v in diffs.items() if k not in SHAPE_KEYS}
    if harmless:
        say("resuming with changed settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in harmless.items()))


def train(cfg: Config, resume: str | bool = False, overwrite: bool = False, progress: bool = True,
          resume_hint: str = "minigpt train --config CONFIG --resume") -> TrainResult:
    """Train the model described by `cfg`; write config, checkpoints and TensorBoard events to its run dir.

    `resume_hint` is the command shown to the user after an interrupt. Launched by torchrun, this
    process trains its share of every batch and leaves the process group at the end.
    """
    world = current_world(cfg.train.device, cfg.train.batch_size)
    try:
        return _train(cfg, world, resume, overwrite, progress, resume_hint)
    finally:
        world.shutdown()


def _train(cfg: Config, world: World, resume: str | bool, overwrite: bool, progress: bool,
           resume_hint: str) -> TrainResult:
    """One process's part of `train`, on the device `world` chose for it."""
    t = cfg.train
    device = world.device
    say = log if world.is_main else (lambda message: None)  # rank 0 alone reports
    precision = device_mod.resolve_precision(t.dtype, device)
    threads = device_mod.set_threads(t.threads)
    run_dir = cfg.run_dir()
    last_path, best_path = run_dir / checkpoint.LAST, run_dir / checkpoint.BEST
    if not resume and not overwrite and last_path.exists():
        raise CheckpointError(f"run directory {run_dir} already holds a checkpoint; pass --resume to continue it, "
                              "--out-dir for a new run, or --overwrite to start again from scratch")

    prepared = world.in_turn(lambda: data.prepare(cfg.data, cfg.model.block_size))  # written once, then read
    tokens = {split: prepared.tokens(split) for split in ("train", "val")}
    tokenizer = prepared.tokenizer

    torch.manual_seed(t.seed)
    model = GPT(cfg.model, tokenizer.vocab_size).to(device)
    fused_attention = device_mod.resolve_fused_attention(t.fused_attention, device, precision)
    model.set_fused_attention(fused_attention)
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    batch_generator = torch.Generator().manual_seed(t.seed)
    step, best_val = 0, float("inf")

    if resume is True and not last_path.exists():
        raise CheckpointError(f"nothing to resume: run directory {run_dir} holds no {checkpoint.LAST}; "
                              "train without --resume, or point --out-dir at an existing run")
    if resume:
        payload = checkpoint.load(last_path if resume is True else resume, prefer=checkpoint.LAST)
        _check_resume(payload, cfg, tokenizer, say)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        if precision.use_scaler and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        batch_generator.set_state(payload["rng"]["batch"])
        torch.set_rng_state(payload["rng"]["torch"])
        if device.type == "cuda" and payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"], device)
        step, best_val = payload["step"], payload["best_val_loss"]
        say(f"resuming {payload['path']} at step {step} (best val loss {best_val:.4f})")

    if world.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
        except OSError as exc:
            raise CheckpointError(f"cannot write to run directory {run_dir}: {exc.strerror or exc}; "
                                  "choose a writable --out-dir") from exc
    step_model = model
    if device_mod.resolve_compile(t.compile, device):
        step_model = device_mod.compile_model(model, device)  # falls back to eager with a note
    step_model = world.wrap(step_model)

    def save(path: Path, best_val_loss: float) -> None:
        if not world.is_main:
            return
        checkpoint.save(path, {
            "model": checkpoint.clean_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if precision.use_scaler else None,
            "step": step,
            "best_val_loss": best_val_loss,
            "config": config_mod.to_dict(cfg),
            "tokenizer": tokenizer.to_dict(),
            "rng": {"batch": batch_generator.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "data": {"sources": prepared.meta["sources"], "sha256": prepared.meta["source_sha256"],
                     "train_tokens": prepared.meta["train_tokens"], "val_tokens": prepared.meta["val_tokens"]},
        })

    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * cfg.model.block_size
    if world.is_main:
        log(f"minigpt: {model.num_params() / 1e6:.2f}M parameters, {tokens_per_step} tokens/step, "
            f"device {device}, dtype {precision.name}, {'fused' if fused_attention else 'explicit'} attention, "
            f"{threads} threads, vocab {tokenizer.vocab_size}, "
            f"{prepared.meta['train_tokens']:,} train / {prepared.meta['val_tokens']:,} val characters -> {run_dir}")
    if step >= t.max_iters:
        say(f"the run is already complete at step {step} (train.max_iters {t.max_iters}); "
            f"to train longer: --resume --set train.max_iters=N with N > {step}")
    tracker = Tracker(run_dir, step, t.max_iters, enabled=world.is_main, progress=progress and step < t.max_iters)

    history: list[dict] = []
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, grad norm), read at log time
    last_log_time, last_log_step = time.perf_counter(), step
    signals = StopSignals()
    try:
        with signals.installed():
            while step < t.max_iters:
                lr = get_lr(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss, grad_norm = train_step(
                    step_model, model, optimizer, scaler, precision, world, t,
                    lambda: rank_batch(tokens["train"], cfg, batch_generator, world, device))
                step += 1
                pending.append((step, step_loss, grad_norm))

                evaluate = step % t.eval_interval == 0 or step == t.max_iters
                stopping = world.any(signals.received is not None)
                if step % t.log_interval == 0 or evaluate or stopping:
                    # Averaged over processes (one host sync per log): every rank sees the same losses, so a
                    # non-finite loss on any rank stops all of them at the same step.
                    losses = world.mean(torch.stack([p[1] for p in pending])).tolist()
                    norms = torch.stack([p[2] for p in pending]).tolist()
                    for (s, _, _), value in zip(pending, losses):
                        if not math.isfinite(value):
                            raise TrainingError(
                                f"the loss became {value} at step {s}; stopped without saving, so "
                                f"{last_path if last_path.exists() else 'no checkpoint'} is untouched; lower "
                                f"train.learning_rate (now {t.learning_rate:g}) or set train.grad_clip, then --resume")
                    now = time.perf_counter()
                    speed = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                    tracker.scalars(step, {"train/loss": sum(losses) / len(losses), "opt/lr": lr,
                                           "opt/grad_norm": sum(norms) / len(norms), "perf/tokens_per_sec": speed})
                    tracker.advance(step, {"loss": f"{losses[-1]:.4f}", "tok/s": f"{speed:,.0f}"})
                    pending.clear()
                    last_log_time, last_log_step = now, step
                else:
                    tracker.advance(step)

                if evaluate:
                    losses = estimate_loss(model, tokens, cfg, device, precision, world)  # plain module: no recompile, no DDP
                    if not math.isfinite(losses["val"]):
                        raise TrainingError(f"the validation loss became {losses['val']} at step {step}; stopped without "
                                            f"saving; lower train.learning_rate (now {t.learning_rate:g}), then --resume")
                    bpc = losses["val"] / math.log(2)
                    history.append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                                    "val_bpc": bpc, "time_s": time.perf_counter()})
                    tracker.scalars(step, {"train/eval_loss": losses["train"], "val/loss": losses["val"], "val/bpc": bpc})
                    if world.is_main and t.sample_chars > 0:
                        tracker.text(step, "samples/text", text_sample(model, tokenizer, cfg, device, step))
                    log_inspection(tracker, model, tokens, tokenizer, cfg, step)  # attention image, histograms
                    say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, val bpc {bpc:.4f}")
                    if losses["val"] < best_val:
                        best_val = losses["val"]
                        save(best_path, best_val)
                    save(last_path, best_val)
                    tracker.flush()
                    last_log_time = time.perf_counter()  # evaluation time is not training speed

                if stopping:
                    if not evaluate:
                        save(last_path, best_val)
                    world.barrier()  # no process exits (and gets its peers killed) before rank 0 has saved
                    name = "SIGINT" if signals.received == signal.SIGINT else "SIGTERM"
                    error = Interrupted(f"stopped by {name} at step {step}; saved {last_path}; continue with: {resume_hint}")
                    error.exit_code = 130 if signals.received == signal.SIGINT else 143
                    raise error
        if best_val < float("inf"):
            tracker.hparams(step, flat_hparams(config_mod.to_dict(cfg)),
                            {"hparams/best_val_loss": best_val, "hparams/best_val_bpc": best_val / math.log(2)})
    finally:
        tracker.close()
    if world.is_main:
        log(f"done: step {step}, best val loss {best_val:.4f} ({best_val / math.log(2):.4f} bits/char); "
            f"checkpoints in {run_dir}\n  sample:      {sample_command(run_dir, tokenizer.decode(tokens['val'][:256]))}\n"
            f"  tensorboard: tensorboard --logdir {run_dir.parent}")
    return TrainResult(run_dir=run_dir, step=step, best_val_loss=best_val, history=history)

