"""What a run shows: TensorBoard event files and console progress on stderr.

TensorBoard tags are namespaced: `train/loss`, `val/loss`, `val/bpc`, `opt/lr`, `opt/grad_norm`,
`perf/tokens_per_sec`, a `samples/text` entry and an `attention/probe` image at each evaluation,
optional `weights/...` and `grads/...` histograms, and the hyperparameters with the final
metrics (`hparams/best_val_loss`, `hparams/best_val_bpc`) at the end. Every run opens the writer
with `purge_step` = its first step, so points an earlier process logged from there on (after
the checkpoint a run resumes from, or before a killed run's first checkpoint) are hidden and the
curves continue without overlaps. stdout is never used here: it carries results.

Console progress is a redrawn tqdm bar when stderr is a terminal. When it is not (a log file,
nohup, systemd, CI) it is `PlainProgress`: a plain line about every 10% of the work or every
30 seconds, whichever comes first, with no carriage returns, so the log reads top to bottom.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    import numpy as np
    import torch


def log(message: str) -> None:
    """Write one line of progress information to stderr (without breaking a progress bar)."""
    tqdm.write(message, file=sys.stderr)


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal or a Jupyter notebook (where a redrawn progress bar belongs)."""
    if "ipykernel" in sys.modules:  # a notebook draws tqdm's bar (or widget) as one line that updates
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress as plain lines, about every 10% of `total` or every `every_s` seconds: no carriage returns.

    Each line reads `LABEL N/M (P%), <extra values>, elapsed H:MM:SS, ETA H:MM:SS`, the rate
    measured over this process's own progress. `clock` is injectable so tests need not wait.
    """

    def __init__(self, total: int, initial: int = 0, label: str = "step", amount: Callable[[int], str] = str,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic, every_s: float = 30.0):
        self.total, self.initial, self.label, self.amount = total, initial, label, amount
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.every_s = clock, every_s
        self.started = self.last_time = clock()
        self.last_n = initial
        self.extra: dict[str, str] = {}

    def _decile(self, n: int) -> int:
        return 10 * n // self.total if self.total > 0 else 0

    def update(self, n: int, extra: dict[str, str] | None = None) -> None:
        """Record progress `n` (and the latest extra values); write a line when one is due."""
        self.extra.update(extra or {})
        now = self.clock()
        finished = self.total > 0 and n >= self.total > self.last_n
        if finished or self._decile(n) > self._decile(self.last_n) or (n > self.last_n and now - self.last_time >= self.every_s):
            self.write(n, now)

    def write(self, n: int, now: float) -> None:
        """Write one progress line for `n` at time `now`."""
        elapsed = now - self.started
        rate = (n - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - n) / rate) if rate > 0 else "?"
        percent = f" ({100 * n // self.total}%)" if self.total > 0 else ""
        parts = [f"{self.label} {self.amount(n)}/{self.amount(self.total)}{percent}"]
        parts += [f"{key} {value}" for key, value in self.extra.items()]
        parts += [f"elapsed {duration(elapsed)}", f"ETA {eta}"]
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.last_n, self.last_time = n, now


@contextmanager
def byte_progress(label: str, plain: bool | None = None, clock: Callable[[], float] = time.monotonic
                  ) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done_bytes, total_bytes)` callback: a tqdm bar on a terminal, plain lines otherwise."""
    if plain is None:
        plain = not stderr_is_terminal()
    if plain:
        lines = PlainProgress(0, label=label, amount=lambda n: f"{n / 1e6:.1f} MB", clock=clock)

        def plain_update(done: int, total: int) -> None:
            lines.total = total
            lines.update(done)

        yield plain_update
        return
    with tqdm(total=0, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False, delay=0.5) as bar:
        def bar_update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield bar_update


def progress_bar_class() -> type[tqdm]:
    """tqdm's auto mode: a widget in a Jupyter notebook that has ipywidgets, else the text bar (which a
    notebook also draws as one clean line, since it honours carriage returns)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when a notebook lacks ipywidgets; the text bar is fine
        from tqdm.auto import tqdm as auto_tqdm
    return auto_tqdm


class Tracker:
    """TensorBoard writer plus console progress; a disabled tracker (non-main ranks) does nothing.

    The progress is a tqdm bar on a terminal and `PlainProgress` lines otherwise (`plain=None`
    decides by whether stderr is a terminal).
    """

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, enabled: bool = True,
                 progress: bool = True, plain: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.lines: PlainProgress | None = None
        self._said_no_matplotlib = False
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

        # purge_step hides points an earlier process logged after start_step: an interrupted run's
        # steps beyond its checkpoint, or (start_step 0) a run that was killed before its first
        # checkpoint or is being overwritten.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step + 1)
        if plain is None:
            plain = not stderr_is_terminal()
        if progress and plain:
            self.lines = PlainProgress(total_steps, initial=start_step, clock=clock)
            return
        self.bar = progress_bar_class()(total=total_steps, initial=start_step, desc="train", unit="step",
                        file=sys.stderr, dynamic_ncols=True, disable=not progress, mininterval=0.5)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log several scalars at one step."""
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        """Log a text entry (shown in TensorBoard's Text tab, in a code block to keep line breaks)."""
        if self.writer:
            self.writer.add_text(tag, "```\n" + text + "\n```", step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Log an RGB image array (H, W, 3) of uint8 (shown in TensorBoard's Images tab)."""
        if self.writer:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def histograms(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Log a histogram of each tensor's values (shown in TensorBoard's Histograms tab)."""
        if self.writer:
            for tag, tensor in tensors.items():
                self.writer.add_histogram(tag, tensor.detach().float().cpu(), step)

    def attention(self, step: int, tag: str, model: torch.nn.Module, ids: list[int], chars: list[str]) -> None:
        """Log a probe text's attention maps (every layer and head) as one image; skipped without matplotlib."""
        if not self.writer:
            return
        from minigpt import viz
        from minigpt.evaluate import attention_of

        if not viz.has_matplotlib():
            if not self._said_no_matplotlib:
                log("attention images skipped: pip install 'minigpt[plot]' (matplotlib) to log them")
                self._said_no_matplotlib = True
            return
        figure = viz.attention_figure(chars, attention_of(model, ids), title=f"attention at step {step}",
                                      label_all=False)
        self.image(step, tag, viz.figure_to_array(figure))

    def hparams(self, step: int, hparams: dict, metrics: dict[str, float]) -> None:
        """Log the run's hyperparameters with its final metrics into this run's directory (HParams tab)."""
        if self.writer:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # SummaryWriter.add_hparams would write into a new timestamped subdirectory; write here instead.
            for summary in hparams_summary(hparams, metrics):
                self.writer.file_writer.add_summary(summary, step)
            self.scalars(step, metrics)

    def advance(self, step: int, postfix: dict[str, str] | None = None) -> None:
        """Move the progress bar to `step`, optionally updating its loss and speed display."""
        if self.lines is not None and (postfix or step >= self.lines.total):  # a line is due at a step with fresh values
            self.lines.update(step, postfix)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.close()


def flat_hparams(config: dict) -> dict[str, bool | int | float | str]:
    """A config dict as dotted keys with TensorBoard-friendly values (lists become strings)."""
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
        else:
            flat[section] = values if isinstance(values, (bool, int, float, str)) else str(values)
    return flat


PROBE_CHARS = 48  # characters of validation text whose attention is drawn at each evaluation


def log_inspection(tracker: Tracker, model: torch.nn.Module, tokens: dict, tokenizer, cfg, step: int) -> None:
    """At an evaluation: the attention image of a fixed probe text and, if train.histograms, histograms."""
    from minigpt import data
    from minigpt.evaluate import weights_and_grads

    if not tracker.enabled:
        return
    block_size = cfg.model.block_size
    probe = [int(i) for i in tokens["val"][:min(block_size, PROBE_CHARS)]]  # the start of the validation text
    tracker.attention(step, "attention/probe", model, probe, list(tokenizer.decode(probe)))
    if cfg.train.histograms:
        import torch

        generator = torch.Generator().manual_seed(cfg.train.seed + 3)  # the same training batch every time
        offsets = data.sample_offsets(len(tokens["train"]), block_size, cfg.train.batch_size, generator)
        x, y = data.get_batch(tokens["train"], offsets, block_size)
        device = next(model.parameters()).device
        tracker.histograms(step, weights_and_grads(model, x.to(device), y.to(device)))
