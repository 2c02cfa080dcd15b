"""Generating text from a trained model: temperature, top-k, a KV cache, streaming.

Each step turns the logits of the last position into a distribution (divide by the temperature,
keep the top k, softmax) and draws the next character; temperature 0 means greedy (argmax).

With the KV cache (the default), the prompt is run once and every new character then costs one
position's work: its query attends to the cached keys and values of all earlier positions.
Position embeddings are learned for positions 0 .. block_size-1 only, so a plain rolling cache
would be wrong once the window is full (cached keys were computed at positions that have since
shifted). Instead, when the cache is full, it is rebuilt from the last 3/4 of the window, which
moves those characters to positions 0 .. 3/4 block_size - 1. The model is never fed more than
block_size positions, and every character still sees at least 3/4 block_size characters of
context. Up to block_size characters, the cached and uncached paths compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F

from minigpt import checkpoint
from minigpt.config import Config, from_dict
from minigpt.errors import PromptError
from minigpt.model import GPT
from minigpt.tokenizer import CharTokenizer, UnknownPolicy

EMPTY_PROMPT = "\n"  # an empty prompt starts the text as if at the beginning of a line


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
    """Choose the next id from the last position's logits (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1) smallest kept logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` next ids (B, 1) one at a time, continuing the prompts idx (B, T)."""
    block_size = model.config.block_size
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])  # re-read the whole (cropped) context
            next_id = pick_next(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
        return

    keep = max(1, (3 * block_size) // 4)  # context kept when the cache is rebuilt
    context = idx[:, -block_size:]
    cache = model.new_kv_cache(idx.size(0))
    logits, _ = model(context, kv_cache=cache)  # (B, T, V): the prompt, processed once
    for i in range(max_new_tokens):
        next_id = pick_next(logits[:, -1, :], temperature, top_k, generator)
        yield next_id
        if i == max_new_tokens - 1:
            break
        context = torch.cat([context, next_id], dim=1)[:, -block_size:]
        if cache.length == block_size:  # window full: rebuild the cache from the recent context
            cache.reset()
            context = context[:, -keep:]
            logits, _ = model(context, kv_cache=cache)
        else:
            logits, _ = model(next_id, kv_cache=cache)  # one new position


@dataclass
class LoadedModel:
    """A model ready for inference, with what it was trained with."""

    model: GPT
    tokenizer: CharTokenizer
    config: Config
    payload: dict


def load_model(path: str, device: torch.device, prefer: str = checkpoint.BEST) -> LoadedModel:
    """Load a checkpoint (file or run directory) into an eval-mode model on `device`."""
    payload = checkpoint.load(path, prefer=prefer, map_location="cpu")
    cfg = from_dict(payload["config"], source=payload["path"])
    tokenizer = CharTokenizer.from_dict(payload["tokenizer"])
    model = GPT(cfg.model, tokenizer.vocab_size)
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return LoadedModel(model, tokenizer, cfg, payload)


def encode_prompt(tokenizer: CharTokenizer, prompt: str, unknown: UnknownPolicy) -> list[int]:
    """Prompt ids; an empty prompt (or one with nothing left after skipping) starts from a newline."""
    ids = tokenizer.encode(prompt, unknown)
    if not ids:
        ids = tokenizer.encode(EMPTY_PROMPT if EMPTY_PROMPT in tokenizer.stoi else tokenizer.chars[0])
    return ids


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int) -> None:
    """Reject sampling options that have no meaning."""
    if temperature < 0:
        raise PromptError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise PromptError(f"--top-k must be a positive number of candidates, got {top_k}")
    if max_new_tokens < 0:
        raise PromptError(f"--max-new-tokens must not be negative, got {max_new_tokens}")
    if num_samples <= 0:
        raise PromptError(f"--num-samples must be at least 1, got {num_samples}")


def sample(loaded: LoadedModel, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
           num_samples: int, seed: int, unknown: UnknownPolicy = "error", use_cache: bool = True,
           on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Generate `num_samples` continuations of `prompt` in one batch; return prompt + text for each.

    With one sample, `on_text(0, piece)` is called as each character is produced (streaming).
    """
    check_options(max_new_tokens, temperature, top_k, num_samples)
    device = loaded.model.lm_head.weight.device
    ids = encode_prompt(loaded.tokenizer, prompt, unknown)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (N, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = loaded.tokenizer.decode(ids)
    texts = [[start] for _ in range(num_samples)]
    if on_text and num_samples == 1:
        on_text(0, start)
    for next_id in generate(loaded.model, idx, max_new_tokens, temperature, top_k, generator, use_cache):
        for i, token in enumerate(next_id[:, 0].tolist()):
            piece = loaded.tokenizer.chars[token]
            texts[i].append(piece)
            if on_text and num_samples == 1:
                on_text(i, piece)
    return ["".join(parts) for parts in texts]
