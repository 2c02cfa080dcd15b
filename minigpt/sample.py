"""Generating text from a trained model: temperature, top-k, a KV cache, streaming.

Each step turns the logits of the last position into a distribution (divide by the temperature,
keep the top k, softmax) and draws the next character; temperature 0 means greedy (argmax).

With the KV cache (the default), the prompt is run once and every new character then costs one
position's work: its query attends to the cached keys and values of all earlier positions.
Position embeddings are learned for positions 0 .. block_size-1 only, so a plain rolling cache
would be wrong once the window is full (cached keys were computed at positions that have since
shifted). Instead, when the cache is full, it is rebuilt from the last half of the window, which
moves those characters to positions 0 .. block_size/2 - 1. The model is never fed more than
block_size positions, and every character still sees at least block_size/2 characters of
context. Up to block_size characters, the cached and uncached paths compute the same thing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.nn import functional as F

from minigpt import checkpoint
from minigpt.config import Config, from_dict
from minigpt.errors import PromptError
from minigpt.model import GPT, KVCache
from minigpt.tokenizer import CharTokenizer, UnknownPolicy

EMPTY_PROMPT = "\n"  # an empty prompt starts the text as if at the beginning of a line


def rebuild_keep(block_size: int) -> int:
    """How many recent characters a full KV cache is rebuilt from: half the window.

    Keeping more context costs a longer rebuild more often (3/4 measured 3.7x faster than no
    cache for 1,000 characters of the baby model, 1/2 measured 4.4x)."""
    return max(1, block_size // 2)


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


@torch.inference_mode()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` next ids (B, 1) one at a time, continuing the prompts idx (B, T)."""
    with single_cpu_thread(idx.device):
        yield from _generate(model, idx, max_new_tokens, temperature, top_k, generator, use_cache)


@contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, run the body on one thread: a decoding step is dozens of tiny operations, and waking a
    second thread for each costs more than it saves (measured 1.5-90x slower with two threads on a
    busy 2-core machine, see README Results). Other devices are left alone."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
              generator: torch.Generator | None, use_cache: bool) -> Iterator[torch.Tensor]:
    block_size = model.config.block_size
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])  # re-read the whole (cropped) context
            next_id = pick_next(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
        return

    keep = rebuild_keep(block_size)  # context kept when the cache is rebuilt
    cache = model.new_kv_cache(idx.size(0))
    context = idx[:, -block_size:]
    logits = model(context, kv_cache=cache)[0][:, -1, :]  # (B, V): the prompt, processed once
    recent = [context]  # the ids fed since the cache was last (re)built, for the next rebuild
    # Eval mode (no dropout) takes the lean one-position path; it computes what model() would.
    step = decode_step if not model.training else (lambda m, w, i, c: m(i, kv_cache=c)[0][:, -1, :])
    weights = decode_weights(model)
    for i in range(max_new_tokens):
        next_id = pick_next(logits, temperature, top_k, generator)
        yield next_id
        if i == max_new_tokens - 1:
            break
        recent.append(next_id)
        if cache.length == block_size:  # window full: rebuild the cache from the recent context
            cache.reset()
            context = torch.cat(recent, dim=1)[:, -keep:]
            recent = [context]
            logits = model(context, kv_cache=cache)[0][:, -1, :]
        else:
            logits = step(model, weights, next_id, cache)  # one new position


# ----------------------------------------------------------------------------- fast decoding
# For small models, the time to generate one character is mostly per-operation overhead (Python,
# module calls, dispatch), not arithmetic. `decode_step` runs the model for a single new position
# as a flat list of tensor operations on weights looked up once per generate() call: the same
# math as GPT.forward with a KV cache (tested equal), with about half the overhead.

def decode_weights(model: GPT) -> list[tuple[torch.Tensor | None, ...]]:
    """Per block, the tensors decode_step needs, looked up once (module attribute access is slow)."""
    out = []
    for block in model.transformer.h:
        a, m = block.attn, block.mlp
        out.append((block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight,
                    a.c_proj.bias, block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias,
                    m.c_proj.weight, m.c_proj.bias))
    return out


def decode_step(model: GPT, weights: list[tuple], idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) for one new position idx (B, 1) at index cache.length, whose keys and values join the cache.

    Equals model(idx, kv_cache=cache)[0][:, -1] in eval mode (no dropout).
    """
    B = idx.size(0)
    C, nh = model.config.n_embd, model.config.n_head
    hs = C // nh
    pos = cache.length
    tr = model.transformer
    x = F.embedding(idx[:, 0], tr.wte.weight) + tr.wpe.weight[pos]  # (B, C)
    for layer, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b) \
            in zip(cache.layers, weights):
        qkv = F.linear(F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w, attn_b).view(B, 3, nh, 1, hs)
        k, v = layer.append(qkv[:, 1], qkv[:, 2])  # (B, nh, pos + 1, hs): every key so far
        y = F.scaled_dot_product_attention(qkv[:, 0], k, v)  # (B, nh, 1, hs); one query sees all past keys
        x = x + F.linear(y.view(B, C), proj_w, proj_b)
        x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b)), out_w, out_b)
    x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias)
    return F.linear(x, model.lm_head.weight)  # (B, V)


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
