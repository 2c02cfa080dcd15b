"""Shared test helpers: small corpora written by the tests themselves, and tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt import config as config_mod

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

VERSE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)


def write_corpus(path: Path, repeats: int = 60, text: str = VERSE) -> Path:
    """A small corpus (about 10 KB by default) in UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text * repeats, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def tiny_sets(tmp_path: Path, corpus: Path) -> list[str]:
    """Overrides that point configs/tiny.yaml at `corpus` and keep every output under tmp_path."""
    return [f"data.path={corpus}", f"data.prepared_dir={tmp_path / 'prepared'}",
            f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"]


def tiny_config(tmp_path: Path, corpus: Path, *sets: str, name: str = "tiny.yaml") -> config_mod.Config:
    """A config from configs/ (tiny by default) pointed at `corpus`, with extra dotted overrides."""
    return config_mod.load(CONFIGS / name, tiny_sets(tmp_path, corpus) + list(sets))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m minigpt ARGS` as a real subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minigpt", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, input=input)
