"""The optimizer and its learning-rate schedule.

AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay on the weight matrices and
embeddings only, never on biases or LayerNorm gains, as in GPT-2 and nanoGPT. The schedule is
the usual one for small GPTs: a linear warmup to `learning_rate`, then a cosine decay to
`min_lr` (Loshchilov & Hutter, 2017).
"""

from __future__ import annotations

import math

import torch

from minigpt.config import TrainConfig
from minigpt.model import GPT


def get_lr(step: int, t: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Give every parameter group the learning rate `lr`; return it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def make_optimizer(model: GPT, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; the fused kernel where this torch has it."""
    groups = model.optimizer_groups(t.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.beta1, t.beta2), foreach=True)
