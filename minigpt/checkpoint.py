"""Self-describing checkpoints that never tear.

One file holds everything sampling and resuming need: a format marker and version, the plain
module's weights (never a compiled or DDP-wrapped module's prefixed keys), the optimizer, the
step, every RNG state that feeds batches and dropout, the resolved config, the tokenizer's
vocabulary, the best validation loss, where the data came from and, for a fine-tuned run,
where its first weights came from (`init_from`). Only plain types and
tensors are stored, so `torch.load(weights_only=True)` reads it. What a training run puts into
a checkpoint, and takes back on resume, is listed once, in minigpt.run (`Run.state`).

A checkpoint is written to a temporary file in the same directory, flushed and fsynced, then
renamed over the old one: a process killed at any moment leaves the previous file intact.
A run directory keeps two: `last.pt` (resume from here) and `best.pt` (lowest val loss).

`load_model` turns a checkpoint into a model ready for inference (`LoadedModel`), and
`describe` says what a checkpoint holds.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minigpt import config as config_mod
from minigpt.config import Config
from minigpt.data import corpus_name
from minigpt.errors import CheckpointError, first_line
from minigpt.model import GPT
from minigpt.tokenizer import CharTokenizer

FORMAT = "minigpt-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "config", "tokenizer", "step")
LAST, BEST = "last.pt", "best.pt"


def clean_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the plain module, unwrapped from DDP (`module.`) and torch.compile (`_orig_mod.`)."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or getattr(module, "_orig_mod")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def base_vocabulary(payload: dict[str, Any] | None) -> list[str] | None:
    """The vocabulary a fine-tuned run's corpus was prepared on (its origin's), or None for a run from scratch."""
    if not payload or not payload.get("init_from"):
        return None
    return payload["tokenizer"]["chars"][:payload["init_from"]["vocab_size"]]  # the origin's ids come first


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically: temporary file, flush, fsync, rename over `path`."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself is unusable; there is no temporary file to remove
        previous = " (the previous checkpoint there is intact)" if path.exists() else ""
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc.strerror or exc}{previous}; "
            "free some disk space or choose a writable --out-dir"
        ) from exc


def resolve(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file from a file or a run directory (`prefer` first, then the other one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoint file or a run directory")
    if path.is_dir():
        for name in (prefer, LAST if prefer == BEST else BEST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run directory {path} holds no checkpoint ({BEST} or {LAST}); train first or pass another run")
    return path


def load(path: str | Path, prefer: str = BEST, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint; every way it can be unreadable or damaged becomes a CheckpointError.

    When a run directory's last.pt or best.pt is refused and the other one loads, the error names
    that one as the last good checkpoint."""
    file = resolve(path, prefer)
    try:
        return read(file, map_location)
    except CheckpointError as exc:
        exc.args = (exc.args[0] + last_good(file),)
        raise


def read(file: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of one checkpoint file, after checking its archive's checksums, its format and its weights."""
    if file.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes); use another checkpoint")
    check_archive(file)
    try:
        with warnings.catch_warnings():  # damaged bytes can look like an exotic pickle protocol; the error says it all
            warnings.simplefilter("ignore")
            payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged bytes fail in many ways (seen: IndexError, KeyError, UnicodeDecodeError)
        raise CheckpointError(
            f"checkpoint {file} cannot be read: it is truncated or not a minigpt checkpoint ({first_line(str(exc))})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a minigpt checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {file} has format version {payload.get('version')}, this minigpt reads version {VERSION}; "
            "use the minigpt release that wrote it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {file} is missing {', '.join(missing)}; it is damaged, use another one")
    weights = payload["model"] if isinstance(payload["model"], dict) else {}
    broken = [k for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise CheckpointError(f"checkpoint {file} is damaged: its weights {', '.join(broken[:3])} hold NaN or infinite values")
    payload["path"] = str(file)
    return payload


def check_archive(file: Path) -> None:
    """Compare each member of the zip archive that torch.save writes with the CRC-32 stored for it.

    torch.load does not, so damaged bytes in the weights would load as other numbers. A file that
    is not a zip archive (torch's older format, or no checkpoint at all) is left to torch.load."""
    if not zipfile.is_zipfile(file):
        return
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()  # the first member whose bytes do not match, or None
    except Exception as exc:  # noqa: BLE001 - a damaged directory or header fails in many ways
        raise CheckpointError(f"checkpoint {file} is damaged: its archive cannot be read ({first_line(str(exc))}); "
                              "use another checkpoint") from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {file} is damaged: the bytes of {bad} do not match the checksum stored "
                              "with them; use another checkpoint")


def last_good(file: Path) -> str:
    """For a refused last.pt or best.pt: '; the last good checkpoint is <the other one> (step N)', if it loads."""
    if file.name not in (LAST, BEST):
        return ""
    other = file.with_name(BEST if file.name == LAST else LAST)
    if not other.is_file():
        return ""
    try:
        step = read(other)["step"]
    except CheckpointError:
        return f"; {other} is damaged too"
    return f"; the last good checkpoint is {other} (step {step})"


# ----------------------------------------------------------------------------- a trained model

@dataclass
class LoadedModel:
    """A model ready for inference, with what it was trained with."""

    model: GPT
    tokenizer: CharTokenizer
    config: Config
    payload: dict


def load_model(path: str, device: torch.device, prefer: str = BEST) -> LoadedModel:
    """Load a checkpoint (file or run directory) into an eval-mode model on `device`."""
    payload = load(path, prefer=prefer, map_location="cpu")
    cfg = config_mod.from_dict(payload["config"], source=payload["path"])
    tokenizer = CharTokenizer.from_dict(payload["tokenizer"])
    model = GPT(cfg.model, tokenizer.vocab_size)
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    return LoadedModel(model, tokenizer, cfg, payload)


def describe(loaded: LoadedModel) -> dict:
    """What a checkpoint holds, as plain data: corpus, step, losses, size, vocabulary, data and config."""
    p = loaded.payload
    best = p.get("best_val_loss")
    sources = (p.get("data") or {}).get("sources") or []
    return {
        "checkpoint": p["path"],
        # What it was trained on; config.name below is only the config file it was started from.
        "corpus": corpus_name(sources) if sources else None,
        "step": p["step"],
        "best_val_loss": best,
        "best_val_bpc": best / math.log(2) if best is not None and math.isfinite(best) else None,
        "parameters": loaded.model.num_params(non_embedding=False),
        "parameters_non_embedding": loaded.model.num_params(),
        "vocab_size": loaded.tokenizer.vocab_size,
        "vocabulary": "".join(loaded.tokenizer.chars),
        "data": p.get("data") or {},
        **({"init_from": p["init_from"]} if p.get("init_from") else {}),  # a fine-tuned run's origin
        "config": config_mod.to_dict(loaded.config),
    }
