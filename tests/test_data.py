"""Prepare and batches: streaming encode, splits, reuse, several files, wide vocabularies, bad bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt import data
from minigpt.config import DataConfig
from minigpt.errors import DataError


def cfg(tmp_path: Path, path, **kw) -> DataConfig:
    return DataConfig(path=path, prepared_dir=str(tmp_path / "prepared"), **kw)


def all_ids(prepared: data.Prepared) -> np.ndarray:
    return np.concatenate([np.asarray(prepared.tokens("train")), np.asarray(prepared.tokens("val"))])


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_windows_are_shifted_by_one_and_read_from_a_memmap(tmp_path):
    prepared = data.prepare(cfg(tmp_path, write(tmp_path / "a.txt", "abcdefghij" * 20)), block_size=8)
    tokens = prepared.tokens("train")
    assert isinstance(tokens, np.memmap)
    x, y = data.get_batch(tokens, torch.tensor([0, 5, 17]), 8)
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert prepared.tokenizer.decode(x[1].tolist()) == "fghijabc"


def test_val_split_is_the_contiguous_tail(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    prepared = data.prepare(cfg(tmp_path, write(tmp_path / "a.txt", text), val_fraction=0.1), block_size=8)
    decode = prepared.tokenizer.decode
    assert decode(prepared.tokens("train")) == text[:900]
    assert decode(prepared.tokens("val")) == text[900:]


def test_prepared_data_is_reused_until_the_source_changes(tmp_path):
    source = tmp_path / "a.txt"
    write(source, "hello world\n" * 20)
    first = data.prepare(cfg(tmp_path, str(source)), block_size=8)
    stamp = (first.directory / "train.bin").stat().st_mtime_ns
    again = data.prepare(cfg(tmp_path, str(source)), block_size=8)
    assert (again.directory / "train.bin").stat().st_mtime_ns == stamp
    write(source, "goodbye moon\n" * 20)
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    rebuilt = data.prepare(cfg(tmp_path, str(source)), block_size=8)
    assert "g" in rebuilt.tokenizer.chars and "h" not in rebuilt.tokenizer.chars


@pytest.mark.parametrize("form", ["list", "glob", "directory"])
def test_several_files_form_one_corpus_in_order(tmp_path, form):
    folder = tmp_path / "corpus"
    folder.mkdir()
    parts = ["first file " * 10, "second file " * 10, "third file " * 10]
    paths = [write(folder / f"{i}.txt", text) for i, text in enumerate(parts)]
    path = {"list": paths, "glob": str(folder / "*.txt"), "directory": str(folder)}[form]
    prepared = data.prepare(cfg(tmp_path, path), block_size=8)
    assert prepared.tokenizer.decode(all_ids(prepared)) == "".join(parts)


def test_more_than_256_characters_use_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 2
    prepared = data.prepare(cfg(tmp_path, write(tmp_path / "wide.txt", text)), block_size=8)
    assert prepared.meta["dtype"] == "uint16" and prepared.tokenizer.vocab_size == 300
    assert prepared.tokenizer.decode(all_ids(prepared)) == text


def test_utf8_errors_name_the_byte_offset_even_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 7)
    source = tmp_path / "bad.bin"
    source.write_bytes("héllo wörld ".encode() * 3 + b"\xff" + b"tail text" * 3)
    bad_at = len("héllo wörld ".encode()) * 3
    with pytest.raises(DataError, match=f"offset {bad_at}"):
        data.prepare(cfg(tmp_path, str(source)), block_size=4)


def test_multibyte_characters_split_by_chunks_decode_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 5)
    text = "añb€c😀d" * 10
    prepared = data.prepare(cfg(tmp_path, write(tmp_path / "u.txt", text)), block_size=4)
    assert prepared.tokenizer.decode(all_ids(prepared)) == text


@pytest.mark.parametrize("errors, expected", [("replace", "ab\ufffdcd"), ("ignore", "abcd")])
def test_errors_replace_and_ignore(tmp_path, errors, expected):
    source = tmp_path / "bad.bin"
    source.write_bytes((b"ab\xffcd") * 20)
    prepared = data.prepare(cfg(tmp_path, str(source), errors=errors), block_size=4)
    assert prepared.tokenizer.decode(all_ids(prepared)) == expected * 20


def test_progress_reports_both_passes(tmp_path):
    source = write(tmp_path / "a.txt", "some text\n" * 50)
    seen = []
    data.prepare(cfg(tmp_path, source), block_size=8, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == 2 * 500


def test_default_corpus_is_copied_from_minigpt_data_dir_and_checked(tmp_path, monkeypatch):
    import hashlib

    from minigpt import data as data_mod

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tinyshakespeare.txt").write_text("First Citizen:\nSpeak, speak.\n")
    payload = (mirror / "tinyshakespeare.txt").read_bytes()
    monkeypatch.setattr(data_mod, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(mirror))
    found = data_mod.default_corpus(tmp_path / "data")
    assert found == tmp_path / "data" / "tinyshakespeare.txt" and found.read_bytes() == payload
    monkeypatch.delenv("MINIGPT_DATA_DIR")  # the copy in data/ is found without the variable
    assert data_mod.default_corpus(tmp_path / "data") == found


def test_default_corpus_with_wrong_hash_or_no_network_is_a_clear_error(tmp_path, monkeypatch):
    from minigpt import data as data_mod

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tinyshakespeare.txt").write_text("not the real text")
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(mirror))
    with pytest.raises(DataError, match="is not Tiny Shakespeare: its sha256 differs"):
        data_mod.default_corpus(tmp_path / "data")
    assert not (tmp_path / "data" / "tinyshakespeare.txt").exists()

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.delenv("MINIGPT_DATA_DIR")
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"not in .*tinyshakespeare.txt and could not be downloaded \(network unreachable\)"):
        data_mod.default_corpus(tmp_path / "data")
