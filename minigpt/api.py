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
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union

from minigpt import config as config_mod
from minigpt.config import Config, Overrides
from minigpt.errors import ConfigError, PromptError

if TYPE_CHECKING:
    import torch

    from minigpt.evaluate import Attention, Evaluation, Surprise
    from minigpt.explain import Explanation
    from minigpt.model import GPT
    from minigpt.sample import LoadedModel
    from minigpt.tokenizer import CharTokenizer
    from minigpt.train import TrainResult

# Sampling defaults, shared by Model.generate and `minigpt sample`.
PROMPT = "\n"  # text to continue; an empty prompt also starts from a newline
MAX_NEW_TOKENS = 500  # characters to generate
TEMPERATURE = 0.8  # 0 is greedy; 1 samples the model's distribution as it is
SEED = 1337  # the same seed gives the same text
UNKNOWN = ("error", "skip", "replace")  # what to do with characters outside the vocabulary

ConfigLike = Union[str, Path, Mapping[str, Any], Config]
Stops = Union[str, Sequence[str], None]


# ----------------------------------------------------------------------------- training

def resolve_config(config: ConfigLike, overrides: Overrides | None = None, data: str | Path | Sequence | None = None,
                   device: str | None = None, out_dir: str | Path | None = None) -> Config:
    """A validated Config from a YAML path, a dict (the YAML's sections) or a Config, with overrides applied.

    `overrides` are `--set` strings (["train.max_iters=100"]) or a mapping ({"train.max_iters": 100});
    `data`, `device` and `out_dir` set data.path, train.device and train.out_dir. Everything goes
    through the same validator as a config file, and every problem is reported at once."""
    extra: dict[str, Any] = {}
    if data is not None:
        extra["data.path"] = [str(p) for p in data] if isinstance(data, (list, tuple)) else str(data)
    if device is not None:
        extra["train.device"] = device
    if out_dir is not None:
        extra["train.out_dir"] = str(out_dir)
    if isinstance(config, (str, Path)):
        raw, source, name = config_mod.read_yaml(Path(config)), str(config), Path(config).stem
    elif isinstance(config, Config):
        raw, source, name = config_mod.to_dict(config), f"config {config.name!r}", config.name
    elif isinstance(config, Mapping):
        raw, source, name = dict(config), "config dict", "run"
    else:
        raise ConfigError(f"config must be a YAML file path, a dict or a minigpt Config, got {type(config).__name__}")
    raw = config_mod.apply_overrides(config_mod.apply_overrides(raw, overrides or []), extra)
    shown = [config_mod.describe_overrides(o) for o in (overrides, extra) if o]
    if shown:
        source += " with --set " + ", ".join(shown)
    return config_mod.from_dict(raw, source=source, name=name)


def train(config: ConfigLike, overrides: Overrides | None = None, data: str | Path | Sequence | None = None, *,
          out_dir: str | Path | None = None, device: str | None = None, resume: bool | str | Path = False,
          overwrite: bool = False, progress: bool = True, resume_hint: str | None = None,
          init_from: str | Path | None = None) -> TrainResult:
    """Train in this process, as `minigpt train` does; return the run directory, best val loss and history.

    `config`, `overrides`, `data`, `device` and `out_dir` are as in `resolve_config`. `resume=True`
    continues the run directory's last.pt, a path continues that checkpoint. `init_from` (a run
    directory or checkpoint) fine-tunes: a new run starts from that model's weights. The progress bar goes
    to stderr (a widget in Jupyter when ipywidgets is installed). A first Ctrl-C, or the stop
    button of a notebook, ends the current step, saves last.pt and raises `Interrupted`.
    Several processes (torchrun) are the CLI's `--nproc`."""
    from minigpt.train import train as run_training

    cfg = resolve_config(config, overrides, data, device, out_dir)
    hint = resume_hint or "the same minigpt.train(...) call with resume=True"
    return run_training(cfg, resume=str(resume) if isinstance(resume, (str, Path)) else resume,
                        overwrite=overwrite, progress=progress, resume_hint=hint,
                        init_from=str(init_from) if init_from else None)


# ----------------------------------------------------------------------------- a trained model

def load(path: str | Path, device: str = "auto") -> Model:
    """A trained model from a checkpoint file or a run directory (its best.pt), in eval mode on `device`."""
    from minigpt.device import resolve_device
    from minigpt.sample import load_model

    return Model(load_model(str(path), resolve_device(device)))


def check_unknown(unknown: str) -> None:
    """Refuse an unknown-character policy other than error, skip or replace."""
    if unknown not in UNKNOWN:
        raise PromptError(f"--unknown must be error, skip or replace, got {unknown!r}")


def check_one_source(what: str, **given: Any) -> None:
    """Refuse more than one of the named text sources (text, file, split)."""
    passed = [name for name, value in given.items() if value is not None]
    if len(passed) > 1:
        raise PromptError(f"{what} one of {', '.join('--' + n for n in given)} at a time, not {' and '.join(passed)}")


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
        from minigpt import sample

        check_unknown(unknown)
        with closing(sample.stream(self.loaded, prompt, max_new_tokens, temperature, top_k, 1, seed, unknown,
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
        from minigpt import sample

        check_unknown(unknown)
        return sample.sample(self.loaded, prompt, max_new_tokens, temperature, top_k, num_samples, seed, unknown,
                             use_cache, top_p=top_p, stop=stop_list(stop))

    def conversation(self, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
                     top_k: int | None = None, top_p: float | None = None, stop: Stops = None, seed: int = SEED, *,
                     unknown: str = "error", use_cache: bool = True) -> Conversation:
        """A conversation: you write a line, the model continues it (`minigpt sample --interactive`)."""
        from minigpt.sample import check_options

        check_unknown(unknown)
        check_options(max_new_tokens, temperature, top_k, 1, top_p, stop_list(stop))
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop=stop, unknown=unknown, use_cache=use_cache)
        return Conversation(self, seed, options)

    def attention_maps(self, prompt: str, layer: int | None = None, head: int | None = None,
                       unknown: str = "error") -> Attention:
        """Per (layer, head), the (T, T) attention weights of the prompt's last block_size characters, with those characters."""
        from minigpt import evaluate

        check_unknown(unknown)
        return evaluate.attention(self.loaded, prompt, layer, head, unknown)

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
                 unknown: str = "error") -> Surprise:
        """How many bits each character of a text (or a file) costs the model, -log2 p(char | context)."""
        from minigpt import evaluate

        check_unknown(unknown)
        if (text is None) == (file is None):
            raise PromptError("pass exactly one of --text TEXT or --file FILE")
        if file is not None:
            text = evaluate.read_text_file(self.loaded, Path(file))
        return evaluate.surprise(self.loaded, text, stride, unknown)

    def evaluate(self, text: str | None = None, *, file: str | Path | None = None, split: str | None = None,
                 stride: int | None = None, unknown: str = "error") -> Evaluation:
        """Exact bits per character of a text, a file, or the train or val split (default: val); `.bpc` is the score."""
        from minigpt import evaluate

        check_unknown(unknown)
        check_one_source("pass", text=text, file=file, split=split)
        if text is not None:
            return evaluate.evaluate_ids(self.loaded, evaluate.encode_text(self.loaded, text, unknown), "text", stride)
        if file is not None:
            return evaluate.evaluate_file(self.loaded, Path(file), stride, unknown)
        return evaluate.evaluate_split(self.loaded, split or "val", stride)

    def explain(self, prompt: str, layer: int = 0, head: int = 0, unknown: str = "error") -> Explanation:
        """Head `head` of layer `layer` on the prompt, step by step (print it, or .to_dict() for every number)."""
        from minigpt import evaluate, explain

        check_unknown(unknown)
        ids, _ = evaluate.prompt_ids(self.loaded, prompt, unknown)
        return explain.explain(self.module, ids, self.tokenizer.chars, layer, head)

    def info(self) -> dict:
        """What the checkpoint holds, as plain data (what `minigpt info` prints)."""
        from minigpt import evaluate

        return evaluate.describe(self.loaded)


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
