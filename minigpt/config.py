"""Typed run configuration: one dataclass per YAML section, strictly validated.

A run is described completely by one YAML file with the sections `model`, `data` and `train`.
The dataclasses below are the single source of every default. Loading is strict: an unknown
key, a wrong type or an impossible value is reported (all of them together) with the file, the
dotted key and, for typos, the closest valid key. Command-line overrides (`--set
train.learning_rate=3e-4`) go through the same validator.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from minigpt.errors import ConfigError
from minigpt.typed import fill_section, suggest
from minigpt.overrides import Overrides, apply_overrides, describe_overrides


@dataclass
class ModelConfig:
    """Shape of the GPT. Changing any of these makes a different network (resume refuses it)."""

    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream (channels, C)
    block_size: int = 64  # context length in characters (T at most)
    dropout: float = 0.0  # dropout probability on embeddings, attention weights and residuals
    bias: bool = True  # biases in Linear layers and LayerNorms
    # learned: a position embedding wpe added to the input (GPT-2); rope: no wpe, each query and key
    # turned by angles that grow with its position (rotary position embedding, RoPE)
    position: Literal["learned", "rope"] = "learned"


@dataclass
class DataConfig:
    """Where the text comes from and how it is split."""

    path: Union[str, list[str]] = ""  # file, directory, glob, or list of them; "" = Tiny Shakespeare
    val_fraction: float = 0.1  # fraction of the corpus (its tail) held out for validation
    encoding: str = "utf-8"  # text encoding of the corpus
    errors: Literal["strict", "replace", "ignore"] = "strict"  # what to do with undecodable bytes
    prepared_dir: str = "data/prepared"  # where token arrays and vocabulary are written


@dataclass
class TrainConfig:
    """The optimisation loop, evaluation, and where the run is written."""

    seed: int = 1337  # seeds weights, batches and dropout: same config, same losses (on CPU)
    batch_size: int = 12  # sequences per micro-step (global, over all processes)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    max_iters: int = 2000  # optimizer steps in the whole run (derived from time_budget when that is set)
    time_budget: Union[float, str] = 0  # wall-clock for the whole `minigpt train`: seconds or 90s, 5m, 1h; 0 = off
    learning_rate: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # steps of linear warmup from 0 to learning_rate
    lr_decay_iters: int = 0  # step at which the decay reaches min_lr; 0 = max_iters
    # after warmup: cosine decay, or warmup-stable-decay; auto: wsd with a time budget, else cosine
    lr_schedule: Literal["auto", "cosine", "wsd"] = "auto"
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps, decaying linearly to min_lr
    # wsd: the decay as [start, end] steps, decided while a budgeted run goes ([] = the last decay_fraction);
    # a later pair that starts inside the one before continues the decay from there to its new end
    decay_plan: list[list[int]] = field(default_factory=list)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' weight matrices, AdamW for the rest
    weight_decay: float = 0.1  # decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps
    eval_iters: int = 20  # batches per split averaged at each evaluation
    patience: int = 0  # stop after this many evaluations in a row without a new best val loss (best.pt keeps it); 0 = never
    log_interval: int = 10  # steps between TensorBoard scalar writes
    sample_chars: int = 200  # characters of text sample logged at each evaluation (0 = none)
    device: str = "auto"  # where to train: auto, cpu, cuda, cuda:N (one GPU) or mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; auto: bf16 (fp16) on CUDA, bf16 on CPUs with bf16 units
    compile: Union[bool, Literal["auto"]] = "auto"  # torch.compile; auto: CUDA only (slower on CPU)
    fused_attention: Union[bool, Literal["auto"]] = "auto"  # F.scaled_dot_product_attention; auto: not for CPU bf16
    histograms: bool = False  # log weight and gradient histograms to TensorBoard at each evaluation
    threads: int = 0  # CPU threads for torch; 0 = one per physical core
    out_dir: str = ""  # run directory; "" = runs/<config file name>


@dataclass
class Config:
    """A whole run: the three sections plus the name the run directory is derived from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"  # run name, by default the config file's stem
    auto: list[str] = field(default_factory=list)  # dotted keys left to the sizing rule (`auto` in the YAML)
    sized: dict = field(default_factory=dict)  # once chosen: {"keys": [...], "reason": "..."}; the values are in the sections

    def is_auto(self, dotted: str) -> bool:
        """Whether the sizing rule (minigpt.sizing) still has to choose this key's value."""
        return dotted in self.auto

    def run_dir(self) -> Path:
        """The directory this run writes its config, checkpoints and event files to."""
        return Path(self.train.out_dir) if self.train.out_dir else Path("runs") / self.name


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

# The keys a config may leave to the sizing rule with the value `auto` (`model: auto` means the
# model's five): the rule picks them from the time budget, the corpus and the machine (minigpt.sizing).
AUTO_MODEL_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout")
AUTO_KEYS = (*AUTO_MODEL_KEYS, "train.batch_size", "train.learning_rate", "train.weight_decay", "train.eval_interval",
             "train.patience")


def expand_auto(raw: dict) -> dict:
    """`model: auto` written out as the model's auto keys, so that an override of one of them replaces just that one."""
    if raw.get("model") == "auto":
        raw = {**raw, "model": {key.split(".")[1]: "auto" for key in AUTO_MODEL_KEYS}}
    return raw


def take_auto(raw: dict, problems: list[str]) -> tuple[dict, list[str]]:
    """The raw mapping without its `auto` values, and the dotted keys that had them (in AUTO_KEYS order)."""
    raw = expand_auto(raw)
    listed = raw.get("auto") or []
    if not isinstance(listed, list) or any(key not in AUTO_KEYS for key in listed):
        problems.append(f"auto must be a list of keys among {', '.join(AUTO_KEYS)}, got {listed!r}")
        listed = []
    found = set(listed)
    cleaned = {}
    for section, body in raw.items():
        if section in SECTIONS and isinstance(body, dict):
            for key, value in body.items():
                if value == "auto" and f"{section}.{key}" in AUTO_KEYS:
                    found.add(f"{section}.{key}")
            body = {k: v for k, v in body.items() if not (v == "auto" and f"{section}.{k}" in AUTO_KEYS)}
        elif section in SECTIONS and body == "auto":
            problems.append(f"{section}: only the model section can be auto as a whole; "
                            f"write auto for single keys among {', '.join(AUTO_KEYS)}")
            body = None
        cleaned[section] = body
    cleaned.pop("auto", None)
    return cleaned, [key for key in AUTO_KEYS if key in found]


def _check_rules(cfg: Config, problems: list[str]) -> None:
    """Cross-field and range rules, checked once at load."""
    m, d, t = cfg.model, cfg.data, cfg.train
    for key, value in [("model.n_layer", m.n_layer), ("model.n_head", m.n_head),
                       ("model.n_embd", m.n_embd), ("model.block_size", m.block_size),
                       ("train.batch_size", t.batch_size), ("train.max_iters", t.max_iters),
                       ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                       ("train.eval_interval", t.eval_interval), ("train.eval_iters", t.eval_iters),
                       ("train.log_interval", t.log_interval)]:
        if value <= 0:
            problems.append(f"{key} must be positive, got {value}")
    for key, value in [("train.warmup_iters", t.warmup_iters), ("train.lr_decay_iters", t.lr_decay_iters),
                       ("train.sample_chars", t.sample_chars), ("train.threads", t.threads),
                       ("train.weight_decay", t.weight_decay), ("train.grad_clip", t.grad_clip),
                       ("train.min_lr", t.min_lr), ("train.patience", t.patience)]:
        if value < 0:
            problems.append(f"{key} must not be negative, got {value}")
    heads_fixed = not any(cfg.is_auto(k) for k in ("model.n_head", "model.n_embd"))  # auto picks heads that divide
    if heads_fixed and m.n_head > 0 and m.n_embd % m.n_head != 0:
        problems.append(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    elif heads_fixed and m.position == "rope" and m.n_head > 0 and (m.n_embd // m.n_head) % 2:
        problems.append(f"model.position rope turns pairs of channels, so the head size model.n_embd / model.n_head "
                        f"({m.n_embd // m.n_head}) must be even")
    if not 0.0 <= m.dropout < 1.0:
        problems.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 < d.val_fraction < 1.0:
        problems.append(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    for key, value in [("train.beta1", t.beta1), ("train.beta2", t.beta2)]:
        if not 0.0 <= value < 1.0:
            problems.append(f"{key} must be in [0, 1), got {value}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device):
        problems.append(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    if t.learning_rate <= 0:
        problems.append(f"train.learning_rate must be positive, got {t.learning_rate}")
    if t.min_lr > t.learning_rate and not cfg.is_auto("train.learning_rate"):
        problems.append(f"train.min_lr ({t.min_lr}) must not exceed train.learning_rate ({t.learning_rate})")
    try:
        budget = duration_seconds(t.time_budget)
    except ValueError:
        budget = 0.0
        problems.append(f"train.time_budget must be seconds or a duration such as 90s, 5m or 1h, got {t.time_budget!r}")
    if not 0.0 < t.decay_fraction <= 1.0:
        problems.append(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    if t.warmup_iters > t.max_iters and not budget:  # with a budget, max_iters is derived later
        problems.append(f"train.warmup_iters ({t.warmup_iters}) must not exceed train.max_iters ({t.max_iters})")
    if t.lr_schedule == "auto":
        t.lr_schedule = "wsd" if budget else "cosine"
    if budget and t.lr_schedule == "cosine":
        problems.append("train.time_budget follows a deadline, which a cosine decay over a step count fixed in advance "
                        "cannot; use train.lr_schedule wsd (or auto) with a time budget")
    if budget and t.lr_decay_iters:
        problems.append("train.lr_decay_iters fixes where the decay ends, which a time budget decides; leave it at 0")
    problems.extend(_decay_plan_problems(t.decay_plan))
    try:
        "".encode(d.encoding)
    except LookupError:
        problems.append(f"data.encoding: unknown text encoding {d.encoding!r} (try utf-8)")


def _decay_plan_problems(plan: list[list[int]]) -> list[str]:
    """train.decay_plan must be [start, end] pairs, each starting inside the one before."""
    for i, pair in enumerate(plan):
        if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
            return [f"train.decay_plan holds [start, end] steps with start < end, got {pair}"]
        if i and not plan[i - 1][0] <= pair[0] <= plan[i - 1][1]:
            return [f"train.decay_plan: {pair} must start inside the decay before it, {plan[i - 1]}"]
    return []


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def duration_seconds(value: float | str) -> float:
    """Seconds in a duration given as a number of seconds or as text: '90', '90s', '5m', '1.5h'; ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        unit = DURATION_UNITS.get(text[-1])
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"a duration must be zero or positive: {value!r}")
    return seconds


def duration_text(value: float | str) -> str:
    """A duration as the user wrote it: text as given ('5m'), a number of seconds with its unit (5.0 -> '5s')."""
    if isinstance(value, str) and value.strip()[-1:].lower() in DURATION_UNITS:
        return value.strip()
    return f"{duration_seconds(value):g}s"


def from_dict(raw: Any, source: str = "<config>", name: str = "run") -> Config:
    """Validate a plain mapping (as read from YAML) into a Config; raise ConfigError listing every problem."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    raw, auto = take_auto(raw, problems)
    sized = raw.pop("sized", None) or {}
    if not isinstance(sized, dict):
        problems.append(f"sized is the record of what auto chose (a mapping), got {sized!r}")
        sized = {}
    sections = {}
    for key in raw:
        if key not in SECTIONS and key != "name":
            problems.append(f"unknown section {key!r}" + suggest(str(key), list(SECTIONS), ""))
    for section, cls in SECTIONS.items():
        sections[section] = fill_section(cls, raw.get(section), section, problems)
    if "name" in raw:
        if isinstance(raw["name"], str) and raw["name"]:
            name = raw["name"]
        else:
            problems.append(f"name must be a non-empty string, got {raw['name']!r}")
    cfg = Config(name=name, auto=auto, sized=sized, **sections)
    _check_rules(cfg, problems)  # fields with a wrong type kept their defaults, so this is safe
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise ConfigError(f"{source}: {count}: " + "; ".join(problems))
    return cfg


def read_yaml(path: Path) -> dict:
    """Read a config file, turning every way it can fail into a ConfigError naming the path."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, e.g. configs/tiny.yaml")
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory; pass a YAML file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model, data, train; got {type(raw).__name__}")
    return raw


ConfigLike = Union[str, Path, Mapping[str, Any], Config]  # a YAML file, its sections as a dict, or a Config


def load(config: ConfigLike, overrides: Overrides | None = None, data: str | Path | Sequence | None = None,
         device: str | None = None, out_dir: str | Path | None = None) -> Config:
    """A validated Config from a YAML path (its stem names the run), a dict of sections or a Config, overridden.

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
        raw, source, name = read_yaml(Path(config)), str(config), Path(config).stem
    elif isinstance(config, Config):
        raw, source, name = to_dict(config), f"config {config.name!r}", config.name
    elif isinstance(config, Mapping):
        raw, source, name = dict(config), "config dict", "run"
    else:
        raise ConfigError(f"config must be a YAML file path, a dict or a minigpt Config, got {type(config).__name__}")
    raw = apply_overrides(apply_overrides(expand_auto(raw), overrides or []), extra)
    shown = [describe_overrides(o) for o in (overrides, extra) if o]
    if shown:  # a typo may be in the file or in an override
        source += " with --set " + ", ".join(shown)
    return from_dict(raw, source=source, name=name)


def to_dict(cfg: Config) -> dict:
    """The config as plain data (for YAML, checkpoints and TensorBoard)."""
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML text, in section order."""
    plain = {key: value for key, value in to_dict(cfg).items() if value or key not in ("auto", "sized")}
    return yaml.safe_dump(plain, sort_keys=False, width=100)
