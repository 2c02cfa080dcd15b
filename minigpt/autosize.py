"""`auto` applied: measure candidate shapes on this machine and fill a config's auto keys by minigpt.sizing's rule.

`resolve(cfg)` runs before a run starts. A resumed run takes the values its checkpoint recorded
(nothing is measured again, so the network is the one it was). A fine-tuning run takes the shape
of the model it starts from and the rest from the new corpus's size. A fresh run times each
candidate shape for a few real training steps (eager, on the run's device and dtype, as the
bench command does), smallest first, and stops at the first one too large for the tokens its
steps would see. Afterwards the config holds plain values and `cfg.sized` records which keys
were chosen and why; both go into config.yaml and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

from minigpt import budget, checkpoint, config as config_mod, data, sizing
from minigpt.bench import make_trainer, timed_round, warm_up
from minigpt.config import Config
from minigpt.console import log
from minigpt.device import resolve_device, set_threads
from minigpt.errors import ConfigError

MEASURE_S = 0.5  # seconds of timed steps per candidate shape (after WARM_STEPS untimed ones)
WARM_STEPS = 3


@dataclasses.dataclass
class Measured:
    """One candidate shape as this machine trains it."""

    shape: sizing.Shape
    params: int
    step_s: float
    steps: int  # the steps the budget would give it
    tokens: int  # the characters those steps train on


def resolve(cfg: Config, resume: str | bool = False, init_from: str | None = None,
            say: Callable[[str], None] = log) -> None:
    """Fill cfg's auto keys in place (see the module docstring) and say what was chosen and why, in one line."""
    if not cfg.auto:
        return
    if resume:
        keep_recorded(cfg, resume)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"{', '.join(cfg.auto)} are auto, which each torchrun process would choose on its own; "
                          "launch with minigpt train --nproc N, which chooses once for all of them")
    if init_from:
        reason = fine_tune(cfg, checkpoint.load(init_from))
    else:
        reason = fresh(cfg)
    cfg.sized = {"keys": list(cfg.auto), "reason": reason}
    cfg.auto = []
    validate(cfg)
    say(f"minigpt auto: {reason}")


def keep_recorded(cfg: Config, resume: str | bool) -> None:
    """A resumed run keeps what its first start chose: the values of the auto keys in its checkpoint's config."""
    path = cfg.run_dir() / checkpoint.LAST if resume is True else resume
    if resume is True and not path.exists():
        return  # training says there is nothing to resume
    recorded = checkpoint.load(path, prefer=checkpoint.LAST)["config"]
    for key in cfg.auto:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, recorded[section][name])
    cfg.sized, cfg.auto = recorded.get("sized") or {"keys": list(cfg.auto)}, []


def validate(cfg: Config) -> None:
    """The filled config through the same validator as a config file (the rule must not make an invalid one)."""
    config_mod.from_dict(config_mod.to_dict(cfg), source="the config sized by auto", name=cfg.name)


def put(cfg: Config, key: str, value) -> None:
    """Set a dotted key if the config leaves it to auto."""
    if cfg.is_auto(key):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)


def fresh(cfg: Config) -> str:
    """Choose shape, block, batch, learning rate, weight decay, dropout and evaluation interval for a new run; the
    reason."""
    m, t = cfg.model, cfg.train
    device = resolve_device(t.device)
    put(cfg, "train.batch_size", sizing.batch_size_for(device.type))
    put(cfg, "train.learning_rate", sizing.LEARNING_RATE[t.optimizer])
    shapes = sizing.candidates(None if cfg.is_auto("model.n_layer") else m.n_layer,
                               None if cfg.is_auto("model.n_embd") else m.n_embd,
                               None if cfg.is_auto("model.n_head") else m.n_head, m.position == "rope")
    blocks = {s: (sizing.block_size_for(s.n_embd) if cfg.is_auto("model.block_size") else m.block_size) for s in shapes}
    prepared = data.prepare(cfg.data, min(blocks.values()))
    train_chars, vocab = prepared.meta["train_tokens"], prepared.tokenizer.vocab_size
    budget_s = budget.seconds(t)
    measured = measure(cfg, shapes, blocks, prepared, budget_s) if budget_s else plan_steps(cfg, shapes, blocks, vocab)
    fits = [c for c in measured if sizing.enough_tokens(c.tokens, c.params)]
    chosen = fits[-1] if fits else measured[0]
    put(cfg, "model.n_layer", chosen.shape.n_layer)
    put(cfg, "model.n_embd", chosen.shape.n_embd)
    put(cfg, "model.n_head", chosen.shape.n_head)
    put(cfg, "model.block_size", blocks[chosen.shape])
    slower = chosen  # the same shape timed with dropout, when it gets some
    if cfg.is_auto("model.dropout"):
        slower, dropout = with_dropout(cfg, chosen, blocks, prepared, budget_s, train_chars)
        put(cfg, "model.dropout", dropout)
    epochs = chosen.tokens / max(1, train_chars)
    put(cfg, "train.weight_decay", sizing.weight_decay_for(epochs))
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * m.block_size
    small = train_chars < sizing.SMALL_CORPUS  # passed over so often that validation stops improving: stop there
    put(cfg, "train.patience", sizing.PATIENCE if small else 0)
    put(cfg, "train.eval_interval", sizing.pass_eval_interval(train_chars, tokens_per_step) if small
        else sizing.eval_interval_for(slower.steps, t.eval_iters))
    reason = fresh_reason(cfg, chosen, measured, budget_s, train_chars, epochs)
    if slower is not chosen:
        reason += (f"; with dropout's cost, {sizing.rate_text(tokens_per_step / slower.step_s)} "
                   f"and about {slower.steps:,} steps")
    return reason


def plan_steps(cfg: Config, shapes: list[sizing.Shape], blocks: dict, vocab: int) -> list[Measured]:
    """Without a time budget the step count is train.max_iters for every shape: nothing to measure."""
    t = cfg.train
    return [Measured(s, s.params(vocab), math.nan, t.max_iters,
                     t.max_iters * t.batch_size * t.gradient_accumulation_steps * blocks[s]) for s in shapes]


def measure(cfg: Config, shapes: list[sizing.Shape], blocks: dict, prepared: data.Prepared,
            budget_s: float) -> list[Measured]:
    """Time the shapes smallest first, up to the first one too large for the tokens the budget gives it."""
    set_threads(cfg.train.threads)
    out: list[Measured] = []
    for shape in shapes:
        out.append(time_shape(cfg, shape, blocks[shape], 0.0, prepared, budget_s))
        if not sizing.enough_tokens(out[-1].tokens, out[-1].params):
            break  # every larger shape is further from enough
    return out


def time_shape(cfg: Config, shape: sizing.Shape, block_size: int, dropout: float, prepared: data.Prepared,
               budget_s: float) -> Measured:
    """One shape's seconds per step on this machine (eager), and the steps and characters the budget left gives it."""
    t = cfg.train
    trial = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                                       block_size=block_size, dropout=dropout),
        train=dataclasses.replace(t, compile=False), auto=[])
    device = resolve_device(t.device)
    trainer = make_trainer(shape.describe(), trial, prepared, device)
    warm_up(trainer, WARM_STEPS, device)
    timed_round(trainer, max(3, int(MEASURE_S / max(trainer.warmup_s / WARM_STEPS, 1e-4))), device)
    left = budget_s - (budget.wall_clock() - budget.process_start_time()) - budget.margin_s(budget_s)
    steps = sizing.trained_steps(left, trainer.best_step_s)
    return Measured(shape, trainer.run.model.num_params(), trainer.best_step_s, steps, steps * trainer.run.tokens_per_step)


def with_dropout(cfg: Config, chosen: Measured, blocks: dict, prepared: data.Prepared, budget_s: float,
                 train_chars: int) -> tuple[Measured, float]:
    """The chosen shape's dropout, from how often its steps pass over the data, and the shape timed again with it:
    on a CPU dropout makes a step about a third slower, so the first line's steps and speed count it. The passes
    measured without it decide (a run that trains more steps than measured still gets the dropout it needs)."""
    dropout = sizing.dropout_for(chosen.tokens / max(1, train_chars))
    if dropout == 0 or not budget_s:
        return chosen, dropout
    return time_shape(cfg, chosen.shape, blocks[chosen.shape], dropout, prepared, budget_s), dropout


def fresh_reason(cfg: Config, chosen: Measured, measured: list[Measured], budget_s: float, train_chars: int,
                 epochs: float) -> str:
    """The first line of an auto-sized run: what was chosen, for what, and why not the next size up."""
    m, t = cfg.model, cfg.train
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * m.block_size
    given = (f"for {config_mod.duration_text(t.time_budget)} on {sizing.chars_text(train_chars)} at "
             f"{sizing.rate_text(tokens_per_step / chosen.step_s)}") if budget_s else \
        f"for {t.max_iters:,} steps on {sizing.chars_text(train_chars)}"
    larger = [c for c in measured if c.params > chosen.params]
    if not sizing.enough_tokens(chosen.tokens, chosen.params):
        why = "; the smallest candidate"
    else:
        why = (f"; {larger[0].shape.describe()} would see {larger[0].tokens / larger[0].params:.1f}"
               if larger else "; the largest candidate")
    stops = f", stopping after {t.patience} evaluations without a better val loss" if t.patience else ""
    return (f"{chosen.shape.describe()}, {chosen.params / 1e6:.2f}M parameters, block {m.block_size}, batch "
            f"{t.batch_size}, lr {t.learning_rate:g}, weight decay {t.weight_decay:g}, dropout {m.dropout:g} {given}: "
            f"about {chosen.steps:,} steps, "
            f"{chosen.tokens / chosen.params:.1f} characters per parameter (the rule wants {sizing.TOKENS_PER_PARAM:g})"
            f"{why}; {epochs:.1f} passes over the data{stops}")


def fine_tune(cfg: Config, origin: dict) -> str:
    """Fine-tuning: the origin's shape and weight decay; learning rate, dropout, evaluation interval and patience from
    the new corpus."""
    m, t = cfg.model, cfg.train
    theirs = origin["config"]["model"]
    for key in config_mod.AUTO_MODEL_KEYS[:4]:
        put(cfg, key, theirs[key.split(".")[1]])
    put(cfg, "train.batch_size", origin["config"]["train"]["batch_size"])
    put(cfg, "train.learning_rate", origin["config"]["train"]["learning_rate"] * sizing.FINE_TUNE_LR_FACTOR)
    put(cfg, "train.weight_decay", origin["config"]["train"]["weight_decay"])  # not pulled harder to zero than before
    t.min_lr = min(t.min_lr, t.learning_rate)
    put(cfg, "train.patience", sizing.PATIENCE)
    prepared = data.prepare(cfg.data, m.block_size, base_vocab=origin["tokenizer"]["chars"])
    train_chars = prepared.meta["train_tokens"]
    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * m.block_size
    put(cfg, "train.eval_interval", sizing.pass_eval_interval(train_chars, tokens_per_step))
    put(cfg, "model.dropout", sizing.fine_tune_dropout(train_chars))
    return (f"fine-tuning {origin['path']}'s {m.n_layer} layers x {m.n_embd} on {sizing.chars_text(train_chars)}: "
            f"lr {t.learning_rate:g}, weight decay {t.weight_decay:g}, dropout {m.dropout:g}, an evaluation every "
            f"{t.eval_interval} steps (about one pass over the data), stopping after {t.patience} without a better val "
            f"loss")


def overrides(cfg: Config) -> list[str]:
    """A sized config's chosen values as --set strings, for processes that must not choose again (torchrun)."""
    keys = cfg.sized.get("keys", [])
    values = [f"{key}={json.dumps(getattr(getattr(cfg, key.split('.')[0]), key.split('.')[1]))}" for key in keys]
    return values + [f"sized.keys={json.dumps(keys)}", f"sized.reason={json.dumps(cfg.sized.get('reason', ''))}"]

