"""The optimizer and its learning-rate schedule.

Two optimizers are available (`train.optimizer`):

* `adamw`: AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay on the weight matrices
  and embeddings only, never on biases or LayerNorm gains, as in GPT-2 and nanoGPT.
* `muon`: Muon (Jordan et al., 2024) for the 2-D weight matrices inside the transformer blocks,
  AdamW for everything else (embeddings, biases, norm gains). Muon replaces each matrix's
  momentum by its nearest (semi-)orthogonal matrix, computed with a few Newton-Schulz
  iterations, so every direction of the update moves at the same rate; scaling the step by
  0.2 * sqrt(max(rows, cols)) gives it the size of an AdamW update (Liu et al., 2025), so one
  learning rate suits both. On the CPU config it reaches a given loss in fewer steps than AdamW
  (docs/results.md). It is written here rather than taken from
  `torch.optim.Muon`, which runs the iteration in bfloat16 on every device: on a CPU without
  bf16 units that measured about 30 times slower than float32, more than the training step.

The schedule (`train.lr_schedule`) starts with a linear warmup to `learning_rate`, then either
decays along a cosine to `min_lr` (Loshchilov & Hutter, 2017), or holds the peak and decays
linearly over the last `decay_fraction` of the steps (warmup-stable-decay, Hu et al., 2024),
which suits a run whose length is set by a time budget.
"""

from __future__ import annotations

import math

import torch

from minigpt.config import TrainConfig
from minigpt.device import cpu_has_fast_bfloat16
from minigpt.model import GPT


def get_lr(step: int, t: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine (or stable-then-linear) decay to min_lr at lr_decay_iters."""
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.learning_rate * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_iters:
        return t.min_lr
    if t.lr_schedule == "wsd":
        return planned_decay(step, t.learning_rate, t.min_lr, t.decay_plan or [[wsd_decay_start(t), decay_iters]])
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.learning_rate - t.min_lr)


def wsd_decay_start(t: TrainConfig) -> int:
    """Where warmup-stable-decay starts decaying without a decay plan: the last decay_fraction of the steps."""
    decay_iters = t.lr_decay_iters or t.max_iters
    return max(t.warmup_iters, decay_iters - round(t.decay_fraction * decay_iters))


def planned_decay(step: int, peak: float, floor: float, plan: list[list[int]]) -> float:
    """The learning rate at `step` of a decay planned as [start, end] pairs: `peak` before the first start, then
    linear from the rate at each pair's start down to `floor` at its end (a later pair cuts the one before short)."""
    lr = peak
    for i, (start, end) in enumerate(plan):
        if step < start:
            break
        nxt = plan[i + 1][0] if i + 1 < len(plan) else None
        at = step if nxt is None or step < nxt else nxt  # where this pair hands over to the next one
        value = lr + (at - start) / (end - start) * (floor - lr) if at < end else floor
        if nxt is None or step < nxt:
            return value
        lr = value
    return lr


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


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz: a steep start, singular values near 1 in 5 steps


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The matrix with g's singular vectors and singular values near 1, by Newton-Schulz iteration."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the wide side: x @ x.T is the smaller square
    x = x / (x.norm() + 1e-7)  # Frobenius norm 1, so every singular value is at most 1
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x  # each singular value sigma -> a*sigma + b*sigma^3 + c*sigma^5
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum whose update for each weight matrix is orthogonalised (Muon), with decoupled weight decay."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # bfloat16 where the device has fast bf16 matmuls

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])  # running mean of the gradients
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_steps"], self.ns_dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))  # the RMS of an AdamW step


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
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bfloat16())
    muon = Muon(matrices, lr=t.learning_rate, weight_decay=t.weight_decay,
                ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32)
    return Optimizers(muon, adamw(rest, t))
