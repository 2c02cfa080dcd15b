"""Choosing where and how to compute: device, autocast dtype, torch.compile, CPU threads.

`auto` settings resolve here, once, to concrete choices that are correct and fast on the
hardware at hand. The CPU choices were measured with `minigpt bench` (see README, Results).
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from minigpt.errors import DeviceError
from minigpt.tracking import log


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


def resolve_precision(name: str, device: torch.device) -> Precision:
    """'auto': bfloat16 on CUDA where supported (else float16 with loss scaling); float32 on CPU and MPS.

    Measured on a 2-core AVX-512 CPU without AMX (configs/baby_cpu.yaml, one process, alternating
    rounds): bf16 autocast eager ran 0.94x the speed of fp32 eager with the same fused attention,
    and compiled bf16 0.84x compiled fp32 (bf16 matmul peaks lower there: about 165 vs 280
    GFLOP/s). So auto keeps float32 on CPU; set train.dtype=bfloat16 to try it on AMX CPUs.
    """
    if name == "auto":
        if device.type == "cuda":
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            name = "float32"
    if name == "float16" and device.type != "cuda":
        raise DeviceError(f"train.dtype float16 needs a CUDA device (this run uses {device.type}); use bfloat16 or float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return Precision(dtype=dtype, use_scaler=dtype == torch.float16)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """'auto' compiles on CUDA only.

    Measured on an idle 2-core AVX-512 CPU with `minigpt bench --config configs/baby_cpu.yaml`
    (one process, best of alternating rounds): compiled fp32 ran 0.92x the tokens/s of eager fp32
    with the explicit attention (18,520 vs 20,100), while eager with the fused attention ran about
    1.2x; compiling also costs about 29 s on a cold cache. For configs/shakespeare_char_cpu.yaml
    the whole 5-minute run took 5:11 compiled against 5:01 eager. So on CPU (and MPS) auto stays
    eager; set train.compile=true to try it on a bigger CPU or model.
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


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile(model), or the model itself (with a note on stderr) when compiling cannot work.

    Compilation happens lazily at the first forward pass; a failure there also falls back to
    eager execution (torch._dynamo's suppress_errors) instead of stopping the run.
    """
    problem = compile_problem(device)
    if problem:
        log(f"note: running eager, not compiled: {problem}; set train.compile=false to silence this")
        return model
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)


def set_threads(threads: int) -> int:
    """Set torch's CPU thread count (0 keeps torch's default of one per physical core); return it."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
