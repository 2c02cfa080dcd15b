"""Choosing where and how to compute: device, autocast dtype, torch.compile, CPU threads.

`auto` settings resolve here, once, to concrete choices that are correct and fast on the
hardware at hand. The measurements behind the CPU choices are in docs/benchmarks.md ("What `auto` chooses").
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from minigpt.console import log
from minigpt.errors import DeviceError, first_line


def available_devices() -> list[str]:
    """The device kinds this machine can use, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an unavailable device is a DeviceError listing what is."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[0])
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}; choose one of auto, {', '.join(available)}")
    if kind not in available:
        raise DeviceError(f"device {name!r} is not available on this machine; available: {', '.join(available)} (or auto)")
    if kind == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@dataclass
class Precision:
    """The resolved numeric setup of a run."""

    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    use_scaler: bool  # float16 needs loss scaling against gradient underflow

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def autocast(self, device: torch.device):
        """A context manager running the forward pass in this precision."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX), so bf16 matmuls beat float32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """'auto': bfloat16 on CUDA where supported (else float16 with loss scaling); on CPU bfloat16 where
    the CPU has native bf16 matmuls, else float32; float32 on MPS.

    With bf16 units a training step under bf16 autocast runs about 1.5x float32; without them a
    bf16 matmul has no hardware advantage (docs/benchmarks.md). The check reads the CPU's
    features, not a timing, so a run's dtype is repeatable.
    """
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device.type == "cpu" and cpu_has_fast_bfloat16():
            name = "bfloat16"
        else:
            name = "float32"
    if name == "float16" and device.type != "cuda":
        raise DeviceError(f"train.dtype float16 needs a CUDA device (this run uses {device.type}); use bfloat16 or float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return Precision(dtype=dtype, use_scaler=dtype == torch.float16)


def resolve_fused_attention(setting: bool | str, device: torch.device, precision: Precision) -> bool:
    """'auto': the fused F.scaled_dot_product_attention, except on CPU under bfloat16 autocast.

    The fused CPU kernel is built for long sequences and is slow in bf16 at this model's size;
    in float32 it is a little faster than the explicit path, so it stays the choice there and on
    GPUs (docs/benchmarks.md).
    """
    if setting == "auto":
        return not (device.type == "cpu" and precision.dtype == torch.bfloat16)
    return bool(setting)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """'auto' compiles on CUDA only.

    On a CPU, compiling speeds a step up by about 10%, but a cold compile takes 20-30 s, which a
    few-minute CPU run does not win back (docs/benchmarks.md). So on CPU (and MPS) auto stays
    eager; set train.compile=true for long runs on a bigger CPU.
    """
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot work here (no C++ compiler for CPU kernels), or None if it can."""
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names):
            return f"no C++ compiler found ({', '.join(names)}), which torch.compile needs for CPU kernels"
    return None


def compile_model(model: torch.nn.Module, device: torch.device, backend: str | Callable = "inductor") -> torch.nn.Module:
    """torch.compile(model) that falls back to eager, saying so, when compiling cannot work or fails.

    Compilation happens lazily at the first forward pass (and again for new shapes or modes); a
    failure there is caught by CompiledModel for this model alone (torch's process-wide
    `suppress_errors` is left as it is), which then runs eager and says so on stderr.
    """
    problem = compile_problem(device)
    if problem:
        log(f"note: running eager, not compiled: {problem}; set train.compile=false to silence this")
        return model
    return CompiledModel(model, backend)


class CompiledModel(torch.nn.Module):
    """A model run through torch.compile until a compile fails; from then on the plain model runs.

    `compiled` says which is in effect. The plain module is kept as `_orig_mod`, the name
    torch.compile uses, so checkpoint.clean_state_dict unwraps both the same way.
    """

    def __init__(self, model: torch.nn.Module, backend: str | Callable = "inductor"):
        super().__init__()
        self._orig_mod = model
        self.__dict__["_compiled"] = torch.compile(model, backend=backend)  # not a submodule: no second copy of the weights
        self.compiled = True

    def forward(self, *args, **kwargs):
        if self.compiled:
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:  # raised before the model ran: safe to run eager
                self.compiled = False
                cause = getattr(exc, "inner_exception", None) or exc  # a backend's own error, e.g. a C++ compile
                log(f"note: torch.compile failed ({type(cause).__name__}: {first_line(str(cause))}); this run continues eager, "
                    "not compiled; set train.compile=false to skip the attempt")
        return self._orig_mod(*args, **kwargs)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` (possibly wrapped in DDP) runs compiled now: False after a failed compile fell back to eager."""
    model = getattr(model, "module", model)  # DDP
    return isinstance(model, CompiledModel) and model.compiled


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_elsewhere() -> int | None:
    """Threads of other processes running or ready to run right now, from /proc (None where there is no /proc).

    /proc/loadavg's fourth field counts every runnable thread on the machine, this process's
    own included; those of this process that are running (its own state R) are taken off."""
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        mine = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    mine += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - mine)


TORCH_THREADS = torch.get_num_threads()  # before any policy changed it


def choose_threads(most: int, cores: int, busy: float) -> int:
    """Threads for torch when other processes keep `busy` cores busy on average: the cores they leave free,
    at least one and at most `most` (one per physical core, or what OMP_NUM_THREADS says)."""
    return max(1, min(most, math.floor(cores - busy + 0.5)))


class ThreadPolicy:
    """How many CPU threads torch uses: train.threads if set, else the cores that other processes leave free.

    Two processes whose threads spin on the same cores slow each other down many times over
    (docs/benchmarks.md, "Sharing the cores"). So a run alone uses every core, and a run beside
    another busy process steps down, and back up when the machine is free again. `observe` takes
    a sample of the machine's load (cheap: a few small /proc files), `decide` averages the
    samples since the last decision, sets the thread count and returns it."""

    def __init__(self, threads: int = 0, most: int | None = None, cores: int | None = None,
                 sample: Callable[[], int | None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.fixed = threads
        # torch's own count (one per physical core, or OMP_NUM_THREADS), or more if the caller set more
        self.most = most or max(TORCH_THREADS, torch.get_num_threads())
        self.cores = cores or usable_cores()
        self.sample = sample  # None: busy_elsewhere
        self.clock = clock
        self.samples: list[int] = []
        self.last_sample = self.last_decision = -math.inf

    def observe(self, every_s: float = 0.0) -> None:
        """Take a sample of the load, unless one was taken less than `every_s` seconds ago."""
        now = self.clock()
        if not self.fixed and now - self.last_sample >= every_s:
            self.last_sample = now
            busy = (self.sample or busy_elsewhere)()
            if busy is not None:
                self.samples.append(busy)

    def decide_every(self, seconds: float) -> int:
        """`decide`, if at least `seconds` have passed since the last decision (and a few samples were taken)."""
        if self.clock() - self.last_decision >= seconds and len(self.samples) >= 3:
            return self.decide()
        return torch.get_num_threads()

    def decide(self) -> int:
        """Set and return the thread count for what comes next."""
        self.last_decision = self.clock()
        if self.fixed:
            threads = self.fixed
        else:
            if not self.samples:
                self.observe()
            busy = sum(self.samples) / len(self.samples) if self.samples else 0.0
            self.samples.clear()
            threads = choose_threads(self.most, self.cores, busy)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads


def set_threads(threads: int) -> int:
    """Set torch's CPU thread count now: train.threads if positive, else by the cores other processes leave free."""
    policy = ThreadPolicy(threads)
    for _ in range(3):  # a few samples: one moment's count of runnable threads is noisy
        policy.observe()
    return policy.decide()


@contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[int]:
    """On CPU, run the body on n threads; yield the count set before, and restore it afterwards.

    Cached sampling steps one position at a time on one thread: a step is dozens of tiny
    operations, and waking a second thread for each costs more than it saves. Filling the cache
    (the prompt, each rebuild) and the uncached path run whole windows, which more threads do
    faster (docs/benchmarks.md, "Sampling speed on a CPU"). Other devices are left alone."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)
