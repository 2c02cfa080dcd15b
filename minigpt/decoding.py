"""Generating ids from a model: temperature, top-k, top-p, and a KV cache that is rebuilt when full.

This module works on token ids only; minigpt.generation turns text into ids and back.

Each step turns the logits of the last position into a distribution (divide by the temperature,
keep the top k, softmax, keep the nucleus of probability top_p) and draws the next id;
temperature 0 means greedy (argmax).

With the KV cache (the default), the prompt is run once and every new id then costs one
position's work: its query attends to the cached keys and values of all earlier positions.
Position embeddings are learned for positions 0 .. block_size-1 only, so a plain rolling cache
would be wrong once the window is full (cached keys were computed at positions that have since
shifted). Instead, when the cache is full, it is rebuilt from the last half of the window, which
moves those ids to positions 0 .. block_size/2 - 1. The model is never fed more than
block_size positions, and every id still sees at least block_size/2 ids of context. Up to
block_size ids, the cached and uncached paths compute the same thing. In eval mode the cached
path runs minigpt.fastpath, the lean equivalent of the model's forward pass.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.nn import functional as F

from minigpt.device import cpu_threads
from minigpt.fastpath import Decoder
from minigpt.model import GPT


def rebuild_keep(block_size: int) -> int:
    """How many recent characters a full KV cache is rebuilt from: half the window.

    Keeping more context costs a longer rebuild more often (docs/benchmarks.md, "Sampling speed on a CPU")."""
    return max(1, block_size // 2)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p: keep the fewest most likely ids whose probabilities add up to at least top_p, zero the rest (B, V).

    The most likely id is always kept; the kept probabilities are not renormalised here (the draw
    in pick_next divides by their sum implicitly)."""
    ordered, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    before = ordered.cumsum(dim=-1) - ordered  # probability of the ids ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)  # the nucleus was complete without it
    return torch.zeros_like(probs).scatter_(-1, order, ordered)


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None, top_p: float | None = None) -> torch.Tensor:
    """Choose the next id from the last position's logits (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    if top_p is not None and top_p < 1:
        probs = nucleus(probs, top_p)
    # Draw id i with probability probs[i]: the largest probs[i] / E[i], with E[i] ~ Exponential(1)
    # independent, falls on i with exactly that probability ("exponential race"). torch.multinomial
    # draws one sample the same way, after input checks that cost more than the draw here.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return torch.argmax(probs / race, dim=-1, keepdim=True)


@torch.inference_mode()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, top_p: float | None = None) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` next ids (B, 1) one at a time, continuing the prompts idx (B, T)."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        return pick_next(logits, temperature, top_k, generator, top_p)

    if not use_cache:  # whole-context forwards are big enough to use every thread
        yield from _generate(model, idx, max_new_tokens, pick, use_cache)
        return
    with cpu_threads(idx.device, 1) as all_threads:
        yield from _generate(model, idx, max_new_tokens, pick, use_cache, all_threads)


def _generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor],
              use_cache: bool, fill_threads: int = 0) -> Iterator[torch.Tensor]:
    block_size = model.config.block_size
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])  # re-read the whole (cropped) context
            next_id = pick(logits[:, -1, :])
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
        return

    keep = rebuild_keep(block_size)  # context kept when the cache is rebuilt
    if model.training:  # dropout active: the module path
        cache = model.new_kv_cache(idx.size(0))

        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(ids, kv_cache=cache)[0][:, -1, :]

        def fill(ids: torch.Tensor) -> torch.Tensor:
            cache.reset()
            return step(ids)
    else:  # eval mode: the lean path, which computes what model() would
        decoder = Decoder(model, idx.size(0), fill_threads)
        cache, fill, step = decoder.cache, decoder.fill, decoder.step

    context = idx[:, -block_size:]
    logits = fill(context)  # (B, V): the prompt, processed once
    recent = [context]  # the ids fed since the cache was last (re)built, for the next rebuild
    for i in range(max_new_tokens):
        next_id = pick(logits)
        yield next_id
        if i == max_new_tokens - 1:
            break
        recent.append(next_id)
        if cache.length == block_size:  # window full: rebuild the cache from the recent context
            context = torch.cat(recent, dim=1)[:, -keep:]
            recent = [context]
            logits = fill(context)
        else:
            logits = step(next_id)  # one new position
