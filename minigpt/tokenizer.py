"""The character tokenizer: every distinct character of the corpus is one token.

The vocabulary is the sorted list of the corpus's characters (any Unicode, so it may hold more
than 256 of them); a character's id is its index in that list. A fine-tuned model's vocabulary
is its base model's list with the new corpus's new characters appended (`extended`), so every
old character keeps its id. It is stored as plain data (a list of strings) beside the prepared
data and inside every checkpoint, never as a pickle.
"""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np

from minigpt.errors import PromptError

UnknownPolicy = Literal["error", "skip", "replace"]


class CharTokenizer:
    """Maps characters to integer ids and back."""

    def __init__(self, chars: Iterable[str], keep_order: bool = False):
        """The vocabulary of `chars`: sorted, or in the given order (ids = positions) with keep_order."""
        chars = list(chars)
        self.chars: list[str] = chars if keep_order else sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("every vocabulary entry must be exactly one character")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("a vocabulary lists each character once")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # A code point -> id lookup table lets numpy encode millions of characters at once.
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._lookup = np.zeros(int(codepoints.max(initial=0)) + 1, dtype=np.uint32)
        self._lookup[codepoints] = np.arange(len(codepoints), dtype=np.uint32)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, unknown: UnknownPolicy = "error") -> list[int]:
        """Turn text into ids; characters outside the vocabulary are refused, skipped or replaced."""
        missing = sorted({c for c in text if c not in self.stoi})
        if missing and unknown == "error":
            shown = ", ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise PromptError(
                f"{len(missing)} character(s) not in the model's vocabulary: {shown}; "
                "remove them or pass {--unknown skip} (drop them) or {--unknown replace} (use a known character)"
            )
        if unknown == "replace":
            fill = self.replacement_char()
            return [self.stoi.get(c, self.stoi[fill]) for c in text]
        return [self.stoi[c] for c in text if c in self.stoi]

    def replacement_char(self) -> str:
        """The character used in place of unknown ones: a space if the vocabulary has one."""
        for candidate in (" ", "?", "\n"):
            if candidate in self.stoi:
                return candidate
        return self.chars[0]

    def encode_array(self, text: str) -> np.ndarray:
        """Encode text known to use only vocabulary characters, fast, as a uint32 array."""
        return self._lookup[codepoints_of(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text."""
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        """Plain data for JSON files and checkpoints."""
        return {"kind": "char", "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> "CharTokenizer":
        """Rebuild from `to_dict` output (the stored order is the ids' order)."""
        return cls(data["chars"], keep_order=True)

    @classmethod
    def extended(cls, base: Iterable[str], chars: Iterable[str]) -> "CharTokenizer":
        """`base` in its order (old ids kept), then the characters of `chars` it lacks, sorted."""
        base = list(base)
        return cls(base + sorted(set(chars) - set(base)), keep_order=True)


def codepoints_of(text: str) -> np.ndarray:
    """The Unicode code points of a string as a uint32 array (one element per character)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def smallest_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} characters is too large")
