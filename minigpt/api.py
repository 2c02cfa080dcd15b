"""minigpt from Python: load a trained model and use it, or train one, in a script or a notebook.

    import minigpt

    model = minigpt.load("runs/shakespeare_char_cpu")        # a run directory or a checkpoint file
    print(model.generate("ROMEO:", max_new_tokens=200, top_p=0.9, seed=1))
    weights = model.attention("ROMEO:")                        # (n_layer, n_head, T, T)
    print(model.explain("ROMEO:", layer=0, head=1))            # one head, step by step
    result = minigpt.train("configs/tiny.yaml", overrides={"train.max_iters": 200}, data="my.txt")

The command line (minigpt/cli.py) calls these same functions, so the two cannot drift apart, and
errors are the same MiniGPTError subclasses with the same messages. This module imports torch
only when a model is loaded or trained, so `import minigpt` (and the CLI's start) stays fast.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

from minigpt import config as config_mod
from minigpt.config import Config, ConfigLike, Overrides
from minigpt.errors import PromptError
from minigpt.generation import MAX_NEW_TOKENS, PROMPT, SEED, TEMPERATURE  # sampling defaults

if TYPE_CHECKING:
    import torch

    from minigpt.checkpoint import LoadedModel
    from minigpt.explain import Explanation
    from minigpt.inspection import Attention, Evaluation, Surprise
    from minigpt.model import GPT
    from minigpt.tokenizer import CharTokenizer
    from minigpt.training import TrainResult

UNKNOWN = ("error", "skip", "replace")  # what to do with characters outside the vocabulary

Stops = Union[str, Sequence[str], None]


# ----------------------------------------------------------------------------- training

resolve_config = config_mod.load  # a YAML path, a dict of sections or a Config, with overrides applied


def train(config: ConfigLike, overrides: Overrides | None = None, data: str | Path | Sequence | None = None, *,
          out_dir: str | Path | None = None, device: str | None = None, resume: bool | str | Path = False,
          overwrite: bool = False, progress: bool = True, resume_hint: str | None = None,
          init_from: str | Path | None = None) -> TrainResult:
    """Train in this process, as `minigpt train` does; return the run directory, best val loss and history.

    `config`, `overrides`, `data`, `device` and `out_dir` are as in `resolve_config` (minigpt.config.load). `resume=True`
    continues the run directory's last.pt, a path continues that checkpoint. `init_from` (a run
    directory or checkpoint) fine-tunes: a new run starts from that model's weights. The progress bar goes
    to stderr (a widget in Jupyter when ipywidgets is installed). A first Ctrl-C, or the stop
    button of a notebook, ends the current step, saves last.pt and raises `Interrupted`.
    Several processes (torchrun) are the CLI's `--nproc`."""
    from minigpt.autosize import resolve as resolve_auto
    from minigpt.training import train as run_training

    cfg = resolve_config(config, overrides, data, device, out_dir)  # then its auto keys, as the first line says
    resolve_auto(cfg, resume=resume if isinstance(resume, bool) else str(resume), init_from=str(init_from) if init_from else None)
    hint = resume_hint or "the same minigpt.train(...) call with resume=True"
    return run_training(cfg, resume=str(resume) if isinstance(resume, (str, Path)) else resume,
                        overwrite=overwrite, progress=progress, resume_hint=hint,
                        init_from=str(init_from) if init_from else None)


def size(config: ConfigLike, overrides: Overrides | None = None, data: str | Path | Sequence | None = None, *,
         device: str | None = None, init_from: str | Path | None = None) -> Config:
    """The config as `train` would start it: its `auto` keys chosen for this machine (measured; nothing is trained).

    `cfg.sized["reason"]` says what was chosen and why."""
    from minigpt.autosize import resolve

    cfg = resolve_config(config, overrides, data, device)
    resolve(cfg, init_from=str(init_from) if init_from else None, say=lambda line: None)
    return cfg


# ----------------------------------------------------------------------------- a trained model

def load(path: str | Path, device: str = "auto") -> Model:
    """A trained model from a checkpoint file or a run directory (its best.pt), in eval mode on `device`."""
    from minigpt.checkpoint import load_model
    from minigpt.device import resolve_device, set_threads

    model = Model(load_model(str(path), resolve_device(device)))
    set_threads(0)  # on a CPU, sampling and scoring use the cores other processes leave free
    return model


def check_unknown(unknown: str) -> None:
    """Refuse an unknown-character policy other than error, skip or replace."""
    if unknown not in UNKNOWN:
        raise PromptError(f"{{--unknown}} must be error, skip or replace, got {unknown!r}")


def check_one_source(what: str, **given: Any) -> None:
    """Refuse more than one of the named text sources (text, file, split)."""
    passed = [name for name, value in given.items() if value is not None]
    if len(passed) > 1:
        raise PromptError(f"{what} one of {', '.join('{--' + n + '}' for n in given)} at a time, "
                          f"not {' and '.join('{--' + n + '}' for n in passed)}")


def stop_list(stop: Stops) -> tuple[str, ...]:
    """Stop strings as a tuple: none, one string, or several."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Model:
    """A trained model, ready to write, score and explain text. Made by `minigpt.load`."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    @property
    def module(self) -> GPT:
        """The underlying torch.nn.Module (minigpt.model.GPT), in eval mode."""
        return self.loaded.model

    @property
    def config(self) -> Config:
        """The resolved config the model was trained with."""
        return self.loaded.config

    @property
    def tokenizer(self) -> CharTokenizer:
        """The character tokenizer (encode, decode, chars)."""
        return self.loaded.tokenizer

    @property
    def vocab(self) -> str:
        """Every character the model knows, in id order."""
        return "".join(self.loaded.tokenizer.chars)

    @property
    def step(self) -> int:
        """The training step the checkpoint was saved at."""
        return self.loaded.payload["step"]

    @property
    def best_val_loss(self) -> float | None:
        """The best validation loss (nats per character) seen during training."""
        return self.loaded.payload.get("best_val_loss")

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return Path(self.loaded.payload["path"])

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.loaded.model.lm_head.weight.device

    def __repr__(self) -> str:
        c = self.config.model
        return (f"minigpt.Model({str(self.path)!r}: step {self.step}, {self.module.num_params() / 1e6:.2f}M parameters, "
                f"n_layer {c.n_layer}, n_head {c.n_head}, n_embd {c.n_embd}, block_size {c.block_size}, "
                f"vocabulary {len(self.vocab)}, {self.device})")

    def generate(self, prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
                 top_k: int | None = None, top_p: float | None = None, stop: Stops = None, seed: int = SEED, *,
                 unknown: str = "error", use_cache: bool = True, include_prompt: bool = True) -> str:
        """The prompt and its continuation, as `minigpt sample` prints it (without the prompt if not include_prompt).

        Generation ends after `max_new_tokens` characters or at the first stop string, which is
        left out; top_k and top_p restrict the draw to the k most likely characters and to the
        nucleus of probability top_p; temperature 0 is greedy."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, unknown=unknown,
                                   use_cache=use_cache, include_prompt=include_prompt))

    def stream(self, prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
               top_k: int | None = None, top_p: float | None = None, stop: Stops = None, seed: int = SEED, *,
               unknown: str = "error", use_cache: bool = True, include_prompt: bool = True) -> Iterator[str]:
        """`generate`, piece by piece as the characters come (the prompt first, if include_prompt)."""
        from minigpt import generation

        check_unknown(unknown)
        with closing(generation.stream(self.loaded, prompt, max_new_tokens, temperature, top_k, 1, seed, unknown,
                                   use_cache, top_p, stop_list(stop))) as pieces:
            _, start = next(pieces)  # the prompt as the model reads it
            if include_prompt:
                yield start
            for _, piece in pieces:
                yield piece

    def generate_many(self, prompt: str = PROMPT, num_samples: int = 2, max_new_tokens: int = MAX_NEW_TOKENS,
                      temperature: float = TEMPERATURE, top_k: int | None = None, top_p: float | None = None,
                      stop: Stops = None, seed: int = SEED, *, unknown: str = "error",
                      use_cache: bool = True) -> list[str]:
        """`num_samples` independent continuations (prompt included), generated in one batch."""
        from minigpt import generation

        check_unknown(unknown)
        return generation.sample(self.loaded, prompt, max_new_tokens, temperature, top_k, num_samples, seed, unknown,
                             use_cache, top_p=top_p, stop=stop_list(stop))

    def conversation(self, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
                     top_k: int | None = None, top_p: float | None = None, stop: Stops = None, seed: int = SEED, *,
                     unknown: str = "error", use_cache: bool = True) -> Conversation:
        """A conversation: you write a line, the model continues it (`minigpt sample --interactive`)."""
        from minigpt.generation import check_options

        check_unknown(unknown)
        check_options(max_new_tokens, temperature, top_k, 1, top_p, stop_list(stop))
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop=stop, unknown=unknown, use_cache=use_cache)
        return Conversation(self, seed, options)

    def attention_maps(self, prompt: str, layer: int | None = None, head: int | None = None,
                       unknown: str = "error") -> Attention:
        """Per (layer, head), the (T, T) attention weights of the prompt's last block_size characters, with those characters."""
        from minigpt import inspection

        check_unknown(unknown)
        return inspection.attention(self.loaded, prompt, layer, head, unknown)

    def attention(self, prompt: str, unknown: str = "error") -> torch.Tensor:
        """The attention weights of every layer and head, (n_layer, n_head, T, T): row = query, column = key."""
        import torch

        c = self.config.model
        maps = self.attention_maps(prompt, unknown=unknown).maps
        return torch.stack([torch.stack([torch.from_numpy(maps[(l, h)]) for h in range(c.n_head)])
                            for l in range(c.n_layer)])

    def attention_figure(self, prompt: str, layer: int | None = None, head: int | None = None,
                         unknown: str = "error") -> Any:
        """A matplotlib Figure of the attention heatmaps (what `minigpt attention` draws)."""
        from minigpt import viz

        result = self.attention_maps(prompt, layer, head, unknown)
        return viz.attention_figure(result.chars, result.maps, title=f"attention of {self.path}")

    def surprise(self, text: str | None = None, *, file: str | Path | None = None, stride: int | None = None,
                 unknown: str = "error", top: int = 0) -> Surprise:
        """How many bits each character of a text (or a file) costs the model, -log2 p(char | context); with `top`,
        also the `top` characters it expected at each position, most likely first (`.top[j]` goes with `.bits[j]`)."""
        from minigpt import inspection

        check_unknown(unknown)
        if (text is None) == (file is None):
            raise PromptError("pass exactly one of {--text} or {--file}")
        if file is not None:
            text = inspection.read_text_file(self.loaded, Path(file))
        return inspection.surprise(self.loaded, text, stride, unknown, top)

    def evaluate(self, text: str | None = None, *, file: str | Path | None = None, split: str | None = None,
                 stride: int | None = None, unknown: str = "error") -> Evaluation:
        """Exact bits per character of a text, a file, or the train or val split (default: val); `.bpc` is the score."""
        from minigpt import inspection

        check_unknown(unknown)
        check_one_source("pass", text=text, file=file, split=split)
        if text is not None:
            return inspection.evaluate_ids(self.loaded, inspection.encode_text(self.loaded, text, unknown), "text", stride)
        if file is not None:
            return inspection.evaluate_file(self.loaded, Path(file), stride, unknown)
        return inspection.evaluate_split(self.loaded, split or "val", stride)

    def explain(self, prompt: str, layer: int = 0, head: int = 0, unknown: str = "error") -> Explanation:
        """Head `head` of layer `layer` on the prompt, step by step (print it, or .to_dict() for every number)."""
        from minigpt import explain, inspection

        check_unknown(unknown)
        ids, _ = inspection.prompt_ids(self.loaded, prompt, unknown)
        return explain.explain(self.module, ids, self.tokenizer.chars, layer, head)

    def info(self) -> dict:
        """What the checkpoint holds, as plain data (what `minigpt info` prints)."""
        from minigpt.checkpoint import describe

        return describe(self.loaded)


class Conversation:
    """A text that you and the model write in turns, kept to the model's last block_size characters.

    Each `reply(line)` appends your line (without its newline) and streams the model's
    continuation; the continuation and a newline join the text, so the text is what the screen
    of `minigpt sample --interactive` shows. Turn n samples with seed + n."""

    def __init__(self, model: Model, seed: int, options: dict):
        self.model, self.seed, self.options = model, seed, options
        self.text = ""  # the conversation so far (its last block_size characters)
        self.turns = 0

    def reply(self, line: str) -> Iterator[str]:
        """Add `line` to the conversation and yield the model's continuation piece by piece."""
        tokenizer = self.model.tokenizer
        line = tokenizer.decode(tokenizer.encode(line, self.options["unknown"]))  # unknown characters: before any change
        prompt = (self.text + line)[-self.model.config.model.block_size:]
        pieces = []
        for piece in self.model.stream(prompt, seed=self.seed + self.turns, include_prompt=False, **self.options):
            pieces.append(piece)
            yield piece
        self.turns += 1
        self.text = (prompt + "".join(pieces) + "\n")[-self.model.config.model.block_size:]
