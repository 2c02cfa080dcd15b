"""How a `minigpt` command ends: one line for every error, and the exit code of its kind.

A user error (minigpt.errors) is printed as one line, `error: ...`, naming options as the
command line spells them, with the exit code of its kind; `--debug` adds the traceback. A
mistake on the command line itself (an unknown option, a missing value, a stray word) is one
line too, `error: ...; hint`, exit code 2. A stdout closed early (`minigpt sample ... | head`) is
a normal end: exit code 0, nothing printed. A Ctrl-C is one line too, `stopped by SIGINT (Ctrl-C)
while ...: ...`, saying what it stopped and what that means, exit code 130.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

import typer
from typer.core import TyperGroup

from minigpt.errors import Interrupted, MiniGPTError, TrainingError
from minigpt.signals import SecondInterrupt

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # older typer uses click itself
    from click.exceptions import ClickException, UsageError


class OneLineErrors(TyperGroup):
    """The app's command group: click's usage errors become one line on stderr, `error: ...; hint`, exit 2."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:  # not standalone: click raises its errors here instead of printing them as a box
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `minigpt` alone: the help, as before
                typer.echo(exc.format_message())
            else:
                typer.echo(f"error: {usage_message(exc, argv)}", err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_message(exc: UsageError, argv: list[str]) -> str:
    """Click's message on one line, with a hint: what a stray word after a flag or `--set key` means, else --help."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = exc.ctx
    if "unexpected extra argument" in message:
        flags = {opt for p in (ctx.command.params if ctx else []) if getattr(p, "is_flag", False)
                 for opt in p.opts + p.secondary_opts}
        for before, word in zip(argv, argv[1:]):
            if before in flags and not word.startswith("-"):
                return f"{message}; {before} is a flag and takes no value: drop {word!r} (leave the flag out for false)"
        for option, key, word in zip(argv, argv[1:], argv[2:]):
            if option == "--set" and "=" not in key:
                return f"{message}; --set takes key=value as one word, e.g. --set {key}={word}"
    return f"{message}; see '{ctx.command_path if ctx else 'minigpt'} --help'"


state = {"debug": False}  # --debug: show the traceback of an error too


def user_errors(fn: Callable) -> Callable:
    """Turn MiniGPTError into one line on stderr and the error's exit code (plus the traceback with --debug).

    A stop by a signal is reported as `stopped ...`, not as an error: a Ctrl-C outside the training
    loop names what it interrupted (`interrupted_message`), exit 130. A stdout closed by its reader
    ends the command quietly with exit code 0.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(0)
        except MiniGPTError as exc:
            if isinstance(exc, Interrupted):
                ignore_further_interrupts()
            if state["debug"]:
                traceback.print_exc()
            # Stops that every torchrun process agrees on (Ctrl-C, a NaN loss) are reported by rank 0 only.
            agreed = exc.agreed or isinstance(exc, (Interrupted, TrainingError))
            if not (agreed and os.environ.get("RANK", "0") != "0"):
                typer.echo(f"{'' if isinstance(exc, Interrupted) else 'error: '}{exc.for_cli()}", err=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            ignore_further_interrupts()
            if state["debug"]:
                traceback.print_exc()
            if os.environ.get("RANK", "0") == "0":  # under torchrun every process got it; rank 0 speaks
                typer.echo(interrupted_message(exc, fn.__name__), err=True)
            raise typer.Exit(130)

    return wrapper


STOPPED_WHILE = {  # a first Ctrl-C outside the training loop, by command: (what was happening, what it means)
    "train": ("starting or finishing the run, outside the training steps",
              "no checkpoint was being written; those in the run directory are as they were"),
    "sample": ("sampling", "nothing is lost (sample writes no files)"),
    "prepare": ("preparing the data", "nothing half-made is ever used; minigpt prepare again finishes or reuses it"),
    "config_show": ("reading the config", "nothing is lost (config show writes no files)"),
    "attention": ("drawing the attention maps", "nothing is lost; the --out picture may be missing or incomplete"),
    "surprise": ("scoring the text", "nothing is lost; the --out file, if any, may be missing or incomplete"),
    "eval_": ("evaluating", "nothing is lost (eval writes no files)"),
    "explain": ("explaining the head", "nothing is lost (explain writes no files)"),
    "info": ("reading the checkpoint", "nothing is lost (info writes no files)"),
    "plot": ("drawing the loss curves", "nothing is lost; the --out picture may be missing or incomplete"),
    "bench": ("benchmarking", "nothing is lost (bench measures in a temporary directory)"),
    "view": ("serving the page", "nothing is lost (view writes no files)"),
}


def interrupted_message(exc: KeyboardInterrupt, command: str) -> str:
    """The one line for a Ctrl-C: a second one during training aborts; a first one names what it stopped."""
    if isinstance(exc, SecondInterrupt):
        return "aborted (second interrupt): nothing was saved after the last checkpoint"
    doing, outcome = getattr(exc, "stopped_while", None) or STOPPED_WHILE.get(command, ("running", "nothing was saved"))
    return f"stopped by SIGINT (Ctrl-C) while {doing}: {outcome}"


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush into a closed pipe does not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (e.g. captured by a test runner)
        pass


def ignore_further_interrupts() -> None:
    """The run has stopped (and saved): a further Ctrl-C has nothing left to stop, and would otherwise
    land in the interpreter's exit as an "Exception ignored in atexit callback" traceback."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
