"""From a text corpus to (x, y) training windows.

1. `resolve_sources` turns `data.path` (a file, a directory, a glob, a list of them, or "" for
   Tiny Shakespeare) into a list of files.
2. `prepare` streams those files twice in fixed-size chunks, so memory stays bounded at any
   corpus size: the first pass builds the vocabulary and counts characters, the second encodes
   into two flat memory-mapped token arrays, `train.bin` and `val.bin` (the contiguous tail, so
   validation text is never seen in training), plus `meta.json` with the vocabulary.
3. `get_batch` reads `block_size + 1` characters at random offsets from a memory-mapped array:
   `x = ids[i : i+block_size]`, `y = ids[i+1 : i+1+block_size]` (y is x shifted by one).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import urllib.request
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are made: `minigpt prepare` runs without it (~0.5 GB less RSS)
    import torch

from minigpt.config import DataConfig
from minigpt.errors import DataError
from minigpt.console import log
from minigpt.lock import DirectoryLock
from minigpt.signals import stopped_while
from minigpt.tokenizer import CharTokenizer, codepoints_of, smallest_dtype

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_NAME = "tinyshakespeare.txt"
CHUNK_BYTES = 8 * 1024 * 1024  # bytes read per chunk while preparing
META_VERSION = 1
UNFINISHED = "it was not finished (nothing half-made is ever used); minigpt prepare or train starts it again"


# ----------------------------------------------------------------------------- the default corpus

def default_corpus(data_dir: Path = Path("data")) -> Path:
    """Tiny Shakespeare in data/: copied from $MINIGPT_DATA_DIR when that holds it, else downloaded.

    Either way its sha256 is checked, and the copy in data/ is what runs record, so a run can be
    resumed or evaluated later without the environment variable.
    """
    target = data_dir / TINY_SHAKESPEARE_NAME
    if target.is_file():
        return target
    env_dir = os.environ.get("MINIGPT_DATA_DIR")
    local = Path(env_dir) / TINY_SHAKESPEARE_NAME if env_dir else None
    try:
        if local is not None and local.is_file():
            origin, payload = str(local), local.read_bytes()
        else:
            origin = TINY_SHAKESPEARE_URL
            with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=60) as response:
                payload = response.read()
    except OSError as exc:
        where = f"{target}" + (f" nor in {local.parent}" if local is not None else "")
        raise DataError(f"Tiny Shakespeare is not in {where} and could not be downloaded ({exc}); download "
                        f"{TINY_SHAKESPEARE_URL} to {target} yourself, set MINIGPT_DATA_DIR to a directory holding "
                        f"{TINY_SHAKESPEARE_NAME}, or train on another file with --set data.path=FILE") from exc
    if hashlib.sha256(payload).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"{origin} is not Tiny Shakespeare: its sha256 differs from {TINY_SHAKESPEARE_SHA256}; "
                        "replace it with the original file, or set data.path to train on it as your own corpus")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(payload)
        os.replace(tmp, target)
    except OSError as exc:
        raise DataError(f"cannot write {target}: {exc.strerror or exc}; run from a writable directory") from exc
    return target


# ----------------------------------------------------------------------------- finding the files

def _expand(entry: str) -> list[Path]:
    path = Path(entry).expanduser()
    if any(ch in entry for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not matches:
            raise DataError(f"data.path pattern {entry!r} matches no files; check the pattern")
        return matches
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"corpus path {path} is a directory with no files in it; point data.path at a text file")
        return files
    if not path.exists():
        raise DataError(f"corpus file {path} does not exist; set data.path to an existing text file")
    return [path]


def resolve_sources(data: DataConfig, fetch: bool = True) -> list[Path]:
    """The files that make up the corpus, in order (`fetch=False`: the default corpus only if it is in data/ already)."""
    entries = data.path if isinstance(data.path, list) else [data.path]
    if entries in ([], [""]):
        return [default_corpus()] if fetch else _expand(str(Path("data") / TINY_SHAKESPEARE_NAME))
    files: list[Path] = []
    for entry in entries:
        files.extend(_expand(entry))
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"corpus file {f} is empty; put some text in it or point data.path elsewhere")
    return files


# ----------------------------------------------------------------------------- streaming passes

_BAD_BYTES: ContextVar[list[int] | None] = ContextVar("minigpt_bad_bytes", default=None)  # the decode's tally


def _counting(replacement: str) -> Callable[[UnicodeError], tuple[str, int]]:
    """A codec error handler like the built-in replace/ignore that also tallies the bytes it replaces or drops."""

    def handler(exc: UnicodeError) -> tuple[str, int]:
        if not isinstance(exc, UnicodeDecodeError):
            raise exc
        tally = _BAD_BYTES.get()
        if tally is not None:
            tally[0] += exc.end - exc.start
        return replacement, exc.end

    return handler


codecs.register_error("minigpt-replace", _counting("\ufffd"))  # registered once; each counts into _BAD_BYTES
codecs.register_error("minigpt-ignore", _counting(""))


def _error_handler(errors: str) -> str:
    """The codec error handler name for data.errors: strict as it is; replace and ignore counted."""
    return errors if errors == "strict" else f"minigpt-{errors}"


def _decoded_chunks(files: list[Path], data: DataConfig, on_bytes: Callable[[int], None] | None = None,
                    bad_bytes: list[int] | None = None):
    """Yield (file, raw bytes, decoded text) chunk by chunk; decoding errors name the byte offset.

    With data.errors replace or ignore, `bad_bytes[0]` counts the bytes replaced or dropped.
    """
    for path in files:
        decoder = codecs.getincrementaldecoder(data.encoding)(errors=_error_handler(data.errors))
        offset = 0
        with open(path, "rb") as f:
            while True:
                raw = f.read(CHUNK_BYTES)
                final = len(raw) < CHUNK_BYTES
                tally = _BAD_BYTES.set(bad_bytes)
                try:
                    pending = len(decoder.getstate()[0])
                    text = decoder.decode(raw, final=final)
                except UnicodeDecodeError as exc:
                    at = offset - pending + exc.start
                    raise DataError(f"{path} is not valid {data.encoding}: undecodable byte at offset {at} ({exc.reason}); "
                                    "convert the file to UTF-8, or set data.errors to replace or ignore") from exc
                finally:
                    _BAD_BYTES.reset(tally)
                offset += len(raw)
                if on_bytes:
                    on_bytes(len(raw))
                yield path, raw, text
                if final:
                    break


@dataclass
class Prepared:
    """A prepared corpus: its directory, vocabulary and token arrays on disk."""

    directory: Path
    tokenizer: CharTokenizer
    meta: dict

    def tokens(self, split: str) -> np.memmap:
        """The memory-mapped token array of 'train' or 'val'."""
        return np.memmap(self.directory / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")


def _fingerprint(files: list[Path], data: DataConfig, base_vocab: list[str] | None = None) -> dict:
    return {
        "version": META_VERSION,
        "sources": [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files],
        "val_fraction": data.val_fraction,
        "encoding": data.encoding,
        "errors": data.errors,
        **({"base_vocab": list(base_vocab)} if base_vocab is not None else {}),
    }


def prepared_dir_for(files: list[Path], data: DataConfig, base_vocab: list[str] | None = None) -> Path:
    """Where a corpus's prepared arrays live: a name from the first file plus a hash of all paths (and base vocabulary)."""
    key_text = "\n".join(str(f.resolve()) for f in files) + ("\0" + "".join(base_vocab) if base_vocab is not None else "")
    key = hashlib.sha256(key_text.encode()).hexdigest()[:10]
    return Path(data.prepared_dir) / f"{files[0].stem}-{key}"


def _reuse(out: Path, fingerprint: dict) -> Prepared | None:
    """The prepared data in `out` if it was made from exactly these sources and settings, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = all((out / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * itemsize for s in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("fingerprint") != fingerprint or not complete:
        return None
    return Prepared(out, CharTokenizer.from_dict(meta["tokenizer"]), meta)


def find_prepared(data: DataConfig, base_vocab: list[str] | None = None) -> Prepared | None:
    """The corpus's prepared arrays if they are up to date, else None: only reads (no lock, no download, no writing)."""
    files = resolve_sources(data, fetch=False)
    return _reuse(prepared_dir_for(files, data, base_vocab), _fingerprint(files, data, base_vocab))


def prepare(data: DataConfig, block_size: int, progress: Callable[[int, int], None] | None = None,
            force: bool = False, base_vocab: list[str] | None = None, wait: bool = True) -> Prepared:
    """Encode the corpus into train/val token arrays, or reuse them if the sources are unchanged.

    `progress(done_bytes, total_bytes)` is called as the two passes advance (each pass counts half).
    `base_vocab` (fine-tuning) keeps those characters' ids and appends the corpus's new characters.
    Writing holds the prepared directory's lock: another writer there makes this call wait
    (`wait=True`) or refuse at once with DirectoryInUse. Files are written under temporary names
    and renamed, `meta.json` last, so a reader never sees a torn mixture.
    """
    files = resolve_sources(data)
    out = prepared_dir_for(files, data, base_vocab)
    fingerprint = _fingerprint(files, data, base_vocab)
    prepared = None if force else _reuse(out, fingerprint)
    if prepared is None:
        with stopped_while("preparing the data", UNFINISHED), DirectoryLock(out, "prepare of this corpus", wait=wait):
            prepared = None if force else _reuse(out, fingerprint)  # a writer we waited for may have made it
            if prepared is None:
                prepared = _write(files, out, fingerprint, data, base_vocab, progress)
    check_lengths(prepared, block_size)
    _say_bad_bytes(prepared.meta, data)
    return prepared


def _write(files: list[Path], out: Path, fingerprint: dict, data: DataConfig, base_vocab: list[str] | None,
           progress: Callable[[int, int], None] | None) -> Prepared:
    """The two streaming passes of `prepare`, writing into `out` (whose lock the caller holds)."""
    total = sum(f.stat().st_size for f in files)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, 2 * total)

    # Pass 1: vocabulary (a histogram over all code points), character count, and content hash.
    counts = np.zeros(0x110000, dtype=np.int64)
    digest = hashlib.sha256()
    bad_bytes = [0]
    for _, raw, text in _decoded_chunks(files, data, advance, bad_bytes):
        digest.update(raw)
        if text:
            counts += np.bincount(codepoints_of(text), minlength=0x110000)
    n_chars = int(counts.sum())
    if n_chars == 0:
        raise DataError(f"corpus {files[0]} holds no characters after decoding; point data.path at a text file")
    chars = (chr(cp) for cp in np.flatnonzero(counts))
    tokenizer = CharTokenizer(chars) if base_vocab is None else CharTokenizer.extended(base_vocab, chars)
    dtype = smallest_dtype(tokenizer.vocab_size)
    n_val = max(1, int(round(n_chars * data.val_fraction)))
    n_train = n_chars - n_val

    # Pass 2: encode and append to the two flat token files (under temporary names, then renamed).
    # Plain sequential writes, not a writable memmap: written pages then stay in the page cache
    # instead of counting toward this process's resident memory. The old meta.json goes first,
    # so that until the new one is in place no reader pairs it with the new arrays.
    (out / "meta.json").unlink(missing_ok=True)
    position, tmp = 0, {split: out / f"{split}.bin.tmp" for split in ("train", "val")}
    try:
        with open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file:
            for _, _, text in _decoded_chunks(files, data, advance):
                ids = tokenizer.encode_array(text).astype(dtype)
                split_at = min(max(n_train - position, 0), len(ids))  # ids before this index are training text
                train_file.write(ids[:split_at].tobytes())
                val_file.write(ids[split_at:].tobytes())
                position += len(ids)
    except BaseException:  # failed or interrupted (Ctrl-C): leave no half-written arrays behind
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for split in ("train", "val"):
        os.replace(tmp[split], out / f"{split}.bin")

    meta = {
        "fingerprint": fingerprint,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "source_bytes": total,
        "source_sha256": digest.hexdigest(),
        "sources": [str(f) for f in files],
        "bad_bytes": bad_bytes[0],  # undecodable bytes replaced or dropped (data.errors replace or ignore)
    }
    tmp_meta = out / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp_meta, out / "meta.json")
    return Prepared(out, tokenizer, meta)


def _say_bad_bytes(meta: dict, data: DataConfig) -> None:
    """A note on stderr when data.errors replaced or dropped undecodable bytes: how many, in which corpus."""
    n = meta.get("bad_bytes", 0)
    if n:
        done = "replaced by U+FFFD" if data.errors == "replace" else "dropped"
        log(f"note: {corpus_name(meta['sources'])} is not valid {data.encoding}: {n:,} undecodable "
            f"byte{'s' if n != 1 else ''} {done} (data.errors={data.errors})")


def corpus_name(sources: list[str]) -> str:
    """The corpus as a user named it: its file, or its first file and how many more are joined to it."""
    return sources[0] if len(sources) == 1 else f"the corpus {sources[0]} + {len(sources) - 1} more file(s)"


def check_lengths(prepared: Prepared, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 characters."""
    need = block_size + 1
    for split in ("train", "val"):
        have = prepared.meta[f"{split}_tokens"]
        if have < need:
            raise DataError(f"the {split} split of {corpus_name(prepared.meta['sources'])} has {have} characters but "
                            f"model.block_size {block_size} needs at least {need}; use a longer corpus, a smaller "
                            "model.block_size" + (", or a larger data.val_fraction" if split == "val" else ""))


# ----------------------------------------------------------------------------- batches

def sample_offsets(n_tokens: int, block_size: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random start positions of `batch_size` windows, drawn from a seeded generator."""
    import torch

    return torch.randint(n_tokens - block_size, (batch_size,), generator=generator)


def get_batch(tokens: np.ndarray, offsets: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the windows at `offsets`: x = ids[i : i+block_size], y = ids[i+1 : i+1+block_size]."""
    import torch

    rows = np.stack([tokens[i:i + block_size + 1] for i in offsets.tolist()]).astype(np.int64)
    window = torch.from_numpy(rows)  # (B, block_size + 1)
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()
