"""Text from a trained model: prompts, stop strings, several samples in one batch, streaming.

This is the text layer over minigpt.decoding, which works on ids: the prompt is encoded with the
model's vocabulary (an empty one starts from a newline), each new id is decoded to its
character as it comes, and generation ends after max_new_tokens characters or as soon as the
text ends with a stop string (which is not part of the result).
"""

from __future__ import annotations

from contextlib import closing
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from minigpt.errors import PromptError
from minigpt.tokenizer import CharTokenizer, UnknownPolicy

if TYPE_CHECKING:  # torch is imported when text is generated: the command line starts without it
    from minigpt.checkpoint import LoadedModel


# Defaults, shared by the Python API's Model.generate and `minigpt sample`.
PROMPT = "\n"  # text to continue; an empty prompt also starts the text as if at the beginning of a line
MAX_NEW_TOKENS = 500  # characters to generate
TEMPERATURE = 0.8  # 0 is greedy; 1 samples the model's distribution as it is
SEED = 1337  # the same seed gives the same text


def encode_prompt(tokenizer: CharTokenizer, prompt: str, unknown: UnknownPolicy) -> list[int]:
    """Prompt ids; an empty prompt (or one with nothing left after skipping) starts from a newline."""
    ids = tokenizer.encode(prompt, unknown)
    if not ids:
        ids = tokenizer.encode(PROMPT if PROMPT in tokenizer.stoi else tokenizer.chars[0])
    return ids


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int,
                  top_p: float | None = None, stop: Sequence[str] = ()) -> None:
    """Reject sampling options that have no meaning."""
    if temperature < 0:
        raise PromptError(f"{{--temperature}} must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise PromptError(f"{{--top-k}} must be a positive number of candidates, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise PromptError(f"{{--top-p}} must be a probability mass in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise PromptError(f"{{--max-new-tokens}} must not be negative, got {max_new_tokens}")
    if num_samples <= 0:
        raise PromptError(f"{{--num-samples}} must be at least 1, got {num_samples}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise PromptError(f"{{--stop}} takes non-empty strings (or a list of them), got {stop!r}")


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
    import torch

    from minigpt.decoding import generate

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
