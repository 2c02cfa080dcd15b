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

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.nn import functional as F

from minigpt.errors import PromptError
from minigpt.model import GPT


LN2 = math.log(2)


def windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int]]:
    """The windows that score every target once, in order: (start, first local position to score) pairs."""
    n_targets = n_tokens - 1
    if n_targets < 1:
        return
    T = min(block_size, n_targets)
    last = n_targets - T  # the last window is aligned to the end of the text
    start, scored = 0, 0  # targets 1 .. scored are done
    while True:
        yield start, max(0, scored - start)  # local i predicts target start + 1 + i
        scored = start + T
        if start == last:
            return
        start = min(start + stride, last)


def window_logits(model: GPT, ids: np.ndarray | torch.Tensor, stride: int | None = None,
                  batch_size: int = 64) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]]:
    """Each batch of windows with the model's logits (B, T, V) and the targets (B, T); `ids` may be a memory-mapped
    array of any integer type: only each batch of windows is read and widened to int64, so memory does not grow
    with the text."""
    block_size = model.config.block_size
    stride = stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise PromptError(f"{{--stride}} must be between 1 and block_size ({block_size}), got {stride}")
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids
    T = min(block_size, len(ids) - 1)
    device = next(model.parameters()).device
    plan = windows(len(ids), block_size, stride)
    was_training = model.training
    model.eval()
    try:
        while chunk := list(itertools.islice(plan, batch_size)):
            offsets = np.array([s for s, _ in chunk])[:, None] + np.arange(T + 1)  # (B, T+1)
            window = torch.from_numpy(ids[offsets].astype(np.int64))
            x, y = window[:, :-1].to(device), window[:, 1:].to(device)  # (B, T) each
            with torch.no_grad():
                logits, _ = model(x)
            yield chunk, logits.float(), y
    finally:
        model.train(was_training)


def scored_batches(model: GPT, ids: np.ndarray | torch.Tensor, stride: int | None = None,
                   batch_size: int = 64) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
    """Each batch of windows with its losses in nats, (B, T)."""
    for chunk, logits, y in window_logits(model, ids, stride, batch_size):
        yield chunk, F.cross_entropy(logits.transpose(1, 2), y, reduction="none").cpu()  # (B, T)


def token_nll(model: GPT, ids: np.ndarray | torch.Tensor, stride: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Cross-entropy in nats of every character after the first, (N-1,), from strided windows."""
    nll = torch.empty(max(len(ids) - 1, 0), dtype=torch.float32)
    for chunk, losses in scored_batches(model, ids, stride, batch_size):
        T = losses.size(1)
        for row, (start, first) in enumerate(chunk):
            nll[start + first:start + T] = losses[row, first:]  # targets start+1+first .. start+T
    return nll


def token_top(model: GPT, ids: np.ndarray | torch.Tensor, k: int, stride: int | None = None,
              batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_nll` and, from the same forward passes, the k most likely characters for every position after the
    first with their probabilities: (N-1,) nats, (N-1, k) ids, (N-1, k) probabilities (row j: what the model
    expected before character j+1)."""
    n, k = max(len(ids) - 1, 0), min(k, model.lm_head.out_features)
    nll = torch.empty(n, dtype=torch.float32)
    top_ids, top_p = torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=torch.float32)
    for chunk, logits, y in window_logits(model, ids, stride, batch_size):
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").cpu()  # (B, T), as scored_batches
        p, i = torch.topk(F.softmax(logits, dim=-1), k, dim=-1)  # (B, T, k) each
        T = logits.size(1)
        for row, (start, first) in enumerate(chunk):
            scored = slice(start + first, start + T)
            nll[scored], top_ids[scored], top_p[scored] = losses[row, first:], i[row, first:].cpu(), p[row, first:].cpu()
    return nll, top_ids, top_p


def mean_nll(model: GPT, ids: np.ndarray | torch.Tensor, stride: int | None = None,
             batch_size: int = 64) -> tuple[float, int]:
    """The mean of `token_nll` and how many characters it scored, summed batch by batch (no per-character array)."""
    total, count = 0.0, 0
    for chunk, losses in scored_batches(model, ids, stride, batch_size):
        scored = torch.arange(losses.size(1)) >= torch.tensor([first for _, first in chunk])[:, None]  # (B, T)
        total += losses.double()[scored].sum().item()
        count += int(scored.sum())
    return total / max(count, 1), count
