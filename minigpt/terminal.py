"""Text to and from a terminal for `minigpt sample`: generated text streamed to stdout, and the interactive turns."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Iterable

from minigpt.errors import PromptError

if TYPE_CHECKING:
    from minigpt.api import Conversation


def echo_stream(pieces: Iterable[str]) -> None:
    """Write text to stdout piece by piece, as it is generated."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()


def converse(conversation: "Conversation") -> None:
    """Read lines from stdin and stream the model's continuation of each, until Ctrl-D, an empty line or Ctrl-C."""
    try:
        while True:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline().rstrip("\n")
            if not line:
                break
            try:
                echo_stream(conversation.reply(line))
            except PromptError as exc:  # a line the model cannot read: say so and go on
                sys.stderr.write(f"error: {exc}\n")
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    sys.stderr.write("\n")
