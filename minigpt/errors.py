"""User-facing errors.

Everything a user can get wrong (a config typo, a missing corpus, a bad checkpoint, an unknown
character in a prompt) raises a subclass of `MiniGPTError` whose message says what is wrong,
where, and how to fix it. Only `minigpt.cli` catches these: it prints the message as one line on
stderr and exits with the error's `exit_code`.

A message names the options a user can change as `{--name}` or `{--name value}`: the command
line shows them as flags (`--unknown skip`, `exc.for_cli()`), Python as keywords
(`unknown="skip"`, `str(exc)`), so the library says the same thing to both in their own words.
"""

from __future__ import annotations

import re

OPTION = re.compile(r"\{--([a-z][a-z0-9-]*)(?: ([^{}]+))?\}")  # {--name} or {--name value} in a message


def _as_keyword(match: re.Match) -> str:
    """{--top-k} -> top_k; {--unknown skip} -> unknown="skip"; {--stride 1} -> stride=1."""
    name, value = match.group(1).replace("-", "_"), match.group(2)
    if value is None:
        return name
    try:
        float(value)
    except ValueError:
        return f'{name}="{value}"'
    return f"{name}={value}"


def _as_flag(match: re.Match) -> str:
    """{--top-k} -> --top-k; {--unknown skip} -> --unknown skip."""
    return f"--{match.group(1)}" + (f" {match.group(2)}" if match.group(2) is not None else "")


class MiniGPTError(Exception):
    """Base class of every error caused by user input rather than by a bug."""

    exit_code = 1

    def __init__(self, message: str = "", agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed  # every torchrun process stops with it, and process 0 alone says so

    def __str__(self) -> str:
        """The message with its options named as Python keywords."""
        return OPTION.sub(_as_keyword, super().__str__())

    def for_cli(self) -> str:
        """The message with its options named as command-line flags."""
        return OPTION.sub(_as_flag, super().__str__())

    def for_page(self) -> str:
        """The message with its options named as the fields of `minigpt view`'s page (top-k, unknown: skip)."""
        return OPTION.sub(lambda m: m.group(1) + (f": {m.group(2)}" if m.group(2) is not None else ""), super().__str__())


class ConfigError(MiniGPTError):
    """A config file or override is missing, malformed, or inconsistent (the same exit code as a
    mistake on the command line itself, which click reports: an unknown option, a missing value)."""

    exit_code = 2


class DataError(MiniGPTError):
    """A corpus cannot be read, decoded, or is too small for the model."""

    exit_code = 3


class CheckpointError(MiniGPTError):
    """A checkpoint is missing, truncated, not a checkpoint, incompatible, or cannot be written."""

    exit_code = 4


class DirectoryInUse(CheckpointError):
    """A run directory (or prepared-data directory) is locked by another process writing there."""


class DeviceError(MiniGPTError):
    """The requested device (or launch layout) is not available on this machine."""

    exit_code = 5


class PromptError(MiniGPTError):
    """A prompt, or an option of a command that reads a trained model (sample, attention, surprise,
    eval, plot), cannot be used: unknown characters, a temperature of -1, a layer out of range, --out a.jpg."""

    exit_code = 6


class TrainingError(MiniGPTError):
    """Training had to stop (for example: the loss became NaN or infinite)."""

    exit_code = 7


class Interrupted(MiniGPTError):
    """Training was stopped by a signal after saving a checkpoint (reported as `stopped ...`, not as an error)."""

    exit_code = 130


def first_line(text: str, limit: int = 120) -> str:
    """The first line of a library's message, for one of ours: cut at a word boundary, with " ...", if longer."""
    lines = text.strip().splitlines()
    first = " ".join(lines[0].split()) if lines else ""
    if len(first) <= limit:
        return first + (" ..." if len(lines) > 1 else "")
    head = first[:limit + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head else first[:limit]
    return cut.rstrip(" ,;:") + " ..."
