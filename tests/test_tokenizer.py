import numpy as np
import pytest

from minigpt.errors import PromptError
from minigpt.tokenizer import CharTokenizer, smallest_dtype


def test_round_trip_ascii_and_unicode():
    text = "Hello, world!\nÀ bientôt — 東京 🙂 ∑x²"
    tok = CharTokenizer(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.chars == sorted(set(text))
    assert tok.encode_array(text).tolist() == tok.encode(text)


def test_more_than_256_characters_round_trip_and_widen_dtype():
    text = "".join(chr(cp) for cp in range(0x400, 0x400 + 300)) + "abc"
    tok = CharTokenizer(text)
    assert tok.vocab_size == 303
    assert tok.decode(tok.encode(text)) == text
    assert smallest_dtype(tok.vocab_size) == np.uint16
    assert smallest_dtype(256) == np.uint8 and smallest_dtype(257) == np.uint16


def test_plain_dict_round_trip_keeps_an_unsorted_order():
    # A fine-tuned vocabulary appends new characters after the base ones, so its stored order is
    # not sorted ("A" sorts before "a"); the ids must come back as stored, not re-sorted.
    tok = CharTokenizer.extended(CharTokenizer("banana split").chars, "Banana Split!")
    assert tok.chars != sorted(tok.chars)
    text = "Split a banana!"
    ids = tok.encode(text)
    again = CharTokenizer.from_dict(tok.to_dict())
    assert again.chars == tok.chars
    assert again.encode(text) == ids and again.decode(ids) == text
    assert again.encode_array(text).tolist() == ids


def test_unknown_characters_error_skip_replace():
    tok = CharTokenizer("abc ")
    with pytest.raises(PromptError, match="'x'.*'z'"):
        tok.encode("abxz")
    assert tok.decode(tok.encode("abxz", "skip")) == "ab"
    assert tok.decode(tok.encode("abxz", "replace")) == "ab  "
