"""What a training run does at an evaluation: estimate the losses, log what can be seen, save checkpoints.

Every eval_interval steps (and at the end) the train and val losses are estimated on eval_iters
fixed batches of each split, a short text sample and the attention of a fixed probe text are
logged to TensorBoard (with weight and gradient histograms if train.histograms), and last.pt is
written, with best.pt when the validation loss is the lowest so far. Samples and batches draw
from their own freshly seeded generators, so an evaluation never disturbs the training stream.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minigpt import checkpoint, config as config_mod, data, device as device_mod
from minigpt.config import Config
from minigpt.decoding import generate
from minigpt.distributed import World
from minigpt.errors import TrainingError
from minigpt.inspection import attention_of, weights_and_grads
from minigpt.model import GPT
from minigpt.run import Run, rank_batch
from minigpt.tracking import Tracker, flat_hparams


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
    # the module the steps run (compiled, in DDP): evaluation batches have the training batches' shape, so a
    # compiled model compiles once more for eval mode, not for new shapes
    losses = estimate_loss(run.step_model, run.tokens, cfg, run.device, run.precision, run.world)
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
        run.best_val_loss, run.evals_since_best = losses["val"], 0
        run.save(out.run_dir / checkpoint.BEST)
    else:
        run.evals_since_best += 1
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
    tracker.attention(step, "attention/probe", list(run.tokenizer.decode(probe)), attention_of(model, probe),
                      run.attention_frames)
    if cfg.train.histograms:
        generator = torch.Generator().manual_seed(cfg.train.seed + 3)  # the same training batch every time
        offsets = data.sample_offsets(len(tokens["train"]), block_size, cfg.train.batch_size, generator)
        x, y = data.get_batch(tokens["train"], offsets, block_size)
        device = next(model.parameters()).device
        tracker.histograms(step, weights_and_grads(model, x.to(device), y.to(device)))


def log_hparams(run: Run) -> None:
    """At the end of a run that evaluated: its hyperparameters with the best validation loss (HParams tab)."""
    if run.best_val_loss < float("inf"):
        run.tracker.hparams(run.step, flat_hparams(config_mod.to_dict(run.cfg)),
                            {"hparams/best_val_loss": run.best_val_loss,
                             "hparams/best_val_bpc": run.best_val_loss / math.log(2)})
