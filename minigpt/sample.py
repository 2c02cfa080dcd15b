"""Generating text from a trained model: temperature, top-k, top-p, stop strings, a KV cache, streaming.

Each step turns the logits of the last position into a distribution (divide by the temperature,
keep the top k, softmax, keep the nucleus of probability top_p) and draws the next character;
temperature 0 means greedy (argmax). Generation ends after max_new_tokens characters, or as soon
as the text ends with a stop string (which is not part of the result).

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

import math
import shlex
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.nn import functional as F

from minigpt import checkpoint
from minigpt.config import Config, from_dict
from minigpt.errors import PromptError
from minigpt.model import GPT, KVCache, rotate
from minigpt.tokenizer import CharTokenizer, UnknownPolicy

EMPTY_PROMPT = "\n"  # an empty prompt starts the text as if at the beginning of a line


def rebuild_keep(block_size: int) -> int:
    """How many recent characters a full KV cache is rebuilt from: half the window.

    Keeping more context costs a longer rebuild more often (3/4 measured 3.7x faster than no
    cache for 1,000 characters of the baby model, 1/2 measured 4.4x)."""
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


@contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[int]:
    """On CPU, run the body on n threads; yield the count set before, and restore it afterwards.

    Cached sampling steps one position at a time on one thread: a step is dozens of tiny
    operations, and waking a second thread for each costs more than it saves. Filling the cache
    (the prompt, each rebuild) and the uncached path run whole windows, which two threads do
    faster. Measured on the 2-core CPU, CPU config, 1,000 characters: cached 480 ms on one thread
    against 553 ms on two; with the fills on two threads 373 ms against 413 ms on one; uncached
    1.96 s on two threads against 2.87 s on one. Other devices are left alone."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


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


# ----------------------------------------------------------------------------- fast decoding
# For small models, the time to generate one character is mostly per-operation overhead (Python,
# module calls, dispatch), not arithmetic. In eval mode, generate() runs the model through flat
# tensor operations instead of the modules: the same math as GPT.forward with a KV cache (tested
# equal), in fewer and cheaper operations:
#   * each Linear is one torch.addmm(bias, x, W) on a weight stored transposed, (in, out), so no
#     transpose is made per call; the residual is added the same way: addmm(x + bias, y, W);
#   * keys and values are stored with one copy (they sit side by side in LayerCache.kv);
#   * GELU is written with erf, gelu(h) = h/2 * (1 + erf(h/sqrt2)), and its two scalings are
#     folded into the weights: with u = h/sqrt2 (c_fc's weight and bias divided by sqrt2),
#     gelu(h) @ W = (u + u * erf(u)) @ (W / sqrt2), two operations instead of F.gelu, whose fixed
#     cost on CPU is several microseconds at one position;
#   * for one new position (Decoder.step), every view and buffer that does not change from one
#     position to the next is made once, so a step is little more than its arithmetic.
# Measured on the CPU config's model, one thread, 1,000 characters (README, Speed): 283 us per
# character with Decoder.step, 367 us with lean_forward for every position, 416 us without
# the one-copy cache and the folded GELU, 480 us through F.linear, F.gelu and two copies.

SQRT2 = math.sqrt(2)


def decode_weights(model: GPT) -> list[tuple[torch.Tensor | None, ...]]:
    """Per block, the tensors the lean path needs: Linear weights transposed to (in, out), the MLP's
    scaled by 1/sqrt2 (see above). They are copies, made again for every generate() call."""
    def t(linear: torch.nn.Linear, scale: float = 1.0) -> torch.Tensor:
        return linear.weight.t().contiguous() / scale

    out = []
    for block in model.transformer.h:
        a, m = block.attn, block.mlp
        fc_b = m.c_fc.bias / SQRT2 if m.c_fc.bias is not None else None
        out.append((block.ln_1.weight, block.ln_1.bias, t(a.c_attn), a.c_attn.bias, t(a.c_proj), a.c_proj.bias,
                    block.ln_2.weight, block.ln_2.bias, t(m.c_fc, SQRT2), fc_b, t(m.c_proj, SQRT2), m.c_proj.bias))
    return out


def _addmm(bias: torch.Tensor | None, x: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor | None = None):
    """bias + x @ weight_t in one operation (a bias of None adds nothing), into `out` if given."""
    return torch.matmul(x, weight_t, out=out) if bias is None else torch.addmm(bias, x, weight_t, out=out)


def _mlp_residual(x: torch.Tensor, C: int, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b) -> torch.Tensor:
    """x + MLP(ln_2(x)) with the folded GELU (see above); x is (N, C)."""
    u = _addmm(fc_b, F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w)  # (N, 4C): the MLP's input / sqrt2
    return _addmm(x if out_b is None else x + out_b, torch.addcmul(u, u, torch.erf(u)), out_w)


def rope_tables(model: GPT) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The RoPE cos and sin tables (block_size, hs/2) of a model with model.position rope, else None."""
    attn = model.transformer.h[0].attn
    return (attn.rope_cos, attn.rope_sin) if attn.rope else None


def lean_forward(model: GPT, weights: list[tuple], idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the last of the positions idx (B, T), fed into an empty cache (the prompt or a
    rebuild: positions 0 .. T-1, causal). Equals model(idx, kv_cache=cache)[0][:, -1] in eval mode."""
    B, T = idx.size()
    C, nh = model.config.n_embd, model.config.n_head
    hs = C // nh
    if cache.length > 0:
        raise ValueError("lean_forward fills an empty cache; one more position at a time is Decoder.step")
    tr = model.transformer
    x = F.embedding(idx, tr.wte.weight)  # (B, T, C)
    if "wpe" in tr:
        x = x + tr.wpe.weight[:T]
    x = x.view(B * T, C)
    rope = rope_tables(model)
    turn = tuple(table[:T, None, None] for table in rope) if rope else None  # RoPE's cos, sin: (T, 1, 1, hs/2)
    for layer, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, *mlp) in zip(cache.layers, weights):
        qkv = _addmm(attn_b, F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w).view(B, T, 3, nh, hs)
        if turn:  # queries and keys turned by their positions 0 .. T-1
            qkv[:, :, :2] = rotate(qkv[:, :, :2], *turn)
        k, v = layer.append_kv(qkv[:, :, 1:].permute(0, 3, 1, 2, 4))  # (B, nh, T, hs) each
        y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), k, v, is_causal=T > 1)  # (B, nh, T, hs)
        x = _addmm(x if proj_b is None else x + proj_b, y.transpose(1, 2).reshape(B * T, C), proj_w)  # residual
        x = _mlp_residual(x, C, *mlp)
    x = F.layer_norm(x.view(B, T, C)[:, -1], (C,), tr.ln_f.weight, tr.ln_f.bias)  # (B, C): the last position
    return F.linear(x, model.lm_head.weight)  # (B, V)


class Decoder:
    """An eval-mode model with its KV cache, run on the lean path: `fill` empties the cache and feeds
    it several positions (lean_forward); `step` feeds one more position.

    For `step`, what does not change between positions is made here once: the weights
    (decode_weights); per layer a buffer the Q, K, V projection is written into, with the query and
    the new key/value pair as views of it; and per layer and position p, the cache slot p and the
    keys and values 0..p that position p attends to.
    """

    def __init__(self, model: GPT, batch_size: int, fill_threads: int = 0):
        c = model.config
        self.fill_threads = fill_threads  # CPU threads for fill (0: leave as set); step uses what is set
        B, C, nh = batch_size, c.n_embd, c.n_head
        self.model, self.C, self.block_size = model, C, c.block_size
        self.weights = decode_weights(model)
        self.cache = model.new_kv_cache(B)
        p = model.lm_head.weight
        self.qkv = [torch.empty(B, 3 * C, device=p.device, dtype=p.dtype) for _ in self.weights]
        heads = [buf.view(B, 3, nh, 1, C // nh) for buf in self.qkv]
        self.query = [h[:, 0] for h in heads]  # (B, nh, 1, hs)
        self.query_key = [buf.view(B, 3, nh, C // nh)[:, :2] for buf in self.qkv]  # (B, 2, nh, hs): turned by RoPE
        self.rope = rope_tables(model)
        self.new_kv = [h[:, 1:].permute(0, 2, 3, 1, 4) for h in heads]  # (B, nh, 1, 2, hs)
        positions = range(c.block_size)
        self.slot = [[layer.kv[:, :, pos:pos + 1] for pos in positions] for layer in self.cache.layers]
        self.seen = [[(layer.kv[:, :, :pos + 1, 0], layer.kv[:, :, :pos + 1, 1]) for pos in positions]
                     for layer in self.cache.layers]

    def fill(self, idx: torch.Tensor) -> torch.Tensor:
        """Empty the cache, feed it positions idx (B, T); logits (B, V) of the last."""
        self.cache.reset()
        with cpu_threads(idx.device, self.fill_threads or torch.get_num_threads()):
            return lean_forward(self.model, self.weights, idx, self.cache)

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """Feed one new position idx (B, 1) at index cache.length; its logits (B, V).

        Equals model(idx, kv_cache=cache)[0][:, -1] in eval mode."""
        pos, C = self.cache.length, self.C
        if pos >= self.block_size:
            raise ValueError(f"KV cache holds {self.block_size} positions; {pos + 1} requested")
        tr = self.model.transformer
        x = F.embedding(idx[:, 0], tr.wte.weight)  # (B, C)
        if "wpe" in tr:
            x = x + tr.wpe.weight[pos]
        turn = (self.rope[0][pos], self.rope[1][pos]) if self.rope else None  # RoPE's cos, sin at pos: the same in every layer
        for i, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, *mlp) in enumerate(self.weights):
            _addmm(attn_b, F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w, out=self.qkv[i])  # q, k, v
            if turn:
                self.query_key[i].copy_(rotate(self.query_key[i], *turn))
            self.slot[i][pos].copy_(self.new_kv[i])  # the new key and value join the cache
            k, v = self.seen[i][pos]  # (B, nh, pos + 1, hs): every key and value so far
            y = F.scaled_dot_product_attention(self.query[i], k, v)  # (B, nh, 1, hs)
            x = _addmm(x if proj_b is None else x + proj_b, y.reshape(x.size(0), C), proj_w)  # residual
            x = _mlp_residual(x, C, *mlp)
        for layer in self.cache.layers:
            layer.length = pos + 1
        x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias)
        return F.linear(x, self.model.lm_head.weight)  # (B, V)


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


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int,
                  top_p: float | None = None, stop: Sequence[str] = ()) -> None:
    """Reject sampling options that have no meaning."""
    if temperature < 0:
        raise PromptError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise PromptError(f"--top-k must be a positive number of candidates, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise PromptError(f"--top-p must be a probability mass in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise PromptError(f"--max-new-tokens must not be negative, got {max_new_tokens}")
    if num_samples <= 0:
        raise PromptError(f"--num-samples must be at least 1, got {num_samples}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise PromptError(f"--stop takes non-empty strings (a list of them from Python), got {stop!r}")


class StopFilter:
    """One sample's new text, released as soon as it cannot be the start of a stop string.

    `feed` takes each new character and returns the text that is now safe to show; once the text
    ends with a stop string, `stopped` is set and that string is dropped. Only generated text is
    matched: a stop string never spans the prompt."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.text = ""  # generated text so far, without a stop string that ended it
        self.shown = 0  # characters of `text` already returned
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add generated text; return what can be shown now."""
        self.text += piece
        for stop in self.stops:
            if self.text.endswith(stop):
                self.text = self.text[:-len(stop)]
                self.stopped = True
                return self.flush()
        held = max((k for stop in self.stops for k in range(1, len(stop)) if self.text.endswith(stop[:k])), default=0)
        safe = len(self.text) - held
        out = self.text[self.shown:safe]
        self.shown = max(self.shown, safe)
        return out

    def flush(self) -> str:
        """The text held back so far (the end of generation: it did not become a stop string)."""
        out = self.text[self.shown:]
        self.shown = len(self.text)
        return out


def stream(loaded: LoadedModel, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
           num_samples: int, seed: int, unknown: UnknownPolicy = "error", use_cache: bool = True,
           top_p: float | None = None, stop: Sequence[str] = ()) -> Iterator[tuple[int, str]]:
    """Generate `num_samples` continuations of `prompt` in one batch, yielding (sample, text) pieces as they come.

    Each sample's first piece is its prompt (as the model reads it); then its new characters,
    ending after `max_new_tokens` or before the first stop string it produces."""
    check_options(max_new_tokens, temperature, top_k, num_samples, top_p, stop)
    device = loaded.model.lm_head.weight.device
    ids = encode_prompt(loaded.tokenizer, prompt, unknown)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)  # (N, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = loaded.tokenizer.decode(ids)
    for i in range(num_samples):
        yield i, start
    filters = [StopFilter(stop) for _ in range(num_samples)]
    with closing(generate(loaded.model, idx, max_new_tokens, temperature, top_k, generator, use_cache, top_p)) as ids:
        for next_id in ids:  # closing: a stop (or a caller that stops reading) ends generate() and restores threads
            for i, token in enumerate(next_id[:, 0].tolist()):
                if not filters[i].stopped:
                    piece = filters[i].feed(loaded.tokenizer.chars[token])
                    if piece:
                        yield i, piece
            if all(f.stopped for f in filters):
                return
    for i, f in enumerate(filters):
        rest = f.flush()
        if rest:
            yield i, rest


def sample(loaded: LoadedModel, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
           num_samples: int, seed: int, unknown: UnknownPolicy = "error", use_cache: bool = True,
           on_text: Callable[[int, str], None] | None = None, top_p: float | None = None,
           stop: Sequence[str] = ()) -> list[str]:
    """Generate `num_samples` continuations of `prompt` in one batch; return prompt + text for each.

    With one sample, `on_text(0, piece)` is called as each piece is produced (streaming).
    """
    texts: list[list[str]] = [[] for _ in range(num_samples)]
    for i, piece in stream(loaded, prompt, max_new_tokens, temperature, top_k, num_samples, seed, unknown,
                           use_cache, top_p, stop):
        texts[i].append(piece)
        if on_text and num_samples == 1:
            on_text(i, piece)
    return ["".join(parts) for parts in texts]


def example_prompt(text: str, limit: int = 24) -> str:
    """A short prompt taken from the beginning of a text: its first whole line, cut at a word, at most `limit` characters."""
    lines = text.split("\n")
    candidates = [line for line in lines[1:-1] if line.strip()] or [line for line in lines if line.strip()]
    line = candidates[0].strip() if candidates else text.strip() or "\n"
    if len(line) > limit:
        cut = line.rfind(" ", 0, limit + 1)
        line = line[:cut] if cut > 0 else line[:limit]
    return line


def sample_command(run_dir: Path, val_text: str) -> str:
    """The `minigpt sample` command line for a run, with a prompt from the start of its validation text."""
    return shlex.join(["minigpt", "sample", "--checkpoint", str(run_dir), "--prompt", example_prompt(val_text)])
