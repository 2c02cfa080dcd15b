"""What a run shows: TensorBoard event files and console progress on stderr.

TensorBoard tags are namespaced: `train/loss`, `val/loss`, `val/bpc`, `opt/lr`, `opt/grad_norm`,
`perf/tokens_per_sec`, and a `samples/text` entry at each evaluation. On resume the writer is
opened with `purge_step`, so points logged after the checkpoint by the interrupted process are
hidden and the curves continue without overlaps. stdout is never used here: it carries results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm


def log(message: str) -> None:
    """Write one line of progress information to stderr (without breaking a progress bar)."""
    tqdm.write(message, file=sys.stderr)


class Tracker:
    """TensorBoard writer plus a tqdm progress bar; a disabled tracker (non-main ranks) does nothing."""

    def __init__(self, run_dir: Path, start_step: int, total_steps: int, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: tensorboard is slow to import

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_step if start_step > 0 else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
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

    def advance(self, step: int, postfix: dict[str, str] | None = None) -> None:
        """Move the progress bar to `step`, optionally updating its loss and speed display."""
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
