"""The `minigpt` command line: parse options, call the library (minigpt.api), print results.

Results (sampled text, YAML, JSON reports) go to stdout; progress and messages go to stderr.
How a command ends on an error (one line, the exit code of its kind) is minigpt.exits.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from minigpt import __version__, api
from minigpt.errors import PromptError
from minigpt.exits import OneLineErrors, ignore_further_interrupts, state, user_errors


app = typer.Typer(
    name="minigpt",
    help="Train a character-level GPT on any text and sample from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags read as `--json`, not `--json <bool>`
    cls=OneLineErrors,
)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


ConfigOpt = typer.Option(..., "--config", "-c", help="YAML run config, e.g. configs/shakespeare_char_cpu.yaml.")
SetOpt = typer.Option(None, "--set", help="Override a config value, e.g. --set train.max_iters=500 (repeatable).")
TimeOpt = typer.Option(None, "--time", help="Train for this long, start-up included (90s, 5m, 1h): sets "
                       "train.time_budget; the step count (and what auto chooses) follows from it.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: the config's train.device).")
CheckpointOpt = typer.Option(..., "--checkpoint", help="A checkpoint file, or a run directory (its best.pt is used).")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"minigpt {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (same exit codes)."),
         version: bool = typer.Option(False, "--version", help="Print minigpt's version and exit.",
                                      callback=_print_version, is_eager=True)) -> None:
    """Train a character-level GPT on any text and sample from it."""
    state["debug"] = debug


def _load_config(path: Path, overrides: Optional[List[str]], device: Optional[str] = None, out_dir: Optional[Path] = None):
    return api.resolve_config(path, overrides, device=device or None, out_dir=out_dir or None)


@app.command()
@user_errors
def train(
    config: Path = ConfigOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Run directory (default: runs/<config name>)."),
    device: Optional[str] = DeviceOpt,
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint (run directory's last.pt)."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint file instead."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again even if the run directory holds checkpoints."),
    nproc: int = typer.Option(1, "--nproc", help="Number of data-parallel processes (launches torchrun when > 1)."),
    time_budget: Optional[str] = TimeOpt,
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Fine-tune: start a new run from this run's "
                                             "(or checkpoint's) weights; the vocabulary gains the corpus's new characters."),
) -> None:
    """Train a model from a YAML config (prepares the data first if needed)."""
    from minigpt.launch import check_launch, launch, sized_once, train_args

    if time_budget is not None:
        set_ = list(set_ or []) + [f"train.time_budget={time_budget}"]
    cfg = _load_config(config, set_, device, out_dir)
    if nproc > 1 and cfg.auto and not (resume or resume_from):
        set_ = sized_once(cfg, set_, init_from)
    check_launch(nproc, cfg.train.device, cfg.train.batch_size)
    if nproc > 1:
        code = launch(nproc, train_args(config, out_dir, device, set_, resume, resume_from, overwrite, init_from,
                                        debug=state["debug"]))
        if code in (130, 143):  # the workers stopped on a signal and saved
            ignore_further_interrupts()
        raise typer.Exit(code)
    hint = shlex.join(["minigpt"] + train_args(config, out_dir, device, set_, True, None, False))
    api.train(cfg, resume=resume_from or resume, overwrite=overwrite, resume_hint=hint, init_from=init_from)


@app.command()
@user_errors
def sample(
    checkpoint: Path = CheckpointOpt,
    prompt: str = typer.Option(api.PROMPT, "--prompt", "-p", help="Text to continue (empty: a newline).", show_default="a newline"),
    max_new_tokens: int = typer.Option(api.MAX_NEW_TOKENS, "--max-new-tokens", "-n", help="Characters to generate (at most)."),
    temperature: float = typer.Option(api.TEMPERATURE, "--temperature", "-t", help="Randomness; 0 is greedy, 1 samples the model's distribution."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample only among the k most likely characters."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Sample only among the most likely characters that together have probability P (nucleus)."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="End when the text ends with TEXT, which is not printed (repeatable)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Independent samples, generated in one batch."),
    seed: int = typer.Option(api.SEED, "--seed", help="Random seed: the same seed gives the same text."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Take turns: type a line, the model continues it (Ctrl-D or an empty line ends)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    unknown: str = typer.Option("error", "--unknown", help="Prompt characters outside the vocabulary: error, skip or replace."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute the whole context for every character (slower)."),
) -> None:
    """Write text with a trained model; the text streams to stdout."""
    from minigpt.generation import check_options
    from minigpt.terminal import converse, echo_stream

    check_options(max_new_tokens, temperature, top_k, num_samples, top_p, api.stop_list(stop))
    if interactive and num_samples != 1:
        raise PromptError("--interactive writes one continuation at a time; leave out --num-samples")
    model = _load_checkpoint(checkpoint, device, unknown)
    options = dict(top_k=top_k, top_p=top_p, stop=stop, seed=seed, unknown=unknown, use_cache=not no_cache)
    if interactive:
        converse(model.conversation(max_new_tokens, temperature, **options))
    elif num_samples == 1:
        echo_stream(model.stream(prompt, max_new_tokens, temperature, **options))
        sys.stdout.write("\n")
    else:
        texts = model.generate_many(prompt, num_samples, max_new_tokens, temperature, **options)
        sys.stdout.write("\n\n-----\n\n".join(texts) + "\n")


@app.command()
@user_errors
def prepare(
    config: Path = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even if the prepared data is up to date."),
) -> None:
    """Encode the config's corpus into token arrays (train runs this automatically)."""
    from minigpt.data import prepare as run_prepare
    from minigpt.console import byte_progress

    cfg = _load_config(config, set_)
    with byte_progress("prepare (2 passes)") as progress:  # a bar on a terminal, plain lines in a log
        # wait=False: another process writing this prepared-data directory is a refusal (exit 4), not a wait
        prepared = run_prepare(cfg.data, cfg.model.block_size, progress=progress, force=force, wait=False)
    meta = prepared.meta
    typer.echo(f"prepared {', '.join(meta['sources'])}: vocabulary {meta['vocab_size']} characters, "
               f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens ({meta['dtype']}) in {prepared.directory}",
               err=True)


@config_app.command("show")
@user_errors
def config_show(config: Path = ConfigOpt, set_: Optional[List[str]] = SetOpt, device: Optional[str] = DeviceOpt,
                time_budget: Optional[str] = TimeOpt,
                init_from: Optional[Path] = typer.Option(None, "--init-from", help="As train's --init-from.")) -> None:
    """Print the resolved config as YAML; keys set to auto are chosen as train would choose them on this machine
    (a few seconds of measuring; nothing is trained), with the reason on the first line."""
    from minigpt.config import dump
    if time_budget is not None:
        set_ = list(set_ or []) + [f"train.time_budget={time_budget}"]
    cfg = _load_config(config, set_, device)
    if cfg.auto:
        cfg = api.size(cfg, init_from=init_from)
        typer.echo(f"# auto: {cfg.sized['reason']}")
    typer.echo(dump(cfg), nl=False)


# ----------------------------------------------------------------------------- seeing inside the model

UnknownOpt = typer.Option("error", "--unknown", help="Characters outside the vocabulary: error, skip or replace.")
StrideOpt = typer.Option(None, "--stride", help="Window advance in characters (default block_size // 2; 1 = full context everywhere).")
InspectDeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")


def _check_out(out: Optional[Path], suffixes: tuple[str, ...], what: str) -> None:
    """An --out file name must end in one of `suffixes` (checked before the slow model load)."""
    if out is not None and out.suffix.lower() not in suffixes:
        raise PromptError(f"--out {out}: {what} is written as {' or '.join(suffixes)}; give a file name ending in {suffixes[0]}")


def _load_checkpoint(checkpoint: Path, device: str, unknown: str) -> "api.Model":
    """The model of a checkpoint on `device`, after checking the --unknown policy."""
    api.check_unknown(unknown)
    return api.load(checkpoint, device)


@app.command()
@user_errors
def attention(
    checkpoint: Path = CheckpointOpt,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text whose attention weights are drawn (its last block_size characters)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Draw only this layer (0-based; default: all)."),
    head: Optional[int] = typer.Option(None, "--head", help="Draw only this head (0-based; default: all)."),
    device: str = InspectDeviceOpt,
    unknown: str = UnknownOpt,
) -> None:
    """Draw the causal attention weights of a prompt: one heatmap per layer and head."""
    _check_out(out, (".png",), "the attention picture")
    from minigpt import viz

    model = _load_checkpoint(checkpoint, device, unknown)
    result = model.attention_maps(prompt, layer, head, unknown)
    if result.dropped:
        typer.echo(f"note: the prompt is longer than block_size {model.config.model.block_size}; "
                   f"drawing its last {len(result.chars)} characters", err=True)
    figure = viz.attention_figure(result.chars, result.maps, title=f"attention of {model.path}")
    typer.echo(f"wrote {viz.save_figure(figure, out)}", err=True)


@app.command()
@user_errors
def surprise(
    checkpoint: Path = CheckpointOpt,
    text: Optional[str] = typer.Option(None, "--text", help="Text to score."),
    file: Optional[Path] = typer.Option(None, "--file", help="Text file to score (instead of --text)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the coloured text to FILE.html or FILE.png."),
    stride: Optional[int] = StrideOpt,
    device: str = InspectDeviceOpt,
    unknown: str = UnknownOpt,
) -> None:
    """Score each character in bits (-log2 p); print the mean bits per character."""
    if (text is None) == (file is None):
        raise PromptError("pass exactly one of --text TEXT or --file FILE")
    _check_out(out, (".html", ".htm", ".png"), "the surprise view")
    from minigpt import viz  # imported after the checks: torch is slow to import

    model = _load_checkpoint(checkpoint, device, unknown)
    result = model.surprise(text, file=file, stride=stride, unknown=unknown)
    if out is not None and out.suffix.lower() == ".png":
        viz.save_figure(viz.surprise_figure(result.chars, result.bits), out)
    elif out is not None:
        viz.write_text(out, viz.surprise_html(result.chars, result.bits, title=f"surprise of {model.path}"))
    if out is not None:
        typer.echo(f"wrote {out}", err=True)
    typer.echo(f"{result.mean_bits:.4f} bits/char over {len(result.bits)} characters")


@app.command()
@user_errors
def view(
    checkpoint: Path = CheckpointOpt,
    port: int = typer.Option(8765, "--port", help="Port to listen on (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 lets anyone on your network in."),
    device: str = InspectDeviceOpt,
) -> None:
    """Open a trained model in the browser: write with it, see each character's surprise and where every head looks."""
    from minigpt import view as view_mod

    model = api.load(checkpoint, device)
    view_mod.serve(model, host, port, say=lambda message: typer.echo(message, err=True))


@app.command("eval")
@user_errors
def eval_(
    checkpoint: Path = CheckpointOpt,
    file: Optional[Path] = typer.Option(None, "--file", help="Text file to score."),
    split: Optional[str] = typer.Option(None, "--split", help="Score the train or val split the model was trained on (default: val)."),
    stride: Optional[int] = StrideOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: str = InspectDeviceOpt,
    unknown: str = UnknownOpt,
) -> None:
    """Exact bits per character over a whole file or split (every character scored once)."""
    import json

    if file is not None and split is not None:
        raise PromptError("pass either --file FILE or --split val, not both")
    if split not in (None, "train", "val"):
        raise PromptError(f"--split must be train or val, got {split!r}")
    model = _load_checkpoint(checkpoint, device, unknown)  # torch is imported after the checks: it is slow to import
    result = model.evaluate(file=file, split=split, stride=stride, unknown=unknown)  # no source: the val split
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(f"{result.source}: {result.bpc:.4f} bits/char (loss {result.loss:.4f} nats) over "
                   f"{result.characters:,} characters (block_size {result.block_size}, stride {result.stride})")


@app.command()
@user_errors
def explain(
    checkpoint: Path = CheckpointOpt,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to follow through the head (its last block_size characters)."),
    layer: int = typer.Option(0, "--layer", help="Layer of the head (0-based)."),
    head: int = typer.Option(0, "--head", help="Head within the layer (0-based)."),
    as_json: bool = typer.Option(False, "--json", help="Print every number as JSON instead of rounded tables."),
    device: str = InspectDeviceOpt,
    unknown: str = UnknownOpt,
) -> None:
    """Follow one attention head through its steps on a prompt: embeddings to next-character distribution."""
    import json

    model = _load_checkpoint(checkpoint, device, unknown)
    explanation = model.explain(prompt, layer, head, unknown)
    typer.echo(json.dumps(explanation.to_dict()) if as_json else explanation.to_text())


@app.command()
@user_errors
def info(checkpoint: Path = CheckpointOpt) -> None:
    """Print what a checkpoint holds: config, size, vocabulary, step, best val loss, data (YAML)."""
    import yaml

    model = _load_checkpoint(checkpoint, "cpu", "error")
    typer.echo(yaml.safe_dump(model.info(), sort_keys=False, allow_unicode=True), nl=False)


@app.command()
@user_errors
def plot(
    run: Path = typer.Option(..., "--run", help="Run directory holding TensorBoard event files."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
) -> None:
    """Draw the train and validation loss curves of a run from its TensorBoard event files."""
    _check_out(out, (".png",), "the loss picture")
    from minigpt import viz

    figure = viz.loss_figure(viz.read_scalars(run), title=f"loss of {run}")
    typer.echo(f"wrote {viz.save_figure(figure, out)}", err=True)


@app.command()
@user_errors
def bench(
    config: Path = ConfigOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout."),
    prepare_mb: float = typer.Option(64, "--prepare-mb", help="Size in MB of the generated corpus prepare is timed on."),
    device: Optional[str] = DeviceOpt,
    set_: Optional[List[str]] = SetOpt,
    shared: bool = typer.Option(False, "--shared", help="Instead: train alone, two runs at once, and beside a busy "
                                "loop, with fixed and with load-following CPU threads (takes a few minutes)."),
    steps: int = typer.Option(400, "--steps", help="With --shared: training steps of each measured run."),
) -> None:
    """Measure training, evaluation, sampling and prepare speed on this machine (table on stderr)."""
    from minigpt import bench as bench_mod
    from minigpt.errors import ConfigError

    if prepare_mb <= 0:
        raise ConfigError(f"--prepare-mb must be positive, got {prepare_mb}")
    if steps < 20:
        raise ConfigError(f"--steps must be at least 20 (speeds are logged every 10 steps), got {steps}")
    cfg = _load_config(config, set_, device)
    say = lambda message: typer.echo(message, err=True)  # noqa: E731
    if shared:
        from minigpt import benchshared

        report = benchshared.run(cfg, config, list(set_ or []), steps, progress=say)
        typer.echo(benchshared.format_table(report), err=True)
    else:
        report = bench_mod.run(cfg, prepare_mb=prepare_mb, progress=say)
        typer.echo(bench_mod.format_table(report), err=True)
    if json_out:
        typer.echo(bench_mod.to_json(report))
