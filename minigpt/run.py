"""What a training run holds between steps, and how a run starts.

A `Run` is everything the training loop carries from one step to the next: the model and the
module that runs its forward pass (compiled and/or wrapped in DDP), the optimizer, the loss
scaler, the step, the best validation loss, the generator that draws training batches, the
TensorBoard tracker and the process group (`World`). `start_run` makes one, fresh, resumed
from a checkpoint or initialised from another run's weights (fine-tuning), in the order every
small GPT trainer sets up: lock the run directory, prepare the data, build the model and
optimizer, restore, compile. `Run.state` and `Run.restore` turn a run's state into a
checkpoint's contents and back in one place, so what a checkpoint holds is listed once.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from minigpt import budget, checkpoint, config as config_mod, data, device as device_mod, viz
from minigpt.config import Config
from minigpt.console import log
from minigpt.distributed import World, per_rank_batch
from minigpt.errors import CheckpointError, ConfigError
from minigpt.lock import DirectoryLock
from minigpt.model import GPT
from minigpt.optim import make_optimizer
from minigpt.tokenizer import CharTokenizer
from minigpt.tracking import Tracker

SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.bias",
              "model.position")
VOCAB_KEYS = ("transformer.wte.weight", "lm_head.weight")  # one row per vocabulary entry (tied)


def rank_batch(tokens: np.ndarray, cfg: Config, generator: torch.Generator, world: World,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets for the whole global batch from one generator; this process reads its own slice."""
    offsets = data.sample_offsets(len(tokens), cfg.model.block_size, cfg.train.batch_size, generator)
    per_rank = per_rank_batch(cfg.train.batch_size, world.size)
    mine = offsets[world.rank * per_rank:(world.rank + 1) * per_rank]
    x, y = data.get_batch(tokens, mine, cfg.model.block_size)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


@dataclass
class Run:
    """The state of a training run between two steps (one process's share of it under torchrun)."""

    cfg: Config
    world: World  # this process's rank, the number of processes, and its device
    precision: device_mod.Precision  # autocast dtype and whether the loss is scaled
    model: GPT  # the plain module: its weights are what checkpoints hold
    step_model: torch.nn.Module  # what runs the forward pass: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling for float16; a no-op otherwise
    batch_generator: torch.Generator  # draws the training batches' offsets (saved, for exact resume)
    tokenizer: CharTokenizer
    tokens: dict[str, np.ndarray]  # "train" and "val" token arrays (memory-mapped)
    data_meta: dict  # what data.prepare recorded about the corpus
    fused_attention: bool
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    evals_since_best: int = 0  # evaluations in a row that found no new best val loss (train.patience stops at it)
    tracker: Tracker | None = None  # TensorBoard and the progress bar (disabled on ranks other than 0)
    threads: device_mod.ThreadPolicy = field(default_factory=device_mod.ThreadPolicy)  # CPU threads, following the load
    deadline: budget.Deadline | None = None  # a budgeted fresh run's deadline and what its steps cost lately
    history: list[dict] = field(default_factory=list)  # one entry per evaluation of this process's life
    attention_frames: viz.AttentionFrames = field(default_factory=viz.AttentionFrames)  # the evaluations' attention image
    started: float = field(default_factory=time.perf_counter)  # when this process's training began (history's time_s)
    init_from: dict | None = None  # where a fine-tuned run's first weights came from (kept in its checkpoints)
    prefetched: tuple[torch.Tensor, torch.Tensor] | None = None  # the next training batch, read ahead (prefetch)
    generator_before_prefetch: torch.Tensor | None = None  # the batch generator's state before that read
    lock: DirectoryLock | None = None  # rank 0's exclusive lock on the run directory, held until close()

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def compiled(self) -> bool:
        """Whether the forward pass runs compiled (False too after a failed compile fell back to eager)."""
        return device_mod.is_compiled(self.step_model)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir()

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.gradient_accumulation_steps * self.cfg.model.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch (x, y) of this process: the one read ahead by `prefetch`, if there is one."""
        if self.prefetched is not None:
            batch, self.prefetched = self.prefetched, None
            return batch
        return rank_batch(self.tokens["train"], self.cfg, self.batch_generator, self.world, self.device)

    def prefetch(self) -> None:
        """Read the next batch now, while the device still computes the current step (on a GPU the two overlap).

        The batch generator's state from before this read is what checkpoints keep, so a run
        resumed from one reads this batch again, as the run never stopped does."""
        if self.prefetched is None:
            self.generator_before_prefetch = self.batch_generator.get_state()
            self.prefetched = rank_batch(self.tokens["train"], self.cfg, self.batch_generator, self.world, self.device)

    def say(self, message: str) -> None:
        """A line of progress on stderr, from rank 0 only."""
        if self.world.is_main:
            log(message)

    def close(self) -> None:
        """End the progress display and TensorBoard writer, release the run directory's lock, and let go of the
        module that ran the steps (under torchrun, DDP's pending communication must end before the process
        group does, not when the interpreter finalises: then it aborts the process)."""
        if self.tracker is not None:
            self.tracker.close()
        if self.lock is not None:
            self.lock.release()
        self.step_model = self.model

    def save(self, path: Path) -> None:
        """Write the run's state to the checkpoint file `path`; rank 0 only."""
        if self.world.is_main:
            checkpoint.save(path, self.state())

    def state(self) -> dict[str, Any]:
        """Everything sampling and an exact resume need from the run, as plain types and tensors."""
        cuda = self.device.type == "cuda"
        meta = self.data_meta
        return {
            "model": checkpoint.clean_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.precision.use_scaler else None,
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "evals_since_best": self.evals_since_best,
            "config": config_mod.to_dict(self.cfg),
            "tokenizer": self.tokenizer.to_dict(),
            "rng": {"batch": self.batch_generator.get_state() if self.prefetched is None else self.generator_before_prefetch,
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if cuda else None},
            "data": {"sources": meta["sources"], "sha256": meta["source_sha256"],
                     "train_tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"]},
            "init_from": self.init_from,  # fine-tuning: the checkpoint (and step) the first weights came from
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Put a checkpoint's training state (from `state`) back, RNG streams included."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.precision.use_scaler and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.batch_generator.set_state(payload["rng"]["batch"])
        self.prefetched = None
        torch.set_rng_state(payload["rng"]["torch"])
        if self.device.type == "cuda" and payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"], self.device)
        self.step, self.best_val_loss = payload["step"], payload["best_val_loss"]
        self.evals_since_best = payload.get("evals_since_best", 0)  # absent from checkpoints before train.patience
        self.init_from = payload.get("init_from")


def build_run(cfg: Config, world: World, prepared: data.Prepared) -> Run:
    """A fresh run at step 0: seeded model, optimizer, loss scaler and batch generator on world's device."""
    t = cfg.train
    precision = device_mod.resolve_precision(t.dtype, world.device)
    threads = device_mod.ThreadPolicy(t.threads)
    threads.decide()
    torch.manual_seed(t.seed)
    model = GPT(cfg.model, prepared.tokenizer.vocab_size).to(world.device)
    fused_attention = device_mod.resolve_fused_attention(t.fused_attention, world.device, precision)
    model.set_fused_attention(fused_attention)
    return Run(cfg=cfg, world=world, precision=precision, model=model, step_model=model,
               optimizer=make_optimizer(model, t, world.device),
               scaler=torch.amp.GradScaler(world.device.type, enabled=precision.use_scaler),
               batch_generator=torch.Generator().manual_seed(t.seed), tokenizer=prepared.tokenizer,
               tokens={split: prepared.tokens(split) for split in ("train", "val")}, data_meta=prepared.meta,
               fused_attention=fused_attention, threads=threads)


def compile_and_wrap(run: Run) -> None:
    """Set the module that runs the forward pass: compiled if train.compile says so, in DDP under torchrun."""
    if device_mod.resolve_compile(run.cfg.train.compile, run.device):
        run.step_model = device_mod.compile_model(run.model, run.device)  # falls back to eager with a note
    run.step_model = run.world.wrap(run.step_model)


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted keys whose values differ between two config dicts."""
    diffs = {}
    for section in config_mod.SECTIONS:
        for key in set(old.get(section, {})) | set(new.get(section, {})):
            a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if a != b:
                diffs[f"{section}.{key}"] = (a, b)
    return diffs


def shape_changes(diffs: dict[str, tuple]) -> list[str]:
    """The model-shape keys among config differences, as 'key old -> new' (a different network)."""
    return [f"{k} {a} -> {b}" for k, (a, b) in sorted(diffs.items()) if k in SHAPE_KEYS]


def check_resume(payload: dict, cfg: Config, tokenizer: CharTokenizer, say: Callable[[str], None] = log) -> None:
    """Refuse a checkpoint whose network shape or vocabulary differ; say which harmless keys changed."""
    diffs = config_differences(payload["config"], config_mod.to_dict(cfg))
    shape = shape_changes(diffs)
    if shape:
        raise CheckpointError(f"cannot resume {payload['path']}: the config changes the model shape ({', '.join(shape)}); "
                              "restore those values or train a new run with --out-dir")
    if "train.optimizer" in diffs and (diffs["train.optimizer"][0] or "adamw") != cfg.train.optimizer:
        raise CheckpointError(f"cannot resume {payload['path']}: it was trained with train.optimizer "
                              f"{diffs['train.optimizer'][0]}, the config says {cfg.train.optimizer}; "
                              "use the same optimizer or train a new run with --out-dir")
    if payload["tokenizer"]["chars"] != tokenizer.chars:
        raise CheckpointError(f"cannot resume {payload['path']}: the corpus vocabulary differs from the one it was "
                              "trained on; use the same data.path or train a new run with --out-dir")
    harmless = {k: v for k, v in diffs.items() if k not in SHAPE_KEYS and k != "train.optimizer"}
    if harmless:
        say("resuming with changed settings: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in harmless.items()))


def resume_payload(cfg: Config, resume: str | bool) -> dict:
    """The checkpoint a resumed run continues: its run directory's last.pt (resume=True) or the file `resume`."""
    last_path = cfg.run_dir() / checkpoint.LAST
    if resume is True and not last_path.exists():
        raise CheckpointError(f"nothing to resume: run directory {cfg.run_dir()} holds no {checkpoint.LAST}; "
                              "train without --resume, or point --out-dir at an existing run")
    return checkpoint.load(last_path if resume is True else resume, prefer=checkpoint.LAST)


def resume_run(run: Run, payload: dict) -> None:
    """Continue `run` from a checkpoint of it (`resume_payload`): weights, optimizer, step, RNG streams."""
    if budget.seconds(run.cfg.train):  # a budgeted run continues with the steps it derived, not new ones
        budget.keep_resolved(run.cfg.train, payload["config"]["train"])
    check_resume(payload, run.cfg, run.tokenizer, run.say)
    run.restore(payload)
    best = f"{run.best_val_loss:.4f}" if math.isfinite(run.best_val_loss) else "none yet"
    run.say(f"resuming {payload['path']} at step {run.step} (best val loss {best})")


def init_from(run: Run, payload: dict) -> None:
    """Start `run` at step 0 from another run's weights (fine-tuning): its vocabulary's rows are copied,
    rows of characters new to this corpus keep their fresh initialisation; optimizer and schedule stay fresh.

    The corpus must have been prepared on the checkpoint's vocabulary (`data.prepare(base_vocab=...)`),
    so that every old character keeps its id and the new ones follow.
    """
    old_chars = payload["tokenizer"]["chars"]
    assert run.tokenizer.chars[:len(old_chars)] == old_chars, "corpus not prepared on the checkpoint's vocabulary"
    shape = shape_changes(config_differences(payload["config"], config_mod.to_dict(run.cfg)))
    theirs, mine = payload["model"], run.model.state_dict()
    weights = sorted(k for k in set(theirs) | set(mine) if k not in VOCAB_KEYS and
                     (k not in theirs or k not in mine or theirs[k].shape != mine[k].shape))
    if shape or weights:
        differing = ", ".join(shape) if shape else "weights " + ", ".join(weights[:6]) + (" ..." if len(weights) > 6 else "")
        raise CheckpointError(f"cannot initialise from {payload['path']}: the model shape differs ({differing}); "
                              "set the config's model section to the checkpoint's values")
    with torch.no_grad():
        for key, value in theirs.items():
            if key in VOCAB_KEYS:
                mine[key][:len(old_chars)].copy_(value)  # old ids keep their rows; new rows as initialised
            else:
                mine[key].copy_(value)
    run.init_from = {"checkpoint": payload["path"], "step": payload["step"], "best_val_loss": payload.get("best_val_loss"),
                     "vocab_size": len(old_chars)}
    added = run.tokenizer.chars[len(old_chars):]
    run.say(f"initialised from {payload['path']} (step {payload['step']}); vocabulary {len(old_chars)} + "
            f"{len(added)} new character(s){': ' + repr(''.join(added)) if added else ''}")


def refuse_to_overwrite(cfg: Config) -> None:
    """A fresh run may not silently replace the checkpoints of an earlier one."""
    if (cfg.run_dir() / checkpoint.LAST).exists():
        raise CheckpointError(f"run directory {cfg.run_dir()} already holds a checkpoint; pass --resume to continue it, "
                              "--out-dir for a new run, or --overwrite to start again from scratch")


def write_run_dir(cfg: Config) -> None:
    """Create the run directory and write the resolved config into it."""
    run_dir = cfg.run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.dump(cfg))
    except OSError as exc:
        raise CheckpointError(f"cannot write to run directory {run_dir}: {exc.strerror or exc}; "
                              "choose a writable --out-dir") from exc


def lock_run_dir(cfg: Config) -> DirectoryLock:
    """Take the run directory's lock (one writer per run directory); note a predecessor that was killed holding it."""
    lock = DirectoryLock(cfg.run_dir(), "training run", advice="wait for it to finish or stop it, or pass another --out-dir")
    if lock.stale_holder:
        log(f"note: the lock of {cfg.run_dir()} was left by {lock.stale_holder}, which ended without releasing it "
            "(killed?); taking it over")
    return lock


def start_run(cfg: Config, world: World, resume: str | bool = False, overwrite: bool = False,
              init_from_path: str | None = None) -> Run:
    """Everything before the first step: lock, data, model and optimizer, resume or initialise, run dir, compile."""
    if resume and init_from_path:
        raise ConfigError(f"--init-from starts a new run from {init_from_path}'s weights and --resume continues a run; "
                          "pass one of them (a fine-tuned run is resumed with --resume alone)")
    with ExitStack() as on_failure:  # a start that fails releases the lock (and a run directory it left empty)
        lock = lock_run_dir(cfg) if world.is_main else None  # before anything is written
        if lock is not None:
            on_failure.callback(lock.release, remove_directory_if_empty=True)
        run = start_locked_run(cfg, world, resume, overwrite, init_from_path)
        run.lock = lock
        on_failure.pop_all()
    return run


def start_locked_run(cfg: Config, world: World, resume: str | bool, overwrite: bool, init_from_path: str | None) -> Run:
    """`start_run` once rank 0 holds the run directory's lock. The caller writes the run directory's
    config.yaml (`write_run_dir`) once the run's settings are final (after a time budget's plan)."""
    if not resume and not overwrite:
        refuse_to_overwrite(cfg)
    origin = checkpoint.load(init_from_path) if init_from_path else None  # a run directory means its best.pt
    resumed = resume_payload(cfg, resume) if resume else None
    base_vocab = origin["tokenizer"]["chars"] if origin else checkpoint.base_vocabulary(resumed)
    prepared = world.in_turn(lambda: data.prepare(cfg.data, cfg.model.block_size, base_vocab=base_vocab))  # written once, then read
    run = build_run(cfg, world, prepared)
    if resumed:
        resume_run(run, resumed)
    elif origin:
        init_from(run, origin)
    compile_and_wrap(run)
    return run
