"""What a run shows: TensorBoard event files and its progress bar.

TensorBoard tags are namespaced: `train/loss`, `val/loss`, `val/bpc`, `opt/lr`, `opt/grad_norm`,
`perf/tokens_per_sec`, a `samples/text` entry and an `attention/probe` image at each evaluation,
optional `weights/...` and `grads/...` histograms, and the hyperparameters with the final
metrics (`hparams/best_val_loss`, `hparams/best_val_bpc`) at the end. Every run opens the writer
with `purge_step` = its first step, so points an earlier process logged from there on (after
the checkpoint a run resumes from, or before a killed run's first checkpoint) are hidden and the
curves continue without overlaps. The progress bar (or plain progress lines in a log) is
minigpt.console's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from minigpt import viz
from minigpt.console import PlainProgress, log, progress_bar_class, stderr_is_terminal

if TYPE_CHECKING:
    import numpy as np
    import torch


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

    def attention(self, step: int, tag: str, chars: list[str], maps: dict[tuple[int, int], np.ndarray],
                  frames: viz.AttentionFrames | None = None) -> None:
        """Log attention maps ((layer, head) -> (T, T)) of a probe text as one image; skipped without matplotlib.

        `frames` keeps the figure between evaluations of the same probe, so that each later image is quick."""
        if not self.writer:
            return
        if not viz.has_matplotlib():
            if not self._said_no_matplotlib:
                log("attention images skipped: pip install 'minigpt[plot]' (matplotlib) to log them")
                self._said_no_matplotlib = True
            return
        self.image(step, tag, (frames or viz.AttentionFrames()).image(chars, maps, f"attention at step {step}"))

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

    def retotal(self, total: int) -> None:
        """The run's step count changed (a time budget's plan follows the machine): show progress against it."""
        if self.lines is not None:
            self.lines.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

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


