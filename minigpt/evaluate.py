"""Exact bits per character and per-character surprise of a trained model.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from minigpt import checkpoint, data
from minigpt.errors import DataError, PromptError
from minigpt.model import GPT
from minigpt.sample import LoadedModel
from minigpt.tokenizer import UnknownPolicy

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
        raise PromptError(f"--stride must be between 1 and block_size ({block_size}), got {stride}")
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


@dataclass
class Surprise:
    """Per-character surprise of a text: chars[0] is context only, bits[j] scores chars[j + 1]."""

    chars: list[str]
    bits: list[float]

    @property
    def mean_bits(self) -> float:
        """Mean bits per scored character."""
        return sum(self.bits) / len(self.bits)


def encode_text(loaded: LoadedModel, text: str, unknown: UnknownPolicy = "error") -> torch.Tensor:
    """A text's ids, refusing (or skipping, replacing) characters outside the vocabulary; needs 2+ characters."""
    ids = loaded.tokenizer.encode(text, unknown)
    if len(ids) < 2:
        raise PromptError(f"the text has {len(ids)} usable character(s); scoring needs at least 2 "
                          "(the first one is context only)")
    return torch.tensor(ids, dtype=torch.long)


def surprise(loaded: LoadedModel, text: str, stride: int | None = None, unknown: UnknownPolicy = "error") -> Surprise:
    """How many bits each character of `text` (after the first) costs the model."""
    ids = encode_text(loaded, text, unknown)
    bits = (token_nll(loaded.model, ids, stride) / LN2).tolist()
    return Surprise(chars=list(loaded.tokenizer.decode(ids.tolist())), bits=bits)


@dataclass
class Evaluation:
    """The exact score of a model on a whole text."""

    source: str  # file or split that was scored
    characters: int  # characters scored (all but the first)
    loss: float  # mean cross-entropy in nats
    stride: int  # window stride used
    block_size: int

    @property
    def bpc(self) -> float:
        """Bits per character."""
        return self.loss / LN2

    def to_dict(self) -> dict:
        """Plain data for JSON output."""
        return {"source": self.source, "characters": self.characters, "loss": self.loss, "bpc": self.bpc,
                "stride": self.stride, "block_size": self.block_size}


def evaluate_ids(loaded: LoadedModel, ids: torch.Tensor, source: str, stride: int | None = None) -> Evaluation:
    """Exact bits per character of a sequence of ids."""
    stride = stride or max(1, loaded.config.model.block_size // 2)
    nll = token_nll(loaded.model, ids, stride)
    return Evaluation(source=source, characters=len(nll), loss=float(nll.double().mean()), stride=stride,
                      block_size=loaded.config.model.block_size)


def read_text_file(loaded: LoadedModel, path: Path) -> str:
    """A text file decoded the way the model's corpus was (its data.encoding and data.errors)."""
    d = loaded.config.data
    try:
        return Path(path).read_text(encoding=d.encoding, errors=d.errors)
    except FileNotFoundError as exc:
        raise DataError(f"text file {path} does not exist; pass an existing file to --file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as {d.encoding}: {exc}") from exc


def evaluate_file(loaded: LoadedModel, path: Path, stride: int | None = None,
                  unknown: UnknownPolicy = "error") -> Evaluation:
    """Exact bits per character of a text file (decoded with the encoding the model was trained on)."""
    return evaluate_ids(loaded, encode_text(loaded, read_text_file(loaded, path), unknown), str(path), stride)


def split_ids(loaded: LoadedModel, split: str) -> torch.Tensor:
    """The prepared token array of the data the checkpoint was trained on ('train' or 'val')."""
    if split not in ("train", "val"):
        raise PromptError(f"--split must be train or val, got {split!r}")
    prepared = data.prepare(loaded.config.data, loaded.config.model.block_size,
                            base_vocab=checkpoint.base_vocabulary(loaded.payload))  # a fine-tuned run's ids
    trained_on = loaded.payload.get("data") or {}
    if trained_on.get("sha256") and trained_on["sha256"] != prepared.meta["source_sha256"]:
        raise DataError(f"the corpus {', '.join(prepared.meta['sources'])} has changed since the checkpoint was "
                        "trained on it; evaluate a file with --file instead")
    if prepared.tokenizer.chars != loaded.tokenizer.chars:
        raise DataError("the prepared corpus has a different vocabulary from the checkpoint's; use --file instead")
    return torch.from_numpy(np.asarray(prepared.tokens(split), dtype=np.int64))


def evaluate_split(loaded: LoadedModel, split: str = "val", stride: int | None = None) -> Evaluation:
    """Exact bits per character of the train or val split the checkpoint was trained on."""
    return evaluate_ids(loaded, split_ids(loaded, split), f"{split} split", stride)


@dataclass
class Attention:
    """Attention weights of chosen layers and heads for one prompt."""

    chars: list[str]  # the characters the model saw (the last block_size of the prompt)
    maps: dict[tuple[int, int], np.ndarray]  # (layer, head) -> (T, T) weights, row = query, column = key
    dropped: int  # characters cut from the front of a prompt longer than block_size


def pick(value: int | None, count: int, name: str) -> list[int]:
    """All indices 0..count-1, or the one chosen, checked against the range."""
    if value is None:
        return list(range(count))
    if not 0 <= value < count:
        raise PromptError(f"--{name} {value} is out of range: this model has {count} {name}s, numbered 0 to {count - 1}")
    return [value]


def prompt_ids(loaded: LoadedModel, prompt: str, unknown: UnknownPolicy = "error") -> tuple[list[int], int]:
    """The ids of the prompt's last block_size characters, and how many characters before them were dropped."""
    ids = loaded.tokenizer.encode(prompt, unknown)
    if not ids:
        raise PromptError("the prompt is empty; pass some text with --prompt")
    dropped = max(0, len(ids) - loaded.config.model.block_size)
    return ids[dropped:], dropped


def attention(loaded: LoadedModel, prompt: str, layer: int | None = None, head: int | None = None,
              unknown: UnknownPolicy = "error") -> Attention:
    """The explicit-path attention weights of `prompt` (its last block_size characters)."""
    c = loaded.config.model
    layers, heads = pick(layer, c.n_layer, "layer"), pick(head, c.n_head, "head")
    ids, dropped = prompt_ids(loaded, prompt, unknown)
    return Attention(chars=list(loaded.tokenizer.decode(ids)), maps=attention_of(loaded.model, ids, layers, heads),
                     dropped=dropped)


def attention_of(model: GPT, ids: list[int], layers: list[int] | None = None,
                 heads: list[int] | None = None) -> dict[tuple[int, int], np.ndarray]:
    """(layer, head) -> (T, T) attention weights of a sequence of at most block_size ids, in eval mode."""
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    maps = model.attention_maps(idx)  # n_layer x (1, nh, T, T)
    model.train(was_training)
    layers = range(model.config.n_layer) if layers is None else layers
    heads = range(model.config.n_head) if heads is None else heads
    return {(l, h): maps[l][0, h].float().cpu().numpy() for l in layers for h in heads}


def weights_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter and its gradient on one fixed batch, for histograms; RNG and grads are left untouched."""
    with torch.random.fork_rng(), torch.enable_grad():
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        out[f"weights/{name}"] = p.detach().clone()
        if p.grad is not None:
            out[f"grads/{name}"] = p.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return out


def describe(loaded: LoadedModel) -> dict:
    """What a checkpoint holds, as plain data: corpus, step, losses, size, vocabulary, data and config."""
    from minigpt import config as config_mod

    p = loaded.payload
    best = p.get("best_val_loss")
    sources = (p.get("data") or {}).get("sources") or []
    return {
        "checkpoint": p["path"],
        # What it was trained on; config.name below is only the config file it was started from.
        "corpus": data.corpus_name(sources) if sources else None,
        "step": p["step"],
        "best_val_loss": best,
        "best_val_bpc": best / LN2 if best is not None and math.isfinite(best) else None,
        "parameters": loaded.model.num_params(non_embedding=False),
        "parameters_non_embedding": loaded.model.num_params(),
        "vocab_size": loaded.tokenizer.vocab_size,
        "vocabulary": "".join(loaded.tokenizer.chars),
        "data": p.get("data") or {},
        **({"init_from": p["init_from"]} if p.get("init_from") else {}),  # a fine-tuned run's origin
        "config": config_mod.to_dict(loaded.config),
    }
