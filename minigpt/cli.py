"""The `minigpt` command line: parse options, call the library, map errors to exit codes.

Results (sampled text, YAML, JSON reports) go to stdout; progress and messages go to stderr.
A user error is printed as one line, `error: ...`, with the exit code of its kind (see
minigpt.errors); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from minigpt.errors import MiniGPTError

app = typer.Typer(
    name="minigpt",
    help="Train a character-level GPT on any text and sample from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_state = {"debug": False}

ConfigOpt = typer.Option(..., "--config", "-c", help="YAML run config, e.g. configs/shakespeare_char_cpu.yaml.")
SetOpt = typer.Option(None, "--set", help="Override a config value, e.g. --set train.max_iters=500 (repeatable).")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: the config's train.device).")
CheckpointOpt = typer.Option(..., "--checkpoint", help="A checkpoint file, or a run directory (its best.pt is used).")


def user_errors(fn: Callable) -> Callable:
    """Turn MiniGPTError into one line on stderr and the error's exit code (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MiniGPTError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            typer.echo("aborted (second interrupt): nothing was saved after the last checkpoint", err=True)
            raise typer.Exit(130)

    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")) -> None:
    """Train a character-level GPT on any text and sample from it."""
    _state["debug"] = debug


def _load_config(path: Path, overrides: Optional[List[str]], device: Optional[str] = None, out_dir: Optional[Path] = None):
    from minigpt import config

    extra = list(overrides or [])
    if device:
        extra.append(f"train.device={device}")
    if out_dir:
        extra.append(f"train.out_dir={out_dir}")
    return config.load(path, extra)


def _device(name: str):
    from minigpt.device import resolve_device

    return resolve_device(name)


@app.command()
@user_errors
def train(
    config: Path = ConfigOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Run directory (default: runs/<config name>)."),
    device: Optional[str] = DeviceOpt,
    set_: Optional[List[str]] = SetOpt,
    resume: Optional[str] = typer.Option(None, "--resume", flag_value="last",
                                         help="Continue the run from its last checkpoint, or from the checkpoint PATH given."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again even if the run directory holds checkpoints."),
    nproc: int = typer.Option(1, "--nproc", help="Number of data-parallel processes (launches torchrun when > 1)."),
) -> None:
    """Train a model from a YAML config (prepares the data first if needed)."""
    from minigpt.train import train as run_training

    cfg = _load_config(config, set_, device, out_dir)
    hint = f"minigpt train --config {config} --resume" + (f" --out-dir {out_dir}" if out_dir else "")
    run_training(cfg, resume=True if resume == "last" else (resume or False), overwrite=overwrite, resume_hint=hint)


@app.command()
@user_errors
def sample(
    checkpoint: Path = CheckpointOpt,
    prompt: str = typer.Option("\n", "--prompt", "-p", help="Text to continue (empty: start from a newline)."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="Characters to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Randomness; 0 is greedy, 1 samples the model's distribution."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample only among the k most likely characters."),
    num_samples: int = typer.Option(1, "--num-samples", help="Independent samples, generated in one batch."),
    seed: int = typer.Option(1337, "--seed", help="Random seed: the same seed gives the same text."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    unknown: str = typer.Option("error", "--unknown", help="Prompt characters outside the vocabulary: error, skip or replace."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole context for every character (slower)."),
) -> None:
    """Write text with a trained model; the text streams to stdout."""
    from minigpt.errors import PromptError
    from minigpt.sample import check_options, load_model, sample as run_sample

    if unknown not in ("error", "skip", "replace"):
        raise PromptError(f"--unknown must be error, skip or replace, got {unknown!r}")
    check_options(max_new_tokens, temperature, top_k, num_samples)
    loaded = load_model(str(checkpoint), _device(device))

    def stream(_: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    texts = run_sample(loaded, prompt, max_new_tokens, temperature, top_k, num_samples, seed, unknown,
                       use_cache=not no_cache, on_text=stream)
    if num_samples == 1:
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n\n-----\n\n".join(texts) + "\n")


@app.command()
@user_errors
def prepare(
    config: Path = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even if the prepared data is up to date."),
) -> None:
    """Encode the config's corpus into token arrays (train runs this automatically)."""
    from tqdm import tqdm

    from minigpt.data import prepare as run_prepare

    cfg = _load_config(config, set_)
    with tqdm(total=0, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        prepared = run_prepare(cfg.data, cfg.model.block_size, progress=progress, force=force)
    meta = prepared.meta
    typer.echo(f"prepared {', '.join(meta['sources'])}: vocabulary {meta['vocab_size']} characters, "
               f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens ({meta['dtype']}) in {prepared.directory}",
               err=True)


@config_app.command("show")
@user_errors
def config_show(config: Path = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Print the resolved config (defaults and overrides applied) as YAML."""
    from minigpt.config import dump

    typer.echo(dump(_load_config(config, set_)), nl=False)
