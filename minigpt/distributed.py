"""The process group a run belongs to: one process, or several launched by torchrun.

Data-parallel training (DDP) runs one copy of the model per process. Every step each process
takes its own slice of the global batch, computes gradients on it, and DistributedDataParallel
averages the gradients over all processes during backward(), so every copy takes the same
optimizer step and the copies stay identical. A 2-process run therefore follows a 1-process run
with the same config, up to the order in which floating-point sums are added.

Training code asks a `World` who it is (rank, world size, device) and uses it to agree with the
other processes: averaging losses, agreeing to stop. A single process is a world of size one,
where all of this is free. torchrun describes the world through environment variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `current_world` reads them and joins the
process group: NCCL between GPUs, gloo between CPU processes.

`minigpt train --nproc N` starts torchrun itself, as a child process (minigpt.launch).
"""

from __future__ import annotations

import gc
import inspect
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from minigpt import device as device_mod
from minigpt.errors import ConfigError, DeviceError

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch with `torchrun --nproc_per_node N -m minigpt train ...` or `minigpt train --nproc N ...`"


@dataclass
class World:
    """This process's place among the processes of a run."""

    rank: int = 0  # global rank of this process
    local_rank: int = 0  # rank on this machine (selects the GPU)
    size: int = 1  # number of processes
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where this process computes

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, TensorBoard and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there are several processes (and so a process group)."""
        return self.size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over all processes."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.size

    def agree(self, values: list[int], flag: bool) -> tuple[list[int], bool]:
        """Rank 0's `values` and whether `flag` is true on any process, on every process, in one all-reduce."""
        if not self.distributed:
            return values, flag
        mine = (values if self.is_main else [0] * len(values)) + [1 if flag else 0]
        total = torch.tensor(mine, dtype=torch.int64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        *agreed, flags = total.tolist()
        return agreed, flags > 0

    def any(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any of them (to stop together)."""
        if not self.distributed:
            return flag
        votes = torch.tensor(1 if flag else 0, dtype=torch.int32, device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return bool(votes.item())

    def share(self, value: int) -> int:
        """Rank 0's `value`, on every process (for decisions that rank 0 makes alone)."""
        if not self.distributed:
            return value
        shared = torch.tensor(value, dtype=torch.int64, device=self.device)
        dist.broadcast(shared, src=0)
        return int(shared.item())

    def barrier(self) -> None:
        """Wait until every process reaches this point."""
        if self.distributed and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        elif self.distributed:
            dist.barrier()

    def in_turn(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 first, then on each machine's local rank 0, then on the rest.

        For work that writes files (preparing the corpus): the first process writes them, and the
        others find them ready instead of racing to write the same files; machines without a
        shared disk still get their own copy from their local rank 0.
        """
        my_turn = 0 if self.rank == 0 else 1 if self.local_rank == 0 else 2
        result = None
        for turn in range(3):
            if turn == my_turn:
                result = work()
            if turn < 2:
                self.barrier()
        return result

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel around `model` when there are several processes."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (the causal mask) are computed from the config, identical everywhere: no need to
        # re-broadcast them at every forward. Newer torch spells this forward_sync_buffers.
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """A context in which backward() skips the gradient all-reduce (for non-final micro-steps)."""
        if skip and hasattr(model, "no_sync"):
            return model.no_sync()
        return nullcontext()

    def shutdown(self, wait_for_all: bool = False) -> None:
        """Leave the process group; after a run that finished, first wait until every process has finished too
        (a process that tears its connections down while a peer still uses them makes the peer abort)."""
        if self.distributed and dist.is_initialized():
            gc.collect()  # a DDP wrapper left in a reference cycle goes now, while the process group still exists
            if wait_for_all:
                self.barrier()
            dist.destroy_process_group()


def per_rank_batch(batch_size: int, size: int) -> int:
    """Sequences each process takes from the global batch; the batch must split evenly."""
    if batch_size % size:
        raise ConfigError(f"train.batch_size {batch_size} is the global batch and must split evenly over the {size} "
                          f"processes; use a multiple of {size} (e.g. {batch_size + size - batch_size % size}) "
                          "or another number of processes")
    return batch_size // size


def torchrun_env(environ: dict[str, str] | None = None) -> dict[str, int | str] | None:
    """torchrun's variables for this process; None if not launched by torchrun, a DeviceError if some are missing."""
    environ = os.environ if environ is None else environ
    if not any(name in environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return None
    missing = [name for name in TORCHRUN_VARS if not environ.get(name)]
    if missing:
        present = ", ".join(name for name in TORCHRUN_VARS if environ.get(name))
        raise DeviceError(f"incomplete torchrun environment: {present} set but {', '.join(missing)} missing; "
                          f"{LAUNCH_HINT}, or unset {present} to train in one process")
    found: dict[str, int | str] = {"MASTER_ADDR": environ["MASTER_ADDR"]}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        try:
            found[name] = int(environ[name])
        except ValueError:
            raise DeviceError(f"torchrun variable {name}={environ[name]!r} is not an integer; {LAUNCH_HINT}")
    if not 0 <= found["RANK"] < found["WORLD_SIZE"]:
        raise DeviceError(f"RANK {found['RANK']} is outside WORLD_SIZE {found['WORLD_SIZE']}; {LAUNCH_HINT}")
    return found


def process_device(name: str, local_rank: int) -> torch.device:
    """The device of one of several processes on a machine: cuda:LOCAL_RANK, or the CPU."""
    kind = name.split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "mps" or kind not in ("cuda", "cpu"):
        raise DeviceError(f"data-parallel training runs on cuda or cpu, not {name!r}; "
                          "set train.device to cuda, cpu or auto")
    if kind == "cpu":
        return torch.device("cpu")
    if ":" in name:
        raise DeviceError(f"train.device {name!r} names one GPU, but torchrun gives each process its own "
                          "(cuda:LOCAL_RANK); set train.device to cuda or auto, pick GPUs with CUDA_VISIBLE_DEVICES")
    check_gpus(local_rank + 1)
    return torch.device("cuda", local_rank)


def check_gpus(nproc: int) -> None:
    """Each process on a machine needs its own GPU."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc > available:
        fix = f"use --nproc {available} or fewer, or set train.device=cpu" if available else "set train.device=cpu"
        raise DeviceError(f"{nproc} processes need {nproc} GPUs (one each), but this machine has {available}; {fix}")


def current_world(device: str = "auto", batch_size: int | None = None) -> World:
    """The world of this process: a single process, or one of torchrun's, joined to its process group.

    `device` is train.device: a single process resolves it as usual; one of several uses
    cuda:LOCAL_RANK (NCCL) or the CPU (gloo). `batch_size`, if given, must split over the processes.
    """
    env = torchrun_env()
    if env is None or env["WORLD_SIZE"] == 1:
        return World(device=device_mod.resolve_device(device))
    world = World(rank=env["RANK"], local_rank=env["LOCAL_RANK"], size=env["WORLD_SIZE"],
                  device=process_device(device, env["LOCAL_RANK"]))
    if batch_size is not None:
        per_rank_batch(batch_size, world.size)
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if world.device.type == "cuda" else "gloo")
    return world
