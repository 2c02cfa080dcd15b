"""The optimizer and its learning-rate schedule.

Two optimizers are available (`train.optimizer`):

* `adamw`: AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay on the weight matrices
  and embeddings only, never on biases or LayerNorm gains, as in GPT-2 and nanoGPT.
* `muon`: Muon (Jordan et al., 2024; `torch.optim.Muon`) for the 2-D weight matrices inside the
  transformer blocks, AdamW for everything else (embeddings, biases, norm gains). Muon replaces
  each matrix's momentum by its nearest orthogonal matrix (a few Newton-Schulz iterations), so
  every direction of the update moves at the same rate; with `adjust_lr_fn="match_rms_adamw"`
  the same learning rate suits both optimizers. On the CPU config it reaches a given loss in
  fewer steps than AdamW (README, "Recipes at a 5-minute budget").

The schedule (`train.lr_schedule`) starts with a linear warmup to `learning_rate`, then either
decays along a cosine to `min_lr` (Loshchilov & Hutter, 2017), or holds the peak and decays
linearly over the last `decay_fraction` of the steps (warmup-stable-decay, Hu et al., 2024),
which suits a run whose length is set by a time budget.
"""

from __future__ import annotations

import math

import torch

from minigpt.config import TrainConfig
from minigpt.model import GPT


def get_lr(step: int, t: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine (or stable-then-linear) decay to min_lr at lr_decay_iters."""
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.min_lr
    if t.lr_schedule == "wsd":
        decay_start = max(t.warmup_iters, decay_iters - round(t.decay_fraction * decay_iters))
        if step < decay_start:
            return t.learning_rate
        return t.learning_rate + (step - decay_start) / (decay_iters - decay_start) * (t.min_lr - t.learning_rate)
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def set_lr(optimizer: torch.optim.Optimizer | Optimizers, lr: float) -> float:
    """Give every parameter group the learning rate `lr`; return it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class Optimizers:
    """Several optimizers, each over its own parameters, stepped and saved as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def adamw(groups: list[dict], t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `groups`; the fused kernel where this torch has it."""
    try:
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), foreach=True)


def make_optimizer(model: GPT, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """The optimizer train.optimizer names: AdamW alone, or Muon for the blocks' matrices plus AdamW for the rest."""
    groups = model.optimizer_groups(t.weight_decay)
    if t.optimizer == "adamw":
        return adamw(groups, t)
    matrices = [p for p in model.transformer.h.parameters() if p.dim() == 2]
    chosen = {id(p) for p in matrices}
    rest = [{**group, "params": [p for p in group["params"] if id(p) not in chosen]} for group in groups]
    muon = torch.optim.Muon(matrices, lr=t.learning_rate, weight_decay=t.weight_decay, adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw(rest, t))
