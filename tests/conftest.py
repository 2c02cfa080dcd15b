"""Shared test helpers: small corpora written by the tests themselves, tiny configs, and the test devices.

The device-dependent tests take a `device` argument and run once per device named in the
environment variable MINIGPT_TEST_DEVICES (comma-separated, default `cpu`), e.g.
`MINIGPT_TEST_DEVICES=cpu,cuda` on a GPU machine. A listed device this machine lacks is not
dropped quietly: its cases are collected and reported as skipped, with the reason, and the
session header names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import pytest

# One CPU thread per test process, and so for the CLI processes the tests start: a run's thread count
# otherwise follows the machine's load (train.threads 0), and results compared bit for bit must not
# depend on what else the machine happens to be doing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after the thread setting, which torch reads when it starts

from minigpt import config as config_mod
from minigpt.device import available_devices

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

VERSE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)


DEVICE_KINDS = ("cpu", "cuda", "mps")


def listed_devices() -> list[str]:
    """The device kinds named in MINIGPT_TEST_DEVICES (default: cpu); an unknown name stops the run."""
    names = [n.strip() for n in os.environ.get("MINIGPT_TEST_DEVICES", "cpu").split(",") if n.strip()]
    unknown = [n for n in names if n not in DEVICE_KINDS]
    if unknown or not names:
        raise pytest.UsageError(f"MINIGPT_TEST_DEVICES={os.environ.get('MINIGPT_TEST_DEVICES')!r}: "
                                f"name one or more of {', '.join(DEVICE_KINDS)}, comma-separated")
    return list(dict.fromkeys(names))


def missing_devices() -> list[str]:
    """Listed device kinds that this machine does not have."""
    return [n for n in listed_devices() if n not in available_devices()]


if "cuda" in listed_devices():
    # cuBLAS is deterministic only with a fixed workspace; set before the first cuBLAS call (see `deterministic`).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def device_cases(values: Callable[[str], Iterable] | None = None) -> list:
    """pytest params: one per listed device (or one per (device, value) with `values(device)`); missing devices are skipped."""
    cases = []
    for name in listed_devices():
        marks = [pytest.mark.skip(reason=f"{name} is listed in MINIGPT_TEST_DEVICES but not available here")] \
            if name not in available_devices() else []
        if values is None:
            cases.append(pytest.param(name, marks=marks, id=name))
        else:
            cases += [pytest.param(name, v, marks=marks, id=f"{name}-{v}") for v in values(name)]
    return cases


def train_dtypes(device: str) -> list[str]:
    """The training dtypes to test on a device: float16 (with loss scaling) exists on CUDA only."""
    return ["float32", "bfloat16", "float16"] if device == "cuda" else ["float32", "bfloat16"]


@pytest.fixture(params=device_cases())
def device(request) -> torch.device:
    """Each listed test device in turn (MINIGPT_TEST_DEVICES)."""
    return torch.device(request.param)


@contextmanager
def deterministic(device: torch.device | str):
    """On CUDA, deterministic kernels (cuBLAS workspace, memory-efficient attention backward) for exact comparisons.

    Two identical CUDA runs otherwise differ in the last bits: some backward kernels accumulate
    with atomic adds in whatever order the threads arrive. CPU kernels are deterministic already.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def pytest_report_header(config) -> str:
    missing = missing_devices()
    note = f" ({', '.join(missing)} not available here: those cases are skipped)" if missing else ""
    return f"minigpt test devices (MINIGPT_TEST_DEVICES): {', '.join(listed_devices())}{note}"


def pytest_terminal_summary(terminalreporter) -> None:
    missing = missing_devices()
    if missing:
        terminalreporter.write_line(f"NOTE: {', '.join(missing)} listed in MINIGPT_TEST_DEVICES but not available: "
                                    "its cases were skipped, not run", yellow=True)


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
    """A config from configs/ (tiny by default) pointed at `corpus`, with extra dotted overrides (later ones win)."""
    return config_mod.load(CONFIGS / name, tiny_sets(tmp_path, corpus) + list(sets))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m minigpt ARGS` as a real subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minigpt", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, input=input)
