"""The process group a run belongs to: one process, or several launched by torchrun.

Training code asks a `World` who it is (rank, world size) and uses it to agree with the other
processes (averaging losses, agreeing to stop). A single process is a world of size one, where
all of this is free.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass
class World:
    """This process's place among the processes of a run."""

    rank: int = 0  # global rank of this process
    local_rank: int = 0  # rank on this machine (selects the GPU)
    size: int = 1  # number of processes

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, TensorBoard and progress."""
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over all processes."""
        return value

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them (to stop together)."""
        return flag

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel around `model` when there are several processes."""
        return model

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """A context in which backward() skips the gradient all-reduce (for non-final micro-steps)."""
        return nullcontext()

    def shutdown(self) -> None:
        """Leave the process group."""


def current_world() -> World:
    """The world of this process (a single process unless launched by torchrun)."""
    return World()
