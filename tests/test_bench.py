"""Bench helpers and the compile fallback (the full benchmark is too slow for the unit suite)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from minigpt import bench, device as device_mod
from minigpt.config import ModelConfig
from minigpt.errors import DeviceError
from minigpt.model import GPT


def test_compile_without_a_compiler_falls_back_to_eager(monkeypatch, capsys):
    monkeypatch.setattr(device_mod.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model = torch.nn.Linear(2, 2)
    assert device_mod.compile_model(model, torch.device("cpu")) is model
    assert "no C++ compiler" in capsys.readouterr().err


def test_failed_compile_runs_eager_and_says_so(monkeypatch, capsys):
    """A compile that fails at the first forward falls back to the plain model for this model only: the output is
    eager's, stderr says so, is_compiled() turns False, and torch's process-wide suppress_errors is untouched."""
    monkeypatch.setattr(device_mod, "compile_problem", lambda device: None)  # get past the compiler check
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), 10)
    x = torch.randint(10, (2, 8))

    def failing_backend(graph, example_inputs):
        raise RuntimeError("C++ compile error: cannot find cl.exe")

    suppress = torch._dynamo.config.suppress_errors
    compiled = device_mod.compile_model(model, torch.device("cpu"), backend=failing_backend)
    assert device_mod.is_compiled(compiled)  # until it is tried
    logits, loss = compiled(x, x)
    torch.testing.assert_close(logits, model(x, x)[0])
    err = capsys.readouterr().err
    assert "torch.compile failed (RuntimeError: C++ compile error: cannot find cl.exe)" in err
    assert "continues eager, not compiled" in err
    assert not device_mod.is_compiled(compiled) and torch._dynamo.config.suppress_errors == suppress
    compiled(x, x)
    assert capsys.readouterr().err == ""  # said once
    # A compile that works stays compiled, and checkpoints see the plain module's weights.
    from minigpt import checkpoint

    working = device_mod.compile_model(model, torch.device("cpu"), backend="eager")
    torch.testing.assert_close(working(x, x)[0], model(x, x)[0])
    assert device_mod.is_compiled(working) and capsys.readouterr().err == ""
    assert checkpoint.clean_state_dict(working).keys() == model.state_dict().keys()


def test_train_flops_per_token_is_the_palm_formula():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8), 10)
    assert bench.train_flops_per_token(model) == 6 * model.num_params() + 12 * 2 * 16 * 8


def test_derived_figures_by_hand():
    """Speed-ups and MFU from given measurements, worked out by hand."""
    measured = {"train_flops_per_token": 1e6,
                "train_tokens_per_s": 2048.0, "train_tokens_per_s_eager_fp32": 512.0,
                "matmul_peak_gflops": 4.0, "matmul_peak_gflops_default_dtype": 8.0,  # fp32, and e.g. bf16
                "sample_tokens_per_s_cached": 900.0, "sample_tokens_per_s_uncached": 150.0}
    assert bench.derived_figures(measured) == pytest.approx({
        "speedup_vs_eager": 4.0,  # 2048 / 512
        "mfu": 0.256,  # 1e6 FLOPs/token * 2048 tokens/s = 2.048 GFLOP/s of the 8 GFLOP/s (default dtype) peak
        "mfu_eager_fp32": 0.128,  # 1e6 * 512 = 0.512 GFLOP/s of the 4 GFLOP/s fp32 peak
        "cache_speedup": 6.0,  # 900 / 150
    })


def test_sampling_speeds_are_the_best_rounds_by_hand(monkeypatch):
    """compare_sampling keeps each path's fastest round and turns it into new tokens/s over the whole batch."""
    seconds = {True: [0.5, 0.4, 0.45], False: [3.0, 2.0, 2.5]}  # the rounds of the cached and uncached paths
    monkeypatch.setattr(bench, "sample_seconds",
                        lambda model, prompt, new_tokens, use_cache, seed=0: seconds[use_cache][seed])
    prompt = torch.zeros(2, 1, dtype=torch.long)  # a batch of 2 prompts
    cached, uncached = bench.compare_sampling(None, prompt, new_tokens=100, rounds=3)
    assert (cached, uncached) == pytest.approx((2 * 100 / 0.4, 2 * 100 / 2.0))  # 500 and 100 tokens/s


def test_generated_corpus_is_valid_utf8_of_the_requested_size(tmp_path):
    path = bench.write_corpus(tmp_path / "c.txt", 100_003)
    text = path.read_bytes().decode("utf-8")
    assert 100_000 - 4 <= path.stat().st_size <= 100_003 and "é" in text


def test_prepare_is_measured_in_a_child_process(tmp_path):
    result = bench.measure_prepare(1, tmp_path)
    assert result["mb_per_s"] > 0 and result["peak_rss_mb"] >= result["start_rss_mb"] > 0
    assert not (tmp_path / "prepare_corpus.txt").exists()


def test_report_renders_as_table_and_json():
    report = {"device": "cpu", "threads": 2, "train_tokens_per_s": 1234.0, "speedup_vs_eager": 1.5, "mfu": 0.3}
    table = bench.format_table(report)
    assert "1,234 tokens/s" in table and "1.50x" in table
    assert json.loads(bench.to_json(report))["train_tokens_per_s"] == 1234.0


def test_full_benchmark_report_is_consistent(tmp_path):
    from minigpt import config as config_mod

    from conftest import CONFIGS

    cfg = config_mod.load(CONFIGS / "tiny.yaml", ["train.device=cpu", "train.dtype=auto"])  # what auto picks here
    before = copy.deepcopy(cfg)
    report = bench.run(cfg, prepare_mb=1, warmup_steps=2, rounds=1, round_seconds=0.3)
    assert cfg == before  # the caller's config (its data paths) is left alone
    for key in ("train_tokens_per_s", "train_tokens_per_s_eager_fp32", "mfu", "mfu_eager_fp32", "compile_s",
                "sample_tokens_per_s_cached", "sample_tokens_per_s_uncached", "eval_tokens_per_s",
                "prepare_mb_per_s", "prepare_peak_rss_mb", "train_peak_rss_mb", "device", "dtype",
                "torch_version", "threads"):
        assert key in report, key
    auto = device_mod.resolve_precision("auto", torch.device("cpu"))
    assert report["device"] == "cpu" and report["dtype"] == auto.name and report["compile"] is False
    assert report["optimizer"] == cfg.train.optimizer and "optimizer" in bench.format_table(report)
    assert report["fused_attention"] is device_mod.resolve_fused_attention("auto", torch.device("cpu"), auto)
    # MFU of bf16 training is against the bf16 peak, measured separately; fp32 reuses the fp32 peak.
    assert (report["matmul_peak_gflops"] == report["matmul_peak_gflops_default_dtype"]) == (auto.dtype == torch.float32)
    # The speed-ups and MFUs are the report's own measurements put through derived_figures (tested by hand below);
    # how fast anything ran is not checked: on a shared machine any setting may be the slower one.
    assert {key: report[key] for key in bench.derived_figures(report)} == bench.derived_figures(report)
    speeds = ("train_tokens_per_s", "train_tokens_per_s_eager_fp32", "eval_tokens_per_s", "sample_tokens_per_s_cached",
              "sample_tokens_per_s_uncached", "sample_tokens_per_s_batch", "prepare_mb_per_s")
    assert all(report[key] > 0 for key in speeds) and report["prepare_mb"] == 1.0
    assert report["prepare_peak_rss_mb"] >= report["prepare_start_rss_mb"] > 0
    assert json.loads(bench.to_json(report))["threads"] == report["threads"]


def test_auto_settings_follow_what_the_cpu_does_fast(monkeypatch):
    """auto: bf16 autocast and the explicit attention where the CPU has native bf16 matmuls, else fp32 and fused."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(device_mod, "cpu_has_fast_bfloat16", lambda: True)
    fast = device_mod.resolve_precision("auto", cpu)
    assert fast.dtype == torch.bfloat16 and not fast.use_scaler
    assert device_mod.resolve_fused_attention("auto", cpu, fast) is False
    assert device_mod.resolve_fused_attention(True, cpu, fast) is True  # an explicit setting wins
    assert device_mod.resolve_precision("float32", cpu).dtype == torch.float32
    monkeypatch.setattr(device_mod, "cpu_has_fast_bfloat16", lambda: False)
    plain = device_mod.resolve_precision("auto", cpu)
    assert plain.dtype == torch.float32 and device_mod.resolve_fused_attention("auto", cpu, plain) is True
    assert device_mod.resolve_precision("bfloat16", cpu).dtype == torch.bfloat16
    assert device_mod.resolve_compile("auto", cpu) is False
    with pytest.raises(DeviceError, match="float16 needs a CUDA device"):
        device_mod.resolve_precision("float16", cpu)
