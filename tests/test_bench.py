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
    assert report["speedup_vs_eager"] == report["train_tokens_per_s"] / report["train_tokens_per_s_eager_fp32"]
    peak, peak_default = report["matmul_peak_gflops"] * 1e9, report["matmul_peak_gflops_default_dtype"] * 1e9
    assert (peak == peak_default) == (auto.dtype == torch.float32)  # MFU of bf16 training is against the bf16 peak
    assert report["mfu"] == report["train_flops_per_token"] * report["train_tokens_per_s"] / peak_default
    assert report["mfu_eager_fp32"] == report["train_flops_per_token"] * report["train_tokens_per_s_eager_fp32"] / peak
    assert report["cache_speedup"] == report["sample_tokens_per_s_cached"] / report["sample_tokens_per_s_uncached"]
    # Speed relations that hold by a wide margin (README: 2.9x, 7.7x, 4.7x for this config), best of alternating rounds:
    assert report["cache_speedup"] > 1.2  # the KV cache does one position's work per character, not a window's
    assert report["sample_tokens_per_s_batch"] > report["sample_tokens_per_s_cached"]  # 8 sequences per step
    assert report["eval_tokens_per_s"] > report["train_tokens_per_s"]  # forward only against forward + backward
    assert 0 < report["mfu"] < 1 and report["prepare_mb"] == 1.0
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
