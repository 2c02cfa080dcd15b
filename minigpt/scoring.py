"""Exact per-character loss of a model over a whole sequence of ids.

Training reports a random-batch estimate of the validation loss. Here every character of a text
is scored exactly once, with as much left context as the model's window allows:

    bits(c_j) = -log2 p(c_j | c_<j)          for j = 1 .. N-1

The first character has no context, so it is not scored (the same rule as training, where the
target y is x shifted by one). Long texts are read with a strided window: windows of block_size
characters advance by `stride`; the first window scores all its positions, each later window
only the positions the previous windows have not scored. Every character then sees at least
block_size - stride characters of context (all of them when stride = 1). The last window is
aligned to the end of the text, so all windows have the same length and are scored in batches.

Bits per character is the mean cross-entropy in nats divided by ln 2.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from minigpt.errors import PromptError
from minigpt.model import GPT


LN2 = math.log(2)


def window_plan(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """The windows that score every target once: (start, first local position to score) pairs."""
    n_targets = n_tokens - 1
    if n_targets < 1:
        return []
    T = min(block_size, n_targets)
    starts = list(range(0, n_targets - T + 1, stride))
    if starts[-1] != n_targets - T:
        starts.append(n_targets - T)  # align the last window to the end of the text
    plan, scored = [], 0  # targets 1 .. scored are done
    for start in starts:
        plan.append((start, max(0, scored - start)))  # local i predicts target start + 1 + i
        scored = start + T
    return plan


@torch.no_grad()
def token_nll(model: GPT, ids: torch.Tensor, stride: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Cross-entropy in nats of every character after the first, (N-1,), from strided windows."""
    block_size = model.config.block_size
    stride = stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise PromptError(f"{{--stride}} must be between 1 and block_size ({block_size}), got {stride}")
    ids = ids.to(torch.long).cpu()
    plan = window_plan(len(ids), block_size, stride)
    device = next(model.parameters()).device
    nll = torch.empty(max(len(ids) - 1, 0), dtype=torch.float32)
    was_training = model.training
    model.eval()
    for b in range(0, len(plan), batch_size):
        chunk = plan[b:b + batch_size]
        T = min(block_size, len(ids) - 1)
        starts = torch.tensor([s for s, _ in chunk])
        offsets = starts[:, None] + torch.arange(T + 1)  # (B, T+1)
        window = ids[offsets]
        x, y = window[:, :-1].to(device), window[:, 1:].to(device)  # (B, T) each
        logits, _ = model(x)
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").cpu()  # (B, T)
        for row, (start, first) in enumerate(chunk):
            nll[start + first:start + T] = losses[row, first:]  # targets start+1+first .. start+T
    model.train(was_training)
    return nll
