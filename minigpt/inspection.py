"""Looking into a trained model: exact scores of texts, files and splits, surprise, attention maps.

Everything here works on a `LoadedModel` (minigpt.checkpoint) and on text: it encodes the text
with the model's vocabulary, then asks minigpt.scoring for exact per-character losses or the
model for its attention weights. `minigpt eval`, `surprise` and `attention` and the Python API's
`Model` call these functions.

Bits per character is the mean cross-entropy in nats divided by ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minigpt import checkpoint, data
from minigpt.checkpoint import LoadedModel
from minigpt.errors import DataError, PromptError
from minigpt.model import GPT
from minigpt.scoring import LN2, mean_nll, token_nll, token_top
from minigpt.tokenizer import UnknownPolicy


@dataclass
class Surprise:
    """Per-character surprise of a text: chars[0] is context only, bits[j] scores chars[j + 1]."""

    chars: list[str]
    bits: list[float]
    top: list[list[tuple[str, float]]] = field(default_factory=list)  # if asked: top[j], what was expected for chars[j + 1]

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


def surprise(loaded: LoadedModel, text: str, stride: int | None = None, unknown: UnknownPolicy = "error",
             top: int = 0) -> Surprise:
    """How many bits each character of `text` (after the first) costs the model, and the `top` characters it expected."""
    ids = encode_text(loaded, text, unknown)
    expected = []
    if top > 0:  # one pass for both
        nll, top_ids, top_p = token_top(loaded.model, ids, top, stride)
        chars = loaded.tokenizer.chars
        expected = [[(chars[i], p) for i, p in zip(row_ids, row_p)] for row_ids, row_p in zip(top_ids.tolist(), top_p.tolist())]
    else:
        nll = token_nll(loaded.model, ids, stride)
    return Surprise(chars=list(loaded.tokenizer.decode(ids.tolist())), bits=(nll / LN2).tolist(), top=expected)


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


def evaluate_ids(loaded: LoadedModel, ids: torch.Tensor | np.ndarray, source: str, stride: int | None = None) -> Evaluation:
    """Exact bits per character of a sequence of ids (a tensor, or a memory-mapped array read window by window)."""
    stride = stride or max(1, loaded.config.model.block_size // 2)
    loss, characters = mean_nll(loaded.model, ids, stride)
    return Evaluation(source=source, characters=characters, loss=loss, stride=stride,
                      block_size=loaded.config.model.block_size)


def read_text_file(loaded: LoadedModel, path: Path) -> str:
    """A text file decoded the way the model's corpus was (its data.encoding and data.errors)."""
    d = loaded.config.data
    try:
        return Path(path).read_text(encoding=d.encoding, errors=d.errors)
    except FileNotFoundError as exc:
        raise DataError(f"text file {path} does not exist; pass an existing file to {{--file}}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as {d.encoding}: {exc}") from exc


def evaluate_file(loaded: LoadedModel, path: Path, stride: int | None = None,
                  unknown: UnknownPolicy = "error") -> Evaluation:
    """Exact bits per character of a text file (decoded with the encoding the model was trained on)."""
    return evaluate_ids(loaded, encode_text(loaded, read_text_file(loaded, path), unknown), str(path), stride)


def split_ids(loaded: LoadedModel, split: str) -> np.memmap:
    """The prepared token array (memory-mapped) of the data the checkpoint was trained on ('train' or 'val').

    Read as it is: never prepared here and no lock taken, so it works beside a training run; a
    missing or stale preparation is a DataError that says which command prepares it."""
    if split not in ("train", "val"):
        raise PromptError(f"{{--split}} must be train or val, got {split!r}")
    base_vocab = checkpoint.base_vocabulary(loaded.payload)  # a fine-tuned run's ids
    prepared = data.find_prepared(loaded.config.data, base_vocab)
    trained_on = loaded.payload.get("data") or {}
    if prepared is None:
        config = Path(loaded.payload["path"]).parent / "config.yaml"
        how = (f"prepare it with: minigpt prepare --config {config if config.is_file() else 'CONFIG'}" if base_vocab is None
               else "a fine-tuned run's data is prepared by its training (minigpt train --init-from ...)")
        raise DataError(f"the {split} split of {data.corpus_name(trained_on.get('sources') or ['the corpus'])} is not "
                        f"prepared, or the corpus changed since; {how}; or evaluate a file with {{--file}}")
    if trained_on.get("sha256") and trained_on["sha256"] != prepared.meta["source_sha256"]:
        raise DataError(f"the corpus {', '.join(prepared.meta['sources'])} has changed since the checkpoint was "
                        "trained on it; evaluate a file with {--file} instead")
    if prepared.tokenizer.chars != loaded.tokenizer.chars:
        raise DataError("the prepared corpus has a different vocabulary from the checkpoint's; use {--file} instead")
    return prepared.tokens(split)


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
        raise PromptError(f"{{--{name} {value}}} is out of range: this model has {count} {name}s, numbered 0 to {count - 1}")
    return [value]


def prompt_ids(loaded: LoadedModel, prompt: str, unknown: UnknownPolicy = "error") -> tuple[list[int], int]:
    """The ids of the prompt's last block_size characters, and how many characters before them were dropped."""
    ids = loaded.tokenizer.encode(prompt, unknown)
    if not ids:
        raise PromptError("the prompt is empty; pass some text with {--prompt}")
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
