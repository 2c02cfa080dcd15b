"""`minigpt bench`: how fast training, evaluation, sampling and prepare run on this machine.

Everything is measured in one process (prepare in a child process, so that its peak memory is
its own), so the ratios between the figures are fair even when the machine's absolute speed
drifts. Training, evaluation and sampling use a small generated corpus, so no download is needed.

Training throughput is measured for two settings of the same model:

* the config's own settings (`auto` resolves to what minigpt.device chose for this device), and
* plain eager float32 with the explicit, step-by-step attention (no compile, no fused kernel).

Both are warmed up first; the time of the warm-up steps beyond the steady step time is reported
as `compile_s`. The two settings are then timed in alternating rounds and each keeps its best
round, so a burst of load from other processes does not favour one of them.

Model FLOPs utilisation (MFU), as in PaLM (Chowdhery et al., 2022, appendix B) and nanoGPT:

    FLOPs per token (training) = 6 * N + 12 * n_layer * n_embd * block_size

where N is the parameter count without position embeddings (6N: forward 2N plus backward 4N
for the matmuls with weights; the second term is the attention scores and weighted sum, which
have no parameters). MFU = FLOPs per token * tokens/s / peak, where the peak is the best
throughput of a large matmul timed by this command on the same device, in the dtype the
matmuls run in: float32 for the eager baseline, the default dtype (e.g. bfloat16) for the
default settings.

Sampling is measured with the model as `minigpt sample` loads it (fused attention for the
uncached path, the lean KV-cache path otherwise), whatever the training settings are; the
cached and uncached paths are timed in alternating rounds too.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minigpt import data, device as device_mod
from minigpt.benchprep import measure_prepare, peak_rss_mb, write_corpus
from minigpt.config import Config
from minigpt.distributed import World
from minigpt.model import GPT
from minigpt.run import Run, build_run, compile_and_wrap, rank_batch
from minigpt.decoding import generate
from minigpt.training import train_step

SAMPLE_TOKENS = 1000  # new tokens per sampling measurement
SAMPLE_BATCH = 8  # sequences in the batched sampling measurement
CORPUS_MB = 2  # size of the generated corpus the model trains on


# ----------------------------------------------------------------------------- helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak_gflops(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32,
                       repeats: int = 8) -> float:
    """The best throughput of an (n x n) @ (n x n) matmul on `device`, in GFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def train_flops_per_token(model: GPT) -> float:
    """6 N + 12 n_layer n_embd block_size (PaLM / nanoGPT), N without position embeddings."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


def derived_figures(measured: dict) -> dict:
    """The speed-ups and MFUs of a report, from its measured tokens/s, FLOPs per token and matmul peaks."""
    flops = measured["train_flops_per_token"]
    default_tps, eager_tps = measured["train_tokens_per_s"], measured["train_tokens_per_s_eager_fp32"]
    return {
        "speedup_vs_eager": default_tps / eager_tps,
        "mfu": flops * default_tps / (measured["matmul_peak_gflops_default_dtype"] * 1e9),
        "mfu_eager_fp32": flops * eager_tps / (measured["matmul_peak_gflops"] * 1e9),
        "cache_speedup": measured["sample_tokens_per_s_cached"] / measured["sample_tokens_per_s_uncached"],
    }


# ----------------------------------------------------------------------------- training

@dataclass
class Trainer:
    """One training setup: a run built by minigpt.run (model, optimizer, ...) and its timings."""

    name: str
    run: Run
    warmup_s: float = 0.0
    best_step_s: float = float("inf")

    def step(self) -> torch.Tensor:
        """One optimizer step, exactly as minigpt.training takes it; returns the loss (on the device)."""
        loss, _ = train_step(self.run)
        return loss


def make_trainer(name: str, cfg: Config, prepared: data.Prepared, device: torch.device) -> Trainer:
    """A fresh single-process run on `device`, built and compiled as minigpt.training builds it."""
    run = build_run(cfg, World(device=device), prepared)
    compile_and_wrap(run)
    return Trainer(name, run)


def warm_up(trainer: Trainer, steps: int, device: torch.device) -> None:
    """Run the first steps (where torch.compile compiles), timing them as a whole."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.step()
    loss.item()
    _sync(device)
    trainer.warmup_s = time.perf_counter() - start


def timed_round(trainer: Trainer, steps: int, device: torch.device) -> None:
    """Time `steps` steady-state steps; keep the best seconds per step seen so far."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.step()
    loss.item()  # one host sync per round, as training syncs once per log interval
    _sync(device)
    trainer.best_step_s = min(trainer.best_step_s, (time.perf_counter() - start) / steps)


def compare_training(trainers: list[Trainer], device: torch.device, warmup_steps: int, rounds: int,
                     round_seconds: float) -> None:
    """Warm every trainer up, then time them in alternating rounds of about `round_seconds` each."""
    for trainer in trainers:
        warm_up(trainer, warmup_steps, device)
    for r in range(rounds):
        for trainer in (trainers if r % 2 == 0 else trainers[::-1]):
            estimate = trainer.best_step_s if trainer.best_step_s < float("inf") else trainer.warmup_s / warmup_steps
            timed_round(trainer, max(3, int(round_seconds / max(estimate, 1e-4))), device)


# ----------------------------------------------------------------------------- eval and sampling

@torch.no_grad()
def eval_tokens_per_s(trainer: Trainer, tokens, cfg: Config, device: torch.device, batches: int = 30) -> float:
    """Forward passes with loss under no_grad, as minigpt.training.estimate_loss runs them."""
    trainer.run.step_model.eval()
    generator = torch.Generator().manual_seed(0)
    world = World()

    def run(n: int) -> None:
        for _ in range(n):
            x, y = rank_batch(tokens, cfg, generator, world, device)
            with trainer.run.precision.autocast(device):
                _, loss = trainer.run.step_model(x, y)
        loss.item()

    run(3)  # warm-up (and compile of the no-grad graph, if compiled)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run(batches // 3)
        best = min(best, (time.perf_counter() - start) / (batches // 3))
    trainer.run.step_model.train()
    return cfg.train.batch_size * cfg.model.block_size / best


def sample_seconds(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool, seed: int = 0) -> float:
    """Seconds for one generate() call writing `new_tokens` new tokens after each prompt of the batch."""
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    start = time.perf_counter()
    for _ in generate(model, prompt, new_tokens, 1.0, None, generator, use_cache=use_cache):
        pass
    _sync(prompt.device)
    return time.perf_counter() - start


def compare_sampling(model: GPT, prompt: torch.Tensor, new_tokens: int, rounds: int = 5) -> tuple[float, float]:
    """New tokens/s with and without the KV cache (model in eval mode), alternating rounds, best of each."""
    best = {True: float("inf"), False: float("inf")}
    for r in range(rounds):
        for use_cache in ((True, False) if r % 2 == 0 else (False, True)):
            best[use_cache] = min(best[use_cache], sample_seconds(model, prompt, new_tokens, use_cache, seed=r))
    return prompt.size(0) * new_tokens / best[True], prompt.size(0) * new_tokens / best[False]


# ----------------------------------------------------------------------------- prepare


# ----------------------------------------------------------------------------- the whole benchmark

def run(cfg: Config, prepare_mb: float = 64, warmup_steps: int = 10, rounds: int = 4,
        round_seconds: float = 2.0, progress: Callable[[str], None] | None = None) -> dict:
    """Measure everything on cfg.train.device and return the report (see the module docstring)."""
    say = progress or (lambda message: None)
    device = device_mod.resolve_device(cfg.train.device)
    threads = device_mod.set_threads(cfg.train.threads)  # one decision, from the load before measuring
    report: dict = {"device": str(device), "torch_version": torch.__version__, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="minigpt-bench-") as tmp:
        workdir = Path(tmp)
        corpus = write_corpus(workdir / "corpus.txt", CORPUS_MB * 1024 * 1024)
        # A copy pointed at the generated corpus: the caller's cfg is left as it was.
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(corpus),
                                                                prepared_dir=str(workdir / "prepared")))
        prepared = data.prepare(cfg.data, cfg.model.block_size)
        tokens = prepared.tokens("train")

        say("measuring the matmul peak")
        peak = matmul_peak_gflops(device)
        eager_cfg = _with_train(cfg, compile=False, dtype="float32", fused_attention=False)
        say("building and warming up the default and the eager float32 trainers (compiling, if enabled)")
        default = make_trainer("default", cfg, prepared, device)
        eager = make_trainer("eager_fp32", eager_cfg, prepared, device)
        default_run = default.run
        default_dtype = default_run.precision.dtype  # the peak MFU is taken against, for the default settings
        peak_default = peak if default_dtype == torch.float32 else matmul_peak_gflops(device, dtype=default_dtype)
        compare_training([default, eager], device, warmup_steps, rounds, round_seconds)
        train_rss = peak_rss_mb()
        flops = train_flops_per_token(default_run.model)
        default_tps = default_run.tokens_per_step / default.best_step_s
        eager_tps = eager.run.tokens_per_step / eager.best_step_s
        compile_s = max(0.0, default.warmup_s - warmup_steps * default.best_step_s) if default_run.compiled else 0.0
        report.update({
            "dtype": default_run.precision.name, "compile": default_run.compiled, "optimizer": cfg.train.optimizer,
            "fused_attention": default_run.fused_attention,
            "params": default_run.model.num_params(), "train_flops_per_token": flops,
            "matmul_peak_gflops": peak, "matmul_peak_gflops_default_dtype": peak_default,
            "train_tokens_per_s": default_tps, "train_tokens_per_s_eager_fp32": eager_tps,
            "compile_s": compile_s, "train_peak_rss_mb": train_rss,
        })

        say("measuring evaluation")
        report["eval_tokens_per_s"] = eval_tokens_per_s(default, tokens, cfg, device)

        say(f"measuring sampling ({SAMPLE_TOKENS} new tokens)")
        model = default_run.model.eval()
        model.set_fused_attention(True)  # as `minigpt sample` loads it (load_model)
        prompt = torch.tensor([prepared.tokenizer.encode("The ")], dtype=torch.long, device=device)
        cached, uncached = compare_sampling(model, prompt, SAMPLE_TOKENS)
        batch_prompt = prompt.repeat(SAMPLE_BATCH, 1)
        batch = SAMPLE_BATCH * SAMPLE_TOKENS / min(sample_seconds(model, batch_prompt, SAMPLE_TOKENS, True, seed=r)
                                                   for r in range(2))
        report.update({"sample_tokens_per_s_cached": cached, "sample_tokens_per_s_uncached": uncached,
                       "sample_batch_size": SAMPLE_BATCH, "sample_tokens_per_s_batch": batch})
        report.update(derived_figures(report))
        del default, default_run, eager, model

        say(f"measuring prepare on a generated {prepare_mb:g} MB corpus (in a child process)")
        prep = measure_prepare(prepare_mb, workdir)
        report.update({"prepare_mb": prep["mb"], "prepare_mb_per_s": prep["mb_per_s"],
                       "prepare_peak_rss_mb": prep["peak_rss_mb"], "prepare_start_rss_mb": prep["start_rss_mb"]})
    return report


def _with_train(cfg: Config, **changes) -> Config:
    """A copy of cfg with some train settings changed."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


ROWS = [  # (key, label, format)
    ("device", "device", "{}"), ("threads", "threads", "{}"), ("torch_version", "torch", "{}"),
    ("dtype", "default dtype", "{}"), ("compile", "default compile", "{}"), ("optimizer", "optimizer", "{}"),
    ("params", "parameters (no wpe)", "{:,}"), ("matmul_peak_gflops", "matmul peak fp32", "{:,.1f} GFLOP/s"),
    ("matmul_peak_gflops_default_dtype", "matmul peak, default dtype", "{:,.1f} GFLOP/s"),
    ("train_tokens_per_s", "train, default settings", "{:,.0f} tokens/s"),
    ("train_tokens_per_s_eager_fp32", "train, eager fp32 explicit attn", "{:,.0f} tokens/s"),
    ("speedup_vs_eager", "  speed-up", "{:.2f}x"),
    ("mfu", "MFU, default", "{:.1%}"), ("mfu_eager_fp32", "MFU, eager fp32", "{:.1%}"),
    ("compile_s", "compile time", "{:.1f} s"), ("train_peak_rss_mb", "train peak RSS", "{:,.0f} MB"),
    ("eval_tokens_per_s", "eval (no_grad)", "{:,.0f} tokens/s"),
    ("sample_tokens_per_s_cached", "sample, KV cache", "{:,.0f} tokens/s"),
    ("sample_tokens_per_s_uncached", "sample, no cache", "{:,.0f} tokens/s"),
    ("cache_speedup", "  speed-up", "{:.2f}x"),
    ("sample_tokens_per_s_batch", "sample, batch of 8, KV cache", "{:,.0f} tokens/s"),
    ("prepare_mb_per_s", "prepare", "{:,.1f} MB/s"), ("prepare_peak_rss_mb", "prepare peak RSS", "{:,.0f} MB"),
]


def format_table(report: dict) -> str:
    """The report as aligned 'label  value' lines."""
    width = max(len(label) for _, label, _ in ROWS)
    lines = [f"{label:<{width}}  {fmt.format(report[key])}" for key, label, fmt in ROWS if key in report]
    return "\n".join(lines)


def to_json(report: dict) -> str:
    """The report as one line of JSON, floats rounded to 4 significant digits."""
    return json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in report.items()})

